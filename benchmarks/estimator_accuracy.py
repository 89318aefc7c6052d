"""How well sllm's startup-time estimators predict real cold starts and prefills on this node.

A program, not a test: it prints tables and one JSON line, and asserts nothing on time.

1. **Load estimates.** It builds random-weight GPT-2 checkpoints of several sizes (converted
   to the sllm format), puts them on a remote served over HTTP on loopback and throttled
   (a child process, ``benchmarks/tier_pipeline.py``'s server), and profiles the node as
   ``sllm load-bench --tiers`` does (SSD cold read, DRAM, one remote pull of a probe model,
   the loader's fixed cost, each tier's load path on the probe: fixed cost and
   bandwidth, and the fixed costs' part per tensor, from DRAM hits of 1- and 4-layer copies
   of the probe's architecture).
   Then, for each model and each tier, it measures the cold start
   the way ``sllm serve`` does it (``NodeTiers.fetch`` then the load from the DRAM lease):
   from the remote (an empty cache), from SSD (DRAM entry evicted, page cache evicted) and
   from DRAM (a hit), and compares the median with
   :func:`sllm.core.estimator.estimate_load` on that profile, and on the same profile
   without the load paths (the stage model that older profiles get), and on the profile
   without the per-tensor part (the previous calibration).
2. **Migration estimate.** It times prefills of the largest model at several prompt lengths,
   fits ``a * tokens + b`` (:func:`sllm.core.estimator.fit_prefill`) on every other length
   and predicts the others.

Usage::

    .venv/bin/python benchmarks/estimator_accuracy.py --throttle-mbps 200 --runs 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

#: (name, GPT-2 config overrides): about 60 MB, 180 MB and 500 MB in float32.
SIZES = [
    ("gpt2-60m", dict(n_layer=2, n_embd=256, n_head=4)),
    ("gpt2-180m", dict(n_layer=6, n_embd=512, n_head=8)),
    ("gpt2-500m", dict(n_layer=12, n_embd=768, n_head=12)),
]
#: DRAM hits per run (as ``measure_load_paths`` times them): milliseconds each, so more samples.
DRAM_REPEATS = 5
PREFILL_TOKENS = [16, 32, 64, 128, 192, 256, 384, 512, 640, 768]


def prepare(work: Path) -> dict[str, Path]:
    """Build and convert the models into ``work/remote`` (once; reused by later runs)."""
    from sllm.core.convert import convert
    from sllm.core.format import MANIFEST_FILE
    from sllm.zoo import build_random_checkpoint

    out = {}
    for name, cfg in SIZES:
        dst = work / "remote" / name
        if not (dst / MANIFEST_FILE).exists():
            hf = build_random_checkpoint("gpt2", work / "hf" / name, seed=1, **cfg)
            convert(hf, dst)
            shutil.rmtree(hf)
        out[name] = dst
    return out


def cold_start(tiers, model: str) -> float:
    """A cold start as ``sllm serve`` does it: fetch into the fastest tier, then load (seconds)."""
    from sllm.core.loader import release

    started = time.perf_counter()
    fetched = tiers.fetch(model)
    try:
        with tiers.source(fetched, device="cpu", pool=tiers.cache.dram.pool, threads=None, direct_io=None) as (_, load):
            loaded = load()
            seconds = time.perf_counter() - started
    finally:
        fetched.close()
    release(loaded)
    return seconds


def node_tiers(cache_dir: Path, url: str, nbytes: int):
    from sllm.core.cache import CacheConfig
    from sllm.core.pool import HostMemoryPool
    from sllm.server.tiers import NodeTiers

    pool = HostMemoryPool()
    return NodeTiers(CacheConfig(cache_dir, dram_capacity_bytes=2 * nbytes + (64 << 20), remote_url=url), pool)


def measure_loads(models: dict[str, Path], url: str, work: Path, runs: int) -> list[dict]:
    from sllm.core.format import open_checkpoint
    from sllm.core.loadpath import tensor_count
    from sllm.io.reader import evict_page_cache

    rows = []
    for name, path in models.items():
        nbytes, tensors = open_checkpoint(path).manifest.total_bytes, tensor_count(path)
        times: dict[str, list[float]] = {"remote": [], "ssd": [], "dram": []}
        for run in range(runs):
            cache_dir = work / f"cache-{name}-{run}"
            tiers = node_tiers(cache_dir, url, nbytes)
            try:
                times["remote"].append(cold_start(tiers, name))  # empty cache: pulled, pipelined
                times["dram"] += [cold_start(tiers, name) for _ in range(DRAM_REPEATS)]  # hits: milliseconds
                tiers.cache.evict(name, "dram")
                for f in (tiers.cache.ssd.path_of(name)).iterdir():
                    evict_page_cache(f)
                times["ssd"].append(cold_start(tiers, name))  # SSD -> DRAM, then the load
            finally:
                tiers.close()
                shutil.rmtree(cache_dir, ignore_errors=True)
        for tier, ts in times.items():
            rows.append({"model": name, "nbytes": nbytes, "tensors": tensors, "tier": tier,
                         "measured_seconds": statistics.median(ts), "runs": ts})
    return rows


def profile(models: dict[str, Path], url: str, work: Path, runs: int):
    """The node profile as ``load-bench --tiers`` measures it, with the middle model as the
    probe: the tiers' bandwidths, the loader's fixed cost, and each tier's load path (the
    probe's cold start from each tier the way ``sllm serve`` does it, split into a fixed
    cost and a bandwidth: :func:`sllm.core.loadpath.measure_load_paths`)."""
    from dataclasses import replace

    from sllm.core.format import open_checkpoint
    from sllm.core.loadpath import measure_load_paths, measure_tensor_cost
    from sllm.core.profile import (
        TierBandwidth,
        build_profile,
        measure_dram_to_device,
        measure_loader_fixed_seconds,
        measure_ssd,
    )

    probe_name = SIZES[1][0]
    probe = models[probe_name]
    nbytes = open_checkpoint(probe).manifest.total_bytes
    ssd = measure_ssd(work, 256 << 20, runs=runs)
    dram = measure_dram_to_device(256 << 20, runs=runs)
    fixed = measure_loader_fixed_seconds(probe)
    paths = measure_load_paths(probe, remote_url=url, remote_model=probe_name, work_dir=work, runs=runs,
                               dram_gbps=dram.gbps)
    r = paths["remote"]
    remote = TierBandwidth("remote", r.gbps or nbytes / r.seconds / 1e9, nbytes, r.seconds, 0,
                           "pull into SSD and DRAM, pipelined", url)
    tiers = {"ssd": ssd, "dram": dram, "remote": remote}
    tiers = {t: replace(b, load_fixed_seconds=paths[t].fixed_seconds, load_gbps=paths[t].gbps) for t, b in tiers.items()}
    cost = measure_tensor_cost(probe, work_dir=work, runs=runs)
    return build_profile(tiers, loader_fixed_seconds=fixed, name="this-node", tensor_cost=cost), paths


def without_tensor_cost(node):
    """The previous calibration, for comparison: the load paths as measured on the probe, with
    no correction for another model's tensor count."""
    from dataclasses import replace

    return replace(node, load_seconds_per_tensor=None, load_probe_tensors=None)


def stage_model(node):
    """``node`` without its tiers' load paths: what an older profile gives the estimator (the
    stage model: bandwidth per stage + one loader fixed cost)."""
    from dataclasses import replace

    return replace(node, tiers={t: replace(s, load_fixed_seconds=None, load_gbps=None) for t, s in node.tiers.items()})


def prefill_rows(path: Path, runs: int) -> tuple[list[dict], object]:
    import torch

    from sllm.core.estimator import fit_prefill, prefill_seconds
    from sllm.core.loader import load_model

    model = load_model(path)
    samples = []
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 8), dtype=torch.long), use_cache=True)  # warm-up
        for n in PREFILL_TOKENS:
            ts = []
            for _ in range(runs):
                ids = torch.randint(0, 50000, (1, n))
                started = time.perf_counter()
                model(input_ids=ids, use_cache=True)
                ts.append(time.perf_counter() - started)
            samples.append((n, statistics.median(ts)))
    train = samples[0::2]
    fit = fit_prefill(train)
    rows = [{"tokens": n, "measured_seconds": s, "predicted_seconds": prefill_seconds(n, fit),
             "role": "fit" if (n, s) in train else "held out"} for n, s in samples]
    return rows, fit


def err(pred: float, meas: float) -> float:
    return abs(pred - meas) / meas


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--throttle-mbps", type=float, default=200.0, help="the remote's rate, MB/s (default 200)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement; the median is kept (default 3)")
    ap.add_argument("--workdir", help="where models and caches go (default: a temporary directory); models are reused")
    ap.add_argument("--prepare-only", action="store_true", help="build the models into --workdir and stop")
    args = ap.parse_args()

    from tier_pipeline import ChildServer

    from sllm.core.estimator import estimate_load
    from sllm.core.inventory import parse_node

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sllm-estimator-"))
    work.mkdir(parents=True, exist_ok=True)
    models = prepare(work)
    if args.prepare_only:
        print(work)
        return 0
    for f in sorted((work / "remote").rglob("*")):  # the remote shares this disk only here: serve it from memory,
        if f.is_file():                            # as a store that is not the node's own disk would
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    server = ChildServer(work / "remote", args.throttle_mbps * 1e6)
    try:
        prof, paths = profile(models, server.url, work, args.runs)
        rows = measure_loads(models, server.url, work, args.runs)
    finally:
        server.close()
    node = parse_node("this-node", prof.to_toml_dict()["node"], where="profile")  # as load-bench --tiers writes it
    older, untensored = stage_model(node), without_tensor_cost(node)
    for r in rows:
        est = estimate_load(older, r["model"], r["tier"], r["nbytes"])
        cal = estimate_load(node, r["model"], r["tier"], r["nbytes"], tensors=r["tensors"])
        flat = estimate_load(untensored, r["model"], r["tier"], r["nbytes"]).total_seconds
        r.update(untensored_seconds=flat, untensored_error=err(flat, r["measured_seconds"]))
        r.update(predicted_seconds=est.total_seconds, transfer_seconds=est.transfer_seconds,
                 fixed_seconds=est.fixed_seconds, error=err(est.total_seconds, r["measured_seconds"]),
                 calibrated_seconds=cal.total_seconds, calibrated_error=err(cal.total_seconds, r["measured_seconds"]),
                 load_path_fixed_seconds=cal.fixed_seconds)
    pre, fit = prefill_rows(models[SIZES[-1][0]], args.runs)
    for r in pre:
        r["error"] = err(r["predicted_seconds"], r["measured_seconds"])

    print(f"node profile: ssd {prof.tiers['ssd'].gbps:.3f} GB/s ({prof.tiers['ssd'].threads} threads), "
          f"dram {prof.tiers['dram'].gbps:.3f} GB/s, remote {prof.tiers['remote'].gbps:.3f} GB/s "
          f"(HTTP throttled to {args.throttle_mbps:g} MB/s), loader fixed {prof.loader_fixed_seconds * 1e3:.1f} ms")
    print(f"load paths (probe {SIZES[1][0]}, as load-bench --tiers): " + ", ".join(
        f"{t} fixed {p.fixed_seconds * 1e3:.1f} ms + bytes / {p.gbps or float('inf'):.3f} GB/s" for t, p in paths.items())
        + (f"; {prof.seconds_per_tensor * 1e6:.1f} us per tensor ({prof.probe_tensors} in the probe)"
           if prof.seconds_per_tensor is not None else "; no per-tensor cost"))
    print(f"{'model':<11}{'MB':>7}  {'tier':<7}{'measured s':>11}{'stage model s':>14}{'error':>8}"
          f"{'no tensors s':>13}{'error':>8}{'load path s':>12}{'error':>8}")
    for r in rows:
        print(f"{r['model']:<11}{r['nbytes'] / 1e6:>7.0f}  {r['tier']:<7}{r['measured_seconds']:>11.4f}"
              f"{r['predicted_seconds']:>14.4f}{r['error']:>8.1%}{r['untensored_seconds']:>13.4f}"
              f"{r['untensored_error']:>8.1%}{r['calibrated_seconds']:>12.4f}{r['calibrated_error']:>8.1%}")

    def stats(key: str, subset: list[dict]) -> tuple[float, float]:
        e = sorted(r[key] for r in subset)
        return statistics.median(e), e[max(0, -(-9 * len(e) // 10) - 1)]

    med, p90 = stats("error", rows)
    others = [r for r in rows if r["model"] != SIZES[1][0]]
    cmed, cp90 = stats("calibrated_error", others)
    amed, ap90 = stats("calibrated_error", rows)
    umed, up90 = stats("untensored_error", others)
    print(f"load estimate error, stage model (older profiles): median {med:.1%}, P90 {p90:.1%} over {len(rows)} "
          f"cases; load paths (this profile): median {cmed:.1%}, P90 {cp90:.1%} over the {len(others)} non-probe "
          f"cases (median {amed:.1%}, P90 {ap90:.1%} over all {len(rows)}); load paths without the tensor count (the "
          f"previous calibration): median {umed:.1%}, P90 {up90:.1%} over the {len(others)} non-probe cases")
    print(f"\nprefill fit on {fit.samples} lengths: a = {fit.a_seconds_per_token * 1e6:.1f} us/token, "
          f"b = {fit.b_seconds * 1e3:.1f} ms ({SIZES[-1][0]}, CPU)")
    print(f"{'tokens':>7}  {'role':<9}{'measured s':>11}{'predicted s':>12}{'error':>8}")
    for r in pre:
        print(f"{r['tokens']:>7}  {r['role']:<9}{r['measured_seconds']:>11.4f}{r['predicted_seconds']:>12.4f}"
              f"{r['error']:>8.1%}")
    held = [r["error"] for r in pre if r["role"] == "held out"]
    print(f"migration (prefill) estimate error on held-out lengths: median {statistics.median(held):.1%}, "
          f"max {max(held):.1%}")
    print(json.dumps({
        "benchmark": "estimator_accuracy", "throttle_mbps": args.throttle_mbps, "runs": args.runs,
        "profile": prof.to_toml_dict()["node"]["tiers"], "loader_fixed_seconds": prof.loader_fixed_seconds,
        "seconds_per_tensor": prof.seconds_per_tensor, "probe_tensors": prof.probe_tensors,
        "loads": [{k: (round(v, 5) if isinstance(v, float) else [round(x, 5) for x in v] if k == "runs" else v)
                   for k, v in r.items()} for r in rows],
        "load_error_median": round(med, 4), "load_error_p90": round(p90, 4),
        "load_paths": {t: {"seconds": p.seconds, "fixed_seconds": p.fixed_seconds, "gbps": p.gbps}
                       for t, p in paths.items()},
        "load_path_error_median": round(cmed, 4), "load_path_error_p90": round(cp90, 4),
        "load_path_error_median_all": round(amed, 4), "load_path_error_p90_all": round(ap90, 4),
        "untensored_error_median": round(umed, 4), "untensored_error_p90": round(up90, 4),
        "prefill_fit": {"a_seconds_per_token": fit.a_seconds_per_token, "b_seconds": fit.b_seconds,
                        "samples": fit.samples},
        "prefill": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in pre],
        "prefill_error_median": round(statistics.median(held), 4), "prefill_error_max": round(max(held), 4),
    }))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
