"""``POST /v1/cache/MODEL/load`` on a real ``sllm serve`` subprocess (the route that
``schedule-plan --apply`` loads with): the admin key guards it; it answers with the tier the
model came from and the load's seconds; it is idempotent on a resident model; concurrent
calls share one load (it goes through the manager's acquire, as a completion does); an
unknown name is a 404 and a failing load the same 503 as a completion's. Tiny models; no
timing assertions (the server and every request have a timeout)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sllm.client import NodeClient
from sllm.errors import ServerError

START_SECONDS = 120  # hang guards, not performance bounds
REQUEST_SECONDS = 120
ADMIN, USER = {"Authorization": "Bearer admin-key"}, {"Authorization": "Bearer user-key"}


@pytest.fixture(scope="module")
def node(models_dir, tmp_path_factory):
    """A node serving gpt2-a, gpt2-b and ``broken`` (gpt2-a with a truncated partition)."""
    root = tmp_path_factory.mktemp("load-route")
    for m in ("gpt2-a", "gpt2-b"):
        shutil.copytree(models_dir / m, root / "models" / m)
    shutil.copytree(models_dir / "gpt2-a", root / "models" / "broken")
    part = root / "models" / "broken" / "partition-0.bin"
    os.truncate(part, part.stat().st_size // 2)
    cmd = [sys.executable, "-m", "sllm", "serve", "--models", str(root / "models"), "--port", "0", "--json",
           "--api-key", "user-key", "--admin-key", "admin-key", "--drain-seconds", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(root / "serve.log", "w"), text=True, env=env)
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=START_SECONDS), "sllm serve printed nothing: " + (root / "serve.log").read_text()
        line = proc.stdout.readline()
        assert line, (root / "serve.log").read_text()
        url = json.loads(line)["url"]
        deadline = time.monotonic() + START_SECONDS
        while httpx.get(url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def load(url: str, model: str, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/cache/{model}/load", headers=ADMIN if headers is None else headers,
                      timeout=REQUEST_SECONDS)


def status(url: str) -> dict:
    return httpx.get(url + "/status", headers=USER, timeout=REQUEST_SECONDS).json()


def test_the_admin_key_guards_the_load_route(node):
    assert load(node, "gpt2-a", headers={}).status_code == 401
    assert load(node, "gpt2-a", headers=USER).status_code == 401  # the API key is not the admin key
    assert status(node)["resident"] == []  # nothing was loaded by the refused calls


def test_load_makes_the_model_resident_and_says_from_where(node, models_dir):
    r = load(node, "gpt2-a")
    assert r.status_code == 200, r.text
    doc = r.json()
    nbytes = sum(f.stat().st_size for f in (models_dir / "gpt2-a").glob("partition-*.bin"))
    assert doc["model"] == "gpt2-a" and doc["tier"] == "local" and doc["loaded"] is True
    assert doc["load_seconds"] > 0 and doc["waited_seconds"] >= doc["load_seconds"] and doc["nbytes"] == nbytes
    assert float(r.headers["x-sllm-load-seconds"]) == pytest.approx(doc["waited_seconds"], abs=1e-5)
    st = status(node)
    [res] = [x for x in st["resident"] if x["model"] == "gpt2-a"]
    assert res["loaded_from"] == "local"
    # a completion now finds it warm
    c = httpx.post(node + "/v1/completions", json={"model": "gpt2-a", "prompt": "Hi", "max_tokens": 2},
                   headers=USER, timeout=REQUEST_SECONDS)
    assert c.status_code == 200 and float(c.headers["x-sllm-load-seconds"]) == 0


def test_load_is_idempotent_on_a_resident_model(node):
    assert load(node, "gpt2-a").status_code == 200
    loads = status(node)["counters"]["loads"]
    with NodeClient(node, api_key="admin-key", timeout=REQUEST_SECONDS) as client:
        doc = client.cache_load("gpt2-a")
    assert doc["loaded"] is False and doc["load_seconds"] == 0 and doc["tier"] == "local"
    assert status(node)["counters"]["loads"] == loads  # nothing was loaded again


def test_concurrent_loads_share_one_load(node):
    before = status(node)["counters"]["loads"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: load(node, "gpt2-b"), range(4)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert all(a.json()["loaded"] for a in answers)  # each waited for the same load
    assert status(node)["counters"]["loads"] == before + 1
    assert "gpt2-b" in [x["model"] for x in status(node)["resident"]]


def test_unknown_models_are_404s_and_failed_loads_503s_like_completions(node):
    r = load(node, "no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = load(node, ".hidden")
    assert r.status_code == 404
    r = load(node, "broken")
    assert r.status_code == 503 and r.headers["x-should-retry"] == "false", r.text
    c = httpx.post(node + "/v1/completions", json={"model": "broken", "prompt": "Hi", "max_tokens": 2},
                   headers=USER, timeout=REQUEST_SECONDS)
    assert c.status_code == 503 and r.json()["error"]["code"] == c.json()["error"]["code"] == "model_load_failed"
    assert "broken" not in [x["model"] for x in status(node)["resident"]]
    with NodeClient(node, api_key="admin-key", timeout=REQUEST_SECONDS) as client, pytest.raises(ServerError, match="503"):
        client.cache_load("broken")
