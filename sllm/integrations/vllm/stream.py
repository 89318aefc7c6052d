"""Stream an sllm checkpoint's tensors to a consumer as their bytes land (CPU host buffers).

vLLM's ``model.load_weights`` copies each tensor it is handed into its own parameter. Handing
it the whole state dict after the whole read (``load_checkpoint``) makes the load cost
read + copy; this module overlaps them: each partition is read with sllm's
:class:`~sllm.io.reader.ParallelRead` (large chunked reads from several threads, O_DIRECT
where the filesystem allows) into one buffer leased from a :class:`~sllm.core.pool.HostMemoryPool`,
every tensor is a view of that buffer made before any byte is read, and a tensor is yielded
as soon as every chunk under it has landed (while the reader threads go on with the next
chunks). A buffer the pool still holds with the partition's bytes (same file, same identity:
:func:`~sllm.core.loader.partition_tag`) is not read again, and a partition (nearly) whole in
the page cache is mapped copy-on-write instead of read (``SLLM_PAGE_CACHE=0`` turns that off).

It does not know vLLM (the names it yields are the checkpoint's stored names), copies no
tensor bytes, and leaves the buffers leased: the caller releases them after the consumer is
done with the views.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from sllm.core.format import Checkpoint
from sllm.core.loader import LoadReport
from sllm.core.partitions import cached, map_cached, page_cache_enabled, partition_tag, tensor_views
from sllm.core.pool import HostMemoryPool
from sllm.errors import ChecksumMismatch
from sllm.io.hostmem import HostBuffer
from sllm.io.reader import DEFAULT_READ_THREADS, ParallelRead, chunk_ranges


@dataclass
class StreamedLoad:
    """One streamed load: iterate :meth:`tensors`, then read :attr:`report`, then :meth:`release`.

    Args:
        ckpt: the validated checkpoint (``open_checkpoint``).
        pool: where the partition buffers are leased from.
        threads: reader threads per partition.
        direct_io: force O_DIRECT on/off (None: where it works).
        verify: check every chunk's SHA-256 against the manifest as it lands.

    Attributes:
        report: the load's figures once :meth:`tensors` is exhausted (``read_seconds`` is the
            wall time of the iteration, consumer's work included); None before.
        leases: the buffers leased from the pool so far (a caller whose tensors keep viewing
            them hands them to ``pool.reclaim`` instead of :meth:`release`).
    """

    ckpt: Checkpoint
    pool: HostMemoryPool
    threads: int = DEFAULT_READ_THREADS
    direct_io: bool | None = None
    verify: bool = False
    report: LoadReport | None = None
    leases: list[HostBuffer] = field(default_factory=list)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(stored name, CPU tensor view)`` for every index entry, each once its bytes are in.

        Tensors of one partition come in offset order; aliases (tied weights) come together.
        The reads run in a thread of their own, so they go on while the consumer works on
        the tensors already handed over (the consumer's pace does not throttle them).

        Raises:
            CheckpointError subclasses from the reads (the message names the file);
            ChecksumMismatch with ``verify``; CacheError when the pool cannot hold a partition.
        """
        items: queue.SimpleQueue[tuple[str, torch.Tensor] | BaseException | None] = queue.SimpleQueue()
        stop = threading.Event()

        def produce() -> None:
            reads = self._read()
            try:
                for item in reads:
                    if stop.is_set():
                        break
                    items.put(item)
                items.put(None)
            except BaseException as exc:  # handed to the consumer's thread
                items.put(exc)
            finally:
                reads.close()

        thread = threading.Thread(target=produce, name="sllm-vllm-read", daemon=True)
        thread.start()
        try:
            while (item := items.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def _read(self) -> Iterator[tuple[str, torch.Tensor]]:
        started = time.perf_counter()
        manifest = self.ckpt.manifest
        hits, directs = [], []
        for part, info in enumerate(manifest.partitions):
            tag = partition_tag(self.ckpt, part)
            host = self.pool.take(tag, info.nbytes) or self._mapped(part) or self.pool.acquire(info.nbytes)
            self.leases.append(host)
            buffers = [host.tensor[: info.nbytes] if p == part else torch.empty(0, dtype=torch.uint8)
                       for p in range(len(manifest.partitions))]
            names = sorted((n for n, e in self.ckpt.tensors.items() if e.partition == part),
                           key=lambda n: (self.ckpt.tensors[n].offset, n))
            views = tensor_views(buffers, {n: self.ckpt.tensors[n] for n in names})
            chunk = manifest.chunk_bytes
            # The last chunk each tensor needs (tensors of 0 bytes need none: -1).
            last = [(e.offset + e.nbytes - 1) // chunk if e.nbytes else -1 for e in (self.ckpt.tensors[n] for n in names)]
            hit = host.tag == tag
            hits.append(hit)
            if hit or host.file_backed:
                host.tag = tag
                yield from ((n, views[n]) for n in names)
                continue
            host.tag = None
            read = ParallelRead(
                self.ckpt.partition_path(part), host.memoryview(info.nbytes), chunk_bytes=chunk,
                threads=self.threads, direct_io=self.direct_io, on_chunk=self._checker(part) if self.verify else None,
                prefault=None if host.faulted else host.prefault,  # a fresh buffer's faults off the reads' path
            )
            landed = [False] * len(chunk_ranges(info.nbytes, chunk))
            low, nxt = 0, 0  # chunks [0, low) have all landed; names[:nxt] were yielded
            for i in read:
                landed[i] = True
                while low < len(landed) and landed[low]:
                    low += 1
                while nxt < len(names) and last[nxt] < low:
                    yield names[nxt], views[names[nxt]]
                    nxt += 1
            yield from ((n, views[n]) for n in names[nxt:])
            directs.append(read.direct_io)
            host.faulted = host.faulted or info.nbytes == host.nbytes
            host.tag = tag
        seconds = time.perf_counter() - started
        self.report = LoadReport(
            path=str(self.ckpt.path), nbytes=manifest.total_bytes, partitions=len(manifest.partitions),
            read_seconds=seconds, build_seconds=0.0, total_seconds=seconds,
            gbps=manifest.total_bytes / seconds / 1e9 if seconds > 0 else 0.0,
            direct_io=bool(directs) and all(directs), pool_hit=all(hits), device="cpu",
        )

    def _mapped(self, part: int) -> HostBuffer | None:
        """The partition mapped copy-on-write from the page cache when (nearly) all of it is
        there (as :func:`sllm.core.partitions.fill_partition` does): no read, no copy."""
        info = self.ckpt.manifest.partitions[part]
        path = self.ckpt.partition_path(part)
        if self.verify or self.direct_io is True or not page_cache_enabled() or info.nbytes == 0 or not cached(path):
            return None
        return map_cached(self.pool, path, info.nbytes)

    def _checker(self, part: int) -> Callable[[int, int, int, memoryview], None]:
        info = self.ckpt.manifest.partitions[part]
        path = self.ckpt.partition_path(part)

        def check(i: int, start: int, end: int, view: memoryview) -> None:
            if hashlib.sha256(view).hexdigest() != info.chunks[i]:
                raise ChecksumMismatch(f"{path}: chunk {i} (bytes {start}-{end}) fails its sha256 checksum")

        return check

    def release(self) -> None:
        """Give the partition buffers back to the pool; no view may be used afterwards."""
        for host in self.leases:
            self.pool.release(host)
        self.leases = []
