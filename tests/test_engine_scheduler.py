"""The engine's step scheduler on plain state: no model, no torch."""

from __future__ import annotations

import pytest

from sllm.core.engine.scheduler import BlockManager, Scheduler, SchedulerConfig, SeqState, blocks_for


def _sched(max_seqs=8, budget=16, blocks=64, block_size=4) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, blocks, block_size))


def _run(s: Scheduler, plan) -> None:
    """What the engine does after a step: record the computed tokens, append one when sampling."""
    for c in plan.chunks:
        s.advance(c.id, c.num_tokens, 1 if c.samples else 0)


def test_block_manager_allocates_lowest_first_and_frees():
    b = BlockManager(4, 2)
    assert b.grow("a", 3) and b.table("a") == [0, 1]
    assert b.grow("b", 2) and b.table("b") == [2]
    assert not b.grow("a", 7) and b.table("a") == [0, 1]  # needs 2 more, 1 free: nothing allocated
    assert b.free("a") == 2 and b.num_free == 3
    assert b.grow("c", 1) and b.table("c") == [0]
    assert blocks_for(0, 4) == 0 and blocks_for(5, 4) == 2
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_chunked_prefill_within_the_token_budget_and_decodes_first():
    s = _sched(budget=8)
    s.add(SeqState("long", 20))
    plan = s.schedule()
    assert [(c.id, c.start, c.num_tokens, c.samples) for c in plan.chunks] == [("long", 0, 8, False)]
    assert plan.admitted == ("long",)
    _run(s, plan)
    s.add(SeqState("short", 3))
    plan = s.schedule()  # the long prefill's next chunk takes the whole budget: the newcomer waits
    assert [(c.id, c.start, c.num_tokens) for c in plan.chunks] == [("long", 8, 8)] and plan.admitted == ()
    _run(s, plan)
    plan = s.schedule()  # the last 4 prompt tokens (then it samples), and the newcomer in what is left
    assert [(c.id, c.start, c.num_tokens, c.samples) for c in plan.chunks] == [("long", 16, 4, True),
                                                                                ("short", 0, 3, True)]
    _run(s, plan)
    # now "short" (if admitted) and "long" alternate; every step stays within the budget
    for _ in range(10):
        plan = s.schedule()
        assert plan.num_tokens <= 8
        ids = [c.id for c in plan.chunks]
        assert len(ids) == len(set(ids))
        decodes = [c for c in plan.chunks if c.num_tokens == 1 and c.samples]
        assert plan.chunks[: len(decodes)] == tuple(decodes)  # decodes run first
        _run(s, plan)
    assert s.get("long").num_computed >= 20 and s.get("short").num_computed >= 3


def test_admission_respects_max_num_seqs_and_order():
    s = _sched(max_seqs=2, budget=100)
    for i in range(4):
        s.add(SeqState(f"r{i}", 5))
    plan = s.schedule()
    assert plan.admitted == ("r0", "r1") and [c.id for c in s.waiting] == ["r2", "r3"]
    _run(s, plan)
    s.remove("r0")
    plan = s.schedule()
    assert plan.admitted == ("r2",)
    assert {c.id: c.num_tokens for c in plan.chunks} == {"r1": 1, "r2": 5}


def test_admission_waits_for_kv_blocks_first_come_first_served():
    s = _sched(budget=100, blocks=4, block_size=4)
    s.add(SeqState("a", 12))  # 3 blocks
    s.add(SeqState("b", 8))  # 2 blocks: does not fit beside a
    s.add(SeqState("c", 2))  # would fit, but may not overtake b
    plan = s.schedule()
    assert plan.admitted == ("a",) and [c.id for c in s.waiting] == ["b", "c"]
    s.remove("a")
    assert s.blocks.num_free == 4  # freed at once
    plan = s.schedule()
    assert plan.admitted == ("b", "c")


def test_preemption_by_recompute_frees_the_latest_and_requeues_it_first():
    s = _sched(budget=100, blocks=4, block_size=2)
    s.add(SeqState("old", 3))  # 2 blocks
    s.add(SeqState("new", 3))  # 2 blocks
    plan = s.schedule()
    assert plan.admitted == ("old", "new") and s.blocks.num_free == 0
    _run(s, plan)  # both have 4 tokens, 3 computed: the next decode needs no block (positions 0..3)
    plan = s.schedule()
    assert not plan.preempted
    _run(s, plan)  # 5 tokens, 4 computed: position 4 needs a third block each
    plan = s.schedule()
    assert plan.preempted == ("new",) and [c.id for c in plan.chunks] == ["old"]
    assert plan.admitted == ()  # nothing is admitted in a step that preempted
    new = s.get("new")
    assert new.num_computed == 0 and new.num_tokens == 5 and s.waiting[0] is new and s.blocks.table("new") == []
    assert s.preemptions == 1
    _run(s, plan)
    s.remove("old")
    plan = s.schedule()  # the preempted request is prefilled again: all its tokens, then samples
    assert [(c.id, c.start, c.num_tokens, c.samples) for c in plan.chunks] == [("new", 0, 5, True)]


def test_a_request_preempts_itself_when_it_is_the_latest():
    s = _sched(budget=100, blocks=3, block_size=2)
    s.add(SeqState("a", 2))
    s.add(SeqState("b", 4))
    plan = s.schedule()
    assert plan.admitted == ("a", "b")
    _run(s, plan)
    # a: 3 tokens 2 computed -> position 2 needs block 2 of a; none free: b (latest) goes
    plan = s.schedule()
    assert plan.preempted == ("b",) and [c.id for c in plan.chunks] == ["a"]


def test_remove_and_duplicates():
    s = _sched()
    s.add(SeqState("x", 4))
    with pytest.raises(ValueError):
        s.add(SeqState("x", 4))
    assert s.remove("x") and not s.remove("x") and len(s) == 0
    assert s.schedule().chunks == ()
