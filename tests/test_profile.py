"""Tier profiling: `sllm load-bench --tiers` measures each tier and writes the node profile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from sllm.core.profile import TierBandwidth, build_profile, measure_ssd, read_profile, write_profile


def test_load_bench_tiers_writes_profile(tiny_sllm_gpt2, tmp_path):
    remote = tmp_path / "remote"
    shutil.copytree(tiny_sllm_gpt2, remote / "tiny")
    local = tmp_path / "ssd" / "tiny"
    shutil.copytree(tiny_sllm_gpt2, local)
    profile_path = tmp_path / "node.toml"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "sllm", "load-bench", str(local), "--tiers", "--remote", str(remote),
         "--remote-model", "tiny", "--runs", "1", "--profile", str(profile_path), "--json", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    nbytes = (local / "partition-0.bin").stat().st_size
    assert [load["tier"] for load in out["loads"]] == ["remote", "ssd", "dram"]
    assert all(load["seconds"] > 0 and load["nbytes"] == nbytes for load in out["loads"])
    node = tomllib.loads(profile_path.read_text())["node"]
    assert set(node["tiers"]) == {"ssd", "dram", "remote"}
    assert all(t["gbps"] > 0 and t["seconds"] > 0 for t in node["tiers"].values())
    assert node["tiers"]["remote"]["nbytes"] == nbytes
    # each tier's load path, measured as sllm serve loads: a fixed cost, and a bandwidth where bytes move
    assert all(0 <= load["fixed_seconds"] <= load["seconds"] for load in out["loads"])
    assert [load["fixed_seconds"] for load in out["loads"]] == pytest.approx(
        [node["tiers"][t]["load_fixed_seconds"] for t in ("remote", "ssd", "dram")], abs=1e-6)
    assert "load_gbps" not in node["tiers"]["dram"] and node["tiers"]["remote"]["load_gbps"] > 0
    from sllm.core.inventory import parse_node

    spec = parse_node("n", {**node, "url": "http://127.0.0.1:1"}, where=str(profile_path))
    assert spec.tiers["ssd"].load_fixed_seconds == node["tiers"]["ssd"]["load_fixed_seconds"]
    assert node["host"]["cpus"] == os.cpu_count()
    assert node["loader"]["fixed_seconds"] >= 0
    # the fixed parts' cost per tensor, from 1- and 2-layer copies of this 2-layer model; in the inventory too
    from sllm.core.loadpath import tensor_count

    assert node["loader"]["seconds_per_tensor"] >= 0 and node["loader"]["probe_tensors"] == tensor_count(local)
    assert (spec.load_seconds_per_tensor, spec.load_probe_tensors) == (
        node["loader"]["seconds_per_tensor"], node["loader"]["probe_tensors"])
    # the parse of its tokenizer (a node pays it at its first load of a model), read back the same
    assert node["loader"]["tokenizer_seconds"] > 0 and spec.tokenizer_seconds == node["loader"]["tokenizer_seconds"]
    assert not list(tmp_path.glob("ssd/.sllm-tmp-*"))  # the probe cache and probe file are gone


@pytest.mark.parametrize("module, measure, exc, logged, field, key", [
    ("loadpath", "measure_tensor_cost", ValueError("no such layer count"), "no per-tensor load cost",
     "seconds_per_tensor", "seconds_per_tensor"),
    ("profile", "measure_tokenizer_seconds", OSError("Can't load tokenizer"), "no tokenizer parse time",
     "tokenizer_seconds", "tokenizer_seconds"),
])
def test_a_profile_whose_refinement_fails_is_whole_without_it(tiny_sllm_gpt2, tmp_path, monkeypatch, caplog,
                                                               module, measure, exc, logged, field, key):
    """The per-tensor cost (its 1- and 4-layer copies do not build) and the tokenizer's parse
    (it does not parse) are refinements: without them the profile has every tier, and says why."""
    import importlib

    from sllm.core import profile

    def broken(*a, **kw):
        raise exc

    monkeypatch.setattr(importlib.import_module(f"sllm.core.{module}"), measure, broken)
    local = tmp_path / "ssd" / "tiny"
    shutil.copytree(tiny_sllm_gpt2, local)
    node, loads = profile.profile_node(local, runs=1)
    assert getattr(node, field) is None and [t.tier for t in loads] == ["ssd", "dram"]
    assert logged in caplog.text and str(exc) in caplog.text
    assert key not in node.to_toml_dict()["node"]["loader"]


def test_measure_ssd_picks_the_best_thread_count(tmp_path):
    bw = measure_ssd(tmp_path, 1 << 20, threads_options=(1, 2), runs=1)
    assert bw.threads in (1, 2) and bw.nbytes == 1 << 20 and bw.gbps == bw.nbytes / bw.seconds / 1e9
    assert list(tmp_path.iterdir()) == []


def test_profile_round_trips_through_toml(tmp_path):
    tiers = {"ssd": TierBandwidth("ssd", 2.5, 1 << 30, 0.43, 4, "O_DIRECT", "/data")}
    profile = build_profile(tiers, loader_fixed_seconds=0.03, name="node-a", capacities={"ssd": 10**12})
    write_profile(profile, tmp_path / "p.toml")
    node = read_profile(tmp_path / "p.toml")["node"]
    assert node["name"] == "node-a"
    assert node["tiers"]["ssd"] == {
        "gbps": 2.5, "nbytes": 1 << 30, "seconds": 0.43, "threads": 4, "detail": "O_DIRECT", "location": "/data",
        "capacity_bytes": 10**12,
    }
    assert node["loader"]["fixed_seconds"] == 0.03
