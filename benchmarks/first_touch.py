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

Usage::

    .venv/bin/python benchmarks/first_touch.py --gigabytes 2.6 --gaps 0,1,2,4,8
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
    print(json.dumps({"benchmark": "first_touch", "nbytes": nbytes, "page_reporting": page_reporting(),
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
