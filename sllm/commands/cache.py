"""``sllm cache``: the node's checkpoint cache (the SSD tier) and where models come from.

Subcommands: ``ls``, ``pull MODEL``, ``pin MODEL``, ``unpin MODEL``, ``evict MODEL``,
``verify MODEL``, ``stats``. Each checks its flags, calls one method of
:class:`sllm.core.cache.TierCache`, and renders the result as a table, or as exactly one
JSON document on stdout with ``--json``. Progress and errors go to stderr.

They act on the SSD tier of ``--cache-dir`` directly (safe while other ``sllm`` processes
use it). The DRAM and device tiers belong to a running ``sllm serve``; acting on those
through its HTTP API (``--server URL``) is not here yet.

Environment: SLLM_CACHE_DIR (default ~/.cache/sllm), SLLM_SSD_CAPACITY, SLLM_REMOTE,
SLLM_S3_ENDPOINT or AWS_ENDPOINT_URL (an S3-compatible endpoint), AWS credentials for s3://.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sllm.commands._options import JsonOpt, QuietOpt
from sllm.commands._output import byte_progress, emit_json, handle_errors, table
from sllm.errors import UsageError

if TYPE_CHECKING:
    from sllm.core.cache import TierCache

app = typer.Typer(
    name="cache",
    help="The node's checkpoint cache: list, pull from a remote, pin, evict, verify, stats.",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_CACHE_DIR = "~/.cache/sllm"

CacheDirOpt = Annotated[
    Path,
    typer.Option("--cache-dir", envvar="SLLM_CACHE_DIR", help="The SSD tier's directory.", show_default=True),
]
CapacityOpt = Annotated[
    str | None,
    typer.Option(
        "--ssd-capacity",
        envvar="SLLM_SSD_CAPACITY",
        help="Bytes the SSD tier may hold, e.g. 500GB, 64GiB, 1000000 (remembered by the cache "
        "directory; default: the remembered value, else no limit).",
    ),
]
RemoteOpt = Annotated[
    str | None,
    typer.Option("--remote", envvar="SLLM_REMOTE", help="Where models are pulled from: DIR, http(s)://URL or s3://BUCKET/PREFIX."),
]
TierOpt = Annotated[
    str | None, typer.Option("--tier", help="ssd or dram (dram tiers live in a running `sllm serve`).")
]

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(text: str, what: str = "--ssd-capacity") -> int:
    """``"10GB"`` -> 10_000_000_000. KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024.

    Raises:
        UsageError: not a size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"{what} {text!r}: not a size (examples: 500GB, 64GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human_bytes(n: int | None) -> str:
    """``16002596`` -> ``"16.0 MB"`` (powers of 1000); None -> "unlimited"."""
    if n is None:
        return "unlimited"
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _open(cache_dir: Path, capacity: str | None = None, remote: str | None = None) -> TierCache:
    from sllm.core.cache import CacheConfig, TierCache
    from sllm.io.remote import RemoteConfig

    config = CacheConfig(
        cache_dir=Path(cache_dir).expanduser(),
        ssd_capacity_bytes=parse_bytes(capacity) if capacity else None,
        remote_url=remote or None,
        remote=RemoteConfig.from_env(os.environ),
    )
    return TierCache(config)


def _no_dram(tier: str | None) -> None:
    if tier not in (None, "ssd", "dram"):
        raise UsageError(f"--tier {tier!r}: choose ssd or dram")
    if tier == "dram":
        raise UsageError(
            "--tier dram: the DRAM tier lives in a running `sllm serve`; acting on it through "
            "--server URL is not implemented yet"
        )


@app.command("ls")
@handle_errors
def ls(cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR), as_json: JsonOpt = False) -> None:
    """List the models in the cache: tier, state, bytes, last use, pinned, in use.

    STATE is "whole" for a usable entry and "pulling" for a download in flight (not usable
    until it completes).
    """
    cache = _open(cache_dir)
    rows = cache.ls()
    if as_json:
        emit_json({"cache_dir": str(cache.ssd.root), "models": rows})
        return
    table(
        f"sllm cache {cache.ssd.root}",
        ["model", "tier", "state", "size", "last used", "pinned", "in use"],
        [[r.model, r.tier, r.state, human_bytes(r.nbytes), _when(r.last_used), "yes" if r.pinned else "",
          "yes" if r.in_use else ""] for r in rows],
    )


@app.command("pull")
@handle_errors
def pull(
    model: Annotated[str, typer.Argument(help="The model's name under the remote (e.g. gpt2 or org/name).")],
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    ssd_capacity: CapacityOpt = None,
    remote: RemoteOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download MODEL from the remote into the SSD tier (a no-op when it is there already).

    Chunks are checked against the manifest's sha256 digests as they arrive; the entry
    appears only when whole. Least recently used, unpinned, unused models are evicted to
    make room. Another `sllm cache pull` of the same model is waited for.
    """
    cache = _open(cache_dir, ssd_capacity, remote)
    try:
        with byte_progress(f"pull {model}", enabled=not (as_json or quiet)) as on_progress:
            result = cache.pull(model, on_progress=on_progress)
    finally:
        cache.close()
    if as_json:
        emit_json(result)
        return
    table(
        None,
        ["", result.model],
        [
            ["from", result.source],
            ["size", human_bytes(result.nbytes)],
            ["downloaded", human_bytes(result.fetched_bytes)],
            ["seconds", f"{result.seconds:.3f}"],
            ["GB/s", f"{result.gbps:.3f}"],
            ["evicted", ", ".join(result.evicted) or "-"],
            ["path", result.path or "-"],
        ],
    )


def _pin(model: str, cache_dir: Path, tier: str | None, as_json: bool, pinned: bool) -> None:
    _no_dram(tier)
    cache = _open(cache_dir)
    tiers = cache.pin(model, "ssd") if pinned else cache.unpin(model, "ssd")
    if as_json:
        emit_json({"model": model, "tiers": list(tiers), "pinned": pinned})
    else:
        print(f"{model}: {'pinned' if pinned else 'unpinned'} in {', '.join(tiers)}")


@app.command("pin")
@handle_errors
def pin(
    model: Annotated[str, typer.Argument(help="A cached model.")],
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    tier: TierOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Keep MODEL in the cache: pinned models are never evicted to make room."""
    _pin(model, cache_dir, tier, as_json, True)


@app.command("unpin")
@handle_errors
def unpin(
    model: Annotated[str, typer.Argument(help="A cached model.")],
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    tier: TierOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Let MODEL be evicted again when room is needed."""
    _pin(model, cache_dir, tier, as_json, False)


@app.command("evict")
@handle_errors
def evict(
    model: Annotated[str, typer.Argument(help="A cached model.")],
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    tier: TierOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove MODEL from the cache. Refused while it is pinned or in use."""
    _no_dram(tier)
    result = _open(cache_dir).evict(model, "ssd")
    if as_json:
        emit_json(result)
    else:
        print(f"{model}: evicted from {', '.join(result.tiers)} ({human_bytes(result.freed_bytes)} freed)")


@app.command("verify")
@handle_errors
def verify(
    model: Annotated[str, typer.Argument(help="A cached model.")],
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    as_json: JsonOpt = False,
) -> None:
    """Check every chunk of MODEL's cached files against the sha256 digests of its manifest.

    Exits 2 and names the file and chunk when one differs.
    """
    result = _open(cache_dir).verify(model, "ssd")
    if as_json:
        emit_json({**_asdict(result), "ok": True})
    else:
        print(f"{model}: ok ({result.chunks} chunks, {human_bytes(result.nbytes)} in {result.seconds:.2f} s)")


@app.command("stats")
@handle_errors
def stats(cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR), as_json: JsonOpt = False) -> None:
    """Capacity, use and hit rate of each tier this process sees (the SSD tier)."""
    rows = _open(cache_dir).stats()
    if as_json:
        emit_json({"tiers": rows})
        return
    table(
        None,
        ["", *(s.tier for s in rows)],
        [
            ["capacity", *(human_bytes(s.capacity_bytes) for s in rows)],
            ["used", *(human_bytes(s.used_bytes) for s in rows)],
            ["pulling", *(human_bytes(s.reserved_bytes) for s in rows)],
            ["models", *(str(s.entries) for s in rows)],
            ["pinned", *(str(s.pinned) for s in rows)],
            ["hits", *(f"{s.hits} of {s.hits + s.misses}" for s in rows)],
            ["hit rate", *("-" if s.hit_rate is None else f"{s.hit_rate:.0%}" for s in rows)],
            ["evictions", *(str(s.evictions) for s in rows)],
            ["path", *(s.path or "-" for s in rows)],
        ],
    )


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)

