"""The fast loader: an sllm checkpoint to a state dict or a ready transformers model.

For each partition: lease one buffer from the host memory pool (touched once, pinned with
CUDA), fill it with large chunked positional reads from several threads (O_DIRECT where the
filesystem allows), and make every tensor a view at its offset, so no tensor byte is copied
or deserialized on the CPU path. With CUDA, each chunk is copied to one device buffer per
partition on its own stream as soon as it lands (the read of chunk i+1 overlaps the copy of
chunk i), and tensors are views of the device buffer. ``load_model`` builds the model
skeleton with parameters on the meta device (no allocation, no initialisation; buffers such
as RoPE frequencies are computed as usual), assigns the views, and ties weights.

It validates metadata through ``sllm/core/format.py`` before reading any byte, and moves
bytes only through ``sllm/io/``. It knows nothing of HTTP or caching policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sllm.core.format import Checkpoint, TensorEntry, open_checkpoint
from sllm.core.pool import HostMemoryPool, default_pool
from sllm.errors import CheckpointError, ChecksumMismatch, UsageError
from sllm.io.hostmem import HostBuffer
from sllm.io.reader import DEFAULT_READ_THREADS, ParallelRead, chunk_ranges

DeviceSpec = str | torch.device | Sequence[str | torch.device] | Mapping[int, str | torch.device]
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

    def release(self) -> None:
        """Give the host buffers back to the pool; the tensors must not be used afterwards."""
        if self.pool is not None:
            for buf in self.host_buffers:
                self.pool.release(buf)
        self.host_buffers = []
        self.state_dict = {}


class StateDict(dict):
    """The ``dict[str, Tensor]`` that :func:`load_state_dict` returns (weak-referenceable, so
    :func:`release` and :func:`report_of` can find its load)."""


# id(model or state dict) -> its load; an entry goes when its object is garbage-collected.
_loads: dict[int, LoadedCheckpoint] = {}
_loads_lock = threading.Lock()


def _track(obj: Any, loaded: LoadedCheckpoint) -> None:
    with _loads_lock:
        _loads[id(obj)] = loaded
    weakref.finalize(obj, _forget, id(obj), loaded)


def _forget(key: int, loaded: LoadedCheckpoint) -> None:
    with _loads_lock:
        if _loads.get(key) is loaded:
            del _loads[key]


# ---------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------


def resolve_devices(device: DeviceSpec, partitions: int) -> list[torch.device]:
    """One torch device per partition from ``device``.

    ``device`` is a single device ("cpu", "cuda", "cuda:1"), a list with one device per
    partition, or a dict partition -> device (a device map).

    Raises:
        UsageError: a device map that misses a partition, or CUDA asked for without CUDA.
    """
    if isinstance(device, Mapping):
        try:
            devices = [torch.device(device[i]) for i in range(partitions)]
        except KeyError as exc:
            raise UsageError(f"device map has no device for partition {exc}") from exc
    elif isinstance(device, (str, torch.device)):
        devices = [torch.device(device)] * partitions
    else:
        devices = [torch.device(d) for d in device]
        if len(devices) != partitions:
            raise UsageError(f"{len(devices)} devices given for {partitions} partitions")
    for d in devices:
        if d.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"device {d} requested but CUDA is not available")
        if d.type not in ("cpu", "cuda", "meta"):
            raise UsageError(f"device type {d.type!r} is not supported (use cpu or cuda)")
    return [torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
            for d in devices]


# ---------------------------------------------------------------------------------------
# Reading partitions
# ---------------------------------------------------------------------------------------


def _checker(ckpt: Checkpoint, part: int) -> Callable[[int, int, int, memoryview], None]:
    info = ckpt.manifest.partitions[part]
    path = ckpt.partition_path(part)

    def check(i: int, start: int, end: int, view: memoryview) -> None:
        if hashlib.sha256(view).hexdigest() != info.chunks[i]:
            raise ChecksumMismatch(f"{path}: chunk {i} (bytes {start}-{end}) fails its sha256 checksum")

    return check


def partition_tag(ckpt: Checkpoint, part: int) -> tuple:
    """What a host buffer holding partition ``part`` of ``ckpt`` is tagged with in the pool.

    Names the file by path and identity (device, inode, size, mtime in ns) and the chunk
    digests, so a rewritten or replaced checkpoint never matches a stale buffer.
    """
    path = ckpt.partition_path(part)
    st = path.stat()
    info = ckpt.manifest.partitions[part]
    return ("sllm-partition", str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, info.chunks)


class _PartitionFill:
    """Iterate to get ``(start, end)`` byte ranges of partition ``part`` as they land in ``host``.

    A buffer the pool handed back with this partition's tag already holds the bytes: its
    ranges come at once (checked first with ``verify``), and ``pool_hit`` is True.
    Otherwise the file is read with :class:`ParallelRead` and the buffer is tagged once
    every chunk has landed; ``direct_io`` then tells whether O_DIRECT was used.
    """

    def __init__(
        self, ckpt: Checkpoint, part: int, host: HostBuffer, *, threads: int, direct_io: bool | None, verify: bool
    ) -> None:
        self.ckpt, self.part, self.host = ckpt, part, host
        self.threads, self.want_direct = threads, direct_io
        self.check = _checker(ckpt, part) if verify else None
        self.tag = partition_tag(ckpt, part)
        self.pool_hit = host.tag == self.tag
        self.direct_io = False

    def __iter__(self) -> Iterator[tuple[int, int]]:
        info = self.ckpt.manifest.partitions[self.part]
        view = self.host.memoryview(info.nbytes)
        if self.pool_hit:
            for i, (start, end) in enumerate(chunk_ranges(info.nbytes, self.ckpt.manifest.chunk_bytes)):
                if self.check:
                    self.check(i, start, end, view[start:end])
                yield start, end
            return
        self.host.tag = None
        read = ParallelRead(
            self.ckpt.partition_path(self.part),
            view,
            chunk_bytes=self.ckpt.manifest.chunk_bytes,
            threads=self.threads,
            direct_io=self.want_direct,
            on_chunk=self.check,
        )
        for i in read:
            yield read.ranges[i]
        self.direct_io = read.direct_io
        self.host.tag = self.tag


def _read_partition(
    ckpt: Checkpoint,
    part: int,
    host: HostBuffer,
    device: torch.device,
    *,
    threads: int,
    direct_io: bool | None,
    verify: bool,
    progress: Callable[[int], None],
) -> tuple[torch.Tensor, _PartitionFill]:
    """Fill ``host`` with partition ``part``; with a CUDA device, stream chunks to a device
    buffer as they land (the read of chunk i+1 overlaps the copy of chunk i).

    Returns the uint8 tensor that the partition's tensors will view, and how it was filled.
    """
    nbytes = ckpt.manifest.partitions[part].nbytes
    host_bytes = host.tensor[:nbytes]
    fill = _PartitionFill(ckpt, part, host, threads=threads, direct_io=direct_io, verify=verify)
    if device.type != "cuda":
        for start, end in fill:
            progress(end - start)
        return host_bytes, fill
    dev_bytes = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):
        for start, end in fill:
            dev_bytes[start:end].copy_(host_bytes[start:end], non_blocking=host.pinned)
            progress(end - start)
    stream.synchronize()
    return dev_bytes, fill


def tensor_views(buffers: list[torch.Tensor], tensors: dict[str, TensorEntry]) -> dict[str, torch.Tensor]:
    """Make each index entry a view of its partition's uint8 buffer.

    Aliases (tied weights: identical entries) map to the same tensor object.

    Args:
        buffers: one 1-D ``torch.uint8`` tensor per partition, at least its size long.
        tensors: the validated tensor index.
    """
    out: dict[str, torch.Tensor] = {}
    by_entry: dict[TensorEntry, torch.Tensor] = {}
    for name, e in tensors.items():
        t = by_entry.get(e)
        if t is None:
            dtype = getattr(torch, e.dtype)
            buf = buffers[e.partition]
            if e.nbytes == 0:
                t = torch.empty(e.shape, dtype=dtype, device=buf.device)
            else:
                flat = buf[e.offset : e.offset + e.nbytes].view(dtype)
                t = flat.as_strided(e.shape, e.stride)
            by_entry[e] = t
        out[name] = t
    return out


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
    started = time.perf_counter()
    ckpt = open_checkpoint(path)
    devices = resolve_devices(device, len(ckpt.manifest.partitions))
    pool = pool or default_pool()
    total = ckpt.manifest.total_bytes
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        if on_progress:
            on_progress(done[0], total)

    leases: list[HostBuffer] = []
    buffers: list[torch.Tensor] = []
    fills: list[_PartitionFill] = []
    try:
        for part, dev in enumerate(devices):
            host = pool.acquire(ckpt.manifest.partitions[part].nbytes, tag=partition_tag(ckpt, part))
            leases.append(host)
            buf, fill = _read_partition(
                ckpt, part, host, dev, threads=threads or DEFAULT_READ_THREADS,
                direct_io=direct_io, verify=verify, progress=progress,
            )
            fills.append(fill)
            buffers.append(buf)
            if dev.type == "cuda":  # the bytes are on the device now: the host buffer is free
                pool.release(host)
                leases.remove(host)
    except BaseException:
        for host in leases:
            pool.release(host)
        raise
    state_dict = tensor_views(buffers, ckpt.tensors)
    seconds = time.perf_counter() - started
    report = LoadReport(
        path=str(ckpt.path),
        nbytes=total,
        partitions=len(devices),
        read_seconds=seconds,
        build_seconds=0.0,
        total_seconds=seconds,
        gbps=total / seconds / 1e9 if seconds > 0 else 0.0,
        direct_io=all(f.direct_io for f in fills),
        pool_hit=all(f.pool_hit for f in fills),
        device=",".join(dict.fromkeys(str(d) for d in devices)),
    )
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
    _track(sd, loaded)
    return sd


# ---------------------------------------------------------------------------------------
# Building the model
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device while the body runs; buffers stay
    real (RoPE frequencies and masks are computed as usual), like accelerate's
    ``init_empty_weights(include_buffers=False)``."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _model_class(config: Any) -> Any:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def build_model(path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], device: torch.device) -> Any:
    """The transformers model of ``path/config.json`` with ``state_dict``'s tensors as weights.

    The skeleton is built with parameters on the meta device and without weight
    initialisation, then the tensors are assigned (``load_state_dict(assign=True)``, no
    copy) and tied weights are tied. Buffers the checkpoint does not hold are moved to
    ``device``.

    Raises:
        CheckpointError: config.json unreadable, a tensor the model does not have, or a
        model parameter the checkpoint lacks (other than a tied one).
    """
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{Path(path) / 'config.json'}: cannot build a model config ({exc})") from exc
    cls = _model_class(config)
    floating = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    dtype = max(set(floating), key=floating.count) if floating else torch.get_default_dtype()
    with _parameters_on_meta(), no_init_weights():
        model = cls._from_config(config, dtype=dtype) if hasattr(cls, "_from_config") else cls.from_config(
            config, dtype=dtype
        )
    result = model.load_state_dict(dict(state_dict), strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(
            f"{path}: tensor {result.unexpected_keys[0]!r} is not a weight of {cls.__name__} "
            f"({len(result.unexpected_keys)} unexpected)"
        )
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint has no tensor for {missing[0]!r} ({len(missing)} missing)")
    if device.type != "cpu":
        model.to(device)
    model.eval()
    return model


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
    loaded = load_checkpoint(
        path, device, threads=threads, direct_io=direct_io, verify=verify, pool=pool, on_progress=on_progress
    )
    try:
        devices = {t.device for t in loaded.state_dict.values()}
        if len(devices) > 1:
            raise UsageError(f"{path}: load_model needs one device, the device map gives {len(devices)}")
        build_started = time.perf_counter()
        model = build_model(path, loaded.state_dict, next(iter(devices)))
    except BaseException:
        loaded.release()
        raise
    now = time.perf_counter()
    r = loaded.report
    loaded.report = LoadReport(
        path=r.path, nbytes=r.nbytes, partitions=r.partitions, read_seconds=r.read_seconds,
        build_seconds=now - build_started, total_seconds=now - started, gbps=r.gbps,
        direct_io=r.direct_io, pool_hit=r.pool_hit, device=r.device,
    )
    model.sllm_report = loaded.report
    loaded.state_dict = {}
    _track(model, loaded)
    return model


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
    reference to them. The model's parameters are moved to the meta device so that
    accidental use fails loudly instead of reading another model's bytes. A second call,
    or an object sllm did not load, is a no-op.
    """
    with _loads_lock:
        loaded = _loads.pop(id(obj), None)
    if loaded is None:
        return
    if isinstance(obj, torch.nn.Module):
        obj.to("meta")
    elif isinstance(obj, dict):
        obj.clear()
    loaded.release()
