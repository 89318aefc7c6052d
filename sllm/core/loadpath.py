"""The load path per tier: a model's cold start from the remote, from SSD and from DRAM,
timed the way ``sllm serve`` does it, and fitted as ``seconds = fixed + bytes / bandwidth``.

``sllm serve`` starts a cold model in two steps (``sllm/server/tiers.py``): the tier cache
brings the bytes to DRAM (:meth:`TierCache.pull_for_load`: a DRAM hit leases them at once,
an SSD entry is read into DRAM, a remote model is pulled remote -> SSD + DRAM pipelined by
chunk), then the model is built on the DRAM lease (:func:`sllm.core.loader.load_model_from_host`:
skeleton, views or the host-to-device copy). :func:`measure_load_paths` runs exactly those
calls on one checkpoint from each tier, ``runs`` times each in a fresh cache directory.

Each tier's figures (:class:`LoadPath`) come from one model, so the split of its time into a
fixed part and a per-byte part uses the bandwidth *inside* that path, measured at the same
moment as the path: the bytes-over-time slope of the pull's own progress reports (remote),
an O_DIRECT read of the same SSD entry with the cache's reader threads right after each SSD
cold start (SSD: ``fixed`` is the median of the paired differences, so a drift of the
machine's speed between runs, 10-20 % over minutes on a small VM, stays in the per-byte part
instead of being multiplied into the fixed one), or the measured host-to-device bandwidth
(DRAM on a GPU; on the CPU a DRAM hit moves no bytes: all of it is fixed cost).
Then ``fixed = seconds - bytes / bandwidth``. The fixed parts differ per tier (a pull's
metadata round trips and entry commit, the SSD entry's lease and side files, the skeleton);
one node-wide fixed cost cannot stand for all of them (``benchmarks/estimator_accuracy.py``).

Those fixed parts were timed on one model. Part of each grows with the model's tensor count
(its skeleton's modules and buffers, one view per tensor: on the CPU a DRAM hit is nothing
else), so :func:`measure_tensor_cost` times DRAM hits of two shallow copies of the same
architecture and takes the per-tensor cost from the difference: the estimator corrects a
fixed part by ``seconds_per_tensor * (tensors - probe_tensors)`` for a model of another size.

The estimator (:mod:`sllm.core.estimator`) uses these figures when a node's profile has
them. This module measures; it decides nothing and knows nothing of HTTP.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: Tiers a load path is measured from, in the order a run visits them.
PATH_TIERS = ("remote", "dram", "ssd")
#: DRAM hits timed per run.
DRAM_REPEATS = 5


@dataclass(frozen=True)
class LoadPath:
    """A tier's load path on this node.

    Attributes:
        tier: "remote", "ssd" or "dram".
        seconds: median cold start from that tier to a ready model, seconds.
        nbytes: the checkpoint's bytes.
        fixed_seconds: the part that does not grow with the bytes, seconds (>= 0).
        gbps: the path's bandwidth, GB/s (1e9 B/s); None when no bytes move (a DRAM hit on the CPU).
        runs: every run's seconds.
        reads: the SSD path's paired O_DIRECT reads of the same bytes, seconds (one per run).
    """

    tier: str
    seconds: float
    nbytes: int
    fixed_seconds: float
    gbps: float | None
    runs: tuple[float, ...] = ()
    reads: tuple[float, ...] = ()

    def predict(self, nbytes: int) -> float:
        """``fixed_seconds + nbytes / gbps``: the estimate for a checkpoint of ``nbytes``."""
        return self.fixed_seconds + (nbytes / (self.gbps * 1e9) if self.gbps else 0.0)


def stream_gbps(points: list[tuple[float, int]], skip_bytes: int = 0) -> float | None:
    """The bandwidth of a transfer from its progress reports: the least-squares slope of
    bytes done over seconds, GB/s, over the reports past ``skip_bytes`` (the small files a
    pull fetches first, one request each); None with under 3 such reports or no progress.

    Args:
        points: (seconds since the start, bytes done so far), in order.
    """
    pts = [(t, b) for t, b in points if b > skip_bytes]
    if len(pts) < 3 or len({t for t, _ in pts}) < 2:
        return None
    slope, _ = statistics.linear_regression([t for t, _ in pts], [float(b) for _, b in pts])
    return slope / 1e9 if slope > 0 else None


def _timed(cache, model: str, device: str) -> tuple[float, str, list[tuple[float, int]], int]:
    """One cold start as ``sllm serve`` does it: (seconds, the tier the bytes came from,
    progress points, bytes of the small files fetched before the weights)."""
    from sllm.core.loader import load_model_from_host, release

    points: list[tuple[float, int]] = []
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        points.append((time.perf_counter() - started, done))

    result, lease = cache.pull_for_load(model, on_progress=progress)
    assert lease is not None, "the DRAM tier had no room"
    side = sum(len(v) for v in lease.files.values())
    with tempfile.TemporaryDirectory(prefix="sllm-files-") as tmp:  # the side files, as NodeTiers.source writes them
        for name, data in lease.files.items():
            (Path(tmp) / name).write_bytes(data)
        loaded = load_model_from_host(lease, device)
        seconds = time.perf_counter() - started  # ready: the side files' cleanup comes after, as in serve
    release(loaded)
    return seconds, result.source, points, side


def measure_load_paths(
    model_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    remote_url: str | None = None,
    remote_model: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    runs: int = 3,
    dram_gbps: float | None = None,
    dram_repeats: int = DRAM_REPEATS,
    warmup: bool = True,
) -> dict[str, LoadPath]:
    """Time ``model_dir``'s cold start from each tier through the tier cache and the loader,
    as ``sllm serve`` starts a model (module docstring), and fit each tier's fixed cost and
    bandwidth.

    Each run uses a fresh cache directory under ``work_dir`` (default: the model's parent):
    the remote pull when ``remote_url`` is given (else the model is copied into the SSD tier
    from a directory remote, untimed), a DRAM hit, then the DRAM entry evicted and the page
    cache dropped, a read from SSD, and an O_DIRECT read of the entry's partitions as the
    cache reads them (its reader threads and chunks, into touched memory), the SSD path's
    per-byte part. One untimed load first pays transformers' lazy import, and one untimed run
    (``warmup``) warms the process.

    Args:
        model_dir: a converted checkpoint. device: where models are built.
        remote_url: a remote holding it as ``remote_model`` (default: the directory's name).
        runs: cold starts per tier; the median is kept.
        dram_gbps: host-to-device bandwidth, GB/s, for the DRAM hit on a GPU (the copy is
            its per-byte part, and the SSD path's beside the read); ignored on the CPU.
        dram_repeats: DRAM hits per run (a hit takes milliseconds: more samples, less noise).
        warmup: one untimed run first (the first pulls of a process are slower: its heap and
            connections are cold, as a serving node's are not).

    Returns: tier -> :class:`LoadPath` ("remote" only with ``remote_url``).

    Raises:
        CheckpointError: not a checkpoint. RemoteError, CacheError: a pull failed.
    """
    from sllm.core.cache import CacheConfig, TierCache
    from sllm.core.format import open_checkpoint
    from sllm.core.loader import load_model, release
    from sllm.core.pool import HostMemoryPool
    from sllm.io.reader import evict_page_cache
    from sllm.io.remote import RemoteConfig

    model_dir = Path(model_dir)
    nbytes = open_checkpoint(model_dir).manifest.total_bytes
    name = remote_model or model_dir.name
    work = Path(work_dir or model_dir.parent)
    release(load_model(model_dir, device))  # transformers' lazy import of the architecture, untimed
    times: dict[str, list[float]] = {t: [] for t in PATH_TIERS}
    rates: list[float] = []  # the remote pulls' streaming rates
    reads: list[float] = []  # the SSD runs' paired O_DIRECT reads
    local_remote = None
    if not remote_url:  # a directory remote holding the model, to put it in the SSD tier
        local_remote = Path(tempfile.mkdtemp(prefix=".sllm-tmp-load-path-remote-", dir=work))
        (local_remote / name).symlink_to(model_dir.resolve(), target_is_directory=True)
    try:
        for run in range(-1 if warmup else 0, runs):  # run -1: untimed, warms the process as a serving node is warm
            if run < 0:
                keep = ({t: list(v) for t, v in times.items()}, list(rates), list(reads))
            cache_dir = Path(tempfile.mkdtemp(prefix=".sllm-tmp-load-path-cache-", dir=work))
            config = CacheConfig(cache_dir, dram_capacity_bytes=2 * nbytes + (64 << 20),
                                 remote_url=remote_url or str(local_remote), remote=RemoteConfig.from_env(os.environ))
            cache = TierCache(config, pool=HostMemoryPool())
            try:
                if remote_url:
                    seconds, _, points, side = _timed(cache, name, device)
                    times["remote"].append(seconds)
                    _append(rates, stream_gbps(points, side))
                else:
                    cache.pull(name)  # into SSD only, untimed
                if cache.dram is not None and cache.dram.has(name):
                    times["dram"] += [_timed(cache, name, device)[0] for _ in range(dram_repeats)]
                    cache.evict(name, "dram")
                for f in cache.ssd.path_of(name).iterdir():
                    evict_page_cache(f)
                seconds, source, _, _ = _timed(cache, name, device)
                assert source == "ssd", source
                times["ssd"].append(seconds)
                if not remote_url:
                    times["dram"] += [_timed(cache, name, device)[0] for _ in range(dram_repeats)]
                reads.append(_read_entry(cache, name))  # last: it evicts the DRAM entry
            finally:
                cache.close()
                shutil.rmtree(cache_dir, ignore_errors=True)
            if run < 0:
                times, rates, reads = keep
    finally:
        if local_remote is not None:
            shutil.rmtree(local_remote, ignore_errors=True)
    out = {}
    for tier in PATH_TIERS:
        if not times[tier]:
            continue
        seconds = statistics.median(times[tier])
        if tier == "ssd":  # fixed: the paired differences' median; per byte: the reads (module docstring)
            copy = nbytes / (dram_gbps * 1e9) if device.startswith("cuda") and dram_gbps else 0.0  # then to the GPU
            gbps = nbytes / (statistics.median(reads) + copy) / 1e9
            fixed = max(0.0, statistics.median(t - r for t, r in zip(times[tier], reads, strict=True)) - copy)
            out[tier] = LoadPath(tier, seconds, nbytes, fixed, gbps, tuple(times[tier]), tuple(reads))
            continue
        if tier == "dram":
            gbps = dram_gbps if device.startswith("cuda") else None
        else:
            gbps = statistics.median(rates) if rates else nbytes / seconds / 1e9
        fixed = max(0.0, seconds - (nbytes / (gbps * 1e9) if gbps else 0.0))
        out[tier] = LoadPath(tier, seconds, nbytes, fixed, gbps, tuple(times[tier]))
    return out


def _read_entry(cache, model: str) -> float:
    """Seconds of an O_DIRECT read of ``model``'s SSD entry, page cache evicted, as
    :meth:`TierCache.pull_for_load` reads it (its reader threads, the checkpoint's chunks),
    into the DRAM tier's buffers (its entry evicted first, so the same touched memory):
    the SSD path's per-byte part."""
    from sllm.core.format import open_checkpoint
    from sllm.io.reader import evict_page_cache, read_whole

    path = cache.ssd.path_of(model)
    ckpt = open_checkpoint(path)
    parts = [(ckpt.partition_path(i), p.nbytes) for i, p in enumerate(ckpt.manifest.partitions)]
    cache.evict(model, "dram")
    pool = cache.dram.pool
    buffers = [pool.acquire(n, populate=True) for _, n in parts]
    try:
        for f, _ in parts:
            evict_page_cache(f)
        started = time.perf_counter()
        for (f, n), buf in zip(parts, buffers, strict=True):
            read_whole(f, buf.memoryview(n), chunk_bytes=ckpt.manifest.chunk_bytes, threads=cache.config.read_threads)
        return time.perf_counter() - started
    finally:
        for buf in buffers:
            pool.release(buf)


def _append(values: list[float], x: float | None) -> None:
    if x is not None:
        values.append(x)


def tensor_count(model_dir: str | os.PathLike[str]) -> int:
    """The tensors in a converted checkpoint's tensor index.

    Raises: CheckpointError: not a checkpoint."""
    from sllm.core.format import open_checkpoint

    return len(open_checkpoint(model_dir).tensors)


def measure_tensor_cost(
    model_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    work_dir: str | os.PathLike[str] | None = None,
    runs: int = 3,
    dram_gbps: float | None = None,
    dram_repeats: int = DRAM_REPEATS,
) -> tuple[float, int] | None:
    """The load paths' fixed cost per tensor, on ``model_dir``'s own architecture and width:
    two random-weight copies of it with 1 and with up to :data:`TENSOR_COST_LAYERS` layers
    (its config with ``num_hidden_layers`` changed, built with transformers and converted
    under ``work_dir``, then removed) are loaded from DRAM as :func:`measure_load_paths`
    times a DRAM hit, in turns (so a drift of the machine's speed shows in both), less their
    bytes' host-to-device copy on a GPU (``dram_gbps``). The difference of the medians over
    the difference of the tensor counts is the cost of a tensor (and of its share of the
    modules and buffers of a layer): what a model with more or fewer layers pays more or less.

    Returns: (seconds per tensor, at least 0; ``model_dir``'s tensor count), or None when the
    model has a single layer, or no layer count in its config.

    Raises:
        CheckpointError: ``model_dir`` is not a checkpoint, or its config builds no model.
    """
    from sllm.core.cache import CacheConfig, TierCache
    from sllm.core.format import open_checkpoint
    from sllm.core.loader import load_model, release
    from sllm.core.pool import HostMemoryPool
    from sllm.core.skeleton import model_config

    model_dir = Path(model_dir)
    probe = open_checkpoint(model_dir)
    config = model_config(model_dir, None)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 2:
        return None
    work = Path(work_dir or model_dir.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".sllm-tmp-tensor-cost-", dir=work))
    try:
        remote = tmp / "remote"
        copies = {f"layers-{n}": n for n in (1, min(layers, TENSOR_COST_LAYERS))}
        for name, n in copies.items():
            _layer_copy(config, n, probe.manifest.dtype, tmp / "hf" / name, remote / name)
        counts = {m: tensor_count(remote / m) for m in copies}
        sizes = {m: open_checkpoint(remote / m).manifest.total_bytes for m in copies}
        for m in copies:
            release(load_model(remote / m, device))  # transformers' lazy imports, untimed
        cache = TierCache(CacheConfig(tmp / "cache", dram_capacity_bytes=2 * sum(sizes.values()) + (64 << 20),
                                      remote_url=str(remote)), pool=HostMemoryPool())
        times: dict[str, list[float]] = {m: [] for m in copies}
        try:
            for m in copies:
                cache.pull(m)
                _timed(cache, m, device)  # into DRAM, untimed
            for _ in range(runs * dram_repeats):
                for m in copies:
                    times[m].append(_timed(cache, m, device)[0])
        finally:
            cache.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    copy = {m: n / (dram_gbps * 1e9) if dram_gbps and device.startswith("cuda") else 0.0 for m, n in sizes.items()}
    small, big = copies
    extra = (statistics.median(times[big]) - copy[big]) - (statistics.median(times[small]) - copy[small])
    return max(0.0, extra / (counts[big] - counts[small])), len(probe.tensors)


#: The deeper of the two copies :func:`measure_tensor_cost` builds has at most this many layers
#: (enough tensors to time a difference; few bytes to build).
TENSOR_COST_LAYERS = 4


def _layer_copy(config, layers: int, dtype: str, hf_dir: Path, dst: Path) -> None:
    """``config``'s model with ``layers`` layers and random weights of ``dtype``, saved
    with transformers to ``hf_dir`` and converted to ``dst``."""
    import copy

    import torch
    from transformers.utils import logging as hf_logging

    from sllm.core.convert import convert
    from sllm.core.skeleton import model_class

    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    torch_dtype = getattr(torch, dtype, None) if dtype != "mixed" else None
    model = model_class(config)._from_config(config, dtype=torch_dtype if isinstance(torch_dtype, torch.dtype) else None)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the copies' saves are not the user's work to watch
    try:
        model.save_pretrained(hf_dir)
    finally:
        if was:
            hf_logging.enable_progress_bar()
    del model
    convert(hf_dir, dst)
    shutil.rmtree(hf_dir, ignore_errors=True)
