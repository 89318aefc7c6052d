"""Throughput of ``sllm serve --backend vllm`` against vLLM's own OpenAI server, same model, same run.

A program, not a test: it prints a table and one JSON line, and asserts nothing on time.
Run it in the vLLM environment (``make vllm-env``; ``.venv-vllm/bin/python``).

One random-weight GPT-2-architecture model (built offline with transformers, head size 32,
the smallest vLLM's CPU attention takes) is served, one server at a time on loopback:

- **sllm**: ``sllm serve --backend vllm --models DIR`` (default flags) on its sllm conversion;
  the first request loads it (untimed warm-up);
- **vllm**: ``python -m vllm.entrypoints.openai.api_server`` on the Hugging Face checkpoint,
  with the engine settings sllm's backend gives vLLM (``--dtype`` of the checkpoint,
  ``--enforce-eager``, ``--seed 0``), after the same warm-up request.

Each round sends ``--streams`` streamed completions at once (distinct prompts, greedy,
``--max-tokens`` each) and times them: output tokens per second over the round's wall time
(tokens counted from the streamed chunks' usage), time to first token P50/P99. The table
gives the median round and the ratio sllm / vllm (the issue's goal: at least 0.9x). Both
servers get the environment vLLM's CPU build needs on this machine (``VLLM_CPU_KVCACHE_SPACE``,
``VLLM_HOST_IP=127.0.0.1``, offline, no usage stats). Example::

    .venv-vllm/bin/python benchmarks/vllm_throughput.py --work-dir bench-out/vllm-tp --streams 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_cold_start import stop_server  # noqa: E402 - SIGTERM, then a kill after 120 s

ENV = dict(
    VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
    DO_NOT_TRACK="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(ROOT),
)
START_TIMEOUT_S = 300
MODEL_NAME = "gpt2-bench"


def prepare(work: Path, layers: int, hidden: int) -> tuple[Path, Path]:
    """The Hugging Face checkpoint and its sllm conversion (in ``work/models/``), built once."""
    from sllm.core.convert import convert
    from sllm.zoo import build_random_checkpoint

    src, dst = work / f"{MODEL_NAME}-hf", work / "models" / MODEL_NAME
    if not (src / "model.safetensors").exists():
        build_random_checkpoint("gpt2", src, dtype="float32", n_layer=layers, n_embd=hidden, n_head=hidden // 32,
                                n_positions=1024)
    if not (dst / "sllm.json").exists():
        convert(src, dst, force=True)
    return src, dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, src: Path, work: Path) -> tuple[subprocess.Popen, str]:
    """Start one server (its log in ``work/KIND-server.log``); returns (process, base URL)."""
    import httpx

    port = free_port()
    if kind == "sllm":
        cmd = [sys.executable, "-m", "sllm", "serve", "--backend", "vllm", "--models", str(work / "models"),
               "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(src), "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--seed", "0",
               "--served-model-name", MODEL_NAME, "--disable-log-stats"]
    log = open(work / f"{kind}-server.log", "w")
    env = dict(os.environ, **ENV, SLLM_VLLM_LAYOUT_DIR=str(work / "vllm-layouts"))  # not the user's cache
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited {proc.returncode}: see {work / f'{kind}-server.log'}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{kind} server did not start in {START_TIMEOUT_S} s")


async def one_stream(client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """One streamed completion: (seconds to its first text, output tokens from its usage chunk)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            if first is None and any(c.get("text") for c in chunk.get("choices", ())):
                first = time.perf_counter() - started
    return (first if first is not None else float("nan")), tokens


async def round_(url: str, model: str, streams: int, max_tokens: int, round_no: int) -> dict:
    import httpx

    prompts = [f"Request {round_no}-{i}: the quick brown fox jumps over the lazy dog, and then" for i in range(streams)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as client:
        started = time.perf_counter()
        out = await asyncio.gather(*(one_stream(client, url, model, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - started
    ttft = sorted(t for t, _ in out)
    tokens = sum(n for _, n in out)
    return {"wall_seconds": wall, "tokens": tokens, "tokens_per_second": tokens / wall,
            "ttft_p50": statistics.median(ttft), "ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]}


def measure(kind: str, src: Path, work: Path, streams: int, max_tokens: int, rounds: int) -> dict:
    proc, url = start(kind, src, work)
    try:
        asyncio.run(round_(url, MODEL_NAME, 1, 8, -1))  # warm-up: sllm loads on first request
        results = [asyncio.run(round_(url, MODEL_NAME, streams, max_tokens, r)) for r in range(rounds)]
    finally:
        stop_server(proc)
    best = sorted(results, key=lambda r: r["tokens_per_second"])[len(results) // 2]  # the median round
    return {"server": kind, **best, "rounds": [round(r["tokens_per_second"], 2) for r in results]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path, default=Path("bench-out/vllm-throughput"))
    ap.add_argument("--streams", type=int, default=32, help="concurrent streams per round (default 32)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per server; the median is kept (default 3)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (head size 32: hidden / 32 heads)")
    args = ap.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    src, _ = prepare(args.work_dir, args.layers, args.hidden)
    rows = [measure(k, src, args.work_dir, args.streams, args.max_tokens, args.rounds) for k in ("sllm", "vllm")]
    by = {r["server"]: r for r in rows}
    ratio = by["sllm"]["tokens_per_second"] / by["vllm"]["tokens_per_second"]
    print(f"{args.streams} streams x {args.max_tokens} tokens, GPT-2 {args.layers}x{args.hidden} fp32, CPU, "
          f"median of {args.rounds} rounds")
    print(f"{'server':<8}{'tokens/s':>10}{'wall s':>9}{'tokens':>8}{'TTFT P50 s':>12}{'TTFT P99 s':>12}  rounds")
    for r in rows:
        print(f"{r['server']:<8}{r['tokens_per_second']:>10.1f}{r['wall_seconds']:>9.2f}{r['tokens']:>8}"
              f"{r['ttft_p50']:>12.3f}{r['ttft_p99']:>12.3f}  {r['rounds']}")
    print(f"sllm serve --backend vllm / vLLM's server: {ratio:.2f}x tokens/s")
    print(json.dumps({"benchmark": "vllm_throughput", "streams": args.streams, "max_tokens": args.max_tokens,
                      "layers": args.layers, "hidden": args.hidden, "rows": rows, "ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
