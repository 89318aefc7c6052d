"""Option aliases and flag parsers shared by several commands, so that a flag means the same
everywhere (``sllm serve`` and ``sllm cache`` take the same cache flags, byte sizes and
server address). It parses text into plain values and config objects; it imports no torch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sllm.errors import UsageError

if TYPE_CHECKING:
    from sllm.core.cache import CacheConfig

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", min=1, help="Reader threads per partition (default 4).")
]
DirectIoOpt = Annotated[
    bool | None,
    typer.Option("--direct-io/--no-direct-io", help="Force O_DIRECT on or off (default: on where the filesystem allows)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where tensors go: cpu, cuda, cuda:N.")]

# -- the tier cache ----------------------------------------------------------------------

#: Where ``sllm cache`` keeps the SSD tier when neither --cache-dir nor SLLM_CACHE_DIR says.
DEFAULT_CACHE_DIR = "~/.cache/sllm"

CacheDirOpt = Annotated[
    Path,
    typer.Option("--cache-dir", envvar="SLLM_CACHE_DIR", metavar="DIR", help="The SSD tier's directory.",
                 show_default=True),
]
ServeCacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", envvar="SLLM_CACHE_DIR", metavar="DIR",
        help="Serve through the tier cache with its SSD tier in DIR (as `sllm cache`): models there and on "
        "--remote are servable too. Default with --remote: " + DEFAULT_CACHE_DIR + "; without either: no cache.",
    ),
]
SsdCapacityOpt = Annotated[
    str | None,
    typer.Option(
        "--ssd-capacity",
        envvar="SLLM_SSD_CAPACITY",
        metavar="BYTES",
        help="Bytes the SSD tier may hold, e.g. 500GB, 64GiB, 1000000 (remembered by the cache "
        "directory; default: the remembered value, else no limit).",
    ),
]
DramCapacityOpt = Annotated[
    str | None,
    typer.Option(
        "--dram-capacity",
        metavar="BYTES",
        help="Bytes of host memory for the DRAM tier of `sllm serve`'s cache, e.g. 16GiB (used with "
        "--cache-dir or --remote); 0 disables it. Default 0.",
    ),
]
RemoteOpt = Annotated[
    str | None,
    typer.Option(
        "--remote", envvar="SLLM_REMOTE", metavar="URL",
        help="Where models are pulled from: DIR, http(s)://URL or s3://BUCKET/PREFIX.",
    ),
]
ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server", envvar="SLLM_SERVER", metavar="URL",
        help="Act on a running `sllm serve` at URL (its device, DRAM and SSD tiers) instead of the local cache directory.",
    ),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="SLLM_API_KEY", show_envvar=True, help="The server's API key (with --server)."),
]

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str, what: str, *, minimum: int = 0) -> int:
    """A byte size: ``"1500000000"``, ``"1.5G"``/``"1.5GB"`` (powers of 10), ``"8GiB"`` (powers of 2).

    Args:
        text: the flag's value.
        what: the flag's name, for the message (e.g. ``"--max-memory"``).
        minimum: the smallest accepted size, bytes.

    Raises:
        UsageError: not a size, or less than ``minimum``.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{what} {text!r}: not a size (examples: 6000000000, 6GB, 8GiB)")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if value < minimum:
        raise UsageError(f"{what} {text!r}: must be at least {minimum} byte{'s' if minimum != 1 else ''}")
    return value


def cache_config(
    cache_dir: Path,
    *,
    ssd_capacity: str | None = None,
    dram_capacity: str | None = None,
    remote: str | None = None,
) -> CacheConfig:
    """The :class:`~sllm.core.cache.CacheConfig` of the cache flags (remote settings from the environment).

    Raises:
        UsageError: a capacity that is not a size, or an unreadable SLLM_REMOTE_TIMEOUT.
    """
    import os

    from sllm.core.cache import CacheConfig
    from sllm.io.remote import RemoteConfig

    return CacheConfig(
        cache_dir=Path(cache_dir).expanduser(),
        ssd_capacity_bytes=parse_bytes(ssd_capacity, "--ssd-capacity") if ssd_capacity else None,
        dram_capacity_bytes=parse_bytes(dram_capacity, "--dram-capacity") if dram_capacity else 0,
        remote_url=remote or None,
        remote=RemoteConfig.from_env(os.environ),
    )
