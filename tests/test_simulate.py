"""The workload readers and the discrete-event simulator on plain data: hand-computed cold,
warm, queued and budget-bound requests, a migration, policy determinism, and the CLI."""

from __future__ import annotations

import json

import pytest
from test_estimator import GB, gpu_node
from typer.testing import CliRunner

from sllm.cli import app
from sllm.core.inventory import Inventory, PrefillFit
from sllm.core.simulate import POLICIES, SimConfig, Simulation, estimate_errors, percentile, simulate
from sllm.core.workload import Request, assign_models, gamma_arrivals, parse_models, parse_trace_spec, read_azure_trace
from sllm.errors import UsageError

FIT = PrefillFit(1e-3, 0.01, 0)
CFG = SimConfig(keep_alive_seconds=10.0, prefill=FIT, decode_seconds_per_token=0.01)
TRACE = "TIMESTAMP,ContextTokens,GeneratedTokens\n" \
        "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.6805900,396,109\n2023-11-16 18:15:56.6805900,10,5\n"


def one_node(**kw) -> Inventory:
    return Inventory({"a": gpu_node("a", **kw)})


def req(i: int, t: float, model: str, ctx: int = 100, gen: int = 10) -> Request:
    return Request(i, t, ctx, gen, model)


def test_read_azure_trace_rescale_and_cut(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text(TRACE)
    rs = read_azure_trace(p)
    assert [r.arrival_seconds for r in rs] == pytest.approx([0.0, 4.0, 10.0])
    assert (rs[0].prompt_tokens, rs[0].generated_tokens) == (374, 44)
    fast = read_azure_trace(p, rps=3.0)  # 3 requests over 10 s = 0.3 req/s recorded: times / 10
    assert [r.arrival_seconds for r in fast] == pytest.approx([0.0, 0.4, 1.0])
    assert len(read_azure_trace(p, duration=5)) == 2
    assert parse_trace_spec(str(p))[2].generated_tokens == 5


@pytest.mark.parametrize("text, message", [
    ("a,b\n1,2\n", "not an Azure LLM inference trace"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,x,1\n", "t.csv:2: token counts"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n", "t.csv:2: TIMESTAMP 'yesterday'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
])
def test_bad_traces(tmp_path, text, message):
    p = tmp_path / "t.csv"
    p.write_text(text)
    with pytest.raises(UsageError, match=message):
        read_azure_trace(p)


def test_gamma_and_models_specs():
    a = gamma_arrivals(2.0, 4.0, 500, seed=3)
    assert a == gamma_arrivals(2.0, 4.0, 500, seed=3) and a != gamma_arrivals(2.0, 4.0, 500, seed=4)
    assert all(0 <= x.arrival_seconds < 500 for x in a) and 200 < len(a) < 2000
    g = parse_trace_spec("gamma:rps=1,cv=1,duration=50,prompt=7,gen=3", seed=1)
    assert g and {(r.prompt_tokens, r.generated_tokens) for r in g} == {(7, 3)}
    with pytest.raises(UsageError, match="unknown key 'speed'"):
        parse_trace_spec("gamma:speed=1")
    assert parse_models("a=1GB,b=2GiBx2") == {"a": 10**9, "b-0": 2 * 2**30, "b-1": 2 * 2**30}
    assert parse_models("known", {"known": 5}) == {"known": 5}
    with pytest.raises(UsageError, match="give NAME=SIZE"):
        parse_models("nosize")
    reqs = assign_models([req(i, i, "") for i in range(200)], ["m0", "m1", "m2"], popularity="zipf:2")
    counts = [sum(r.model == m for r in reqs) for m in ("m0", "m1", "m2")]
    assert counts[0] > counts[1] > counts[2]


def test_cold_warm_and_dram_reload_hand_computed():
    # cold from SSD: 0.625 s load + 0.11 s prefill; warm: 0.11; after keep-alive (10 s): from DRAM, 0.2 + 0.11
    reqs = [req(0, 0.0, "m"), req(1, 1.0, "m"), req(2, 30.0, "m")]
    res = Simulation(one_node(), {"m": GB}, reqs, "sllm", CFG).run()
    [r0, r1, r2] = res.records
    assert (r0.tier, r1.tier, r2.tier) == ("ssd", "device", "dram")
    assert [r.ttft_seconds for r in res.records] == pytest.approx([0.735, 0.11, 0.31])
    assert res.loads == {"dram": 1, "ssd": 1} and res.warm_fraction == pytest.approx(1 / 3)
    assert res.ttft_p50_seconds == pytest.approx(0.31) and res.ttft_max_seconds == pytest.approx(0.735)


def test_second_model_queues_behind_the_first_load():
    res = Simulation(one_node(), {"m": GB, "n": GB}, [req(0, 0.0, "m"), req(1, 0.0, "n")], "sllm",
                     replace_replicas(CFG, 0)).run()
    # both from the remote (no replicas): the link pulls one at a time (2.025 s each), then each pays the
    # fixed cost (0.1 s) and prefills (0.11 s)
    assert [r.ttft_seconds for r in res.records] == pytest.approx([2.125 + 0.11, 4.05 + 0.1 + 0.11])
    assert res.records[1].queued_seconds == pytest.approx(2.025) and res.queued_requests == 1


def test_a_dram_hit_does_not_wait_behind_a_remote_pull():
    sim = Simulation(one_node(), {"m": GB, "n": GB}, [req(0, 0.0, "m"), req(1, 0.0, "n")], "sllm",
                     replace_replicas(CFG, 0))
    sim.nodes["a"].dram.put("n", GB)
    res = sim.run()
    assert res.records[1].tier == "dram" and res.records[1].ttft_seconds == pytest.approx(0.2 + 0.11)
    assert res.records[1].queued_seconds == 0


def replace_replicas(cfg: SimConfig, n: int) -> SimConfig:
    from dataclasses import replace

    return replace(cfg, replicas=n)


def test_memory_budget_makes_a_load_wait_for_a_busy_model():
    inv = one_node(max_memory_bytes=GB)
    reqs = [req(0, 0.0, "m", gen=500), req(1, 0.1, "n")]
    res = Simulation(inv, {"m": GB, "n": GB}, reqs, "sllm-no-migration", replace_replicas(CFG, 0)).run()
    r1 = res.records[1]
    # m: remote 2.125 s + prefill 0.11, then 500 tokens (5 s): done at 7.235 s. n's pull waits for the link
    # (until 2.025 s) and ends at 4.05 s; then n waits for m's room, pays the fixed cost, prefills; it arrived at 0.1 s
    assert res.records[0].ttft_seconds == pytest.approx(2.235)
    assert r1.ttft_seconds == pytest.approx(7.235 + 0.1 + 0.11 - 0.1)
    assert r1.queued_seconds == pytest.approx(7.335 - 0.1 - 2.125)


def test_a_load_that_finds_no_room_within_the_budget_wait_fails_with_its_requests():
    import math
    from dataclasses import replace

    inv = one_node(max_memory_bytes=GB)
    # as above: n's pull ends at 4.05 s; m holds the budget until 7.235 s (every request generates 500
    # tokens, so the scheduler, which knows the mean completion length only, sees that too)
    reqs = [req(0, 0.0, "m", gen=500), req(1, 0.1, "n", gen=500), req(2, 4.5, "n", gen=500)]
    cfg = replace(replace_replicas(CFG, 0), budget_wait_seconds=1.0)
    res = Simulation(inv, {"m": GB, "n": GB}, reqs, "sllm-no-migration", cfg).run()
    _, r1, r2 = res.records
    assert r1.ttft_seconds is None and r1.startup_seconds == pytest.approx(4.05 + 1.0 - 0.1)  # failed at 5.05 s
    assert r2.ttft_seconds is None and r2.startup_seconds == pytest.approx(5.05 - 4.5)  # it waited for that load
    assert r1.action is None  # the nodes report the limit: the scheduler offers no wait of 3 s after the fetch
    assert res.served == 1 and res.ttft_p99_seconds == math.inf and res.ttft_mean_seconds == pytest.approx(2.235)
    patient = Simulation(inv, {"m": GB, "n": GB}, reqs, "sllm-no-migration", replace(cfg, budget_wait_seconds=None)).run()
    assert patient.served == 3 and patient.records[1].action == "wait"
    assert patient.records[1].ttft_seconds == pytest.approx(7.235 + 0.1 + 0.11 - 0.1)


def test_migration_frees_the_node_holding_the_model_in_dram():
    inv = Inventory({"a": gpu_node("a", max_memory_bytes=GB), "b": gpu_node("b", max_memory_bytes=GB)})
    sim = Simulation(inv, {"m": GB, "x": GB}, [], "sllm", replace_replicas(CFG, 0))
    a, b = sim.nodes["a"], sim.nodes["b"]
    a.dram.put("m", GB)
    b.ssd.put("x", GB)
    a.ssd.put("x", GB)
    sim.requests = [req(0, 0.0, "x", gen=1000), req(1, 1.0, "m")]  # x busy on a (10 s) when m arrives
    res = sim.run()
    assert res.migrations == 1
    r0, r1 = res.records
    assert r0.node == "a" and r1.node == "a" and r1.tier == "dram"
    # migrating x: b loads it from SSD (0.625 s), re-prefills 100 + ~26 tokens (~0.136 s); then m from DRAM
    assert 1.0 < r1.ttft_seconds < 1.5
    nomig = Simulation(inv, {"m": GB, "x": GB}, [], "sllm-no-migration", replace_replicas(CFG, 0))
    nomig.nodes["a"].dram.put("m", GB)
    nomig.nodes["b"].ssd.put("x", GB)
    nomig.nodes["a"].ssd.put("x", GB)
    nomig.requests = sim.requests
    assert nomig.run().records[1].ttft_seconds > r1.ttft_seconds


def test_a_request_while_every_node_is_full_of_loads_in_progress_waits_where_its_model_is():
    # 1 GB budgets: x loads on a (its SSD), y on b (its SSD, two requests). m, on b's SSD only, arrives at 0.1 s
    # while both nodes' budgets are held by those loads: b frees y's room once y has served (0.625 s left of
    # the load, then 0.11 s prefill + 10 tokens * 0.01 s), a frees x's at the same time but pulls m from the remote
    inv = Inventory({n: gpu_node(n, max_memory_bytes=GB) for n in ("a", "b")})
    reqs = [req(0, 0.0, "x"), req(1, 0.0, "y"), req(2, 0.0, "y"), req(3, 0.1, "m")]
    sim = Simulation(inv, {"m": GB, "x": GB, "y": GB}, reqs, "sllm", replace_replicas(CFG, 0))
    sim.nodes["a"].ssd.put("x", GB)
    sim.nodes["b"].ssd.put("y", GB)
    sim.nodes["b"].ssd.put("m", GB)
    chosen = []
    choose = sim.choose

    def recording(r):
        chosen.append(choose(r))
        return chosen[-1]

    sim.choose = recording
    res = sim.run()
    r3 = res.records[3]
    # (no node had a feasible option for m before loads in progress counted as freeing room: m went to the
    # least busy node, a, and pulled m from the remote there: 2.235 s)
    assert [r.node for r in res.records] == ["a", "b", "b", "b"] and r3.tier == "ssd"
    # the scheduler's option for m on b: y's load has 0.525 s left, then it serves (b 0.01 s + the mean 10
    # tokens * 0.01 s): room at 0.635 s. Meanwhile m is read (0.525 s behind y on the disk + 0.525 s), which
    # ends later, at 1.05 s; then the fixed cost (0.1 s) and the prefill (0.11 s)
    option = chosen[3][1]
    assert option.action == "wait" and option.freeing_seconds == pytest.approx(0.635)
    assert option.seconds == pytest.approx(max(0.635, 0.525 + 0.525) + 0.1 + 0.11)
    # simulated: m's SSD read waits for y's (until 0.525 s), ends at 1.05 s; y is idle by then (0.625 + 0.11 +
    # 0.1): m takes its room, pays the fixed cost (0.1 s) and prefills (0.11 s); it arrived at 0.1 s
    assert r3.ttft_seconds == pytest.approx(1.05 + 0.1 + 0.11 - 0.1)
    # the record keeps the option beside what happened: the estimate is 0.1 s (8.6 %) high, y's fixed cost
    # counted in m's queue though y leaves the disk before it
    assert (r3.action, r3.estimate_seconds) == ("wait", pytest.approx(option.seconds))
    n, signed, absolute = estimate_errors(res.records)["wait"]
    assert n == 1 and signed == pytest.approx((1.26 - 1.16) / 1.16) and absolute == pytest.approx(signed)


def test_policies_are_deterministic_and_sllm_beats_random():
    inv = Inventory({n: gpu_node(n, max_memory_bytes=3 * GB) for n in ("a", "b", "c")})
    models = {f"m{i}": GB for i in range(12)}
    reqs = assign_models(gamma_arrivals(2.0, 2.0, 120, seed=1, prompt_tokens=200, generated_tokens=50), list(models),
                         popularity="zipf:1", seed=1)
    first = simulate(inv, models, reqs, POLICIES, CFG)
    again = simulate(inv, models, reqs, POLICIES, CFG)
    assert [r.records for r in first] == [r.records for r in again]
    by = {r.policy: r for r in first}
    assert all(r.served == len(reqs) for r in first)
    assert by["sllm"].ttft_p99_seconds < by["random"].ttft_p99_seconds
    assert by["sllm"].ttft_mean_seconds <= by["availability"].ttft_mean_seconds
    with pytest.raises(UsageError, match="--policy 'best'"):
        Simulation(inv, models, reqs, "best")
    assert percentile([3, 1, 2, 4], 50) == 2 and percentile([1, 2, 3, 4], 99) == 4


def test_cli_simulate_json_and_plot(tmp_path):
    inv = tmp_path / "c.toml"
    inv.write_text('[remote]\nurl = "http://store"\ngbps = 1.0\n'
                   + "".join(f'[nodes.{n}]\nurl = "http://{n}:1"\nmax_memory_bytes = 4000000000\n'
                             f'[nodes.{n}.tiers.ssd]\ngbps = 2.0\n' for n in ("a", "b")))
    r = CliRunner().invoke(app, ["schedule-plan", "--inventory", str(inv), "--simulate", "gamma:rps=1,cv=2,duration=60",
                                 "--models", "m=1GBx4", "--policy", "sllm,random", "--json",
                                 "--plot", str(tmp_path / "cdf.png")])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [p["policy"] for p in doc["policies"]] == ["sllm", "random"] and doc["requests"] > 10
    assert (tmp_path / "cdf.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(app, ["schedule-plan", "--inventory", str(inv), "--simulate", "gamma:rps=1",
                                   "--models", "m=1GB", "--policy", "nope"])
    assert bad.exit_code == 2 and "--policy 'nope'" in bad.stderr


def test_a_request_entering_at_another_node_pays_the_front_door_hop():
    from dataclasses import replace

    inv = Inventory({"a": gpu_node("a"), "b": gpu_node("b")})
    cfg = replace(CFG, forward_seconds=0.05)
    reqs = [replace(req(0, 0.0, "m"), door="b"), replace(req(1, 5.0, "m"), door="b"), replace(req(2, 6.0, "m"), door="a")]
    res = Simulation(inv, {"m": GB}, reqs, "sllm", cfg).run()  # replicas=1: m is on a's SSD
    assert [r.node for r in res.records] == ["a", "a", "a"]
    # cold through b (hop + 0.625 s load + 0.11 s prefill), warm through b (hop + prefill), warm at a (prefill)
    assert [r.ttft_seconds for r in res.records] == pytest.approx([0.05 + 0.735, 0.05 + 0.11, 0.11])
    # every request's own way to the engine (HTTP, tokenization) comes on top, hop or not
    res = Simulation(inv, {"m": GB}, reqs, "sllm", replace(cfg, request_seconds=0.02)).run()
    assert [r.ttft_seconds for r in res.records] == pytest.approx([0.07 + 0.735, 0.07 + 0.11, 0.13])


def test_initial_copies_beyond_the_ssd_capacity_keep_the_models_listed_first():
    from dataclasses import replace

    from sllm.core.inventory import TierSpec

    spec = gpu_node("a")
    small = replace(spec, tiers={**spec.tiers, "ssd": TierSpec("ssd", 2.0, capacity_bytes=2 * GB)})
    models = {"m0": GB, "m1": GB, "m2": GB, "m3": GB}  # listed by popularity, as assign_models' Zipf ranks them
    sim = Simulation(Inventory({"a": small}), models, [], "sllm", CFG)
    assert list(sim.nodes["a"].ssd.items) == ["m1", "m0"]  # m0 put last: the most recently used
    two = Simulation(Inventory({"a": small, "b": replace(small, name="b")}), models, [], "sllm", CFG)
    assert sorted(two.nodes["a"].ssd.items) == ["m0", "m2"] and sorted(two.nodes["b"].ssd.items) == ["m1", "m3"]


def test_a_first_load_on_a_node_waits_for_the_tokenizer_parse_beside_the_fixed_cost():
    from dataclasses import replace

    from sllm.server.loading import TOKENIZER_CACHE_SIZE

    assert SimConfig().tokenizer_cache == TOKENIZER_CACHE_SIZE  # as sllm serve keeps them
    reqs = [req(0, 0.0, "m"), req(1, 20.0, "n"), req(2, 40.0, "m")]
    sizes, cfg = {"m": GB, "n": GB}, replace_replicas(CFG, 0)
    # from the remote: the pull (2.025 s), then the parse (0.3 s) beside the fixed cost (0.1 s), then prefill
    # (0.11 s); m's reload from DRAM after the keep-alive: its tokenizer is held, so 0.1 + 0.1 + 0.11
    res = Simulation(one_node(tokenizer_seconds=0.3), sizes, reqs, "sllm", cfg).run()
    assert [r.tier for r in res.records] == ["remote", "remote", "dram"]
    assert [r.ttft_seconds for r in res.records] == pytest.approx([2.435, 2.435, 0.31])
    assert res.records[0].queued_seconds == pytest.approx(0.0)  # the parse is work, not a queue
    # the scheduler's estimate of each load counts the parse as the simulated node pays it
    assert [r.estimate_seconds for r in res.records] == pytest.approx([r.ttft_seconds for r in res.records])
    # a node that keeps one tokenizer parses m's again after n's, beside the DRAM hit's copy and fixed cost
    res = Simulation(one_node(tokenizer_seconds=0.3), sizes, reqs, "sllm", replace(cfg, tokenizer_cache=1)).run()
    assert [r.ttft_seconds for r in res.records] == pytest.approx([2.435, 2.435, 0.3 + 0.11])
    # a parse shorter than what it runs beside hides: the fixed cost after a pull, the read of an SSD copy
    res = Simulation(one_node(tokenizer_seconds=0.05), sizes, reqs, "sllm", cfg).run()
    assert [r.ttft_seconds for r in res.records] == pytest.approx([2.235, 2.235, 0.31])
    res = Simulation(one_node(tokenizer_seconds=0.3), {"m": GB}, [req(0, 0.0, "m")], "sllm", CFG).run()
    assert res.records[0].tier == "ssd" and res.records[0].ttft_seconds == pytest.approx(0.735)
