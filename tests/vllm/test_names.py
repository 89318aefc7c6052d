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
