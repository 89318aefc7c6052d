#!/usr/bin/env python3
"""Aggregate throughput and latency of concurrent streamed requests through ``sllm serve``,
beside transformers' static batch and ``generate_batch``, in one run.

A program, not a test: it prints a table and one JSON line and asserts nothing on time.

One random-weight model of a real architecture (default GPT-2 small, 124M parameters,
fp32; :mod:`sllm.zoo`), on the CPU by default. For each concurrency level ``c`` (default
1, 8, 32) the first ``c`` of a fixed set of prompts (16-48 token ids each, seeded) each
ask for ``--max-tokens`` (default 64) greedy tokens:

- **sllm serve** (continuous batching, default flags), **sllm serve --deterministic**, and
  **sllm serve --max-num-seqs 1** (the one-request-at-a-time engine): ``c`` concurrent
  streaming ``/v1/completions`` requests (token-id prompts), one server per variant, warmed
  by one request first. Aggregate tokens/s is every completion token (``usage``) over the
  wall time from the first request sent to the last stream ended; time to first token
  (TTFT) per request from its send to its first text chunk; inter-token latency (ITL) the
  gaps between a stream's successive text chunks (a chunk is one token unless the
  detokenizer held back an incomplete UTF-8 sequence), pooled over requests.
- **transformers generate**: the same ``c`` prompts as one left-padded static batch,
  ``min_new_tokens = max_new_tokens``; TTFT is the prefill step, ITL each decode step, from
  a logits processor that notes the time of each step.
- **transformers generate_batch**: its continuous batching (paged cache, SDPA) on the
  same prompts, EOS disabled; TTFT and ITL from its per-token timestamps.

``agree`` is the fraction of a variant's outputs (text) equal to the one-request-at-a-time
engine's for the same prompt (with the same greedy decoding, differences come from
floating-point reductions that depend on the batch, see README "Determinism").
``--temperature T`` makes the sllm requests sampled (seed = the prompt's index) to measure
that agreement where it is most fragile.

Examples::

    python benchmarks/engine_throughput.py --work-dir bench-out/engine
    python benchmarks/engine_throughput.py --work-dir bench-out/engine --concurrency 1,4 --max-tokens 16 --arch gpt2-tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from serve_cold_start import stop_server  # noqa: E402 - SIGTERM, then kill after a wait

STARTUP_SECONDS = 600  # hang guards, not measurements
VARIANTS = {
    "sllm serve": [],
    "sllm serve --deterministic": ["--deterministic"],
    "sllm serve --max-num-seqs 1": ["--max-num-seqs", "1"],
    "sllm serve --deterministic --max-num-seqs 1": ["--deterministic", "--max-num-seqs", "1"],  # not run by default
}
DEFAULT_VARIANTS = list(VARIANTS)[:3]
BATCH1 = "sllm serve --max-num-seqs 1"
#: agreement is against the one-at-a-time engine of the same mode when it ran, else BATCH1
REFERENCE = {"sllm serve --deterministic": "sllm serve --deterministic --max-num-seqs 1"}


def prepare(work: Path, arch: str) -> tuple[Path, Path, str]:
    """The HF checkpoint (random weights, fp32) and its sllm conversion under ``work`` (built once)."""
    from sllm.core.convert import convert
    from sllm.io.atomic import atomic_directory
    from sllm.zoo import TINY_GPT2, build_random_checkpoint

    model_id = arch
    hf, models = work / "hf" / model_id, work / "models"
    if not (hf / "config.json").is_file():
        with atomic_directory(hf, force=True) as tmp:
            if arch == "gpt2-tiny":
                build_random_checkpoint("gpt2", tmp, **TINY_GPT2)
            else:
                build_random_checkpoint(arch, tmp, dtype="float32")
    if not (models / model_id / "sllm.json").is_file():
        convert(hf, models / model_id, force=(models / model_id).exists())
    return hf, models, model_id


def make_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """``n`` token-id prompts of 16-48 tokens (ids below 50000: no GPT-2 special token)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 49, (n,), generator=g).tolist()
    return [torch.randint(0, 50000, (k,), generator=g).tolist() for k in lengths]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summary(name: str, c: int, tokens: int, seconds: float, ttft: list[float], itl: list[float],
            texts: list[str] | None = None) -> dict[str, Any]:
    return {
        "system": name, "concurrency": c, "tokens": tokens, "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
        "itl_p50_ms": _ms(pct(itl, 50)), "itl_p99_ms": _ms(pct(itl, 99)),
        "texts": texts,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


# ---------------------------------------------------------------------------------------
# sllm serve
# ---------------------------------------------------------------------------------------


def start_server(models: Path, device: str, flags: list[str]) -> tuple[subprocess.Popen, str]:
    from sllm.demo import start_server as start

    return start(models, device, keep_alive=3600, startup_seconds=STARTUP_SECONDS, flags=flags)


async def _stream(client: Any, model_id: str, prompt: list[int], max_tokens: int, sampling: dict) -> dict[str, Any]:
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, **sampling}
    t0 = time.perf_counter()
    times: list[float] = []
    text, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if choice.get("text"):
                    times.append(time.perf_counter())
                    text.append(choice["text"])
    return {"t0": t0, "end": time.perf_counter(), "times": times, "tokens": tokens, "text": "".join(text)}


async def _wave(url: str, model_id: str, prompts: list[list[int]], max_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0) -> list[dict[str, Any]]:
    """One concurrent wave; sampled requests are seeded by their prompt's index."""
    import httpx

    def sampling(i: int) -> dict:
        return {"temperature": 0} if temperature == 0 else {"temperature": temperature, "top_p": top_p, "seed": i}

    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        return await asyncio.gather(*[_stream(client, model_id, p, max_tokens, sampling(i))
                                      for i, p in enumerate(prompts)])


def run_server(name: str, flags: list[str], models: Path, model_id: str, device: str, prompts: list[list[int]],
               levels: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> list[dict]:
    proc, url = start_server(models, device, flags)
    rows = []
    try:
        asyncio.run(_wave(url, model_id, prompts[:1], 4))  # load the model, warm the code paths
        for c in levels:
            res = asyncio.run(_wave(url, model_id, prompts[:c], max_tokens, temperature, top_p))
            start, end = min(r["t0"] for r in res), max(r["end"] for r in res)
            ttft = [r["times"][0] - r["t0"] for r in res if r["times"]]
            itl = [b - a for r in res for a, b in zip(r["times"], r["times"][1:])]
            rows.append(summary(name, c, sum(r["tokens"] for r in res), end - start, ttft, itl,
                                [r["text"] for r in res]))
            print(f"  {name} c={c}: {rows[-1]['tokens_per_second']:.1f} tok/s", file=sys.stderr)
    finally:
        stop_server(proc)
    return rows


# ---------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------


def run_generate(model: Any, prompts: list[list[int]], levels: list[int], max_tokens: int) -> list[dict[str, Any]]:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):  # once per step, for the whole batch
            self.times.append(time.perf_counter())
            return scores

    rows = []
    with torch.inference_mode():  # warm-up: the first call pays one-time costs
        model.generate(input_ids=torch.tensor([prompts[0]]), do_sample=False, max_new_tokens=2, pad_token_id=0)
    for c in levels:
        batch = prompts[:c]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        seconds = time.perf_counter() - t0
        steps = clock.times
        itl = [b - a for a, b in zip(steps, steps[1:])] * c
        rows.append(summary("transformers generate (static batch)", c, c * max_tokens, seconds,
                            [steps[0] - t0] * c if steps else [], itl))
        print(f"  generate c={c}: {rows[-1]['tokens_per_second']:.1f} tok/s", file=sys.stderr)
    return rows


def run_generate_batch(model: Any, prompts: list[list[int]], levels: list[int], max_tokens: int) -> list[dict]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    rows = []
    model.generate_batch(prompts[:1], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False,
                         eos_token_id=-1, pad_token_id=0), warmup=False)  # warm-up
    for c in levels:
        cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
        cb = ContinuousBatchingConfig(num_blocks=max(64, c * (48 + max_tokens) // 32 * 2), max_batch_tokens=512)
        t0 = time.perf_counter()
        out = model.generate_batch(prompts[:c], generation_config=cfg, continuous_batching_config=cb,
                                   record_timestamps=True, warmup=False)
        seconds = time.perf_counter() - t0
        ttft, itl, tokens = [], [], 0
        for o in out.values():
            tokens += len(o.generated_tokens)
            ts = list(o.timestamps or [])
            if ts:
                ttft.append(ts[0] - o.created_time)
                itl.extend(b - a for a, b in zip(ts, ts[1:]))
        rows.append(summary("transformers generate_batch", c, tokens, seconds, ttft, itl))
        print(f"  generate_batch c={c}: {rows[-1]['tokens_per_second']:.1f} tok/s", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("bench-out/engine"))
    ap.add_argument("--arch", default="gpt2", help="a sllm.zoo architecture, or gpt2-tiny for a quick check")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated sllm serve variants, of: {', '.join(VARIANTS)}")
    ap.add_argument("--no-transformers", action="store_true", help="skip generate and generate_batch")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sllm serve variants only: sample (seeded per prompt) instead of greedy, to measure agreement")
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    hf, models, model_id = prepare(args.work_dir, args.arch)
    prompts = make_prompts(max(levels))

    rows: list[dict[str, Any]] = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        rows += run_server(name, VARIANTS[name], models, model_id, args.device, prompts, levels, args.max_tokens,
                           args.temperature, args.top_p)
    if not args.no_transformers:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="sdpa").eval()
        model.to(args.device)
        rows += run_generate(model, prompts, levels, args.max_tokens)
        rows += run_generate_batch(model, prompts, levels, args.max_tokens)

    texts = {(r["system"], r["concurrency"]): r["texts"] for r in rows}
    for r in rows:
        ref = REFERENCE.get(r["system"], BATCH1)
        ref = ref if (ref, r["concurrency"]) in texts else BATCH1
        mine, base = r.pop("texts"), texts.get((ref, r["concurrency"]))
        r["agree"] = None if mine is None or base is None else sum(a == b for a, b in zip(mine, base)) / len(mine)
        r["agree_with"] = ref if r["agree"] is not None else None

    hdr = f"{'system':46} {'conc':>4} {'tokens':>6} {'sec':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} " \
          f"{'ITL p50':>8} {'ITL p99':>8} {'agree':>5}"
    print(hdr)
    f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    for r in rows:
        agree = "-" if r["agree"] is None else f"{r['agree']:.2f}"
        print(f"{r['system']:46} {r['concurrency']:>4} {r['tokens']:>6} {r['seconds']:>7.2f} "
              f"{r['tokens_per_second']:>7.1f} {f(r['ttft_p50_ms']):>9} {f(r['ttft_p99_ms']):>9} "
              f"{f(r['itl_p50_ms']):>8} {f(r['itl_p99_ms']):>8} {agree:>5}")
    print("(latencies in ms; agree: share of outputs equal to the one-at-a-time engine's of the same mode)")
    top = max(levels)
    by = {(r["system"], r["concurrency"]): r["tokens_per_second"] for r in rows}
    cont = by.get(("sllm serve", top))
    ratios = {}
    if cont:
        for other, key in ((BATCH1, "vs_batch1"), ("transformers generate (static batch)", "vs_static_batch"),
                           ("transformers generate_batch", "vs_generate_batch")):
            if by.get((other, top)):
                ratios[key] = cont / by[(other, top)]
        print(f"at {top} concurrent: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(json.dumps({"benchmark": "engine_throughput", "arch": args.arch, "device": args.device,
                      "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                      "threads": _threads(), "rows": rows,
                      "ratios_at_max_concurrency": ratios}))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
