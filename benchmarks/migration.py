"""What a streaming client sees while its generation moves between two real nodes.

A program, not a test: it prints a table and one JSON line, and asserts nothing on time.

Two ``sllm serve`` nodes on loopback (default flags), each pinned to its own CPU core
(``taskset``, one torch thread: two hosts in one machine, so the destination's prefill does
not slow the source's decoding). A random-weight GPT-2 (converted to the sllm format) with
a 2304-token context. For each context length, a client streams a completion whose prompt
has that many tokens; after ``--warm-tokens`` tokens, the source is asked to migrate it
(``POST /v1/migrations``), once with the defaults (live migration: rounds, then a handover
of at most ``--delta`` tokens) and once as stop-and-copy (``max_rounds 0``: pause, send
everything, the destination prefills it all, then decodes). It reports, per length, the
median over ``--runs`` of: the gap the client saw across the handover (the last token from
the source to the first from the destination), and the longest gap between two
consecutive tokens from the migration's start to 5 tokens after its end, each against the
normal inter-token gap (the median of the 20 gaps before the migration); the rounds; the bytes of tokens sent against the KV
cache they replace.

Usage::

    .venv/bin/python benchmarks/migration.py --lengths 256,512,1024,2048 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

#: A GPT-2 small enough to prefill 2048 tokens in seconds on one core, large enough that a
#: decode step is tens of milliseconds (a fair gap to compare with).
CONFIG = dict(n_layer=8, n_embd=512, n_head=8, n_positions=2304)
START_SECONDS = 300


def prepare(work: Path) -> Path:
    from sllm.core.convert import convert
    from sllm.core.format import MANIFEST_FILE
    from sllm.zoo import build_random_checkpoint

    dst = work / "models" / "gpt2-mig"
    if not (dst / MANIFEST_FILE).exists():
        hf = build_random_checkpoint("gpt2", work / "hf", seed=3, **CONFIG)
        convert(hf, dst)
    return dst.parent


def start(models: Path, core: int, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "sllm", "serve", "--models", str(models), "--port", "0",
           "--json", "--keep-alive", "3600"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        raise RuntimeError(f"sllm serve did not start: {log.read_text()[-2000:]}")
    url = json.loads(line)["url"]
    deadline = time.monotonic() + START_SECONDS
    while not httpx.get(url + "/status", timeout=30).json()["imports_ready"]:
        if time.monotonic() > deadline:
            raise RuntimeError("imports not ready")
        time.sleep(0.1)
    return proc, url


def one(src: str, dst: str, length: int, warm_tokens: int, max_tokens: int, **migrate: int) -> dict:
    """One streamed completion of a ``length``-token prompt, migrated after ``warm_tokens``."""
    prompt = [(i * 7919) % 50000 for i in range(length)]
    times: list[float] = []
    body = {"model": "gpt2-mig", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    done = threading.Event()
    errors: list[str] = []

    def client() -> None:
        with httpx.stream("POST", src + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        errors.append(ev["error"]["message"])
                    elif ev.get("choices") and ev["choices"][0].get("text") is not None:
                        times.append(time.time())
        done.set()

    t = threading.Thread(target=client, daemon=True)
    t.start()
    while len(times) < warm_tokens and not done.is_set():
        time.sleep(0.001)
    m0 = time.time()
    r = httpx.post(src + "/v1/migrations", json={"model": "gpt2-mig", "destination": dst, **migrate}, timeout=600)
    m1 = time.time()
    rec = r.json()
    done.wait(600)
    if r.status_code != 200 or errors:
        raise RuntimeError(f"migration failed: {r.text[:500]} {errors}")
    before = [b - a for a, b in zip(times, times[1:]) if b < m0]
    k = next((i for i, x in enumerate(times) if x > m0), len(times))
    end = next((i for i, x in enumerate(times) if x > m1), len(times))
    during = [times[i] - times[i - 1] for i in range(max(k, 1), min(end + 5, len(times)))]
    normal = statistics.median(before[-20:])
    handover = rec["started"] + rec["handover_seconds"]  # wall clock, same machine
    h = next((i for i, x in enumerate(times) if x > handover), len(times) - 1)
    handover_gap = times[h] - times[h - 1] if h > 0 else 0.0
    slow = [(round((times[i - 1] - m0) * 1e3, 1), round((times[i] - times[i - 1]) * 1e3, 1))
            for i in range(max(k, 1), min(end + 5, len(times))) if times[i] - times[i - 1] > 1.5 * normal]
    return {"handover_gap": handover_gap, "slow_gaps_ms": slow, "migration_ms": round((m1 - m0) * 1e3, 1),
            "round_ms": [round(x["seconds"] * 1e3, 1) for x in rec["rounds"]], "normal_gap": normal,
            "longest_gap": max(during) if during else 0.0,
            "rounds": len(rec["rounds"]), "bytes_sent": rec["bytes_sent"], "kv_bytes": rec["kv_bytes_replaced"],
            "migration_seconds": rec["total_seconds"], "tokens": len(times),
            "final_tokens": rec["rounds"][-1]["tokens"], "converged": 1.0 if rec.get("converged") else 0.0,
            "server_pause": rec["longest_pause_seconds"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="256,512,1024,2048")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warm-tokens", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--delta", type=int, default=None, help="live migration's --delta (default: the node's)")
    ap.add_argument("--modes", default="live,stop-and-copy")
    ap.add_argument("--verbose", action="store_true", help="print each run's slow gaps and round times")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "sllm-bench-migration")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    models = prepare(args.work)
    a, url_a = start(models, 0, args.work / "a.log")
    b, url_b = start(models, 1, args.work / "b.log")
    rows = []
    try:
        for url in (url_a, url_b):  # both resident: the load is not what this measures
            httpx.post(url + "/v1/completions", json={"model": "gpt2-mig", "prompt": "hi", "max_tokens": 2},
                       timeout=600).raise_for_status()
        live_opts = {} if args.delta is None else {"delta": args.delta}
        for length in [int(x) for x in args.lengths.split(",")]:
            for mode, opts in (("live", live_opts), ("stop-and-copy", {"max_rounds": 0})):
                if mode not in args.modes.split(","):
                    continue
                runs = []
                for i in range(args.runs):
                    src, dst = (url_a, url_b) if i % 2 == 0 else (url_b, url_a)
                    runs.append(one(src, dst, length, args.warm_tokens, args.max_tokens, **opts))
                if args.verbose:
                    for r in runs:
                        print(f"  slow gaps (ms after the migration's start, gap ms): {r['slow_gaps_ms']}; "
                              f"rounds ms {r['round_ms']}; migration call {r['migration_ms']} ms", file=sys.stderr)
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}
                rows.append({"context": length, "mode": mode, **med,
                             "ratio": med["longest_gap"] / med["normal_gap"],
                             "handover_ratio": med["handover_gap"] / med["normal_gap"], "runs": args.runs,
                             "rounds_max": max(r["rounds"] for r in runs),
                             "converged_share": sum(r["converged"] for r in runs) / len(runs)})
                print(f"{length:5d} {mode:14s} normal {med['normal_gap'] * 1e3:7.1f} ms  handover "
                      f"{med['handover_gap'] * 1e3:7.1f} ms  longest {med['longest_gap'] * 1e3:8.1f} ms  "
                      f"x{rows[-1]['ratio']:5.2f}  rounds {med['rounds']:.0f}  "
                      f"sent {med['bytes_sent']:.0f} B for {med['kv_bytes']:.0f} B of KV", file=sys.stderr)
    finally:
        for p in (a, b):
            p.terminate()
            p.wait(60)
    print("| context | mode | normal gap ms | gap at the handover ms (x normal) | longest gap ms (x normal) | "
          "rounds incl. round 0 and the handover (max) | converged | token bytes sent | KV bytes replaced |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['mode']} | {r['normal_gap'] * 1e3:.1f} | {r['handover_gap'] * 1e3:.1f} "
              f"({r['handover_ratio']:.2f}) | {r['longest_gap'] * 1e3:.1f} ({r['ratio']:.2f}) | {r['rounds']:.0f} "
              f"({r['rounds_max']}) | {r['converged_share']:.0%} | {r['bytes_sent']:.0f} | {r['kv_bytes']:.0f} |")
    print(json.dumps({"benchmark": "migration", "config": CONFIG, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
