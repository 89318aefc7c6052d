"""load-bench's worker: one method measured in a fresh process, cold then warm.

``python -m sllm.core.bench.worker SPEC_JSON`` runs :func:`worker_main` and prints one JSON
document on stdout (anything the libraries print goes to stderr). Untimed set-up: torch and
transformers are imported, the architecture's module is imported by building the model on
the meta device once (transformers' ~2 s lazy import is counted for no method), and for
"sllm-reserved" the host memory pool is reserved and faulted in as a server with a budget
does at start. "Ready" means every byte of every tensor is resident: after a load, one byte
per page of each tensor's storage is read (mmap-based loaders pay their deferred reads
there) or, on CUDA, the device is synchronised. A cold sample follows evicting every weight
file from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``); "sllm-page-cache" primes
the page cache with an untimed buffered read instead, like a second process on the node.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any


def _touch(tensors: Any) -> None:
    """Make every page of each tensor's storage resident: read one byte per page (CPU)."""
    import torch

    page = os.sysconf("SC_PAGE_SIZE")
    seen: set[int] = set()
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        flat = torch.empty(0, dtype=torch.uint8).set_(storage)
        int(flat[::page].sum())


def _ready(obj: Any, device: Any) -> None:
    """Block until ``obj`` (a model or a state dict) is usable: pages touched or CUDA synced."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    if isinstance(obj, torch.nn.Module):
        _touch([*obj.parameters(), *obj.buffers()])
    else:
        _touch(obj.values())


def _sample(fn: Callable[[], Any], device: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    obj = fn()
    _ready(obj, device)
    return obj, time.perf_counter() - started


def _evict(paths: list[str]) -> float | None:
    from sllm.io.reader import evict_page_cache, resident_fraction

    for p in paths:
        evict_page_cache(p)
    fractions = [resident_fraction(p) for p in paths]
    sizes = [os.path.getsize(p) for p in paths]
    if any(f is None for f in fractions) or not sum(sizes):
        return None
    return sum(f * n for f, n in zip(fractions, sizes, strict=True)) / sum(sizes)


def _prime(paths: list[str]) -> float | None:
    """Read the files buffered (untimed) so that their pages are in the page cache."""
    from sllm.io.reader import resident_fraction

    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    fractions = [resident_fraction(p) for p in paths]
    return min(fractions) if all(f is not None for f in fractions) else None


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one method in this process; return ``{"cold": sample|None, "warm": sample|None}``.

    A sample is ``{"seconds", "resident_before", "direct_io", "pool_hit", "via", "extra"}``.
    sllm's warm sample is the reload after ``del`` (the pool takes the buffers back),
    "sllm-reserved"'s the reload after :func:`sllm.release`; a peer's is a second load with
    the page cache hot.
    """
    loader, level = spec["loader"], spec["level"]
    if loader == "raw":
        return _raw_worker(spec)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(spec["device"])
    config = AutoConfig.from_pretrained(spec["config_dir"])
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
    if loader == "touch":  # after the same untimed start-up as a loader's process: as long since start
        return _touch_worker(spec)
    out: dict[str, Any] = {"cold": None, "warm": None}
    sllm = loader.startswith("sllm")
    if sllm:
        from sllm.core import loader as sllm_loader
        from sllm.core.format import open_checkpoint
        from sllm.core.pool import HostMemoryPool, default_idle_capacity

        if loader == "sllm-reserved":
            pool = HostMemoryPool()
            pool.reserve([p.nbytes for p in open_checkpoint(spec["sllm_dir"]).manifest.partitions])
        else:  # a fresh default pool, what a library user gets (also when run in-process)
            pool = HostMemoryPool(idle_capacity_bytes=default_idle_capacity())
        load_fn = sllm_loader.load_model if level == "model" else sllm_loader.load_state_dict

        def fn() -> Any:
            return load_fn(spec["sllm_dir"], str(device), threads=spec["threads"], pool=pool)

        def drop(obj: Any) -> dict[str, Any]:
            r = sllm_loader.report_of(obj)
            if loader == "sllm-reserved":
                sllm_loader.release(obj)
            return {"direct_io": r.direct_io, "pool_hit": r.pool_hit, "via": r.via,
                    "extra": {"read_seconds": r.read_seconds, "build_seconds": r.build_seconds}}  # fmt: skip
    else:
        from sllm.core.bench.methods import method_loader

        fn = method_loader(spec, device)

        def drop(obj: Any) -> dict[str, Any]:
            return {}

    for temp in spec["temps"]:
        if temp == "cold":
            resident = _evict(spec["evict"])
        elif loader == "sllm-page-cache":
            resident = _prime(spec["files"])
        else:
            resident = None
        obj, seconds = _sample(fn, device)
        out[temp] = {"seconds": seconds, "resident_before": resident, "direct_io": None, "extra": {}, **drop(obj)}
        del obj  # sllm: the pool takes the buffers back by itself (no gc.collect needed)
        if not sllm:
            gc.collect()
    return out


def _raw_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Cold: O_DIRECT reads of the partitions into pre-touched buffers after eviction.
    Warm: buffered reads with the page cache hot (primed by an untimed buffered read)."""
    from sllm.core.format import open_checkpoint
    from sllm.io.hostmem import HostBuffer
    from sllm.io.reader import DEFAULT_READ_THREADS, read_whole

    ck = open_checkpoint(spec["sllm_dir"])
    parts = [(ck.partition_path(i), p.nbytes) for i, p in enumerate(ck.manifest.partitions)]
    buffers = [HostBuffer(n) for _, n in parts]  # populated: touched before timing
    threads = spec["threads"] or DEFAULT_READ_THREADS

    def read(direct: bool) -> tuple[float, bool]:
        started = time.perf_counter()
        used = [read_whole(path, buf.memoryview(n), chunk_bytes=ck.manifest.chunk_bytes, threads=threads,
                           direct_io=direct) for (path, n), buf in zip(parts, buffers, strict=True)]  # fmt: skip
        return time.perf_counter() - started, all(used)

    resident = _evict(spec["evict"])
    cold, cold_direct = read(True)
    via = "O_DIRECT" if cold_direct else "buffered"
    out: dict[str, Any] = {"cold": {"seconds": cold, "resident_before": resident, "direct_io": cold_direct,
                                    "via": via, "extra": {}}, "warm": None}  # fmt: skip
    if "warm" in spec["temps"]:
        read(False)  # prime the page cache
        warm, warm_direct = read(False)
        out["warm"] = {"seconds": warm, "resident_before": None, "direct_io": warm_direct, "via": "buffered",
                       "extra": {}}  # fmt: skip
    return out


def _touch_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Cold: new host buffers of the partitions' sizes, in the pages a load's fresh buffers
    get (:func:`sllm.io.hostmem.huge_pages`), every page faulted in by as many threads as
    the loader prefaults with, each faulting its own
    chunks of the manifest's chunk size, as the loader's do; no reads. A fresh process's
    first touch of that much memory, which the raw read (into touched memory) does not pay
    and a loader in a fresh process does."""
    from concurrent.futures import ThreadPoolExecutor

    from sllm.core.format import open_checkpoint
    from sllm.io.hostmem import HostBuffer
    from sllm.io.reader import DEFAULT_PREFAULT_THREADS

    manifest = open_checkpoint(spec["sllm_dir"]).manifest
    step = manifest.chunk_bytes
    started = time.perf_counter()
    buffers = [HostBuffer(p.nbytes, populate=False) for p in manifest.partitions]
    with ThreadPoolExecutor(DEFAULT_PREFAULT_THREADS) as pool:
        list(pool.map(lambda job: job[0].prefault(job[1], job[1] + step),
                      [(b, start) for b in buffers for start in range(0, b.nbytes, step)]))
    seconds = time.perf_counter() - started
    del buffers
    return {"cold": {"seconds": seconds, "resident_before": None, "direct_io": None, "via": "", "extra": {}},
            "warm": None}


def main(argv: list[str]) -> int:
    """``python -m sllm.core.bench.worker SPEC_JSON``: one JSON document on stdout.

    Anything the libraries print goes to stderr: fd 1 is pointed at stderr while the
    worker runs, and the result is written to the original stdout at the end.
    """
    if len(argv) != 1:
        print("usage: python -m sllm.core.bench.worker SPEC_JSON", file=sys.stderr)
        return 2
    result_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        doc = worker_main(json.loads(argv[0]))
        code = 0
    except Exception as exc:  # noqa: BLE001 - reported to the parent as JSON
        doc = {"error": f"{type(exc).__name__}: {exc}"}
        hint = getattr(exc, "hint", None)
        if hint:
            doc["error"] += f" ({hint})"
        code = 1
    sys.stdout.flush()
    os.write(result_fd, (json.dumps(doc) + "\n").encode())
    os.close(result_fd)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
