"""Live migration between real ``sllm serve`` nodes on loopback (subprocesses, each with its own
port and memory budget, ``--deterministic``): streams that move keep every token exactly
once and give the tokens of the same requests unmigrated (greedy and seeded, many at once);
the official ``openai`` client sees one stream through the source and through a front door;
faults (the destination killed with SIGKILL at random points of 20 migrations, unreachable,
out of memory, an abort by the source, a bad round) leave every stream complete and nothing
allocated on the destination. Tiny models; every subprocess and request has a timeout; no
timing assertions."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_remote import free_port

START_SECONDS = 120  # hang guards, not performance bounds
REQUEST_SECONDS = 120
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def long_models(tmp_path_factory) -> Path:
    """A directory with ``m``: a tiny GPT-2 with a 512-token context (long generations)."""
    from sllm.core.convert import convert
    from sllm.zoo import TINY_GPT2, build_random_checkpoint

    root = tmp_path_factory.mktemp("mig-models")
    hf = build_random_checkpoint("gpt2", tmp_path_factory.mktemp("mig-hf") / "m", **{**TINY_GPT2, "n_positions": 512})
    convert(hf, root / "m")
    return root


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies (a timed-out or killed pytest leaves no node)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Node:
    """One ``sllm serve`` subprocess."""

    def __init__(self, root: Path, name: str, models: Path, *extra: str, port: int | None = None) -> None:
        self.root, self.name, self.port = root, name, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "SLLM_MIGRATION_IDLE_SECONDS": "5"}
        cmd = [sys.executable, "-m", "sllm", "serve", "--models", str(models), "--port", str(self.port),
               "--deterministic", "--json", *extra]
        self.log = root / f"{name}-{self.port}.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=env,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def wait(self) -> Node:
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"node {self.name} did not start"
            time.sleep(0.1)

    def status(self) -> dict:
        return httpx.get(self.url + "/status", timeout=REQUEST_SECONDS).json()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def pair(long_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mig-nodes")
    nodes = [Node(root, "s", long_models), Node(root, "d", long_models)]
    try:
        yield [n.wait() for n in nodes]
    finally:
        for n in nodes:
            n.stop()


def body(i: int, max_tokens: int = 48, **kw) -> dict:
    """Request ``i``: greedy when even, sampled with a seed when odd."""
    sampled = i % 2 == 1
    return {"model": "m", "prompt": f"Request {i} says hello to", "max_tokens": max_tokens,
            "temperature": 0.9 if sampled else 0.0, "seed": 100 + i, **kw}


def reference(url: str, b: dict) -> str:
    r = httpx.post(url + "/v1/completions", json={**b, "stream": False}, timeout=REQUEST_SECONDS)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


class Stream(threading.Thread):
    """A streaming completion read in a thread: its text, finish reason, events, [DONE] count."""

    def __init__(self, url: str, b: dict, headers: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.b, self.headers = url, {**b, "stream": True}, headers or {}
        self.parts: list[str] = []
        self.finish: str | None = None
        self.errors: list[dict] = []
        self.done = 0
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/completions", json=self.b, headers=self.headers,
                          timeout=REQUEST_SECONDS) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.done += 1
                elif line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        self.errors.append(ev)
                    for c in ev.get("choices", []):
                        self.parts.append(c.get("text") or "")
                        self.finish = c.get("finish_reason") or self.finish
                        self.started.set()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def result(self) -> tuple[str, str | None]:
        self.join(REQUEST_SECONDS)
        assert not self.is_alive()
        assert self.done == 1 and not self.errors, (self.done, self.errors)
        return self.text, self.finish


def migrate(src: Node | str, dst: Node | str, **kw) -> httpx.Response:
    src_url = src if isinstance(src, str) else src.url
    dst_url = dst if isinstance(dst, str) else dst.url
    return httpx.post(src_url + "/v1/migrations", json={"model": "m", "destination": dst_url, **kw},
                      timeout=REQUEST_SECONDS)


def assert_nothing_left(node: Node) -> None:
    """No migration in progress, no lease, no request and no KV block held on ``node``."""
    deadline = time.monotonic() + 30
    while True:
        st = node.status()
        busy = st["migrations"]["active"] or any(r["leases"] or r["requests"] or r["kv"]["used_blocks"]
                                                 for r in st["resident"])
        if not busy:
            return
        assert time.monotonic() < deadline, json.dumps({"migrations": st["migrations"]["active"],
                                                        "resident": st["resident"]})
        time.sleep(0.05)


def test_streams_that_move_are_token_identical_to_unmigrated_runs(pair):
    s, d = pair
    rng = random.Random(3)
    for wave in range(3):  # 10 requests at once, moved together at a random point, both directions
        src, dst = (s, d) if wave % 2 == 0 else (d, s)
        bodies = [body(i) for i in range(wave * 10, wave * 10 + 10)]
        refs = [reference(src.url, b) for b in bodies]
        streams = [Stream(src.url, b) for b in bodies]
        for st in streams:
            st.started.wait(REQUEST_SECONDS)
        time.sleep(rng.uniform(0.0, 0.3))
        r = migrate(src, dst)
        rec = r.json()
        assert r.status_code in (200, 404), rec  # 404: every request had finished already
        if r.status_code == 200:
            assert rec["outcome"] == "done" and rec["rounds"][-1]["final"]
            assert 1 <= len(rec["rounds"]) <= 5
            # tokens, not the KV cache: fewer bytes sent than the KV it replaced, when any request was handed
            # over (0: each one ended with its last token during the rounds, as happened once in CI)
            assert rec["kv_bytes_replaced"] == 0 or rec["bytes_sent"] < rec["kv_bytes_replaced"]
        for st, ref in zip(streams, refs):
            assert st.result() == (ref, "length")
        assert_nothing_left(src)
        assert_nothing_left(dst)
    assert s.status()["migrations"]["counts"]["out_done"] + d.status()["migrations"]["counts"]["out_done"] >= 2


def test_stop_and_copy_and_one_request_by_id(pair):
    s, d = pair
    b = body(1, max_tokens=200)
    ref = reference(s.url, b)
    first, other = Stream(s.url, b), Stream(s.url, body(2, max_tokens=200))
    first.started.wait(REQUEST_SECONDS)
    other.started.wait(REQUEST_SECONDS)
    ids = [r["id"] for r in s.status()["resident"][0]["requests"]]
    assert len(ids) == 2
    r = migrate(s, d, request_ids=ids[:1], max_rounds=0)
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["requests"] == ids[:1] and len(rec["rounds"]) == 1 and rec["rounds"][0]["final"]
    assert first.result()[0] == ref or other.result()[0] == ref  # whichever was moved, both complete intact
    other.result()
    assert migrate(s, d, request_ids=["cmpl-nope"]).status_code == 404


def test_the_openai_client_sees_one_stream_through_the_source_and_a_front_door(long_models, tmp_path):
    openai = pytest.importorskip("openai")
    ports = {n: free_port() for n in ("f", "s", "d")}
    inv = tmp_path / "cluster.toml"
    inv.write_text("\n".join(
        f'[nodes.{n}]\nurl = "http://127.0.0.1:{p}"\nmax_memory_bytes = 64000000\n[nodes.{n}.device]\nkind = "cpu"\n'
        f'[nodes.{n}.tiers.ssd]\ngbps = 0.001\n[nodes.{n}.loader]\nfixed_seconds = 5.0\n' for n, p in ports.items()))
    nodes = {n: Node(tmp_path, n, long_models, "--inventory", str(inv), "--node-name", n, port=p)
             for n, p in ports.items()}
    try:
        for n in nodes.values():
            n.wait()
        s, d, f = nodes["s"], nodes["d"], nodes["f"]
        b = body(3, max_tokens=300)
        ref = reference(s.url, b)  # also makes the model resident on s: the front door sends it there
        for via in (s, f):
            client = openai.OpenAI(base_url=via.url + "/v1", api_key="unused", timeout=REQUEST_SECONDS, max_retries=0)
            parts: list[str] = []
            finish: list[str] = []
            moved: list[httpx.Response] = []

            def mover(parts: list = parts, moved: list = moved) -> None:
                while len(parts) < 20:
                    time.sleep(0.002)
                src = next(n for n in (s, d) if n.status()["resident"] and n.status()["resident"][0]["requests"])
                moved.append(migrate(src, d if src is s else s))

            t = threading.Thread(target=mover, daemon=True)
            t.start()
            for chunk in client.completions.create(stream=True, **b):
                parts.append(chunk.choices[0].text)
                if chunk.choices[0].finish_reason:
                    finish.append(chunk.choices[0].finish_reason)
            t.join(REQUEST_SECONDS)
            assert moved and moved[0].status_code == 200, moved and moved[0].text
            assert "".join(parts) == ref and finish == ["length"]
        assert f.status()["resident"] == []  # the front door relayed; it never ran the model
    finally:
        for n in nodes.values():
            n.stop()


def test_faults_before_the_handover_leave_every_stream_intact(pair, long_models, tmp_path):
    s, d = pair
    # unreachable destination
    b = body(5, max_tokens=120)
    ref = reference(s.url, b)
    st = Stream(s.url, b)
    st.started.wait(REQUEST_SECONDS)
    r = migrate(s, f"http://127.0.0.1:{free_port()}")
    assert r.status_code == 502 and r.json()["error"]["code"] == "migration_aborted"
    assert r.json()["migration"]["outcome"] == "aborted" and "unreachable" in r.json()["error"]["message"]
    assert st.result() == (ref, "length")
    # a destination without the memory for the model
    small = Node(tmp_path, "small", long_models, "--max-memory", "1000").wait()
    try:
        st = Stream(s.url, b)
        st.started.wait(REQUEST_SECONDS)
        r = migrate(s, small)
        assert r.status_code == 502 and "503" in r.json()["error"]["message"]
        assert st.result() == (ref, "length")
        assert_nothing_left(small)
    finally:
        small.stop()
    # the source aborts (DELETE /v1/migrations/ID) while the rounds go on (delta 0: never converges)
    ref7 = reference(d.url, body(7, max_tokens=480))
    st = Stream(s.url, body(7, max_tokens=480))
    st.started.wait(REQUEST_SECONDS)
    out: list[httpx.Response] = []
    t = threading.Thread(target=lambda: out.append(migrate(s, d, delta=0, max_rounds=64)), daemon=True)
    t.start()
    deadline = time.monotonic() + REQUEST_SECONDS
    while not (active := s.status()["migrations"]["active"]):
        assert time.monotonic() < deadline and t.is_alive(), out and out[0].text
        time.sleep(0.002)
    aborted = httpx.delete(s.url + f"/v1/migrations/{active[0]['id']}", timeout=REQUEST_SECONDS)
    t.join(REQUEST_SECONDS)
    if aborted.status_code == 200:
        assert out[0].status_code == 502 and out[0].json()["migration"]["outcome"] == "aborted"
    else:  # it had handed over already
        assert out[0].status_code == 200
    assert st.result() == (ref7, "length")
    assert_nothing_left(d)
    assert_nothing_left(s)


def test_the_destination_killed_at_random_points_of_20_migrations(pair, long_models, tmp_path):
    """SIGKILL of D at a random time in [0, 0.4 s) after the migration starts (a migration
    takes about 0.05-0.15 s here, the relay after it the rest of the 120 tokens): in the
    prepare, the stream's opening, the rounds, the handover or the relay; D just started on
    even runs, the model already resident on D on odd ones."""
    s, _ = pair
    rng = random.Random(11)
    outcomes: dict[str, int] = {}
    spares = [Node(tmp_path, "victim", long_models) for _ in range(2)]  # the next ones boot meanwhile
    started = list(spares)
    try:
        for i in range(20):
            victim = spares.pop(0).wait()
            spares.append(Node(tmp_path, "victim", long_models))
            started.append(spares[-1])
            if i % 2:  # warm: imports done, the model resident
                reference(victim.url, body(0, max_tokens=1))
            bodies = [body(i * 2 + k, max_tokens=120) for k in range(2)]
            refs = [reference(s.url, b) for b in bodies]
            streams = [Stream(s.url, b) for b in bodies]
            for st in streams:
                st.started.wait(REQUEST_SECONDS)
            out: list[httpx.Response] = []
            t = threading.Thread(target=lambda out=out, victim=victim: out.append(migrate(s, victim)), daemon=True)
            t.start()
            time.sleep(rng.uniform(0.0, 0.4))
            victim.kill()
            t.join(REQUEST_SECONDS)
            assert out, "the migration call hung"
            for st, ref in zip(streams, refs):
                assert st.result() == (ref, "length"), f"migration {i}"
            if out[0].status_code == 200:
                rec = s.status()["migrations"]["recent"][0]  # "done", or "resumed" once the stream broke
                key = rec["outcome"]
            elif out[0].status_code == 404:
                key = "finished before"
            else:
                key = out[0].json()["migration"]["outcome"]
            outcomes[key] = outcomes.get(key, 0) + 1
            assert_nothing_left(s)
    finally:
        for n in started:
            n.stop()
    assert sum(outcomes.values()) == 20
    assert outcomes.get("aborted", 0) >= 2 and outcomes.get("resumed", 0) >= 2, outcomes  # both sides of the handover


def test_the_destination_refuses_bad_rounds_and_frees_what_it_held(pair):
    s, d = pair
    mid = "mig-test-bad-round"
    r = httpx.post(d.url + "/v1/migrations/incoming", json={"id": mid, "model": "m"}, timeout=REQUEST_SECONDS)
    assert r.status_code == 200, r.text
    params = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop_token_ids": []}
    ok = {"index": 0, "requests": [{"id": "r1", "start": 0, "tokens": [1, 2, 3], "prompt_len": 3, "params": params}]}
    r = httpx.post(d.url + f"/v1/migrations/incoming/{mid}/rounds", json=ok, timeout=REQUEST_SECONDS)
    assert r.status_code == 200 and r.json()["lengths"] == {"r1": 3}
    bad = {"index": 1, "requests": [{"id": "r1", "start": 1, "tokens": [9]}]}  # does not continue the copy
    r = httpx.post(d.url + f"/v1/migrations/incoming/{mid}/rounds", json=bad, timeout=REQUEST_SECONDS)
    assert r.status_code == 409 and "starts at 1" in r.json()["error"]["message"]
    assert_nothing_left(d)  # aborted: the held copy and the lease are gone
    r = httpx.post(d.url + f"/v1/migrations/incoming/{mid}/rounds", json=ok, timeout=REQUEST_SECONDS)
    assert r.status_code == 404
    assert d.status()["migrations"]["counts"]["in_aborted"] >= 1


def test_sllm_migrate_cli(pair, tmp_path):
    s, d = pair
    st = Stream(s.url, body(9, max_tokens=300))
    st.started.wait(REQUEST_SECONDS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "sllm", "migrate", "--from", s.url, "--to", d.url, "-m", "m", "--json"],
                       capture_output=True, text=True, timeout=REQUEST_SECONDS, env=env)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["outcome"] == "done" and rec["longest_pause_seconds"] is not None
    st.result()
    p = subprocess.run([sys.executable, "-m", "sllm", "migrate", "--from", "a", "--to", d.url, "-m", "m"],
                       capture_output=True, text=True, timeout=REQUEST_SECONDS, env=env)
    assert p.returncode == 2 and "--inventory" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "sllm", "migrate", "--from", s.url, "--to", d.url, "-m", "m"],
                       capture_output=True, text=True, timeout=REQUEST_SECONDS, env=env)
    assert p.returncode == 1 and "no request" in p.stderr  # nothing decoding now


def test_a_front_door_frees_a_node_by_migrating_its_busy_model(long_models, tmp_path):
    """Node x holds models a and b and has room for one; node y holds only a. A request for
    b arrives at x while a streams there: the scheduler's best option is to migrate a's
    request to y and load b on x, and the front door carries it out; both complete intact."""
    import shutil

    dir_x, dir_y = tmp_path / "models-x", tmp_path / "models-y"
    for d in (dir_x, dir_y):
        d.mkdir()
        shutil.copytree(long_models / "m", d / "a")
    shutil.copytree(long_models / "m", dir_x / "b")
    ports = {"x": free_port(), "y": free_port()}
    inv = tmp_path / "cluster.toml"
    inv.write_text("\n".join(
        f'[nodes.{n}]\nurl = "http://127.0.0.1:{p}"\nmax_memory_bytes = 50000000\n[nodes.{n}.device]\nkind = "cpu"\n'
        f'[nodes.{n}.tiers.ssd]\ngbps = 1.0\n[nodes.{n}.loader]\nfixed_seconds = 0.05\n' for n, p in ports.items()))
    x = Node(tmp_path, "x", dir_x, "--max-memory", "50MB", "--inventory", str(inv), "--node-name", "x", port=ports["x"])
    y = Node(tmp_path, "y", dir_y, "--max-memory", "50MB", "--inventory", str(inv), "--node-name", "y", port=ports["y"])
    try:
        x.wait(), y.wait()
        long = {**body(4, max_tokens=480), "model": "a"}
        ref = reference(y.url, long)
        httpx.post(y.url + "/v1/cache/a/evict?tier=device", timeout=REQUEST_SECONDS).raise_for_status()
        st = Stream(x.url, long, headers={"x-sllm-forwarded-by": "test"})  # served on x, not routed
        st.started.wait(REQUEST_SECONDS)
        r = httpx.post(x.url + "/v1/completions", json={**body(0, max_tokens=4), "model": "b"}, timeout=REQUEST_SECONDS)
        assert r.status_code == 200, r.text
        assert st.result() == (ref, "length")
        assert x.status()["migrations"]["counts"]["out_done"] == 1
        assert y.status()["migrations"]["counts"]["in_done"] == 1
        assert [m["model"] for m in x.status()["resident"]] == ["b"]
    finally:
        x.stop()
        y.stop()
