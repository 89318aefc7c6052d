"""vLLM's parameter layout (sllm.integrations.vllm.layout) without vLLM: tensors written as an
sllm checkpoint, keyed, checked, aliased as views and trimmed once the model drops some."""

from __future__ import annotations

import pytest
import torch

from sllm.core.convert import write_tensors
from sllm.core.format import open_checkpoint
from sllm.core.loader import load_checkpoint
from sllm.core.pool import HostMemoryPool
from sllm.errors import CheckpointError, UsageError
from sllm.integrations.vllm.layout import alias, layout_key, model_tensors, open_layout, trim, unusable
from sllm.integrations.vllm.stream import StreamedLoad


class Tiny(torch.nn.Module):
    """Three linear-sized weights (256 KiB each: many pages), a bias and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(64, 1024), requires_grad=False)
        self.b = torch.nn.Parameter(torch.randn(64, 1024), requires_grad=False)
        self.c = torch.nn.Parameter(torch.randn(64, 1024), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16), requires_grad=False)
        self.register_buffer("steps", torch.arange(5, dtype=torch.int64))


def test_write_tensors_round_trips_names_dtypes_and_strided_input(tmp_path):
    src = {"w.t": torch.randn(3, 5).t(), "n": torch.arange(7, dtype=torch.int64), "h": torch.randn(4, dtype=torch.bfloat16)}
    write_tensors(src, tmp_path / "x", model_id="k")
    ckpt = open_checkpoint(tmp_path / "x")
    assert ckpt.tensors["w.t"].shape == (5, 3) and ckpt.tensors["w.t"].stride == (3, 1)
    assert all(e.offset % 4096 == 0 for e in ckpt.tensors.values())
    loaded = load_checkpoint(tmp_path / "x")
    try:
        for name, t in src.items():
            assert torch.equal(loaded.state_dict[name], t), name
    finally:
        loaded.release()
    seen = []
    write_tensors(src, tmp_path / "z", model_id="k", on_written=lambda: seen.append((tmp_path / "z").exists()))
    assert seen == [False] and open_checkpoint(tmp_path / "z").tensors.keys() == src.keys()  # before the rename
    with pytest.raises(UsageError, match="complex64"):
        write_tensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "y", model_id="k")
    assert not (tmp_path / "y").exists()


def test_layout_key_names_the_model_its_rank_and_vllms_version(tmp_path):
    model = Tiny()
    write_tensors(model_tensors(model), tmp_path / "ck", model_id="m")
    ckpt = open_checkpoint(tmp_path / "ck")
    tensors = model_tensors(model)
    key = layout_key(ckpt, tensors, vllm_version="0.32.0")
    assert key == layout_key(ckpt, tensors, vllm_version="0.32.0") and len(key) == 32
    assert key != layout_key(ckpt, tensors, vllm_version="0.33.0")
    assert key != layout_key(ckpt, tensors, vllm_version="0.32.0", tp=(1, 2))
    assert key != layout_key(ckpt, tensors, vllm_version="0.32.0", pp=(0, 2))
    other = dict(tensors, a=torch.zeros(32, 1024))
    assert key != layout_key(ckpt, other, vllm_version="0.32.0")
    assert unusable(tensors, None) is None
    assert "quantization" in unusable(tensors, "fp8")
    assert "complex" in unusable(dict(tensors, z=torch.zeros(1, dtype=torch.complex64)), None)


def test_open_layout_refuses_a_layout_that_is_not_the_models(tmp_path):
    model = Tiny()
    tensors = model_tensors(model)
    assert open_layout(tmp_path / "none", tensors) is None
    write_tensors(tensors, tmp_path / "ok", model_id="m")
    assert set(open_layout(tmp_path / "ok", tensors).tensors) == set(tensors)
    with pytest.raises(CheckpointError, match="not the model's") as exc:
        open_layout(tmp_path / "ok", dict(tensors, extra=torch.zeros(1)))
    assert str(tmp_path / "ok") in str(exc.value)
    with pytest.raises(CheckpointError, match="'a' is float32 \\[64, 1024\\] in the layout"):
        open_layout(tmp_path / "ok", dict(tensors, a=torch.zeros(32, 1024)))


def _aliased(tmp_path, pool):
    src = Tiny()
    write_tensors(model_tensors(src), tmp_path / "layout", model_id="m")
    (tmp_path / "layout" / "partition-0.bin").read_bytes()  # in the page cache
    model = Tiny()  # other random values: the aliasing must bring src's
    tensors = model_tensors(model)
    load = StreamedLoad(open_layout(tmp_path / "layout", tensors), pool)
    assert alias(tensors, load.tensors()) == 5
    for name, t in model_tensors(src).items():
        assert torch.equal(getattr(model, name), t), name
    return src, model, load


def test_aliased_parameters_are_views_of_the_read_buffer_and_trim_frees_what_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setenv("SLLM_PAGE_CACHE", "0")  # read into a buffer of our own (not mapped from the page cache)
    pool = HostMemoryPool()
    src, model, load = _aliased(tmp_path, pool)
    (buf,) = load.leases
    base = buf.tensor.data_ptr()
    assert all(base <= t.data_ptr() < base + buf.nbytes for t in model_tensors(model).values())
    # vLLM repacks a linear weight into memory of its own and drops the parameter
    model.b = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    (result,) = trim(load.leases, model)
    assert not result.skipped
    assert result.freed_bytes >= 64 * 1024 * 4 - 4096 and result.freed_bytes % 4096 == 0
    assert result.live_bytes == 2 * 64 * 1024 * 4 + 64 * 2 + 5 * 8
    for name in ("a", "c", "bias", "steps"):  # what is still viewed keeps its bytes
        assert torch.equal(getattr(model, name), getattr(src, name)), name
    b_offset = load.ckpt.tensors["b"].offset
    assert int(buf.tensor[b_offset + 4096 : b_offset + 8192].count_nonzero()) == 0  # given back (reads zero)


def test_trim_leaves_a_buffer_whole_while_something_outside_the_model_views_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLLM_PAGE_CACHE", "0")
    src, model, load = _aliased(tmp_path, HostMemoryPool())
    kept = model.b.detach()  # a kernel that keeps a weight of its own
    model.b = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    (result,) = trim(load.leases, model)
    assert result.skipped and result.freed_bytes == 0
    assert torch.equal(kept, src.b)  # its bytes are still there


def test_a_layout_in_the_page_cache_is_mapped_not_read_and_never_trimmed(tmp_path):
    src, model, load = _aliased(tmp_path, HostMemoryPool())
    (buf,) = load.leases
    assert buf.file_backed and load.report.direct_io is False
    model.b = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    (result,) = trim(load.leases, model)
    assert result.skipped == "file-backed" and result.freed_bytes == 0
    model.a.add_(1)  # a private mapping: the file keeps its bytes
    again = load_checkpoint(tmp_path / "layout")
    try:
        assert torch.equal(again.state_dict["a"], src.a)
    finally:
        again.release()
