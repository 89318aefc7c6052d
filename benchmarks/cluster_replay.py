"""Replay a trace through three real ``sllm serve`` front doors, and check the simulator against it.

A program, not a test: it prints tables and one JSON line, and asserts nothing on time.

1. **Validation.** It builds several small random-weight GPT-2 checkpoints, serves them from
   a remote over HTTP on loopback (throttled, a child process), starts three ``sllm serve``
   nodes (each its own port, cache directory, DRAM tier and memory budget, all with
   ``--inventory``), calibrates the node profile on one node with a model the trace does not
   use (its cold start from the remote, SSD and DRAM as the server reports it, its
   prefill fit and decode rate from ``/status``, and the parse of its tokenizer, which a
   node pays at its first load of each model), then replays the first minutes of the
   Azure conversation trace (rescaled to ``--rps``, token counts clipped to what the tiny
   models take, each request for one of the models, Zipf popularity) through the three
   front doors in turn, measuring every request's time to first token. Then it runs
   ``--simulate``'s code (policy ``sllm``) on the same inventory, models and requests (each
   entering at the same front door; a forwarded one pays the hop measured at calibration:
   a warm request through another node less the same request sent straight) and compares
   P50 and P99.
2. **Policy table** (``--policy-table``, no servers): the simulated policies on the Azure
   conversation trace at several rates, on ``benchmarks/gpu_cluster.toml`` (or ``--inventory``,
   e.g. ``benchmarks/gpu_cluster_contended.toml``: one 13.4 GB model per GPU), each model's
   checkpoint on ``--replicas`` nodes' SSD at the start.

Usage::

    .venv/bin/python benchmarks/cluster_replay.py --duration 150 --rps 1.0
    .venv/bin/python benchmarks/cluster_replay.py --policy-table --rates 0.5,1,2,3
    .venv/bin/python benchmarks/cluster_replay.py --policy-table --inventory benchmarks/gpu_cluster_contended.toml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

#: The Azure conversation trace: $SLLM_TRACES, else ``shared/traces`` beside the checkout or a folder above it.
TRACES = os.environ.get("SLLM_TRACES") or next(
    (p / "shared" / "traces" for p in ROOT.parents if (p / "shared" / "traces").is_dir()), ROOT.parent / "shared" / "traces")
TRACE = Path(TRACES) / "AzureLLMInferenceTrace_conv.csv"
CONFIG = dict(n_layer=2, n_embd=256, n_head=4)  # about 59 MB in float32
#: Each node's --kv-cache-memory: 2,048 tokens of these models (4 KiB a token), room for the replay's few concurrent
#: requests, so that two models (weights + KV) fit a node's --max-memory of 2.5 models' weights, as in the simulation.
KV_CACHE_BYTES = 8 << 20
FORWARDED = "x-sllm-forwarded-by"
NODES = ("a", "b", "c")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path, count: int) -> dict[str, int]:
    """``count`` models plus ``calib`` in ``work/remote``; name -> bytes."""
    from sllm.core.convert import convert
    from sllm.core.format import MANIFEST_FILE, open_checkpoint
    from sllm.zoo import build_random_checkpoint

    sizes = {}
    for name in [f"m{i}" for i in range(count)] + ["calib"]:
        dst = work / "remote" / name
        if not (dst / MANIFEST_FILE).exists():
            hf = build_random_checkpoint("gpt2", work / "hf" / name, seed=len(sizes) + 7, **CONFIG)
            convert(hf, dst)
            shutil.rmtree(hf)
        sizes[name] = open_checkpoint(dst).manifest.total_bytes
    return sizes


def inventory_doc(ports: dict[str, int], remote: str, nbytes: int, prof: dict) -> dict:
    nodes = {}
    for n, p in ports.items():
        nodes[n] = {
            "url": f"http://127.0.0.1:{p}", "max_memory_bytes": int(2.5 * nbytes),
            "device": {"kind": "cpu"},
            "tiers": {"dram": {"gbps": 10.0, "capacity_bytes": int(3.5 * nbytes)},
                      "ssd": {"gbps": prof["ssd_gbps"]}, "remote": {"gbps": prof["remote_gbps"]}},
            "loader": {"fixed_seconds": prof["fixed_seconds"], "pipelined": True,
                       "tokenizer_seconds": prof.get("tokenizer_seconds", 0.0)},
            "engine": {"prefill_a_seconds_per_token": prof["a"], "prefill_b_seconds": prof["b"],
                       "decode_seconds_per_token": prof["decode"]},
        }
    return {"remote": {"url": remote}, "nodes": nodes}


class Nodes:
    def __init__(self, work: Path, remote_url: str, nbytes: int, keep_alive: float) -> None:
        self.work, self.remote_url, self.nbytes, self.keep_alive = work, remote_url, nbytes, keep_alive
        self.ports = {n: free_port() for n in NODES}
        self.inventory = work / "cluster.toml"
        self.procs: dict[str, subprocess.Popen] = {}

    def url(self, n: str) -> str:
        return f"http://127.0.0.1:{self.ports[n]}"

    def write_inventory(self, prof: dict) -> None:
        import tomli_w

        self.inventory.write_text(tomli_w.dumps(inventory_doc(self.ports, self.remote_url, self.nbytes, prof)))

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for n in NODES:
            cache = self.work / f"cache-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            cmd = [sys.executable, "-m", "sllm", "serve", "--port", str(self.ports[n]), "--cache-dir", str(cache),
                   "--remote", self.remote_url, "--dram-capacity", str(int(3.5 * self.nbytes)),
                   "--max-memory", str(int(2.5 * self.nbytes)), "--kv-cache-memory", str(KV_CACHE_BYTES),
                   "--keep-alive", str(self.keep_alive),
                   "--inventory", str(self.inventory), "--node-name", n]
            self.procs[n] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.work / f"{n}.log", "w"),
                                             env=env)
        deadline = time.monotonic() + 120
        for n in NODES:
            while True:
                if self.procs[n].poll() is not None:
                    raise SystemExit(f"node {n} exited: {(self.work / f'{n}.log').read_text()[-2000:]}")
                try:
                    if httpx.get(self.url(n) + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"node {n} did not start")
                time.sleep(0.2)

    def close(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def complete(url: str, model: str, prompt: list[int], max_tokens: int, headers: dict | None = None,
             info: dict | None = None) -> float:
    """Stream one completion; seconds to its first event. ``info`` gets the node that served it
    and the seconds it spent loading the model (its response headers)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers or {}, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        if info is not None:
            info.update(served_by=r.headers.get("x-sllm-served-by"),
                        load_seconds=float(r.headers.get("x-sllm-load-seconds") or 0.0))
        for line in r.iter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


def warm(nodes: Nodes) -> None:
    """One untimed cold start of ``calib`` on every node, then ``calib`` evicted from every tier: a
    node's first load pays one-time costs (transformers' import of the architecture, the first
    forward pass) that a node serving for a while has paid long before; its caches stay empty."""
    for n in NODES:
        complete(nodes.url(n), "calib", [1, 2, 3, 4], 2, {FORWARDED: "warm-up"})
        httpx.post(nodes.url(n) + "/v1/cache/calib/evict", timeout=30)


#: Warm requests straight to node a and through node b, in turns, for the hop and a request's own way
#: (a 2-core VM's speed drifts by a third over seconds; five of each, one after the other, were not enough).
CALIBRATION_PAIRS = 15


def calibrate(nodes: Nodes, nbytes: int) -> dict:
    """The node profile from one node's own cold starts of ``calib`` and its /status fits (after one
    untimed cold start on every node, which warms them as nodes that have been serving are)."""
    from sllm.core.estimator import prefill_seconds
    from sllm.core.inventory import PrefillFit
    from sllm.core.profile import measure_tokenizer_seconds

    url, pin = nodes.url("a"), {FORWARDED: "calibration"}
    loads = {}

    def cold(tier: str) -> None:
        complete(url, "calib", [1, 2, 3, 4], 2, pin)
        last = httpx.get(url + "/status", timeout=30).json()["last_cold_start"]
        assert last["tier"] == tier, last
        loads[tier] = last["load_seconds"]

    warm(nodes)
    cold("remote")
    httpx.post(url + "/v1/cache/calib/evict", params={"tier": "device"}, timeout=30)
    httpx.post(url + "/v1/cache/calib/evict", params={"tier": "dram"}, timeout=30)
    from sllm.io.reader import evict_page_cache

    for part in (nodes.work / "cache-a").rglob("*.bin"):
        evict_page_cache(part)
    cold("ssd")
    httpx.post(url + "/v1/cache/calib/evict", params={"tier": "device"}, timeout=30)
    cold("dram")
    for n in (16, 48, 96, 160, 240, 320, 400, 480):  # prefill samples for the node's fit
        complete(url, "calib", [(7 * i) % 50000 for i in range(n)], 12, pin)
    st = httpx.get(url + "/status", timeout=30).json()
    fit, engine = st["prefill_fit"]["calib"], st["engine"]
    prompt = [(7 * i) % 50000 for i in range(64)]
    pairs = [(complete(url, "calib", prompt, 2, pin), complete(nodes.url("b"), "calib", prompt, 2))  # b forwards to a
             for _ in range(CALIBRATION_PAIRS)]  # in turns, so a drift of the machine's speed shows in both
    direct, via = statistics.median(d for d, _ in pairs), statistics.median(v for _, v in pairs)
    httpx.post(url + "/v1/cache/calib/evict", timeout=30)  # every tier: the trace starts from empty caches
    # the calibration's cold starts do not show the tokenizer's parse (node a parsed calib's at its warm-up
    # and kept it); the trace's first load of each model on each node pays it
    tokenizer = measure_tokenizer_seconds(nodes.work / "remote" / "calib")
    fixed = loads["dram"]
    return {"fixed_seconds": fixed, "ssd_gbps": nbytes / max(1e-6, loads["ssd"] - fixed) / 1e9,
            "remote_gbps": nbytes / max(1e-6, loads["remote"] - fixed) / 1e9, "a": fit["a_seconds_per_token"],
            "b": fit["b_seconds"], "fit_samples": fit["samples"], "decode": engine["decode_seconds_per_token"],
            "forward_seconds": max(0.0, via - direct), "cold_starts": loads, "tokenizer_seconds": tokenizer,
            "request_seconds": max(0.0, direct - prefill_seconds(len(prompt), PrefillFit(fit["a_seconds_per_token"],
                                                                                         fit["b_seconds"], 0)))}


def workload(rps: float, duration: float, models: list[str], seed: int, max_prompt: int, max_gen: int):
    from dataclasses import replace

    from sllm.core.workload import assign_models, read_azure_trace

    reqs = read_azure_trace(TRACE, rps=rps, duration=duration)
    reqs = [replace(r, prompt_tokens=max(1, min(r.prompt_tokens, max_prompt)),
                    generated_tokens=max(1, min(r.generated_tokens, max_gen)), door=NODES[i % len(NODES)])
            for i, r in enumerate(reqs)]  # the front doors in turn
    return assign_models(reqs, models, seed=seed, popularity="zipf:1")


def replay(nodes: Nodes, reqs) -> list[dict]:
    out: list[dict] = []
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.5

    def one(i: int, r) -> None:
        time.sleep(max(0.0, t0 + r.arrival_seconds - time.perf_counter()))
        door = r.door
        prompt = [(r.id * 31 + k * 7) % 50000 for k in range(r.prompt_tokens)]
        info: dict = {}
        try:
            ttft, err = complete(nodes.url(door), r.model, prompt, r.generated_tokens, info=info), None
        except Exception as exc:  # noqa: BLE001 - recorded, reported
            ttft, err = None, str(exc)
        with lock:
            out.append({"id": r.id, "model": r.model, "door": door, "arrival_seconds": r.arrival_seconds,
                        "ttft_seconds": ttft, "error": err, **info})

    threads = [threading.Thread(target=one, args=(i, r), daemon=True) for i, r in enumerate(reqs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return sorted(out, key=lambda x: x["id"])


def pct(xs: list[float], p: float) -> float:
    from sllm.core.simulate import percentile

    return percentile(xs, p)


def policy_table(rates: list[float], duration: float, seed: int, inventory: Path = BENCH / "gpu_cluster.toml",
                 replicas: int = 1) -> list[dict]:
    from sllm.core.inventory import TomlInventory
    from sllm.core.simulate import POLICIES, SimConfig, estimate_errors, simulate
    from sllm.core.workload import assign_models, parse_models, read_azure_trace

    inv = TomlInventory(inventory).load()
    sizes = parse_models("opt-6.7b=13.4GBx64")
    rows = []
    for rps in rates:
        reqs = assign_models(read_azure_trace(TRACE, rps=rps, duration=duration), list(sizes), seed=seed,
                             popularity="zipf:1")
        for res in simulate(inv, sizes, reqs, POLICIES, SimConfig(seed=seed, replicas=replicas)):
            rows.append({"rps": rps, "requests": len(reqs), "policy": res.policy, "mean": res.ttft_mean_seconds,
                         "p50": res.ttft_p50_seconds, "p99": res.ttft_p99_seconds, "warm": res.warm_fraction,
                         "queued": res.queued_requests, "migrations": res.migrations, "loads": res.loads,
                         "failed": res.requests - res.served,
                         "estimate_errors": {a: {"requests": n, "median_signed": round(sg, 4), "median_abs": round(ab, 4)}
                                             for a, (n, sg, ab) in estimate_errors(res.records).items()}})
    budgets = sorted({s.memory_budget_bytes or 0 for s in inv.nodes.values()})
    print(f"simulated policies, {TRACE.name}, {duration:g} s at each rate, {len(inv.nodes)} nodes "
          f"({'/'.join(f'{b / 1e9:g}' for b in budgets)} GB of weights each), 64 x 13.4 GB models, Zipf(1) popularity, "
          f"{replicas} SSD cop{'y' if replicas == 1 else 'ies'} of each at the start ({inventory.name})")
    print(f"{'rps':>5} {'policy':<18}{'mean s':>9}{'P50 s':>9}{'P99 s':>9}{'warm':>7}{'queued':>8}{'failed':>8}"
          f"{'migr':>6}  {'P99 vs sllm':>11}  (P99 counts a failed request as infinitely late)")
    for rps in rates:
        sl = next(r for r in rows if r["rps"] == rps and r["policy"] == "sllm")
        for r in (r for r in rows if r["rps"] == rps):
            print(f"{rps:>5g} {r['policy']:<18}{r['mean']:>9.2f}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['warm']:>7.0%}"
                  f"{r['queued']:>8}{r['failed']:>8}{r['migrations']:>6}  {r['p99'] / sl['p99']:>10.2f}x")
    print("the sllm policy's estimated time to first token against the simulated one, per action "
          "(requests: median signed error, median absolute error)")
    for rps in rates:
        sl = next(r for r in rows if r["rps"] == rps and r["policy"] == "sllm")
        print(f"{rps:>5g} " + ", ".join(f"{a} {e['requests']}: {e['median_signed']:+.1%} / {e['median_abs']:.1%}"
                                       for a, e in sl["estimate_errors"].items()))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=150.0, help="seconds of trace to replay (default 150)")
    ap.add_argument("--rps", type=float, default=1.0, help="mean request rate of the replay (default 1.0)")
    ap.add_argument("--models", type=int, default=6, help="models the trace asks for (default 6)")
    ap.add_argument("--throttle-mbps", type=float, default=100.0, help="the remote's rate, MB/s (default 100)")
    ap.add_argument("--keep-alive", type=float, default=15.0, help="the nodes' --keep-alive, seconds (default 15)")
    ap.add_argument("--max-prompt", type=int, default=256, help="clip prompts to this many tokens (default 256)")
    ap.add_argument("--max-gen", type=int, default=16, help="clip completions to this many tokens (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="models and caches (default: a temporary directory); models are reused")
    ap.add_argument("--prepare-only", action="store_true", help="build the models into --workdir and stop")
    ap.add_argument("--policy-table", action="store_true", help="only the simulated policy table (no servers)")
    ap.add_argument("--rates", default="0.5,1,2,3", help="with --policy-table: request rates, req/s")
    ap.add_argument("--table-duration", type=float, default=1200.0, help="with --policy-table: trace seconds")
    ap.add_argument("--inventory", type=Path, default=BENCH / "gpu_cluster.toml",
                    help="with --policy-table: the cluster (default benchmarks/gpu_cluster.toml)")
    ap.add_argument("--replicas", type=int, default=1,
                    help="with --policy-table: SSD copies of each model at the start (default 1)")
    args = ap.parse_args()
    if args.policy_table:
        rows = policy_table([float(x) for x in args.rates.split(",")], args.table_duration, args.seed, args.inventory,
                            args.replicas)
        print(json.dumps({"benchmark": "cluster_policy_table", "trace": TRACE.name, "inventory": str(args.inventory),
                          "replicas": args.replicas, "rows": rows}))
        return 0

    from tier_pipeline import ChildServer

    from sllm.core.inventory import TomlInventory
    from sllm.core.simulate import SimConfig, Simulation

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sllm-replay-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = prepare(work, args.models)
    if args.prepare_only:
        print(work)
        return 0
    nbytes = sizes["calib"]
    server = ChildServer(work / "remote", args.throttle_mbps * 1e6)
    nodes = Nodes(work, server.url, nbytes, args.keep_alive)
    try:
        nodes.write_inventory({"fixed_seconds": 0.1, "ssd_gbps": 1.0, "remote_gbps": 0.1, "a": 1e-3, "b": 0.05,
                               "decode": 0.01})  # placeholders until calibrated: the nodes reread nothing
        nodes.start()
        prof = calibrate(nodes, nbytes)
        nodes.write_inventory(prof)  # the front doors keep their inventory; only bandwidth figures differ
        nodes.close()
        nodes.start()  # restart with the calibrated inventory and empty caches
        warm(nodes)
        models = [m for m in sizes if m != "calib"]
        reqs = workload(args.rps, args.duration, models, args.seed, args.max_prompt, args.max_gen)
        measured = replay(nodes, reqs)
    finally:
        nodes.close()
        server.close()
    inv = TomlInventory(nodes.inventory).load()
    sim = Simulation(inv, {m: sizes[m] for m in models}, reqs, "sllm",
                     SimConfig(keep_alive_seconds=args.keep_alive, replicas=0, seed=args.seed,
                               forward_seconds=prof["forward_seconds"], request_seconds=prof["request_seconds"])).run()
    got = [m["ttft_seconds"] for m in measured if m["ttft_seconds"] is not None]
    simulated = [r.ttft_seconds for r in sim.records if r.ttft_seconds is not None]
    errors = [m for m in measured if m["error"]]
    print(f"calibrated on node a: fixed {prof['fixed_seconds']:.3f} s, ssd {prof['ssd_gbps']:.3f} GB/s, remote "
          f"{prof['remote_gbps']:.3f} GB/s (HTTP throttled to {args.throttle_mbps:g} MB/s), prefill "
          f"{prof['a'] * 1e6:.1f} us/token + {prof['b'] * 1e3:.1f} ms ({prof['fit_samples']} samples), decode "
          f"{prof['decode'] * 1e3:.1f} ms/token, front-door hop {prof['forward_seconds'] * 1e3:.1f} ms, a request's "
          f"own way beyond its prefill {prof['request_seconds'] * 1e3:.1f} ms, a tokenizer's parse "
          f"{prof['tokenizer_seconds'] * 1e3:.0f} ms")
    print(f"replayed {len(reqs)} requests ({len(errors)} failed) over {args.duration:g} s at {args.rps:g} req/s, "
          f"{len(models)} models of {nbytes / 1e6:.0f} MB, 3 nodes (2.5 models of memory, 3.5 of DRAM each)")
    print(f"{'':<10}{'mean s':>9}{'P50 s':>9}{'P90 s':>9}{'P99 s':>9}")
    for name, xs in (("measured", got), ("simulated", simulated)):
        print(f"{name:<10}{statistics.fmean(xs):>9.3f}{pct(xs, 50):>9.3f}{pct(xs, 90):>9.3f}{pct(xs, 99):>9.3f}")
    e50 = abs(pct(simulated, 50) - pct(got, 50)) / pct(got, 50)
    e99 = abs(pct(simulated, 99) - pct(got, 99)) / pct(got, 99)
    print(f"simulator error: P50 {e50:.1%}, P99 {e99:.1%}; simulated loads {sim.loads}, warm {sim.warm_fraction:.0%}")
    print(json.dumps({
        "benchmark": "cluster_replay", "requests": len(reqs), "failed": len(errors), "rps": args.rps,
        "duration_seconds": args.duration, "models": len(models), "model_bytes": nbytes, "profile": prof,
        "measured": {"mean": statistics.fmean(got), "p50": pct(got, 50), "p90": pct(got, 90), "p99": pct(got, 99)},
        "simulated": {"mean": sim.ttft_mean_seconds, "p50": sim.ttft_p50_seconds, "p90": sim.ttft_p90_seconds,
                      "p99": sim.ttft_p99_seconds, "loads": sim.loads, "warm_fraction": sim.warm_fraction},
        "p50_error": round(e50, 4), "p99_error": round(e99, 4),
        "errors": [e["error"] for e in errors][:5],
        "slowest": sorted((m for m in measured if m["ttft_seconds"] is not None), key=lambda m: -m["ttft_seconds"])[:8],
    }))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
