"""Per-node model lifecycle: load on demand, one load per model, keep-alive, memory budget.

:class:`ModelManager` knows the models of ``--models DIR`` (one converted checkpoint per
subdirectory; the id is the subdirectory's name) and which of them are resident. A
request :meth:`~ModelManager.acquire`\\ s its model: a resident model is leased at once;
otherwise the first request starts the load and every concurrent request for that model
awaits the same load (never two loads of one model). Loads run one at a time (the
node's loader is one queue: a second cold model waits, and that wait is reported as
``queue_seconds``), in a worker thread, the weights through :func:`sllm.core.loader.load_model`
and the tokenizer beside them. A failed load fails the requests waiting on it and leaves
the model not resident; the next request tries again.

Idle models (no lease) unload after ``keep_alive_seconds`` (scale to zero), and before a
load the least recently used idle models unload until the new one fits the memory budget.

All state changes happen on the event loop thread, so no lock guards them; blocking work
(loading, unloading) runs in threads. Time comes from an injectable ``clock``. It knows
nothing of HTTP (``app.py`` maps its errors to responses).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllm.core.format import MANIFEST_FILE, open_checkpoint
from sllm.errors import CacheError, CheckpointError, ServerError, SllmError

log = logging.getLogger("sllm.server")

#: How long a load waits for leased models to go idle when the budget is full, seconds.
BUDGET_WAIT_SECONDS = 120.0


@dataclass(frozen=True)
class ServeConfig:
    """What a node serves and how; built by ``sllm serve`` from its flags.

    Attributes:
        models_dir: directory of converted models, one per subdirectory (id = its name).
        device: where models run: "cpu", "cuda", "cuda:N".
        keep_alive_seconds: idle seconds before a resident model is unloaded. Default 300.
        max_memory_bytes: most bytes of resident model weights (sum of checkpoint sizes);
            None for no limit. Least recently used idle models unload to make room.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <key>``.
        reap_interval_seconds: how often idle models are checked; default
            ``min(1, keep_alive_seconds / 4)``.
        loader_threads: reader threads per partition (None: the loader's default).
        direct_io: force O_DIRECT on or off (None: where the filesystem allows).
    """

    models_dir: Path
    device: str = "cpu"
    keep_alive_seconds: float = 300.0
    max_memory_bytes: int | None = None
    api_key: str | None = None
    reap_interval_seconds: float | None = None
    loader_threads: int | None = None
    direct_io: bool | None = None


class ModelNotFound(SllmError):
    """No model of that id in the models directory (the app answers 404)."""


class ModelLoadFailed(ServerError):
    """The model could not be loaded; ``cause`` is the underlying error (the app answers 503)."""


@dataclass
class ColdStart:
    """Where a cold request's time went, seconds (``/status`` ``last_cold_start``).

    ``queue_seconds``: waiting for the loader and for room in the memory budget;
    ``read_seconds``/``build_seconds``: the loader's report; ``load_seconds``: the whole
    load (weights and tokenizer, from the loader's start); ``first_token_seconds``: from the
    end of the load to the first token (tokenize + prefill); ``ttft_seconds``: from the
    request's arrival to its first token.
    """

    model: str
    queue_seconds: float
    read_seconds: float
    build_seconds: float
    load_seconds: float
    nbytes: int
    gbps: float
    first_token_seconds: float | None = None
    ttft_seconds: float | None = None


@dataclass
class Resident:
    """A loaded model: weights, tokenizer, engine, and its bookkeeping."""

    model_id: str
    model: Any
    tokenizer: Any
    engine: Any
    nbytes: int
    load_seconds: float
    loaded_at: float
    last_used: float
    leases: int = 0


@dataclass
class _Entry:
    model_id: str
    path: Path
    resident: Resident | None = None
    loading: asyncio.Future | None = None
    unloading: asyncio.Future | None = None
    waiting: int = 0
    cold: ColdStart | None = None


@dataclass
class Lease:
    """A request's hold on a resident model; give it back with :meth:`ModelManager.release`.

    ``load_seconds`` is what this request waited for a load (0 when the model was resident).
    """

    resident: Resident
    load_seconds: float
    arrived: float
    cold: ColdStart | None = None
    released: bool = field(default=False, repr=False)


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
        self._loader = loader or _default_loader
        self._release = release or _default_release
        self._entries: dict[str, _Entry] = {}
        self._loader_lock = asyncio.Lock()
        self._released = asyncio.Event()
        self._reaper: asyncio.Task | None = None
        self._warm: asyncio.Future | None = None
        self.started = clock()
        self.last_cold: ColdStart | None = None
        self.counters = {"requests": 0, "loads": 0, "load_failures": 0, "unloads": 0}
        self.scan()

    # -- catalogue ------------------------------------------------------------------------

    def scan(self) -> list[str]:
        """Re-read the models directory; returns the model ids (sorted). Resident models stay."""
        root = self.config.models_dir
        found = {p.name: p for p in root.iterdir() if p.is_dir() and (p / MANIFEST_FILE).is_file()}
        for mid in list(self._entries):
            e = self._entries[mid]
            if mid not in found and e.resident is None and e.loading is None:
                del self._entries[mid]
        for mid, path in found.items():
            self._entries.setdefault(mid, _Entry(mid, path))
        return sorted(self._entries)

    def lookup(self, model_id: str) -> _Entry:
        """Raises: ModelNotFound: no such model (after a rescan)."""
        if model_id not in self._entries:
            self.scan()
        if model_id not in self._entries:
            raise ModelNotFound(f"model {model_id!r} not found; this node serves: {', '.join(self.scan()) or 'none'}")
        return self._entries[model_id]

    def catalog(self) -> list[dict[str, Any]]:
        """One dict per servable model: ``id``, ``created`` (mtime), ``resident``, ``nbytes``
        (None when the checkpoint does not validate) and ``error`` (why, else None)."""
        out = []
        for mid in self.scan():
            e = self._entries[mid]
            nbytes, error = None, None
            try:
                nbytes = open_checkpoint(e.path).manifest.total_bytes
            except CheckpointError as exc:
                error = str(exc)
            created = (e.path / MANIFEST_FILE).stat().st_mtime
            out.append(dict(id=mid, created=created, resident=e.resident is not None, nbytes=nbytes, error=error))
        return out

    def resident_bytes(self) -> int:
        return sum(e.resident.nbytes for e in self._entries.values() if e.resident is not None)

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
        try:
            while entry.resident is None:
                if entry.loading is None:
                    entry.loading = asyncio.get_running_loop().create_task(self._load(entry, arrived))
                    entry.loading.add_done_callback(lambda t: t.cancelled() or t.exception())
                    started_load = True
                await asyncio.shield(entry.loading)
        finally:
            entry.waiting -= 1
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

    async def _load(self, entry: _Entry, arrived: float) -> None:
        """Load ``entry`` (one at a time across the node) and make it resident.

        Raises:
            ModelLoadFailed: from any failure, with the cause in the message.
        """
        try:
            if self._warm is not None:
                await asyncio.shield(self._warm)
            if entry.unloading is not None:
                await entry.unloading
            async with self._loader_lock:
                ckpt = await asyncio.to_thread(open_checkpoint, entry.path)
                nbytes = ckpt.manifest.total_bytes
                await self._make_room(entry, nbytes)
                queue_seconds = self.clock() - arrived
                t0 = self.clock()
                model, tokenizer, engine = await asyncio.to_thread(self._load_blocking, entry)
                now = self.clock()
        except Exception as exc:
            self.counters["load_failures"] += 1
            log.warning("loading %s failed: %s", entry.model_id, exc, exc_info=not isinstance(exc, SllmError))
            what = str(exc) if isinstance(exc, SllmError) else f"{type(exc).__name__}: {exc}"
            raise ModelLoadFailed(f"model {entry.model_id!r} failed to load: {what}") from exc
        finally:
            entry.loading = None
        entry.resident = Resident(entry.model_id, model, tokenizer, engine, nbytes, now - t0, now, now)
        report = getattr(model, "sllm_report", None)
        self.last_cold = entry.cold = ColdStart(
            model=entry.model_id,
            queue_seconds=queue_seconds,
            read_seconds=getattr(report, "read_seconds", 0.0),
            build_seconds=getattr(report, "build_seconds", 0.0),
            load_seconds=now - t0,
            nbytes=nbytes,
            gbps=getattr(report, "gbps", 0.0),
        )
        self.counters["loads"] += 1
        self._trim_pool()
        log.info("loaded %s (%d bytes) in %.3f s", entry.model_id, nbytes, now - t0)

    def _load_blocking(self, entry: _Entry) -> tuple[Any, Any, Any]:
        """Worker thread: weights (loader) and tokenizer in parallel, then the engine."""
        from sllm.core.engine import Engine

        import_model_code(entry.path)
        box: dict[str, Any] = {}

        def tokenizer() -> None:
            try:
                from transformers import AutoTokenizer

                box["tokenizer"] = AutoTokenizer.from_pretrained(entry.path)
            except Exception as exc:
                box["error"] = exc

        t = threading.Thread(target=tokenizer, name=f"sllm-tokenizer-{entry.model_id}")
        t.start()
        try:
            model = self._loader(entry.path, self.config, self.pool)
        finally:
            t.join()
        if "error" in box:
            self._release(model)
            raise CheckpointError(f"{entry.path}: cannot load the tokenizer: {box['error']}") from box["error"]
        return model, box["tokenizer"], Engine(model, name=entry.model_id)

    async def _make_room(self, entry: _Entry, nbytes: int) -> None:
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
            idle = [e for e in self._entries.values() if e.resident is not None and e.resident.leases == 0]
            if idle:
                await self._unload(min(idle, key=lambda e: e.resident.last_used), "memory budget")
                continue
            if time.monotonic() > deadline:
                raise CacheError(
                    f"it needs {nbytes} bytes, and models in use hold {self.resident_bytes()} of the "
                    f"--max-memory {cap} bytes"
                )
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), timeout=1.0)

    async def _unload(self, entry: _Entry, reason: str) -> bool:
        """Unload ``entry`` if it is resident and idle; True when it did."""
        res = entry.resident
        if res is None or res.leases:
            return False
        entry.resident = None
        entry.cold = None
        entry.unloading = asyncio.ensure_future(asyncio.to_thread(self._unload_blocking, res))
        try:
            await entry.unloading
        finally:
            entry.unloading = None
        self.counters["unloads"] += 1
        self._trim_pool()
        log.info("unloaded %s (%s)", entry.model_id, reason)
        return True

    def _unload_blocking(self, res: Resident) -> None:
        res.engine.close()
        self._release(res.model)
        res.model = res.engine = None

    def _trim_pool(self) -> None:
        """Keep idle pooled buffers only while resident models + pool stay within the budget."""
        cap = self.config.max_memory_bytes
        if cap is not None and self.resident_bytes() + self.pool.stats().free_bytes > cap:
            self.pool.clear()

    async def reap(self) -> list[str]:
        """Unload every model idle for ``keep_alive_seconds``; returns their ids."""
        now, done = self.clock(), []
        for e in list(self._entries.values()):
            r = e.resident
            if r is not None and r.leases == 0 and now - r.last_used >= self.config.keep_alive_seconds:
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
        paths = [e.path for e in self._entries.values()]

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

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The node's state for ``GET /status`` (JSON-ready; seconds and bytes)."""
        now = self.clock()
        resident, loading = [], []
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
        return {
            "uptime_seconds": now - self.started,
            "device": self.config.device,
            "imports_ready": self._warm is not None and self._warm.done(),
            "keep_alive_seconds": self.config.keep_alive_seconds,
            "max_memory_bytes": self.config.max_memory_bytes,
            "resident_bytes": self.resident_bytes(),
            "pool_free_bytes": pool.free_bytes,
            "resident": resident,
            "loading": loading,
            "last_cold_start": None if self.last_cold is None else dataclasses.asdict(self.last_cold),
            "counters": dict(self.counters),
        }


_import_lock = threading.Lock()


def import_model_code(path: Path) -> None:
    """Import the transformers code that loading ``path`` needs, one thread at a time.

    transformers' lazy module is not safe to import from two threads at once (one of them
    sees a half-initialised module: "cannot import name 'AutoConfig'"), and a load runs the
    loader and the tokenizer in two threads. Failures are left for the load to report.
    """
    import importlib
    import json

    with _import_lock:
        try:
            import transformers
            from transformers import AutoConfig, AutoTokenizer  # noqa: F401

            config = json.loads((path / "config.json").read_text())
            mtype = str(config.get("model_type", "")).replace("-", "_")
            importlib.import_module(f"transformers.models.{mtype}.modeling_{mtype}")
            for name in config.get("architectures") or []:
                getattr(transformers, name, None)
        except Exception:  # an optimisation and a guard, not a check
            log.debug("importing the code of %s failed", path, exc_info=True)


def warm_device(device: str) -> None:
    """Run the kernels of a first forward pass once on small tensors of ``device``, so the
    first cold start does not pay one-time initialisation (the CUDA context, cuBLAS
    handles, lazy kernel loading: about 0.4-1 s on an H100; math library set-up on a CPU).
    Failures are ignored: the load reports real problems."""
    try:
        import torch
        import torch.nn.functional as F

        dev = torch.device(device)
        with torch.inference_mode():
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                x = torch.randn(2, 8, 64, device=dev, dtype=dtype)
                w = torch.randn(64, 64, device=dev, dtype=dtype)
                y = F.layer_norm(F.gelu(F.linear(x, w)), (64,)) + F.relu(x).softmax(-1)
                q = y.view(2, 8, 4, 16).transpose(1, 2)
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
                torch.argmax(F.embedding(torch.tensor([[1, 2]], device=dev), w), dim=-1).tolist()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception:
        log.debug("warming %s failed", device, exc_info=True)


def _default_loader(path: Path, config: ServeConfig, pool: Any) -> Any:
    from sllm.core.loader import load_model

    return load_model(path, config.device, threads=config.loader_threads, direct_io=config.direct_io, pool=pool)


def _default_release(model: Any) -> None:
    from sllm.core.loader import release

    release(model)
