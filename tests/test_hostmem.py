"""Host buffers: which ones are advised transparent huge pages (SLLM_HUGEPAGES)."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from sllm.io.hostmem import HostBuffer, huge_pages


@pytest.mark.parametrize("mode, populated, fresh", [
    (None, True, False),  # auto: a reserved pool's buffers get huge pages, a load's fresh ones 4 KiB pages
    ("auto", True, False),
    ("1", True, True),
    ("0", False, False),
])  # fmt: skip
def test_huge_pages_by_mode(monkeypatch, mode, populated, fresh):
    if mode is None:
        monkeypatch.delenv("SLLM_HUGEPAGES", raising=False)
    else:
        monkeypatch.setenv("SLLM_HUGEPAGES", mode)
    have = hasattr(mmap, "MADV_HUGEPAGE")
    assert huge_pages(populate=True) == (populated and have)
    assert huge_pages(populate=False) == (fresh and have)


def _anon_huge_kb(buf: HostBuffer) -> int:
    """AnonHugePages of the mapping that holds ``buf`` (/proc/self/smaps), kB."""
    start = buf.tensor.data_ptr()
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        span = line.split()[0]
        if "-" in span and all(c in "0123456789abcdef-" for c in span):
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= start < hi:
                for field in lines[i + 1:]:
                    if field.startswith("AnonHugePages:"):
                        return int(field.split()[1])
    raise AssertionError("mapping not found")


def _thp_usable() -> bool:
    try:
        enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in enabled and hasattr(mmap, "MADV_HUGEPAGE")


@pytest.mark.skipif(not _thp_usable(), reason="transparent huge pages are off on this host")
def test_a_fresh_buffer_faulted_by_a_load_gets_small_pages_and_a_reserved_one_huge_pages(monkeypatch):
    monkeypatch.delenv("SLLM_HUGEPAGES", raising=False)
    reserved = HostBuffer(8 << 20)  # populated when allocated: advised
    if _anon_huge_kb(reserved) == 0:
        pytest.skip("the kernel had no free huge page just now: small pages cannot be told apart")
    fresh = HostBuffer(8 << 20, populate=False)
    fresh.prefault(0, fresh.nbytes)
    assert _anon_huge_kb(fresh) == 0
    monkeypatch.setenv("SLLM_HUGEPAGES", "1")  # every buffer advised: a fresh one too
    advised = HostBuffer(8 << 20, populate=False)
    advised.prefault(0, advised.nbytes)
    assert _anon_huge_kb(advised) > 0
