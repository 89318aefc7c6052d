"""The architecture matrix: every layout ``from_pretrained`` loads, converted and loaded by sllm.

Each model family is built from a tiny config (2 layers, 32 wide, random weights), saved by
``save_pretrained`` and, for GPT-2, OPT and BERT, also in the layouts their hub checkpoints
use. ``sllm.convert`` + ``sllm.load_model`` must give logits (BERT: hidden states) equal to
``from_pretrained``'s (``torch.equal``) and to the original model's, in float32 and bfloat16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sllm
from sllm.core.format import open_checkpoint
from sllm.zoo import TINY_ARCHITECTURES, build_tiny_model

IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 64, 127]])


def _save(state_dict: dict[str, torch.Tensor], config, dst: Path, fmt: str = "safetensors") -> Path:
    """Write ``state_dict`` and ``config`` as a Hugging Face model directory."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    config.save_pretrained(dst)
    if fmt == "safetensors":
        save_file({k: v.clone().contiguous() for k, v in state_dict.items()}, dst / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        torch.save(state_dict, dst / "pytorch_model.bin")
    return dst


def _gpt2_hub(model, dst: Path, buffers: bool) -> Path:
    """openai-community/gpt2's layout: GPT2Model keys (no ``transformer.``), no lm_head, and
    (``buffers``) the legacy causal-mask buffers ``attn.bias`` / ``attn.masked_bias``, as .bin."""
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    if buffers:
        n = model.config.n_positions
        dtype = model.dtype
        for i in range(model.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=dtype)).view(1, 1, n, n)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4, dtype=dtype)
    return _save(sd, model.config, dst, "bin" if buffers else "safetensors")


def _opt_hub(model, dst: Path) -> Path:
    """facebook/opt-*'s layout: ``decoder.*`` keys without ``model.``, no lm_head."""
    sd = {k.removeprefix("model."): v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    return _save(sd, model.config, dst)


def _bert_hub(model, dst: Path, prefixed: bool) -> Path:
    """BERT as the hub publishes it: legacy LayerNorm ``gamma``/``beta`` names, the old
    ``embeddings.position_ids`` buffer, and either ``bert.``-prefixed keys beside the
    pre-training heads (``cls.*``, as bert-base-uncased) or bare BertModel keys."""
    sd = {}
    for k, v in model.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        sd[("bert." if prefixed else "") + k] = v
    n = model.config.max_position_embeddings
    sd[("bert." if prefixed else "") + "embeddings.position_ids"] = torch.arange(n).view(1, n)
    if prefixed:
        h, dtype = model.config.hidden_size, model.dtype
        g = torch.Generator().manual_seed(1)
        sd["cls.predictions.transform.dense.weight"] = torch.randn(h, h, generator=g).to(dtype)
        sd["cls.predictions.transform.LayerNorm.gamma"] = torch.ones(h, dtype=dtype)
        sd["cls.predictions.bias"] = torch.zeros(model.config.vocab_size, dtype=dtype)
        sd["cls.seq_relationship.weight"] = torch.randn(2, h, generator=g).to(dtype)
    return _save(sd, model.config, dst)


def _lm_head_only(model, dst: Path) -> Path:
    """A tied model saved with the output half of the pair instead of the input embedding:
    from_pretrained ties symmetrically, so the embedding comes from ``lm_head.weight``."""
    sd = dict(model.state_dict())
    sd["lm_head.weight"] = sd.pop("model.embed_tokens.weight")
    return _save(sd, model.config, dst)


#: layout name -> (architecture, writer(model, dst) -> source dir)
LAYOUTS = {
    **{arch: (arch, lambda m, d: (m.save_pretrained(d), d)[1]) for arch in TINY_ARCHITECTURES},
    "mixtral-sharded": ("mixtral", lambda m, d: (m.save_pretrained(d, max_shard_size="40KB"), d)[1]),
    "gpt2-hub": ("gpt2", lambda m, d: _gpt2_hub(m, d, buffers=False)),
    "gpt2-hub-buffers": ("gpt2", lambda m, d: _gpt2_hub(m, d, buffers=True)),
    "opt-hub": ("opt", _opt_hub),
    "bert-hub": ("bert", lambda m, d: _bert_hub(m, d, prefixed=False)),
    "bert-hub-prefixed": ("bert", lambda m, d: _bert_hub(m, d, prefixed=True)),
    "gemma-lm-head-only": ("gemma", _lm_head_only),
}


def _output(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(layout, dtype) -> (source dir, sllm dir, the original model's output); built once."""
    cache: dict[tuple[str, str], tuple[Path, Path, torch.Tensor]] = {}
    root = tmp_path_factory.mktemp("arch")

    def get(layout: str, dtype: str) -> tuple[Path, Path, torch.Tensor]:
        if (layout, dtype) not in cache:
            arch, write = LAYOUTS[layout]
            model = build_tiny_model(arch, dtype=dtype)
            src = write(model, root / f"{layout}-{dtype}")
            dst = root / f"{layout}-{dtype}-sllm"
            sllm.convert(src, dst)
            cache[layout, dtype] = (src, dst, _output(model))
        return cache[layout, dtype]

    return get


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_output_equals_from_pretrained(converted, layout, dtype):
    import transformers

    src, dst, original = converted(layout, dtype)
    cls = getattr(transformers, TINY_ARCHITECTURES[LAYOUTS[layout][0]][2])
    reference, info = cls.from_pretrained(src, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]  # the layout is one from_pretrained loads whole
    model = sllm.load_model(dst)
    try:
        out = _output(model)
        assert out.dtype == getattr(torch, dtype)
        assert torch.equal(out, _output(reference))
        assert torch.equal(out, original)
        # The stored tensors are the runtime parameters: every weight views the one partition buffer.
        bases = {p.untyped_storage().data_ptr() for p in model.parameters()}
        assert len(bases) == 1
    finally:
        sllm.release(model)


def test_moe_experts_are_fused_at_convert_time(converted):
    src, dst, _ = converted("mixtral", "float32")
    with open(src / "model.safetensors", "rb") as f:
        header = f.read(8 + int.from_bytes(f.read(8), "little"))
    assert b"model.layers.0.block_sparse_moe.experts.3.w1.weight" in header  # save_pretrained's per-expert layout
    ckpt = open_checkpoint(dst)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert ckpt.tensors[name].shape == (4, 2 * 64, 32)  # (experts, gate+up, hidden)
    assert not any("block_sparse_moe" in n for n in ckpt.tensors)
    km = ckpt.manifest.key_mapping
    assert km.model_class == "MixtralForCausalLM" and km.rules.startswith("transformers 5")
    assert km.tensors[name] == {
        "sources": [f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w3") for e in range(4)],
        "operations": ["MergeModulelist(dim=0)", "Concatenate(dim=1)"],
    }
    assert km.source_names("model.layers.1.mlp.gate.weight") == ["model.layers.1.block_sparse_moe.gate.weight"]
    assert km.source_names("model.norm.weight") == ["model.norm.weight"]
    # Stored bytes are the fused tensor: expert 2's up projection is rows 64..127 of expert 2.
    from safetensors import safe_open

    sd = sllm.load_state_dict(dst)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        w3 = f.get_tensor("model.layers.0.block_sparse_moe.experts.2.w3.weight")
    assert torch.equal(sd[name][2, 64:], w3)
    sllm.release(sd)


def test_hub_layouts_record_what_was_mapped(converted):
    _, gpt2, _ = converted("gpt2-hub-buffers", "float32")
    km = open_checkpoint(gpt2).manifest.key_mapping
    assert km.source_names("transformer.h.1.mlp.c_fc.weight") == ["h.1.mlp.c_fc.weight"]
    assert km.tensors["transformer.h.1.mlp.c_fc.weight"]["operations"] == []
    assert km.dropped["h.0.attn.bias"].startswith("ignored")  # GPT2's _keys_to_ignore_on_load_unexpected
    assert km.dropped["h.1.attn.masked_bias"].startswith("not a weight of GPT2LMHeadModel")  # dropped with a warning
    assert km.shared == {"lm_head.weight": "transformer.wte.weight"}  # not in the source: tied
    _, bert, _ = converted("bert-hub-prefixed", "float32")
    km = open_checkpoint(bert).manifest.key_mapping
    assert km.source_names("embeddings.LayerNorm.weight") == ["bert.embeddings.LayerNorm.gamma"]
    assert km.dropped["bert.embeddings.position_ids"].startswith("ignored")
    assert km.dropped["cls.seq_relationship.weight"].startswith("not a weight of BertModel")
    manifest = json.loads((bert / "sllm.json").read_text())
    assert manifest["format_version"] == 2 and "key_mapping" in manifest


def test_missing_weight_is_refused(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    from sllm.errors import MissingWeights

    src, _, _ = converted("llama", "float32")
    bad = tmp_path / "src"
    bad.mkdir()
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, bad / "model.safetensors")
    from transformers import LlamaForCausalLM

    _, info = LlamaForCausalLM.from_pretrained(bad, output_loading_info=True)
    assert info["missing_keys"] == {"model.layers.1.mlp.down_proj.weight"}  # from_pretrained: random init
    with pytest.raises(MissingWeights, match=r"1 weight\(s\) of LlamaForCausalLM randomly initialised: "
                                             r"'model.layers.1.mlp.down_proj.weight'$"):
        sllm.convert(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_wrong_shape_is_refused(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    from sllm.errors import ShapeMismatch

    src, _, _ = converted("qwen2", "float32")
    bad = tmp_path / "src"
    bad.mkdir()
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    sd = load_file(src / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(31)
    save_file(sd, bad / "model.safetensors")
    from transformers import Qwen2ForCausalLM

    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        Qwen2ForCausalLM.from_pretrained(bad)
    with pytest.raises(ShapeMismatch, match=r"'model.norm.weight' shape \[31\], Qwen2ForCausalLM expects \[32\]"):
        sllm.convert(bad, tmp_path / "out")


def test_untied_checkpoint_with_a_tying_config(tmp_path):
    """Both halves of a tied pair present with different values: from_pretrained does not
    tie them, so neither may sllm (the copied config says so)."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("gpt2")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    src = _save(model.state_dict(), model.config, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    sllm.convert(src, tmp_path / "sllm")
    assert open_checkpoint(tmp_path / "sllm").manifest.key_mapping.config_changes == {"tie_word_embeddings": False}
    loaded = sllm.load_model(tmp_path / "sllm")
    assert torch.equal(_output(loaded), _output(AutoModelForCausalLM.from_pretrained(src)))
    assert torch.equal(_output(loaded), _output(model))
    sllm.release(loaded)


def _as_format_1(ckpt: Path) -> None:
    manifest = json.loads((ckpt / "sllm.json").read_text())
    manifest["format_version"] = 1
    del manifest["key_mapping"]
    (ckpt / "sllm.json").write_text(json.dumps(manifest))
    index = json.loads((ckpt / "tensor_index.json").read_text())
    index["format_version"] = 1
    (ckpt / "tensor_index.json").write_text(json.dumps(index))


def test_format_1_checkpoints_stay_readable(converted, tmp_path):
    import shutil

    from sllm.errors import CheckpointError

    _, dst, original = converted("gpt2", "float32")
    old = shutil.copytree(dst, tmp_path / "old")
    _as_format_1(old)
    assert open_checkpoint(old).manifest.key_mapping is None
    model = sllm.load_model(old)
    assert torch.equal(_output(model), original)
    sllm.release(model)
    # A format-1 conversion of a hub layout kept the hub's names: the error says to reconvert.
    index = json.loads((old / "tensor_index.json").read_text())
    index["tensors"]["h.0.attn.c_attn.weight"] = index["tensors"].pop("transformer.h.0.attn.c_attn.weight")
    (old / "tensor_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'h.0.attn.c_attn.weight' is not a weight .*reconvert it with `sllm convert`"):
        sllm.load_model(old)


def test_cast_at_convert_equals_from_pretrained_cast(converted, tmp_path):
    """``--dtype`` casts the source tensors before transformers' conversions, as
    ``from_pretrained(dtype=...)`` does."""
    from transformers import MixtralForCausalLM

    src, _, _ = converted("mixtral-sharded", "float32")
    assert len(list(src.glob("*.safetensors"))) > 1
    sllm.convert(src, tmp_path / "bf16", dtype="bfloat16")
    model = sllm.load_model(tmp_path / "bf16")
    reference = MixtralForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    assert torch.equal(_output(model), _output(reference))
    sllm.release(model)


@pytest.mark.parametrize("mix", ["config-dtype", "mixed-tensors"])
def test_keep_gives_the_dtypes_from_pretrained_gives(tmp_path, mix):
    """``--dtype keep`` is from_pretrained's ``dtype="auto"``: a bfloat16 checkpoint whose
    config says float32 loads as float32; a checkpoint mixing dtypes loads in one."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    model = build_tiny_model("llama", dtype="bfloat16")
    src = tmp_path / "src"
    model.save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    if mix == "config-dtype":
        cfg["dtype"] = "float32"
    else:  # no dtype in the config; one norm saved in float32 after the first (bfloat16) tensor
        cfg.pop("dtype", None)
        cfg.pop("torch_dtype", None)
        sd = load_file(src / "model.safetensors")
        sd["model.norm.weight"] = sd["model.norm.weight"].float()
        save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(cfg))
    reference = LlamaForCausalLM.from_pretrained(src)
    want = torch.float32 if mix == "config-dtype" else torch.bfloat16
    assert {p.dtype for p in reference.parameters()} == {want}
    result = sllm.convert(src, tmp_path / "sllm")
    assert result.dtype == str(want).removeprefix("torch.")
    loaded = sllm.load_model(tmp_path / "sllm")
    assert {p.dtype for p in loaded.parameters()} == {want}
    assert torch.equal(_output(loaded), _output(reference))
    sllm.release(loaded)


def test_quantized_checkpoint_is_refused(converted, tmp_path):
    import shutil

    from sllm.errors import UnsupportedCheckpoint

    src, _, _ = converted("llama", "float32")
    bad = shutil.copytree(src, tmp_path / "src")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpoint, match="quantized checkpoint \\(quant_method 'fp8'\\)"):
        sllm.convert(bad, tmp_path / "out")
