#!/usr/bin/env python3
"""Time to first token, cold and warm, through ``sllm serve`` against plain transformers.

A program, not a test: it prints a table and one JSON line and asserts nothing on time.

What it measures, on one random-weight model of a real architecture (default the OPT-1.3B
shape from :mod:`sllm.zoo`; ``--arch opt-tiny`` for a quick check), with the same greedy
request (prompt, ``--max-tokens``) everywhere:

- **sllm serve, cold**: a fresh ``sllm serve`` process whose transformers code is already
  imported and whose memory pool is reserved (``/status`` ``imports_ready``, ``pool_ready``;
  with default flags it reserves the largest model's buffers) but whose model is not resident, page cache of
  the partition files evicted; the time from sending the streaming request to its first
  token, so it holds the HTTP round trip, the load (sllm loader) and the prefill.
- **sllm serve, warm**: the same request again, model resident.
- **sllm serve, reload after scale-to-zero**: the model unloaded by the keep-alive and
  requested again; its bytes come back from the node's host memory pool (DRAM tier).
- **raw read**: the floor, an O_DIRECT read of the partition files (page cache evicted)
  into memory touched beforehand, with the loader's default threads; the target is a cold
  TTFT within 1.2x of (raw read + warm TTFT), the server started with default flags.
- **transformers, cold**: a fresh Python process doing ``from_pretrained`` (with
  ``device_map`` on CUDA) + ``generate``
  (page cache of ``model.safetensors`` evicted): its first token counted from the process
  spawn (what a naive serverless worker pays) and from the ``from_pretrained`` call (the
  fair comparison with an already running server), and **warm**: a second ``generate``.

Each cold figure is the median over ``--runs`` fresh processes. The checkpoint's dtype
defaults to float16 on CUDA and float32 on CPU (CPU half-precision matrix products are
100x slower than float32 on common CPUs, which would only measure that). Examples::

    python benchmarks/serve_cold_start.py --work-dir bench-out/serve --arch opt-tiny
    python benchmarks/serve_cold_start.py --work-dir bench-out/serve --device cuda --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The first thing to know about serverless inference is that"
STARTUP_SECONDS = 600  # hang guards, not measurements
READY_SECONDS = 300


def prepare(work: Path, arch: str, dtype: str) -> tuple[Path, Path, str]:
    """The HF checkpoint and its conversion under ``work`` (built once, reused)."""
    from sllm.core.convert import convert
    from sllm.io.atomic import atomic_directory
    from sllm.zoo import build_random_checkpoint

    model_id = f"{arch}-{dtype}"
    hf, models = work / "hf" / model_id, work / "models"
    if not (hf / "config.json").is_file():
        t0 = time.perf_counter()
        with atomic_directory(hf, force=True) as tmp:
            build_random_checkpoint(arch, tmp, dtype=dtype)
        print(f"built {arch} ({dtype}, random weights) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if not (models / model_id / "sllm.json").is_file():
        r = convert(hf, models / model_id, force=(models / model_id).exists())
        print(f"converted: {r.nbytes / 1e9:.2f} GB in {r.seconds:.1f} s", file=sys.stderr)
    return hf, models, model_id


def evict(paths: list[Path]) -> None:
    from sllm.io.reader import evict_page_cache

    for p in paths:
        evict_page_cache(p)


# ---------------------------------------------------------------------------------------
# sllm serve
# ---------------------------------------------------------------------------------------


def start_server(models: Path, device: str, keep_alive: float) -> tuple[subprocess.Popen, str]:
    """``sllm serve --port 0 --json`` (the demo's launcher); returns once its transformers
    imports are done."""
    from sllm.demo import start_server as launch
    from sllm.demo import wait_ready

    proc, url = launch(models, device, keep_alive=keep_alive, startup_seconds=STARTUP_SECONDS)
    try:
        wait_ready(url, READY_SECONDS)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def timed_request(url: str, model_id: str, max_tokens: int) -> dict[str, float]:
    """One streamed greedy completion: ttft/total seconds (client side), the load the server
    reported, and the token count."""
    from sllm.client import NodeClient

    with NodeClient(url, timeout=1800) as c:
        t0 = time.perf_counter()
        ttft, load, tokens = None, 0.0, 0
        for chunk in c.stream(model_id, PROMPT, max_tokens=max_tokens, temperature=0):
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            load = chunk.load_seconds
            tokens = chunk.usage["completion_tokens"] if chunk.usage else tokens
        total = time.perf_counter() - t0
    return {"ttft_seconds": ttft or total, "total_seconds": total, "load_seconds": load, "tokens": tokens}


def raw_read(parts: list[Path], chunk_bytes: int) -> float:
    """Seconds of an O_DIRECT read of ``parts`` into populated buffers, page cache evicted."""
    from sllm.io.hostmem import HostBuffer
    from sllm.io.reader import read_whole

    buffers = [HostBuffer(p.stat().st_size) for p in parts]  # populated: touched before timing
    evict(parts)
    t0 = time.perf_counter()
    for p, buf in zip(parts, buffers, strict=True):
        read_whole(p, buf.memoryview(p.stat().st_size), chunk_bytes=chunk_bytes, direct_io=True)
    return time.perf_counter() - t0


def run_sllm(models: Path, model_id: str, device: str, max_tokens: int, runs: int) -> dict[str, list[dict]]:
    """Cold and warm requests on ``runs`` fresh servers; a scale-to-zero reload on the first."""
    from sllm.client import NodeClient
    from sllm.core.format import open_checkpoint

    ckpt = open_checkpoint(models / model_id)
    parts = [ckpt.partition_path(i) for i in range(len(ckpt.manifest.partitions))]
    out: dict[str, list[dict]] = {"cold": [], "warm": [], "reload": [], "raw": []}
    for run in range(runs):
        out["raw"].append({"seconds": raw_read(parts, ckpt.manifest.chunk_bytes)})
        keep_alive = 3.0
        proc, url = start_server(models, device, keep_alive)
        try:
            evict(parts)
            out["cold"].append(timed_request(url, model_id, max_tokens))
            with NodeClient(url) as c:
                out["cold"][-1]["server"] = c.status()["last_cold_start"]
            out["warm"].append(timed_request(url, model_id, max_tokens))
            if run == 0:
                with NodeClient(url) as c:
                    deadline = time.monotonic() + 120
                    while c.status()["resident"] and time.monotonic() < deadline:
                        time.sleep(0.1)
                out["reload"].append(timed_request(url, model_id, max_tokens))
        finally:
            stop_server(proc)
    return out


# ---------------------------------------------------------------------------------------
# transformers baseline
# ---------------------------------------------------------------------------------------

BASELINE = r"""
import json, sys, time
t_start = time.time()
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer
path, device, dtype, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
for name in json.load(open(path + "/config.json")).get("architectures") or []:
    getattr(transformers, name)  # import the architecture's code now, as the server does at its start
t_import = time.time()
placement = {} if device == "cpu" else {"device_map": device}  # straight to the GPU (needs accelerate)
model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **placement).to(device).eval()
tok = AutoTokenizer.from_pretrained(path)
t_loaded = time.time()

class First(BaseStreamer):
    def __init__(self):
        self.puts, self.first = 0, None
    def put(self, value):  # the first put is the prompt, the second the first new token
        self.puts += 1
        if self.puts == 2:
            self.first = time.time()
    def end(self):
        pass

def once():
    s, start = First(), time.time()
    ids = tok(prompt, return_tensors="pt").to(device)
    out = model.generate(**ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=s,
                         pad_token_id=tok.eos_token_id)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"start": start, "first": s.first, "end": time.time(), "tokens": out.shape[1] - ids.input_ids.shape[1]}

cold = once()
warm = once()
print(json.dumps({"t_start": t_start, "t_import": t_import, "t_loaded": t_loaded, "cold": cold, "warm": warm}))
"""


def run_baseline(hf: Path, device: str, dtype: str, max_tokens: int, runs: int) -> list[dict[str, float]]:
    """``runs`` fresh processes: from_pretrained + generate twice each."""
    out = []
    for _ in range(runs):
        evict(sorted(hf.glob("*.safetensors")))
        spawned = time.time()
        r = subprocess.run([sys.executable, "-c", BASELINE, str(hf), device, dtype, PROMPT, str(max_tokens)],
                           capture_output=True, text=True, timeout=3600)  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"transformers baseline failed: {r.stderr.strip().splitlines()[-1:]}")
        d = json.loads(r.stdout.strip().splitlines()[-1])
        c, w = d["cold"], d["warm"]
        out.append({
            "ttft_from_spawn_seconds": c["first"] - spawned,
            "ttft_from_load_seconds": c["first"] - d["t_import"],
            "import_seconds": d["t_import"] - spawned,
            "load_seconds": d["t_loaded"] - d["t_import"],
            "cold_total_from_load_seconds": c["end"] - d["t_import"],
            "warm_ttft_seconds": w["first"] - w["start"],
            "warm_total_seconds": w["end"] - w["start"],
            "tokens": w["tokens"],
        })  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def render(sllm: dict[str, list[dict]], base: list[dict], meta: dict) -> dict:
    """Print the table (stdout) and return the JSON summary."""
    rows = [
        ("sllm serve", "cold (disk, fresh server)", median(sllm["cold"], "ttft_seconds"),
         median(sllm["cold"], "total_seconds"), median(sllm["cold"], "load_seconds")),
        ("sllm serve", "warm (resident)", median(sllm["warm"], "ttft_seconds"),
         median(sllm["warm"], "total_seconds"), median(sllm["warm"], "load_seconds")),
        ("sllm serve", "reload after scale-to-zero", median(sllm["reload"], "ttft_seconds"),
         median(sllm["reload"], "total_seconds"), median(sllm["reload"], "load_seconds")),
        ("transformers", "cold, from process spawn", median(base, "ttft_from_spawn_seconds"), None,
         median(base, "import_seconds") + median(base, "load_seconds")),
        ("transformers", "cold, from from_pretrained", median(base, "ttft_from_load_seconds"),
         median(base, "cold_total_from_load_seconds"), median(base, "load_seconds")),
        ("transformers", "warm (same process)", median(base, "warm_ttft_seconds"),
         median(base, "warm_total_seconds"), 0.0),
    ]  # fmt: skip
    title = (f"{meta['arch']} {meta['dtype']} ({meta['nbytes'] / 1e9:.2f} GB) on {meta['device']}, "
             f"{meta['max_tokens']} tokens, median of {meta['runs']} run(s)")  # fmt: skip
    print(title)
    print(f"{'server':<13} {'state':<29} {'TTFT s':>9} {'total s':>9} {'load s':>9}")
    for who, state, ttft, total, load in rows:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{who:<13} {state:<29} {fmt(ttft):>9} {fmt(total):>9} {fmt(load):>9}")
    server = sllm["cold"][0].get("server") or {}
    if server:
        print(f"sllm cold start (server side, run 1): queue {server['queue_seconds']:.3f} s, read "
              f"{server['read_seconds']:.3f} s ({server['gbps']:.2f} GB/s), build {server['build_seconds']:.3f} s, "
              f"first token {server['first_token_seconds']:.3f} s after the load")  # fmt: skip
    raw = median(sllm["raw"], "seconds")
    floor = raw + rows[1][2]
    print(f"raw O_DIRECT read {raw:.3f} s + warm TTFT {rows[1][2]:.3f} s = {floor:.3f} s; cold TTFT / that = "
          f"{rows[0][2] / floor:.2f}x (target <= 1.2x)")
    cold_sllm, cold_hf = rows[0][2], rows[4][2]
    print(
        f"cold TTFT: sllm serve {cold_sllm:.3f} s vs transformers {cold_hf:.3f} s from from_pretrained "
        f"({cold_hf / cold_sllm:.1f}x), {rows[3][2]:.3f} s from spawn ({rows[3][2] / cold_sllm:.1f}x)"
    )
    return {**meta, "rows": [dict(server=w, state=s, ttft_seconds=t, total_seconds=tt, load_seconds=ld)
                             for w, s, t, tt, ld in rows], "sllm_cold_start": server,
            "raw_read_seconds": raw, "cold_vs_floor": rows[0][2] / floor,
            "sllm_runs": sllm, "transformers_runs": base}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from sllm.zoo import ARCHITECTURES

    p = argparse.ArgumentParser(prog="serve_cold_start.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work-dir",
        type=Path,
        default=REPO / "bench-out" / "serve-cold-start",
        help="where the checkpoints are built and kept (default bench-out/serve-cold-start)",
    )
    p.add_argument("--arch", default="opt-1.3b", choices=sorted(ARCHITECTURES), help="architecture (default opt-1.3b)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float16", "bfloat16", "float32"],
        help="checkpoint dtype (default float16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per request (default 8)")
    p.add_argument("--runs", type=int, default=1, help="fresh processes per cold measurement (default 1)")
    args = p.parse_args(argv)  # fmt: skip
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    sys.path.insert(0, str(REPO))
    hf, models, model_id = prepare(args.work_dir, args.arch, dtype)
    from sllm.core.format import open_checkpoint

    meta = {"arch": args.arch, "dtype": dtype, "device": args.device, "max_tokens": args.max_tokens,
            "runs": args.runs, "nbytes": open_checkpoint(models / model_id).manifest.total_bytes,
            "prompt": PROMPT}  # fmt: skip
    print(f"sllm serve: {args.runs} cold run(s)...", file=sys.stderr)
    sllm = run_sllm(models, model_id, args.device, args.max_tokens, args.runs)
    print(f"transformers: {args.runs} cold run(s)...", file=sys.stderr)
    base = run_baseline(hf, args.device, dtype, args.max_tokens, args.runs)
    summary = render(sllm, base, meta)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
