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
import copy
import hashlib
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from sllm.core.format import Checkpoint, Manifest, TensorEntry, open_checkpoint, reconvert_hint
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


# id(model or state dict) -> its load; an entry goes when its object is garbage-collected.
_loads: dict[int, LoadedCheckpoint] = {}
_loads_lock = threading.Lock()


def _track(obj: Any, loaded: LoadedCheckpoint) -> None:
    with _loads_lock:
        _loads[id(obj)] = loaded
    loaded.finalizer = weakref.finalize(obj, _forget, id(obj), loaded)


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
        self, ckpt: Checkpoint, part: int, host: HostBuffer, tag: tuple, *, threads: int, direct_io: bool | None,
        verify: bool,
    ) -> None:
        self.ckpt, self.part, self.host = ckpt, part, host
        self.threads, self.want_direct = threads, direct_io
        self.check = _checker(ckpt, part) if verify else None
        self.tag = tag
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
    tag: tuple,
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
    fill = _PartitionFill(ckpt, part, host, tag, threads=threads, direct_io=direct_io, verify=verify)
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

    leases: list[HostBuffer] = []
    buffers: list[torch.Tensor] = []
    fills: list[_PartitionFill] = []
    try:
        for part, dev in enumerate(devices):
            tag = partition_tag(ckpt, part)
            host = pool.acquire(ckpt.manifest.partitions[part].nbytes, tag=tag)
            leases.append(host)
            buf, fill = _read_partition(
                ckpt, part, host, tag, dev, threads=threads or DEFAULT_READ_THREADS,
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


def _model_config(path: str | os.PathLike[str], config: Mapping[str, Any] | Any | None) -> Any:
    """A transformers config from ``path/config.json``, from the dict ``config``, or
    ``config`` itself when it already is one.

    Raises:
        CheckpointError: unreadable, or an unknown ``model_type``.
    """
    from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if config is None:
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{Path(path) / 'config.json'}: cannot build a model config ({exc})") from exc
    model_type = config.get("model_type")
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: config.json: cannot build a model config (model_type {model_type!r}: "
                              f"{exc})") from exc


def _model_class(config: Any) -> Any:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


class _SkeletonCache:
    """Released model skeletons (parameters on meta, buffers intact) by architecture key.

    :func:`release` puts a model's skeleton here; the next load of the same config, dtype
    and device takes it instead of building the module tree again, which is most of a
    warm load's remaining cost. Holds at most ``limit`` skeletons (they weigh only their
    buffers). Thread-safe.
    """

    def __init__(self, limit: int = 4) -> None:
        self.limit = limit
        self._items: list[tuple[tuple, Any]] = []
        self._lock = threading.Lock()

    def take(self, key: tuple) -> Any | None:
        with self._lock:
            for i, (k, model) in enumerate(self._items):
                if k == key:
                    del self._items[i]
                    return model
        return None

    def put(self, key: tuple, model: Any) -> None:
        with self._lock:
            self._items.append((key, model))
            del self._items[: -self.limit]


_skeletons = _SkeletonCache()
#: One thread that builds model skeletons while the loading thread waits on reads.
_builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sllm-skeleton")


def _dominant_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    floating = [d for d in dtypes if d.is_floating_point]
    return max(set(floating), key=floating.count) if floating else torch.get_default_dtype()


def _skeleton_key(config: Any, dtype: torch.dtype, device: torch.device) -> tuple:
    """What makes two skeletons interchangeable: class, dtype, device and the config's
    fields (less where it was read from)."""
    fields = config.to_dict()
    fields.pop("_name_or_path", None)
    return (_model_class(config).__name__, str(dtype), str(device), json.dumps(fields, sort_keys=True, default=str))


def make_skeleton(config: Any, dtype: torch.dtype) -> Any:
    """The model of ``config`` with every parameter on the meta device, no weight
    initialisation, buffers computed as usual (on the CPU). Takes ~0.04 s for 1.3B
    parameters once transformers has imported the architecture."""
    from transformers.initialization import no_init_weights

    cls = _model_class(config)
    with _parameters_on_meta(), no_init_weights():
        if hasattr(cls, "_from_config"):
            return cls._from_config(config, dtype=dtype)
        return cls.from_config(config, dtype=dtype)


def _weight_slots(model: Any) -> dict[str, tuple[torch.nn.Module, str, bool]]:
    """state-dict name -> (module, attribute, is_parameter), cached on the model."""
    slots = model.__dict__.get("_sllm_slots")
    if slots is None:
        slots = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            dotted = f"{prefix}." if prefix else ""
            for name in module._parameters:
                slots[dotted + name] = (module, name, True)
            for name in module._buffers:
                if name not in module._non_persistent_buffers_set:
                    slots[dotted + name] = (module, name, False)
        model.__dict__["_sllm_slots"] = slots
    return slots


def _assign(model: Any, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Make each tensor the model's weight of that name, without a copy.

    Raises:
        CheckpointError: a name the model does not have, or a shape it does not expect.
    """
    slots = _weight_slots(model)
    for name, tensor in state_dict.items():
        slot = slots.get(name)
        if slot is None:
            raise CheckpointError(f"{path}: tensor {name!r} is not a weight of {type(model).__name__}")
        module, attr, is_param = slot
        old = module._parameters[attr] if is_param else module._buffers[attr]
        if old is not None and old.shape != tensor.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(tensor.shape)}, {type(model).__name__} expects {list(old.shape)}"
            )
        if is_param:
            grad = old.requires_grad if old is not None else False
            module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=grad and tensor.is_floating_point())
        else:
            module._buffers[attr] = tensor


def _detach_weights(model: Any) -> None:
    """Put every weight (parameters, and buffers the checkpoint supplied) on the meta
    device, keeping computed buffers (RoPE frequencies, masks), so the model no longer
    references the loaded bytes and can serve as a skeleton again."""
    for module, attr, is_param in _weight_slots(model).values():
        if is_param:
            p = module._parameters[attr]
            if p is not None and p.device.type != "meta":
                module._parameters[attr] = torch.nn.Parameter(
                    torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                )
        else:
            b = module._buffers[attr]
            if b is not None and b.device.type != "meta":
                module._buffers[attr] = torch.empty_like(b, device="meta")


def build_model(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    device: torch.device,
    *,
    config: Mapping[str, Any] | Any | None = None,
    skeleton: Any | None = None,
) -> Any:
    """The transformers model of ``path/config.json`` with ``state_dict``'s tensors as weights.

    The skeleton (``skeleton``, else one a :func:`release` left for this config, dtype and
    device, else :func:`make_skeleton`) gets the tensors assigned as its parameters (no
    copy), tied weights are tied, and buffers the checkpoint does not hold are moved to
    ``device``.

    Args:
        path: the checkpoint directory (its ``config.json``), or with ``config`` only a
            name for messages.
        config: the parsed ``config.json`` (a dict or a transformers config); when given,
            nothing is read from ``path``.
        skeleton: a model from :func:`make_skeleton` for this config and dtype.

    Raises:
        CheckpointError: config.json unreadable, a tensor the model does not have or of
        another shape, or a model parameter the checkpoint lacks (other than a tied one).
    """
    config = _model_config(path, config)
    dtype = _dominant_dtype([t.dtype for t in state_dict.values()])
    key = _skeleton_key(config, dtype, device)
    model = skeleton if skeleton is not None else _skeletons.take(key)
    if model is None:
        model = make_skeleton(config, dtype)
    _assign(model, state_dict, path)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint has no tensor for {missing[0]!r} ({len(missing)} missing)")
    if device.type != "cpu":
        model.to(device)
    model.eval()
    model.__dict__["_sllm_skeleton_key"] = key
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
    ckpt = open_checkpoint(path)
    devices = set(resolve_devices(device, len(ckpt.manifest.partitions)))
    if len(devices) > 1:
        raise UsageError(f"{path}: load_model needs one device, the device map gives {len(devices)}")
    target = devices.pop()
    config = _model_config(path, None)
    dtype = _dominant_dtype([getattr(torch, e.dtype) for e in ckpt.tensors.values()])
    skeleton = _skeletons.take(_skeleton_key(config, dtype, target))
    building: Future[Any] | None = None
    if skeleton is None:  # build the module tree while the reader threads wait on storage
        building = _builder.submit(make_skeleton, copy.deepcopy(config), dtype)
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
        direct_io=r.direct_io, pool_hit=r.pool_hit, device=r.device,
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
        direct_io=False, pool_hit=True, device=str(dev),
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
        _detach_weights(obj)
        key = obj.__dict__.get("_sllm_skeleton_key")
        if key is not None:
            _skeletons.put(key, obj)
    elif isinstance(obj, dict):
        obj.clear()
    loaded.release()
