"""The engine on a tiny real GPT-2 (random weights): greedy equals transformers' generate,
seeded sampling is reproducible and resumable from a token list, requests interleave."""

from __future__ import annotations

import threading

import pytest
import torch

from sllm.core.engine import Engine, SamplingParams, sample_token, step_seed
from sllm.errors import UsageError


@pytest.fixture(scope="module")
def model(tiny_hf_gpt2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_gpt2).eval()


def _prompt(seed: int, n: int = 7) -> list[int]:
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _reference(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_greedy_matches_transformers_generate(model):
    engine = Engine(model, start=False)
    for seed in range(4):
        prompt = _prompt(seed, 5 + seed)
        assert engine.generate(prompt, SamplingParams(max_tokens=20)) == _reference(model, prompt, 20)


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    engine = Engine(model, start=False)
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    a = engine.generate(_prompt(0), params)
    b = engine.generate(_prompt(0), params)
    c = engine.generate(_prompt(0), SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1235))
    assert a == b
    assert a != c
    assert a != engine.generate(_prompt(0), SamplingParams(max_tokens=24))  # not greedy in disguise


@pytest.mark.parametrize("k", [1, 9])
def test_sampled_run_resumes_identically_on_a_fresh_engine(model, k):
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=7)
    prompt = _prompt(3)
    full = Engine(model, start=False).generate(prompt, params)

    first = Engine(model, start=False)
    gen = first.submit(prompt, params)
    for _ in range(k):
        first.step()
    gen.cancel()
    first.step()
    assert gen.finish_reason == "cancelled"
    tokens = list(gen.tokens)  # the migration payload: prompt + the k tokens generated so far
    assert tokens == prompt + full[:k]

    resumed = Engine(model, start=False).generate(tokens, params, prompt_len=len(prompt))
    assert resumed == full  # generated counts from the prompt: the k carried tokens, then the rest


def test_unseeded_sampling_records_its_seed(model):
    engine = Engine(model, start=False)
    gen = engine.submit(_prompt(1), SamplingParams(max_tokens=5, temperature=1.0))
    assert gen.params.seed is not None
    while not gen.done:
        engine.step()
    again = engine.generate(_prompt(1), gen.params)
    assert again == gen.generated


def test_max_tokens_stop_tokens_and_context(model):
    engine = Engine(model, start=False)
    prompt = _prompt(2)
    ref = _reference(model, prompt, 10)
    gen = engine.submit(prompt, SamplingParams(max_tokens=10))
    while not gen.done:
        engine.step()
    assert gen.finish_reason == "length" and gen.generated == ref

    stop_at = ref[4]
    gen = engine.submit(prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop_at,)))
    while not gen.done:
        engine.step()
    assert gen.finish_reason == "stop"
    assert gen.generated == ref[: ref.index(stop_at)]

    ctx = engine.max_context
    assert ctx == 128
    gen = engine.submit(_prompt(5, ctx - 3), SamplingParams(max_tokens=50))
    while not gen.done:
        engine.step()
    assert gen.finish_reason == "length" and len(gen.tokens) == ctx
    with pytest.raises(UsageError, match="context"):
        engine.submit(_prompt(5, ctx), SamplingParams())


def test_bad_input_raises_usage_error(model):
    engine = Engine(model, start=False)
    with pytest.raises(UsageError):
        engine.submit([], SamplingParams())
    with pytest.raises(UsageError):
        engine.submit([1, 2], SamplingParams(max_tokens=0))
    with pytest.raises(UsageError):
        engine.submit([1, 2], SamplingParams(top_p=0))
    with pytest.raises(UsageError):
        engine.submit([1, 2], SamplingParams(), prompt_len=3)


def test_requests_interleave_one_token_per_round(model):
    """A short request submitted beside a long one finishes long before it."""
    engine = Engine(model, start=False)
    order: list[str] = []
    listener = lambda gen, tok: order.append(gen.id if tok is not None else f"{gen.id}:done")  # noqa: E731
    engine.submit(_prompt(1), SamplingParams(max_tokens=30), request_id="long", listener=listener)
    engine.step()
    engine.submit(_prompt(2), SamplingParams(max_tokens=3), request_id="short", listener=listener)
    while engine.active():
        engine.step()
    assert order.index("short:done") < 8
    assert order.count("long") == 30 and order.count("short") == 3
    assert order[1:7] == ["long", "short"] * 3


def test_background_thread_serves_concurrent_requests_and_closes(model):
    engine = Engine(model)
    try:
        prompts = [_prompt(i) for i in range(6)]
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            results[i] = engine.generate(prompts[i], SamplingParams(max_tokens=8))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(results[i] == _reference(model, prompts[i], 8) for i in range(6))
        pending = engine.submit(_prompt(9), SamplingParams(max_tokens=10_000 // 100))
    finally:
        engine.close()
    assert pending.wait(timeout=10) and pending.finish_reason in ("cancelled", "length")
    with pytest.raises(UsageError, match="closed"):
        engine.submit([1], SamplingParams())
    assert engine.kv.keys == engine.kv.values == []  # the KV cache's tensors are dropped at close


def test_sampling_helpers():
    assert step_seed(1, 0) != step_seed(1, 1) != step_seed(2, 1)
    assert step_seed(1, 5) == step_seed(1, 5) and 0 <= step_seed(2**70, 3) < 2**63
    logits = torch.tensor([0.0, 5.0, 1.0, 4.9])
    assert sample_token(logits, SamplingParams(), 0) == 1
    # top_p small enough keeps only the most likely token
    picks = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.01, seed=s), 0) for s in range(20)}
    assert picks == {1}
    picks = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.9, seed=s), 0) for s in range(50)}
    assert picks == {1, 3}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_matches_generate_and_resumes(tiny_hf_gpt2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_gpt2).eval().to("cuda")
    engine = Engine(model, start=False)
    for seed in range(2):
        prompt = _prompt(seed)
        assert engine.generate(prompt, SamplingParams(max_tokens=16)) == _reference_on(model, prompt, 16)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=3)
    full = engine.generate(_prompt(4), params)
    resumed = Engine(model, start=False).generate(_prompt(4) + full[:5], params, prompt_len=len(_prompt(4)))
    assert resumed == full


def _reference_on(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()
