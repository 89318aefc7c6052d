"""Getting one partition's bytes into memory, the fastest way the node allows.

For each partition of a checkpoint the loader calls :func:`fill_partition`, which takes the
first of these that applies:

1. **pool hit**: the host memory pool still holds the partition (a buffer tagged with its
   :func:`partition_tag`: path, inode, size, mtime, chunk digests): nothing is read;
2. **page cache** (CPU, ``direct_io`` not forced on): the file is resident in the page cache
   (``mincore``, at least :data:`RESIDENT_FRACTION` of its pages), so it is mapped
   copy-on-write and the tensors view the page cache itself, as mmap-based loaders do; with
   CUDA it is read buffered (a memory copy) into a pooled, pinned buffer instead;
3. **storage**: a pooled buffer is filled by parallel chunked reads, O_DIRECT where the
   filesystem allows; a fresh buffer is faulted in one chunk ahead of the reads.

With CUDA each chunk is copied to one device buffer per partition on its own stream as it
lands. :func:`tensor_views` then makes every index entry a view of its partition's buffer.
This module moves bytes and makes views; it knows nothing of models (``skeleton.py``) or of
the life of a load (``loader.py``), and nothing of HTTP or caching policy.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sllm.core.format import Checkpoint, TensorEntry
from sllm.core.pool import HostMemoryPool
from sllm.errors import CheckpointError, ChecksumMismatch, UsageError
from sllm.io.hostmem import HostBuffer
from sllm.io.reader import ParallelRead, chunk_ranges, resident_fraction

DeviceSpec = str | torch.device | Sequence[str | torch.device] | Mapping[int, str | torch.device]

#: A partition counts as page-cache resident when at least this fraction of its pages is
#: (``mincore``); below it, it is read from storage with O_DIRECT.
RESIDENT_FRACTION = 0.98
#: ``SLLM_PAGE_CACHE=0`` turns the page-cache path off (every cold partition read O_DIRECT).
PAGE_CACHE_ENV = "SLLM_PAGE_CACHE"


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


def partition_tag(ckpt: Checkpoint, part: int) -> tuple:
    """What a host buffer holding partition ``part`` of ``ckpt`` is tagged with in the pool.

    Names the file by path and identity (device, inode, size, mtime in ns) and the chunk
    digests, so a rewritten or replaced checkpoint never matches a stale buffer.
    """
    path = ckpt.partition_path(part)
    st = path.stat()
    info = ckpt.manifest.partitions[part]
    return ("sllm-partition", str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, info.chunks)


def _checker(ckpt: Checkpoint, part: int) -> Callable[[int, int, int, memoryview], None]:
    info = ckpt.manifest.partitions[part]
    path = ckpt.partition_path(part)

    def check(i: int, start: int, end: int, view: memoryview) -> None:
        if hashlib.sha256(view).hexdigest() != info.chunks[i]:
            raise ChecksumMismatch(f"{path}: chunk {i} (bytes {start}-{end}) fails its sha256 checksum")

    return check


def page_cache_enabled() -> bool:
    """False when ``SLLM_PAGE_CACHE=0``."""
    return os.environ.get(PAGE_CACHE_ENV, "1") != "0"


@dataclass
class Filled:
    """One partition in memory.

    Attributes:
        bytes: 1-D ``torch.uint8`` tensor of the partition's bytes (host or device).
        host: the pool lease the bytes are in (CPU), or None (given back after a CUDA copy).
        via: how the bytes came: "pool", "page-cache", "O_DIRECT" or "buffered".
    """

    bytes: torch.Tensor
    host: HostBuffer | None
    via: str


def _landed_ranges(
    ckpt: Checkpoint, part: int, host: HostBuffer, *, threads: int, direct_io: bool | None, verify: bool,
    read: bool, via: list[str],
) -> Iterator[tuple[int, int]]:
    """``(start, end)`` byte ranges of the partition as they are in ``host``: at once when
    ``read`` is False (the bytes are there; checked with ``verify``), else as
    :class:`ParallelRead` lands them (``via[0]`` then says O_DIRECT or buffered)."""
    info = ckpt.manifest.partitions[part]
    view = host.memoryview(info.nbytes)
    check = _checker(ckpt, part) if verify else None
    if not read:
        for i, (start, end) in enumerate(chunk_ranges(info.nbytes, ckpt.manifest.chunk_bytes)):
            if check:
                check(i, start, end, view[start:end])
            yield start, end
        return
    reader = ParallelRead(
        ckpt.partition_path(part), view, chunk_bytes=ckpt.manifest.chunk_bytes, threads=threads,
        direct_io=direct_io, on_chunk=check, prefault=None if host.faulted else host.prefault,
    )
    for i in reader:
        yield reader.ranges[i]
    via[0] = "O_DIRECT" if reader.direct_io else "buffered"
    host.faulted = host.faulted or info.nbytes == host.nbytes


def cached(path: Path) -> bool:
    """True when at least :data:`RESIDENT_FRACTION` of ``path``'s pages are in the page cache."""
    resident = resident_fraction(path)
    return resident is not None and resident >= RESIDENT_FRACTION


def map_cached(pool: HostMemoryPool, path: Path, nbytes: int) -> HostBuffer:
    """The first ``nbytes`` of ``path`` mapped copy-on-write from the page cache, as a lease
    of ``pool`` (no read, no copy).

    Raises:
        CheckpointError: the file cannot be mapped (the message names it).
    """
    try:
        return pool.adopt(HostBuffer.map_file(path, nbytes))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot map ({exc.strerror})") from exc


def fill_partition(
    ckpt: Checkpoint,
    part: int,
    device: torch.device,
    pool: HostMemoryPool,
    *,
    tag: tuple,
    threads: int,
    direct_io: bool | None,
    verify: bool,
    progress: Callable[[int], None],
) -> Filled:
    """Bring partition ``part`` into memory on ``device`` (see the module docstring for the
    order of ways); the host buffer is a lease of ``pool``, tagged ``tag`` once whole.

    Raises:
        CheckpointError subclasses naming the file (TruncatedPartition, ChecksumMismatch
        with ``verify``), CacheError when the pool's capacity is exhausted.
    """
    info = ckpt.manifest.partitions[part]
    path = ckpt.partition_path(part)
    host = pool.take(tag, info.nbytes)
    via = ["pool"]
    read = host is None
    if host is None and direct_io is not True and page_cache_enabled() and info.nbytes > 0 and cached(path):
        if device.type == "cpu":
            host = map_cached(pool, path, info.nbytes)
            via, read = ["page-cache"], False
        else:
            direct_io = False  # a memory copy out of the page cache, into pinned memory
    if host is None:
        host = pool.acquire(info.nbytes)
    try:
        if read:
            host.tag = None
        ranges = _landed_ranges(ckpt, part, host, threads=threads, direct_io=direct_io, verify=verify, read=read,
                                via=via)
        host_bytes = host.tensor[: info.nbytes]
        if device.type != "cuda":
            for start, end in ranges:
                progress(end - start)
            host.tag = tag
            return Filled(host_bytes, host, via[0])
        dev_bytes = torch.empty(info.nbytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(stream):
            for start, end in ranges:
                dev_bytes[start:end].copy_(host_bytes[start:end], non_blocking=host.pinned)
                progress(end - start)
        stream.synchronize()
        host.tag = tag
        del host_bytes
        pool.release(host)  # the bytes are on the device now: the host buffer is free
        return Filled(dev_bytes, None, via[0])
    except BaseException:
        host.tag = None  # the bytes may be partial or failed their checksum
        if not host.file_backed:
            pool.release(host)
        raise


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
