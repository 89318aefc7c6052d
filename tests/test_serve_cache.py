"""``sllm serve`` through the tier cache, against real servers on loopback: a node with a
cache directory and a remote (an HTTP server that counts GETs, moto's S3, a directory)
pulls a model no tier holds, serves it like the same model from ``--models``, reloads it
from SSD or DRAM after evictions (no remote read), keeps pinned models under capacity
pressure, refuses to evict models with requests in flight, fails a bad remote model's
requests only, and guards the cache routes with the API key. ``sllm cache ... --server``
drives it. Tiny models; no timing assertions."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest
from test_remote import (
    KiB,
    RangeServer,
    free_port,
    make_checkpoint,
    s3_server,  # noqa: F401 - a fixture, used through request.getfixturevalue
    upload_tree,
)
from test_server import LOAD_HEADER, running, wait_for
from typer.testing import CliRunner

from sllm.cli import app as cli_app
from sllm.client import NodeClient
from sllm.core.cache import CacheConfig, TierCache
from sllm.errors import ServerError
from sllm.io.remote import RemoteConfig

GREEDY = dict(prompt="The quick brown fox", max_tokens=12, temperature=0)
runner = CliRunner()


@pytest.fixture(scope="module")
def remote_root(models_dir, tmp_path_factory) -> Path:
    """A remote holding copies of ``models_dir``'s gpt2-a and gpt2-b, and ``corrupt`` (gpt2-b
    with one flipped byte in its partition: it fails its chunk checksum)."""
    root = tmp_path_factory.mktemp("serve-remote")
    for name in ("gpt2-a", "gpt2-b"):
        shutil.copytree(models_dir / name, root / name)
    shutil.copytree(models_dir / "gpt2-b", root / "corrupt")
    with open(root / "corrupt" / "partition-0.bin", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    return root


@pytest.fixture(scope="module")
def local_outputs(models_dir) -> dict[str, str]:
    """Greedy texts of gpt2-a and gpt2-b served from a ``--models`` directory (no cache)."""
    with running(models_dir) as n:
        return {m: n.client().completions.create(model=m, **GREEDY).choices[0].text for m in ("gpt2-a", "gpt2-b")}


def cache_config(tmp_path: Path, remote: str, **kw) -> CacheConfig:
    return CacheConfig(cache_dir=tmp_path / "cache", remote_url=remote, fsync=False, **kw)


def cli(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(cli_app, ["cache", *args])
    return r.exit_code, r.stdout, r.stderr


def cli_json(*args: str):
    code, out, err = cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def tiers_of(url: str, model: str) -> list[str]:
    """The tiers ``sllm cache ls --server URL --json`` shows ``model`` whole in, fastest first."""
    rows = cli_json("ls", "--server", url)["models"]
    return [r["tier"] for r in rows if r["model"] == model and r["state"] == "whole"]


def complete(node, model: str) -> tuple[str, float]:
    raw = node.client().completions.with_raw_response.create(model=model, **GREEDY)
    return raw.parse().choices[0].text, float(raw.headers[LOAD_HEADER])


def remote_gets(server: RangeServer, model: str) -> int:
    return server.gets.get(f"{model}/partition-0.bin", 0)


# ---------------------------------------------------------------------------------------
# Cold starts from each tier
# ---------------------------------------------------------------------------------------


def test_remote_model_is_pulled_served_and_reloaded_from_ssd_then_dram(remote_root, local_outputs, tmp_path):
    with RangeServer(remote_root) as remote, running(
        None, cache=cache_config(tmp_path, remote.url, dram_capacity_bytes=64 * 2**20)
    ) as n:
        url = n.url
        assert tiers_of(url, "gpt2-a") == []  # an http remote names models, it does not list them

        # 1. in no tier: pulled from the remote through the pipeline, remote -> SSD -> DRAM
        text, load_seconds = complete(n, "gpt2-a")
        assert text == local_outputs["gpt2-a"] and load_seconds > 0
        assert remote_gets(remote, "gpt2-a") == 1
        st = n.status()
        cold = st["last_cold_start"]
        assert (cold["model"], cold["tier"]) == ("gpt2-a", "remote")
        assert cold["pull_seconds"] > 0 and cold["fetched_bytes"] > cold["nbytes"] > 0
        assert cold["load_seconds"] >= cold["pull_seconds"]
        [res] = st["resident"]
        assert res["loaded_from"] == "remote" and res["tiers"] == ["device", "dram", "ssd"]
        assert {"model": "gpt2-a", "source": "cache", "tiers": ["device", "dram", "ssd"]} in st["models"]
        assert [t["tier"] for t in st["cache"]["tiers"]] == ["dram", "ssd"]
        assert tiers_of(url, "gpt2-a") == ["device", "dram", "ssd"]
        rows = cli_json("ls", "--server", url)["models"]
        dram = next(r for r in rows if r["model"] == "gpt2-a" and r["tier"] == "dram")
        assert dram["in_use"] and dram["resident"]  # on the CPU the weights are the DRAM buffers

        # a warm request reads nothing
        assert complete(n, "gpt2-a") == (local_outputs["gpt2-a"], 0.0)

        # 2. evicted from the device and DRAM through --server: the next load reads the SSD
        code, out, err = cli("evict", "gpt2-a", "--tier", "dram", "--server", url)
        assert code == 1 and "HTTP 409" in err and "evict it from the device first" in err
        assert cli_json("evict", "gpt2-a", "--tier", "device", "--server", url)["tiers"] == ["device"]
        assert cli_json("evict", "gpt2-a", "--tier", "dram", "--server", url)["tiers"] == ["dram"]
        assert tiers_of(url, "gpt2-a") == ["ssd"]
        text, load_seconds = complete(n, "gpt2-a")
        assert text == local_outputs["gpt2-a"] and load_seconds > 0
        assert n.status()["last_cold_start"]["tier"] == "ssd"
        assert remote_gets(remote, "gpt2-a") == 1  # not read from the remote again
        assert tiers_of(url, "gpt2-a") == ["device", "dram", "ssd"]  # the SSD load filled DRAM

        # 3. unloaded only: the DRAM entry serves the next cold start without a read
        cli_json("evict", "gpt2-a", "--tier", "device", "--server", url)
        assert complete(n, "gpt2-a")[0] == local_outputs["gpt2-a"]
        cold = n.status()["last_cold_start"]
        assert (cold["tier"], cold["fetched_bytes"], cold["read_seconds"]) == ("dram", 0, 0.0)

        # 4. evicted from every tier: the next request pulls it again
        ev = cli_json("evict", "gpt2-a", "--server", url)
        assert ev["tiers"] == ["device", "dram", "ssd"] and ev["freed_bytes"] > 0
        assert tiers_of(url, "gpt2-a") == []
        assert complete(n, "gpt2-a")[0] == local_outputs["gpt2-a"]
        assert n.status()["last_cold_start"]["tier"] == "remote" and remote_gets(remote, "gpt2-a") == 2

        stats = {t["tier"]: t for t in cli_json("stats", "--server", url)["tiers"]}
        assert set(stats) == {"device", "dram", "ssd"}
        assert stats["device"]["entries"] == 1 and stats["device"]["evictions"] == 3
        assert stats["ssd"]["entries"] == 1 and stats["dram"]["entries"] == 1


def test_without_room_in_dram_the_model_loads_from_ssd(remote_root, local_outputs, tmp_path):
    with running(None, cache=cache_config(tmp_path, str(remote_root), dram_capacity_bytes=1 * 2**20)) as n:
        assert complete(n, "gpt2-b")[0] == local_outputs["gpt2-b"]  # needs 14 MiB of DRAM: SSD only
        assert n.status()["last_cold_start"]["tier"] == "remote"
        assert tiers_of(n.url, "gpt2-b") == ["device", "ssd"]
        cli_json("evict", "gpt2-b", "--tier", "device", "--server", n.url)
        tokenizers = n.app.state.manager.tokenizers
        tokenizers._items.clear()  # as after a restart: the SSD copy's tokenizer is parsed with the fetch
        assert complete(n, "gpt2-b")[0] == local_outputs["gpt2-b"]
        assert n.status()["last_cold_start"]["tier"] == "ssd"
        assert (tokenizers.hits, tokenizers.misses) == (1, 2)  # the prefetch parsed it; the load found it
        assert n.status()["tokenizers"] == ["gpt2-b"]


def test_pulls_from_s3_and_local_models_are_served_beside_cached_ones(
    remote_root, local_outputs, models_dir, tmp_path, request
):
    endpoint = request.getfixturevalue("s3_server")
    upload_tree(endpoint, "serve", "models", remote_root)
    config = CacheConfig(cache_dir=tmp_path / "cache", remote_url="s3://serve/models", fsync=False,
                         remote=RemoteConfig(s3_endpoint_url=endpoint))
    only_a = tmp_path / "local"
    shutil.copytree(models_dir / "gpt2-a", only_a / "gpt2-a")
    with running(only_a, cache=config) as n:
        assert complete(n, "gpt2-b")[0] == local_outputs["gpt2-b"]
        assert n.status()["last_cold_start"]["tier"] == "remote"
        assert complete(n, "gpt2-a")[0] == local_outputs["gpt2-a"]
        assert n.status()["last_cold_start"]["tier"] == "local"  # --models shadows the remote's copy
        cards = {m.id: m for m in n.client().models.list().data}
        assert cards["gpt2-a"].source == "local" and cards["gpt2-a"].tiers == ["device", "local"]
        assert cards["gpt2-b"].source == "cache" and cards["gpt2-b"].tiers == ["device", "ssd"]


# ---------------------------------------------------------------------------------------
# Pins, in-flight requests, failures, the API key
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Path:
    """A directory remote with fake models a, b, c (256 KiB each: 2 MiB of DRAM each)."""
    root = tmp_path_factory.mktemp("serve-fakes")
    for seed, name in enumerate("abc"):
        make_checkpoint(root / name, 256 * KiB, seed=seed)
    return root


def test_pinned_models_stay_under_capacity_pressure(fakes, tmp_path):
    entry = sum(p.stat().st_size for p in (fakes / "a").iterdir())
    config = cache_config(tmp_path, str(fakes), dram_capacity_bytes=4 * 2**20, ssd_capacity_bytes=2 * entry + 4096)
    with running(None, cache=config) as n, NodeClient(n.url) as client:
        assert {m.id: m.tiers for m in n.client().models.list().data} == {"a": ["remote"], "b": ["remote"],
                                                                            "c": ["remote"]}
        assert client.cache_pull("a")["tiers"] == ["dram", "ssd"]
        assert client.cache_pull("b")["tiers"] == ["dram", "ssd"]
        assert cli_json("pin", "a", "--server", n.url) == {"model": "a", "tiers": ["dram", "ssd"], "pinned": True}
        pulled = client.cache_pull("c")  # both tiers are full: b goes, though a is older
        assert sorted(pulled["evicted"]) == ["dram:b", "ssd:b"]
        assert tiers_of(n.url, "a") == ["dram", "ssd"] and tiers_of(n.url, "b") == []
        code, _, err = cli("evict", "a", "--tier", "ssd", "--server", n.url)
        assert code == 1 and "HTTP 409" in err and "pinned in the SSD tier" in err
        assert tiers_of(n.url, "a") == ["dram", "ssd"]
        assert cli_json("unpin", "a", "--tier", "dram", "--server", n.url)["tiers"] == ["dram"]
        assert client.cache_pull("b", "dram")["evicted"] == ["ssd:c", "dram:a"]  # a is still pinned on SSD
        assert tiers_of(n.url, "a") == ["ssd"]
        code, _, err = cli("pull", "b", "--tier", "device", "--server", n.url)
        assert code == 2 and "--tier 'device': a pull goes to dram or ssd" in err
        with pytest.raises(ServerError, match=r"HTTP 404: nope: not in the device, DRAM or SSD tier"):
            client.cache_pin("nope")


def test_pinned_on_the_device_outlives_the_keep_alive(remote_root, tmp_path):
    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    with running(None, clock=clock, cache=cache_config(tmp_path, str(remote_root)), keep_alive_seconds=60,
                 reap_interval_seconds=0.02) as n:
        complete(n, "gpt2-a")
        complete(n, "gpt2-b")
        assert cli_json("pin", "gpt2-a", "--tier", "device", "--server", n.url)["tiers"] == ["device"]
        clock.now += 120  # both idle past the keep-alive
        wait_for(lambda: [r["model"] for r in n.status()["resident"]] == ["gpt2-a"], "gpt2-b's keep-alive unload")
        assert n.status()["resident"][0]["pinned"] is True
        code, _, err = cli("evict", "gpt2-a", "--server", n.url)
        assert code == 1 and "pinned on the device" in err
        cli_json("unpin", "gpt2-a", "--server", n.url)
        wait_for(lambda: n.status()["resident"] == [], "gpt2-a's keep-alive unload once unpinned")


def test_evicting_a_model_with_requests_in_flight_is_refused(remote_root, local_outputs, tmp_path):
    with running(None, cache=cache_config(tmp_path, str(remote_root), dram_capacity_bytes=64 * 2**20)) as n:
        manager = n.app.state.manager
        lease = n.call(manager.acquire("gpt2-a"))  # a request in flight, as the server sees it
        try:
            for tier in ("device", None):
                args = ["--tier", tier] if tier else []
                code, out, err = cli("evict", "gpt2-a", *args, "--server", n.url)
                assert code == 1 and out == ""
                assert "HTTP 409: gpt2-a: 1 request(s) in flight on the device" in err
            r = httpx.post(f"{n.url}/v1/cache/gpt2-a/evict", timeout=30)
            assert r.status_code == 409 and r.json()["error"]["code"] == "tier_conflict"
            assert tiers_of(n.url, "gpt2-a") == ["device", "dram", "ssd"]  # nothing was removed
            stream = n.client().completions.create(model="gpt2-a", stream=True, **GREEDY)
            assert "".join(c.choices[0].text for c in stream) == local_outputs["gpt2-a"]
        finally:
            async def give_back() -> None:
                manager.release(lease)

            n.call(give_back())
        assert cli_json("evict", "gpt2-a", "--tier", "device", "--server", n.url)["tiers"] == ["device"]


def test_a_bad_remote_model_fails_only_its_own_requests(remote_root, local_outputs, tmp_path):
    async def scenario(url: str) -> list:
        import openai

        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        calls = [client.completions.create(model=m, **GREEDY) for m in ["gpt2-a", "nope", "corrupt"] * 3]
        return await asyncio.gather(*calls, return_exceptions=True)

    with RangeServer(remote_root) as remote, running(None, cache=cache_config(tmp_path, remote.url)) as n:
        results = asyncio.run(scenario(n.url))
        for i, r in enumerate(results):
            if i % 3 == 0:
                assert r.choices[0].text == local_outputs["gpt2-a"]
                continue
            err = r.body
            assert "\n" not in err["message"] and err["param"] == "model"
            if i % 3 == 1:  # a name the remote does not hold: not found, after one lookup
                assert r.status_code == 404 and err["code"] == "model_not_found"
                continue
            assert r.status_code == 503 and err["code"] == "model_pull_failed"
            assert f"pulling it from {remote.url} failed" in err["message"]
            assert "fails its sha256 checksum" in err["message"]
        assert tiers_of(n.url, "nope") == [] and tiers_of(n.url, "corrupt") == []  # nothing that looks whole
        assert {m.id for m in n.client().models.list().data} == {"gpt2-a"}
        r = httpx.post(f"{n.url}/v1/completions", json={"model": "../etc", "prompt": "x"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        with NodeClient(n.url) as client, pytest.raises(ServerError, match="HTTP 404: model 'nope' not found"):
            client.cache_pull("nope")
    with running(None, cache=CacheConfig(cache_dir=tmp_path / "c2", remote_url=f"http://127.0.0.1:{free_port()}",
                                         remote=RemoteConfig(timeout_seconds=5))) as n:
        r = httpx.post(f"{n.url}/v1/completions", json={"model": "gpt2-a", "prompt": "x"}, timeout=30)
        assert r.status_code == 503 and "cannot connect" in r.json()["error"]["message"]


def test_cache_routes_need_the_api_key(fakes, tmp_path):
    with running(None, cache=cache_config(tmp_path, str(fakes)), api_key="s3cret") as n:
        for method, path in (("GET", "/v1/cache"), ("POST", "/v1/cache/a/pull"), ("POST", "/v1/cache/a/pin"),
                             ("POST", "/v1/cache/a/unpin"), ("POST", "/v1/cache/a/evict?tier=ssd")):
            r = httpx.request(method, f"{n.url}{path}", timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        code, out, err = cli("ls", "--server", n.url)
        assert code == 1 and out == "" and "HTTP 401" in err
        assert cli_json("pull", "a", "--server", n.url, "--api-key", "s3cret")["tiers"] == ["ssd"]
        rows = cli_json("ls", "--server", n.url, "--api-key", "s3cret")["models"]
        assert [(r["model"], r["tier"]) for r in rows] == [("a", "ssd")]
        code, out, _ = cli("stats", "--server", n.url, "--api-key", "s3cret")
        assert code == 0 and "device" in out and "ssd" in out


# ---------------------------------------------------------------------------------------
# The loader from a DRAM lease
# ---------------------------------------------------------------------------------------


def test_load_model_from_host_views_the_dram_buffers_and_release_gives_the_lease_back(remote_root, tmp_path):
    import torch

    from sllm.core.loader import load_model, load_model_from_host, release

    cache = TierCache(cache_config(tmp_path, str(remote_root), dram_capacity_bytes=64 * 2**20))
    lease = cache.acquire("gpt2-a")
    [buf] = lease.partition_tensors()
    model = load_model_from_host(lease, "cpu")
    start, end = buf.data_ptr(), buf.data_ptr() + buf.numel()
    assert all(start <= p.data_ptr() < end for p in model.parameters())  # zero-copy views
    reference = load_model(remote_root / "gpt2-a")
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name
    assert model.sllm_report.pool_hit and model.sllm_report.read_seconds >= 0
    [row] = [r for r in cache.ls() if r.tier == "dram"]
    assert row.in_use
    release(model)
    [row] = [r for r in cache.ls() if r.tier == "dram"]
    assert not row.in_use and cache.evict("gpt2-a", "dram").freed_bytes > 0
    release(reference)


@pytest.mark.cuda
def test_cuda_load_from_dram_copies_and_gives_the_lease_back(remote_root, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = cache_config(tmp_path, str(remote_root), dram_capacity_bytes=64 * 2**20)
    with running(None, device="cuda", cache=config) as n:
        first = complete(n, "gpt2-a")[0]
        assert first and n.status()["last_cold_start"]["tier"] == "remote"
        rows = cli_json("ls", "--server", n.url)["models"]
        dram = next(r for r in rows if r["model"] == "gpt2-a" and r["tier"] == "dram")
        assert dram["resident"] and not dram["in_use"]  # the weights were copied to the GPU
        cli_json("evict", "gpt2-a", "--tier", "device", "--server", n.url)
        assert complete(n, "gpt2-a")[0] == first
        cold = n.status()["last_cold_start"]
        assert cold["tier"] == "dram" and cold["read_seconds"] > 0  # the host-to-device copy
