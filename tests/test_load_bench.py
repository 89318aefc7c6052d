"""``sllm load-bench`` on the tiny GPT-2: every method row, consistent bytes, ratios right.

No assertion is about speed (benchmarks are programs, not tests). Workers run in-process
here (``worker_main`` stands in for the subprocess) to keep the suite fast; one test runs
a real worker subprocess for the cheapest method to cover that path.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sllm.cli import app
from sllm.core import bench


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


#: Peers of the optional ``bench`` extra that this environment lacks.
MISSING_PEERS = {loader for loader, module in (("runai", "runai_model_streamer"), ("fastsafetensors", "fastsafetensors"),
                                              ("tensorizer", "tensorizer")) if _missing(module)}  # fmt: skip


@pytest.fixture
def in_process_workers(monkeypatch):
    """Run workers in this process instead of a fresh interpreter each."""
    monkeypatch.setattr(bench.orchestrate, "run_worker_process", bench.worker_main)


def _run(args: list[str]):
    result = CliRunner().invoke(app, ["load-bench", *args])
    return result


def test_json_has_every_method_with_consistent_figures(tiny_hf_gpt2, tmp_path, in_process_workers):
    result = _run([str(tiny_hf_gpt2), "--work-dir", str(tmp_path / "work"), "--runs", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {(r["method"], r["temperature"]): r for r in doc["rows"]}
    for m in bench.METHODS:
        if m.loader in MISSING_PEERS:  # not installed here: its rows fail with the install hint
            assert "sllm[bench]" in doc["failures"][m.name]
            continue
        assert ((m.name, "cold") in rows) == ("cold" in m.temps), m.name
        assert ((m.name, "warm") in rows) == m.warm, m.name
    assert set(doc["failures"]) == {m.name for m in bench.METHODS if m.loader in MISSING_PEERS}
    assert rows[("sllm:model", "warm")]["via"] == "pool"  # the reload after `del` is a pool hit
    assert rows[("sllm-page-cache:state-dict", "warm")]["via"] == "page-cache"
    assert doc["nbytes"] > 0
    sllm = {t: rows[("sllm:model", t)]["seconds_median"] for t in ("cold", "warm")}
    sllm_sd = {t: rows[("sllm:state-dict", t)]["seconds_median"] for t in ("cold", "warm")}
    for (name, temp), r in rows.items():
        assert r["nbytes"] == doc["nbytes"]
        assert len(r["seconds"]) == 1 and r["seconds"][0] > 0
        assert r["seconds_min"] <= r["seconds_median"] <= r["seconds_max"]
        assert math.isclose(r["gbps"], r["nbytes"] / r["seconds_median"] / 1e9)
        ref_temp = "cold" if r["loader"] == "sllm-page-cache" else temp
        ref = sllm_sd[ref_temp] if r["level"] == "state-dict" else sllm[ref_temp]
        assert math.isclose(r["vs_sllm"], r["seconds_median"] / ref), name
    for r in doc["rows"]:  # page-cache residency before cold loads (tmpfs cannot evict: not asserted ~0)
        if r["temperature"] == "cold" and r["resident_before_max"] is not None:
            assert 0.0 <= r["resident_before_max"] <= 1.0, r["method"]
    targets = {t["name"]: t for t in doc["targets"]}
    assert math.isclose(targets["cold_vs_raw"]["value"], sllm["cold"] / rows[("raw:bytes", "cold")]["seconds_median"])
    assert math.isclose(targets["state_dict_cold_vs_raw"]["value"],
                        sllm_sd["cold"] / rows[("raw:bytes", "cold")]["seconds_median"])  # fmt: skip
    peers = [r["seconds_median"] for (name, temp), r in rows.items()
             if temp == "cold" and r["level"] == "state-dict" and r["loader"] in bench.PEERS]  # fmt: skip
    assert math.isclose(targets["state_dict_cold_ahead_of_peers"]["value"], min(peers) / sllm_sd["cold"])
    assert targets["reload_after_del_pool_hit"]["value"] == 1.0
    floor = max(rows[("raw:bytes", "cold")]["seconds_median"], rows[("touch:bytes", "cold")]["seconds_median"])
    assert math.isclose(targets["state_dict_cold_vs_fresh_floor"]["value"], sllm_sd["cold"] / floor)
    fp = {t: rows[("from-pretrained:model", t)]["seconds_median"] for t in ("cold", "warm")}
    assert math.isclose(targets["cold_speedup_vs_from_pretrained"]["value"], fp["cold"] / sllm["cold"])
    assert math.isclose(targets["warm_speedup_vs_from_pretrained"]["value"], fp["warm"] / sllm["warm"])
    for t in targets.values():
        assert t["met"] == (t["value"] <= t["threshold"] if t["comparison"] == "<=" else t["value"] >= t["threshold"])
    # the conversion and the .bin copy are reused on a second run
    again = bench.prepare(bench.BenchConfig(tiny_hf_gpt2, work_dir=tmp_path / "work"))
    assert any("reused" in n for n in again.notes)


def test_table_and_plot(tiny_hf_gpt2, tmp_path, in_process_workers):
    png = tmp_path / "bench.png"
    result = _run([str(tiny_hf_gpt2), "--work-dir", str(tmp_path / "w"), "--runs", "1",
                   "--methods", "raw,sllm:model,safetensors:model", "--plot", str(png), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "sllm" in result.stdout and "targets" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_converted_dir_without_hf_source_skips_baselines(tiny_sllm_gpt2, in_process_workers):
    result = _run([str(tiny_sllm_gpt2), "--runs", "1", "--json", "--methods", "sllm:model,from-pretrained"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {r["method"] for r in doc["rows"]} == {"sllm:model"}
    assert any("--hf-dir" in n for n in doc["notes"])


def test_unknown_method_is_a_usage_error(tiny_sllm_gpt2):
    result = _run([str(tiny_sllm_gpt2), "--methods", "sllm,nope"])
    assert result.exit_code == 2
    assert "nope" in result.stderr and "from-pretrained" in result.stderr


def test_not_a_model_directory(tmp_path):
    result = _run([str(tmp_path), "--runs", "1"])
    assert result.exit_code == 2
    assert str(tmp_path) in result.stderr


def test_worker_subprocess_prints_one_json_document(tiny_sllm_gpt2):
    config = bench.BenchConfig(tiny_sllm_gpt2, methods=tuple(bench.select_methods(["raw"])))
    prepared = bench.prepare(config)
    doc = bench.run_worker_process(bench.orchestrate._worker_spec(bench.METHODS[0], prepared, config))
    assert doc["cold"]["seconds"] > 0 and doc["warm"]["seconds"] > 0


def test_touch_worker_times_the_first_touch_of_as_much_fresh_memory(tiny_sllm_gpt2, monkeypatch):
    import sllm.io.hostmem as hostmem
    from sllm.core.format import open_checkpoint

    made = []

    class Recorded(hostmem.HostBuffer):
        def __init__(self, nbytes: int, **kw) -> None:
            super().__init__(nbytes, **kw)
            self.touched: list[tuple[int, int]] = []
            made.append(self)

        def prefault(self, start: int, end: int) -> None:
            super().prefault(start, end)
            self.touched.append((start, min(end, self.nbytes)))

    monkeypatch.setattr(hostmem, "HostBuffer", Recorded)
    config = bench.BenchConfig(tiny_sllm_gpt2, methods=tuple(bench.select_methods(["touch"])))
    prepared = bench.prepare(config)
    [touch] = [m for m in bench.METHODS if m.loader == "touch"]
    doc = bench.worker_main(bench.orchestrate._worker_spec(touch, prepared, config))
    parts = open_checkpoint(tiny_sllm_gpt2).manifest.partitions
    assert doc["warm"] is None and doc["cold"]["seconds"] > 0
    assert [b.nbytes for b in made] == [hostmem.round_up(p.nbytes) for p in parts]
    for b in made:  # every byte of every buffer faulted in, once
        spans = sorted(b.touched)
        assert spans[0][0] == 0 and spans[-1][1] == b.nbytes
        assert all(a[1] == c[0] for a, c in zip(spans, spans[1:], strict=False))


def test_command_module_imports_no_torch():
    code = "import sys, sllm.cli, sllm.commands.load_bench; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
