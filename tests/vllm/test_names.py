"""The stored tensors of an sllm checkpoint under the source checkpoint's names, as views
(sllm.integrations.vllm.names): what ``--load-format sllm`` hands vLLM. No vLLM needed."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from sllm.core.convert import convert
from sllm.core.format import KeyMapping
from sllm.core.loader import load_checkpoint
from sllm.errors import CheckpointError, UsageError
from sllm.integrations.vllm.names import source_weights
from sllm.integrations.vllm.options import LoaderOptions
from sllm.zoo import build_tiny_model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "mixtral", "qwen3-moe"])
def test_source_names_and_bytes_come_back(arch, tmp_path):
    build_tiny_model(arch).save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst")
    source = load_file(tmp_path / "src" / "model.safetensors")
    loaded = load_checkpoint(tmp_path / "dst")
    try:
        mapping = loaded.checkpoint.manifest.key_mapping
        dropped = set(mapping.dropped) if mapping else set()
        got = dict(source_weights(loaded.checkpoint, loaded.state_dict))
        assert set(source) - dropped <= set(got)
        buffers = {b.tensor.untyped_storage().data_ptr() for b in loaded.host_buffers}
        for name, want in source.items():
            if name in dropped:
                continue
            assert got[name].shape == want.shape, name
            assert torch.equal(got[name], want), name
            assert got[name].untyped_storage().data_ptr() in buffers, f"{name} is a copy, not a view"
    finally:
        loaded.release()
    if arch in ("mixtral", "qwen3-moe"):  # the fused expert tensors really were taken apart
        assert any(e["operations"] for e in mapping.tensors.values())


def test_a_conversion_that_cannot_be_undone_is_refused(tmp_path):
    build_tiny_model("llama").save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst")
    loaded = load_checkpoint(tmp_path / "dst")
    try:
        name = "model.layers.0.self_attn.q_proj.weight"
        mapping = KeyMapping(tensors={name: {"sources": ["a.weight", "b.weight"], "operations": ["Concatenate(dim=0)"]}})
        ckpt = dataclasses.replace(loaded.checkpoint, manifest=dataclasses.replace(loaded.checkpoint.manifest,
                                                                                   key_mapping=mapping))
        with pytest.raises(CheckpointError, match=r"q_proj.*Concatenate\(dim=0\)"):
            list(source_weights(ckpt, loaded.state_dict))
    finally:
        loaded.release()


def test_loader_options():
    assert LoaderOptions.parse(None) == LoaderOptions()
    opts = LoaderOptions.parse({"cache_dir": "/c", "remote": "/r", "threads": 2, "verify": True})
    assert (opts.cache_dir, opts.remote, opts.threads, opts.verify) == ("/c", "/r", 2, True)
    for bad, word in [({"cache_dri": "/c"}, "cache_dri"), ({"threads": 0}, "threads"), ({"threads": True}, "threads"),
                      ({"remote": "/r"}, "cache_dir"), ([1], "JSON object")]:
        with pytest.raises(UsageError, match=word):
            LoaderOptions.parse(bad)


@pytest.mark.parametrize("verify", [False, True])
def test_streamed_load_gives_every_tensor_as_a_view_once_its_bytes_are_in(tmp_path, verify):
    from sllm.core.format import open_checkpoint
    from sllm.core.pool import HostMemoryPool
    from sllm.integrations.vllm.stream import StreamedLoad

    build_tiny_model("qwen2").save_pretrained(tmp_path / "src")
    # Small chunks, so that tensors really wait for several chunks each.
    convert(tmp_path / "src", tmp_path / "dst", chunk_bytes=8192, partitions=2)
    ckpt = open_checkpoint(tmp_path / "dst")
    pool = HostMemoryPool()
    load = StreamedLoad(ckpt, pool, threads=3, verify=verify)
    got = {}
    for name, t in load.tensors():
        got[name] = t.clone()  # what a consumer sees at the moment it is handed the tensor
    assert load.report is not None and load.report.nbytes == ckpt.manifest.total_bytes and not load.report.pool_hit
    load.release()
    want = load_checkpoint(tmp_path / "dst")
    try:
        assert set(got) == set(want.state_dict)
        for name, t in want.state_dict.items():
            assert torch.equal(got[name], t), name
    finally:
        want.release()
    again = StreamedLoad(ckpt, pool)  # the pool still holds both partitions: no read
    assert len(list(again.tensors())) == len(got) and again.report.pool_hit
    again.release()


def test_streamed_load_with_verify_refuses_a_flipped_byte(tmp_path):
    from sllm.core.format import open_checkpoint
    from sllm.core.pool import HostMemoryPool
    from sllm.errors import ChecksumMismatch
    from sllm.integrations.vllm.stream import StreamedLoad

    build_tiny_model("gpt2").save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst")
    part = tmp_path / "dst" / "partition-0.bin"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    load = StreamedLoad(open_checkpoint(tmp_path / "dst"), HostMemoryPool(), verify=True)
    with pytest.raises(ChecksumMismatch, match="partition-0.bin: chunk 0"):
        list(load.tensors())
    load.release()
