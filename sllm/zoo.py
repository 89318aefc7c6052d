"""Random-weight Hugging Face checkpoints of real architectures, built from configs offline.

Nothing here downloads: GPT-2's config and byte-level BPE tokenizer ship in
``sllm/data/gpt2`` (from the public DialoGPT-small checkpoint), and the other
architectures are configs written out here. Weights are random; the checkpoints are
real ones written by transformers' ``save_pretrained``, so they exercise the same loading
paths as downloaded models. Used by the demo, the tests and ``benchmarks/make_model.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"
GPT2_DIR = DATA_DIR / "gpt2"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

#: name -> (model_type, config keyword arguments). Sizes are those of the public models.
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    # GPT-2 small, 124M parameters: the shipped config.
    "gpt2": ("gpt2", {}),
    # OPT-1.3B (facebook/opt-1.3b): 24 layers, hidden 2048, ffn 8192, 32 heads.
    "opt-1.3b": (
        "opt",
        dict(
            hidden_size=2048,
            num_hidden_layers=24,
            ffn_dim=8192,
            num_attention_heads=32,
            vocab_size=50272,
            max_position_embeddings=2048,
            word_embed_proj_dim=2048,
            do_layer_norm_before=True,
            activation_function="relu",
            bos_token_id=2,
            eos_token_id=2,
            pad_token_id=1,
        ),
    ),
    # A tiny OPT for tests.
    "opt-tiny": (
        "opt",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            vocab_size=50272,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            bos_token_id=2,
            eos_token_id=2,
            pad_token_id=1,
        ),
    ),
    # Llama-style 1.1B (the TinyLlama-1.1B shape: GQA, RMSNorm, SwiGLU, RoPE), GPT-2 vocabulary.
    "llama-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=50304,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=50256,
            eos_token_id=50256,
        ),
    ),
    # A tiny Llama for tests (its RoPE buffer is non-persistent: a loader must rebuild it).
    "llama-tiny": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=50304,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=50256,
            eos_token_id=50256,
        ),
    ),
}


_TINY_DECODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

#: name -> (model_type, config keyword arguments, transformers class): one tiny model (2 layers,
#: 32 wide, 128-token vocabulary, a few KB) of each family whose loading rules sllm is tested
#: against (``tests/test_architectures.py``).
TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any], str]] = {
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=128, bos_token_id=1,
                          eos_token_id=2), "GPT2LMHeadModel"),
    "opt": ("opt", dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, vocab_size=128,
                        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0), "OPTForCausalLM"),
    "llama": ("llama", _TINY_DECODER, "LlamaForCausalLM"),
    "mistral": ("mistral", _TINY_DECODER, "MistralForCausalLM"),
    "qwen2": ("qwen2", _TINY_DECODER, "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", _TINY_DECODER, "Qwen3ForCausalLM"),
    "gemma": ("gemma", _TINY_DECODER, "GemmaForCausalLM"),
    "phi3": ("phi3", _TINY_DECODER, "Phi3ForCausalLM"),
    "mixtral": ("mixtral", dict(_TINY_DECODER, num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM"),
    "qwen3-moe": ("qwen3_moe", dict(_TINY_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                    decoder_sparse_step=1, mlp_only_layers=[]), "Qwen3MoeForCausalLM"),
    "bert": ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          vocab_size=128, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0), "BertModel"),
}


def build_tiny_model(arch: str, *, dtype: str = "float32", seed: int = 0):
    """A random-weight model of :data:`TINY_ARCHITECTURES` ``arch`` (eval mode), built with
    transformers from its config; ``model.save_pretrained(dir)`` writes its checkpoint.

    Raises:
        KeyError: an unknown ``arch`` (the message lists the names).
    """
    import torch
    import transformers

    if arch not in TINY_ARCHITECTURES:
        raise KeyError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    model_type, kwargs, class_name = TINY_ARCHITECTURES[arch]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [class_name]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)._from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


#: Overrides that shrink GPT-2 to a ~3 MB test model (2 layers, 64 wide; vocabulary kept).
TINY_GPT2: dict[str, Any] = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)


def make_config(arch: str, **overrides: Any):
    """A transformers config for a named architecture, with ``overrides`` applied.

    Raises:
        KeyError: ``arch`` is not in :data:`ARCHITECTURES` (the message lists the names).
    """
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    model_type, kwargs = ARCHITECTURES[arch]
    if model_type == "gpt2":
        config = AutoConfig.from_pretrained(GPT2_DIR)
    else:
        config = AutoConfig.for_model(model_type, **kwargs)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_random_checkpoint(
    arch: str,
    dst: str | Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    safe_serialization: bool = True,
    max_shard_size: str | int | None = None,
    **overrides: Any,
) -> Path:
    """Write a random-weight Hugging Face checkpoint of ``arch`` to ``dst`` (save_pretrained).

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        dst: output directory (created).
        dtype: "float32", "float16" or "bfloat16": the saved weights' dtype.
        seed: torch seed for the random weights.
        safe_serialization: True for ``model.safetensors``, False for ``pytorch_model.bin``.
        max_shard_size: e.g. "2MB" to write a sharded checkpoint with an index.
        overrides: config fields to change (e.g. ``n_layer=2, n_embd=64``).

    Returns: ``dst``. The GPT-2 BPE tokenizer files are copied beside the weights.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = make_config(arch, **overrides)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if safe_serialization:
        kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(dst, **kwargs)
    else:
        # transformers 5 writes only safetensors; write the .bin layout transformers 4 wrote
        # (torch.save of the state dict, tied tensors sharing storage, sharded with an index).
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(dst)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(dst)
        _save_bin(model.state_dict(), dst, max_shard_size)
    for name in TOKENIZER_FILES:
        shutil.copyfile(GPT2_DIR / name, dst / name)
    return dst


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    return int(float(size[:-2]) * units[size[-2:].upper()])


def _save_bin(state_dict: dict, dst: Path, max_shard_size: str | int | None) -> None:
    """``pytorch_model.bin`` or ``pytorch_model-0000i-of-0000n.bin`` + ``pytorch_model.bin.index.json``."""
    import json

    import torch

    if max_shard_size is None:
        torch.save(state_dict, dst / "pytorch_model.bin")
        return
    limit = _parse_size(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, dst / fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
