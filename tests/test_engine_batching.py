"""Continuous batching on a tiny real GPT-2 (random weights): deterministic mode gives every
request the tokens it gets alone (batched, admitted mid-flight, preempted, resumed);
cancel frees KV at once; a failing forward fails only its step; 100 streams complete."""

from __future__ import annotations

import threading

import pytest
import torch

from sllm.core.engine import Engine, EngineConfig, SamplingParams, sample_token
from sllm.errors import UsageError


@pytest.fixture(scope="module")
def model(tiny_hf_gpt2):
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite shares 2 cores; results hold for any fixed thread count
    yield AutoModelForCausalLM.from_pretrained(tiny_hf_gpt2).eval()
    torch.set_num_threads(threads)


def _prompts(n: int) -> list[list[int]]:
    """``n`` prompts of lengths 3 .. 41 (all different for n <= 39)."""
    return [torch.randint(0, 50000, (3 + (i * 7) % 39,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(n)]


def _params(i: int, sampled: bool, n: int = 10) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.9 if sampled else 0.0, top_p=0.95, seed=1000 + i)


def _drain(engine: Engine) -> int:
    steps = 0
    while engine.active():
        engine.step()
        steps += 1
    return steps


def _det(**kw) -> EngineConfig:
    return EngineConfig(deterministic=True, **kw)


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_deterministic_batched_equals_alone_for_32_prompts(model, sampled):
    prompts = _prompts(32)
    alone_engine = Engine(model, start=False, config=_det(max_num_batched_tokens=512))
    alone = [alone_engine.generate(p, _params(i, sampled)) for i, p in enumerate(prompts)]
    # all together, with a small token budget: prefills are chunked and share steps with decodes
    engine = Engine(model, start=False, config=_det(max_num_batched_tokens=48))
    gens = [engine.submit(p, _params(i, sampled)) for i, p in enumerate(prompts)]
    steps = _drain(engine)
    assert steps < 32 * 10 // 4  # it did batch
    assert [g.generated for g in gens] == alone
    assert all(g.finish_reason == "length" for g in gens)
    assert engine.kv_stats().used_blocks == 0


def test_admitted_mid_flight_does_not_change_the_others(model):
    prompts = _prompts(6)
    cfg = _det(max_num_batched_tokens=16)
    alone = [Engine(model, start=False, config=cfg).generate(p, _params(i, True, 16)) for i, p in enumerate(prompts)]
    engine = Engine(model, start=False, config=cfg)
    first = [engine.submit(p, _params(i, True, 16)) for i, p in enumerate(prompts[:3])]
    for _ in range(5):
        engine.step()
    late = [engine.submit(p, _params(i + 3, True, 16)) for i, p in enumerate(prompts[3:])]
    _drain(engine)
    assert [g.generated for g in first + late] == alone


def test_preemption_under_a_tiny_kv_budget_gives_the_same_tokens(model):
    prompts = _prompts(8)
    big = Engine(model, start=False, config=_det())
    gens = [big.submit(p, _params(i, True, 20)) for i, p in enumerate(prompts)]
    _drain(big)
    want = [g.generated for g in gens]
    # 6 blocks of 16 tokens: one request needs up to 4; eight cannot all hold their KV at once
    tiny = Engine(model, start=False, config=_det(kv_cache_bytes=6 * big.bytes_per_block))
    assert tiny.kv.num_blocks == 6
    gens = [tiny.submit(p, _params(i, True, 20)) for i, p in enumerate(prompts)]
    peak = 0
    while tiny.active():
        tiny.step()
        peak = max(peak, tiny.kv_stats().used_blocks)
    assert tiny.kv_stats().preemptions > 0 and peak <= 6
    assert [g.generated for g in gens] == want
    assert all(g.finish_reason == "length" for g in gens)


def test_resume_from_a_token_list_is_identical_with_other_chunking(model):
    prompt = _prompts(20)[19]
    params = _params(0, True, 24)
    full = Engine(model, start=False, config=_det()).generate(prompt, params)
    for k in (1, 11):
        resumed = Engine(model, start=False, config=_det(max_num_batched_tokens=5)).generate(
            prompt + full[:k], params, prompt_len=len(prompt))
        assert resumed == full


def test_cancel_frees_kv_at_once_and_ends_cancelled(model):
    engine = Engine(model, start=False)
    told: list[int | None] = []
    gen = engine.submit(_prompts(3)[2], SamplingParams(max_tokens=50), listener=lambda g, t: told.append(t))
    other = engine.submit(_prompts(2)[1], SamplingParams(max_tokens=3))
    for _ in range(3):
        engine.step()
    before = engine.kv_stats().used_blocks
    assert before >= 2
    gen.cancel()
    assert engine.kv_stats().used_blocks < before  # freed before any further step
    assert engine.kv_stats().running == 1 or other.done
    engine.step()
    assert gen.finish_reason == "cancelled" and told[-1] is None and told.count(None) == 1
    assert len(told) - 1 == len(gen.generated) == 3
    _drain(engine)
    assert engine.kv_stats().used_blocks == 0 and other.finish_reason == "length"


def test_a_failing_forward_fails_its_step_and_the_engine_goes_on(model):
    engine = Engine(model, config=EngineConfig(max_num_seqs=4))
    try:
        real = engine._runner.run
        calls = {"n": 0}

        def flaky(work):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("injected: out of memory")
            return real(work)

        engine._runner.run = flaky
        gens = [engine.submit(p, SamplingParams(max_tokens=8)) for p in _prompts(3)]
        for g in gens:
            assert g.wait(timeout=60)
        assert {g.finish_reason for g in gens} == {"error"}
        with pytest.raises(RuntimeError, match="injected"):
            list(gens[0])
        assert engine.kv_stats().used_blocks == 0
        after = engine.submit(_prompts(1)[0], SamplingParams(max_tokens=5))
        assert after.wait(timeout=60) and after.finish_reason == "length" and len(after.generated) == 5
        assert engine._thread.is_alive()
    finally:
        engine.close()


def test_a_bug_outside_the_forward_fails_requests_cleanly(model):
    engine = Engine(model)
    try:
        real = engine._sched.schedule
        engine._sched.schedule = lambda: (_ for _ in ()).throw(KeyError("injected scheduler bug"))
        gen = engine.submit(_prompts(1)[0], SamplingParams(max_tokens=5))
        assert gen.wait(timeout=30) and gen.finish_reason == "error"
        engine._sched.schedule = real
        ok = engine.submit(_prompts(1)[0], SamplingParams(max_tokens=5))
        assert ok.wait(timeout=60) and ok.finish_reason == "length"
    finally:
        engine.close()


def test_100_concurrent_streams_complete_none_dropped_or_duplicated(model):
    engine = Engine(model, config=EngineConfig(max_num_seqs=32, max_num_batched_tokens=128))
    streams: dict[str, list[int | None]] = {}
    lock = threading.Lock()

    def listener(gen, token):
        with lock:
            streams.setdefault(gen.id, []).append(token)

    try:
        prompts = _prompts(100)
        gens = [engine.submit(p, SamplingParams(max_tokens=6 + i % 5), request_id=f"r{i}", listener=listener)
                for i, p in enumerate(prompts)]
        for g in gens:
            assert g.wait(timeout=120)
    finally:
        engine.close()
    assert len(streams) == 100
    for i, g in enumerate(gens):
        got = streams[g.id]
        assert got[-1] is None and got.count(None) == 1
        assert got[:-1] == g.generated and len(g.generated) == 6 + i % 5 and g.finish_reason == "length"


def test_max_num_seqs_1_runs_one_request_at_a_time(model):
    engine = Engine(model, start=False, config=EngineConfig(max_num_seqs=1))
    a = engine.submit(_prompts(1)[0], SamplingParams(max_tokens=4))
    b = engine.submit(_prompts(2)[1], SamplingParams(max_tokens=4))
    while not a.done:
        engine.step()
        assert engine.kv_stats().running <= 1
    assert b.step == 0 and not b.done
    _drain(engine)
    assert b.finish_reason == "length"


def test_a_request_that_cannot_fit_the_kv_cache_is_refused(model):
    per_block = Engine(model, start=False).bytes_per_block
    engine = Engine(model, start=False, config=EngineConfig(kv_cache_bytes=2 * per_block + 1))
    assert engine.kv.num_blocks == 2
    engine.generate([1, 2, 3], SamplingParams(max_tokens=20))
    with pytest.raises(UsageError, match="KV blocks"):
        engine.submit([1, 2, 3], SamplingParams(max_tokens=40))
    with pytest.raises(UsageError, match="less than one KV block"):
        Engine(model, start=False, config=EngineConfig(kv_cache_bytes=10))
    with pytest.raises(UsageError, match="max_num_seqs"):
        Engine(model, start=False, config=EngineConfig(max_num_seqs=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_any_positive_temperature_is_sound_and_tiny_ones_are_greedy(dtype):
    logits = (torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    best = int(torch.argmax(logits))
    for t in (1e-40, 1e-30, 1e-12, 5e-324):
        for top_p in (1.0, 0.5):
            picks = {sample_token(logits, SamplingParams(temperature=t, top_p=top_p, seed=s), 0) for s in range(5)}
            assert picks == {best}
    for t in (1e6, 1e300):  # flat but finite: any token, never NaN
        tok = sample_token(logits, SamplingParams(temperature=t, seed=3), 0)
        assert 0 <= tok < 5000
    with pytest.raises(UsageError):
        SamplingParams(temperature=float("nan")).check()
    with pytest.raises(UsageError):
        SamplingParams(temperature=float("inf")).check()


def test_tiny_temperature_through_the_engine_matches_greedy(model):
    engine = Engine(model, start=False)
    prompt = _prompts(4)[3]
    greedy = engine.generate(prompt, SamplingParams(max_tokens=12))
    gen = engine.submit(prompt, SamplingParams(max_tokens=12, temperature=1e-40, seed=5))
    _drain(engine)
    assert gen.finish_reason == "length" and gen.generated == greedy


def test_rows_sampled_together_pick_what_each_picks_alone():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 3000, generator=g) * 4
    params = [SamplingParams(temperature=[0.0, 0.7, 1.3][i % 3], top_p=[1.0, 0.9, 0.5][i // 3], seed=i)
              for i in range(9)]
    steps = list(range(9))
    from sllm.core.engine import sample_rows

    together = sample_rows(logits, params, steps)
    assert together == [sample_token(logits[i], params[i], steps[i]) for i in range(9)]
    assert together[3:6] != [sample_rows(logits[i : i + 1], [params[i]], [steps[i] + 1])[0] for i in range(3, 6)]
