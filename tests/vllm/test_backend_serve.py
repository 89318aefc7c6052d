"""``sllm serve --backend vllm``: the node server with vLLM's engine, through the official
``openai`` client (completions, chat, streaming), on-demand load, keep-alive unload and reload,
and a model served from the SSD tier (pulled from a remote). Needs vLLM (.venv-vllm)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 300


def _serve(*args: str, env_extra: dict | None = None):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]), **(env_extra or {}))
    cmd = [sys.executable, "-m", "sllm", "serve", "--port", "0", "--json", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    line = ""
    while time.monotonic() < deadline and not line:
        line = proc.stdout.readline()
        if proc.poll() is not None and not line:
            break
    if not line:
        proc.kill()
        pytest.fail(f"server did not start: {proc.stderr.read()[-2000:]}")
    return proc, json.loads(line)["url"]


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def models_dir(tiny_models, tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    shutil.copytree(tiny_models["llama"][1], d / "llama-tiny")
    return d


def _complete(client, model):
    return client.completions.create(model=model, prompt="Hello, my name is", max_tokens=8, temperature=0)


def test_vllm_backend_answers_like_vllm_itself(models_dir, tiny_models, engine_result):
    """The greedy completion is vLLM's own (``LLM.generate`` on the same checkpoint); chat; streaming.

    (Not compared with sllm's engine: on random weights the logits are nearly flat, and
    vLLM's CPU kernels and transformers' eager ones round differently, so the argmax parts
    ways after a few tokens.)
    """
    from transformers import AutoTokenizer

    want_ids = engine_result(tiny_models["llama"][1], "sllm")["tokens"][0][:8]  # engine_run.PROMPTS[0]
    want = AutoTokenizer.from_pretrained(tiny_models["llama"][1]).decode(want_ids)
    proc, url = _serve("--models", str(models_dir), "--backend", "vllm")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        text = _complete(client, "llama-tiny").choices[0].text
        assert text == want
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="llama-tiny", prompt="Hello, my name is", max_tokens=8, temperature=0, stream=True))
        assert streamed == text
        chat = client.chat.completions.create(model="llama-tiny", max_tokens=5, temperature=0,
                                              messages=[{"role": "user", "content": "Hi"}])
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
        parts = list(client.chat.completions.create(model="llama-tiny", max_tokens=5, temperature=0,
                                                    messages=[{"role": "user", "content": "Hi"}], stream=True))
        assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    finally:
        _stop(proc)


def test_vllm_backend_unloads_on_keep_alive_and_reloads(models_dir):
    proc, url = _serve("--models", str(models_dir), "--backend", "vllm", "--keep-alive", "2")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        first = _complete(client, "llama-tiny").choices[0].text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = httpx.get(f"{url}/status", timeout=30).json()
            if not status.get("resident"):
                break
            time.sleep(1)
        assert not status.get("resident"), status
        assert _complete(client, "llama-tiny").choices[0].text == first  # a second engine in the same process
    finally:
        _stop(proc)


def test_vllm_backend_serves_from_the_ssd_tier(tiny_models, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(tiny_models["qwen2"][1], remote / "qwen2-tiny")
    cache = tmp_path / "cache"
    proc, url = _serve("--backend", "vllm", "--cache-dir", str(cache), "--remote", str(remote))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)
        assert _complete(client, "qwen2-tiny").choices[0].text
        status = httpx.get(f"{url}/status", timeout=30).json()
        assert [r["model"] for r in status["resident"]] == ["qwen2-tiny"]
    finally:
        _stop(proc)
    from sllm.core.cache import CacheConfig, TierCache

    assert "ssd" in TierCache(CacheConfig(cache_dir=cache)).locate("qwen2-tiny", check_remote=False).tiers
