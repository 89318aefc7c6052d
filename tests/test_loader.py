"""The loader: views over pooled buffers, pool reuse, release, direct I/O fallback, CUDA."""

from __future__ import annotations

import sys

import pytest
import torch

from sllm.core.format import open_checkpoint
from sllm.core.loader import load_checkpoint, load_model, load_state_dict, release, report_of
from sllm.core.pool import HostMemoryPool
from sllm.io.hostmem import HostBuffer
from sllm.io.reader import ParallelRead, chunk_ranges, read_whole

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_page_cache(monkeypatch):
    """Read from storage even where the freshly written test files sit in the page cache."""
    monkeypatch.setenv("SLLM_PAGE_CACHE", "0")


def test_tensors_are_views_of_one_buffer_per_partition(tiny_sllm_gpt2, no_page_cache):
    pool = HostMemoryPool(pinned=False)
    loaded = load_checkpoint(tiny_sllm_gpt2, pool=pool)
    base = {t.untyped_storage().data_ptr() for t in loaded.state_dict.values()}
    assert len(base) == 1  # every tensor views the single partition buffer
    ckpt = open_checkpoint(tiny_sllm_gpt2)
    buf_ptr = loaded.host_buffers[0].tensor.data_ptr()
    for name, entry in ckpt.tensors.items():
        assert loaded.state_dict[name].data_ptr() == buf_ptr + entry.offset
    assert pool.stats().leased_buffers == 1
    loaded.release()
    assert pool.stats().leased_buffers == 0 and pool.stats().free_buffers == 1


def test_pool_reuses_buffers_across_loads(tiny_sllm_gpt2, no_page_cache):
    pool = HostMemoryPool(pinned=False)
    first = load_state_dict(tiny_sllm_gpt2, pool=pool)
    ptr = next(iter(first.values())).untyped_storage().data_ptr()
    copy = {k: v.clone() for k, v in first.items()}
    release(first)
    assert first == {}  # release empties the state dict, so stale views are not used by accident
    second = load_state_dict(tiny_sllm_gpt2, pool=pool)
    assert next(iter(second.values())).untyped_storage().data_ptr() == ptr
    assert all(torch.equal(second[k], v) for k, v in copy.items())
    assert report_of(second).pool_hit  # the bytes were still in the pool: nothing was read
    stats = pool.stats()
    assert (stats.allocations, stats.reuses, stats.hits) == (1, 0, 1)


def test_pool_hit_never_serves_a_changed_file(tiny_sllm_gpt2, no_page_cache, tmp_path):
    import os
    import shutil

    ckpt = shutil.copytree(tiny_sllm_gpt2, tmp_path / "ckpt")
    pool = HostMemoryPool(pinned=False)
    release(load_state_dict(ckpt, pool=pool))
    part = ckpt / "partition-0.bin"
    with open(part, "r+b") as f:  # rewrite one tensor's bytes in place
        f.seek(open_checkpoint(ckpt).tensors["transformer.ln_f.weight"].offset)
        f.write(torch.full((64,), 7.0).numpy().tobytes())
    os.utime(part, ns=(0, part.stat().st_mtime_ns + 10**9))
    sd = load_state_dict(ckpt, pool=pool)
    assert not report_of(sd).pool_hit
    assert torch.equal(sd["transformer.ln_f.weight"], torch.full((64,), 7.0))
    assert pool.stats().reuses == 1


def test_release_model_moves_it_off_the_buffers(tiny_sllm_gpt2, no_page_cache):
    pool = HostMemoryPool(pinned=False)
    model = load_model(tiny_sllm_gpt2, pool=pool)
    report = report_of(model)
    assert report.nbytes == open_checkpoint(tiny_sllm_gpt2).manifest.total_bytes
    assert report.total_seconds >= report.read_seconds > 0 and report.build_seconds > 0
    release(model)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert pool.stats().free_buffers == 1
    release(model)  # a second release is a no-op
    assert pool.stats().free_buffers == 1


def test_pool_capacity_drops_idle_buffers_and_refuses_overcommit():
    from sllm.errors import CacheError

    mib = 1024 * 1024
    pool = HostMemoryPool(capacity_bytes=8 * mib, pinned=False)
    a = pool.acquire(4 * mib)
    pool.release(a)
    b = pool.acquire(6 * mib)  # does not fit beside the idle 4 MiB buffer: that one is dropped
    stats = pool.stats()
    assert stats.free_buffers == 0 and stats.leased_bytes == 6 * mib
    with pytest.raises(CacheError, match="host memory pool"):
        pool.acquire(4 * mib)
    pool.release(b)


def test_parallel_read_in_chunks_matches_file(tmp_path):
    data = torch.randint(0, 256, (3 * 65536 + 4096,), dtype=torch.uint8).numpy().tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    buf = HostBuffer(len(data))
    seen = []
    read = ParallelRead(path, buf.memoryview(len(data)), chunk_bytes=65536, threads=3,
                        on_chunk=lambda i, s, e, v: seen.append((i, s, e, bytes(v[:4]))))
    assert sorted(read) == [0, 1, 2, 3]
    assert bytes(buf.memoryview(len(data))) == data
    assert sorted(seen) == [(i, s, e, data[s : s + 4]) for i, (s, e) in enumerate(chunk_ranges(len(data), 65536))]


def test_direct_io_is_used_or_falls_back(tmp_path):
    data = bytes(range(256)) * 64  # 16 KiB
    path = tmp_path / "blob"
    path.write_bytes(data)
    buf = HostBuffer(len(data))
    read_whole(path, buf.memoryview(len(data)), chunk_bytes=8192, direct_io=True)
    assert bytes(buf.memoryview(len(data))) == data
    # An unaligned view cannot use O_DIRECT: the reader must fall back to buffered reads.
    view = buf.memoryview()[1 : 1 + 8192]
    assert read_whole(path, view, chunk_bytes=8192, direct_io=True) is False
    assert bytes(view) == data[:8192]


def test_short_file_is_truncated_partition(tmp_path):
    from sllm.errors import TruncatedPartition

    path = tmp_path / "blob"
    path.write_bytes(b"x" * 8192)
    buf = HostBuffer(16384)
    with pytest.raises(TruncatedPartition, match="file ended at byte"):
        read_whole(path, buf.memoryview(16384), chunk_bytes=4096, direct_io=False)


def test_verify_passes_on_a_good_checkpoint(tiny_sllm_gpt2):
    sd = load_state_dict(tiny_sllm_gpt2, verify=True, threads=1)
    assert len(sd) == len(open_checkpoint(tiny_sllm_gpt2).tensors)


def test_progress_reaches_total(tiny_sllm_gpt2):
    seen = []
    sd = load_state_dict(tiny_sllm_gpt2, on_progress=lambda d, t: seen.append((d, t)))
    total = open_checkpoint(tiny_sllm_gpt2).manifest.total_bytes
    assert seen[-1] == (total, total)
    release(sd)


def test_cli_import_does_not_import_torch():
    import subprocess

    code = "import sys, sllm.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@cuda
def test_cuda_load_matches_cpu(tiny_sllm_gpt2):
    cpu = load_state_dict(tiny_sllm_gpt2)
    gpu = load_state_dict(tiny_sllm_gpt2, device="cuda:0")
    assert all(t.device.type == "cuda" for t in gpu.values())
    assert all(torch.equal(gpu[k].cpu(), v) for k, v in cpu.items())
    model = load_model(tiny_sllm_gpt2, device="cuda")
    ids = torch.tensor([[1, 2, 3]], device="cuda")
    with torch.no_grad():
        assert model(ids).logits.device.type == "cuda"


@cuda
def test_cuda_pool_is_pinned():
    assert HostMemoryPool().acquire(4096).pinned


def test_tensors_outlive_their_model_and_buffer(tiny_sllm_gpt2):
    """A weight kept after its model is gone stays valid memory (no unmap under it)."""
    import gc

    view = HostBuffer(1 << 22).tensor[:4096]
    gc.collect()
    view.fill_(7)
    assert int(view.sum()) == 7 * 4096
    model = load_model(tiny_sllm_gpt2, pool=HostMemoryPool(pinned=False))
    weight = model.transformer.ln_f.weight.detach()
    expected = weight.clone()
    del model
    gc.collect()
    assert torch.equal(weight, expected)


def test_released_skeleton_is_reused_for_another_checkpoint(models_dir):
    """Release keeps the emptied module tree; a load of the same architecture reuses it,
    and the reused model computes exactly what a freshly built one does."""
    from sllm.core.loader import make_skeleton

    ids = torch.tensor([[464, 2068, 7586, 21831]])
    pool = HostMemoryPool(pinned=False)
    a = load_model(models_dir / "gpt2-a", pool=pool)
    with torch.no_grad():
        logits_a = a(ids).logits.clone()
    release(a)
    b = load_model(models_dir / "gpt2-b", pool=pool)
    assert b is a  # the skeleton came back
    with torch.no_grad():
        logits_b = b(ids).logits
    assert not torch.equal(logits_a, logits_b)
    sd = load_state_dict(models_dir / "gpt2-b", pool=HostMemoryPool(pinned=False))
    fresh = make_skeleton(b.config, torch.float32)
    fresh.load_state_dict(sd, strict=False, assign=True)
    fresh.tie_weights()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids).logits, logits_b)
    release(b)


def test_reused_llama_skeleton_keeps_rope_buffers(tmp_path):
    from transformers import AutoModelForCausalLM

    from sllm.core.convert import convert
    from sllm.zoo import build_random_checkpoint

    src = build_random_checkpoint("llama-tiny", tmp_path / "hf")
    convert(src, tmp_path / "sllm")
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    expected = AutoModelForCausalLM.from_pretrained(src)(ids).logits
    for _ in range(2):  # the second load reuses the released skeleton
        model = load_model(tmp_path / "sllm")
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)
        release(model)
