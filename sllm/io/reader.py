"""Parallel positional reads of whole files into caller-owned buffers, O_DIRECT when possible.

This module moves bytes from a file into a writable buffer (a ``memoryview`` over host
memory) with several threads issuing large ``preadv`` calls at once; it opens the file with
``O_DIRECT`` when the buffer address, the chunk sizes and the filesystem allow it, and falls
back to buffered reads where they do not (tmpfs, some network filesystems). It also evicts a
file's pages from the page cache, for cold-read measurements. It knows nothing of tensors,
models or checkpoints: callers pass byte ranges.

All ``OSError``s raised here are translated into :class:`sllm.errors.TruncatedPartition`
(short file) or :class:`sllm.errors.CheckpointError` (unreadable), naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from sllm.errors import CheckpointError, RemoteError, TruncatedPartition

#: O_DIRECT needs buffer address, file offset and length aligned to the logical block size;
#: 4096 covers every common device (512e and 4Kn disks, NVMe).
DIRECT_IO_ALIGNMENT = 4096
DEFAULT_READ_THREADS = 4
#: Threads that prefault a fresh destination ahead of the reads (one per CPU, at most 4):
#: on a VM the first touch of memory can cost the hypervisor's faults too, and those run
#: in parallel across vCPUs.
DEFAULT_PREFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))

ChunkCallback = Callable[[int, int, int, memoryview], None]
#: ``prefault(start, end)``: fault in the destination's pages of ``[start, end)`` (see ParallelRead).
PrefaultCallback = Callable[[int, int], None]


def evict_page_cache(path: str | os.PathLike[str]) -> None:
    """Drop ``path``'s clean pages from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``).

    Makes the next buffered read of the file come from the device ("cold"). A no-op where
    ``posix_fadvise`` is missing. Raises CheckpointError when the file cannot be opened.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from exc
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: str | os.PathLike[str]) -> float | None:
    """Fraction (0..1) of ``path``'s pages that are in the page cache, by ``mincore(2)``.

    Costs one read-only mapping and one ``mincore`` call (about 1 ms per GB). Returns None
    where it cannot tell (no libc, a mapping refused); 1.0 for an empty file.

    Raises:
        CheckpointError: the file cannot be opened.
    """
    import ctypes

    libc = _libc()
    if libc is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from exc
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = -(-size // os.sysconf("SC_PAGE_SIZE"))
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                return None
            return (pages - vec.raw[:pages].count(0)) / pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


_LIBC: list = []


def _libc():
    """libc through ctypes with mmap/munmap/mincore typed, or None where there is none."""
    import ctypes
    import ctypes.util

    if not _LIBC:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name, use_errno=True) if name else None
        if libc is not None:
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIBC.append(libc)
    return _LIBC[0]


def buffer_address(buf: memoryview) -> int:
    """The address of the first byte of a writable, C-contiguous buffer."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def chunk_ranges(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split ``[0, nbytes)`` into ``[start, end)`` ranges of ``chunk_bytes`` (the last shorter)."""
    if nbytes == 0:
        return [(0, 0)]
    return [(s, min(s + chunk_bytes, nbytes)) for s in range(0, nbytes, chunk_bytes)]


def _pread_full(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise TruncatedPartition(f"{path}: file ended at byte {offset + done}, expected at least {offset + total}")
        done += n


class _Files:
    """The file descriptors one read uses: an O_DIRECT one when allowed, a buffered one lazily."""

    def __init__(self, path: Path, want_direct: bool) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.buffered_fd: int | None = None
        self.direct_fd: int | None = None
        self.direct_failed = False
        if want_direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from exc
        if self.direct_fd is None:
            self.buffered()

    def buffered(self) -> int:
        with self.lock:
            if self.buffered_fd is None:
                try:
                    self.buffered_fd = os.open(self.path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"{self.path}: cannot open ({exc.strerror})") from exc
            return self.buffered_fd

    def close(self) -> None:
        for fd in (self.direct_fd, self.buffered_fd):
            if fd is not None:
                os.close(fd)


class ParallelRead:
    """Read ``path``'s first ``len(buf)`` bytes into ``buf``; iterate to get chunk numbers as they land.

    The file is split into chunks of ``chunk_bytes`` (see :func:`chunk_ranges`); ``threads``
    workers read them with ``preadv``, at most ``2 * threads`` in flight, and iterating yields
    each chunk's number once its bytes are in ``buf`` and ``on_chunk`` has run. Chunks
    complete out of order. ``on_chunk(i, start, end, view)`` runs in the worker thread
    (e.g. a checksum; hashlib releases the GIL) and may raise to abort the read.

    With ``prefault``, ``prefault_threads`` threads of their own (default
    :data:`DEFAULT_PREFAULT_THREADS`) call ``prefault(start, end)`` for every chunk, in order
    and round-robin, and a chunk's read waits until its range has been prefaulted: the first
    touch of fresh destination memory (page faults, the kernel zeroing pages) then runs
    ahead of the reads instead of inside them. On a 2-core VM a fresh process's O_DIRECT
    read of 2.6 GB took 1.0-4.6 s with the faults taken by the reads, against 0.90-1.06 s
    into memory faulted beforehand; see the closing note of issue 7 for what prefaulting
    ahead gives. An exception from ``prefault`` only stops the prefaulting (the reads then
    fault pages themselves).

    Args:
        path: the file; its size must be at least ``len(buf)`` bytes.
        buf: a writable, C-contiguous byte buffer (e.g. ``memoryview(mmap)``).
        chunk_bytes: bytes per read; a multiple of 4096 for O_DIRECT.
        threads: reader threads (>= 1).
        direct_io: True asks for O_DIRECT, False forbids it, None (default) uses it when the
            buffer address and chunk size are 4096-aligned. Where the filesystem refuses
            O_DIRECT (EINVAL), reads fall back to buffered I/O silently; ``direct_io`` tells
            afterwards which was used.

    Raises (while iterating):
        TruncatedPartition: the file is shorter than ``len(buf)``.
        CheckpointError: the file cannot be opened or read.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        buf: memoryview,
        *,
        chunk_bytes: int,
        threads: int = DEFAULT_READ_THREADS,
        direct_io: bool | None = None,
        on_chunk: ChunkCallback | None = None,
        prefault: PrefaultCallback | None = None,
        prefault_threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.buf = buf
        self.ranges = chunk_ranges(len(buf), chunk_bytes)
        self.threads = max(1, int(threads))
        self.on_chunk = on_chunk
        self.prefault = prefault
        self.prefault_threads = max(1, int(prefault_threads or DEFAULT_PREFAULT_THREADS))
        self._faulted: list[threading.Event] | None = None
        self._stop = threading.Event()
        aligned = (
            chunk_bytes % DIRECT_IO_ALIGNMENT == 0
            and len(buf) % DIRECT_IO_ALIGNMENT == 0
            and (len(buf) == 0 or buffer_address(buf) % DIRECT_IO_ALIGNMENT == 0)
        )
        self._want_direct = aligned if direct_io is None else (bool(direct_io) and aligned)
        self._files: _Files | None = None

    @property
    def direct_io(self) -> bool:
        """True when the reads so far all used O_DIRECT."""
        f = self._files
        return f is not None and f.direct_fd is not None and not f.direct_failed

    def _work(self, i: int) -> int:
        files = self._files
        assert files is not None
        start, end = self.ranges[i]
        view = self.buf[start:end]
        if self._faulted is not None:
            self._faulted[i].wait()
        if end > start:
            try:
                if files.direct_fd is not None and not files.direct_failed:
                    try:
                        _pread_full(files.direct_fd, view, start, self.path)
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        files.direct_failed = True  # the filesystem refuses O_DIRECT reads
                        _pread_full(files.buffered(), view, start, self.path)
                else:
                    _pread_full(files.buffered(), view, start, self.path)
            except OSError as exc:
                raise CheckpointError(f"{self.path}: read failed at byte {start} ({exc.strerror})") from exc
        if self.on_chunk is not None:
            self.on_chunk(i, start, end, view)
        return i

    def _prefault_share(self, k: int, of: int) -> None:
        """Prefault chunks ``k, k + of, k + 2*of, ...`` in order, releasing each chunk's reader."""
        assert self.prefault is not None and self._faulted is not None
        mine = range(k, len(self.ranges), of)
        try:
            for i in mine:
                if self._stop.is_set():
                    break
                start, end = self.ranges[i]
                if end > start:
                    self.prefault(start, end)
                self._faulted[i].set()
        except Exception:  # noqa: BLE001 - an optimisation only: the reads fault the pages themselves
            pass
        finally:
            for i in mine:
                self._faulted[i].set()

    def __iter__(self) -> Iterator[int]:
        self._files = _Files(self.path, self._want_direct)
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="sllm-read")
        pending: set[Future[int]] = set()
        next_chunk = 0
        faulting: list[threading.Thread] = []
        if self.prefault is not None:
            self._faulted = [threading.Event() for _ in self.ranges]
            of = max(1, min(self.prefault_threads, len(self.ranges)))
            faulting = [threading.Thread(target=self._prefault_share, args=(k, of), name="sllm-prefault", daemon=True)
                        for k in range(of)]  # fmt: skip
            for t in faulting:
                t.start()
        try:
            while next_chunk < len(self.ranges) or pending:
                while next_chunk < len(self.ranges) and len(pending) < 2 * self.threads:
                    pending.add(pool.submit(self._work, next_chunk))
                    next_chunk += 1
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        finally:
            self._stop.set()
            for fut in pending:
                fut.cancel()
            for t in faulting:
                t.join()
            pool.shutdown(wait=True)
            self._files.close()


def read_whole(path: str | os.PathLike[str], buf: memoryview, **kwargs) -> bool:
    """Read ``path`` into ``buf`` completely; return whether O_DIRECT was used.

    Keyword arguments are :class:`ParallelRead`'s.
    """
    read = ParallelRead(path, buf, **kwargs)
    for _ in read:
        pass
    return read.direct_io


def hash_file_chunks(
    path: str | os.PathLike[str],
    nbytes: int,
    chunk_bytes: int,
    *,
    threads: int = 2,
    on_chunk: Callable[[int, int, int, str], None] | None = None,
) -> list[str]:
    """The sha256 hex digest of each ``chunk_bytes`` chunk of a local file's first ``nbytes``.

    Reads with ``threads`` threads (``os.pread``, one chunk in memory per thread). The file
    must be at least ``nbytes`` long. ``on_chunk(i, start, end, digest)`` runs as each chunk
    is hashed (in order).

    Raises:
        RemoteError: the file cannot be read or is shorter than ``nbytes`` ("truncated").
    """
    ranges = [(s, min(s + chunk_bytes, nbytes)) for s in range(0, nbytes, chunk_bytes)] or [(0, 0)]
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise RemoteError(f"{path}: cannot open ({exc.strerror})") from exc

    def one(r: tuple[int, int]) -> str:
        start, end = r
        h = hashlib.sha256()
        pos = start
        while pos < end:
            try:
                data = os.pread(fd, min(end - pos, 8 * 1024 * 1024), pos)
            except OSError as exc:
                raise RemoteError(f"{path}: read failed at byte {pos} ({exc.strerror})") from exc
            if not data:
                raise RemoteError(f"{path}: truncated: the file ends at byte {pos}, expected {nbytes}")
            h.update(data)
            pos += len(data)
        return h.hexdigest()

    digests = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="sllm-hash") as pool:
            for i, digest in enumerate(pool.map(one, ranges)):
                digests.append(digest)
                if on_chunk:
                    on_chunk(i, ranges[i][0], ranges[i][1], digest)
    finally:
        os.close(fd)
    return digests
