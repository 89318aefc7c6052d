"""Host memory buffers for loading: page-aligned, pre-faulted, and pinned when CUDA is there.

A buffer here is an anonymous ``mmap`` advised to use transparent huge pages and touched
once at allocation (with ``SLLM_HUGEPAGES=0``: 4 KiB pages populated by ``MAP_POPULATE``):
the first touch of fresh pages costs more than the disk read on small machines, and
page-aligned memory is what O_DIRECT needs.
With CUDA, the mapping is registered with ``cudaHostRegister`` (page-locked), so
host-to-device copies run at full PCIe/NVLink speed and can be asynchronous. This module
allocates and frees; reuse is :mod:`sllm.core.pool`'s job.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import torch

from sllm.errors import SllmError

#: madvise(2) advice that pre-faults a range for writing (Linux 5.14); not in Python 3.11's mmap.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)

#: madvise(2) advice that maps a range's pages for reading (Linux 5.14): page-cache pages of a file mapping.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)

#: Rounding of buffer sizes, bytes: 2 MiB, the x86-64 huge page size.
BUFFER_ROUNDING = 2 * 1024 * 1024


def huge_pages(populate: bool) -> bool:
    """Whether a new buffer is advised transparent huge pages (``MADV_HUGEPAGE``), by
    ``SLLM_HUGEPAGES``: "auto" (default) for a buffer populated when it is allocated (a
    pool's reservation, a timing baseline: its faults are off a load's path, and 2 MiB
    pages need far fewer DMA segments per O_DIRECT read) but not for one whose pages a load
    faults in as it goes (a fresh process's first load), "1" for every buffer, "0" for none.

    Why not huge pages for fresh buffers: on a 2-core Firecracker VM with free page
    reporting (the host takes back memory the guest has freed for about 2 s), faulting in
    2.6 GB of such memory took 3.5-4.4 s in huge pages and 0.7-1.0 s in 4 KiB pages (two
    threads), while O_DIRECT reads into 4 KiB pages ran 1.5x slower (1.69 s against 1.12 s).
    A fresh process's cold load of OPT-1.3B fp16 went from 4.7-5.8 s to 1.7-2.0 s (model)
    and from 3.0-3.9 s to 1.9-2.4 s (state dict), five interleaved pairs (``sllm
    load-bench``; ``benchmarks/first_touch.py`` shows the host's part).
    """
    mode = os.environ.get("SLLM_HUGEPAGES", "auto").strip().lower()
    if mode == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    return mode == "1" or populate


def round_up(nbytes: int, multiple: int = BUFFER_ROUNDING) -> int:
    """``nbytes`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, -(-nbytes // multiple) * multiple)


_libc: ctypes.CDLL | None = None


def _madvise(addr: int, length: int, advice: int) -> bool:
    """``madvise(2)`` through ctypes, which releases the GIL for the call (Python's
    ``mmap.madvise`` holds it); True on success."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise(addr, length, advice) == 0


def cuda_available() -> bool:
    """True when torch sees at least one CUDA device."""
    return torch.cuda.is_available()


class HostBuffer:
    """One page-aligned host allocation and a uint8 tensor over it.

    With ``populate`` (default) every page is faulted in now, so later use runs at memory
    speed (a pool's reserve, a timing baseline). Without it (``faulted`` False) the pages
    are faulted by their first use: the loader then runs :meth:`prefault` ahead of the
    O_DIRECT reads, in threads of their own (see :class:`sllm.io.reader.ParallelRead`), so
    the faults are taken off the reads' path. On a 2-core VM a fresh process's first touch
    of 2.6 GB varied from 0.2 s to 5 s (the hypervisor backs memory the guest gave back),
    against about 1.0 s for the read itself; such fresh buffers get 4 KiB pages, populated
    ones huge pages (:func:`huge_pages`).

    Attributes:
        nbytes: capacity in bytes (a multiple of :data:`BUFFER_ROUNDING`).
        faulted: True once every page has been touched (populated, or filled by a read).
        pinned: True when page-locked for CUDA.
        tag: what the bytes hold, or None (see :class:`sllm.core.pool.HostMemoryPool`).
        tensor: ``torch.uint8`` tensor of shape ``(nbytes,)`` sharing the memory.

    Raises:
        SllmError: the allocation failed (out of memory).
    """

    def __init__(self, nbytes: int, *, pinned: bool = False, populate: bool = True) -> None:
        self.nbytes = round_up(nbytes)
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20)
        huge = huge_pages(populate)
        if populate and not huge:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        try:
            self._map = mmap.mmap(-1, self.nbytes, flags=flags)
        except OSError as exc:
            raise SllmError(f"cannot allocate {self.nbytes} bytes of host memory ({exc.strerror})") from exc
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        if huge:
            # Advise before the first touch, so faults map 2 MiB pages (huge_pages: when)
            self._map.madvise(mmap.MADV_HUGEPAGE)
            if populate:
                try:  # the kernel faults every page in, in one pass (Linux >= 5.14)
                    self._map.madvise(MADV_POPULATE_WRITE)
                except OSError:
                    self.tensor.zero_()  # older kernels: touch from user space
        self.faulted = populate
        self.file_backed = False
        self.pinned = False
        #: What the bytes hold (set by whoever filled them, e.g. the loader's partition key);
        #: None when the content is unknown. The pool hands a tagged buffer back to a caller
        #: asking for the same tag, so a reload skips the read (the DRAM tier).
        self.tag: object | None = None
        if pinned:
            self._pin()
        self._finalizer = weakref.finalize(self, HostBuffer._unpin, self.pinned, self.tensor.data_ptr())
        self._base_uses = self._uses()

    @classmethod
    def map_file(cls, path: str | os.PathLike[str], nbytes: int) -> HostBuffer:
        """A buffer whose bytes are the first ``nbytes`` of ``path``, mapped copy-on-write
        (``MAP_PRIVATE``) from the page cache: nothing is copied, and the pages are mapped
        at once (``MADV_POPULATE_READ``; pages not resident are read from the file). Writes
        to the buffer stay private to this process. The file must not be truncated while
        the buffer (or a tensor viewing it) lives: that would fault (SIGBUS).

        Raises:
            OSError: the file cannot be opened or mapped.
        """
        self = cls.__new__(cls)
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.nbytes = nbytes
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
        _madvise(self.tensor.data_ptr(), nbytes, MADV_POPULATE_READ)
        self.faulted, self.file_backed, self.pinned, self.tag = True, True, False, None
        self._finalizer = weakref.finalize(self, HostBuffer._unpin, False, 0)
        self._base_uses = self._uses()
        return self

    def _uses(self) -> int | None:
        count = getattr(torch._C, "_storage_Use_Count", None)
        return None if count is None else count(self.tensor.untyped_storage()._cdata)

    def viewed(self) -> bool:
        """True while a tensor other than :attr:`tensor` shares this buffer's memory (by the
        use count of its torch storage: every view holds a reference)."""
        uses = self._uses()
        if uses is None or self._base_uses is None:
            return True  # a torch that cannot tell: never reuse a dropped buffer
        return uses > self._base_uses

    def _pin(self) -> None:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 0)
        self.pinned = int(err) == 0 if not isinstance(err, tuple) else int(err[0]) == 0

    @staticmethod
    def _unpin(pinned: bool, ptr: int) -> None:
        # The mapping itself is never closed here: torch.frombuffer holds a reference to
        # the mmap object (not a buffer export), so closing it would unmap memory that
        # tensor views may still use. It is unmapped when its last reference goes.
        if pinned:
            try:
                torch.cuda.cudart().cudaHostUnregister(ptr)
            except Exception:  # noqa: BLE001 - best effort at interpreter exit
                pass

    def prefault(self, start: int, end: int) -> None:
        """Fault in the pages of bytes ``[start, end)`` for writing (``MADV_POPULATE_WRITE``,
        the GIL released; where the kernel lacks it, one byte per page is written)."""
        page = mmap.PAGESIZE
        start -= start % page
        end = min(self.nbytes, end)
        if end <= start:
            return
        if not _madvise(self.tensor.data_ptr() + start, end - start, MADV_POPULATE_WRITE):
            self.tensor[start:end:page].zero_()

    def memoryview(self, nbytes: int | None = None) -> memoryview:
        """A writable view of the first ``nbytes`` bytes (all by default)."""
        view = memoryview(self._map)
        return view if nbytes is None else view[:nbytes]
