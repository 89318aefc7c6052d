"""The host memory pool: buffers allocated and touched once, then reused by every load.

Fresh anonymous memory is slow to touch the first time (page faults run at 0.4-3 GB/s on
small machines, slower than an NVMe read). The loader therefore takes its buffers from this
pool, which keeps released buffers (already faulted in, pinned when CUDA is there) for the
next load; a new buffer is faulted in one chunk ahead of the reads that fill it (see
:class:`sllm.io.reader.ParallelRead`). A serving process may reserve its pool at start
(:meth:`HostMemoryPool.reserve`, or :meth:`HostMemoryPool.reserve_async` in the background).

Idle buffers keep their bytes and a tag naming what they hold, so the pool doubles as the
DRAM cache of recently released checkpoints (the ServerlessLLM DRAM tier, §4). A buffer comes
back to the pool by :meth:`release`, or by :meth:`reclaim` once its load's model or state
dict is gone and no tensor views it any more (the loader does that when a model is garbage
collected, reference cycles included). The pool does not know what the bytes mean.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from sllm.errors import CacheError, UsageError
from sllm.io.hostmem import HostBuffer, cuda_available, round_up

#: Environment variable: the most bytes of idle buffers the process-wide pool keeps.
POOL_CAPACITY_ENV = "SLLM_POOL_CAPACITY"
#: Default idle capacity of the process-wide pool, bytes: 4 GiB, or a quarter of physical
#: memory when that is less. A library user who drops every model holds at most this.
DEFAULT_IDLE_CAPACITY = 4 * 2**30

log = logging.getLogger("sllm.pool")

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str, what: str) -> int:
    """A byte size: ``"1500000000"``, ``"1.5G"``/``"1.5GB"`` (powers of 10), ``"8GiB"`` (powers of 2).

    Raises:
        UsageError: not a size (the message names ``what``).
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"{what}={text!r}: not a size (examples: 0, 6000000000, 6GB, 8GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def default_idle_capacity() -> int:
    """Bytes of idle buffers the process-wide pool keeps: ``SLLM_POOL_CAPACITY`` when set,
    else :data:`DEFAULT_IDLE_CAPACITY` capped at a quarter of physical memory.

    Raises:
        UsageError: ``SLLM_POOL_CAPACITY`` is not a size.
    """
    text = os.environ.get(POOL_CAPACITY_ENV)
    if text is not None and text.strip():
        return parse_size(text, POOL_CAPACITY_ENV)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return DEFAULT_IDLE_CAPACITY
    return min(DEFAULT_IDLE_CAPACITY, ram // 4)


@dataclass(frozen=True)
class PoolStats:
    """Pool occupancy, bytes: ``free_bytes`` idle in the pool, ``leased_bytes`` in use
    (including buffers whose load is gone but that a tensor still views).

    ``allocations`` counts new buffers, ``reuses`` idle buffers handed out to be
    overwritten, ``hits`` idle buffers handed back with the asked-for content (tag),
    ``reclaimed`` buffers that came back without :meth:`HostMemoryPool.release` (their
    model was dropped).
    """

    capacity_bytes: int | None
    free_bytes: int
    leased_bytes: int
    free_buffers: int
    leased_buffers: int
    allocations: int
    reuses: int
    hits: int
    idle_capacity_bytes: int | None = None
    reclaimed: int = 0


class HostMemoryPool:
    """A best-fit pool of :class:`~sllm.io.hostmem.HostBuffer` objects.

    Args:
        capacity_bytes: the most host memory the pool holds (free + leased), bytes; None for
            no limit. When an acquire would exceed it, idle buffers are dropped, least
            recently released first; if leased buffers alone exceed it, :class:`CacheError`
            is raised. The check and the charge are one atomic step (concurrent acquires
            never exceed it), and a lease is charged the size of the buffer handed out.
        pinned: page-lock buffers for CUDA; None (default) pins when CUDA is available.
        idle_capacity_bytes: the most bytes of idle buffers kept; beyond it, the least
            recently released are dropped (given back to the OS). None: no limit.

    Thread-safe.
    """

    def __init__(
        self, capacity_bytes: int | None = None, *, pinned: bool | None = None, idle_capacity_bytes: int | None = None
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.idle_capacity_bytes = idle_capacity_bytes
        self.pinned = cuda_available() if pinned is None else pinned
        self._free: list[HostBuffer] = []
        # Leased buffers are held weakly: one its holder drops without release() is freed.
        self._leased: weakref.WeakValueDictionary[int, HostBuffer] = weakref.WeakValueDictionary()
        # Buffers whose load is gone, waiting for the last tensor viewing them to go.
        self._dropped: list[HostBuffer] = []
        # Bytes charged for buffers being allocated outside the lock.
        self._pending = 0
        self._lock = threading.Lock()
        self._allocations = 0
        self._reuses = 0
        self._hits = 0
        self._reclaimed = 0

    # -- leasing ----------------------------------------------------------------------------

    def acquire(
        self, nbytes: int, tag: object | None = None, *, populate: bool = False, exact: bool = False
    ) -> HostBuffer:
        """Lease a buffer of at least ``nbytes`` bytes (``buf.nbytes`` is what is charged).

        If ``tag`` is given and an idle buffer carries it, that buffer comes back with its
        bytes intact (``buf.tag == tag``: a hit, nothing to read). Otherwise: the smallest
        idle anonymous buffer that fits (wasting at most half of itself; with ``exact``, of
        exactly ``round_up(nbytes)`` bytes), preferring the least recently released, else a
        new one; its tag is cleared, since the caller overwrites it. A new buffer's pages are
        faulted by the caller (``buf.faulted`` is False) unless ``populate``.

        Raises:
            CacheError: the pool's capacity cannot hold a buffer of that size.
        """
        need = round_up(nbytes)
        hit = self.take(tag, need) if tag is not None else None
        if hit is not None:
            return hit
        with self._lock:
            self._sweep()
            fits = [b for b in self._free if not b.file_backed and (
                b.nbytes == need if exact else need <= b.nbytes <= 2 * need)]
            if fits:
                buf = min(fits, key=lambda b: b.nbytes)  # min() keeps the first: least recently released
                self._free.remove(buf)
                buf.tag = None
                self._leased[id(buf)] = buf
                self._reuses += 1
                return buf
            collect = not self._room(need)
            if collect and not self._leased:
                raise self._full(need)
            if not collect:
                self._pending += need
        if collect:  # leases of models that are gone but not yet collected (reference cycles)
            gc.collect()
            with self._lock:
                self._sweep()
                if not self._room(need):
                    raise self._full(need)
                self._pending += need
        try:
            buf = HostBuffer(need, pinned=self.pinned, populate=populate)
        finally:
            with self._lock:
                self._pending -= need
        with self._lock:
            self._leased[id(buf)] = buf
            self._allocations += 1
        return buf

    def take(self, tag: object, nbytes: int = 0) -> HostBuffer | None:
        """Lease the idle buffer tagged ``tag`` (at least ``nbytes`` long), or None: a
        DRAM-tier hit, without allocating anything on a miss. When a leased buffer carries
        the tag (its model may be gone but not yet garbage-collected: a reference cycle),
        the garbage collector runs once first."""
        with self._lock:
            self._sweep()
            buf = self._take_locked(tag, nbytes)
            if buf is not None:
                return buf
            waiting = any(b.tag == tag for b in [*self._leased.values(), *self._dropped])
        if not waiting:
            return None
        gc.collect()
        with self._lock:
            self._sweep()
            return self._take_locked(tag, nbytes)

    def _take_locked(self, tag: object, nbytes: int) -> HostBuffer | None:
        for buf in self._free:
            if buf.tag == tag and buf.nbytes >= nbytes:
                self._free.remove(buf)
                self._leased[id(buf)] = buf
                self._hits += 1
                return buf
        return None

    def adopt(self, buf: HostBuffer) -> HostBuffer:
        """Lease a buffer made elsewhere (e.g. a file mapping from
        :meth:`HostBuffer.map_file`); it is charged and comes back to the pool like any
        other. A file-backed buffer is only ever handed out again as a hit of its tag."""
        with self._lock:
            self._sweep()
            self._room(buf.nbytes)  # best effort: drop idle buffers to make room
            self._leased[id(buf)] = buf
        return buf

    def release(self, buf: HostBuffer) -> None:
        """Return a leased buffer for reuse; it keeps its tag (and bytes) until reused.

        The caller must hold no view of it any more.
        """
        with self._lock:
            if self._leased.pop(id(buf), None) is not None:
                self._free.append(buf)
                self._trim_idle()

    def reclaim(self, bufs: Iterable[HostBuffer]) -> None:
        """Take back leased buffers whose holder is gone (a model garbage-collected without
        :meth:`release`): each returns to the idle list, tag and bytes intact, as soon as no
        tensor views it any more (checked now and on every later acquire)."""
        with self._lock:
            for buf in bufs:
                if self._leased.get(id(buf)) is buf:
                    self._dropped.append(buf)
            self._sweep()

    # -- accounting (hold the lock) ----------------------------------------------------------

    def _leased_bytes(self) -> int:
        return sum(b.nbytes for b in self._leased.values()) + self._pending

    def _sweep(self) -> None:
        """Move dropped buffers that nothing views any more to the idle list."""
        if not self._dropped:
            return
        keep = []
        for buf in self._dropped:
            if self._leased.get(id(buf)) is not buf:
                continue  # released meanwhile
            if buf.viewed():
                keep.append(buf)
            else:
                del self._leased[id(buf)]
                self._free.append(buf)
                self._reclaimed += 1
        self._dropped = keep
        self._trim_idle()

    def _trim_idle(self) -> None:
        if self.idle_capacity_bytes is None:
            return
        idle = sum(b.nbytes for b in self._free)
        while self._free and idle > self.idle_capacity_bytes:
            idle -= self._free.pop(0).nbytes  # least recently released first

    def _room(self, need: int) -> bool:
        """Drop idle buffers until ``need`` more bytes fit the capacity; False when leases
        alone leave no room (nothing is dropped then)."""
        if self.capacity_bytes is None:
            return True
        leased = self._leased_bytes()
        if leased + need > self.capacity_bytes:
            return False
        free = sum(b.nbytes for b in self._free)
        while self._free and leased + need + free > self.capacity_bytes:
            free -= self._free.pop(0).nbytes  # the least recently released idle buffer goes back to the OS
        return True

    def _full(self, need: int) -> CacheError:
        leased = self._leased_bytes()
        return CacheError(
            f"host memory pool: {need} bytes needed, {max(0, (self.capacity_bytes or 0) - leased)} of "
            f"{self.capacity_bytes} free after leases"
        )

    # -- reserving ---------------------------------------------------------------------------

    def reserve(self, sizes: list[int]) -> None:
        """Allocate and fault in idle buffers of the given sizes, bytes, ahead of loads.

        Raises:
            CacheError: they do not fit the capacity.
        """
        bufs = [self.acquire(n, populate=True) for n in sizes]
        for b in bufs:
            self.release(b)

    def reserve_async(self, sizes: list[int] | Callable[[], list[int]]) -> Future[None]:
        """:meth:`reserve` in a background thread; returns at once. ``sizes`` may be a
        function that computes them (called in that thread, e.g. opening checkpoints). The
        future completes when every buffer is faulted in (its exception, also logged as a
        warning: a :class:`CacheError` or an allocation failure). Loads meanwhile proceed as
        without a reservation."""
        fut: Future[None] = Future()

        def run() -> None:
            try:
                self.reserve(sizes() if callable(sizes) else sizes)
            except BaseException as exc:  # noqa: BLE001 - handed to the future
                log.warning("reserving the host memory pool failed (loads allocate as they go): %s", exc)
                fut.set_exception(exc)
            else:
                fut.set_result(None)

        threading.Thread(target=run, name="sllm-pool-reserve", daemon=True).start()
        return fut

    def clear(self) -> None:
        """Drop every idle buffer (leased ones stay with their holders)."""
        with self._lock:
            self._free.clear()

    def stats(self) -> PoolStats:
        """Occupancy now (buffers of dropped models that nothing views count as idle)."""
        with self._lock:
            self._sweep()
            return PoolStats(
                capacity_bytes=self.capacity_bytes,
                free_bytes=sum(b.nbytes for b in self._free),
                leased_bytes=sum(b.nbytes for b in self._leased.values()),
                free_buffers=len(self._free),
                leased_buffers=len(self._leased),
                allocations=self._allocations,
                reuses=self._reuses,
                hits=self._hits,
                idle_capacity_bytes=self.idle_capacity_bytes,
                reclaimed=self._reclaimed,
            )


def plan_reservation(models: Iterable[Sequence[int]], budget: int, *, max_models: int | None = None) -> list[int]:
    """Buffer sizes to reserve for a node: the partition sizes of each model (bytes, one
    sequence per model), largest model first, while their rounded total fits ``budget``
    and at most ``max_models`` models are taken (None: no limit)."""
    sizes: list[int] = []
    used = taken = 0
    for parts in sorted(models, key=sum, reverse=True):
        need = sum(round_up(n) for n in parts)
        if used + need <= budget and (max_models is None or taken < max_models):
            sizes.extend(parts)
            used += need
            taken += 1
    return sizes


_default_pool: HostMemoryPool | None = None
_default_lock = threading.Lock()


def default_pool() -> HostMemoryPool:
    """The process-wide pool the loader uses when none is given: no capacity limit while
    buffers are leased; idle buffers kept up to :func:`default_idle_capacity`.

    Raises:
        UsageError: ``SLLM_POOL_CAPACITY`` is not a size.
    """
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = HostMemoryPool(idle_capacity_bytes=default_idle_capacity())
        return _default_pool
