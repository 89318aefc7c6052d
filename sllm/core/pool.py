"""The host memory pool: buffers allocated and touched once, then reused by every load.

Fresh anonymous memory is slow to touch the first time (page faults run at 0.4-3 GB/s on
small machines, slower than an NVMe read), so the loader never reads into fresh memory on
its hot path: it takes a buffer from this pool, which keeps released buffers (already
faulted in, pinned when CUDA is there) for the next load. A serving process reserves its
pool at start (:meth:`HostMemoryPool.reserve`), the way a GPU server keeps its DRAM tier.

The pool does not know what the bytes mean: the loader leases a buffer per partition and
gives it back with :meth:`HostMemoryPool.release` when the model is unloaded. A buffer that
is never released is simply freed by the garbage collector once nothing views it.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from sllm.errors import CacheError
from sllm.io.hostmem import HostBuffer, cuda_available, round_up


@dataclass(frozen=True)
class PoolStats:
    """Pool occupancy, bytes: ``free_bytes`` idle in the pool, ``leased_bytes`` in use.

    ``allocations`` counts new buffers, ``reuses`` idle buffers handed out to be
    overwritten, ``hits`` idle buffers handed back with the asked-for content (tag).
    """

    capacity_bytes: int | None
    free_bytes: int
    leased_bytes: int
    free_buffers: int
    leased_buffers: int
    allocations: int
    reuses: int
    hits: int


class HostMemoryPool:
    """A best-fit pool of :class:`~sllm.io.hostmem.HostBuffer` objects.

    Idle buffers keep their bytes and a tag saying what they hold, so the pool doubles as a
    DRAM cache of recently released checkpoints (the ServerlessLLM DRAM tier, §4).

    Args:
        capacity_bytes: the most host memory the pool holds (free + leased); None for no
            limit. When an acquire would exceed it, idle buffers are dropped, least recently
            released first; if leased buffers alone exceed it, :class:`CacheError` is raised.
        pinned: page-lock buffers for CUDA; None (default) pins when CUDA is available.

    Thread-safe.
    """

    def __init__(self, capacity_bytes: int | None = None, *, pinned: bool | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.pinned = cuda_available() if pinned is None else pinned
        self._free: list[HostBuffer] = []
        # Leased buffers are held weakly: one its holder drops without release() is freed.
        self._leased: weakref.WeakValueDictionary[int, HostBuffer] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._allocations = 0
        self._reuses = 0
        self._hits = 0

    def acquire(self, nbytes: int, tag: object | None = None, *, populate: bool = False) -> HostBuffer:
        """Lease a buffer of at least ``nbytes`` bytes.

        If ``tag`` is given and an idle buffer carries it, that buffer comes back with its
        bytes intact (``buf.tag == tag``: a hit, nothing to read). Otherwise: the smallest
        idle buffer that fits (wasting at most half of itself), preferring the least
        recently released, else a new one; its tag is cleared, since the caller overwrites it.
        A new buffer's pages are faulted in by the caller's first writes unless ``populate``
        (the loader's O_DIRECT reads fault them fastest themselves).

        Raises:
            CacheError: the pool's capacity cannot hold a buffer of that size.
        """
        need = round_up(nbytes)
        with self._lock:
            if tag is not None:
                for buf in self._free:
                    if buf.tag == tag and buf.nbytes >= need:
                        self._free.remove(buf)
                        self._leased[id(buf)] = buf
                        self._hits += 1
                        return buf
            fits = [b for b in self._free if need <= b.nbytes <= 2 * need]
            if fits:
                buf = min(fits, key=lambda b: b.nbytes)  # min() keeps the first: least recently released
                self._free.remove(buf)
                buf.tag = None
                self._leased[id(buf)] = buf
                self._reuses += 1
                return buf
            self._make_room(need)
        buf = HostBuffer(need, pinned=self.pinned, populate=populate)
        with self._lock:
            self._leased[id(buf)] = buf
            self._allocations += 1
        return buf

    def _make_room(self, need: int) -> None:
        if self.capacity_bytes is None:
            return
        leased = sum(b.nbytes for b in self._leased.values())
        if leased + need > self.capacity_bytes:
            raise CacheError(
                f"host memory pool: {need} bytes needed, {self.capacity_bytes - leased} of "
                f"{self.capacity_bytes} free after leases"
            )
        while self._free and leased + need + sum(b.nbytes for b in self._free) > self.capacity_bytes:
            self._free.pop(0)  # the least recently released idle buffer goes back to the OS

    def release(self, buf: HostBuffer) -> None:
        """Return a leased buffer for reuse; it keeps its tag (and bytes) until reused.

        The caller must hold no view of it any more.
        """
        with self._lock:
            if self._leased.pop(id(buf), None) is not None:
                self._free.append(buf)

    def reserve(self, sizes: list[int]) -> None:
        """Allocate (and fault in) idle buffers of the given sizes, bytes, ahead of loads."""
        bufs = [self.acquire(n, populate=True) for n in sizes]
        for b in bufs:
            self.release(b)

    def clear(self) -> None:
        """Drop every idle buffer (leased ones stay with their holders)."""
        with self._lock:
            self._free.clear()

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                capacity_bytes=self.capacity_bytes,
                free_bytes=sum(b.nbytes for b in self._free),
                leased_bytes=sum(b.nbytes for b in self._leased.values()),
                free_buffers=len(self._free),
                leased_buffers=len(self._leased),
                allocations=self._allocations,
                reuses=self._reuses,
                hits=self._hits,
            )


_default_pool: HostMemoryPool | None = None
_default_lock = threading.Lock()


def default_pool() -> HostMemoryPool:
    """The process-wide pool the loader uses when none is given (no capacity limit)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = HostMemoryPool()
        return _default_pool
