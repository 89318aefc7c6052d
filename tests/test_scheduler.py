"""The scheduler on plain data: DRAM before SSD before remote-only, resident first, queues,
unloading idle models, migrating busy ones, down nodes, and deterministic tie-breaks."""

from __future__ import annotations

import math
import random

import pytest
from test_estimator import GB, gpu_node, load_path_node

from sllm.core.inventory import (
    Inventory,
    LoaderJob,
    NodeState,
    PrefillFit,
    ResidentModel,
    RunningRequest,
    TierSpec,
)
from sllm.core.scheduler import get_migrator, plan, summarize
from sllm.errors import SchedulingError


def cluster(*names: str, **kw) -> Inventory:
    return Inventory({n: gpu_node(n, **kw) for n in names}, model_bytes={"m": GB})


def state(name: str, *, tiers=None, resident=(), loader=(), budget=8 * GB, **kw) -> NodeState:
    return NodeState(name, max_memory_bytes=budget, tiers=tiers or {}, resident=tuple(resident),
                     loader=tuple(loader), **kw)


def test_ranks_dram_then_ssd_then_remote_only_with_hand_computed_seconds():
    inv = cluster("a", "b", "c")
    states = {"a": state("a"), "b": state("b", tiers={"m": ("ssd",)}), "c": state("c", tiers={"m": ("dram", "ssd")})}
    p = plan("m", inv, states)
    assert [(o.node, o.action, o.tier) for o in p.options] == [("c", "load", "dram"), ("b", "load", "ssd"),
                                                               ("a", "load", "remote")]
    assert [o.seconds for o in p.options] == pytest.approx([0.2, 0.625, 2.125])
    assert p.best.node == "c" and p.nbytes == GB and p.down == ()
    assert summarize(p)[2].transfer_seconds == pytest.approx(2.025)


def test_resident_is_zero_and_local_dir_counts_as_ssd():
    inv = cluster("a", "b")
    states = {"a": state("a", tiers={"m": ("local",)}), "b": state("b", resident=[ResidentModel("m", GB)])}
    p = plan("m", inv, states)
    assert (p.options[0].node, p.options[0].action, p.options[0].seconds) == ("b", "resident", 0.0)
    assert (p.options[1].tier, p.options[1].seconds) == ("ssd", pytest.approx(0.625))


def test_prompt_tokens_add_the_nodes_prefill_estimate():
    inv = cluster("a")
    st = {"a": state("a", resident=[ResidentModel("m", GB)], prefill={"m": PrefillFit(0.001, 0.01, 8)})}
    assert plan("m", inv, st, prompt_tokens=200).options[0].seconds == pytest.approx(0.21)


def test_loads_queue_per_resource():
    inv = cluster("b", "c")
    # c's disk reads x (4 GB from SSD: 2.0 + 0.4 / 16 + 0.1 = 2.125 s, 1.0 s done) and its link pulls y
    disk = LoaderJob("x", 4 * GB, "ssd", elapsed_seconds=1.0, running=True, resource="disk")
    link = LoaderJob("y", 2 * GB, "remote", elapsed_seconds=0.0, running=True, resource="link")
    states = {"b": state("b", tiers={"m": ("ssd",)}), "c": state("c", tiers={"m": ("ssd",)}, loader=[disk, link])}
    p = plan("m", inv, states)
    assert [o.node for o in p.options] == ["b", "c"]  # c's SSD read waits for x's, not for y's pull
    assert p.options[1].load.queue_seconds == pytest.approx(1.125)
    assert p.options[1].seconds == pytest.approx(1.125 + 0.625)
    # a DRAM hit waits in no queue; a remote pull waits for the link only (4.125 s for y)
    dram = {**states, "c": state("c", tiers={"m": ("dram",)}, loader=[disk, link])}
    assert plan("m", inv, dram).best.node == "c" and plan("m", inv, dram).best.seconds == pytest.approx(0.2)
    unknown = LoaderJob("z", GB, "ssd", running=True)  # an older node: no resource reported, counted everywhere
    old = {**states, "c": state("c", tiers={"m": ("dram",)}, loader=[unknown])}
    assert next(o for o in plan("m", inv, old).options if o.node == "c").load.queue_seconds == 0.0


def test_model_already_loading_waits_for_that_load():
    inv = cluster("a")
    st = {"a": state("a", loader=[LoaderJob("m", GB, "ssd", elapsed_seconds=0.5, running=True)])}
    o = plan("m", inv, st).options[0]
    assert o.action == "loading" and o.seconds == pytest.approx(0.125)


def test_ties_break_by_node_name_and_input_order_does_not_matter():
    names = ["n3", "n1", "n2", "n0"]
    inv = cluster(*names)
    states = {n: state(n, tiers={"m": ("ssd",)}) for n in names}
    first = plan("m", inv, states)
    assert [o.node for o in first.options] == ["n0", "n1", "n2", "n3"]
    for seed in range(5):
        shuffled = list(states.items())
        random.Random(seed).shuffle(shuffled)
        assert plan("m", inv, dict(shuffled)) == first


def test_down_node_is_skipped_and_listed():
    inv = cluster("a", "b", "c")
    states = {"a": NodeState("a", up=False, error="connection refused"), "b": state("b")}
    p = plan("m", inv, states)
    assert [o.node for o in p.options] == ["b"]
    assert p.down == (("a", "connection refused"), ("c", "no status"))
    assert plan("m", inv, states, exclude=["b"]).best is None


def test_no_room_unloads_idle_models_least_recently_used_first():
    inv = cluster("a")
    idle = [ResidentModel("x", GB, idle_seconds=5), ResidentModel("y", GB, idle_seconds=50),
            ResidentModel("z", GB, pinned=True, idle_seconds=99)]
    st = {"a": state("a", tiers={"m": ("ssd",)}, resident=idle, budget=3 * GB)}
    o = plan("m", inv, st).options[0]
    assert o.action == "unload" and [u.model for u in o.unload] == ["y"]
    # the unload (0.01 s) happens while the node reads m from SSD (0.525 s), then the fixed 0.1 s
    assert o.seconds == pytest.approx(max(0.01, 0.525) + 0.1)
    # a --models directory model reserves its room before it is read: the unload comes first
    local = {"a": state("a", tiers={"m": ("local",)}, resident=idle, budget=3 * GB)}
    assert plan("m", inv, local).options[0].seconds == pytest.approx(0.01 + 0.625)


def test_busy_node_is_unavailable_without_migration_and_migrates_with_it():
    inv = cluster("a", "b", "c")
    busy = ResidentModel("x", 2 * GB, requests=(RunningRequest("r1", 100, 20), RunningRequest("r2", 300, 80)))
    states = {"a": state("a", tiers={"m": ("dram",)}, resident=[busy], budget=2 * GB),
              "b": state("b", tiers={"x": ("ssd",)}, budget=2 * GB, prefill={"x": PrefillFit(0.001, 0.02, 9)}),
              "c": state("c", budget=2 * GB)}
    p = plan("m", inv, states)
    assert [(o.node, o.action) for o in p.options] == [("b", "load"), ("c", "load"), ("a", "unavailable")]
    assert math.isinf(p.options[2].seconds) and "no room" in p.options[2].reasons[-1]
    pm = plan("m", inv, states, migration=True)
    a = next(o for o in pm.options if o.node == "a")
    [move] = a.migrate
    # x goes to b, which has it on SSD (c, remote-only, is not a destination): 2 GB at 2 GB/s + 0.2 / 8 chunks
    # + 0.1 fixed; then 120 and 380 tokens re-prefilled at b's fit
    assert (move.model, move.destination, move.requests) == ("x", "b", ("r1", "r2"))
    assert move.load_seconds == pytest.approx(1.125)
    assert move.migration.seconds == pytest.approx(0.12 + 0.02 + 0.38 + 0.02)
    # the migration frees a's room in 1.665 s; m's DRAM transfer (0.1 s) overlaps it; then the fixed 0.1 s
    assert a.action == "migrate" and a.seconds == pytest.approx(1.125 + 0.54 + 0.1)
    assert pm.best.node == "a"  # migrating x then loading m from DRAM (1.765 s) beats b's and c's remote pulls
    assert [o.node for o in pm.options] == ["a", "b", "c"]
    assert get_migrator() is None  # --apply refuses migrations until the migration issue registers one


def test_a_busy_model_only_the_remote_holds_stays_and_one_a_peer_holds_moves():
    # x (fewer tokens, tried first) is in no peer's tier: b would pull it from the remote, so it stays;
    # y is on b's SSD and moves there
    inv = Inventory({n: gpu_node(n) for n in ("a", "b")}, model_bytes={"m": GB})
    x = ResidentModel("x", GB, requests=(RunningRequest("r1", 10, 1),))
    y = ResidentModel("y", GB, requests=(RunningRequest("r2", 200, 50),))
    states = {"a": state("a", tiers={"m": ("dram",)}, resident=[x, y], budget=2 * GB),
              "b": state("b", tiers={"y": ("ssd",)}, budget=2 * GB)}
    a = next(o for o in plan("m", inv, states, migration=True).options if o.node == "a")
    [move] = a.migrate
    assert (move.model, move.destination) == ("y", "b") and move.load_seconds == pytest.approx(0.625)


def test_busy_node_waits_for_room_when_it_reports_decode_rate_and_completion_length():
    inv = cluster("a", "b")
    busy = ResidentModel("x", 2 * GB, requests=(RunningRequest("r1", 100, 20), RunningRequest("r2", 300, 80)))
    states = {"a": state("a", tiers={"m": ("dram",)}, resident=[busy], budget=2 * GB,
                         decode_seconds_per_token=0.01, mean_generated_tokens=100),
              "b": state("b", resident=[ResidentModel("y", GB, requests=(RunningRequest("q", 5, 1),))], budget=2 * GB)}
    [a, b] = sorted(plan("m", inv, states).options, key=lambda o: o.node)
    # x's requests end in (100 - 20) * 0.01 = 0.8 s and (100 - 80) * 0.01 = 0.2 s: x frees 2 GB after 0.8 s;
    # m's transfer from DRAM (0.1 s) happens meanwhile, its fixed cost (0.1 s) after
    assert a.action == "wait" and a.freeing_seconds == pytest.approx(0.8) and a.seconds == pytest.approx(0.9)
    # b has room beside y and pulls m from the remote (2.125 s)
    assert b.action == "load" and b.seconds == pytest.approx(2.125)
    assert plan("m", inv, states).best.node == "a"
    # b does not report its decode rate: busy b, with no room, cannot say when it will have some
    full_b = {**states, "b": state("b", resident=[ResidentModel("y", 2 * GB, requests=(RunningRequest("q", 5, 1),))],
                                   budget=2 * GB)}
    assert {o.node: o.action for o in plan("m", inv, full_b).options} == {"a": "wait", "b": "unavailable"}


def test_a_wait_longer_than_the_node_gives_a_load_to_find_room_is_unavailable():
    # as above: x frees a's 2 GB after 0.8 s; m's DRAM transfer (0.1 s) comes first, so the node's load waits
    # 0.7 s for room once m is fetched. A node that gives a load 0.5 s (its /status) would fail it
    inv = cluster("a")
    busy = ResidentModel("x", 2 * GB, requests=(RunningRequest("r1", 100, 20),))

    def option(limit, tiers=("dram",)):
        st = state("a", tiers={"m": tiers}, resident=[busy], budget=2 * GB, decode_seconds_per_token=0.01,
                   mean_generated_tokens=100, budget_wait_seconds=limit)
        return plan("m", inv, {"a": st}).options[0]

    assert option(None).action == "wait" and option(0.75).action == "wait"
    short = option(0.5)
    assert short.action == "unavailable" and "gives a load 0.5 s to find room" in short.reasons[-1]
    # a --models directory model waits for room before it is read: the whole 0.8 s
    assert option(0.75, ("local",)).action == "unavailable" and option(0.85, ("local",)).action == "wait"


def test_a_pinned_model_never_frees_room_but_a_held_one_does_when_its_requests_end():
    # a's 2 GB budget: x (1 GB, busy: 0.8 s to go) and p (1 GB). m needs 2 GB from DRAM (0.2 s)
    inv = cluster("a")
    x = ResidentModel("x", GB, requests=(RunningRequest("r1", 100, 20),))

    def option(p: ResidentModel):
        states = {"a": state("a", tiers={"m": ("dram",)}, resident=[x, p], budget=2 * GB,
                             decode_seconds_per_token=0.01, mean_generated_tokens=100)}
        return plan("m", inv, states, nbytes=2 * GB).options[0]

    # pinned (sllm serve --pin): never unloaded, busy or not, so 2 GB never come free
    assert option(ResidentModel("p", GB, pinned=True, idle_seconds=99)).action == "unavailable"
    assert option(ResidentModel("p", GB, pinned=True, requests=(RunningRequest("r2", 5, 99),))).action == "unavailable"
    # held (the simulator's: migrating, or about to admit queued requests): freed like a busy model, not unloaded now
    held = option(ResidentModel("p", GB, held=True))
    assert held.action == "wait" and held.freeing_seconds == pytest.approx(0.8) and held.unload == ()
    # plain idle: unloaded (its unload's seconds), then x's 0.8 s
    idle = option(ResidentModel("p", GB, idle_seconds=5))
    assert [u.model for u in idle.unload] == ["p"] and idle.freeing_seconds > 0.8


def test_a_node_full_of_loads_in_progress_waits_for_them_to_serve_and_go_idle():
    # a's 2 GB budget is held by two SSD loads: x runs (0.625 s, 0.5 s done: 0.125 s left), y waits for the disk
    # (0.125 + 0.625 = 0.75 s). Each then serves its requests: the fit's b (0.05 s) + 100 tokens * 0.01 s, 1.05 s
    inv = cluster("a")
    fit = PrefillFit(0.001, 0.05, 4)
    loads = [LoaderJob("x", GB, "ssd", elapsed_seconds=0.5, running=True, resource="disk"),
             LoaderJob("y", GB, "ssd", resource="disk")]
    states = {"a": state("a", tiers={"m": ("dram",)}, loader=loads, budget=2 * GB, prefill={"x": fit, "y": fit},
                         decode_seconds_per_token=0.01, mean_generated_tokens=100)}
    [a] = plan("m", inv, states).options
    # x frees its 1 GB at 0.125 + 1.05 = 1.175 s; m's DRAM transfer (0.1 s) overlaps the wait; fixed 0.1 s
    assert a.action == "wait" and a.freeing_seconds == pytest.approx(1.175) and a.seconds == pytest.approx(1.275)
    # a 2 GB model needs y's room too: y frees at 0.75 + 1.05 = 1.8 s
    assert plan("m", inv, states, nbytes=2 * GB).options[0].freeing_seconds == pytest.approx(1.8)
    # without the decode rate the node cannot say when the loads will be done with their room
    blind = {"a": state("a", tiers={"m": ("dram",)}, loader=loads, budget=2 * GB)}
    assert plan("m", inv, blind).options[0].action == "unavailable"


def test_a_nodes_status_with_loads_in_progress_gives_a_wait_option():
    # the same node as above, as sllm serve's /status reports it (the live scheduler's input)
    from sllm.core.node_state import parse_status

    doc = {"max_memory_bytes": 2 * GB, "models": [{"model": "m", "tiers": ["dram"], "nbytes": GB}],
           "loader_queue": [{"model": "x", "nbytes": GB, "tier": "ssd", "resource": "disk", "running": True,
                             "elapsed_seconds": 0.5, "waiting_requests": 3},
                            {"model": "y", "nbytes": GB, "tier": "ssd", "resource": "disk", "running": False,
                             "elapsed_seconds": 0.0, "waiting_requests": 1}],
           "prefill_fit": {"x": {"a_seconds_per_token": 0.001, "b_seconds": 0.05, "samples": 4}},
           "engine": {"decode_seconds_per_token": 0.01, "mean_generated_tokens": 100}}
    [a] = plan("m", cluster("a"), {"a": parse_status("a", doc)}).options
    assert a.action == "wait" and a.freeing_seconds == pytest.approx(1.175) and a.seconds == pytest.approx(1.275)


def test_a_load_in_progress_the_budget_cannot_hold_yet_takes_room_when_a_busy_model_frees_it():
    # z (1 GB) serves a request with 100 tokens to go (1.0 s); x (0.125 s left) and y (0.75 s left) are loading:
    # 3 GB promised on a 2 GB budget. x takes the free GB at 0.125 s, y must wait for z (1.0 s); x frees at
    # 0.125 + 1.05 = 1.175 s, y at 1.0 + 1.05 = 2.05 s. A 3 GB load of q (it would fail) holds nothing
    inv = cluster("a")
    fit = PrefillFit(0.001, 0.05, 4)
    z = ResidentModel("z", GB, requests=(RunningRequest("r", 10, 0),))
    loads = [LoaderJob("x", GB, "ssd", elapsed_seconds=0.5, running=True, resource="disk"),
             LoaderJob("y", GB, "ssd", resource="disk"), LoaderJob("q", 3 * GB, "dram", resource=None)]
    st = {"a": state("a", tiers={"m": ("dram",)}, resident=[z], loader=loads, budget=2 * GB,
                     prefill={"x": fit, "y": fit, "q": fit}, decode_seconds_per_token=0.01, mean_generated_tokens=100)}
    # 1 GB: x's, at 1.175 s (z's, at 1.0 s, went to y); 2 GB: x's and y's, at 2.05 s
    assert plan("m", inv, st).options[0].freeing_seconds == pytest.approx(1.175)
    assert plan("m", inv, st, nbytes=2 * GB).options[0].freeing_seconds == pytest.approx(2.05)


def test_unknown_size_and_oversized_models():
    inv = cluster("a")
    with pytest.raises(SchedulingError, match="size of 'q' is unknown"):
        plan("q", inv, {"a": state("a")})
    o = plan("m", inv, {"a": state("a", budget=GB // 2)}).options[0]
    assert o.action == "unavailable" and "budget" in o.reasons[0]
    reported = {"a": state("a", model_bytes={"q": 3 * GB})}
    assert plan("q", inv, reported).nbytes == 3 * GB


def test_a_remote_only_models_size_is_asked_of_the_nodes_that_can_pull_it():
    from sllm.core.scheduler import with_remote_facts

    inv = cluster("a", "b", "c", "d")
    asked: list[str] = []

    def ask(spec):
        asked.append(spec.name)
        if spec.name == "b":
            raise RuntimeError("no answer")  # skipped like a down node
        return {"id": "q", "nbytes": 2 * GB, "tensors": None}

    states = {"a": state("a", has_remote=False), "b": state("b"), "c": state("c"), "d": state("d"),
              "e": NodeState("e", up=False, error="down")}
    sized = with_remote_facts("q", inv, states, ask)
    assert asked == ["b", "c"] and sized.model_bytes["q"] == 2 * GB and "q" not in inv.model_bytes
    assert sized.model_tensors == {}  # the remote's index was unreadable: the probe's count stands in
    assert plan("q", sized, states).nbytes == 2 * GB
    asked.clear()
    assert with_remote_facts("m", inv, states, ask) is inv and asked == []  # known: nobody is asked
    nobody = with_remote_facts("q", inv, states, lambda spec: None)
    with pytest.raises(SchedulingError, match="size of 'q' is unknown"):
        plan("q", nobody, states)
    garbled = with_remote_facts("q", inv, states, lambda spec: {"nbytes": "lots"})  # nonsense: skipped
    assert "q" not in garbled.model_bytes


def test_a_remote_only_models_tensor_count_from_the_remotes_index_corrects_its_fixed_cost():
    """No node has the index of q: the count comes from the remote's (through a node's model
    card), or from the inventory's [models] table, and corrects every node's fixed cost."""
    from dataclasses import replace

    from sllm.core.scheduler import with_remote_facts

    base = load_path_node()
    tiers = {**base.tiers, "remote": TierSpec("remote", 0.5, load_fixed_seconds=0.2, load_gbps=0.5)}
    spec = replace(base, tiers=tiers, load_seconds_per_tensor=1e-5, load_probe_tensors=100)
    inv = Inventory({"a": replace(spec, name="a")})
    states = {"a": state("a")}
    counted = with_remote_facts("q", inv, states, lambda s: {"nbytes": GB, "tensors": 400})
    assert counted.model_tensors == {"q": 400}
    [remote] = plan("q", counted, states).options
    assert remote.tier == "remote" and remote.load.fixed_seconds == pytest.approx(0.2 + 1e-5 * 300)
    [probe] = plan("q", replace(counted, model_tensors={}), states).options
    assert probe.load.fixed_seconds == pytest.approx(0.2)
    # a node that has the index wins over the inventory's count
    states_b = {**states, "b": state("b", tiers={"q": ("ssd",)}, model_tensors={"q": 200})}
    inv_b = replace(counted, nodes={**counted.nodes, "b": replace(spec, name="b")})
    a = next(o for o in plan("q", inv_b, states_b).options if o.node == "a")
    assert a.load.fixed_seconds == pytest.approx(0.2 + 1e-5 * 100)


def test_a_nodes_tensor_count_corrects_the_fixed_cost_of_every_nodes_load():
    """A node that has the checkpoint's index reports its tensor count; the per-tensor part of
    each node's fixed cost (its profile's) uses it, here for a DRAM hit elsewhere."""
    from dataclasses import replace

    spec = replace(load_path_node(), load_seconds_per_tensor=1e-5, load_probe_tensors=100)
    inv = Inventory({"a": replace(spec, name="a"), "b": replace(spec, name="b")}, model_bytes={"m": GB})
    counted = {"a": state("a", tiers={"m": ("dram",)}), "b": state("b", tiers={"m": ("ssd",)}, model_tensors={"m": 300})}
    p = plan("m", inv, counted)
    dram = next(o for o in p.options if o.node == "a")
    assert dram.load.fixed_seconds == pytest.approx(0.003 + 1e-5 * 200)
    unknown = plan("m", inv, {"a": state("a", tiers={"m": ("dram",)}), "b": state("b", tiers={"m": ("ssd",)})})
    assert next(o for o in unknown.options if o.node == "a").load.fixed_seconds == pytest.approx(0.003)


def test_a_node_without_the_models_tokenizer_parses_one_beside_the_load():
    """A node that lists the tokenizers it holds and lacks m's parses one (0.3 s): beside the
    transfer and the fixed cost of a copy it holds (DRAM: 0.1 + 0.1 s, so 0.3 s in all), after
    a remote pull beside the fixed cost only (2.025 s + 0.3 s)."""
    inv = Inventory({n: gpu_node(n, tokenizer_seconds=0.3) for n in ("a", "b", "c")}, model_bytes={"m": GB})
    states = {"a": state("a", tiers={"m": ("dram",)}, tokenizers=frozenset()),
              "b": state("b", tiers={"m": ("dram",)}, tokenizers=frozenset({"m"})),
              "c": state("c", tiers={"m": ("dram",)})}  # reports none: nothing counted
    p = plan("m", inv, states)
    assert [(o.node, o.seconds) for o in p.options] == [("b", pytest.approx(0.2)), ("c", pytest.approx(0.2)),
                                                        ("a", pytest.approx(0.3))]
    assert p.options[2].load.fixed_seconds == pytest.approx(0.2)
    remote = {"a": state("a", tokenizers=frozenset())}
    assert plan("m", inv, remote).options[0].seconds == pytest.approx(2.025 + 0.3)
    local = {"a": state("a", tiers={"m": ("local",)}, tokenizers=frozenset())}
    assert plan("m", inv, local).options[0].seconds == pytest.approx(0.625)  # max(0.525 read + 0.1, 0.3)
    slow = Inventory({"a": gpu_node("a", tokenizer_seconds=0.9)}, model_bytes={"m": GB})
    assert plan("m", slow, local).options[0].seconds == pytest.approx(0.9)  # the parse outlasts the read
