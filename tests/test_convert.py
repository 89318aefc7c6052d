"""sllm convert + loader round trips on real transformers checkpoints (tiny GPT-2, random weights)."""

from __future__ import annotations

import json

import pytest
import torch

from sllm.core.convert import convert, split_balanced
from sllm.core.format import open_checkpoint
from sllm.core.loader import load_model, load_state_dict, release
from sllm.zoo import TINY_GPT2, build_random_checkpoint


def _reference_state_dict(src):
    """The source checkpoint's tensors, read with the libraries users have."""
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            out.update(load_file(f))
        return out
    out = {}
    for f in sorted(src.glob("pytorch_model*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


LAYOUTS = {
    "safetensors": dict(safe_serialization=True),
    "safetensors-sharded": dict(safe_serialization=True, max_shard_size="150KB"),
    "bin": dict(safe_serialization=False),
    "bin-sharded": dict(safe_serialization=False, max_shard_size="150KB"),
}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_is_bit_exact(tmp_path, dtype, layout):
    src = build_random_checkpoint("gpt2", tmp_path / "hf", dtype=dtype, **LAYOUTS[layout], **TINY_GPT2)
    if "sharded" in layout:
        assert len(list(src.glob("*.safetensors")) + list(src.glob("pytorch_model-*.bin"))) > 1
    result = convert(src, tmp_path / "sllm")
    ref = _reference_state_dict(src)
    sd = load_state_dict(result.path)
    # save_pretrained leaves the tied lm_head out; the sllm index names it, sharing wte's bytes.
    assert set(sd) == set(ref) | {"lm_head.weight"}
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    for name, tensor in ref.items():
        assert sd[name].dtype == tensor.dtype, name
        assert sd[name].shape == tensor.shape, name
        assert torch.equal(sd[name], tensor), name
    assert result.dtype == dtype
    release(sd)


def test_tied_embeddings_are_stored_once(tmp_path):
    src = build_random_checkpoint("gpt2", tmp_path / "hf", safe_serialization=False, **TINY_GPT2)
    result = convert(src, tmp_path / "sllm")
    index = json.loads((tmp_path / "sllm" / "tensor_index.json").read_text())["tensors"]
    assert index["lm_head.weight"] == index["transformer.wte.weight"]
    wte = index["transformer.wte.weight"]
    primaries = {(e["partition"], e["offset"]): e["nbytes"] for e in index.values()}
    # Stored once: the partition holds each distinct entry once, so the tied pair costs its bytes once.
    assert sum(-(-n // 4096) * 4096 for n in primaries.values()) == result.nbytes
    assert wte["nbytes"] == 50257 * 64 * 4
    sd = load_state_dict(result.path)
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    model = load_model(result.path)
    assert model.lm_head.weight is model.transformer.wte.weight
    release(model)


def test_logits_equal_from_pretrained(tiny_hf_gpt2, tiny_sllm_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_sllm_gpt2)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    assert ids.shape[1] == 10  # the real GPT-2 BPE
    reference = AutoModelForCausalLM.from_pretrained(tiny_hf_gpt2).eval()
    model = load_model(tiny_sllm_gpt2)
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    release(model)


@pytest.mark.parametrize("arch", ["llama-tiny", "opt-tiny"])
def test_other_architectures_match_from_pretrained(tmp_path, arch):
    """Llama's RoPE inv_freq is a non-persistent buffer: the skeleton must still compute it."""
    from transformers import AutoModelForCausalLM

    src = build_random_checkpoint(arch, tmp_path / "hf", dtype="bfloat16")
    convert(src, tmp_path / "sllm")
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    model = load_model(tmp_path / "sllm")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, AutoModelForCausalLM.from_pretrained(src)(ids).logits)
    release(model)


def test_dtype_cast(tiny_hf_gpt2, tmp_path):
    result = convert(tiny_hf_gpt2, tmp_path / "fp16", dtype="float16")
    ref = _reference_state_dict(tiny_hf_gpt2)
    sd = load_state_dict(result.path)
    assert result.dtype == "float16"
    assert all(torch.equal(sd[n], t.to(torch.float16)) for n, t in ref.items())


def test_partitions_balanced_and_load_back(tmp_path):
    # Layers outweigh the embeddings here, so a split within 10 % exists.
    src = build_random_checkpoint("gpt2", tmp_path / "hf", n_layer=8, n_embd=128, n_head=4, vocab_size=1000)
    result = convert(src, tmp_path / "sllm", partitions=2)
    a, b = result.partitions
    assert abs(a - b) / max(a, b) <= 0.10
    ckpt = open_checkpoint(result.path)
    assert [p.file for p in ckpt.manifest.partitions] == ["partition-0.bin", "partition-1.bin"]
    # Layer order kept: every layer of partition 0 comes before every layer of partition 1.
    layers = {int(n.split(".")[2]): e.partition for n, e in ckpt.tensors.items() if n.startswith("transformer.h.")}
    assert [layers[i] for i in sorted(layers)] == sorted(layers[i] for i in sorted(layers))
    ref = _reference_state_dict(src)
    sd = load_state_dict(result.path)
    assert all(torch.equal(sd[n], t) for n, t in ref.items())
    single = convert(src, tmp_path / "one")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(load_model(result.path)(ids).logits, load_model(single.path)(ids).logits)


def test_split_balanced_keeps_order_and_fills_groups():
    assert split_balanced([10, 10, 10, 10], 2) == [0, 0, 1, 1]
    assert split_balanced([1, 1, 1], 3) == [0, 1, 2]
    assert split_balanced([100, 1, 1, 1], 2) == [0, 1, 1, 1]


def test_layout_is_aligned_and_manifest_complete(tiny_hf_gpt2, tiny_sllm_gpt2):
    ckpt = open_checkpoint(tiny_sllm_gpt2)
    m = ckpt.manifest
    assert m.alignment == 4096
    assert all(e.offset % 4096 == 0 for e in ckpt.tensors.values())
    assert m.partitions[0].nbytes == (tiny_sllm_gpt2 / "partition-0.bin").stat().st_size
    assert m.sources[0].file == "model.safetensors"
    import hashlib

    assert m.sources[0].sha256 == hashlib.sha256((tiny_hf_gpt2 / "model.safetensors").read_bytes()).hexdigest()
    data = (tiny_sllm_gpt2 / "partition-0.bin").read_bytes()
    assert hashlib.sha256(data[: m.chunk_bytes]).hexdigest() == m.partitions[0].chunks[0]
    for name in ("config.json", "tokenizer.json", "vocab.json", "merges.txt", "generation_config.json"):
        assert (tiny_sllm_gpt2 / name).is_file() and name in m.files


def test_dst_exists_needs_force(tiny_hf_gpt2, tmp_path):
    from sllm.errors import DestinationExists

    dst = tmp_path / "out"
    convert(tiny_hf_gpt2, dst)
    before = (dst / "sllm.json").read_bytes()
    with pytest.raises(DestinationExists):
        convert(tiny_hf_gpt2, dst)
    assert (dst / "sllm.json").read_bytes() == before
    convert(tiny_hf_gpt2, dst, force=True, dtype="float16")
    assert open_checkpoint(dst).manifest.dtype == "float16"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left
