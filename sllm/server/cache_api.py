"""The node's cache API, for ``sllm cache ... --server URL``: its device tier (resident
models, ``models.py``) and its tier cache's DRAM and SSD tiers (``tiers.py``) over HTTP.

Routes (behind the API key like every route but ``/health``; ``MODEL`` may hold a ``/``):

- ``GET /v1/cache``: ``{"cache_dir", "remote", "models": [row, ...], "tiers": [stats, ...]}``;
  a row per model and tier, fastest tier first ("device", "dram", "ssd"), least recently
  used first within a tier: model, tier, nbytes, last_used (Unix seconds), pinned, in_use,
  state ("whole", "loading", "pulling"), path, resident (on the device), requests (in flight).
- ``POST /v1/cache/MODEL/pin?tier=T`` and ``/unpin``: ``{"model", "tiers", "pinned"}``.
  Without ``tier``: every tier that holds the model.
- ``POST /v1/cache/MODEL/evict?tier=T``: ``{"model", "tiers", "freed_bytes"}``. Without
  ``tier``: every tier that holds it, the device first (so the weights' DRAM lease is given
  back before the DRAM entry goes). Nothing is removed when a tier refuses first.
- ``POST /v1/cache/MODEL/pull?tier=dram|ssd``: a :class:`~sllm.core.cache.PullResult`;
  default: DRAM when the node has a DRAM tier, else SSD.
- ``POST /v1/cache/MODEL/load``: make the model resident on the device (the device tier's
  "pull"; ``schedule-plan --apply``), through :meth:`ModelManager.acquire` and ``release``,
  so it queues like any cold start and joins a load already in flight; a resident model is
  left as it is. A :class:`LoadResult`. Errors as a completion's: 404 ``model_not_found``,
  503 ``model_load_failed``, ``insufficient_memory``, ``model_pull_failed``, ``shutting_down``.

Statuses: 400 a bad tier or model name (checked before any filesystem call), or a tier this
node does not have; 404 the model is not in the tier(s), or not on the remote (a pull); 409
a tier refuses (pinned, loading, in use, requests in flight: a stream is never cut); 503 a
pull failed (remote unreachable, checksum, no room), in OpenAI's error shape like every
error of the node. These routes take the admin key when the node has one (``gate.py``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from sllm.errors import CacheError, CheckpointError, RemoteError, UsageError
from sllm.io.remote import redact_url
from sllm.server import schemas
from sllm.server.catalog import check_model_name
from sllm.server.gate import LOAD_HEADER
from sllm.server.models import Entry, ModelLoadFailed, ModelManager, NotInTier, ShuttingDown, TierConflict
from sllm.server.requests import unavailable

#: Tiers that ``tier=`` may name, fastest first.
TIERS = ("device", "dram", "ssd")


class LoadResult(BaseModel):
    """The answer of ``POST /v1/cache/MODEL/load``.

    Attributes:
        model: the model, now resident on the device.
        tier: where its bytes came from: "local" (``--models``), "dram", "ssd" or "remote".
        loaded: True when this call waited for a load (it started one, or joined one in
            flight); False when the model was resident already (nothing was done).
        load_seconds: the load's own seconds (from the loader's start; the pull included, the
            queue not); 0 when ``loaded`` is False.
        queue_seconds: what the load waited for the loader's queues and memory, seconds.
        waited_seconds: what this call waited from its arrival (also ``x-sllm-load-seconds``).
        nbytes: the model's weights, bytes.
    """

    model: str
    tier: str
    loaded: bool
    load_seconds: float
    queue_seconds: float
    waited_seconds: float
    nbytes: int


def add_cache_routes(app: FastAPI, manager: ModelManager, error: Any) -> None:
    """Register the ``/v1/cache`` routes on ``app``; ``error(status, message, type_, **kw)``
    builds the error responses (``app.py``'s)."""

    guarded = {401: {"description": "missing or wrong admin key", "model": schemas.ErrorResponse}}
    answers = {**guarded, **{s: {"description": d, "model": schemas.ErrorResponse} for s, d in (
        (400, "a bad tier or model name"), (404, "not in the tier(s)"), (409, "a tier refuses"),
        (503, "the pull failed"))}}

    @app.get("/v1/cache", responses=guarded)
    async def listing() -> dict[str, Any]:
        out = await manager.in_meta(_listing_blocking, manager)
        device = manager.device_rows()
        resident = {r["model"] for r in device if r["resident"]}
        rows = out.pop("cache_rows")
        for r in rows:
            r.update(resident=r["model"] in resident, requests=0)
        out["tiers"] = [manager.device_stats(), *out["tiers"]]
        return {**out, "models": device + rows}

    @app.post("/v1/cache/{model:path}/pin", responses=answers)
    async def pin(model: str, tier: str | None = None) -> dict[str, Any]:
        return await _set_pinned(manager, model, tier, True)

    @app.post("/v1/cache/{model:path}/unpin", responses=answers)
    async def unpin(model: str, tier: str | None = None) -> dict[str, Any]:
        return await _set_pinned(manager, model, tier, False)

    @app.post("/v1/cache/{model:path}/evict", responses=answers)
    async def evict(model: str, tier: str | None = None) -> dict[str, Any]:
        return await _evict(manager, model, tier)

    @app.post("/v1/cache/{model:path}/pull", responses=answers)
    async def pull(model: str, tier: str | None = None) -> Any:
        if manager.tiers is None:
            raise UsageError("this node has no tier cache to pull into (start `sllm serve` with --cache-dir)")
        cache = manager.tiers.cache
        [target] = _tiers(manager, tier or ("dram" if cache.dram is not None else "ssd"), allowed=("dram", "ssd"))
        if not check_model_name(model) or (not manager.tiers.has_remote
                                           and await manager.in_meta(manager.tiers.local_tier, model) is None):
            return error(404, f"model {model[:80]!r} not found (in no tier of this node, and no remote to pull from)",
                         param="model", code="model_not_found")
        try:
            result = await manager.in_pull(cache.pull, model, dram=target == "dram")
        except (RemoteError, CheckpointError, CacheError) as exc:
            if getattr(exc, "not_found", False):
                return error(404, f"model {model!r} not found on the remote", param="model", code="model_not_found")
            return error(503, f"pulling {model!r} failed: {exc}", "server_error", param="model",
                         code="model_pull_failed", headers={"x-should-retry": "false"})
        await manager.refresh()
        await manager.trim_pool()
        return dataclasses.asdict(result)

    load_answers = {**guarded, **{s: {"description": d, "model": schemas.ErrorResponse} for s, d in (
        (400, "a bad model name"), (404, "unknown model"),
        (503, "the load or pull failed (same codes as a completion's), or the node is shutting down"))}}

    @app.post("/v1/cache/{model:path}/load", response_model=LoadResult, responses=load_answers)
    async def load(model: str) -> Any:
        return await _load(manager, model)


async def _load(manager: ModelManager, model: str) -> Any:
    """Lease ``model`` (loading it if it is not resident) and give the lease back at once:
    :class:`LoadResult`, or the 503 a completion would get.

    Raises:
        ModelNotFound: unknown name (404). UsageError: a name too long (400).
    """
    if not check_model_name(model):
        raise manager.not_found(model)
    t0 = time.monotonic()
    try:
        lease = await manager.acquire(model)
    except (ModelLoadFailed, ShuttingDown) as exc:
        return unavailable(exc, time.monotonic() - t0)
    try:
        res = lease.resident
        loaded = res.loaded_at >= lease.arrived
        cold = manager.entries[model].cold if loaded else None
        body = LoadResult(model=model, tier=res.tier, loaded=loaded, load_seconds=res.load_seconds if loaded else 0.0,
                          queue_seconds=cold.queue_seconds if cold is not None else 0.0,
                          waited_seconds=lease.load_seconds, nbytes=res.nbytes)
    finally:
        manager.release(lease)
    return JSONResponse(body.model_dump(), headers={LOAD_HEADER: f"{lease.load_seconds:.6f}"})


def _tiers(manager: ModelManager, tier: str | None, allowed: tuple[str, ...] = TIERS) -> list[str]:
    """The tiers ``tier=`` names (None: every tier of the node).

    Raises:
        UsageError: an unknown tier, or one this node does not have.
    """
    have = ["device"]
    if manager.tiers is not None:
        have += ["dram", "ssd"] if manager.tiers.cache.dram is not None else ["ssd"]
    if tier is None:
        return [t for t in allowed if t in have]
    if tier not in allowed:
        raise UsageError(f"tier {tier!r}: choose {', '.join(allowed)}")
    if tier not in have:
        flag = "--cache-dir" if tier == "ssd" else "--dram-capacity"
        raise UsageError(f"tier {tier!r}: this node has no {tier} tier (start `sllm serve` with {flag})")
    return [tier]


def _listing_blocking(manager: ModelManager) -> dict[str, Any]:
    """The tier cache's part of ``GET /v1/cache`` (file locks and reads: a worker thread)."""
    if manager.tiers is None:
        return {"cache_dir": None, "remote": None, "cache_rows": [], "tiers": []}
    cache = manager.tiers.cache
    return {"cache_dir": str(cache.ssd.root), "remote": redact_url(manager.tiers.config.remote_url),
            "cache_rows": [dataclasses.asdict(r) for r in cache.ls()],
            "tiers": [dataclasses.asdict(s) for s in cache.stats()]}


def _holding(manager: ModelManager, model: str, tiers: list[str]) -> list[str]:
    """Which of ``tiers`` hold ``model`` whole (the device: resident)."""
    where = manager.tiers_of(model)
    return [t for t in tiers if t in where]


async def _set_pinned(manager: ModelManager, model: str, tier: str | None, pinned: bool) -> dict[str, Any]:
    """Raises: NotInTier: no such tier holds it. UsageError: a bad tier or name."""
    check_model_name(model)
    await manager.refresh()
    tiers = _holding(manager, model, _tiers(manager, tier))
    if not tiers:
        raise NotInTier(f"{model}: not in the {tier or 'device, DRAM or SSD'} tier(s) of this node")
    for t in tiers:
        if t == "device":
            set_device_pinned(manager, model, pinned)
        else:
            cache = manager.tiers.cache  # type: ignore[union-attr]
            await manager.in_meta(cache.pin if pinned else cache.unpin, model, t)
    return {"model": model, "tiers": tiers, "pinned": pinned}


async def _evict(manager: ModelManager, model: str, tier: str | None) -> dict[str, Any]:
    """Evict ``model`` from ``tier`` (None: every tier holding it, the device first).

    Raises:
        NotInTier: no such tier holds it. TierConflict: a tier refuses (pinned, loading,
        in use, requests in flight); nothing is removed when the first refusal comes before
        any removal. UsageError: a bad tier or name.
    """
    check_model_name(model)
    await manager.refresh()
    tiers = _holding(manager, model, _tiers(manager, tier))
    if any(r["model"] == model and r["state"] == "loading" for r in manager.device_rows()):
        raise TierConflict(f"{model}: loading now; evict it once it is loaded and idle")
    if not tiers:
        raise NotInTier(f"{model}: not in the {tier or 'device, DRAM or SSD'} tier(s) of this node")
    if "device" in tiers:
        check_evictable(manager, model)
    rows = {}
    if manager.tiers is not None:
        rows = {r.tier: r for r in await manager.in_meta(manager.tiers.cache.ls)
                if r.model == model and r.state == "whole"}
    for t in ("dram", "ssd"):
        if t in tiers and rows.get(t) is not None and rows[t].pinned:
            raise TierConflict(f"{model}: pinned in the {t.upper()} tier",
                               hint=f"unpin it first: `sllm cache unpin {model} --tier {t}`")
    dram = rows.get("dram")
    if "dram" in tiers and "device" not in tiers and "device" in manager.tiers_of(model) and dram and dram.in_use:
        raise TierConflict(f"{model}: its DRAM entry holds the weights of the model resident on the device",
                           hint=f"evict it from the device first: `sllm cache evict {model} --tier device`")
    freed, done = 0, []
    for t in tiers:
        if t == "device":
            freed += await manager.evict(model)
        else:
            try:
                gone = await manager.in_meta(manager.tiers.cache.evict, model, t)  # type: ignore[union-attr]
            except CacheError as exc:
                raise TierConflict(f"{exc} (evicted so far: {', '.join(done) or 'nothing'})", hint=exc.hint) from exc
            freed += gone.freed_bytes
        done.append(t)
    await manager.refresh()
    await manager.trim_pool()
    return {"model": model, "tiers": done, "freed_bytes": freed}


def set_device_pinned(manager: ModelManager, model_id: str, pinned: bool) -> None:
    """Pin (never unloaded by keep-alive or the budget) or unpin a resident model.

    Raises:
        NotInTier: the model is not resident.
    """
    e = manager.entries.get(model_id)
    if e is None or e.resident is None:
        raise NotInTier(f"{model_id}: not resident on this node's device")
    e.pinned = pinned

def check_evictable(manager: ModelManager, model_id: str) -> Entry:
    """The entry of a resident model that :meth:`ModelManager.evict` may unload now.

    Raises:
        NotInTier: not resident. TierConflict: loading, pinned, or requests in flight.
    """
    e = manager.entries.get(model_id)
    if e is not None and e.loading is not None:
        raise TierConflict(f"{model_id}: loading now; evict it once it is loaded and idle")
    if e is None or e.resident is None:
        raise NotInTier(f"{model_id}: not resident on this node's device")
    if e.pinned:
        raise TierConflict(f"{model_id}: pinned on the device", hint=f"unpin it first: `sllm cache unpin {model_id}`")
    if e.resident.leases:
        raise TierConflict(f"{model_id}: {e.resident.leases} request(s) in flight on the device; "
                           "evict it when they have finished")
    return e


def error_body_for(exc: CacheError) -> dict[str, Any]:
    """The OpenAI-shaped body of a :class:`TierConflict` or :class:`NotInTier`."""
    code = "tier_conflict" if isinstance(exc, TierConflict) else "not_in_tier"
    message = f"{exc}; {exc.hint}" if exc.hint else str(exc)
    return schemas.error_body(message, "invalid_request_error", param="model", code=code)
