"""``sllm cache``: the node's checkpoint cache, its tiers, and where models come from.

Subcommands: ``ls``, ``pull MODEL``, ``pin MODEL``, ``unpin MODEL``, ``evict MODEL``,
``verify MODEL``, ``stats``. Each checks its flags, calls one method of
:class:`sllm.core.cache.TierCache` (or of :class:`sllm.client.NodeClient` with
``--server``), and renders the result as a table, or as exactly one JSON document on stdout
with ``--json``. Progress and errors go to stderr.

Without ``--server`` they act on the SSD tier of ``--cache-dir`` directly (safe while other
``sllm`` processes use it). With ``--server URL`` they act on a running ``sllm serve``
through its HTTP API (``/v1/cache``): its device tier (resident models), DRAM tier and SSD
tier; ``--cache-dir`` is then the server's business and not read here.

Environment: SLLM_CACHE_DIR (default ~/.cache/sllm), SLLM_SSD_CAPACITY, SLLM_REMOTE,
SLLM_SERVER and SLLM_API_KEY (for --server), SLLM_S3_ENDPOINT or AWS_ENDPOINT_URL (an
S3-compatible endpoint), AWS credentials for s3://.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sllm.commands._options import (
    DEFAULT_CACHE_DIR,
    ApiKeyOpt,
    CacheDirOpt,
    JsonOpt,
    QuietOpt,
    RemoteOpt,
    ServerOpt,
    SsdCapacityOpt,
    cache_config,
)
from sllm.commands._output import byte_progress, emit_json, handle_errors, table
from sllm.errors import UsageError

if TYPE_CHECKING:
    from sllm.client import NodeClient
    from sllm.core.cache import TierCache

app = typer.Typer(
    name="cache",
    help="The node's checkpoint cache: list, pull from a remote, pin, evict, verify, stats; "
    "locally or on a running `sllm serve` (--server).",
    no_args_is_help=True,
    add_completion=False,
)

TierOpt = Annotated[
    str | None,
    typer.Option(
        "--tier",
        help="ssd, dram or device (dram and device live in a running `sllm serve`: with --server). "
        "Default: every tier that holds the model.",
    ),
]
_TIERS = ("device", "dram", "ssd")


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
    from sllm.core.cache import TierCache

    return TierCache(cache_config(cache_dir, ssd_capacity=capacity, remote=remote))


def _client(server: str, api_key: str | None) -> NodeClient:
    from sllm.client import NodeClient

    return NodeClient(server, api_key=api_key)


def _check_tier(tier: str | None, server: str | None) -> str | None:
    """Raises: UsageError: an unknown tier, or dram/device without --server."""
    if tier not in (None, *_TIERS):
        raise UsageError(f"--tier {tier!r}: choose {', '.join(_TIERS)}")
    if tier in ("dram", "device") and server is None:
        raise UsageError(
            f"--tier {tier}: the {tier.upper() if tier == 'dram' else 'device'} tier lives in a running `sllm serve`; "
            "pass its address with --server URL"
        )
    return tier


def _dicts(rows: list[Any]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r) for r in rows]


@app.command("ls")
@handle_errors
def ls(
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the models in the cache: tier, state, bytes, last use, pinned, in use.

    STATE is "whole" for a usable entry, "pulling" for a download in flight and "loading"
    for a DRAM entry or a model being filled (not usable until it completes). With
    --server: the server's device (resident models), DRAM and SSD tiers.
    """
    if server is not None:
        with _client(server, api_key) as client:
            doc = client.cache_ls()
        where, rows = server, doc["models"]
    else:
        cache = _open(cache_dir)
        where, rows = str(cache.ssd.root), _dicts(cache.ls())
        doc = {"cache_dir": where, "models": rows}
    if as_json:
        emit_json(doc)
        return
    table(
        f"sllm cache {where}",
        ["model", "tier", "state", "size", "last used", "pinned", "in use"],
        [[r["model"], r["tier"], r["state"], human_bytes(r["nbytes"]), _when(r["last_used"]),
          "yes" if r["pinned"] else "", "yes" if r["in_use"] else ""] for r in rows],
    )


@app.command("pull")
@handle_errors
def pull(
    model: Annotated[str, typer.Argument(help="The model's name under the remote (e.g. gpt2 or org/name).")],
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    ssd_capacity: SsdCapacityOpt = None,
    remote: RemoteOpt = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    tier: Annotated[
        str | None,
        typer.Option("--tier", help="With --server: dram (default when the server has a DRAM tier) or ssd."),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download MODEL from the remote into the SSD tier (a no-op when it is there already).

    Chunks are checked against the manifest's sha256 digests as they arrive; the entry
    appears only when whole. Least recently used, unpinned, unused models are evicted to
    make room. Another `sllm cache pull` of the same model is waited for. With --server,
    the server pulls it from its remote into its SSD and DRAM tiers (no progress shown).
    """
    if server is not None:
        if tier not in (None, "dram", "ssd"):
            raise UsageError(f"--tier {tier!r}: a pull goes to dram or ssd")
        with _client(server, api_key) as client:
            result = client.cache_pull(model, tier)
    else:
        if tier is not None:
            raise UsageError("--tier: a local pull goes to the SSD tier; --tier needs --server")
        cache = _open(cache_dir, ssd_capacity, remote)
        try:
            with byte_progress(f"pull {model}", enabled=not (as_json or quiet)) as on_progress:
                result = dataclasses.asdict(cache.pull(model, on_progress=on_progress))
        finally:
            cache.close()
    if as_json:
        emit_json(result)
        return
    table(
        None,
        ["", result["model"]],
        [
            ["from", result["source"]],
            ["size", human_bytes(result["nbytes"])],
            ["downloaded", human_bytes(result["fetched_bytes"])],
            ["seconds", f"{result['seconds']:.3f}"],
            ["GB/s", f"{result['gbps']:.3f}"],
            ["tiers", ", ".join(result["tiers"]) or "-"],
            ["evicted", ", ".join(result["evicted"]) or "-"],
            ["path", result["path"] or "-"],
        ],
    )


def _pin(model: str, cache_dir: Path, tier: str | None, server: str | None, api_key: str | None,
         as_json: bool, pinned: bool) -> None:
    _check_tier(tier, server)
    if server is not None:
        with _client(server, api_key) as client:
            tiers = (client.cache_pin if pinned else client.cache_unpin)(model, tier)["tiers"]
    else:
        cache = _open(cache_dir)
        tiers = list(cache.pin(model, "ssd") if pinned else cache.unpin(model, "ssd"))
    if as_json:
        emit_json({"model": model, "tiers": tiers, "pinned": pinned})
    else:
        print(f"{model}: {'pinned' if pinned else 'unpinned'} in {', '.join(tiers)}")


@app.command("pin")
@handle_errors
def pin(
    model: Annotated[str, typer.Argument(help="A cached model.")],
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    tier: TierOpt = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Keep MODEL in the cache: pinned models are never evicted to make room.

    On the device tier (--server, --tier device) a pinned model is never unloaded by the
    keep-alive or the memory budget.
    """
    _pin(model, cache_dir, tier, server, api_key, as_json, True)


@app.command("unpin")
@handle_errors
def unpin(
    model: Annotated[str, typer.Argument(help="A cached model.")],
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    tier: TierOpt = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Let MODEL be evicted again when room is needed."""
    _pin(model, cache_dir, tier, server, api_key, as_json, False)


@app.command("evict")
@handle_errors
def evict(
    model: Annotated[str, typer.Argument(help="A cached model.")],
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    tier: TierOpt = None,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove MODEL from the cache. Refused while it is pinned or in use.

    With --server, evicting from the device tier unloads the model; it is refused while
    requests for it are in flight (their streams are never cut). Without --tier: every tier
    that holds it, the device first.
    """
    _check_tier(tier, server)
    if server is not None:
        with _client(server, api_key) as client:
            result = client.cache_evict(model, tier)
    else:
        result = dataclasses.asdict(_open(cache_dir).evict(model, "ssd"))
    if as_json:
        emit_json(result)
    else:
        print(f"{model}: evicted from {', '.join(result['tiers'])} ({human_bytes(result['freed_bytes'])} freed)")


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
        emit_json({**dataclasses.asdict(result), "ok": True})
    else:
        print(f"{model}: ok ({result.chunks} chunks, {human_bytes(result.nbytes)} in {result.seconds:.2f} s)")


@app.command("stats")
@handle_errors
def stats(
    cache_dir: CacheDirOpt = Path(DEFAULT_CACHE_DIR),
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Capacity, use and hit rate of each tier: the SSD tier, or with --server the server's
    device, DRAM and SSD tiers."""
    if server is not None:
        with _client(server, api_key) as client:
            rows = client.cache_ls()["tiers"]
    else:
        rows = _dicts(_open(cache_dir).stats())
    if as_json:
        emit_json({"tiers": rows})
        return
    table(
        None,
        ["", *(s["tier"] for s in rows)],
        [
            ["capacity", *(human_bytes(s["capacity_bytes"]) for s in rows)],
            ["used", *(human_bytes(s["used_bytes"]) for s in rows)],
            ["pulling", *(human_bytes(s["reserved_bytes"]) for s in rows)],
            ["models", *(str(s["entries"]) for s in rows)],
            ["pinned", *(str(s["pinned"]) for s in rows)],
            ["hits", *(f"{s['hits']} of {s['hits'] + s['misses']}" for s in rows)],
            ["hit rate", *("-" if s["hit_rate"] is None else f"{s['hit_rate']:.0%}" for s in rows)],
            ["evictions", *(str(s["evictions"]) for s in rows)],
            ["path", *(s["path"] or "-" for s in rows)],
        ],
    )
