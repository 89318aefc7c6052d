"""A node under hostile or careless clients, against real servers on loopback: each finding of
the hardening review reproduced and checked (no node-wide stalls, no 500s from input, nothing
kept for unknown names, disconnects cancel, graceful drain, no temporaries served, no
secrets shown, stalled remotes fail). Tiny models; order and outcome assertions, no timing."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_remote import KiB, RangeServer
from test_server import running, wait_for
from typer.testing import CliRunner

from sllm.cli import app as cli_app
from sllm.core.cache import CacheConfig, TierCache
from sllm.errors import RemoteError
from sllm.io.remote import RemoteConfig, redact_url

HTTP_SECONDS = 120  # a hang guard on every request


@pytest.fixture(scope="module")
def remote_root(models_dir, tmp_path_factory) -> Path:
    """A remote holding one model, ``far`` (a copy of gpt2-b), that no node has locally."""
    root = tmp_path_factory.mktemp("hardening-remote")
    shutil.copytree(models_dir / "gpt2-b", root / "far")
    return root


def post(url: str, route: str = "/v1/completions", **body) -> httpx.Response:
    body.setdefault("prompt", "Hello")
    body.setdefault("max_tokens", 2)
    body.setdefault("temperature", 0)
    return httpx.post(url + route, json=body, timeout=HTTP_SECONDS)


def slow_loader(per_token_seconds: float, calls: list[int]):
    """A loader whose model sleeps before each forward pass and counts them in ``calls``."""
    from sllm.core.loader import load_model

    def load(path, config, pool):
        model = load_model(path, config.device, pool=pool)
        forward = model.forward

        def slow(*args, **kwargs):
            calls[0] += 1
            time.sleep(per_token_seconds)
            return forward(*args, **kwargs)

        model.forward = slow
        return model

    return load


def sse_events(lines) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


# ---------------------------------------------------------------------------------------
# 1. No node-wide lock across a remote pull
# ---------------------------------------------------------------------------------------


def test_a_local_cold_start_does_not_wait_for_another_models_pull(models_dir, remote_root, tmp_path):
    gate, pulling = threading.Event(), threading.Event()

    def on_piece(path: str, end: int) -> None:  # holds the pull of far's weights until released
        if path.endswith("partition-0.bin"):
            pulling.set()
            gate.wait(HTTP_SECONDS)

    with RangeServer(remote_root, piece_bytes=16 * KiB, on_piece=on_piece) as remote, running(
        models_dir, cache=CacheConfig(cache_dir=tmp_path / "cache", remote_url=remote.url, fsync=False)
    ) as n, concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            far = pool.submit(post, n.url, model="far")
            assert pulling.wait(HTTP_SECONDS), "the pull did not start"
            r = post(n.url, model="gpt2-a")  # a cold local model, while far's pull is stalled
            assert r.status_code == 200 and float(r.headers["x-sllm-load-seconds"]) > 0
            assert not far.done()
            loading = {row["model"]: row for row in n.status()["loading"]}
            assert "gpt2-a" not in loading and loading["far"]["waiting_for"] is None  # holding the link
        finally:
            gate.set()
        assert far.result(HTTP_SECONDS).status_code == 200


def test_a_stalled_remote_fails_on_progress(remote_root, tmp_path):
    """A remote that trickles bytes (never idle long enough for a per-read timeout) fails as
    stalled instead of holding the pull forever."""
    with RangeServer(remote_root, piece_bytes=KiB, delay_seconds=0.3) as remote:
        cache = TierCache(CacheConfig(cache_dir=tmp_path / "c", remote_url=remote.url, fsync=False,
                                      remote=RemoteConfig(timeout_seconds=10, stall_seconds=1.0)))
        with pytest.raises(RemoteError, match="stalled"):
            cache.pull("far")
        assert cache.ls() == []
        cache.close()


# ---------------------------------------------------------------------------------------
# 2. Nothing blocking on the event loop; request limits
# ---------------------------------------------------------------------------------------


def test_oversized_bodies_are_413_and_tokenizing_never_blocks_the_loop(models_dir):
    with running(models_dir) as n, concurrent.futures.ThreadPoolExecutor(2) as pool:
        big = {"model": "gpt2-a", "prompt": "x" * (10 * 2**20), "max_tokens": 1}
        r = httpx.post(n.url + "/v1/completions", json=big, timeout=HTTP_SECONDS)
        assert r.status_code == 413 and "over this node's limit" in r.json()["error"]["message"]
        data = json.dumps(big).encode()
        pieces = iter([data[i : i + 2**20] for i in range(0, len(data), 2**20)])  # chunked: no Content-Length
        chunked = httpx.post(n.url + "/v1/completions", content=pieces, headers={"content-type": "application/json"},
                             timeout=HTTP_SECONDS)
        assert chunked.status_code == 413

        assert post(n.url, model="gpt2-a").status_code == 200  # resident; now hold its tokenizer
        tokenizer = n.app.state.manager.entries["gpt2-a"].resident.tokenizer
        held, entered = threading.Event(), threading.Event()
        encode = tokenizer.encode

        def blocking_encode(*args, **kwargs):
            entered.set()
            held.wait(HTTP_SECONDS)
            return encode(*args, **kwargs)

        tokenizer.encode = blocking_encode
        try:
            stuck = pool.submit(post, n.url, model="gpt2-a", prompt="held in the tokenizer")
            assert entered.wait(HTTP_SECONDS)
            health = httpx.get(n.url + "/health", timeout=HTTP_SECONDS)  # would hang if encode ran on the loop
            assert health.status_code == 200 and not stuck.done()
            assert httpx.get(n.url + "/v1/models", timeout=HTTP_SECONDS).status_code == 200
        finally:
            held.set()
            tokenizer.encode = encode
        assert stuck.result(HTTP_SECONDS).status_code == 200

        limits = [
            ({"messages": [{"role": "user", "content": "x"}] * 513}, "at most 512"),
            ({"stop": ["y" * 257]}, "stop"),
            ({"prompt": "z" * 1_000_001}, "prompt"),
        ]
        for extra, word in limits:
            route = "/v1/chat/completions" if "messages" in extra else "/v1/completions"
            body = {"model": "gpt2-a", **({} if "messages" in extra else {"prompt": "x"}), **extra}
            r = httpx.post(n.url + route, json=body, timeout=HTTP_SECONDS)
            assert r.status_code == 400 and word in r.json()["error"]["message"], r.text


# ---------------------------------------------------------------------------------------
# 3. 4xx, never 500, from input
# ---------------------------------------------------------------------------------------


def test_keys_and_names_from_clients_are_4xx_never_500(models_dir, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli_app, ["serve", "--models", str(models_dir), "--api-key", "clé-secrète", "--port", "0"])
    assert r.exit_code == 2 and "ASCII" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    long_name = "m" * 300
    r = runner.invoke(cli_app, ["cache", "pull", long_name, "--cache-dir", str(tmp_path / "c"),
                                "--remote", str(tmp_path)])
    assert r.exit_code == 2 and "at most 200" in r.stderr

    with running(models_dir, api_key="inference", admin_key="admin",
                 cache=CacheConfig(cache_dir=tmp_path / "cache", fsync=False)) as n:
        for value in ("Bearer ключ".encode(), b"Bearer \xff\xfe", b"\xff"):
            r = httpx.get(n.url + "/v1/models", headers={"Authorization": value}, timeout=HTTP_SECONDS)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        user, admin = ({"Authorization": f"Bearer {k}"} for k in ("inference", "admin"))
        assert httpx.get(n.url + "/v1/cache", headers=user, timeout=HTTP_SECONDS).status_code == 401
        assert httpx.get(n.url + "/v1/cache", headers=admin, timeout=HTTP_SECONDS).status_code == 200
        assert httpx.get(n.url + "/v1/models", headers=admin, timeout=HTTP_SECONDS).status_code == 401
        assert httpx.get(n.url + "/v1/models", headers=user, timeout=HTTP_SECONDS).status_code == 200
        r = httpx.post(f"{n.url}/v1/cache/{long_name}/pull", headers=admin, timeout=HTTP_SECONDS)
        assert r.status_code == 400 and "at most 200" in r.json()["error"]["message"]
        r = httpx.post(n.url + "/v1/completions", headers=user, json={"model": long_name, "prompt": "x"},
                       timeout=HTTP_SECONDS)
        assert r.status_code == 400


def test_a_chat_template_that_refuses_the_messages_is_a_400(models_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models_dir / "gpt2-a", root / "strict")
    cfg_path = root / "strict" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}" \
                           "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cfg_path.write_text(json.dumps(cfg))
    with running(root) as n:
        bad = [{"role": "assistant", "content": "hi"}]
        r = post(n.url, "/v1/chat/completions", model="strict", messages=bad, prompt=None)
        assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
        good = post(n.url, "/v1/chat/completions", model="strict", messages=[{"role": "user", "content": "hi"}])
        assert good.status_code == 200


# ---------------------------------------------------------------------------------------
# 4. Unknown names cost nothing that lasts
# ---------------------------------------------------------------------------------------


def test_unknown_names_are_404_after_one_remote_lookup_and_leave_nothing(models_dir, remote_root, tmp_path):
    cache_dir = tmp_path / "cache"
    with RangeServer(remote_root) as remote, running(
        None, cache=CacheConfig(cache_dir=cache_dir, remote_url=remote.url, fsync=False)
    ) as n:
        names = [f"random-{i:03d}" for i in range(30)]
        for name in names:
            r = post(n.url, model=name)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            r = httpx.post(f"{n.url}/v1/cache/{name}/pull", timeout=HTTP_SECONDS)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        manager = n.app.state.manager
        assert not set(names) & set(manager.entries)
        assert manager.tiers.cache._model_locks == {}
        assert sorted(p.name for p in (cache_dir / "locks").iterdir()) == []
        assert post(n.url, model="far").status_code == 200  # a real remote model still pulls


# ---------------------------------------------------------------------------------------
# 5. Disconnects cancel
# ---------------------------------------------------------------------------------------


def test_a_non_streaming_client_that_disconnects_cancels_its_generation(models_dir):
    calls = [0]
    with running(models_dir, loader=slow_loader(0.05, calls)) as n:
        assert post(n.url, model="gpt2-a").status_code == 200
        before = calls[0]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(n.url + "/v1/completions", json={"model": "gpt2-a", "prompt": "Hi", "max_tokens": 100,
                                                          "temperature": 0}, timeout=0.5)
        wait_for(lambda: n.status()["resident"][0]["requests"] == [], "the generation to be cancelled")
        assert calls[0] - before < 100  # it stopped early, not at max_tokens
        r = httpx.post(n.url + "/v1/cache/gpt2-a/evict?tier=device", timeout=HTTP_SECONDS)
        assert r.status_code == 200  # the lease was given back


# ---------------------------------------------------------------------------------------
# 7. Graceful shutdown
# ---------------------------------------------------------------------------------------


def _stream(url: str, events: list, started: threading.Event, max_tokens: int) -> None:
    body = {"model": "gpt2-a", "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=HTTP_SECONDS) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                started.set()


def test_drain_ends_streams_with_an_error_event_and_answers_waiters_with_503(models_dir, remote_root, tmp_path):
    gate, pulling = threading.Event(), threading.Event()

    def on_piece(path: str, end: int) -> None:
        if path.endswith("partition-0.bin"):
            pulling.set()
            gate.wait(HTTP_SECONDS)

    calls = [0]
    with RangeServer(remote_root, piece_bytes=16 * KiB, on_piece=on_piece) as remote, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        with running(models_dir, loader=slow_loader(0.05, calls), drain_seconds=0.3,
                     cache=CacheConfig(cache_dir=tmp_path / "c", remote_url=remote.url, fsync=False)) as n:
            assert post(n.url, model="gpt2-a").status_code == 200
            streams = [([], threading.Event()) for _ in range(3)]
            futures = [pool.submit(_stream, n.url, ev, st, 100) for ev, st in streams]
            for _, started in streams:
                assert started.wait(HTTP_SECONDS)
            waiter = pool.submit(post, n.url, model="far")
            assert pulling.wait(HTTP_SECONDS)
            n.server.should_exit = True  # what SIGTERM does
            r = waiter.result(HTTP_SECONDS)
            assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
            for f in futures:
                f.result(HTTP_SECONDS)
            gate.set()
        for events, _ in streams:
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            assert "shutting down" in last["error"]["message"]


def test_drain_lets_short_generations_finish(models_dir):
    with running(models_dir, drain_seconds=30) as n, concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert post(n.url, model="gpt2-a").status_code == 200
        streams = [([], threading.Event()) for _ in range(4)]
        futures = [pool.submit(_stream, n.url, ev, st, 20) for ev, st in streams]
        for _, started in streams:
            assert started.wait(HTTP_SECONDS)
        n.server.should_exit = True
        for f in futures:
            f.result(HTTP_SECONDS)
    for events, _ in streams:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "stop")


def test_sigterm_with_streams_in_flight_exits_0_without_tracebacks(models_dir):
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "sllm", "serve", "--models", str(models_dir), "--port", "0",
                             "--json", "--drain-seconds", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "SLLM_DEBUG": "0"})
    try:
        url = json.loads(proc.stdout.readline())["url"]
        assert post(url, model="gpt2-a").status_code == 200
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            streams = [([], threading.Event()) for _ in range(10)]
            futures = [pool.submit(_stream, url, ev, st, 120) for ev, st in streams]
            for _, started in streams:
                assert started.wait(HTTP_SECONDS)
            proc.send_signal(signal.SIGTERM)
            for f in futures:
                f.result(HTTP_SECONDS)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        for events, _ in streams:
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            assert "error" in last or last["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# ---------------------------------------------------------------------------------------
# 8. Temporaries are never listed or served; 9. secrets never shown
# ---------------------------------------------------------------------------------------


def test_writer_temporaries_are_never_listed_or_served(models_dir, tmp_path):
    from sllm.io.atomic import TMP_PREFIX

    root = tmp_path / "models"
    shutil.copytree(models_dir / "gpt2-a", root / "kept")
    tmp_name = f"{TMP_PREFIX}half-123-abcdef12"
    shutil.copytree(models_dir / "gpt2-a", root / tmp_name)  # a killed converter's leftover, manifest and all
    with running(root) as n:
        ids = {m["id"] for m in httpx.get(n.url + "/v1/models", timeout=HTTP_SECONDS).json()["data"]}
        assert ids == {"kept"}
        r = post(n.url, model=tmp_name)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_remote_credentials_never_appear_in_status_cache_or_errors(remote_root, tmp_path):
    with RangeServer(remote_root) as remote:
        secret_url = remote.url.replace("http://", "http://operator:hunter2@")
        assert redact_url(secret_url + "/m?X-Amz-Signature=abc") == remote.url + "/m"
        with running(None, cache=CacheConfig(cache_dir=tmp_path / "c", remote_url=secret_url, fsync=False)) as n:
            assert post(n.url, model="far").status_code == 200
            shown = [httpx.get(n.url + route, timeout=HTTP_SECONDS).text for route in ("/status", "/v1/cache")]
            shown.append(post(n.url, model="missing").text)
            for text in shown:
                assert "hunter2" not in text and "operator" not in text
            assert remote.url in shown[0]


# ---------------------------------------------------------------------------------------
# The schema tells the truth
# ---------------------------------------------------------------------------------------


def test_openapi_states_400_not_422_and_the_error_responses(models_dir):
    with running(models_dir) as n:
        spec = httpx.get(n.url + "/openapi.json", timeout=HTTP_SECONDS).json()
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert "422" not in op["responses"], path
    completions = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "503"} <= set(completions)
    assert "ErrorResponse" in spec["components"]["schemas"]
    fields = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert fields["n"]["maximum"] == 1


def test_an_unexpected_error_mid_stream_is_an_error_event_then_done(models_dir):
    with running(models_dir) as n:
        assert post(n.url, model="gpt2-a").status_code == 200
        tokenizer = n.app.state.manager.entries["gpt2-a"].resident.tokenizer
        decode = tokenizer.decode

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in detokenization")

        tokenizer.decode = broken
        try:
            events, started = [], threading.Event()
            _stream(n.url, events, started, 8)
        finally:
            tokenizer.decode = decode
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["message"] == "internal error: RuntimeError"
        assert post(n.url, model="gpt2-a").status_code == 200  # the node carries on; the lease came back
        wait_for(lambda: n.status()["resident"][0]["requests"] == [], "the broken stream's generation to end")


def test_a_tiny_temperature_behaves_as_greedy(models_dir):
    with running(models_dir) as n:
        greedy = post(n.url, model="gpt2-a", prompt="The quick brown fox", max_tokens=12, temperature=0).json()
        for t in (1e-40, 5e-324):
            r = post(n.url, model="gpt2-a", prompt="The quick brown fox", max_tokens=12, temperature=t, seed=7).json()
            assert r["choices"][0]["text"] == greedy["choices"][0]["text"] != ""
            assert r["choices"][0]["finish_reason"] == greedy["choices"][0]["finish_reason"]
