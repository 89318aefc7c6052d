"""Shared fixtures: tiny real Hugging Face checkpoints (random weights) and their conversions.

Models are GPT-2 architecture from the shipped config, shrunk to a few hundred KB, so the
whole suite stays fast on 2 cores. Session-scoped: build once, never modify them in a test
(copy first with ``shutil.copytree`` when a test must corrupt something).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sllm.zoo import TINY_GPT2


@pytest.fixture(scope="session")
def tiny_hf_gpt2(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide GPT-2 HF checkpoint (model.safetensors, fp32) with the real tokenizer."""
    from sllm.zoo import build_random_checkpoint

    return build_random_checkpoint("gpt2", tmp_path_factory.mktemp("hf") / "tiny-gpt2", **TINY_GPT2)


@pytest.fixture(scope="session")
def tiny_sllm_gpt2(tiny_hf_gpt2, tmp_path_factory) -> Path:
    """``tiny_hf_gpt2`` converted to the sllm format (one partition, dtype kept)."""
    from sllm.core.convert import convert

    dst = tmp_path_factory.mktemp("sllm") / "tiny-gpt2"
    convert(tiny_hf_gpt2, dst)
    return dst


@pytest.fixture(scope="session")
def models_dir(tiny_hf_gpt2, tmp_path_factory) -> Path:
    """A directory of two converted tiny models, ``gpt2-a`` and ``gpt2-b`` (different seeds)."""
    from sllm.core.convert import convert
    from sllm.zoo import build_random_checkpoint

    root = tmp_path_factory.mktemp("models")
    convert(tiny_hf_gpt2, root / "gpt2-a")
    other = build_random_checkpoint("gpt2", tmp_path_factory.mktemp("hf") / "b", seed=1, **TINY_GPT2)
    convert(other, root / "gpt2-b")
    return root
