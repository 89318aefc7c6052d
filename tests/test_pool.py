"""The host memory pool and the life of a load: atomic capacity, buffers coming back when a
model is dropped (reference cycles included), the idle cap, page-cache mapping, the
prefault pipeline, and thread-safe skeleton builds."""

from __future__ import annotations

import gc
import os
import shutil
import threading

import pytest
import torch

from sllm.core.format import open_checkpoint
from sllm.core.loader import load_model, load_state_dict, release, report_of
from sllm.core.pool import HostMemoryPool, default_idle_capacity, parse_size
from sllm.errors import CacheError, UsageError
from sllm.io.hostmem import HostBuffer
from sllm.io.reader import ParallelRead, evict_page_cache, resident_fraction

MiB = 1024 * 1024


@pytest.fixture
def no_page_cache(monkeypatch):
    monkeypatch.setenv("SLLM_PAGE_CACHE", "0")


class _SlowBuffer(HostBuffer):
    """A buffer whose allocation takes a while with the GIL released, as a large populated
    one does (the window in which a non-atomic acquire lets others past the capacity check)."""

    def __init__(self, *args, **kwargs) -> None:
        import time

        time.sleep(0.02)
        super().__init__(*args, **kwargs)


def test_concurrent_acquires_never_exceed_the_capacity(monkeypatch):
    import sllm.core.pool as pool_module

    monkeypatch.setattr(pool_module, "HostBuffer", _SlowBuffer)
    pool = HostMemoryPool(capacity_bytes=8 * MiB, pinned=False)
    start = threading.Barrier(8)
    got, refused = [], []
    lock = threading.Lock()

    def one() -> None:
        start.wait()
        try:
            buf = pool.acquire(2 * MiB)
        except CacheError:
            with lock:
                refused.append(1)
            return
        with lock:
            got.append(buf)

    for _ in range(5):  # several rounds: the race, when there is one, shows within a few
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(got) == 4 and len(refused) == 4
        assert pool.stats().leased_bytes == sum(b.nbytes for b in got) == 8 * MiB
        for b in got:
            pool.release(b)
        pool.clear()
        got.clear()
        refused.clear()


def test_a_lease_is_charged_what_is_handed_out():
    pool = HostMemoryPool(capacity_bytes=12 * MiB, pinned=False)
    big = pool.acquire(6 * MiB)
    pool.release(big)
    small = pool.acquire(4 * MiB)  # best fit hands the idle 6 MiB buffer out for a 4 MiB request
    assert small is big and pool.stats().leased_bytes == 6 * MiB
    with pytest.raises(CacheError):
        pool.acquire(8 * MiB)  # 6 + 8 > 12: charged 6, not the 4 asked for
    pool.release(small)
    exact = pool.acquire(4 * MiB, exact=True)  # exact: never a larger idle buffer
    assert exact.nbytes == 4 * MiB and exact is not big


def test_idle_capacity_drops_the_least_recently_released():
    pool = HostMemoryPool(pinned=False, idle_capacity_bytes=6 * MiB)
    a, b, c = (pool.acquire(2 * MiB, tag=None) for _ in range(3))
    for i, buf in enumerate((a, b, c)):
        buf.tag = i
        pool.release(buf)
    d = pool.acquire(2 * MiB)
    d.tag = 3
    pool.release(d)  # 8 MiB idle > 6: the first released (a) goes
    stats = pool.stats()
    assert stats.free_bytes == 6 * MiB
    assert pool.take(0) is None and pool.take(3) is d


def test_pool_capacity_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLLM_POOL_CAPACITY", "3GiB")
    assert default_idle_capacity() == 3 * 2**30
    monkeypatch.setenv("SLLM_POOL_CAPACITY", "0")
    assert default_idle_capacity() == 0
    monkeypatch.setenv("SLLM_POOL_CAPACITY", "lots")
    with pytest.raises(UsageError, match="SLLM_POOL_CAPACITY"):
        default_idle_capacity()
    assert parse_size("1.5GB", "x") == 1_500_000_000
    monkeypatch.delenv("SLLM_POOL_CAPACITY")
    assert 0 < default_idle_capacity() <= 4 * 2**30


def test_del_model_gives_its_buffers_back(tiny_sllm_gpt2, no_page_cache):
    pool = HostMemoryPool(pinned=False)
    model = load_model(tiny_sllm_gpt2, pool=pool)
    expected = model.transformer.ln_f.weight.detach().clone()
    del model  # no sllm.release
    again = load_model(tiny_sllm_gpt2, pool=pool)
    assert report_of(again).pool_hit
    assert torch.equal(again.transformer.ln_f.weight, expected)
    stats = pool.stats()
    assert (stats.allocations, stats.hits, stats.reclaimed) == (1, 1, 1)


def test_del_model_in_a_reference_cycle_gives_its_buffers_back(tiny_sllm_gpt2, no_page_cache):
    pool = HostMemoryPool(pinned=False)
    gc.disable()  # the cycle must still be there when the reload asks
    try:
        model = load_model(tiny_sllm_gpt2, pool=pool)
        model.me = model  # a reference cycle: refcounting alone never frees it
        del model
        again = load_model(tiny_sllm_gpt2, pool=pool)
    finally:
        gc.enable()
    assert report_of(again).pool_hit
    assert pool.stats().allocations == 1


def test_a_kept_weight_is_never_overwritten_by_the_next_load(models_dir, no_page_cache):
    pool = HostMemoryPool(pinned=False)
    sd = load_state_dict(models_dir / "gpt2-a", pool=pool)
    kept = sd["transformer.ln_f.weight"]
    expected = kept.clone()
    del sd
    gc.collect()
    other = load_state_dict(models_dir / "gpt2-b", pool=pool)  # same size: would reuse a's buffer
    assert not report_of(other).pool_hit
    assert torch.equal(kept, expected)
    assert pool.stats().allocations == 2  # a's buffer stayed out of the pool while viewed
    del kept
    release(other)
    assert pool.stats().free_buffers == 2  # now both are idle


def test_resident_checkpoint_is_mapped_from_the_page_cache(tiny_sllm_gpt2, tmp_path):
    ckpt = shutil.copytree(tiny_sllm_gpt2, tmp_path / "ckpt")
    part = ckpt / "partition-0.bin"
    part.read_bytes()  # resident
    assert resident_fraction(part) == 1.0
    reference = load_state_dict(ckpt, pool=HostMemoryPool(pinned=False), direct_io=True)
    assert report_of(reference).via == "O_DIRECT"
    pool = HostMemoryPool(pinned=False)
    sd = load_state_dict(ckpt, pool=pool, verify=True)
    assert report_of(sd).via == "page-cache" and pool.stats().allocations == 0
    assert all(torch.equal(sd[k], v) for k, v in reference.items())
    sd["transformer.ln_f.weight"].fill_(3.0)  # copy-on-write: the file is untouched
    assert torch.equal(load_state_dict(ckpt, direct_io=True)["transformer.ln_f.weight"],
                       reference["transformer.ln_f.weight"])  # fmt: skip
    release(sd)
    again = load_state_dict(ckpt, pool=pool)
    assert report_of(again).pool_hit
    with open(part, "rb") as f:
        os.fdatasync(f.fileno())
    evict_page_cache(part)
    if (resident_fraction(part) or 0) < 0.5:  # eviction works on this filesystem
        cold = load_state_dict(ckpt, pool=HostMemoryPool(pinned=False))
        assert report_of(cold).via in ("O_DIRECT", "buffered")


def test_prefault_runs_ahead_of_each_chunk_read(tmp_path):
    data = torch.randint(0, 256, (5 * 65536,), dtype=torch.uint8).numpy().tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    buf = HostBuffer(len(data), populate=False)
    assert not buf.faulted
    faulted: list[tuple[int, int]] = []
    order: list[tuple[str, int]] = []

    def prefault(start: int, end: int) -> None:
        buf.prefault(start, end)
        faulted.append((start, end))
        order.append(("fault", start))

    read = ParallelRead(path, buf.memoryview(len(data)), chunk_bytes=65536, threads=3, prefault=prefault,
                        on_chunk=lambda i, s, e, v: order.append(("read", s)))  # fmt: skip
    assert sorted(read) == list(range(5))
    assert sorted(faulted) == read.ranges  # every chunk once
    for start, _ in read.ranges:
        assert order.index(("fault", start)) < order.index(("read", start))
    assert bytes(buf.memoryview(len(data))) == data


def test_overlapping_loads_in_threads_leave_no_meta_parameters(models_dir, no_page_cache):
    original = torch.nn.Module.register_parameter
    stop = threading.Event()
    leaked: list[str] = []

    def build_modules() -> None:  # another thread creating modules while skeletons are built
        while not stop.is_set():
            layer = torch.nn.Linear(8, 8)
            if layer.weight.device.type == "meta":
                leaked.append("meta weight in another thread")

    errors: list[BaseException] = []
    models = []

    def load(name: str) -> None:
        try:
            for _ in range(3):
                m = load_model(models_dir / name, pool=HostMemoryPool(pinned=False))
                models.append(m)
                assert not [n for n, p in m.named_parameters() if p.device.type == "meta"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    watcher = threading.Thread(target=build_modules)
    watcher.start()
    loaders = [threading.Thread(target=load, args=(n,)) for n in ("gpt2-a", "gpt2-b", "gpt2-a", "gpt2-b")]
    for t in loaders:
        t.start()
    for t in loaders:
        t.join(timeout=300)
    stop.set()
    watcher.join(timeout=60)
    assert not errors, errors
    assert not leaked
    assert torch.nn.Module.register_parameter is original  # the hook is not left installed
    assert len(models) == 12
    ids = torch.tensor([[1, 2, 3]])
    ref = load_model(models_dir / "gpt2-a", pool=HostMemoryPool(pinned=False))
    with torch.no_grad():
        expected = ref(ids).logits
        assert any(torch.equal(m(ids).logits, expected) for m in models)


def test_reserve_async_faults_buffers_in_the_background():
    pool = HostMemoryPool(pinned=False)
    fut = pool.reserve_async([4 * MiB, 2 * MiB])
    fut.result(timeout=60)
    stats = pool.stats()
    assert stats.free_buffers == 2 and stats.free_bytes == 6 * MiB
    buf = pool.acquire(4 * MiB)
    assert buf.faulted
    failing = HostMemoryPool(capacity_bytes=2 * MiB, pinned=False).reserve_async([4 * MiB])
    with pytest.raises(CacheError):
        failing.result(timeout=60)


def test_loads_still_valid_after_checkpoint_open(tiny_sllm_gpt2):
    """A load through the default pool, then its release, leaves the pool consistent."""
    sd = load_state_dict(tiny_sllm_gpt2)
    assert len(sd) == len(open_checkpoint(tiny_sllm_gpt2).tensors)
    release(sd)


def test_reservation_plan_for_a_budget(models_dir):
    from sllm.core.loader import reservation_for
    from sllm.core.pool import plan_reservation
    from sllm.io.hostmem import round_up

    # rounded to 2 MiB: 10 + 2 for the largest, then 6 does not fit in 16, 4 does
    assert plan_reservation([[3 * MiB], [9 * MiB, 1 * MiB], [5 * MiB]], 16 * MiB) == [9 * MiB, 1 * MiB, 3 * MiB]
    assert plan_reservation([[64 * MiB]], 16 * MiB) == []
    assert plan_reservation([[3 * MiB], [9 * MiB, 1 * MiB], [5 * MiB]], 1 << 40, max_models=1) == [9 * MiB, 1 * MiB]
    sizes = reservation_for([models_dir / "gpt2-a", models_dir / "gpt2-b", models_dir / "missing"], 1 << 40)
    one = open_checkpoint(models_dir / "gpt2-a").manifest.partitions[0].nbytes
    assert sizes == [one, one]
    pool = HostMemoryPool(pinned=False)
    pool.reserve_async(lambda: reservation_for([models_dir / "gpt2-a"], round_up(one))).result(timeout=60)
    assert pool.stats().free_bytes == round_up(one)


def test_without_a_budget_the_reservation_is_the_largest_model_that_fits_half_the_available_memory(
    tiny_hf_gpt2, tmp_path, monkeypatch
):
    from types import SimpleNamespace

    import psutil

    from sllm.core.convert import convert
    from sllm.core.loader import reservation_for

    convert(tiny_hf_gpt2, tmp_path / "fp32")
    convert(tiny_hf_gpt2, tmp_path / "fp16", dtype="float16")
    fp32, fp16 = (open_checkpoint(tmp_path / d).manifest.partitions[0].nbytes for d in ("fp32", "fp16"))
    assert fp16 < fp32
    dirs = [tmp_path / "fp16", tmp_path / "fp32", tmp_path / "missing"]
    assert reservation_for(dirs, None) == [fp32]  # one model, the largest, not both
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=2 * fp32 - 1))
    assert reservation_for(dirs, None) == [fp16]  # the largest that fits half the available memory
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=fp16))
    assert reservation_for(dirs, None) == []
