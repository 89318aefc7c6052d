"""``--load-format sllm`` in a real vLLM engine (CPU build): same greedy tokens as vLLM's own
loader on the same checkpoint, tiers, and one-line errors for bad checkpoints."""

from __future__ import annotations

import math
import shutil

import pytest

pytestmark = pytest.mark.slow


def _same(ours: dict, theirs: dict) -> None:
    assert ours["tokens"] == theirs["tokens"]
    for a, b in zip(ours["logprobs"], theirs["logprobs"], strict=True):
        assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_same_greedy_tokens_as_default_loader(tiny_models, arch, engine_result, reference):
    """By name (the checkpoint's tensors through vLLM's own weight loaders), no layout."""
    src, dst = tiny_models[arch]
    ours = engine_result(dst, "sllm", {"layout": False})
    assert ours["layout"] == "off"
    _same(ours, reference(src))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_the_next_load_aliases_vllms_layout_with_the_same_tokens(tiny_models, arch, engine_result, reference,
                                                                 tmp_path):
    """The first load writes the layout (vLLM's fused, transposed parameters), the next makes
    every parameter a view of its read buffer: same greedy tokens as vLLM's own loader, and
    the pages of the weights vLLM repacked after loading are given back."""
    from sllm.io.reader import evict_page_cache

    src, dst = tiny_models[arch]
    extra = {"layout_dir": str(tmp_path / "layouts")}
    first = engine_result(dst, "sllm", extra)
    assert first["layout"] == "written" and first["trim"] is None
    (key,) = (tmp_path / "layouts").iterdir()
    part = key / "partition-0.bin"
    evict_page_cache(part)  # read with O_DIRECT into a buffer of the load's own
    second = engine_result(dst, "sllm", extra)
    assert second["layout"] == "aliased"
    _same(first, reference(src))
    _same(second, reference(src))
    live, freed = second["trim"]
    assert freed > 0 and live > 0
    if arch != "gpt2":
        return
    part.read_bytes()  # in the page cache: mapped copy-on-write, nothing read or trimmed
    third = engine_result(dst, "sllm", extra)
    assert third["layout"] == "aliased" and third["trim"][1] == 0
    _same(third, reference(src))
    # a layout that is not whole is a cache miss, not a failed start: by name again, rewritten
    with open(part, "r+b") as f:
        f.truncate(part.stat().st_size - 4096)
    fourth = engine_result(dst, "sllm", extra)
    assert fourth["layout"] == "written"
    _same(fourth, reference(src))
    assert engine_result(dst, "sllm", extra)["layout"] == "aliased"


def test_dummy_weights_differ(tiny_models, engine_result, reference):
    """The comparisons above can fail: random weights vLLM draws itself give other logprobs."""
    src, _ = tiny_models["llama"]
    assert reference(src)["logprobs"] != engine_result(src, "dummy")["logprobs"]


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def test_not_an_sllm_checkpoint_fails_with_one_line(tiny_models, run_engine):
    src, _ = tiny_models["gpt2"]  # a Hugging Face directory: config.json but no sllm.json
    proc = run_engine(src, "sllm")
    assert proc.returncode != 0
    last = _last_line(proc.stderr)
    assert "sllm.json" in last and str(src) in last, last


def test_truncated_partition_fails_with_one_line(tiny_models, tmp_path, run_engine):
    _, dst = tiny_models["gpt2"]
    bad = shutil.copytree(dst, tmp_path / "gpt2-truncated")
    part = bad / "partition-0.bin"
    with open(part, "r+b") as f:
        f.truncate(part.stat().st_size - 4096)
    proc = run_engine(bad, "sllm")
    assert proc.returncode != 0
    last = _last_line(proc.stderr)
    assert "TruncatedPartition" in last and "partition-0.bin" in last, last


def test_corrupt_manifest_fails_with_one_line(tiny_models, tmp_path, run_engine):
    _, dst = tiny_models["gpt2"]
    bad = shutil.copytree(dst, tmp_path / "gpt2-badjson")
    (bad / "sllm.json").write_text("{not json")
    proc = run_engine(bad, "sllm")
    assert proc.returncode != 0
    last = _last_line(proc.stderr)
    assert "sllm.json" in last and str(bad) in last, last


def test_unknown_extra_config_key_fails_with_one_line(tiny_models, run_engine):
    _, dst = tiny_models["gpt2"]
    proc = run_engine(dst, "sllm", {"cache_dri": "/tmp"})
    assert proc.returncode != 0
    assert "cache_dri" in _last_line(proc.stderr)


def test_weights_through_the_ssd_tier_from_a_remote(tiny_models, tmp_path, engine_result, reference):
    """With cache_dir + remote, the weights are pulled into the SSD tier, then loaded from it."""
    src, dst = tiny_models["qwen2"]
    remote = tmp_path / "remote"
    shutil.copytree(dst, remote / "qwen2-tiny")
    cache = tmp_path / "cache"
    ours = engine_result(src, "sllm", {"cache_dir": str(cache), "remote": str(remote), "model": "qwen2-tiny"})
    assert ours["tokens"] == reference(src)["tokens"]
    from sllm.core.cache import CacheConfig, TierCache

    assert "ssd" in TierCache(CacheConfig(cache_dir=cache)).locate("qwen2-tiny", check_remote=False).tiers
