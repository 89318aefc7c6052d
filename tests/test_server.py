"""The node's HTTP API against a real uvicorn server on loopback, through the official
``openai`` client and httpx, on two tiny converted GPT-2 models (random weights)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch

from sllm.server.app import LOAD_HEADER, create_app
from sllm.server.models import ServeConfig

SERVER_START_SECONDS = 60  # a hang guard, not a performance bound


@dataclass
class Node:
    url: str
    app: object
    loop: asyncio.AbstractEventLoop | None = None
    server: object = None

    def call(self, coro, seconds: float = 120):
        """Run ``coro`` on the server's event loop (where the model manager lives); its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(seconds)

    def client(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def status(self, key: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{self.url}/status", headers=headers, timeout=30)
        r.raise_for_status()
        return r.json()


@contextlib.contextmanager
def running(models_dir: Path | None, *, clock=None, loader=None, **config) -> Iterator[Node]:
    """A real server for ``models_dir`` (None: its tier cache only, ``cache=CacheConfig(...)``)
    on a free loopback port, in a background thread, drained on exit as ``sllm serve`` is;
    ``clock`` is the manager's clock, ``loader`` its loader."""
    from sllm.server.app import NodeServer, uvicorn_config
    from sllm.server.models import ModelManager

    config = ServeConfig(models_dir=Path(models_dir) if models_dir is not None else None, **config)
    kw = {"clock": clock} if clock is not None else {}
    manager = ModelManager(config, loader=loader, **kw) if loader is not None else None
    app = create_app(config, manager=manager, **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = NodeServer(uvicorn_config(app, config.drain_seconds, log_level="warning"), app, config.drain_seconds)
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve(sockets=[sock])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_SECONDS
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Node(f"http://127.0.0.1:{sock.getsockname()[1]}", app, loops[0], server)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@pytest.fixture(scope="module")
def node(models_dir) -> Iterator[Node]:
    with running(models_dir) as n:
        yield n


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_gpt2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_hf_gpt2)


@pytest.fixture(scope="module")
def references(models_dir):
    """model id -> a transformers model with the same weights, for ``generate``."""
    from sllm.core.loader import load_model

    return {mid: load_model(models_dir / mid) for mid in ("gpt2-a", "gpt2-b")}


def expected(model, tokenizer, prompt: str, n: int) -> tuple[list[int], str]:
    """Greedy token ids and text from transformers' ``generate(do_sample=False)``."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, pad_token_id=0)[
            0, ids.shape[1] :
        ].tolist()
    if out and out[-1] == tokenizer.eos_token_id:
        out = out[:-1]
    return out, tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream_text(stream) -> tuple[str, str | None, object]:
    """Concatenated text, last finish_reason, usage of a completions stream."""
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text.append(c.text or "")
            finish = c.finish_reason or finish
    return "".join(text), finish, usage


# ---------------------------------------------------------------------------------------
# Generation through the API
# ---------------------------------------------------------------------------------------


def test_greedy_is_token_identical_to_transformers_generate(node, tokenizer, tiny_hf_gpt2):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_gpt2).eval()  # the source checkpoint of gpt2-a
    client = node.client()
    for prompt in ("The quick brown fox", "Serverless inference is", "1, 2, 3,"):
        ids, text = expected(hf, tokenizer, prompt, 24)
        r = client.completions.create(model="gpt2-a", prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == text
        assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert r.choices[0].finish_reason == ("length" if len(ids) == 24 else "stop")
        s = client.completions.create(
            model="gpt2-a", prompt=prompt, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        s_text, s_finish, s_usage = stream_text(s)
        assert (s_text, s_finish, s_usage.completion_tokens) == (text, r.choices[0].finish_reason, len(ids))
    # token ids as the prompt give the same continuation
    ids_prompt = tokenizer.encode("The quick brown fox")
    r = client.completions.create(model="gpt2-a", prompt=ids_prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == expected(hf, tokenizer, "The quick brown fox", 24)[1]


def test_chat_completions_use_the_plain_transcript_without_a_template(node, tokenizer, references):
    client = node.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    transcript = "system: Be brief.\nuser: Hello!\nassistant:"
    ids, text = expected(references["gpt2-b"], tokenizer, transcript, 12)
    r = client.chat.completions.create(model="gpt2-b", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(tokenizer.encode(transcript)) and r.usage.completion_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="gpt2-b", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_seeded_sampling_is_reproducible(node):
    client = node.client()
    kw = dict(model="gpt2-a", prompt="Once upon a time", max_tokens=20, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=42, **kw).choices[0].text
    b = client.completions.create(seed=42, **kw).choices[0].text
    c = client.completions.create(seed=43, **kw).choices[0].text
    streamed, _, _ = stream_text(client.completions.create(seed=42, stream=True, **kw))
    greedy = client.completions.create(**{**kw, "temperature": 0}).choices[0].text
    assert a == b == streamed
    assert a != c and a != greedy


def test_stop_sequences_and_max_tokens(node, tokenizer, references):
    client = node.client()
    prompt = "The quick brown fox"
    _, full = expected(references["gpt2-a"], tokenizer, prompt, 30)
    stop = full[12:15]
    assert stop and "\ufffd" not in stop
    want = full[: full.find(stop)]
    r = client.completions.create(model="gpt2-a", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "never!"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    assert r.usage.completion_tokens < 30
    s_text, s_finish, _ = stream_text(
        client.completions.create(model="gpt2-a", prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True)
    )
    assert (s_text, s_finish) == (want, "stop")

    r = client.completions.create(model="gpt2-a", prompt=prompt, max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model="gpt2-a", prompt=prompt, temperature=0)  # OpenAI's default: 16
    assert r.usage.completion_tokens == 16


def test_models_health_and_status(node):
    r = httpx.get(f"{node.url}/v1/models", timeout=30)
    assert r.status_code == 200 and LOAD_HEADER in r.headers
    cards = {m.id: m for m in node.client().models.list().data}
    assert set(cards) == {"gpt2-a", "gpt2-b"}
    assert all(m.nbytes > 0 and m.error is None for m in cards.values())
    assert node.client().models.retrieve("gpt2-a").id == "gpt2-a"
    assert httpx.get(f"{node.url}/health", timeout=30).json() == {"status": "ok"}
    st = node.status()
    for key in ("uptime_seconds", "resident", "loading", "last_cold_start", "counters", "resident_bytes"):
        assert key in st


def test_cold_start_is_reported(models_dir):
    with running(models_dir) as n:
        client = n.client()
        raw = client.completions.with_raw_response.create(model="gpt2-b", prompt="Hi", max_tokens=3, temperature=0)
        assert float(raw.headers[LOAD_HEADER]) > 0
        warm = client.completions.with_raw_response.create(model="gpt2-b", prompt="Hi", max_tokens=3, temperature=0)
        assert float(warm.headers[LOAD_HEADER]) == 0
        st = n.status()
        cold = st["last_cold_start"]
        assert cold["model"] == "gpt2-b" and cold["nbytes"] == st["resident"][0]["nbytes"] > 0
        assert cold["read_seconds"] > 0 and cold["load_seconds"] >= cold["read_seconds"]
        assert cold["ttft_seconds"] >= cold["load_seconds"] + cold["first_token_seconds"] - 1e-6
        assert [m["model"] for m in st["resident"]] == ["gpt2-b"]
        assert st["counters"]["loads"] == 1 and st["counters"]["requests"] == 2


# ---------------------------------------------------------------------------------------
# Bad input, auth
# ---------------------------------------------------------------------------------------

BAD_COMPLETIONS = [
    ({"model": "gpt2-a", "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": "gpt2-a", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "gpt2-a", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "gpt2-a", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "gpt2-a", "prompt": "x", "max_tokens": 500}, "context"),
    ({"model": "gpt2-a", "prompt": [7] * 200}, "context"),
    ({"model": "gpt2-a", "prompt": [99_999_999]}, "vocabulary"),
    ({"model": "gpt2-a", "prompt": [-1]}, "prompt"),
    ({"model": "gpt2-a", "prompt": ["a", "b"]}, "one prompt"),
    ({"model": "gpt2-a", "prompt": [[1, 2]]}, "prompt"),
    ({"model": "gpt2-a", "prompt": []}, "prompt"),
    ({"model": "gpt2-a", "prompt": "x", "n": 2}, "n=1"),
    ({"model": "gpt2-a", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "gpt2-a", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "gpt2-a", "prompt": "x", "logprobs": 3}, "logprobs"),
    ({"model": "gpt2-a", "prompt": "x", "echo": True}, "echo"),
    ({"model": "gpt2-a", "prompt": "x", "seed": 2**80}, "seed"),
    ({"prompt": "x"}, "model"),
    ({"model": 12, "prompt": "x"}, "model"),
    ({"model": "gpt2-a"}, "prompt"),
]
BAD_CHATS = [
    ({"model": "gpt2-a", "messages": []}, "messages"),
    ({"model": "gpt2-a", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"model": "gpt2-a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
    ({"model": "gpt2-a", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"model": "gpt2-a", "messages": "hello"}, "messages"),
]


def test_bad_input_is_400_with_a_message_never_500(node):
    with httpx.Client(base_url=node.url, timeout=60) as http:
        for route, cases in (("/v1/completions", BAD_COMPLETIONS), ("/v1/chat/completions", BAD_CHATS)):
            for body, word in cases:
                r = http.post(route, json=body)
                assert r.status_code == 400, (body, r.text)
                err = r.json()["error"]
                assert err["type"] == "invalid_request_error" and word in err["message"], (body, err)
                assert LOAD_HEADER in r.headers
        for raw in (b"not json", b"[1, 2]", b"", b'{"model": "gpt2-a", "prompt": "x"'):
            r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["message"], raw
        r = http.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "gpt2-a" in r.json()["error"]["message"]  # says what the node serves
        r = http.get("/v1/models/no-such-model")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = http.get("/nowhere")
        assert r.status_code == 404 and "error" in r.json()
        r = http.get("/v1/completions")
        assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        node.client().completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        node.client().completions.create(model="gpt2-a", prompt="x", temperature=3)


def test_api_key_guards_every_route_but_health(models_dir):
    with running(models_dir, api_key="s3cret") as n:
        with httpx.Client(base_url=n.url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            for method, path in (("GET", "/v1/models"), ("GET", "/status"), ("POST", "/v1/completions"),
                                 ("POST", "/v1/chat/completions"), ("GET", "/v1/models/gpt2-a")):  # fmt: skip
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                    r = http.request(method, path, headers=headers, json={"model": "gpt2-a", "prompt": "x"})
                    assert r.status_code == 401, (path, headers)
                    assert r.json()["error"]["code"] == "invalid_api_key" and LOAD_HEADER in r.headers
        with pytest.raises(openai.AuthenticationError):
            n.client("wrong").completions.create(model="gpt2-a", prompt="x", max_tokens=2)
        r = n.client("s3cret").completions.create(model="gpt2-a", prompt="x", max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert n.status("s3cret")["counters"]["requests"] == 1  # the rejected ones never reached a model


# ---------------------------------------------------------------------------------------
# Lifecycle: scale to zero, corrupt checkpoints, concurrency
# ---------------------------------------------------------------------------------------


def wait_for(predicate, what: str, seconds: float = 60):
    """Poll ``predicate`` until true; a hang guard, not a timing assertion."""
    deadline = time.monotonic() + seconds
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


def test_scale_to_zero_then_cold_start_again(models_dir):
    with running(models_dir, keep_alive_seconds=1.0) as n:
        client = n.client()
        kw = dict(model="gpt2-a", prompt="Hello", max_tokens=4, temperature=0)
        first = client.completions.with_raw_response.create(**kw)
        assert float(first.headers[LOAD_HEADER]) > 0
        assert [m["model"] for m in n.status()["resident"]] == ["gpt2-a"] or n.status()["counters"]["unloads"] == 1
        wait_for(lambda: n.status()["resident"] == [], "the keep-alive unload")
        assert n.status()["counters"]["unloads"] == 1
        assert not {m.id: m for m in client.models.list().data}["gpt2-a"].resident
        again = client.completions.with_raw_response.create(**kw)
        assert float(again.headers[LOAD_HEADER]) > 0  # cold again
        assert again.parse().choices[0].text == first.parse().choices[0].text
        assert n.status()["counters"]["loads"] == 2


@pytest.fixture
def broken_models(models_dir, tmp_path) -> Path:
    """``good`` (a copy of gpt2-a), ``truncated`` (its partition cut short) and
    ``bad-config`` (valid tensors, unreadable config.json)."""
    root = tmp_path / "models"
    for name in ("good", "truncated", "bad-config"):
        shutil.copytree(models_dir / "gpt2-a", root / name)
    part = root / "truncated" / "partition-0.bin"
    with open(part, "r+b") as f:
        f.truncate(part.stat().st_size - 4096)
    (root / "bad-config" / "config.json").write_text("{ not json")
    return root


def test_corrupt_checkpoints_fail_only_their_own_requests(broken_models):
    async def scenario(url: str) -> list:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        calls = [
            client.completions.create(model=m, prompt="Hello", max_tokens=6, temperature=0, stream=(i % 2 == 1))
            for i, m in enumerate(["good", "truncated", "bad-config"] * 4)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        return [r if isinstance(r, BaseException) else (await _drain(r) if hasattr(r, "__aiter__") else r)
                for r in results]  # fmt: skip

    with running(broken_models) as n:
        results = asyncio.run(scenario(n.url))
        for i, r in enumerate(results):
            model = ["good", "truncated", "bad-config"][i % 3]
            if model == "good":
                assert not isinstance(r, BaseException), r
                text = r if isinstance(r, str) else r.choices[0].text
                assert text
            else:
                assert isinstance(r, openai.InternalServerError) and r.status_code == 503, r
                body = r.body if isinstance(r.body, dict) else {}
                assert body.get("code") == "model_load_failed"
                assert f"model '{model}' failed to load" in body.get("message", "")
                assert ("partition" if model == "truncated" else "config.json") in body["message"]
        cards = {m.id: m for m in n.client().models.list().data}
        assert cards["truncated"].error and "partition" in cards["truncated"].error and cards["truncated"].nbytes is None
        assert cards["good"].resident and cards["good"].error is None
        st = n.status()
        assert [m["model"] for m in st["resident"]] == ["good"] and st["counters"]["load_failures"] >= 2
        assert n.client().completions.create(model="good", prompt="Hi", max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(f"{n.url}/health", timeout=30).status_code == 200


async def _drain(stream) -> str:
    return "".join([c.choices[0].text async for c in stream if c.choices])


def test_fifty_concurrent_streams_across_two_models(models_dir, tokenizer, references):
    prompts = [(("gpt2-a", "gpt2-b")[i % 2], f"Request number {i}:") for i in range(50)]
    want = {p: expected(references[p[0]], tokenizer, p[1], 8) for p in prompts}

    async def one(client, model: str, prompt: str):
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, finish, usage, ids = [], None, None, set()
        async for chunk in stream:
            ids.add(chunk.id)
            usage = chunk.usage or usage
            for c in chunk.choices:
                text.append(c.text)
                finish = c.finish_reason or finish
        return "".join(text), finish, usage, ids

    async def scenario(url: str):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        return await asyncio.wait_for(asyncio.gather(*(one(client, m, p) for m, p in prompts)), timeout=600)

    with running(models_dir) as n:
        results = asyncio.run(scenario(n.url))
        st = n.status()
    assert len(results) == 50
    assert len({next(iter(ids)) for *_, ids in results}) == 50  # one id per stream, none shared
    for p, (text, finish, usage, ids) in zip(prompts, results, strict=True):
        ref_ids, ref_text = want[p]
        assert len(ids) == 1
        assert usage.completion_tokens == len(ref_ids) and text == ref_text, p
        assert finish == ("length" if len(ref_ids) == 8 else "stop")
    assert st["counters"]["loads"] == 2  # one load per model although 25 requests each arrived cold
    assert st["counters"]["requests"] == 50


def test_node_client(node):
    from sllm.client import NodeClient
    from sllm.errors import ServerError

    with NodeClient(node.url) as c:
        assert c.health()
        assert {m["id"] for m in c.models()} == {"gpt2-a", "gpt2-b"}
        whole = c.complete("gpt2-a", "Hello", max_tokens=6, temperature=0)
        chunks = list(c.stream("gpt2-a", "Hello", max_tokens=6, temperature=0))
        assert "".join(ch.text for ch in chunks) == whole["choices"][0]["text"]
        assert chunks[-1].usage["completion_tokens"] == whole["usage"]["completion_tokens"] == 6
        assert any(ch.finish_reason == "length" for ch in chunks)
        assert whole["load_seconds"] >= 0 and "counters" in c.status()
        with pytest.raises(ServerError, match="HTTP 404: model 'nope' not found"):
            list(c.stream("nope", "x"))
        with pytest.raises(ServerError, match="HTTP 400: temperature"):
            c.complete("gpt2-a", "x", temperature=9)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with NodeClient(dead, timeout=5) as c:
        assert not c.health()
        with pytest.raises(ServerError, match="cannot reach"):
            c.status()
