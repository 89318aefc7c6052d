"""The fast loader: an sllm checkpoint to a state dict or a ready transformers model.

For each partition the bytes come into one host buffer leased from the memory pool (a pool
hit, the page cache mapped in place, or parallel chunked O_DIRECT reads: see
:mod:`sllm.core.partitions`), and every tensor is a view at its offset, so no tensor byte is
copied or deserialized on the CPU path; with CUDA, chunks stream to one device buffer per
partition as they land. ``load_model`` builds the model skeleton (:mod:`sllm.core.skeleton`)
in a helper thread while the reads are in flight, then assigns the views and ties weights.

This module owns the life of a load: its :class:`LoadReport`, the registry that
:func:`report_of` and :func:`release` use, and the return of its host buffers to the pool,
by :func:`release` or when the model or state dict is garbage-collected (``del model``,
reference cycles included: the pool takes a buffer back once no tensor views it). It
validates metadata through ``sllm/core/format.py`` before reading any byte, and moves bytes
only through ``sllm/io/``. It knows nothing of HTTP or caching policy.
"""

from __future__ import annotations

import copy
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from sllm.core.format import Checkpoint, Manifest, TensorEntry, open_checkpoint, reconvert_hint
from sllm.core.partitions import DeviceSpec, Filled, fill_partition, partition_tag, resolve_devices, tensor_views
from sllm.core.pool import HostMemoryPool, default_pool
from sllm.core.skeleton import (
    build_model,
    builder,
    detach_weights,
    dominant_dtype,
    make_skeleton,
    model_config,
    skeleton_key,
    skeletons,
)
from sllm.errors import CheckpointError, UsageError
from sllm.io.hostmem import HostBuffer
from sllm.io.reader import DEFAULT_READ_THREADS

__all__ = [
    "DeviceSpec", "HostPartitions", "LoadReport", "LoadedCheckpoint", "StateDict", "build_model", "load_checkpoint",
    "load_model", "load_model_from_host", "load_state_dict", "make_skeleton", "partition_tag", "release",
    "report_of", "reservation_for", "resolve_devices", "tensor_views",
]  # fmt: skip

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class LoadReport:
    """Figures of one load.

    Attributes:
        path: the checkpoint directory.
        nbytes: bytes read (all partitions).
        partitions: number of partitions.
        read_seconds: metadata checks + reads (+ host-to-device copies), wall time.
        build_seconds: model skeleton build + weight assignment (0 for a state dict).
        total_seconds: the whole call.
        gbps: ``nbytes / read_seconds / 1e9``.
        direct_io: True when every partition was read with O_DIRECT.
        pool_hit: True when every partition's bytes were still in the host memory pool
            (a DRAM-tier hit: nothing was read from storage).
        device: where the tensors are ("cpu", "cuda:0", or several joined by ",").
        via: how the partitions' bytes came, distinct ways joined by ",": "O_DIRECT",
            "buffered" (reads), "page-cache" (the resident file mapped in place), "pool"
            (a pool hit), "host" (:func:`load_model_from_host`).
    """

    path: str
    nbytes: int
    partitions: int
    read_seconds: float
    build_seconds: float
    total_seconds: float
    gbps: float
    direct_io: bool
    pool_hit: bool
    device: str
    via: str = ""


@dataclass
class LoadedCheckpoint:
    """A checkpoint's tensors in memory, and the host buffers they (may) view.

    Attributes:
        checkpoint: the validated metadata.
        state_dict: name -> tensor; tied names map to the same tensor object.
        report: the load's figures.
        host_buffers: pool leases still held (CPU loads: the tensors view them).
    """

    checkpoint: Checkpoint
    state_dict: dict[str, torch.Tensor]
    report: LoadReport
    host_buffers: list[HostBuffer] = field(default_factory=list)
    pool: HostMemoryPool | None = None
    on_release: Callable[[], None] | None = None
    #: Forgets this load when its model or state dict is garbage-collected (see _track).
    finalizer: weakref.finalize | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give the host buffers back to the pool (and run ``on_release``, e.g. give a cache
        lease back); the tensors must not be used afterwards."""
        if self.pool is not None:
            for buf in self.host_buffers:
                self.pool.release(buf)
        self.host_buffers = []
        self.state_dict = {}
        hook, self.on_release = self.on_release, None
        if hook is not None:
            hook()


class StateDict(dict):
    """The ``dict[str, Tensor]`` that :func:`load_state_dict` returns (weak-referenceable, so
    :func:`release` and :func:`report_of` can find its load)."""



# id(model or state dict) -> its load; an entry goes when its object is released or collected.
_loads: dict[int, LoadedCheckpoint] = {}
# Reentrant: a garbage collection inside _track may run a finalizer (_forget) on this thread.
_loads_lock = threading.RLock()


def _track(obj: Any, loaded: LoadedCheckpoint) -> None:
    with _loads_lock:
        _loads[id(obj)] = loaded
    loaded.finalizer = weakref.finalize(obj, _forget, id(obj), loaded)


def _forget(key: int, loaded: LoadedCheckpoint) -> None:
    """``obj`` was garbage-collected without :func:`release`: forget it, and hand its host
    buffers to the pool, which takes each back once no tensor views it any more."""
    with _loads_lock:
        if _loads.get(key) is loaded:
            del _loads[key]
    loaded.state_dict = {}
    if loaded.pool is not None and loaded.host_buffers:
        loaded.pool.reclaim(loaded.host_buffers)
    loaded.host_buffers = []


def load_checkpoint(
    path: str | os.PathLike[str],
    device: DeviceSpec = "cpu",
    *,
    threads: int | None = None,
    direct_io: bool | None = None,
    verify: bool = False,
    pool: HostMemoryPool | None = None,
    on_progress: ProgressCallback | None = None,
) -> LoadedCheckpoint:
    """Read every partition of an sllm checkpoint; tensors are views of one buffer each.

    Args:
        path: the converted model directory.
        device: see :func:`resolve_devices`.
        threads: reader threads per partition (default 4).
        direct_io: force O_DIRECT on/off (None: where it works).
        verify: check each chunk's sha256 against the manifest while reading.
        pool: host memory pool (default: the process-wide one).
        on_progress: ``on_progress(done_bytes, total_bytes)`` as chunks land.

    Raises:
        CheckpointError subclasses (the message names the file), ChecksumMismatch with
        ``verify``, UsageError for a bad device.
    """
    return _load_opened(
        open_checkpoint(path), device, threads=threads, direct_io=direct_io, verify=verify, pool=pool,
        on_progress=on_progress,
    )


def _load_opened(
    ckpt: Checkpoint,
    device: DeviceSpec,
    *,
    threads: int | None,
    direct_io: bool | None,
    verify: bool,
    pool: HostMemoryPool | None,
    on_progress: ProgressCallback | None,
) -> LoadedCheckpoint:
    started = time.perf_counter()
    devices = resolve_devices(device, len(ckpt.manifest.partitions))
    pool = pool or default_pool()
    total = ckpt.manifest.total_bytes
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        if on_progress:
            on_progress(done[0], total)

    fills: list[Filled] = []
    try:
        for part, dev in enumerate(devices):
            fills.append(fill_partition(
                ckpt, part, dev, pool, tag=partition_tag(ckpt, part), threads=threads or DEFAULT_READ_THREADS,
                direct_io=direct_io, verify=verify, progress=progress,
            ))  # fmt: skip
    except BaseException:
        for f in fills:
            if f.host is not None:
                pool.release(f.host)
        raise
    state_dict = tensor_views([f.bytes for f in fills], ckpt.tensors)
    seconds = time.perf_counter() - started
    report = LoadReport(
        path=str(ckpt.path),
        nbytes=total,
        partitions=len(devices),
        read_seconds=seconds,
        build_seconds=0.0,
        total_seconds=seconds,
        gbps=total / seconds / 1e9 if seconds > 0 else 0.0,
        direct_io=all(f.via == "O_DIRECT" for f in fills),
        pool_hit=all(f.via == "pool" for f in fills),
        device=",".join(dict.fromkeys(str(d) for d in devices)),
        via=",".join(dict.fromkeys(f.via for f in fills)),
    )
    leases = [f.host for f in fills if f.host is not None]
    del fills
    return LoadedCheckpoint(ckpt, state_dict, report, leases, pool)


def load_state_dict(
    path: str | os.PathLike[str],
    device: DeviceSpec = "cpu",
    *,
    threads: int | None = None,
    direct_io: bool | None = None,
    verify: bool = False,
    pool: HostMemoryPool | None = None,
    on_progress: ProgressCallback | None = None,
) -> dict[str, torch.Tensor]:
    """Load an sllm checkpoint as ``{name: tensor}`` (views of one buffer per partition).

    Arguments and errors are :func:`load_checkpoint`'s. Call :func:`release` on the result
    when done to return its memory to the pool for the next load.
    """
    loaded = load_checkpoint(
        path, device, threads=threads, direct_io=direct_io, verify=verify, pool=pool, on_progress=on_progress
    )
    sd = StateDict(loaded.state_dict)
    loaded.state_dict = {}
    _track(sd, loaded)
    return sd


def load_model(
    path: str | os.PathLike[str],
    device: DeviceSpec = "cpu",
    *,
    threads: int | None = None,
    direct_io: bool | None = None,
    verify: bool = False,
    pool: HostMemoryPool | None = None,
    on_progress: ProgressCallback | None = None,
) -> Any:
    """Load an sllm checkpoint as a ready ``transformers.PreTrainedModel`` in eval mode.

    The model's weights are views of the loaded buffers; ``model.sllm_report`` holds the
    :class:`LoadReport`. Call :func:`release` when unloading it, so the next load reuses
    its host memory. Arguments and errors are :func:`load_checkpoint`'s plus
    :func:`build_model`'s; a model spread over several devices is refused (its forward
    pass would need a dispatcher): load such checkpoints with :func:`load_state_dict`.
    """
    started = time.perf_counter()
    ckpt = open_checkpoint(path)
    devices = set(resolve_devices(device, len(ckpt.manifest.partitions)))
    if len(devices) > 1:
        raise UsageError(f"{path}: load_model needs one device, the device map gives {len(devices)}")
    target = devices.pop()
    config = model_config(path, None)
    dtype = dominant_dtype([getattr(torch, e.dtype) for e in ckpt.tensors.values()])
    skeleton = skeletons.take(skeleton_key(config, dtype, target))
    building: Future[Any] | None = None
    if skeleton is None:  # build the module tree while the reader threads wait on storage
        building = builder.submit(make_skeleton, copy.deepcopy(config), dtype)
    try:
        loaded = _load_opened(
            ckpt, device, threads=threads, direct_io=direct_io, verify=verify, pool=pool, on_progress=on_progress
        )
    except BaseException:
        if building is not None:
            building.cancel()
        raise
    try:
        build_started = time.perf_counter()
        if building is not None:
            skeleton = building.result()
        model = build_model(path, loaded.state_dict, target, config=config, skeleton=skeleton)
    except CheckpointError as exc:
        loaded.release()
        raise type(exc)(f"{exc}{reconvert_hint(ckpt.manifest)}") from exc
    except BaseException:
        loaded.release()
        raise
    now = time.perf_counter()
    r = loaded.report
    loaded.report = LoadReport(
        path=r.path, nbytes=r.nbytes, partitions=r.partitions, read_seconds=r.read_seconds,
        build_seconds=now - build_started, total_seconds=now - started, gbps=r.gbps,
        direct_io=r.direct_io, pool_hit=r.pool_hit, device=r.device, via=r.via,
    )
    model.sllm_report = loaded.report
    loaded.state_dict = {}
    _track(model, loaded)
    return model


class HostPartitions(Protocol):
    """What :func:`load_model_from_host` needs: a holder of one host buffer per partition
    (e.g. :class:`sllm.core.cache.DramLease`), valid until :meth:`release`.

    Attributes:
        model: a name for messages and reports.
        manifest: the validated manifest (partition sizes).
        tensors: the validated tensor index (offsets into the partition buffers).
        pinned_memory: True when the buffers are page-locked (asynchronous H2D copies).
    """

    model: str
    manifest: Manifest
    tensors: dict[str, TensorEntry]

    @property
    def pinned_memory(self) -> bool: ...

    def partition_tensors(self) -> list[torch.Tensor]:
        """One 1-D ``torch.uint8`` tensor per partition, exactly its size."""

    def config(self) -> dict[str, Any]:
        """The checkpoint's ``config.json``."""

    def release(self) -> None:
        """Give the buffers back (idempotent)."""


def load_model_from_host(held: HostPartitions, device: str | torch.device = "cpu") -> Any:
    """A ready ``transformers`` model whose weights come from buffers already in host memory.

    Nothing is read from storage. On the CPU the weights are views of ``held``'s buffers
    (zero-copy): ``held`` stays held for the model's lifetime and :func:`release` of the
    model releases it. On a CUDA device each partition is copied to one device buffer
    (asynchronously when the memory is pinned), the copies are synchronised, and ``held``
    is released before this returns. On failure ``held`` is released.

    ``model.sllm_report`` is a :class:`LoadReport` with ``read_seconds`` the host-to-device
    copy time (0 on the CPU), ``pool_hit`` True, and ``path`` ``"host:<model>"``.

    Raises:
        CheckpointError: as :func:`build_model`. UsageError: a bad device, or CUDA without CUDA.
    """
    started = time.perf_counter()
    dev = resolve_devices(device, 1)[0]
    name = f"host:{held.model}"
    try:
        host = held.partition_tensors()
        copy_started = time.perf_counter()
        if dev.type == "cuda":
            buffers = [torch.empty(h.numel(), dtype=torch.uint8, device=dev) for h in host]
            stream = torch.cuda.Stream(device=dev)
            with torch.cuda.stream(stream):
                for d, h in zip(buffers, host, strict=True):
                    d.copy_(h, non_blocking=held.pinned_memory)
            stream.synchronize()
            del host
        else:
            buffers = host
        read_done = time.perf_counter()
        state_dict = tensor_views(buffers, held.tensors)
        model = build_model(name, state_dict, dev, config=held.config())
    except BaseException:
        held.release()
        raise
    now = time.perf_counter()
    nbytes = sum(b.numel() for b in buffers)
    copy_seconds = read_done - copy_started if dev.type == "cuda" else 0.0
    report = LoadReport(
        path=name, nbytes=nbytes, partitions=len(buffers), read_seconds=copy_seconds,
        build_seconds=now - read_done, total_seconds=now - started,
        gbps=nbytes / copy_seconds / 1e9 if copy_seconds > 0 else 0.0,
        direct_io=False, pool_hit=True, device=str(dev), via="host",
    )
    model.sllm_report = report
    if dev.type == "cuda":
        held.release()
        hook = None
    else:
        hook = held.release
    # The holder's metadata passed format.py's checks when its buffers were filled.
    ckpt = Checkpoint(Path(name), held.manifest, dict(held.tensors))
    _track(model, LoadedCheckpoint(ckpt, {}, report, on_release=hook))
    return model


#: Share of the host memory available at start that a node with no memory budget reserves
#: at most (for its largest model).
DEFAULT_RESERVATION_SHARE = 0.5


def reservation_for(model_dirs: list[str | os.PathLike[str]], budget: int | None) -> list[int]:
    """The buffer sizes, bytes, a node reserves for these checkpoints
    (:func:`sllm.core.pool.plan_reservation`); unreadable ones are skipped.

    With ``budget`` (bytes of host memory) the largest models first, while they fit it.
    Without one (None: the node has no ``--max-memory`` or DRAM tier), the one largest
    model that fits :data:`DEFAULT_RESERVATION_SHARE` of the memory available now
    (``psutil.virtual_memory().available``): its first cold start then reads into touched
    memory, which is what the node would hold after that model's first load anyway.

    Pass it to :meth:`HostMemoryPool.reserve_async` as ``lambda: reservation_for(dirs, budget)``."""
    from sllm.core.pool import plan_reservation
    from sllm.errors import SllmError

    models = []
    for d in model_dirs:
        try:
            models.append([p.nbytes for p in open_checkpoint(d).manifest.partitions])
        except SllmError:
            continue
    if budget is not None:
        return plan_reservation(models, budget)
    import psutil

    available = int(psutil.virtual_memory().available * DEFAULT_RESERVATION_SHARE)
    return plan_reservation(models, available, max_models=1)


def report_of(obj: Any) -> LoadReport:
    """The :class:`LoadReport` of a model or state dict this module loaded.

    Raises:
        UsageError: ``obj`` was not loaded by sllm (or was released).
    """
    with _loads_lock:
        loaded = _loads.get(id(obj))
    if loaded is None:
        raise UsageError("not a model or state dict loaded by sllm (or already released)")
    return loaded.report


def release(obj: Any) -> None:
    """Return the host buffers of a model or state dict loaded here to the memory pool.

    After this the object's tensors may be overwritten by the next load: drop every
    reference to them. A model's weights are moved to the meta device (so accidental use
    fails loudly instead of reading another model's bytes) and the emptied model is kept
    as a skeleton that the next load of the same architecture reuses: do not use the
    model object after releasing it. A second call, or an object sllm did not load, is a
    no-op.
    """
    with _loads_lock:
        loaded = _loads.pop(id(obj), None)
    if loaded is None:
        return
    if loaded.finalizer is not None:
        loaded.finalizer.detach()  # a reused skeleton must not pile up finalizers
    if isinstance(obj, torch.nn.Module):
        detach_weights(obj)
        key = obj.__dict__.get("_sllm_skeleton_key")
        if key is not None:
            skeletons.put(key, obj)
    elif isinstance(obj, dict):
        obj.clear()
    loaded.release()
