"""Per-node model lifecycle: load on demand, one load per model, keep-alive, memory budget.

:class:`ModelManager` knows the models of ``--models DIR`` (one converted checkpoint per
subdirectory; the id is the subdirectory's name; "local" models), and, with a tier cache
(``--cache-dir``/``--remote``, :mod:`sllm.server.tiers`), the models in its DRAM and SSD
tiers and on its remote ("cache" models: a cold start takes them from the fastest tier that
holds them, pulling from the remote when none does), and which of them are resident (the
device tier). A request :meth:`~ModelManager.acquire`\\ s its model: a resident model is leased at once;
otherwise the first request starts the load and every concurrent request for that model
awaits the same load (never two loads of one model). Loads run one at a time (the
node's loader is one queue: a second cold model waits, and that wait is reported as
``queue_seconds``), in a worker thread, the weights through :func:`sllm.core.loader.load_model`
and the tokenizer beside them. A failed load fails the requests waiting on it and leaves
the model not resident; the next request tries again.

Idle models (no lease) unload after ``keep_alive_seconds`` (scale to zero), and before a
load the least recently used idle models unload until the new one fits the memory budget;
a model pinned on the device (:meth:`ModelManager.set_pinned`) is never unloaded that way.

All state changes happen on the event loop thread, so no lock guards them; blocking work
(loading, unloading) runs in threads. Time comes from an injectable ``clock``. It knows
nothing of HTTP (``app.py`` maps its errors to responses). Its records and errors are in
``state.py`` (re-exported here), the warm-up in ``warmup.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm.core.format import MANIFEST_FILE, open_checkpoint
from sllm.errors import CacheError, CheckpointError, SllmError
from sllm.server.state import (  # noqa: F401 - re-exported: the lifecycle's public records and errors
    ColdStart,
    Entry,
    Lease,
    ModelLoadFailed,
    ModelNotFound,
    NotInTier,
    Resident,
    ServeConfig,
    TierConflict,
)
from sllm.server.warmup import import_model_code, warm_device

if TYPE_CHECKING:
    from sllm.server.tiers import Fetched, NodeTiers

log = logging.getLogger("sllm.server")

#: How long a load waits for leased models to go idle when the budget is full, seconds.
BUDGET_WAIT_SECONDS = 120.0


class ModelManager:
    """The models of one node and their residency.

    Args:
        config: the node's :class:`ServeConfig`.
        clock: monotonic seconds (injectable for tests); default ``time.monotonic``.
        loader: ``loader(path, config, pool) -> model`` in a worker thread; default
            :func:`sllm.core.loader.load_model`. ``release(model)`` undoes it (default
            :func:`sllm.core.loader.release`).

    Use from one event loop: :meth:`start`, then :meth:`acquire`/:meth:`release` per
    request, :meth:`close` at shutdown.
    """

    def __init__(
        self,
        config: ServeConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[Path, ServeConfig, Any], Any] | None = None,
        release: Callable[[Any], None] | None = None,
    ) -> None:
        from sllm.core.pool import HostMemoryPool

        self.config = config
        self.clock = clock
        self.pool = HostMemoryPool()
        self.tiers: NodeTiers | None = None
        if config.cache is not None:
            from sllm.server.tiers import NodeTiers

            self.tiers = NodeTiers(config.cache, self.pool)
        self._loader = loader or _default_loader
        self._release = release or _default_release
        self._entries: dict[str, Entry] = {}
        self._loader_lock = asyncio.Lock()
        self._released = asyncio.Event()
        self._reaper: asyncio.Task | None = None
        self._warm: asyncio.Future | None = None
        self.started = clock()
        self.last_cold: ColdStart | None = None
        self.counters = {"requests": 0, "warm_requests": 0, "loads": 0, "load_failures": 0, "unloads": 0}
        self.scan()

    # -- catalogue ------------------------------------------------------------------------

    def scan(self) -> list[str]:
        """Re-read the models directory and the tier cache's local tiers; returns the model
        ids (sorted). Resident, loading and awaited models stay; a local model shadows a
        cached one of the same name."""
        root = self.config.models_dir
        found = {} if root is None else {
            p.name: p for p in root.iterdir() if p.is_dir() and (p / MANIFEST_FILE).is_file()}
        cached = self.tiers.cached() if self.tiers is not None else {}
        for mid in list(self._entries):
            e = self._entries[mid]
            listed = mid in found if e.kind == "local" else mid in cached
            if not listed and e.resident is None and e.loading is None and e.waiting == 0:
                del self._entries[mid]
        for mid, path in found.items():
            self._entries.setdefault(mid, Entry(mid, path))
        for mid in cached:
            self._entries.setdefault(mid, Entry(mid, None, kind="cache"))
        return sorted(self._entries)

    def lookup(self, model_id: str) -> Entry:
        """The model's entry. With a remote, a valid name that no tier holds is an entry too
        (its first request pulls it; a failed pull answers 503).

        Raises:
            ModelNotFound: no such model (after a rescan).
        """
        if model_id not in self._entries:
            self.scan()
        if (model_id not in self._entries and self.tiers is not None and self.tiers.has_remote
                and self.tiers.valid_name(model_id)):
            self._entries[model_id] = Entry(model_id, None, kind="cache")
        if model_id not in self._entries:
            raise ModelNotFound(f"model {model_id!r} not found; this node serves: {', '.join(self.scan()) or 'none'}")
        return self._entries[model_id]

    def tiers_of(self, model_id: str, cached: dict[str, list[str]] | None = None) -> list[str]:
        """Where ``model_id`` is, fastest first: "device" (resident), "dram", "ssd" (the
        tier cache), "local" (its ``--models`` directory). ``cached``: :meth:`NodeTiers.cached`."""
        e = self._entries.get(model_id)
        if cached is None:
            cached = self.tiers.cached() if self.tiers is not None else {}
        tiers = ["device"] if e is not None and e.resident is not None else []
        tiers += cached.get(model_id, [])
        if e is not None and e.kind == "local":
            tiers.append("local")
        return tiers

    def catalog(self) -> list[dict[str, Any]]:
        """One dict per servable model: ``id``, ``created`` (Unix seconds), ``resident``,
        ``nbytes`` (None when unknown or the checkpoint does not validate), ``error`` (why,
        else None), ``source`` ("local" or "cache") and ``tiers`` (:meth:`tiers_of`; a model
        only the remote lists has ``["remote"]``)."""
        out = []
        ids = self.scan()
        cached = self.tiers.cached() if self.tiers is not None else {}
        for mid in ids:
            e = self._entries[mid]
            nbytes, error, created = None, None, time.time()
            if e.kind == "local":
                assert e.path is not None
                try:
                    nbytes = open_checkpoint(e.path).manifest.total_bytes
                except CheckpointError as exc:
                    error = str(exc)
                created = (e.path / MANIFEST_FILE).stat().st_mtime
            else:
                assert self.tiers is not None
                nbytes = e.resident.nbytes if e.resident is not None else self.tiers.nbytes_of(mid)
                created = self.tiers.created_of(mid) or created
            out.append(dict(id=mid, created=created, resident=e.resident is not None, nbytes=nbytes, error=error,
                            source=e.kind, tiers=self.tiers_of(mid, cached)))
        if self.tiers is not None:
            for mid in self.tiers.remote_models():
                if mid not in self._entries:
                    out.append(dict(id=mid, created=time.time(), resident=False, nbytes=None, error=None,
                                    source="cache", tiers=["remote"]))
        return sorted(out, key=lambda m: m["id"])

    def resident_bytes(self) -> int:
        return sum(e.resident.nbytes for e in self._entries.values() if e.resident is not None)

    # -- the device tier ------------------------------------------------------------------

    def device_rows(self) -> list[dict[str, Any]]:
        """The device tier as rows of ``GET /v1/cache`` (resident and loading models, least
        recently used first): model, tier, nbytes, last_used (Unix seconds), pinned, in_use
        (requests in flight), state ("whole" or "loading"), path (None), resident, requests."""
        now_wall, now = time.time(), self.clock()
        rows = []
        for e in self._entries.values():
            r = e.resident
            if r is not None:
                rows.append(dict(model=e.model_id, tier="device", nbytes=r.nbytes,
                                 last_used=now_wall - (now - r.last_used), pinned=e.pinned, in_use=r.leases > 0,
                                 state="whole", path=None, resident=True, requests=r.leases))
            elif e.loading is not None:
                rows.append(dict(model=e.model_id, tier="device", nbytes=0, last_used=now_wall, pinned=False,
                                 in_use=True, state="loading", path=None, resident=False, requests=e.waiting))
        return sorted(rows, key=lambda row: row["last_used"])

    def device_stats(self) -> dict[str, Any]:
        """The device tier's occupancy and hit counters, shaped like :class:`sllm.core.cache.TierStats`
        (hits: requests that found their model resident; evictions: unloads)."""
        resident = [e for e in self._entries.values() if e.resident is not None]
        hits = self.counters["warm_requests"]
        misses = self.counters["requests"] - hits
        return dict(tier="device", capacity_bytes=self.config.max_memory_bytes, used_bytes=self.resident_bytes(),
                    reserved_bytes=0, entries=len(resident), pinned=sum(1 for e in resident if e.pinned),
                    hits=hits, misses=misses, hit_rate=hits / (hits + misses) if hits + misses else None,
                    evictions=self.counters["unloads"], path=None)

    def set_pinned(self, model_id: str, pinned: bool) -> None:
        """Pin (never unloaded by keep-alive or the budget) or unpin a resident model.

        Raises:
            NotInTier: the model is not resident.
        """
        e = self._entries.get(model_id)
        if e is None or e.resident is None:
            raise NotInTier(f"{model_id}: not resident on this node's device")
        e.pinned = pinned

    def check_evictable(self, model_id: str) -> Entry:
        """The entry of a resident model that :meth:`evict` may unload now.

        Raises:
            NotInTier: not resident. TierConflict: loading, pinned, or requests in flight.
        """
        e = self._entries.get(model_id)
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

    async def evict(self, model_id: str) -> int:
        """Unload a resident, idle, unpinned model now; returns the bytes freed.

        Raises:
            As :meth:`check_evictable`.
        """
        e = self.check_evictable(model_id)
        nbytes = e.resident.nbytes  # type: ignore[union-attr]
        if not await self._unload(e, "evicted"):
            raise TierConflict(f"{model_id}: a request took it while it was being evicted")
        return nbytes

    # -- leases ---------------------------------------------------------------------------

    async def acquire(self, model_id: str) -> Lease:
        """Lease ``model_id``, loading it first if it is not resident.

        Raises:
            ModelNotFound: unknown id. ModelLoadFailed: the load failed (its message says why).
        """
        entry = self.lookup(model_id)
        arrived = self.clock()
        self.counters["requests"] += 1
        started_load = False
        entry.waiting += 1
        if entry.resident is not None:
            self.counters["warm_requests"] += 1
        try:
            while entry.resident is None:
                if entry.loading is None:
                    entry.loading = asyncio.get_running_loop().create_task(self._load(entry, arrived))
                    entry.loading.add_done_callback(lambda t: t.cancelled() or t.exception())
                    started_load = True
                await asyncio.shield(entry.loading)
        finally:
            entry.waiting -= 1
            if entry.kind == "cache" and entry.resident is None and entry.loading is None and not entry.waiting:
                self.scan()  # a failed pull: forget the model unless a tier holds it
        res = entry.resident
        res.leases += 1
        res.last_used = self.clock()
        waited = res.last_used - arrived if res.loaded_at >= arrived else 0.0
        return Lease(res, waited, arrived, cold=entry.cold if started_load else None)

    def release(self, lease: Lease) -> None:
        """Give a lease back (idempotent); the model's idle time starts now."""
        if lease.released:
            return
        lease.released = True
        lease.resident.leases -= 1
        lease.resident.last_used = self.clock()
        self._released.set()

    def first_token(self, lease: Lease) -> None:
        """Record the first token of a request; completes the cold-start breakdown it started."""
        cold, lease.cold = lease.cold, None
        if cold is not None:
            now = self.clock()
            cold.first_token_seconds = now - lease.resident.loaded_at
            cold.ttft_seconds = now - lease.arrived

    # -- loading and unloading ------------------------------------------------------------

    async def _load(self, entry: Entry, arrived: float) -> None:
        """Load ``entry`` (one at a time across the node) and make it resident.

        A local model is loaded from its directory. A cache model is first brought to the
        node by the tier cache (:meth:`NodeTiers.fetch`: DRAM hit, SSD, or a pull from the
        remote), then loaded from its DRAM lease or SSD entry. A cache model that failed and
        that no tier holds leaves the catalogue.

        Raises:
            ModelLoadFailed: from any failure, with the cause in the message.
        """
        phase, fetched = "load", None
        try:
            if self._warm is not None:
                await asyncio.shield(self._warm)
            if entry.unloading is not None:
                await entry.unloading
            async with self._loader_lock:
                tier, pull_seconds, fetched_bytes = "local", 0.0, 0
                if entry.kind == "local":
                    ckpt = await asyncio.to_thread(open_checkpoint, entry.path)
                    nbytes = ckpt.manifest.total_bytes
                    await self._make_room(entry, nbytes)
                    queue_seconds = self.clock() - arrived
                    t0 = self.clock()
                else:
                    assert self.tiers is not None
                    queue_seconds = self.clock() - arrived
                    t0 = self.clock()
                    phase = "pull"
                    fetched = await asyncio.to_thread(self.tiers.fetch, entry.model_id)
                    phase = "load"
                    tier, pull_seconds, fetched_bytes = fetched.source, fetched.pull_seconds, fetched.fetched_bytes
                    nbytes = fetched.nbytes
                    room = self.clock()
                    await self._make_room(entry, nbytes)
                    queue_seconds += self.clock() - room
                    t0 += self.clock() - room
                model, tokenizer, engine = await asyncio.to_thread(self._load_blocking, entry, fetched)
                now = self.clock()
        except Exception as exc:
            self.counters["load_failures"] += 1
            log.warning("loading %s failed: %s", entry.model_id, exc, exc_info=not isinstance(exc, SllmError))
            what = str(exc) if isinstance(exc, SllmError) else f"{type(exc).__name__}: {exc}"
            if phase == "pull":
                remote = self.config.cache.remote_url if self.config.cache is not None else None
                what = f"it is in no tier of this node and pulling it from {remote or 'the remote'} failed: {what}"
            raise ModelLoadFailed(f"model {entry.model_id!r} failed to load: {what}", phase=phase) from exc
        finally:
            entry.loading = None
            if fetched is not None:
                fetched.close()
        entry.resident = Resident(entry.model_id, model, tokenizer, engine, nbytes, now - t0, now, now, tier=tier)
        report = getattr(model, "sllm_report", None)
        self.last_cold = entry.cold = ColdStart(
            model=entry.model_id,
            queue_seconds=queue_seconds,
            read_seconds=getattr(report, "read_seconds", 0.0),
            build_seconds=getattr(report, "build_seconds", 0.0),
            load_seconds=now - t0,
            nbytes=nbytes,
            gbps=getattr(report, "gbps", 0.0),
            tier=tier,
            pull_seconds=pull_seconds,
            fetched_bytes=fetched_bytes,
        )
        self.counters["loads"] += 1
        self.trim_pool()
        log.info("loaded %s (%d bytes, from %s) in %.3f s", entry.model_id, nbytes, tier, now - t0)

    def _load_blocking(self, entry: Entry, fetched: Fetched | None = None) -> tuple[Any, Any, Any]:
        """Worker thread: weights (loader) and tokenizer in parallel, then the engine.

        A local entry loads from its directory with the manager's loader; a cache entry
        from ``fetched`` (:meth:`NodeTiers.source`).
        """
        from sllm.core.engine import Engine

        with contextlib.ExitStack() as stack:
            if fetched is None:
                assert entry.path is not None
                path = entry.path
                load_weights = lambda: self._loader(path, self.config, self.pool)  # noqa: E731
            else:
                assert self.tiers is not None
                path, load_weights = stack.enter_context(self.tiers.source(
                    fetched, device=self.config.device, pool=self.pool, threads=self.config.loader_threads,
                    direct_io=self.config.direct_io))
            import_model_code(path)
            box: dict[str, Any] = {}

            def tokenizer() -> None:
                try:
                    from transformers import AutoTokenizer

                    box["tokenizer"] = AutoTokenizer.from_pretrained(path)
                except Exception as exc:
                    box["error"] = exc

            t = threading.Thread(target=tokenizer, name=f"sllm-tokenizer-{entry.model_id}")
            t.start()
            try:
                model = load_weights()
            finally:
                t.join()
            if "error" in box:
                self._release(model)
                where = entry.path or entry.model_id
                raise CheckpointError(f"{where}: cannot load the tokenizer: {box['error']}") from box["error"]
        return model, box["tokenizer"], Engine(model, name=entry.model_id)

    async def _make_room(self, entry: Entry, nbytes: int) -> None:
        """Unload least recently used idle models until ``nbytes`` more fit the budget.

        Raises:
            CacheError: the model alone exceeds the budget, or leased models keep it full
                for :data:`BUDGET_WAIT_SECONDS`.
        """
        cap = self.config.max_memory_bytes
        if cap is None:
            return
        if nbytes > cap:
            raise CacheError(f"it needs {nbytes} bytes and --max-memory is {cap} bytes")
        deadline = time.monotonic() + BUDGET_WAIT_SECONDS
        while self.resident_bytes() + nbytes > cap:
            idle = [e for e in self._entries.values()
                    if e.resident is not None and e.resident.leases == 0 and not e.pinned]
            if idle:
                await self._unload(min(idle, key=lambda e: e.resident.last_used), "memory budget")
                continue
            if time.monotonic() > deadline:
                raise CacheError(
                    f"it needs {nbytes} bytes, and models in use or pinned hold {self.resident_bytes()} of the "
                    f"--max-memory {cap} bytes"
                )
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), timeout=1.0)

    async def _unload(self, entry: Entry, reason: str) -> bool:
        """Unload ``entry`` if it is resident and idle; True when it did. Its weights' DRAM
        lease (a cache model on the CPU) is given back: the DRAM entry becomes evictable."""
        res = entry.resident
        if res is None or res.leases:
            return False
        entry.resident = None
        entry.cold = None
        entry.pinned = False
        entry.unloading = asyncio.ensure_future(asyncio.to_thread(self._unload_blocking, res))
        try:
            await entry.unloading
        finally:
            entry.unloading = None
        self.counters["unloads"] += 1
        self.trim_pool()
        log.info("unloaded %s (%s)", entry.model_id, reason)
        return True

    def _unload_blocking(self, res: Resident) -> None:
        res.engine.close()
        self._release(res.model)
        res.model = res.engine = None

    def trim_pool(self) -> None:
        """Keep idle pooled buffers only while resident models + pool stay within the budget,
        and, with a DRAM tier, while they fit in its free room (buffers the tier evicts go
        back to the pool: its capacity bounds them too)."""
        free = self.pool.stats().free_bytes
        cap = self.config.max_memory_bytes
        dram = self.tiers.cache.dram if self.tiers is not None else None
        if cap is not None and self.resident_bytes() + free > cap:
            self.pool.clear()
        elif dram is not None:
            st = dram.stats()
            if free > dram.capacity_bytes - st.used_bytes - st.reserved_bytes:
                self.pool.clear()

    async def reap(self) -> list[str]:
        """Unload every model idle for ``keep_alive_seconds``; returns their ids."""
        now, done = self.clock(), []
        for e in list(self._entries.values()):
            r = e.resident
            if r is not None and r.leases == 0 and not e.pinned and now - r.last_used >= self.config.keep_alive_seconds:
                if await self._unload(e, "keep-alive"):
                    done.append(e.model_id)
        return done

    async def _reap_forever(self) -> None:
        ka = self.config.keep_alive_seconds
        interval = self.config.reap_interval_seconds or max(0.05, min(1.0, ka / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap()
            except Exception:  # keep reaping; an unload failure must not stop the node
                log.exception("unloading idle models failed")

    def start(self) -> None:
        """Start the keep-alive reaper (on the running loop) and, in a thread, import the
        models' transformers code so that the first cold start does not pay it (about 2 s
        per architecture; DESIGN.md)."""
        loop = asyncio.get_running_loop()
        self._reaper = loop.create_task(self._reap_forever())
        paths = [e.path for e in self._entries.values() if e.path is not None]
        if self.tiers is not None:
            ssd = self.tiers.cache.ssd
            paths += [ssd.path_of(mid) for mid, e in self._entries.items() if e.kind == "cache" and ssd.has(mid)]

        def warm() -> None:
            for p in paths:
                import_model_code(p)
            warm_device(self.config.device)

        self._warm = loop.run_in_executor(None, warm)

    async def close(self) -> None:
        """Stop the reaper and unload every model (requests still running end "cancelled")."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for e in list(self._entries.values()):
            if e.resident is not None:
                e.resident.leases = 0
                await self._unload(e, "shutdown")
        if self.tiers is not None:
            self.tiers.close()

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The node's state for ``GET /status`` (JSON-ready; seconds and bytes).

        ``models``: every model this node holds somewhere, with its tiers (:meth:`tiers_of`);
        ``resident``: the device tier (``loaded_from``: the tier the load read); ``cache``:
        the tier cache's directory, remote and per-tier occupancy (None without a cache).
        """
        now = self.clock()
        resident, loading = [], []
        cached = self.tiers.cached() if self.tiers is not None else {}
        for mid in sorted(self._entries):
            e = self._entries[mid]
            if e.loading is not None:
                loading.append({"model": mid, "waiting_requests": e.waiting})
            r = e.resident
            if r is None:
                continue
            resident.append(
                {
                    "model": mid,
                    "nbytes": r.nbytes,
                    "tiers": self.tiers_of(mid, cached),
                    "loaded_from": r.tier,
                    "pinned": e.pinned,
                    "load_seconds": r.load_seconds,
                    "resident_seconds": now - r.loaded_at,
                    "idle_seconds": 0.0 if r.leases else now - r.last_used,
                    "requests": [
                        {"id": g.id, "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}
                        for g in r.engine.active()
                    ],
                }
            )
        pool = self.pool.stats()
        models = [{"model": mid, "source": self._entries[mid].kind if mid in self._entries else "cache",
                   "tiers": self.tiers_of(mid, cached)}
                  for mid in sorted(set(self._entries) | set(cached))]
        cache = None
        if self.tiers is not None:
            cache = {"cache_dir": str(self.tiers.cache.ssd.root), "remote": self.tiers.config.remote_url,
                     "tiers": [dataclasses.asdict(t) for t in self.tiers.cache.stats()]}
        return {
            "uptime_seconds": now - self.started,
            "device": self.config.device,
            "imports_ready": self._warm is not None and self._warm.done(),
            "keep_alive_seconds": self.config.keep_alive_seconds,
            "max_memory_bytes": self.config.max_memory_bytes,
            "resident_bytes": self.resident_bytes(),
            "pool_free_bytes": pool.free_bytes,
            "models": models,
            "resident": resident,
            "loading": loading,
            "cache": cache,
            "last_cold_start": None if self.last_cold is None else dataclasses.asdict(self.last_cold),
            "counters": dict(self.counters),
        }


def _default_loader(path: Path, config: ServeConfig, pool: Any) -> Any:
    from sllm.core.loader import load_model

    return load_model(path, config.device, threads=config.loader_threads, direct_io=config.direct_io, pool=pool)


def _default_release(model: Any) -> None:
    from sllm.core.loader import release

    release(model)
