"""Live migration's protocol on plain data (``sllm/core/migration.py``) and on two real engines
in one process: the engine's hold / extend / release, and 100 prompts migrated engine to
engine at random points (greedy and seeded, several at once, deterministic mode) giving the
tokens of the same runs unmigrated; in the default mode no token before the handover changes."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from sllm.core.engine import Engine, EngineConfig, SamplingParams
from sllm.core.migration import (
    RequestCopy,
    Round,
    SourceMigration,
    check_round,
    parse_round,
    token_digest,
)
from sllm.errors import MigrationError, UsageError

# -- the protocol on plain data --------------------------------------------------------------


def test_token_digest_tells_lists_apart():
    assert token_digest([1, 2, 3]) == token_digest((1, 2, 3))
    assert token_digest([1, 2, 3]) != token_digest([1, 2, 4])
    assert token_digest([1, 2]) != token_digest([1, 2, 0])


def _params() -> dict:
    return {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop_token_ids": []}


@pytest.mark.parametrize("bad, why", [
    ({"index": -1}, "index"),
    ({"index": 0, "requests": [{"id": "a", "start": 0, "tokens": [-1]}]}, "tokens"),
    ({"index": 0, "requests": [{"id": "a", "start": 0, "tokens": [100]}]}, "tokens"),  # vocab 100
    ({"index": 0, "requests": [{"id": "a", "start": 0, "tokens": [True]}]}, "tokens"),
    ({"index": 0, "requests": [{"id": "a", "start": 0, "tokens": [1]}, {"id": "a", "start": 0, "tokens": [1]}]}, "twice"),
    ({"index": 0, "requests": [{"id": "x" * 200, "start": 0, "tokens": [1]}]}, "id"),
    ({"index": 0, "requests": [{"id": "a", "start": 0, "tokens": [1], "digest": "ab"}]}, "digest"),
    ({"index": 0, "requests": [{"id": "a", "start": -3, "tokens": [1]}]}, "start"),
    ([1, 2], "object"),
])
def test_parse_round_refuses_bad_fields(bad, why):
    with pytest.raises(MigrationError, match=why):
        parse_round(bad, vocab_size=100)


def test_parse_round_reads_what_to_json_writes():
    rnd = Round(2, (RequestCopy("a", 3, (5, 6), length=5, digest=token_digest([1, 2, 3, 5, 6])),), final=True,
                drop=("b",))
    assert parse_round(rnd.to_json()) == rnd
    assert rnd.num_tokens == 2 and rnd.nbytes == 8


def test_check_round_offsets_and_handover():
    held = {"a": [1, 2, 3]}
    check_round(Round(1, (RequestCopy("a", 3, (4,)),)), held)
    with pytest.raises(MigrationError, match="starts at 2"):
        check_round(Round(1, (RequestCopy("a", 2, (4,)),)), held)
    with pytest.raises(MigrationError, match="whole token list"):
        check_round(Round(1, (RequestCopy("b", 0, (4,)),)), held)  # new, without prompt_len/params
    with pytest.raises(MigrationError, match="prompt_len"):
        check_round(Round(0, (RequestCopy("b", 0, (4,), prompt_len=3, params=_params()),)), held)
    good = token_digest([1, 2, 3, 4])
    check_round(Round(2, (RequestCopy("a", 3, (4,), length=4, digest=good),), final=True), held)
    with pytest.raises(MigrationError, match="differs"):
        check_round(Round(2, (RequestCopy("a", 3, (5,), length=4, digest=good),), final=True), held)
    with pytest.raises(MigrationError, match="length and digest"):
        check_round(Round(2, (), final=True), held)  # a held request left out of the handover
    check_round(Round(2, (), final=True, drop=("a",)), held)  # unless dropped


def test_source_migration_rounds_until_the_delta_then_hands_over():
    sm = SourceMigration("m1", "gpt2", delta=2, max_rounds=3)
    with pytest.raises(MigrationError, match="phase"):
        sm.next_round({}, final=False)
    sm.prepared()
    toks = {"a": [1, 2, 3, 4], "b": [7, 8]}
    assert not sm.should_hand_over({k: len(v) for k, v in toks.items()})  # round 0 always copies
    r0 = sm.next_round(toks, final=False, prompt_lens={"a": 2, "b": 2}, params={"a": _params(), "b": _params()})
    assert [(r.id, r.start, r.tokens, r.prompt_len) for r in r0.requests] == [("a", 0, (1, 2, 3, 4), 2),
                                                                            ("b", 0, (7, 8), 2)]
    sm.acked(r0, 0.5)
    assert sm.sent == {"a": 4, "b": 2}
    toks = {"a": [1, 2, 3, 4, 5, 6, 7], "b": [7, 8, 9]}  # 3 new tokens > delta 2: another round
    assert not sm.should_hand_over({k: len(v) for k, v in toks.items()})
    r1 = sm.next_round(toks, final=False)
    assert [(r.start, r.tokens) for r in r1.requests] == [(4, (5, 6, 7)), (2, (9,))] and r1.requests[0].params is None
    sm.acked(r1, 0.01)
    toks = {"a": toks["a"] + [8]}  # b ended on the source: dropped
    assert sm.should_hand_over({"a": 8})
    r2 = sm.next_round(toks, final=True)
    assert r2.final and r2.drop == ("b",)
    assert r2.requests[0].length == 8 and r2.requests[0].digest == token_digest(toks["a"])
    assert sm.phase == "handover"
    sm.acked(r2, 0.001)
    assert sm.phase == "done" and sm.sent == {"a": 8} and sm.converged
    assert [r.tokens for r in sm.rounds] == [6, 4, 1]


def test_rounds_are_capped_and_stop_and_copy_hands_over_at_once():
    sm = SourceMigration("m2", "x", delta=0, max_rounds=2)
    sm.prepared()
    n = 5
    for _ in range(3):  # the source always has new tokens: only the cap ends the rounds
        assert not sm.should_hand_over({"a": n})
        rnd = sm.next_round({"a": list(range(n))}, final=False, prompt_lens={"a": 1}, params={"a": _params()})
        sm.acked(rnd, 0.0)
        n += 3
    assert sm.should_hand_over({"a": n})
    sm.next_round({"a": list(range(n))}, final=True)
    assert sm.converged is False  # the cap, not the delta
    stop = SourceMigration("m3", "x", max_rounds=0)
    stop.prepared()
    assert stop.should_hand_over({"a": 10})
    stop.next_round({"a": list(range(10))}, final=True, prompt_lens={"a": 1}, params={"a": _params()})
    assert stop.converged is None
    with pytest.raises(MigrationError, match=">= 0"):
        SourceMigration("m4", "x", delta=-1)
    stop.abort("D died")
    assert stop.phase == "aborted" and stop.error == "D died"
    stop.abort("again")
    assert stop.error == "D died"


def test_a_simulated_cluster_converges_within_3_rounds_99_percent_of_the_time():
    """Round k sends what the source generated during round k-1: a prefill of n tokens takes
    about ``c + n * p`` seconds while the source decodes one token per ``gap`` seconds."""
    rng = random.Random(0)
    converged = 0
    for _ in range(1000):
        gap, p, c = rng.uniform(0.01, 0.05), rng.uniform(2e-5, 2e-4), rng.uniform(0.002, 0.02)
        sm = SourceMigration("m", "x")
        sm.prepared()
        n = rng.randint(256, 2048)
        while True:
            final = sm.should_hand_over({"a": n})
            rnd = sm.next_round({"a": list(range(n))}, final=final, prompt_lens={"a": 10}, params={"a": _params()})
            took = c + rnd.num_tokens * p
            sm.acked(rnd, took)
            if final:
                break
            n += int(took / gap)
        converged += bool(sm.converged)
    assert converged >= 990


# -- two engines in one process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_hf_gpt2):
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(tiny_hf_gpt2).eval()
    torch.set_num_threads(threads)


def _prompt(i: int) -> list[int]:
    return torch.randint(0, 50000, (3 + (i * 7) % 29,), generator=torch.Generator().manual_seed(i)).tolist()


def _sp(i: int, max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0 if i % 2 == 0 else 0.9, top_p=0.95, seed=77 + i)


def _run(engine: Engine) -> None:
    while engine.active():
        engine.step()


def test_hold_stops_sampling_and_release_continues_identically(model):
    cfg = EngineConfig(deterministic=True)
    ref = Engine(model, start=False, config=cfg).generate(_prompt(1), _sp(1))
    e = Engine(model, start=False, config=cfg)
    g = e.submit(_prompt(1), _sp(1))
    for _ in range(5):
        e.step()
    n = e.hold(g)
    for _ in range(5):
        e.step()
    assert len(g.tokens) == n and not g.done  # held: nothing appended, KV kept
    assert e.kv_stats().used_blocks > 0
    e.release(g)
    _run(e)
    assert g.generated == ref


def test_hold_after_next_token_pauses_each_request_right_after_one_more_token(model):
    cfg = EngineConfig(deterministic=True)
    refs = [Engine(model, start=False, config=cfg).generate(_prompt(i), _sp(i)) for i in (2, 3)]
    e = Engine(model, start=False, config=cfg)
    gens = [e.submit(_prompt(i), _sp(i)) for i in (2, 3)]
    for _ in range(4):
        e.step()
    before = [g.step for g in gens]
    holder = threading.Thread(target=e.hold_after_next_token, args=(gens, 60.0))
    holder.start()
    while not all(g._hold_next for g in gens):  # flagged (no step runs before that)
        time.sleep(0.001)
    while holder.is_alive():  # the steps the hold waits for
        e.step()
    held = [g.step for g in gens]
    assert held == [b + 1 for b in before]  # paused right after one more token
    for _ in range(3):
        e.step()
    assert [g.step for g in gens] == held  # and nothing after it
    for g in gens:
        e.release(g)
    _run(e)
    assert [g.generated for g in gens] == refs


def test_a_hold_whose_next_token_is_the_last_sees_the_request_finished(model):
    e = Engine(model, start=False, config=EngineConfig(deterministic=True))
    g = e.submit(_prompt(4), SamplingParams(max_tokens=2))
    e.step()  # prefill + token 1
    assert g.step == 1 and e.exhausted(g, len(g.tokens) + 1)
    holder = threading.Thread(target=e.hold_after_next_token, args=([g], 60.0))
    holder.start()
    while not g._hold_next:
        time.sleep(0.001)
    while holder.is_alive():
        e.step()
    assert g.done and g.finish_reason == "length" and g.step == 2  # never "held" with nothing left to generate


def test_extend_refuses_what_a_source_could_not_send(model):
    e = Engine(model, start=False, config=EngineConfig(deterministic=True))
    g = e.submit([1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(UsageError, match="not held"):
        e.extend(g, [4])
    e.hold(g)
    with pytest.raises(UsageError, match="max_tokens"):
        e.extend(g, [4, 5, 6, 7])
    with pytest.raises(UsageError, match="context"):
        e.extend(g, list(range(200)))
    g.cancel()
    e.step()
    with pytest.raises(UsageError, match="not running"):
        e.hold(g)


def _migrate_in_process(src: Engine, dst: Engine, gens: list, rng: random.Random, *, delta: int = 2) -> list:
    """The protocol of ``sllm.core.migration`` driven by hand between two engines; returns
    the destination's copies (in the order of ``gens``)."""
    live = [g for g in gens if not g.done]
    sm = SourceMigration("t", "m", delta=delta)
    sm.prepared()
    copies: dict[str, object] = {}
    while True:
        current = {g.id: len(g.tokens) for g in live if not g.done}
        final = sm.should_hand_over(current)
        if final:
            for g in live:
                if not g.done:
                    src.hold(g)
        toks = {g.id: list(g.tokens) for g in live if not g.done}
        rnd = sm.next_round(toks, final=final, prompt_lens={g.id: g.prompt_len for g in live},
                            params={g.id: g.params.__dict__ for g in live})
        check_round(rnd, {rid: c.tokens for rid, c in copies.items()})
        for rid in rnd.drop:
            copies.pop(rid).cancel()
        for r in rnd.requests:
            if r.id not in copies:
                copies[r.id] = dst.submit(r.tokens, SamplingParams(**r.params), prompt_len=r.prompt_len,
                                          request_id=r.id, hold=True)
                if final:
                    dst.release(copies[r.id])
            else:
                dst.extend(copies[r.id], r.tokens, release=final)
        # the destination catches up while the source decodes a random number of steps
        for _ in range(rng.randint(0, 3)):
            src.step()
        while not all(c.wait_caught_up(0) for c in copies.values()) and not final:
            dst.step()
        sm.acked(rnd, 0.0)
        if final:
            break
    for g in live:
        if not g.done:
            g.cancel()  # the handover: the source drops its KV
    src.step()
    assert src.kv_stats().used_blocks == 0
    return [copies.get(g.id) for g in gens]


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
def test_100_prompts_migrated_at_random_points_engine_to_engine(model, deterministic):
    cfg = EngineConfig(deterministic=deterministic, max_num_batched_tokens=64)
    n_prompts = 100 if deterministic else 20
    alone = Engine(model, start=False, config=cfg if deterministic else EngineConfig(max_num_batched_tokens=64))
    if deterministic:  # batched or alone is the same here (tests/test_engine_batching.py)
        ref_gens = [alone.submit(_prompt(i), _sp(i)) for i in range(n_prompts)]
        _run(alone)
        refs = [g.generated for g in ref_gens]
    else:
        refs = [alone.generate(_prompt(i), _sp(i)) for i in range(n_prompts)]
    rng = random.Random(1)
    got: list[list[int]] = []
    handover_at: list[int] = []
    for wave in range(0, n_prompts, 10):  # 10 requests at once, migrated together at a random step
        src = Engine(model, start=False, config=cfg)
        dst = Engine(model, start=False, config=cfg)
        gens = [src.submit(_prompt(i), _sp(i)) for i in range(wave, wave + 10)]
        for _ in range(rng.randint(1, 20)):
            src.step()
        finished_here = {g.id: list(g.generated) for g in gens if g.done}
        copies = _migrate_in_process(src, dst, gens, rng)
        cut = {g.id: g.step for g in gens}
        _run(dst)
        assert dst.kv_stats().used_blocks == 0
        for g, c in zip(gens, copies):
            if c is None or g.id in finished_here or g.finish_reason != "cancelled":  # ended before the handover
                got.append(g.generated)
                handover_at.append(len(g.generated))
            else:
                got.append(c.generated)
                handover_at.append(cut[g.id])
    for i, (mine, ref) in enumerate(zip(got, refs)):
        if deterministic:
            assert mine == ref, f"prompt {i}"
        else:  # no token lost, repeated or changed before the handover point
            assert mine[:handover_at[i]] == ref[:handover_at[i]], f"prompt {i}"
            assert len(mine) <= 24
    assert sum(1 for i in range(n_prompts) if handover_at[i] < len(refs[i])) >= n_prompts // 2  # most moved mid-run
