"""Three real ``sllm serve`` nodes on loopback (subprocesses, each with its own port, cache
directory and memory budget, one shared directory remote) behind one inventory:
``schedule-plan`` ranks the node holding the model in DRAM first, then SSD, then the
remote-only one; a request sent to the wrong node is forwarded to the right one and streamed
back intact; a forwarded request is never forwarded again; a down node is skipped. Tiny
models; no timing assertions (every subprocess and request has a timeout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_remote import free_port

from sllm.core.cache import CacheConfig, TierCache
from sllm.core.format import open_checkpoint
from sllm.server.frontdoor import ESTIMATE_HEADER, FORWARDED_HEADER, SERVED_BY_HEADER
from sllm.server.models import BUDGET_WAIT_SECONDS

START_SECONDS = 120  # hang guards, not performance bounds
REQUEST_SECONDS = 120
NODES = ("a", "b", "c")
GREEDY = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0}


def inventory_text(ports: dict[str, int], remote: Path) -> str:
    out = [f'[remote]\nurl = "{remote}"\ngbps = 0.2\n']
    for n, p in ports.items():
        out.append(f'[nodes.{n}]\nurl = "http://127.0.0.1:{p}"\nmax_memory_bytes = 64000000\n'
                   f'[nodes.{n}.device]\nkind = "cpu"\n'
                   f'[nodes.{n}.tiers.ssd]\ngbps = 2.0\n[nodes.{n}.tiers.dram]\ngbps = 10.0\n'
                   f'[nodes.{n}.tiers.remote]\ngbps = 0.2\n[nodes.{n}.loader]\nfixed_seconds = 0.01\n')
    return "\n".join(out)


class Cluster:
    """The three nodes; :meth:`start` one, :meth:`stop` one, :meth:`close` all."""

    def __init__(self, root: Path, remote: Path) -> None:
        self.root, self.remote = root, remote
        self.ports = {n: free_port() for n in NODES}
        self.inventory = root / "cluster.toml"
        self.inventory.write_text(inventory_text(self.ports, remote))
        self.procs: dict[str, subprocess.Popen] = {}

    def url(self, n: str) -> str:
        return f"http://127.0.0.1:{self.ports[n]}"

    def start(self, *names: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        for n in names:
            cmd = [sys.executable, "-m", "sllm", "serve", "--port", str(self.ports[n]), "--cache-dir",
                   str(self.root / f"cache-{n}"), "--remote", str(self.remote), "--dram-capacity", "64MiB",
                   "--max-memory", "64MB", "--inventory", str(self.inventory), "--node-name", n, "--json"]
            self.procs[n] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.root / f"{n}.log", "w"),
                                             text=True, env=env)
        deadline = time.monotonic() + START_SECONDS
        for n in names:
            while True:
                assert self.procs[n].poll() is None, (self.root / f"{n}.log").read_text()
                try:
                    if httpx.get(self.url(n) + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"node {n} did not start"
                time.sleep(0.2)

    def stop(self, n: str) -> None:
        p = self.procs.pop(n)
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)

    def close(self) -> None:
        for n in list(self.procs):
            self.stop(n)


@pytest.fixture(scope="module")
def cluster(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    remote = root / "remote"
    for m in ("gpt2-a", "gpt2-b"):
        shutil.copytree(models_dir / m, remote / m)
    # b holds gpt2-a on SSD before it starts; c holds nothing
    TierCache(CacheConfig(root / "cache-b", remote_url=str(remote), fsync=False)).pull("gpt2-a")
    c = Cluster(root, remote)
    c.start(*NODES)
    try:
        # a: gpt2-a loaded (pinned to a by the forwarded marker), then unloaded: it stays in a's DRAM tier
        r = httpx.post(c.url("a") + "/v1/completions", json={"model": "gpt2-a", **GREEDY},
                       headers={FORWARDED_HEADER: "test"}, timeout=REQUEST_SECONDS)
        assert r.status_code == 200, r.text
        c.reference = r.json()["choices"][0]["text"]
        r = httpx.post(c.url("a") + "/v1/cache/gpt2-a/evict", params={"tier": "device"}, timeout=30)
        assert r.status_code == 200, r.text
        yield c
    finally:
        c.close()


def plan_json(cluster: Cluster, model: str = "gpt2-a") -> dict:
    r = subprocess.run([sys.executable, "-m", "sllm", "schedule-plan", model, "--inventory", str(cluster.inventory),
                        "--json", "--timeout", "2"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


def stream(url: str, headers: dict | None = None) -> tuple[str, dict, list[str]]:
    """Text, response headers and the raw SSE data lines of a streamed completion."""
    body = {"model": "gpt2-a", **GREEDY, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers or {}, timeout=REQUEST_SECONDS) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        hdrs = dict(r.headers)
    text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1] if json.loads(ln[6:]).get("choices"))
    return text, hdrs, lines


def test_status_reports_what_the_scheduler_needs(cluster):
    st = httpx.get(cluster.url("a") + "/status", timeout=30).json()
    [m] = [m for m in st["models"] if m["model"] == "gpt2-a"]
    assert m["tiers"] == ["dram", "ssd"] and st["model_bytes"]["gpt2-a"] > 0
    assert st["model_tensors"]["gpt2-a"] == len(open_checkpoint(cluster.remote / "gpt2-a").tensors)
    assert st["loader_queue"] == [] and st["resident"] == []
    assert st["budget_wait_seconds"] == BUDGET_WAIT_SECONDS  # the scheduler plans no longer wait for room
    assert st["prefill_fit"]["gpt2-a"]["recorded"] == 1 and st["prefill_fit"]["gpt2-a"]["samples"] == 0  # default yet
    assert st["engine"]["mean_generated_tokens"] > 0


def test_schedule_plan_ranks_dram_then_ssd_then_remote(cluster):
    doc = plan_json(cluster)
    ranked = [(o["node"], o["tier"]) for o in doc["options"]]
    assert ranked == [("a", "dram"), ("b", "ssd"), ("c", "remote")]
    assert doc["best"] == "a" and doc["down"] == []
    secs = [o["seconds"] for o in doc["options"]]
    assert secs == sorted(secs) and secs[0] > 0


def test_wrong_node_forwards_and_streams_intact(cluster):
    text, headers, lines = stream(cluster.url("c"))
    assert text == cluster.reference  # the same greedy text as served directly
    assert headers[SERVED_BY_HEADER] == "a" and headers[FORWARDED_HEADER] == "c"
    assert float(headers[ESTIMATE_HEADER]) > 0
    assert lines[-1] == "data: [DONE]" and sum(ln == "data: [DONE]" for ln in lines) == 1
    assert httpx.get(cluster.url("c") + "/status", timeout=30).json()["resident"] == []  # c loaded nothing
    res = httpx.get(cluster.url("a") + "/status", timeout=30).json()["resident"]
    assert [r["model"] for r in res] == ["gpt2-a"] and res[0]["loaded_from"] == "dram"
    # now resident on a: every node sends it there; a serves it itself
    _, h, _ = stream(cluster.url("b"))
    assert h[SERVED_BY_HEADER] == "a"
    _, h, _ = stream(cluster.url("a"))
    assert h[SERVED_BY_HEADER] == "a" and FORWARDED_HEADER not in h


def test_a_forwarded_request_is_never_forwarded_again(cluster):
    text, h, _ = stream(cluster.url("b"), headers={FORWARDED_HEADER: "c"})
    assert h[SERVED_BY_HEADER] == "b" and text == cluster.reference  # served where it arrived, from b's SSD
    assert [r["model"] for r in httpx.get(cluster.url("b") + "/status", timeout=30).json()["resident"]] == ["gpt2-a"]


def test_down_node_is_skipped(cluster):
    httpx.post(cluster.url("b") + "/v1/cache/gpt2-a/evict", params={"tier": "device"}, timeout=30)
    cluster.stop("a")
    doc = plan_json(cluster)
    assert [d["node"] for d in doc["down"]] == ["a"]
    assert [o["node"] for o in doc["options"]][0] == "b"
    text, h, _ = stream(cluster.url("c"))
    assert h[SERVED_BY_HEADER] == "b" and text == cluster.reference


def test_apply_loads_the_model_on_the_best_node(cluster, models_dir):
    # no node holds gpt2-b yet, and the inventory has no [models] entry: a node that can pull it
    # reads its size from the remote's manifest (GET /v1/models/gpt2-b)
    nbytes = sum(f.stat().st_size for f in (models_dir / "gpt2-b").glob("partition-*.bin"))
    card = httpx.get(cluster.url("c") + "/v1/models/gpt2-b", timeout=30).json()
    assert card["nbytes"] == nbytes and card["tiers"] == ["remote"]
    assert card["tensors"] == len(open_checkpoint(models_dir / "gpt2-b").tensors)  # from the remote's index
    doc = plan_json(cluster, "gpt2-b")
    assert doc["nbytes"] == nbytes and {o["tier"] for o in doc["options"]} == {"remote"}
    r = subprocess.run([sys.executable, "-m", "sllm", "schedule-plan", "gpt2-b", "--inventory", str(cluster.inventory),
                        "--apply", "--no-migration", "--json", "--timeout", "2"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    best = doc["best"]
    assert doc["applied"]["node"] == best and best in ("b", "c")
    load = doc["applied"]["load"]  # loaded through /v1/cache/gpt2-b/load, pulled from the remote
    assert load["model"] == "gpt2-b" and load["tier"] == "remote" and load["loaded"] and load["nbytes"] == nbytes
    res = httpx.get(cluster.url(best) + "/status", timeout=30).json()["resident"]
    assert "gpt2-b" in [x["model"] for x in res]
