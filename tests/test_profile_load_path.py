"""The load path per tier (``sllm.core.loadpath``): the bandwidth from a pull's progress
reports on plain data, and real cold starts of a tiny model from each tier through the tier
cache and the loader, split into a fixed cost and a bandwidth. Shapes and invariants, no
timing bounds."""

from __future__ import annotations

import shutil
import statistics

import pytest

from sllm.core.loadpath import LoadPath, measure_load_paths, stream_gbps


def test_stream_gbps_is_the_slope_of_bytes_over_time():
    # 0.1 s of small files, then 2 GB/s: the first report is skipped as a small file
    points = [(0.1, 1000)] + [(0.1 + i * 0.01, 1000 + i * 20_000_000) for i in range(1, 11)]
    assert stream_gbps(points, skip_bytes=1000) == pytest.approx(2.0)
    assert stream_gbps(points[:3], skip_bytes=1000) is None  # two reports: too few
    assert stream_gbps([(0.1, 5), (0.1, 10), (0.1, 20)]) is None  # no time passed
    assert stream_gbps([(0.1, 30), (0.2, 20), (0.3, 10)]) is None  # no progress


def test_load_path_predicts_fixed_plus_bytes_over_bandwidth():
    p = LoadPath("ssd", 0.42, 10**9, 0.02, 2.5)
    assert p.predict(10**9) == pytest.approx(0.42) and p.predict(0) == 0.02
    assert LoadPath("dram", 0.003, 10**9, 0.003, None).predict(10**12) == 0.003


@pytest.mark.parametrize("with_remote", [False, True])
def test_measure_load_paths_times_each_tier_as_serve_loads(tiny_sllm_gpt2, tmp_path, with_remote):
    from sllm.core.format import open_checkpoint

    model = tmp_path / "ssd" / "tiny"
    shutil.copytree(tiny_sllm_gpt2, model)
    remote = None
    if with_remote:
        remote = tmp_path / "remote"
        shutil.copytree(tiny_sllm_gpt2, remote / "far")
    paths = measure_load_paths(model, remote_url=str(remote) if remote else None, remote_model="far" if remote else None,
                               runs=2)
    nbytes = open_checkpoint(model).manifest.total_bytes
    assert list(paths) == (["remote", "dram", "ssd"] if with_remote else ["dram", "ssd"])
    for tier, p in paths.items():
        assert p.tier == tier and p.nbytes == nbytes and len(p.runs) == (10 if tier == "dram" else 2) and p.seconds > 0
        assert 0 <= p.fixed_seconds <= p.seconds
    assert paths["dram"].gbps is None and paths["dram"].fixed_seconds == paths["dram"].seconds  # CPU: no copy
    ssd = paths["ssd"]  # split by its paired O_DIRECT reads: fixed = median(path - read), per byte = the reads
    assert len(ssd.reads) == 2 and ssd.gbps == pytest.approx(nbytes / statistics.median(ssd.reads) / 1e9)
    assert ssd.fixed_seconds == pytest.approx(max(0.0, statistics.median(t - r for t, r in zip(ssd.runs, ssd.reads))))
    assert not list((tmp_path / "ssd").glob(".sllm-tmp-*"))  # the probe caches are gone
    assert sorted(p.name for p in (tmp_path / "ssd").iterdir()) == ["tiny"]


def test_tensor_cost_times_shallow_copies_of_the_architecture_and_cleans_up(tiny_sllm_gpt2, tmp_path):
    from sllm.core.convert import convert
    from sllm.core.loadpath import measure_tensor_cost, tensor_count
    from sllm.zoo import TINY_GPT2, build_random_checkpoint

    model = tmp_path / "ssd" / "tiny"
    shutil.copytree(tiny_sllm_gpt2, model)
    per_tensor, probe_tensors = measure_tensor_cost(model, runs=1, dram_repeats=3)
    assert probe_tensors == tensor_count(model) and 0 <= per_tensor < 0.01
    assert sorted(p.name for p in (tmp_path / "ssd").iterdir()) == ["tiny"]  # its copies and cache are gone
    one = tmp_path / "one" / "gpt2-1"
    convert(build_random_checkpoint("gpt2", tmp_path / "hf", **{**TINY_GPT2, "n_layer": 1}), one)
    assert measure_tensor_cost(one, runs=1) is None  # a single layer: no shallower copy to compare with
