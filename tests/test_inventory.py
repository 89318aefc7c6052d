"""The TOML inventory: parsing, validation messages naming the file and key, merging a node
profile written by the profiler, and live state gathered concurrently (down nodes marked)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from sllm.core.inventory import (
    Inventory,
    TomlInventory,
    gather_states,
    inventory_document,
    parse_inventory,
    parse_status,
)
from sllm.core.profile import TierBandwidth, build_profile, read_profile, write_profile
from sllm.errors import InventoryError, ServerError

SAMPLE = """
[remote]
url = "http://store:9000/models"
gbps = 0.4

[models."org/big"]
nbytes = 5000000000
tensors = 291

[nodes.b]
url = "http://127.0.0.1:9002/"
api_key_env = "KEY_B"
admin_key_env = "ADMIN_B"
max_memory_bytes = 4000000000
[nodes.b.device]
kind = "cuda"
count = 2
memory_bytes = 80000000000
[nodes.b.tiers.ssd]
gbps = 3.5
capacity_bytes = 500000000000
load_fixed_seconds = 0.017
load_gbps = 2.9
[nodes.b.tiers.dram]
gbps = 7.8
load_fixed_seconds = 0.002
[nodes.b.loader]
fixed_seconds = 0.008
pipelined = false
seconds_per_tensor = 0.00002
probe_tensors = 77

[nodes.a]
url = "http://127.0.0.1:9001"
"""


def write(tmp_path, text: str):
    p = tmp_path / "cluster.toml"
    p.write_text(text)
    return p


def test_parse_sample(tmp_path):
    inv = TomlInventory(write(tmp_path, SAMPLE)).load()
    assert list(inv.nodes) == ["a", "b"] and inv.remote_url == "http://store:9000/models" and inv.remote_gbps == 0.4
    b = inv.nodes["b"]
    assert b.url == "http://127.0.0.1:9002" and b.device_kind == "cuda" and b.device_count == 2
    assert list(b.tiers) == ["dram", "ssd"] and b.tiers["ssd"].capacity_bytes == 500_000_000_000
    assert b.loader_fixed_seconds == 0.008 and b.pipelined is False and b.memory_budget_bytes == 4_000_000_000
    assert (b.tiers["ssd"].load_fixed_seconds, b.tiers["ssd"].load_gbps) == (0.017, 2.9)
    assert (b.tiers["dram"].load_fixed_seconds, b.tiers["dram"].load_gbps) == (0.002, None)
    assert (b.load_seconds_per_tensor, b.load_probe_tensors) == (0.00002, 77)
    assert (inv.nodes["a"].load_seconds_per_tensor, inv.nodes["a"].load_probe_tensors) == (None, None)
    assert b.api_key({"KEY_B": "s3cret"}) == "s3cret" and inv.nodes["a"].api_key({}) is None
    assert b.admin_key({"KEY_B": "s3cret", "ADMIN_B": "root"}) == "root"
    assert inv.nodes["a"].admin_key({}) is None and replace(b, admin_key_env=None).admin_key({"KEY_B": "k"}) == "k"
    assert inv.nodes["a"].device_kind == "cpu" and inv.model_bytes == {"org/big": 5_000_000_000}
    assert inv.model_tensors == {"org/big": 291}
    assert parse_inventory(inventory_document(inv), where=str(tmp_path / "cluster.toml")) == inv  # round trip


@pytest.mark.parametrize("bad, message", [
    ('[nodes.a]\nurl = "ftp://x"', "nodes.a: url = 'ftp://x'"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.tiers.ssd]\ngbps = -1', "tiers.ssd.gbps = -1"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.tiers.tape]\ngbps = 1', "tiers.tape: unknown tier"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.device]\nkind = "tpu"', "device.kind = 'tpu'"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.device]\ncount = 0', "device.count = 0"),
    ('[nodez.a]\nurl = "http://x"', "unknown top-level key(s) nodez"),
    ('[nodes.a]\nurl = "http://x"\nadmin_key_env = 3', "nodes.a: admin_key_env = 3"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.tiers.ssd]\ngbps = 1\nload_gbps = 0', "tiers.ssd.load_gbps = 0"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.tiers.ssd]\ngbps = 1\nload_fixed_seconds = -1',
     "tiers.ssd.load_fixed_seconds = -1"),
    ('[models.m]\nnbytes = "big"', "models.m: nbytes = 'big'"),
    ('[models.m]\nnbytes = 9\ntensors = 0', "models.m: tensors = 0"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.loader]\nseconds_per_tensor = 1e-5', "loader.probe_tensors = None"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.loader]\nseconds_per_tensor = 1e-5\nprobe_tensors = 0',
     "loader.probe_tensors = 0"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.loader]\nseconds_per_tensor = -1\nprobe_tensors = 9',
     "loader.seconds_per_tensor = -1"),
    ('[nodes.a]\nurl = "http://x"\n[nodes.a.loader]\ntokenizer_seconds = -0.1', "loader.tokenizer_seconds = -0.1"),
    ("[nodes.a\n", "not valid TOML"),
])
def test_bad_inventory_names_file_and_key(tmp_path, bad, message):
    path = write(tmp_path, bad)
    with pytest.raises(InventoryError) as e:
        TomlInventory(path).load()
    assert str(path) in str(e.value) and message in str(e.value)
    assert e.value.exit_code == 2


def test_missing_file(tmp_path):
    with pytest.raises(InventoryError, match="no such inventory file"):
        TomlInventory(tmp_path / "nope.toml").load()


def test_add_profile_merges_a_written_node_profile(tmp_path):
    prof = build_profile({"ssd": TierBandwidth("ssd", 3.51, 1 << 30, 0.3, 8), "dram": TierBandwidth("dram", 7.8, 1, 1),
                          "remote": TierBandwidth("remote", 0.275, 1, 1)},
                         loader_fixed_seconds=0.008, name="n1", capacities={"ssd": 10**12}, tensor_cost=(1.9e-5, 77),
                         tokenizer_seconds=0.13)
    path = write_profile(prof, tmp_path / "node-profile.toml")
    inv_path = tmp_path / "cluster.toml"
    store = TomlInventory(inv_path)
    spec = store.add_profile(read_profile(path), url="http://10.0.0.5:8343", api_key_env="K1")
    assert spec.name == "n1" and spec.url == "http://10.0.0.5:8343" and spec.tiers["ssd"].gbps == 3.51
    assert spec.tiers["ssd"].capacity_bytes == 10**12 and spec.loader_fixed_seconds == 0.008
    assert (spec.load_seconds_per_tensor, spec.load_probe_tensors, spec.tokenizer_seconds) == (1.9e-5, 77, 0.13)
    store.add_profile(read_profile(path), name="n2", url="http://10.0.0.6:8343")
    again = store.add_profile(read_profile(path), url="http://10.0.0.7:8343")  # same name: replaced
    inv = store.load()
    assert list(inv.nodes) == ["n1", "n2"] and inv.nodes["n1"].url == again.url
    assert not list(tmp_path.glob("*.tmp*"))
    with pytest.raises(InventoryError, match="not a node profile"):
        store.add_profile({"nodes": {}})


STATUS = {
    "max_memory_bytes": 1000, "resident_bytes": 300, "budget_wait_seconds": 120.0,
    "resident": [{"model": "x", "nbytes": 300, "pinned": False, "idle_seconds": 0.0,
                  "requests": [{"id": "r1", "prompt_tokens": 10, "completion_tokens": 4}]}],
    "models": [{"model": "x", "tiers": ["device", "dram", "ssd"]}, {"model": "y", "tiers": ["local"]}],
    "model_bytes": {"x": 300}, "model_tensors": {"x": 29, "y": 0},
    "loader_queue": [{"model": "z", "nbytes": 50, "tier": "remote", "elapsed_seconds": 0.5, "running": True}],
    "prefill_fit": {"x": {"a_seconds_per_token": 0.001, "b_seconds": 0.01, "samples": 7}},
    "cache": {"remote": "http://store"}, "tokenizers": ["x"],
}


def test_parse_status():
    st = parse_status("a", STATUS)
    assert st.up and st.max_memory_bytes == 1000 and st.resident_bytes == 300
    assert st.resident[0].requests[0].tokens == 14 and st.tiers == {"x": ("dram", "ssd"), "y": ("local",)}
    assert st.model_bytes == {"x": 300} and st.loader[0].running and st.loader[0].tier == "remote"
    assert st.prefill["x"].samples == 7 and st.has_remote and st.model_tensors == {"x": 29}
    assert st.budget_wait_seconds == 120.0 and parse_status("a", {}).budget_wait_seconds is None
    assert st.tokenizers == {"x"} and parse_status("a", {}).tokenizers is None
    assert not parse_status("a", {"resident": [{"nbytes": 1}]}).up  # malformed: down, not a crash
    assert not parse_status("a", {}).has_remote


def test_gather_states_is_concurrent_and_marks_failures_down():
    inv = parse_inventory({"nodes": {n: {"url": f"http://{n}:1"} for n in ("a", "b", "c")}})
    barrier = threading.Barrier(2, timeout=10)  # a and b both wait at the barrier: only concurrent fetches pass

    def fetch(spec, timeout):
        assert timeout == 0.5
        if spec.name == "c":
            raise ServerError("cannot reach http://c:1: ConnectError")
        barrier.wait()
        return STATUS

    states = gather_states(Inventory(inv.nodes).nodes.values(), fetch, timeout=0.5)
    assert list(states) == ["a", "b", "c"]
    assert states["a"].up and states["b"].up
    assert not states["c"].up and "ConnectError" in states["c"].error
    assert gather_states([], fetch) == {}


def test_cli_inventory_add_show_and_plan_with_every_node_down(tmp_path):
    import json
    import socket

    from typer.testing import CliRunner

    from sllm.cli import app

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connection refused
    prof = build_profile({"ssd": TierBandwidth("ssd", 3.0, 1, 1)}, loader_fixed_seconds=0.01, name="n1")
    path = write_profile(prof, tmp_path / "p.toml")
    inv = tmp_path / "cluster.toml"
    run = CliRunner().invoke
    r = run(app, ["inventory", "add", str(path), "--inventory", str(inv), "--url", dead, "--max-memory", "2GB", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["node"]["max_memory_bytes"] == 2_000_000_000
    r = run(app, ["inventory", "show", "--inventory", str(inv), "--json", "--timeout", "0.5"])
    assert r.exit_code == 0 and json.loads(r.stdout)["states"]["n1"]["up"] is False
    inv.write_text(inv.read_text() + '\n[models.m]\nnbytes = 1000\n')
    r = run(app, ["schedule-plan", "m", "--inventory", str(inv), "--json", "--timeout", "0.5"])
    assert r.exit_code == 1 and "no node can start m" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["best"] is None and doc["down"][0]["node"] == "n1" and doc["options"] == []
    r = run(app, ["schedule-plan", "m", "--inventory", str(tmp_path / "missing.toml")])
    assert r.exit_code == 2 and "missing.toml: no such inventory file" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[nodes.a]\nurl = 5\n")
    r = run(app, ["inventory", "show", "--inventory", str(bad)])
    assert r.exit_code == 2 and "bad.toml: nodes.a: url = 5" in r.stderr
    s.close()
