"""The demo (``python -m sllm.demo``, run by ``make demo``): sllm's main job end to end.

1. Builds the demo model, GPT-2 small (124M parameters, the shipped config and real GPT-2
   tokenizer, random weights: its text is gibberish, the latencies are real) into
   ``demo-out/hf`` unless it is there.
2. Converts it with ``sllm.core.convert`` to ``demo-out/models/demo-gpt2`` unless it is there.
3. Loads it once with :func:`sllm.load_model` and prints the loader's figures.
4. Starts ``sllm serve`` on a free loopback port, waits until it is ready (model code
   imported, model not resident), streams one completion cold (the model loads on
   demand) and one warm, printing tokens as they arrive, then the time to first
   token and total latency of each and the server's cold-start breakdown.
5. Stops the server (SIGTERM) and checks that it exited cleanly.

Exits 0 on success, 1 on any failure (with a one-line reason on stderr). It needs no
network and no GPU; ``--device cuda`` serves from a GPU where there is one.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

MODEL_ID = "demo-gpt2"
PROMPT = "Serverless inference means that"
STARTUP_SECONDS = 120  # a hang guard for the server's start


def build(out: Path) -> Path:
    """The converted demo model under ``out``, built and converted if missing."""
    from sllm.core.convert import convert
    from sllm.io.atomic import atomic_directory
    from sllm.zoo import build_random_checkpoint

    hf, dst = out / "hf", out / "models" / MODEL_ID
    if not (hf / "config.json").is_file():
        t0 = time.perf_counter()
        with atomic_directory(hf, force=True) as tmp:
            build_random_checkpoint("gpt2", tmp)
        print(f"built GPT-2 small (random weights) in {hf} in {time.perf_counter() - t0:.1f} s")
    if not (dst / "sllm.json").is_file():
        result = convert(hf, dst, force=dst.exists())
        print(f"converted to {dst}: {result.nbytes / 1e6:.0f} MB in {result.seconds:.1f} s")
    return dst


def show_load(model_dir: Path, device: str) -> None:
    """Load once in this process and print the loader's report."""
    import sllm

    model = sllm.load_model(model_dir, device=device)
    r = model.sllm_report
    print(
        f"load_model: {r.nbytes / 1e6:.0f} MB, read {r.read_seconds:.3f} s ({r.gbps:.2f} GB/s, "
        f"O_DIRECT {'on' if r.direct_io else 'off'}), model build {r.build_seconds:.3f} s, "
        f"total {r.total_seconds:.3f} s on {r.device}"
    )
    sllm.release(model)


def start_server(
    models: Path, device: str, *, keep_alive: float = 600, startup_seconds: float = STARTUP_SECONDS,
    flags: Sequence[str] = (),
) -> tuple[subprocess.Popen, str]:
    """``sllm serve --port 0 --json [flags]`` in a subprocess; returns it and its URL.

    Kills it and raises RuntimeError if it has not printed its URL after ``startup_seconds``.
    """
    cmd = [sys.executable, "-m", "sllm", "serve", "--models", str(models), "--port", "0", "--json",
           "--device", device, "--keep-alive", str(keep_alive), *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(startup_seconds, proc.kill)
    timer.start()
    try:
        line = proc.stdout.readline() if proc.stdout else ""
    finally:
        timer.cancel()
    if not line:
        proc.kill()
        raise RuntimeError(f"sllm serve did not start (exit status {proc.wait()})")
    return proc, json.loads(line)["url"]


def wait_ready(url: str, timeout_seconds: float = STARTUP_SECONDS) -> None:
    """Wait until the server has imported the model code and reserved its memory pool (it
    does both once, at start, in the background), so that the cold request measures a cold
    *model* on a running node."""
    from sllm.client import NodeClient

    deadline = time.monotonic() + timeout_seconds
    with NodeClient(url) as client:
        while True:
            state = client.status()
            if state["imports_ready"] and state["pool_ready"]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("sllm serve did not finish its start (model code, memory pool)")
            time.sleep(0.1)


def stream_once(url: str, label: str, max_tokens: int) -> dict[str, float]:
    """Stream one completion, printing text as it arrives; returns its timings, seconds."""
    from sllm.client import NodeClient

    print(f"\n[{label}] {PROMPT}", end="", flush=True)
    t0 = time.perf_counter()
    ttft, load, tokens = None, 0.0, 0
    with NodeClient(url) as client:
        for chunk in client.stream(MODEL_ID, PROMPT, max_tokens=max_tokens, temperature=0.8, seed=0):
            if ttft is None:
                ttft = time.perf_counter() - t0
            load = chunk.load_seconds
            tokens = chunk.usage["completion_tokens"] if chunk.usage else tokens
            print(chunk.text, end="", flush=True)
    total = time.perf_counter() - t0
    print()
    return {"ttft_seconds": ttft or total, "total_seconds": total, "load_seconds": load, "tokens": tokens}


def report(cold: dict[str, float], warm: dict[str, float], status: dict) -> None:
    print("\n               time to first token   total    model load (x-sllm-load-seconds)   tokens")
    for name, r in (("cold", cold), ("warm", warm)):
        print(f"  {name:<12} {r['ttft_seconds']:>12.3f} s {r['total_seconds']:>9.3f} s "
              f"{r['load_seconds']:>18.3f} s {int(r['tokens']):>20d}")  # fmt: skip
    c = status.get("last_cold_start") or {}
    if c:
        print(
            f"server's cold start: queue {c['queue_seconds']:.3f} s, read {c['read_seconds']:.3f} s "
            f"({c['gbps']:.2f} GB/s), model build {c['build_seconds']:.3f} s, load total {c['load_seconds']:.3f} s, "
            f"then first token after {c['first_token_seconds']:.3f} s"
        )
    print("(random weights: the text is gibberish; the latencies are real)")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then wait; a server that does not exit cleanly is a failure."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError("sllm serve did not stop within 60 s of SIGTERM") from None
    if code != 0:
        raise RuntimeError(f"sllm serve exited with status {code}")
    print("server stopped cleanly")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sllm.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="work directory (default demo-out)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per completion (default 24)")
    args = parser.parse_args(argv)
    proc = None
    try:
        model_dir = build(args.out)
        show_load(model_dir, args.device)
        t0 = time.perf_counter()
        proc, url = start_server(model_dir.parent, args.device)
        wait_ready(url)
        print(f"sllm serve listening on {url}, ready in {time.perf_counter() - t0:.1f} s (model not loaded yet)")
        cold = stream_once(url, "cold", args.max_tokens)
        warm = stream_once(url, "warm", args.max_tokens)
        from sllm.client import NodeClient

        with NodeClient(url) as client:
            status = client.status()
        report(cold, warm, status)
        stop_server(proc)
        proc = None
        return 0
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"demo: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
