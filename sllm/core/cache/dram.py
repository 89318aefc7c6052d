"""The DRAM tier: models' partitions in host buffers of a serving process's memory pool,
LRU under a capacity, protected by leases while the loader uses them. Process-local and
thread-safe; it does not read disks or networks (``tiercache.py`` fills its buffers).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sllm.core.cache.base import CachedModel, TierStats, hit_rate
from sllm.core.format import Manifest, TensorEntry
from sllm.errors import CacheError

if TYPE_CHECKING:
    import torch

    from sllm.core.pool import HostMemoryPool
    from sllm.io.hostmem import HostBuffer


@dataclass
class _DramEntry:
    model: str
    manifest: Manifest
    tensors: dict[str, TensorEntry]
    files: dict[str, bytes]
    buffers: list[HostBuffer]
    nbytes: int
    last_used: float
    pinned: bool = False
    refs: int = 0
    whole: bool = False


class DramLease:
    """A model's partitions held in DRAM-tier host buffers, not evictable until released.

    How the loader uses it (no disk read, no copy on CPU)::

        with cache.acquire("gpt2") as lease:
            buffers = lease.partition_tensors()            # one uint8 tensor per partition
            state_dict = loader.tensor_views(buffers, lease.tensors)
            # CUDA: copy each buffer to the device (pinned when the pool pins), then the
            # lease may be released; CPU: keep the lease as long as the tensors live.

    Attributes:
        model: the model name.
        manifest: the checkpoint's manifest (partition sizes, chunk checksums).
        tensors: the validated tensor index (offsets into the partition buffers).
        files: the copied side files (``config.json``, tokenizer files), name -> bytes.
    """

    def __init__(self, tier: DramTier, entry: _DramEntry) -> None:
        self._tier = tier
        self._entry = entry
        self.model = entry.model
        self.manifest = entry.manifest
        self.tensors = entry.tensors
        self.files = entry.files
        self._released = False

    @property
    def pinned_memory(self) -> bool:
        """True when the host buffers are page-locked (fast, asynchronous H2D copies)."""
        return all(b.pinned for b in self._entry.buffers)

    def views(self) -> list[memoryview]:
        """One read-only-by-contract memoryview per partition, exactly its size in bytes."""
        self._check()
        return [b.memoryview(p.nbytes) for b, p in zip(self._entry.buffers, self.manifest.partitions, strict=True)]

    def partition_tensors(self) -> list[torch.Tensor]:
        """One ``torch.uint8`` tensor of shape ``(partition nbytes,)`` per partition."""
        self._check()
        return [b.tensor[: p.nbytes] for b, p in zip(self._entry.buffers, self.manifest.partitions, strict=True)]

    def config(self) -> dict[str, Any]:
        """The model's ``config.json`` as a dict.

        Raises:
            CacheError: the checkpoint has no config.json.
        """
        try:
            return json.loads(self.files["config.json"])
        except (KeyError, ValueError) as exc:
            raise CacheError(f"{self.model}: the DRAM entry has no readable config.json") from exc

    def _check(self) -> None:
        if self._released:
            raise CacheError(f"{self.model}: DRAM lease used after release")

    def release(self) -> None:
        """Give the lease back (the entry stays cached and becomes evictable). Idempotent."""
        if not self._released:
            self._released = True
            self._tier._unref(self._entry)

    def __enter__(self) -> DramLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class DramTier:
    """Models' partitions in host buffers of a :class:`HostMemoryPool`, LRU under a capacity.

    Args:
        capacity_bytes: the most bytes of buffers (rounded up to 2 MiB each) held.
        pool: the pool buffers come from (the loader's, in a server); default: a pool of
            its own with this capacity.

    Thread-safe; process-local.
    """

    def __init__(self, capacity_bytes: int, pool: HostMemoryPool | None = None) -> None:
        from sllm.core.pool import HostMemoryPool

        self.capacity_bytes = int(capacity_bytes)
        self.pool = pool if pool is not None else HostMemoryPool(capacity_bytes=self.capacity_bytes)
        self._entries: dict[str, _DramEntry] = {}
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def hold(self, model: str) -> DramLease | None:
        """A lease on ``model`` if it is whole in DRAM (counted as a hit), else None."""
        with self._lock:
            e = self._entries.get(model)
            if e is None or not e.whole:
                return None
            e.refs += 1
            e.last_used = time.time()
            return DramLease(self, e)

    def has(self, model: str) -> bool:
        with self._lock:
            e = self._entries.get(model)
            return e is not None and e.whole

    def reserve(self, model: str, manifest: Manifest, tensors: dict[str, TensorEntry],
                files: dict[str, bytes]) -> tuple[DramLease, list[str]]:
        """Allocate buffers for ``model`` (evicting LRU entries); the entry is "loading",
        held by the returned lease, and invisible to :meth:`hold` until :meth:`commit`.

        Returns: (the lease, the models evicted as "dram:model").

        Raises:
            CacheError: it does not fit even after evicting every idle, unpinned model.
        """
        from sllm.io.hostmem import round_up

        need = sum(round_up(p.nbytes) for p in manifest.partitions)
        with self._lock:
            if model in self._entries:
                raise CacheError(f"{model}: already in the DRAM tier")
            used = sum(e.nbytes for e in self._entries.values())
            if need > self.capacity_bytes:
                raise CacheError(f"{model}: needs {need} bytes of DRAM, more than the tier's capacity "
                                 f"of {self.capacity_bytes}", hint="raise --dram-capacity")
            idle = sorted((e for e in self._entries.values() if e.whole and not e.pinned and e.refs == 0),
                          key=lambda e: e.last_used)
            if used - sum(e.nbytes for e in idle) + need > self.capacity_bytes:
                raise CacheError(f"{model}: needs {need} bytes of DRAM; {self.capacity_bytes - used} free and the "
                                 "rest is pinned or in use", hint="raise --dram-capacity or unpin models")
            evicted = []
            for e in idle:
                if used + need <= self.capacity_bytes:
                    break
                self._drop(e)
                used -= e.nbytes
                evicted.append(f"dram:{e.model}")
            entry = _DramEntry(model, manifest, tensors, files, [], need, time.time(), refs=1)
            self._entries[model] = entry
        try:
            for p in manifest.partitions:
                entry.buffers.append(self.pool.acquire(p.nbytes, exact=True))  # charged = handed out
        except BaseException:
            self.abort(entry)
            raise
        return DramLease(self, entry), evicted

    def commit(self, lease: DramLease) -> None:
        """Make a filled entry visible."""
        with self._lock:
            lease._entry.whole = True

    def abort(self, entry_or_lease: _DramEntry | DramLease) -> None:
        """Drop an entry that could not be filled."""
        entry = entry_or_lease._entry if isinstance(entry_or_lease, DramLease) else entry_or_lease
        with self._lock:
            if self._entries.get(entry.model) is entry:
                del self._entries[entry.model]
            for b in entry.buffers:
                self.pool.release(b)
            entry.buffers = []

    def _drop(self, e: _DramEntry) -> None:
        del self._entries[e.model]
        for b in e.buffers:
            self.pool.release(b)
        e.buffers = []
        self.evictions += 1

    def _unref(self, e: _DramEntry) -> None:
        with self._lock:
            e.refs -= 1

    def set_pinned(self, model: str, pinned: bool) -> bool:
        with self._lock:
            e = self._entries.get(model)
            if e is None or not e.whole:
                return False
            e.pinned = pinned
            return True

    def evict(self, model: str) -> int:
        """Drop ``model``'s buffers; return the bytes freed.

        Raises:
            CacheError: not in the tier, pinned, or leased.
        """
        with self._lock:
            e = self._entries.get(model)
            if e is None or not e.whole:
                raise CacheError(f"{model}: not in the DRAM tier")
            if e.pinned:
                raise CacheError(f"{model}: pinned in the DRAM tier", hint=f"unpin {model} first")
            if e.refs:
                raise CacheError(f"{model}: in use in the DRAM tier ({e.refs} lease(s))")
            self._drop(e)
            return e.nbytes

    def entries(self) -> list[CachedModel]:
        with self._lock:
            return [CachedModel(e.model, "dram", e.nbytes, e.last_used, e.pinned, e.refs > 0,
                                "whole" if e.whole else "loading")
                    for e in sorted(self._entries.values(), key=lambda e: e.last_used)]

    def views_of(self, model: str) -> tuple[Manifest, list[memoryview]]:
        """For verification: the manifest and partition views of a whole entry."""
        with self._lock:
            e = self._entries.get(model)
            if e is None or not e.whole:
                raise CacheError(f"{model}: not in the DRAM tier")
            return e.manifest, [b.memoryview(p.nbytes) for b, p in zip(e.buffers, e.manifest.partitions, strict=True)]

    def stats(self) -> TierStats:
        with self._lock:
            whole = [e for e in self._entries.values() if e.whole]
            return TierStats(
                tier="dram",
                capacity_bytes=self.capacity_bytes,
                used_bytes=sum(e.nbytes for e in whole),
                reserved_bytes=sum(e.nbytes for e in self._entries.values() if not e.whole),
                entries=len(whole),
                pinned=sum(1 for e in whole if e.pinned),
                hits=self.hits,
                misses=self.misses,
                hit_rate=hit_rate(self.hits, self.misses),
                evictions=self.evictions,
            )
