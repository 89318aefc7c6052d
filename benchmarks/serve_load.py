#!/usr/bin/env python3
"""A node under load, with and without hostile traffic: does anyone else's trouble reach the
normal requests?

A program, not a test: it prints a table and one JSON line and asserts nothing on time.

One ``sllm serve`` process (default flags plus a tier cache and a remote), random-weight
GPT-2-architecture models built offline. Two phases in the same run, each ``--streams``
concurrent streamed completions of ``--max-tokens`` tokens on the warm model ``chat``:

- **quiet**: those streams alone;
- **hostile**: the same streams while, at once, (1) a cold request pulls ``far`` from a
  remote throttled to ``--remote-mbps`` MB/s (a child process on loopback), (2) a client
  posts a 10 MB prompt every 0.25 s (each must get its 413), (3) a cold request loads the
  local model ``cold`` from disk, and (4) ``/health`` is probed every 0.05 s.

For the normal streams: time to first token (TTFT) and inter-token latency (ITL) P50/P99,
seconds; for the hostile side: the 413s' latency, ``/health``'s P99, the local cold start's
time (it must not wait for the pull) and the pull's. Example::

    python benchmarks/serve_load.py --work-dir bench-out/load --streams 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tier_pipeline import ChildServer  # noqa: E402 - the throttled remote, in a child process

SMALL = dict(n_layer=4, n_embd=256, n_head=4, n_positions=256)
FAR = dict(n_layer=2, n_embd=256, n_head=4, n_positions=256)


def build(work: Path) -> tuple[Path, Path]:
    from sllm.core.convert import convert
    from sllm.zoo import build_random_checkpoint

    models, remote = work / "models", work / "remote"
    if not (models / "chat").exists():
        for name, seed, root, shape in (("chat", 0, models, SMALL), ("cold", 1, models, SMALL),
                                        ("far", 2, remote, FAR)):
            hf = build_random_checkpoint("gpt2", work / "hf" / name, seed=seed, **shape)
            convert(hf, root / name)
    return models, remote


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def stream(client, i: int, max_tokens: int) -> dict:
    body = {"model": "chat", "prompt": f"Request {i}: the weather today is", "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and '"text": ""' not in line:
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else float("nan"),
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps)}


async def timed_post(client, body: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    return r.status_code, time.perf_counter() - t0


async def phase(url: str, streams: int, max_tokens: int, hostile: bool) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=streams + 20, max_keepalive_connections=streams + 20)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        stop = asyncio.Event()
        side: dict[str, list] = {"health": [], "big": []}

        async def probe_health() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                await client.get("/health")
                side["health"].append(time.perf_counter() - t0)
                await asyncio.sleep(0.05)

        async def post_big() -> None:
            big = {"model": "chat", "prompt": "x" * (10 * 2**20), "max_tokens": 1}
            while not stop.is_set():
                side["big"].append(await timed_post(client, big))
                await asyncio.sleep(0.25)

        extra = []
        if hostile:
            extra = [asyncio.ensure_future(timed_post(client, {"model": m, "prompt": "Hi", "max_tokens": 2}))
                     for m in ("far", "cold")]
            probes = [asyncio.ensure_future(probe_health()), asyncio.ensure_future(post_big())]
        else:
            probes = [asyncio.ensure_future(probe_health())]
        t0 = time.perf_counter()
        rows = await asyncio.gather(*(stream(client, i, max_tokens) for i in range(streams)))
        wall = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*probes)
        colds = await asyncio.gather(*extra)
    ttft = [r["ttft"] for r in rows]
    itl = [x for r in rows for x in r["itl"]]
    out = {
        "phase": "hostile" if hostile else "quiet", "streams": streams, "wall_seconds": wall,
        "complete_streams": sum(r["tokens"] > 0 for r in rows),
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
        "health_p99": percentile(side["health"], 99), "health_max": max(side["health"] or [float("nan")]),
    }
    if hostile:
        out["big_statuses"] = sorted({s for s, _ in side["big"]})
        out["big_p99"] = percentile([t for _, t in side["big"]], 99)
        (far_status, far_s), (cold_status, cold_s) = colds
        out.update(far_status=far_status, far_seconds=far_s, cold_status=cold_status, cold_seconds=cold_s)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--remote-mbps", type=float, default=5.0)
    args = ap.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sllm-load-"))
    models, remote_root = build(work)
    remote = ChildServer(remote_root, args.remote_mbps * 1e6)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "sllm", "serve", "--models", str(models), "--port", "0", "--json",
           "--cache-dir", str(cache), "--remote", remote.url, "--drain-seconds", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        url = json.loads(proc.stdout.readline())["url"]
        import httpx

        httpx.post(url + "/v1/completions", json={"model": "chat", "prompt": "warm", "max_tokens": 2}, timeout=600)
        rows = [asyncio.run(phase(url, args.streams, args.max_tokens, hostile)) for hostile in (False, True)]
    finally:
        proc.terminate()
        proc.wait(60)
        remote.close()
    print(f"{'phase':<8} {'streams':>7} {'TTFT P50':>9} {'TTFT P99':>9} {'ITL P50':>8} {'ITL P99':>8} "
          f"{'/health P99':>11} {'wall s':>7}")
    for r in rows:
        print(f"{r['phase']:<8} {r['complete_streams']:>3}/{r['streams']:<3} {r['ttft_p50']:>9.3f} {r['ttft_p99']:>9.3f} "
              f"{r['itl_p50']:>8.4f} {r['itl_p99']:>8.4f} {r['health_p99']:>11.4f} {r['wall_seconds']:>7.2f}")
    h = rows[1]
    print(f"hostile side: 10 MB prompts -> {h['big_statuses']} (P99 {h['big_p99']:.3f} s); local cold start "
          f"{h['cold_status']} in {h['cold_seconds']:.2f} s; remote pull of 'far' at {args.remote_mbps} MB/s "
          f"{h['far_status']} in {h['far_seconds']:.2f} s")
    print(json.dumps({"benchmark": "serve_load", "rows": rows}))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
