"""What a node reports about its models, read from its :class:`~sllm.server.models.ModelManager`:
the catalogue (``GET /v1/models``, ``GET /v1/models/ID``), the device tier's rows and occupancy (``GET /v1/cache``)
and the node's state (``GET /status``). Plain dicts, JSON-ready, seconds and bytes; blocking
reads (the tier cache, checkpoint facts) go to the manager's metadata threads. It changes
nothing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from sllm.io.remote import redact_url

if TYPE_CHECKING:
    from sllm.server.models import ModelManager


async def catalog(m: ModelManager) -> list[dict[str, Any]]:
    """One dict per servable model: ``id``, ``created`` (Unix seconds), ``resident``,
    ``nbytes`` (None when unknown or the checkpoint does not validate), ``error`` (why,
    else None), ``source`` ("local" or "cache") and ``tiers`` (:meth:`tiers_of`; a model
    only the remote lists has ``["remote"]``). Scans and checkpoint facts in a metadata
    thread (cached per checkpoint)."""
    await m.refresh()
    entries = [(mid, m.entries[mid]) for mid in sorted(m.entries)]
    sizes = {mid: e.resident.nbytes for mid, e in entries if e.resident is not None}

    def blocking() -> tuple[dict[str, Any], list[str]]:
        facts: dict[str, Any] = {}
        for mid, e in entries:
            if e.kind == "local":
                assert e.path is not None
                facts[mid] = m.catalogue.facts(e.path)
            elif m.tiers is not None:
                facts[mid] = (sizes.get(mid) or m.tiers.nbytes_of(mid), m.tiers.created_of(mid))
        remote = m.tiers.remote_models() if m.tiers is not None else []
        return facts, remote

    facts, remote = await m.in_meta(blocking)
    out = []
    for mid, e in entries:
        f = facts.get(mid)
        if e.kind == "local":
            nbytes, error, created = f.nbytes, f.error, f.created
        else:
            nbytes, error, created = (f[0], None, f[1] or time.time()) if f else (None, None, time.time())
        out.append(dict(id=mid, created=created, resident=e.resident is not None, nbytes=nbytes, error=error,
                        source=e.kind, tiers=m.tiers_of(mid)))
    out += [dict(id=mid, created=time.time(), resident=False, nbytes=None, error=None, source="cache",
                 tiers=["remote"]) for mid in remote if mid not in m.entries]
    return sorted(out, key=lambda m: m["id"])


async def model(m: ModelManager, model_id: str) -> dict[str, Any] | None:
    """``GET /v1/models/ID``'s dict (as :func:`catalog`'s), or None for an unknown model. A
    model that only the remote holds gets its ``nbytes`` from the remote's manifest and its
    ``tensors`` from the remote's tensor index (bounded reads), so a scheduler can size a
    remote-only model, and the per-tensor part of its load, through the node that would pull it.

    Raises:
        ModelLoadFailed: the remote could not say in time whether it holds the model.
    """
    import asyncio

    from sllm.errors import SllmError
    from sllm.server.models import REMOTE_LOOKUP_SECONDS, ModelLoadFailed, ModelNotFound

    card = next((c for c in await catalog(m) if c["id"] == model_id), None)
    if (card is not None and card["nbytes"] is not None) or m.tiers is None or not m.tiers.has_remote:
        return card
    try:
        await m.lookup(model_id)  # a name nothing holds is a 404 after one bounded question to the remote
        facts = await asyncio.wait_for(m.in_meta(m.tiers.remote_facts, model_id), REMOTE_LOOKUP_SECONDS)
    except ModelNotFound:
        return None
    except (TimeoutError, SllmError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        raise ModelLoadFailed(f"model {model_id!r}: reading its manifest on the remote failed: {why}",
                              phase="pull") from exc
    if facts is None:
        return card
    return {**(card or dict(id=model_id, created=time.time(), resident=False, error=None, source="cache",
                            tiers=["remote"])), "nbytes": facts[0], "tensors": facts[1]}


def device_rows(m: ModelManager) -> list[dict[str, Any]]:
    """The device tier as rows of ``GET /v1/cache`` (resident and loading models, least
    recently used first): model, tier, nbytes, last_used (Unix seconds), pinned, in_use
    (requests in flight), state ("whole" or "loading"), path (None), resident, requests."""
    now_wall, now = time.time(), m.clock()
    rows = []
    for e in m.entries.values():
        r = e.resident
        if r is not None:
            rows.append(dict(model=e.model_id, tier="device", nbytes=r.nbytes,
                             last_used=now_wall - (now - r.last_used), pinned=e.pinned, in_use=r.leases > 0,
                             state="whole", path=None, resident=True, requests=r.leases))
        elif e.loading is not None:
            rows.append(dict(model=e.model_id, tier="device", nbytes=0, last_used=now_wall, pinned=False,
                             in_use=True, state="loading", path=None, resident=False, requests=e.waiting))
    return sorted(rows, key=lambda row: row["last_used"])

def device_stats(m: ModelManager) -> dict[str, Any]:
    """The device tier's occupancy and hit counters, shaped like :class:`sllm.core.cache.TierStats`
    (hits: requests that found their model resident; evictions: unloads)."""
    resident = [e for e in m.entries.values() if e.resident is not None]
    hits = m.counters["warm_requests"]
    misses = m.counters["requests"] - hits
    return dict(tier="device", capacity_bytes=m.config.max_memory_bytes, used_bytes=m.resident_bytes(),
                reserved_bytes=0, entries=len(resident), pinned=sum(1 for e in resident if e.pinned),
                hits=hits, misses=misses, hit_rate=hits / (hits + misses) if hits + misses else None,
                evictions=m.counters["unloads"], path=None)


async def status(m: ModelManager) -> dict[str, Any]:
    """The node's state for ``GET /status`` (JSON-ready; seconds and bytes).

    ``models``: every model this node holds somewhere, with its tiers (:meth:`tiers_of`);
    ``resident``: the device tier (``loaded_from``: the tier the load read; ``requests``:
    the generations in flight with their token counts); ``loading``: loads in progress
    and the resource each waits for (``waiting_for``: "link", "disk", "memory" or None);
    ``cache``: the tier cache's directory, remote (credentials and query removed) and
    per-tier occupancy (None without a cache); ``budget_wait_seconds``: how long a load waits
    for room in ``max_memory_bytes`` before it fails (the scheduler plans no longer wait);
    ``tokenizers``: the models whose tokenizer the node holds (a load of another parses
    one). The tier cache is read in a metadata thread.
    """
    from sllm.core.node_state import BUDGET_WAIT_SECONDS

    cache = None
    if m.tiers is not None:
        tiers = m.tiers
        stats = await m.in_meta(lambda: [dataclasses.asdict(t) for t in tiers.cache.stats()])
        await m.refresh()
        cache = {"cache_dir": str(tiers.cache.ssd.root), "remote": redact_url(tiers.config.remote_url),
                 "tiers": stats}
    now = m.clock()
    resident, loading = [], []
    for mid in sorted(m.entries):
        e = m.entries[mid]
        if e.loading is not None:
            loading.append({"model": mid, "waiting_requests": e.waiting, "waiting_for": m.waits.get(mid)})
        r = e.resident
        if r is None:
            continue
        resident.append(
            {
                "model": mid,
                "nbytes": r.nbytes,
                "tiers": m.tiers_of(mid),
                "loaded_from": r.tier,
                "pinned": e.pinned,
                "load_seconds": r.load_seconds,
                "resident_seconds": now - r.loaded_at,
                "idle_seconds": 0.0 if r.leases else now - r.last_used,
                "leases": r.leases,
                "requests": [
                    {"id": g.id, "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}
                    for g in r.engine.active()
                ],
                "kv": dataclasses.asdict(r.engine.kv_stats()),
            }
        )
    pool = m.pool.stats()
    cached = m.snapshot.cached
    ids = sorted(set(m.entries) | set(cached))
    sizes, tensors = await m.in_meta(_sizes, m, ids)
    models = [{"model": mid, "source": m.entries[mid].kind if mid in m.entries else "cache",
               "tiers": m.tiers_of(mid)}
              for mid in ids]
    return {
        "uptime_seconds": now - m.started,
        "device": m.config.device,
        "imports_ready": m.warm is not None and m.warm.done(),
        "pool_ready": m.reservation is None or m.reservation.done(),
        "draining": m.closing.is_set(),
        "keep_alive_seconds": m.config.keep_alive_seconds,
        "max_memory_bytes": m.config.max_memory_bytes,
        "budget_wait_seconds": BUDGET_WAIT_SECONDS,
        "tokenizers": m.tokenizers.held(),
        "resident_bytes": m.resident_bytes(),
        "reserved_bytes": m.reserved,
        "pool_free_bytes": pool.free_bytes,
        "models": models,
        "resident": resident,
        "loading": loading,
        "cache": cache,
        "last_cold_start": None if m.last_cold is None else dataclasses.asdict(m.last_cold),
        "counters": dict(m.counters),
        "model_bytes": sizes,
        "model_tensors": tensors,
        "loader_queue": loader_queue(m, sizes),
        **m.timings.status(),
    }


def _sizes(m: ModelManager, ids: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Metadata thread: the weights' bytes of each model the node holds (resident, local or
    cached), and the tensors of its checkpoint's index (local or on SSD: the scheduler's
    per-tensor part of a load's fixed cost), where known (checkpoint facts are cached by the
    catalogue)."""
    out: dict[str, int] = {}
    counts: dict[str, int] = {}
    for mid in ids:
        e = m.entries.get(mid)
        nbytes = tensors = None
        if e is not None and e.kind == "local" and e.path is not None:
            facts = m.catalogue.facts(e.path)
            nbytes, tensors = facts.nbytes, facts.tensors
        elif m.tiers is not None:
            nbytes, tensors = m.tiers.facts_of(mid)
        if e is not None and e.resident is not None:
            nbytes = e.resident.nbytes
        if nbytes:
            out[mid] = int(nbytes)
        if tensors:
            counts[mid] = int(tensors)
    return out, counts


def loader_queue(m: ModelManager, sizes: dict[str, int]) -> list[dict[str, Any]]:
    """The loads in progress, for the scheduler's queue estimate (sllm.core.estimator): model,
    nbytes (None when unknown), tier (where its bytes come from: "dram", "ssd" or "remote"),
    resource (the queue it needs: "link" for a remote pull, "disk" for a read, None for a
    DRAM hit), running (it holds that resource now), elapsed_seconds (since it took it),
    waiting_requests. Running ones first."""
    now, rows = m.clock(), []
    for mid in sorted(m.entries):
        e = m.entries[mid]
        if e.loading is None:
            continue
        local = [t for t in m.tiers_of(mid) if t in ("dram", "ssd", "local")]
        tier = "ssd" if local[:1] == ["local"] else (local[0] if local else "remote")
        held = m.holding.get(mid)
        rows.append({"model": mid, "nbytes": sizes.get(mid), "tier": tier,
                     "resource": {"remote": "link", "ssd": "disk"}.get(tier), "running": held is not None,
                     "elapsed_seconds": now - held[1] if held else 0.0, "waiting_requests": e.waiting})
    return sorted(rows, key=lambda r: not r["running"])


