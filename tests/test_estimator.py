"""The estimators on plain data (no server, no disk): hand-computed load times from each tier,
pipelined and not, on GPU and CPU nodes, with loader queues; the prefill fit and migration."""

from __future__ import annotations

import math

import pytest

from sllm.core.estimator import (
    DEFAULT_FIT,
    EstimateError,
    estimate_load,
    estimate_migration,
    estimate_transfer,
    fit_prefill,
    pipeline_seconds,
    queue_seconds,
    transfer_stages,
)
from sllm.core.inventory import LoaderJob, NodeSpec, PrefillFit, TierSpec

GB = 10**9


def gpu_node(name: str = "a", *, pipelined: bool = True, write_gbps: float | None = None, **kw) -> NodeSpec:
    """ssd 2 GB/s, dram->device 10 GB/s, remote 0.5 GB/s, fixed 0.1 s, 4 chunks per GB."""
    tiers = {"dram": TierSpec("dram", 10.0), "ssd": TierSpec("ssd", 2.0, write_gbps=write_gbps),
             "remote": TierSpec("remote", 0.5)}
    return NodeSpec(name, f"http://{name}:1", device_kind="cuda", device_memory_bytes=8 * GB, tiers=tiers,
                    loader_fixed_seconds=0.1, pipelined=pipelined, chunk_bytes=GB // 4, **kw)


def test_load_from_each_tier_hand_computed():
    n = gpu_node()
    assert estimate_load(n, "m", "device", GB).total_seconds == 0.0
    dram = estimate_load(n, "m", "dram", GB)  # one stage: 1 GB / 10 GB/s
    assert [s.name for s in dram.stages] == ["dram->device"]
    assert dram.transfer_seconds == pytest.approx(0.1) and dram.total_seconds == pytest.approx(0.2)
    ssd = estimate_load(n, "m", "ssd", GB)  # 0.5 s read, 0.1 s copy, 4 chunks: 0.5 + 0.1 / 4
    assert [s.seconds for s in ssd.stages] == pytest.approx([0.5, 0.1])
    assert ssd.chunks == 4 and ssd.transfer_seconds == pytest.approx(0.525)
    assert ssd.total_seconds == pytest.approx(0.625) and ssd.fixed_seconds == 0.1 and ssd.queue_seconds == 0
    remote = estimate_load(n, "m", "remote", GB)  # 2 s pull + 0.1 / 4
    assert remote.stages[0].name == "remote->ssd+dram" and remote.stages[0].gbps == 0.5
    assert remote.total_seconds == pytest.approx(2.125)
    assert dram.total_seconds < ssd.total_seconds < remote.total_seconds


def test_unpipelined_node_pays_the_sum_and_a_separate_ssd_write_is_a_stage():
    assert estimate_load(gpu_node(pipelined=False), "m", "ssd", GB).transfer_seconds == pytest.approx(0.6)
    assert estimate_load(gpu_node(pipelined=False), "m", "remote", GB).transfer_seconds == pytest.approx(2.1)
    n = gpu_node(write_gbps=1.0)  # remote 2.0 s, write 1.0 s, copy 0.1 s: 2.0 + 1.1 / 4
    assert [s.name for s in transfer_stages(n, "remote", GB)] == ["remote->ssd+dram", "ssd write", "dram->device"]
    assert estimate_transfer(n, "remote", GB) == pytest.approx(2.275)
    assert estimate_transfer(gpu_node(pipelined=False, write_gbps=1.0), "remote", GB) == pytest.approx(3.1)


def test_pipeline_formula_matches_the_tier_pipeline_benchmark_shape():
    from sllm.core.estimator import Stage

    stages = [Stage("x", 1, 1.0, 0.447), Stage("y", 1, 1.0, 0.415)]
    t = pipeline_seconds(stages, pipelined=True, chunks=16)
    assert 0.447 < t < 0.862 and t == pytest.approx(0.447 + 0.415 / 16)
    assert pipeline_seconds(stages, pipelined=False, chunks=16) == pytest.approx(0.862)
    assert pipeline_seconds([], pipelined=True, chunks=4) == 0.0


def load_path_node() -> NodeSpec:
    """A CPU node whose ssd and dram tiers carry measured load paths; its remote does not."""
    tiers = {"dram": TierSpec("dram", 10.0, load_fixed_seconds=0.003),  # a DRAM hit moves no bytes
             "ssd": TierSpec("ssd", 2.0, load_fixed_seconds=0.02, load_gbps=2.5),
             "remote": TierSpec("remote", 0.5)}
    return NodeSpec("p", "http://p:1", device_kind="cpu", tiers=tiers, loader_fixed_seconds=0.1, chunk_bytes=GB // 4)


def test_a_tiers_load_path_replaces_its_stages_and_the_loaders_fixed_cost():
    n = load_path_node()
    ssd = estimate_load(n, "m", "ssd", GB)  # 0.02 + 1 GB / 2.5 GB/s
    assert [(s.name, s.gbps) for s in ssd.stages] == [("ssd load path", 2.5)]
    assert ssd.transfer_seconds == pytest.approx(0.4) and ssd.fixed_seconds == 0.02
    assert ssd.total_seconds == pytest.approx(0.42)
    dram = estimate_load(n, "m", "dram", GB)
    assert dram.transfer_seconds == 0 and dram.total_seconds == pytest.approx(0.003)
    remote = estimate_load(n, "m", "remote", GB)  # no load path: the stage model, the loader's fixed cost
    assert remote.stages[0].name == "remote->ssd+dram" and remote.fixed_seconds == 0.1
    assert remote.total_seconds == pytest.approx(2.1)
    # the queue counts each job with its own tier's figures: an SSD job 0.42 s, 0.12 s of it done
    jobs = [LoaderJob("x", GB, "ssd", 0.12, True, "disk"), LoaderJob("y", GB // 2, "ssd", 0.0, False, "disk")]
    assert queue_seconds(n, jobs, tier="ssd") == pytest.approx(0.3 + 0.22)
    assert estimate_load(n, "m", "ssd", GB, queue=jobs).total_seconds == pytest.approx(0.52 + 0.42)


def test_the_per_tensor_cost_corrects_each_load_paths_fixed_part_for_another_tensor_count():
    from dataclasses import replace

    n = replace(load_path_node(), load_seconds_per_tensor=1e-5, load_probe_tensors=100)
    # 300 tensors: 200 more than the probe, 2 ms more on every tier with a load path
    assert estimate_load(n, "m", "dram", GB, tensors=300).total_seconds == pytest.approx(0.005)
    assert estimate_load(n, "m", "ssd", GB, tensors=300).fixed_seconds == pytest.approx(0.022)
    assert estimate_load(n, "m", "dram", GB, tensors=50).total_seconds == pytest.approx(0.0025)
    assert estimate_load(n, "m", "dram", GB, tensors=1).total_seconds == pytest.approx(0.00201)
    # far fewer tensors than the correction can take: clamped at 0, never negative
    assert estimate_load(replace(n, load_seconds_per_tensor=1e-3), "m", "dram", GB, tensors=1).total_seconds == 0.0
    # no count, or a profile without the per-tensor cost: the probe's fixed part as measured
    assert estimate_load(n, "m", "dram", GB).total_seconds == pytest.approx(0.003)
    assert estimate_load(load_path_node(), "m", "dram", GB, tensors=300).total_seconds == pytest.approx(0.003)
    # a tier without a load path keeps the loader's fixed cost, whatever the count
    assert estimate_load(n, "m", "remote", GB, tensors=300).fixed_seconds == 0.1


def test_cpu_node_needs_no_copy_from_dram():
    n = NodeSpec("c", "http://c:1", device_kind="cpu", tiers={"ssd": TierSpec("ssd", 2.0)}, loader_fixed_seconds=0.05,
                 chunk_bytes=GB // 4)
    assert estimate_load(n, "m", "dram", GB).total_seconds == pytest.approx(0.05)
    assert estimate_load(n, "m", "ssd", GB).total_seconds == pytest.approx(0.55)
    # no measured remote: the inventory's default applies, else a clear error
    assert estimate_load(n, "m", "remote", GB, remote_gbps=1.0).transfer_seconds == pytest.approx(1.0)
    with pytest.raises(EstimateError, match="remote"):
        estimate_load(n, "m", "remote", GB)
    with pytest.raises(ValueError, match="unknown tier"):
        estimate_load(n, "m", "tape", GB)


def test_queue_wait_counts_what_is_left_of_the_running_load_and_all_queued_ones():
    n = gpu_node()
    running = LoaderJob("x", GB, "ssd", elapsed_seconds=0.2, running=True)  # 0.625 - 0.2 left
    queued = LoaderJob("y", GB, "dram")  # 0.2 whole
    assert queue_seconds(n, [running]) == pytest.approx(0.425)
    assert queue_seconds(n, [running, queued]) == pytest.approx(0.625)
    assert queue_seconds(n, [LoaderJob("z", GB, "ssd", elapsed_seconds=5.0, running=True)]) == 0.0  # overdue: 0
    assert queue_seconds(n, [LoaderJob("u")]) == pytest.approx(0.1)  # unknown size: the fixed cost
    est = estimate_load(n, "m", "ssd", GB, queue=[running, queued])
    assert est.queue_seconds == pytest.approx(0.625) and est.total_seconds == pytest.approx(1.25)


def test_prefill_fit_recovers_a_line_and_defaults_before_enough_samples():
    samples = [(t, 0.002 * t + 0.03) for t in (10, 50, 100, 400, 800)]
    fit = fit_prefill(samples)
    assert fit.samples == 5
    assert fit.a_seconds_per_token == pytest.approx(0.002) and fit.b_seconds == pytest.approx(0.03)
    assert fit_prefill(samples[:3]) == DEFAULT_FIT  # too few
    assert fit_prefill([(100, 0.1)] * 6) == DEFAULT_FIT  # one token count: no slope
    noisy = fit_prefill([(10, 0.5), (20, 0.4), (30, 0.45), (40, 0.3)])  # falling: clamp a to 0
    assert noisy.a_seconds_per_token == 0 and noisy.b_seconds == pytest.approx(0.4125)
    through0 = fit_prefill([(100, 0.1), (200, 0.3), (300, 0.5), (400, 0.7)])  # b would be -0.1: fit through 0
    assert through0.b_seconds == 0 and through0.a_seconds_per_token > 0


def test_migration_is_a_tokens_plus_b_per_request():
    fit = PrefillFit(0.001, 0.02, 10)
    est = estimate_migration("m", [100, 300], fit)  # (0.1 + 0.02) + (0.3 + 0.02)
    assert est.seconds == pytest.approx(0.44) and est.tokens == (100, 300) and est.samples == 10
    default = estimate_migration("m", [1000])
    assert default.samples == 0 and default.seconds == pytest.approx(DEFAULT_FIT.a_seconds_per_token * 1000
                                                                       + DEFAULT_FIT.b_seconds)
    assert estimate_migration("m", []).seconds == 0 and not math.isnan(est.seconds)


def test_timing_log_fits_after_enough_samples_and_reports_rates():
    from sllm.core.estimator import TimingLog

    log = TimingLog(window=5)
    assert log.status() == {"prefill_fit": {}, "engine": {"decode_seconds_per_token": None,
                                                          "mean_generated_tokens": None}}
    for t in (10, 20, 30):
        log.record_prefill("m", t, 0.01 * t + 0.1)
    assert log.fit("m") == DEFAULT_FIT and log.status()["prefill_fit"]["m"]["samples"] == 0
    for t in (40, 50, 60, 70):  # the window keeps the last 5
        log.record_prefill("m", t, 0.01 * t + 0.1)
    f = log.fit("m")
    assert f.samples == 5 and f.a_seconds_per_token == pytest.approx(0.01) and f.b_seconds == pytest.approx(0.1)
    log.record_completion(11, 0.5)
    log.record_completion(1, 0.0)
    eng = log.status()["engine"]
    assert eng["decode_seconds_per_token"] == pytest.approx(0.05) and eng["mean_generated_tokens"] == 6
