"""The engine behind ``sllm serve`` (real uvicorn on loopback, tiny GPT-2): the batching
flags reach the engine, KV shows in ``/status`` and in the budget, a client that
disconnects frees its KV at once, and bad flags are one-line errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from sllm.cli import app as cli
from sllm.core.engine import EngineConfig
from sllm.server.app import create_app
from sllm.server.models import ServeConfig

START_SECONDS = 60  # hang guards, not performance bounds
WAIT_SECONDS = 60


@contextlib.contextmanager
def serving(models_dir: Path, **config) -> Iterator[tuple[str, object]]:
    import uvicorn

    app = create_app(ServeConfig(models_dir=models_dir, **config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),), daemon=True)
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def _kv(url: str) -> dict:
    st = httpx.get(f"{url}/status", timeout=30).json()
    return st["resident"][0]["kv"] if st["resident"] else {}


def test_flags_reach_the_engine_and_kv_shows_in_status(models_dir):
    cfg = EngineConfig(max_num_seqs=2, max_num_batched_tokens=8, kv_cache_bytes=1 << 20, deterministic=True)
    with serving(models_dir, engine=cfg) as (url, app):
        body = {"model": "gpt2-a", "prompt": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], "max_tokens": 6, "temperature": 0}
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()

        def ask(out: list, i: int) -> None:
            out[i] = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()

        out: list = [None] * 6
        threads = [threading.Thread(target=ask, args=(out, i)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_SECONDS)
        # deterministic mode: six at once (two running, the rest queued) answer what one alone did
        assert [o["choices"][0]["text"] for o in out] == [first["choices"][0]["text"]] * 6
        kv = _kv(url)
        assert kv["total_bytes"] == (1 << 20) // kv["bytes_per_block"] * kv["bytes_per_block"]
        assert kv["used_bytes"] == 0 and kv["running"] == 0 and kv["waiting"] == 0
        engine = app.state.manager.entries["gpt2-a"].resident.engine
        assert engine.config == cfg
        st = httpx.get(f"{url}/status", timeout=30).json()
        assert st["resident_bytes"] == st["resident"][0]["nbytes"] + engine.kv_cache_bytes


def test_a_client_that_disconnects_frees_its_kv_at_once(models_dir):
    with serving(models_dir) as (url, app):
        httpx.post(f"{url}/v1/completions", json={"model": "gpt2-a", "prompt": [1], "max_tokens": 1}, timeout=60)
        engine = app.state.manager.entries["gpt2-a"].resident.engine
        gens, real_submit, real_run = [], engine.submit, engine._runner.run

        def submit(*a, **kw):
            gens.append(real_submit(*a, **kw))
            return gens[-1]

        def slow_run(work):  # 100 ms a step (12 s in all): still running when the client goes, even on a loaded machine
            time.sleep(0.1)
            return real_run(work)

        engine.submit, engine._runner.run = submit, slow_run
        body = {"model": "gpt2-a", "prompt": [1, 2, 3], "max_tokens": 120, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:  # checked while streaming: leaving the loop closes the connection (httpx closes
                    assert engine.kv_stats().used_blocks > 0  # it when its line iterator is dropped)
                    break
        gen = gens[0]
        assert gen.wait(WAIT_SECONDS)
        assert gen.finish_reason == "cancelled" and len(gen.generated) < 120
        assert engine.kv_stats().used_blocks == 0 and _kv(url)["used_bytes"] == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kv-cache-memory", "lots"], "--kv-cache-memory 'lots': not a size"),
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
    ],
)
def test_bad_engine_flags_exit_2(args, message, models_dir):
    result = CliRunner().invoke(cli, ["serve", "--models", str(models_dir), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
