"""How fast this host lets a process touch fresh memory, and whether freed memory turns slow.

A program, not a test: it prints a table and one JSON line, and asserts nothing on time.

A fresh process that loads a checkpoint writes into memory it has never touched, and each
page's first touch costs a fault. On a bare-metal host that is a few GB/s. On a VM whose
balloon device reports free pages to the hypervisor (Linux ``page_reporting``, e.g.
Firecracker or QEMU with free page reporting), the host takes freed memory back about
two seconds after the guest frees it, and the next first touch of it must be backed by
the host again, which can be ten times slower. ``sllm load-bench``'s "touch" row measures
a fresh process's first touch; this program shows where it comes from: it populates
``--gigabytes`` of new anonymous memory (huge pages, ``MADV_POPULATE_WRITE`` as
:class:`sllm.io.hostmem.HostBuffer` populates a pool's buffers), frees it, waits each of
``--gaps`` seconds, and populates as much again; then, settled again, as much in 4 KiB pages
(as a load's fresh buffers get them, ``SLLM_HUGEPAGES=auto``).

With ``--read FILE`` it also asks whether the first touch can hide behind a read, as the
loader's prefault threads try (:class:`sllm.io.reader.ParallelRead`): it times, each after
``--settle`` seconds, an O_DIRECT read of FILE (page cache evicted, the loader's default
threads) into memory touched beforehand (the raw read of ``load-bench``), the first touch of
as many bytes of settled memory in 4 KiB pages, and the two at once (the read into touched
memory while a thread touches a second buffer). Where the two at once take about as long
as the slower alone, a loader can overlap them; where they take longer than both in turn,
the host serves them from one resource and no overlap can help.

Usage::

    .venv/bin/python benchmarks/first_touch.py --gigabytes 2.6 --gaps 0,1,2,4,8
    .venv/bin/python benchmarks/first_touch.py --gaps 0 --read /tmp/opt-sllm/partition-0.bin --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def populate_seconds(nbytes: int, *, huge: bool = True) -> float:
    """Seconds to allocate ``nbytes`` of new host memory with every page faulted in, in 2
    MiB (``huge``) or 4 KiB pages; the memory is freed before returning."""
    import os
    from unittest import mock

    from sllm.io.hostmem import HostBuffer

    with mock.patch.dict(os.environ, {"SLLM_HUGEPAGES": "1" if huge else "0"}):  # HostBuffer reads it
        started = time.perf_counter()
        buf = HostBuffer(nbytes)
        seconds = time.perf_counter() - started
    del buf
    return seconds


def _touch(nbytes: int, ends: dict[str, float], started: float) -> None:
    from sllm.io.hostmem import HostBuffer

    HostBuffer(nbytes)  # populated: every page touched, then freed
    ends["touch"] = time.perf_counter() - started


def read_and_touch(path: Path, repeats: int, settle: float) -> list[dict]:
    """Seconds of (the read alone, the touch alone, both at once: the read's and the touch's
    end), ``repeats`` times, each measurement after ``settle`` seconds; see the module docstring."""
    import os
    import threading
    from unittest import mock

    from sllm.core.format import DEFAULT_CHUNK_BYTES
    from sllm.io.hostmem import HostBuffer
    from sllm.io.reader import DIRECT_IO_ALIGNMENT, evict_page_cache, read_whole

    nbytes = path.stat().st_size // DIRECT_IO_ALIGNMENT * DIRECT_IO_ALIGNMENT
    rows = []
    with mock.patch.dict(os.environ, {"SLLM_HUGEPAGES": "0"}):  # 4 KiB pages, as a load's fresh buffers
        for _ in range(repeats):
            row: dict[str, float] = {}
            for mode in ("read", "touch", "both"):
                target = HostBuffer(nbytes) if mode != "touch" else None  # touched before the timer
                evict_page_cache(path)
                time.sleep(settle)
                ends: dict[str, float] = {}
                started = time.perf_counter()
                toucher = threading.Thread(target=_touch, args=(nbytes, ends, started)) if mode != "read" else None
                if toucher:
                    toucher.start()
                if target is not None:
                    direct = read_whole(path, target.memoryview(nbytes), chunk_bytes=DEFAULT_CHUNK_BYTES)
                    assert direct, f"{path}: O_DIRECT is not available here"
                    ends["read"] = time.perf_counter() - started
                if toucher:
                    toucher.join()
                for k, v in ends.items():
                    row[f"{mode}_{k}_seconds" if mode == "both" else f"{mode}_seconds"] = v
                del target
            rows.append(row)
    return rows


def page_reporting() -> str | None:
    """The kernel command line's ``page_reporting.*`` settings, or None (not set there)."""
    try:
        words = Path("/proc/cmdline").read_text().split()
    except OSError:
        return None
    found = [w for w in words if w.startswith("page_reporting.")]
    return " ".join(found) or None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gigabytes", type=float, default=2.6, help="memory per populate, GB (default 2.6)")
    ap.add_argument("--gaps", default="0,1,2,4,8", help="seconds between freeing and the next populate")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds before each pair (default 3)")
    ap.add_argument("--read", type=Path, help="a large file (e.g. a partition): also time the read and the touch at once")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of --read's three measurements (default 2)")
    args = ap.parse_args()
    nbytes = int(args.gigabytes * 1e9)
    rows = []
    for gap in (float(g) for g in args.gaps.split(",")):
        time.sleep(args.settle)
        first = populate_seconds(nbytes)  # memory freed at least --settle seconds ago, if any
        time.sleep(gap)
        second = populate_seconds(nbytes)  # the memory the first one freed, ``gap`` seconds later
        time.sleep(args.settle)
        small = populate_seconds(nbytes, huge=False)  # settled again, 4 KiB pages
        rows.append({"gap_seconds": gap, "first_seconds": first, "second_seconds": second, "small_pages_seconds": small,
                     "first_gbps": nbytes / first / 1e9, "second_gbps": nbytes / second / 1e9,
                     "small_pages_gbps": nbytes / small / 1e9})
    print(f"first touch of {args.gigabytes:g} GB of fresh memory; kernel: {page_reporting() or 'no page_reporting'}")
    print(f"{'gap s':>6}  {'settled, huge pages s':>21} {'GB/s':>6}  {'re-touch after gap s':>20} {'GB/s':>6}  "
          f"{'settled, 4 KiB pages s':>22} {'GB/s':>6}")
    for r in rows:
        print(f"{r['gap_seconds']:>6g}  {r['first_seconds']:>21.3f} {r['first_gbps']:>6.2f}  "
              f"{r['second_seconds']:>20.3f} {r['second_gbps']:>6.2f}  {r['small_pages_seconds']:>22.3f} "
              f"{r['small_pages_gbps']:>6.2f}")
    overlap = read_and_touch(args.read, args.repeats, args.settle) if args.read else []
    if overlap:
        print(f"\n{args.read}: O_DIRECT read into touched memory, first touch of as much settled memory "
              "(4 KiB pages), and both at once")
        print(f"{'read s':>8} {'touch s':>8}  {'both: read ends s':>17} {'touch ends s':>12}  {'both / slower alone':>19}")
        for r in overlap:
            both = max(r["both_read_seconds"], r["both_touch_seconds"])
            print(f"{r['read_seconds']:>8.3f} {r['touch_seconds']:>8.3f}  {r['both_read_seconds']:>17.3f} "
                  f"{r['both_touch_seconds']:>12.3f}  {both / max(r['read_seconds'], r['touch_seconds']):>18.2f}x")
    print(json.dumps({"benchmark": "first_touch", "nbytes": nbytes, "page_reporting": page_reporting(),
                      "rows": rows, "read_and_touch": overlap}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
