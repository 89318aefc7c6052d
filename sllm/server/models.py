"""Per-node model lifecycle: load on demand, one load per model, keep-alive, memory budget.

:class:`ModelManager` knows the models of ``--models DIR`` (one converted checkpoint per
subdirectory; the id is the subdirectory's name; "local" models), and, with a tier cache
(``--cache-dir``/``--remote``, :mod:`sllm.server.tiers`), the models in its DRAM and SSD
tiers and on its remote ("cache" models: a cold start takes them from the fastest tier that
holds them, pulling from the remote when none does), and which of them are resident (the
device tier). A request :meth:`~ModelManager.acquire`\\ s its model: a resident model is leased at once;
otherwise the first request starts the load and every concurrent request for that model
awaits the same load (never two loads of one model). A failed load fails the requests
waiting on it and leaves the model not resident; the next request tries again.

Loads queue per resource, not behind one node-wide lock: a pull from the remote holds the
*link* (the remote connection and the SSD writer), a read from local storage the *disk*
(the loader's reader threads), and room in the memory budget is reserved before a load
(so two loads never both count the same free bytes). A cold start that needs neither
waits for neither: a local model loads while another model downloads, and a DRAM-tier hit
reads nothing. ``queue_seconds`` reports what a load waited. The weights (the loader) and the
tokenizer (kept across unloads) load side by side in the manager's load threads.

Idle models (no lease) unload after ``keep_alive_seconds`` (scale to zero), and before a
load the least recently used idle models unload until the new one fits the memory budget;
a model pinned on the device (``sllm cache pin --tier device``) is never unloaded that way.

All state changes happen on the event loop thread, so no lock guards them. Nothing on the
loop blocks: loads and unloads run in the manager's load threads, and catalogue scans
(directory listings, the SSD tier's cross-process lock), checkpoint opening and pool
trimming in its metadata threads (bounded executors of their own, so a slow pull cannot
starve them; :mod:`sllm.server.catalog`). Time comes from an injectable ``clock``. It knows
nothing of HTTP (``app.py`` maps its errors to responses). Its records and errors are in
``state.py`` (re-exported here), the warm-up in ``warmup.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sllm.core.format import open_checkpoint
from sllm.core.node_state import BUDGET_WAIT_SECONDS
from sllm.errors import CacheError, SllmError
from sllm.io.remote import redact_url
from sllm.server import report
from sllm.server.catalog import Catalog, Snapshot, check_model_name
from sllm.server.loading import TokenizerCache, default_loader, default_release, load_blocking
from sllm.server.state import (  # noqa: F401 - re-exported: the lifecycle's public records and errors
    ColdStart,
    Entry,
    Lease,
    ModelLoadFailed,
    ModelNotFound,
    NotInTier,
    Resident,
    ServeConfig,
    ShuttingDown,
    TierConflict,
)
from sllm.server.warmup import UnloadCollection, freeze_heap, warm_up

if TYPE_CHECKING:
    from sllm.server.tiers import Fetched, NodeTiers

log = logging.getLogger("sllm.server")

#: Seconds a request for a name no local tier holds waits for the remote to say if it has it (then a 503).
REMOTE_LOOKUP_SECONDS = 10.0

T = TypeVar("T")


class ModelManager:
    """The models of one node and their residency.

    Args:
        config: the node's :class:`ServeConfig`.
        clock: monotonic seconds (injectable for tests); default ``time.monotonic``.
        loader: ``loader(path, config, pool) -> model`` in a worker thread; default
            :func:`sllm.core.loader.load_model`; ``release(model)`` undoes it.

    Use from one event loop: :meth:`start`, then :meth:`acquire`/:meth:`release` per
    request, :meth:`close` at shutdown. The constructor scans the catalogue (blocking).
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
        self.catalogue = Catalog(config.models_dir, self.tiers)
        if config.backend == "vllm" and loader is None:  # vLLM's engine, weights through --load-format sllm
            from sllm.integrations.vllm import backend

            loader, release = backend.load, backend.release
        self._loader = loader or default_loader
        self._release = release or default_release
        self.tokenizers = TokenizerCache()  # kept across unloads (loading.py)
        self.entries: dict[str, Entry] = {}
        self.snapshot = Snapshot()
        # the resources a cold start may need, each its own queue (module docstring)
        self._link = asyncio.Semaphore(1)
        self._disk = asyncio.Semaphore(1)
        self.reserved = 0  # bytes of the memory budget promised to loads in progress
        self.waits: dict[str, str] = {}  # model -> the resource its load waits for ("link", "disk", "memory")
        self._released = asyncio.Event()
        self.closing = asyncio.Event()
        self._load_threads = ThreadPoolExecutor(4, thread_name_prefix="sllm-load")
        self._meta_threads = ThreadPoolExecutor(2, thread_name_prefix="sllm-meta")
        self.garbage = UnloadCollection(self._meta_threads.submit, clock)  # after cold starts, not during
        self.cold_leases = 0  # leases of requests that started a load, until their first token
        self._reaper: asyncio.Task | None = None
        self.warm: asyncio.Future | None = None
        self.reservation: Future[None] | None = None  # the pool's background reservation (start)
        self.started = clock()
        self.last_cold: ColdStart | None = None
        self.counters = {"requests": 0, "warm_requests": 0, "loads": 0, "load_failures": 0, "unloads": 0}
        from sllm.core.estimator import TimingLog

        self.timings = TimingLog()  # prefill timings and decode rates, for /status (the scheduler's estimates)
        self.holding: dict[str, tuple[str, float]] = {}  # model -> (the resource its load holds, since when)
        self.scan()

    async def in_meta(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking metadata work (scans, cache state, checkpoint opening) off the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._meta_threads, fn, *args)

    async def _in_load(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._load_threads, fn, *args)

    async def in_pull(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a tier-cache pull (``sllm cache pull --server``) in the link's queue, in a load thread."""
        async with self._link:
            return await self._in_load(lambda: fn(*args, **kw))

    # -- catalogue ------------------------------------------------------------------------

    def scan(self) -> list[str]:
        """Re-read the catalogue now and return the model ids (sorted). Blocking: for callers
        outside the event loop (start-up, tests); on the loop use :meth:`refresh`."""
        self._apply(self.catalogue.scan())
        return sorted(self.entries)

    async def refresh(self) -> list[str]:
        """:meth:`scan` in a metadata thread; returns the model ids (sorted)."""
        self._apply(await self.in_meta(self.catalogue.scan))
        return sorted(self.entries)

    def _apply(self, snap: Snapshot) -> None:
        """Make the entries agree with a scan. Resident, loading and awaited models stay; a
        local model shadows a cached one of the same name."""
        self.snapshot = snap
        for mid in list(self.entries):
            e = self.entries[mid]
            listed = mid in snap.local if e.kind == "local" else mid in snap.cached
            if not listed and e.resident is None and e.loading is None and e.waiting == 0:
                del self.entries[mid]
        for mid, path in snap.local.items():
            self.entries.setdefault(mid, Entry(mid, path))
        for mid in snap.cached:
            self.entries.setdefault(mid, Entry(mid, None, kind="cache"))

    def not_found(self, model_id: str) -> ModelNotFound:
        """The 404 error for ``model_id``, listing what this node serves."""
        shown = model_id if len(model_id) <= 80 else model_id[:77] + "..."
        return ModelNotFound(f"model {shown!r} not found; this node serves: {', '.join(sorted(self.entries)) or 'none'}")

    async def lookup(self, model_id: str) -> Entry:
        """The model's entry. A name no local tier holds costs one rescan and, with a remote,
        one bounded question to the remote (:data:`REMOTE_LOOKUP_SECONDS`); nothing is kept
        for a name that exists nowhere.

        Raises:
            UsageError: a name too long to name anything, before any filesystem call.
            ModelNotFound: no such model (hidden and temporary names included). ModelLoadFailed: the remote
                could not say in time (phase "pull").
        """
        if not check_model_name(model_id):
            raise self.not_found(model_id)
        if model_id in self.entries:
            return self.entries[model_id]
        await self.refresh()
        if model_id not in self.entries and self.tiers is not None and self.tiers.has_remote \
                and self.tiers.valid_name(model_id):
            try:
                there = await asyncio.wait_for(self.in_meta(self.tiers.remote_has, model_id), REMOTE_LOOKUP_SECONDS)
            except (TimeoutError, SllmError) as exc:
                why = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                raise ModelLoadFailed(f"model {model_id!r}: asking the remote whether it holds it failed: {why}",
                                      phase="pull") from exc
            if there and model_id not in self.entries:
                self.entries[model_id] = Entry(model_id, None, kind="cache")
        if model_id not in self.entries:
            raise self.not_found(model_id)
        return self.entries[model_id]

    def tiers_of(self, model_id: str, cached: dict[str, list[str]] | None = None) -> list[str]:
        """Where ``model_id`` is, fastest first: "device" (resident), "dram", "ssd" (the
        tier cache, as of the last scan, or ``cached``), "local" (its ``--models`` directory)."""
        e = self.entries.get(model_id)
        if cached is None:
            cached = self.snapshot.cached
        tiers = ["device"] if e is not None and e.resident is not None else []
        tiers += cached.get(model_id, [])
        if e is not None and e.kind == "local":
            tiers.append("local")
        return tiers

    async def catalog(self) -> list[dict[str, Any]]:
        """The servable models (:func:`sllm.server.report.catalog`)."""
        return await report.catalog(self)

    def device_rows(self) -> list[dict[str, Any]]:
        """The device tier's rows of ``GET /v1/cache`` (:func:`sllm.server.report.device_rows`)."""
        return report.device_rows(self)

    def device_stats(self) -> dict[str, Any]:
        """The device tier's occupancy (:func:`sllm.server.report.device_stats`)."""
        return report.device_stats(self)

    async def status(self) -> dict[str, Any]:
        """``GET /status`` (:func:`sllm.server.report.status`)."""
        return await report.status(self)

    def resident_bytes(self) -> int:
        """Bytes of the resident models' weights and KV caches (what ``max_memory_bytes`` bounds)."""
        return sum(e.resident.nbytes + e.resident.kv_bytes for e in self.entries.values() if e.resident is not None)

    # -- the device tier ------------------------------------------------------------------

    async def evict(self, model_id: str) -> int:
        """Unload a resident, idle, unpinned model now; returns the bytes freed.

        Raises:
            As :func:`sllm.server.cache_api.check_evictable`.
        """
        from sllm.server.cache_api import check_evictable

        e = check_evictable(self, model_id)
        nbytes = e.resident.nbytes  # type: ignore[union-attr]
        if not await self._unload(e, "evicted"):
            raise TierConflict(f"{model_id}: a request took it while it was being evicted")
        return nbytes

    # -- leases ---------------------------------------------------------------------------

    async def acquire(self, model_id: str) -> Lease:
        """Lease ``model_id``, loading it first if it is not resident.

        Raises:
            ModelNotFound: unknown id. UsageError: a name that can name nothing.
            ModelLoadFailed: the load failed (its message says why). ShuttingDown: the node
            began to drain before the model was ready.
        """
        if self.closing.is_set():
            raise ShuttingDown("this node is shutting down; send the request to another node")
        entry = await self.lookup(model_id)
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
                load, closing = entry.loading, asyncio.ensure_future(self.closing.wait())
                try:
                    await asyncio.wait({asyncio.shield(load), closing}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    closing.cancel()
                if load.done():
                    load.result()  # raises ModelLoadFailed
                elif entry.resident is None:
                    raise ShuttingDown(f"this node is shutting down; {model_id!r} was not ready yet")
        finally:
            entry.waiting -= 1
            if entry.kind == "cache" and entry.resident is None and entry.loading is None and not entry.waiting:
                await self.refresh()  # a failed pull: forget the model unless a tier holds it
        res = entry.resident
        res.leases += 1
        res.last_used = self.clock()
        waited = res.last_used - arrived if res.loaded_at >= arrived else 0.0
        self.cold_leases += started_load
        return Lease(res, waited, arrived, cold=entry.cold if started_load else None)

    def release(self, lease: Lease) -> None:
        """Give a lease back (idempotent); the model's idle time starts now."""
        if lease.released:
            return
        lease.released = True
        if lease.cold is not None:  # a cold start that ends without a first token
            lease.cold, self.cold_leases = None, self.cold_leases - 1
        lease.resident.leases -= 1
        lease.resident.last_used = self.clock()
        self._released.set()

    def first_token(self, lease: Lease) -> None:
        """Record the first token of a request; completes the cold-start breakdown it started."""
        cold, lease.cold = lease.cold, None
        if cold is not None:
            self.cold_leases -= 1
            now = self.clock()
            cold.first_token_seconds = now - lease.resident.loaded_at
            cold.ttft_seconds = now - lease.arrived
            self.garbage.poll(self.cold_starting())

    def cold_starting(self) -> bool:
        """A load in progress, or a cold start's request waiting for its first token."""
        return self.cold_leases > 0 or any(e.loading is not None for e in self.entries.values())

    def leases(self) -> int:
        """Requests holding a model now (all models)."""
        return sum(e.resident.leases for e in self.entries.values() if e.resident is not None)

    # -- loading and unloading ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _queued(self, entry: Entry, resource: str) -> Any:
        """Hold ``resource`` ("link" or "disk") for the body, waiting in its queue."""
        sem = self._link if resource == "link" else self._disk
        self.waits[entry.model_id] = resource
        try:
            await sem.acquire()
        finally:
            self.waits.pop(entry.model_id, None)
        self.holding[entry.model_id] = (resource, self.clock())
        try:
            yield
        finally:
            self.holding.pop(entry.model_id, None)
            sem.release()

    async def _load(self, entry: Entry, arrived: float) -> None:
        """Load ``entry`` and make it resident, each step in its resource's queue.

        A local model: reserve room in the budget, then read it (disk). A cache model: the
        tier cache brings it to the node first (:meth:`NodeTiers.fetch`: a DRAM hit needs
        nothing, an SSD entry the disk, a model that no local tier holds the link), then
        room, then the load (from its DRAM lease: no read; from SSD: the disk). A cache model
        that failed and that no tier holds leaves the catalogue.

        Raises:
            ModelLoadFailed: from any failure, with the cause in the message.
        """
        phase, fetched, reserved = "load", None, 0
        try:
            if self.warm is not None:
                await asyncio.shield(self.warm)
            if entry.unloading is not None:
                await entry.unloading
            tier, pull_seconds, fetched_bytes = "local", 0.0, 0
            if entry.kind == "local":
                ckpt = await self.in_meta(open_checkpoint, entry.path)
                nbytes = ckpt.manifest.total_bytes
                reserved = await self._make_room(entry, nbytes)
                queue_seconds = self.clock() - arrived
                async with self._queued(entry, "disk"):
                    queue_seconds = self.clock() - arrived
                    t0 = self.clock()
                    model, tokenizer, engine = await self._in_load(self._load_blocking, entry, None)
            else:
                assert self.tiers is not None
                where = await self.in_meta(self.tiers.local_tier, entry.model_id)
                if where == "ssd":  # the tokenizer's parse beside the fetch to DRAM, not after it
                    self.tokenizers.prefetch(entry.model_id, self.tiers.cache.ssd.path_of(entry.model_id))
                phase = "pull"
                resource = {"dram": None, "ssd": "disk"}.get(where, "link")
                async with self._queued(entry, resource) if resource else contextlib.nullcontext():
                    queue_seconds = self.clock() - arrived
                    t0 = self.clock()
                    fetched = await self._in_load(self.tiers.fetch, entry.model_id)
                phase = "load"
                tier, pull_seconds, fetched_bytes = fetched.source, fetched.pull_seconds, fetched.fetched_bytes
                room = self.clock()
                nbytes = fetched.nbytes
                reserved = await self._make_room(entry, nbytes)
                async with self._queued(entry, "disk") if fetched.lease is None else contextlib.nullcontext():
                    queue_seconds += self.clock() - room
                    t0 += self.clock() - room
                    model, tokenizer, engine = await self._in_load(self._load_blocking, entry, fetched)
            try:  # the KV cache is sized once the engine exists: it counts in the budget beside the weights
                reserved += await self._make_room(entry, engine.kv_cache_bytes)
            except BaseException:
                await asyncio.to_thread(self._unload_blocking, Resident(entry.model_id, model, tokenizer, engine,
                                                                        nbytes, 0.0, 0.0, 0.0))
                raise
            now = self.clock()
        except Exception as exc:
            self.counters["load_failures"] += 1
            log.warning("loading %s failed: %s", entry.model_id, exc, exc_info=not isinstance(exc, SllmError))
            what = str(exc) if isinstance(exc, SllmError) else f"{type(exc).__name__}: {exc}"
            if phase == "pull":
                remote = redact_url(self.config.cache.remote_url) if self.config.cache is not None else None
                what = f"it is in no tier of this node and pulling it from {remote or 'the remote'} failed: {what}"
            raise ModelLoadFailed(f"model {entry.model_id!r} failed to load: {what}", phase=phase) from exc
        finally:
            self.reserved -= reserved
            entry.loading = None
            if fetched is not None:
                fetched.close()
        entry.resident = Resident(entry.model_id, model, tokenizer, engine, nbytes, now - t0, now, now, tier=tier,
                                  kv_bytes=engine.kv_cache_bytes)
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
        await self.trim_pool()
        log.info("loaded %s (%d bytes, from %s) in %.3f s", entry.model_id, nbytes, tier, now - t0)

    def _load_blocking(self, entry: Entry, fetched: Fetched | None = None) -> tuple[Any, Any, Any]:
        """Worker thread: :func:`sllm.server.loading.load_blocking` with this node's loader."""
        out = load_blocking(entry, fetched, config=self.config, pool=self.pool, tiers=self.tiers, loader=self._loader,
                            release=self._release, make_engine=self._engine, tokenizers=self.tokenizers)
        freeze_heap(collect=False)
        return out

    def _engine(self, model: Any, entry: Entry) -> Any:
        """The engine that generates with ``model`` (worker thread)."""
        from sllm.core.engine import Engine

        if hasattr(model, "sllm_engine"):  # a backend's model brings its own (sllm.integrations.vllm.backend)
            return model.sllm_engine(entry.model_id)
        try:
            return Engine(model, name=entry.model_id, config=self.config.engine)
        except BaseException:  # a model the engine cannot serve: give its weights back
            self._release(model)
            raise

    async def _make_room(self, entry: Entry, nbytes: int) -> int:
        """Reserve ``nbytes`` of the memory budget for ``entry``'s load, unloading least
        recently used idle models until they fit beside the resident ones and the other
        loads' reservations; returns the bytes reserved (the caller gives them back when
        the load ends, whichever way). Waits in no resource's queue.

        Raises:
            CacheError: the model alone exceeds the budget, or leased models keep it full
                for :data:`BUDGET_WAIT_SECONDS`.
        """
        cap = self.config.max_memory_bytes
        if cap is None:
            return 0
        if nbytes > cap:
            raise CacheError(f"it needs {nbytes} bytes and --max-memory is {cap} bytes")
        deadline = time.monotonic() + BUDGET_WAIT_SECONDS
        self.waits[entry.model_id] = "memory"
        try:
            while self.resident_bytes() + self.reserved + nbytes > cap:
                idle = [e for e in self.entries.values()
                        if e.resident is not None and e.resident.leases == 0 and not e.pinned]
                if idle:
                    await self._unload(min(idle, key=lambda e: e.resident.last_used), "memory budget")
                    continue
                if time.monotonic() > deadline or self.closing.is_set():
                    raise CacheError(
                        f"it needs {nbytes} bytes, and models in use, loading or pinned hold "
                        f"{self.resident_bytes() + self.reserved} of the --max-memory {cap} bytes"
                    )
                self._released.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), timeout=1.0)
        finally:
            self.waits.pop(entry.model_id, None)
        self.reserved += nbytes
        return nbytes

    async def _unload(self, entry: Entry, reason: str) -> bool:
        """Unload ``entry`` if it is resident and idle; True when it did. Its weights' DRAM
        lease (a cache model on the CPU) is given back: the DRAM entry becomes evictable."""
        res = entry.resident
        if res is None or res.leases:
            return False
        entry.resident = None
        entry.cold = None
        entry.pinned = False
        entry.unloading = asyncio.ensure_future(self._in_load(self._unload_blocking, res))
        try:
            await entry.unloading
        finally:
            entry.unloading = None
        self.counters["unloads"] += 1
        self._released.set()
        self.garbage.poll(self.cold_starting())
        await self.trim_pool()
        log.info("unloaded %s (%s)", entry.model_id, reason)
        return True

    def _unload_blocking(self, res: Resident) -> None:
        res.engine.close()
        self._release(res.model)
        res.model = res.engine = None
        self.garbage.unloaded()

    async def trim_pool(self) -> None:
        """Keep idle pooled buffers only while resident models + pool stay within the budget,
        and, with a DRAM tier, while they fit in its free room (buffers the tier evicts go
        back to the pool: its capacity bounds them too). Unmapping runs in a metadata thread."""
        cap = self.config.max_memory_bytes
        resident = self.resident_bytes() + self.reserved
        dram = self.tiers.cache.dram if self.tiers is not None else None

        def blocking() -> None:
            free = self.pool.stats().free_bytes
            if cap is not None and resident + free > cap:
                self.pool.clear()
            elif dram is not None:
                st = dram.stats()
                if free > dram.capacity_bytes - st.used_bytes - st.reserved_bytes:
                    self.pool.clear()

        await self.in_meta(blocking)

    async def reap(self) -> list[str]:
        """Unload every model idle for ``keep_alive_seconds``; returns their ids."""
        now, done = self.clock(), []
        for e in list(self.entries.values()):
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
                self.garbage.poll(self.cold_starting())
            except Exception:  # keep reaping; an unload failure must not stop the node
                log.exception("unloading idle models failed")

    def start(self) -> None:
        """Start the keep-alive reaper (on the running loop) and, in the background, the
        warm-up (:func:`warm_up`: the models' transformers code, about 2 s per architecture,
        DESIGN.md) and the pool's reservation: what the budget holds, or without one the
        largest model (:func:`sllm.core.loader.reservation_for`), so that cold starts read
        into touched memory (a first touch costs as much as the read on small machines)."""
        from sllm.core.loader import reservation_for

        loop = asyncio.get_running_loop()
        self._reaper = loop.create_task(self._reap_forever())
        paths = [e.path for e in self.entries.values() if e.path is not None]
        cache_ids = [mid for mid, e in self.entries.items() if e.kind == "cache"]
        ssd = self.tiers.cache.ssd if self.tiers is not None else None

        def dirs() -> list[Path]:  # the models' checkpoints on local disk
            return paths + ([ssd.path_of(mid) for mid in cache_ids if ssd.has(mid)] if ssd is not None else [])

        self.warm = loop.run_in_executor(self._meta_threads, warm_up, dirs, self.config.device)
        budget = self.config.max_memory_bytes or (self.config.cache and self.config.cache.dram_capacity_bytes) or None
        self.reservation = self.pool.reserve_async(lambda: reservation_for(dirs(), budget))

    async def close(self) -> None:
        """Stop the reaper and unload every model (requests still running end "cancelled")."""
        self.closing.set()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for e in list(self.entries.values()):
            if e.resident is not None:
                e.resident.leases = 0
                await self._unload(e, "shutdown")
        if self.tiers is not None:
            self.tiers.close()
        self._load_threads.shutdown(wait=False, cancel_futures=True)
        self._meta_threads.shutdown(wait=False, cancel_futures=True)

