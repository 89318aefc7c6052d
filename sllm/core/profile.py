"""Storage-tier profiling: measure this node's tiers as the loader uses them, write a node profile.

Measures, on this node: the SSD tier's cold read bandwidth (page cache evicted, O_DIRECT,
the best of several reader-thread counts), the DRAM tier's bandwidth to the device
(pinned host-to-device copies with CUDA, memcpy between touched buffers otherwise), the
remote tier's download bandwidth when one is given (a callable from the caller, so this
module needs no network code), and the loader's fixed cost per load (the model skeleton
build). The result is a :class:`NodeProfile`, written as TOML (tomli-w) in the shape of a
node's entry in the cluster inventory that the scheduler reads (ServerlessLLM §6: load
time = bytes / bandwidth of each tier crossed, plus fixed costs).

It does not decide anything: estimators and the scheduler consume the profile.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sllm import __version__
from sllm.io.atomic import atomic_write_bytes, temporary_sibling
from sllm.io.hostmem import HostBuffer
from sllm.io.reader import evict_page_cache, read_whole

PROBE_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class TierBandwidth:
    """One tier's measured bandwidth.

    Attributes:
        tier: "remote", "ssd" or "dram".
        gbps: median bandwidth over the runs, GB/s (1e9 bytes per second).
        nbytes: bytes moved per run.
        seconds: median seconds per run.
        threads: reader threads of the best setting (ssd), else 0.
        detail: how it was measured (e.g. "O_DIRECT, page cache evicted").
        location: the directory, URL or device measured.
        load_fixed_seconds: the fixed cost of a cold start from this tier on the real load
            path (:class:`sllm.core.loadpath.LoadPath`), seconds; None when not measured.
        load_gbps: that path's bandwidth, GB/s; None when no bytes move (a DRAM hit on
            the CPU) or not measured.
    """

    tier: str
    gbps: float
    nbytes: int
    seconds: float
    threads: int = 0
    detail: str = ""
    location: str = ""
    load_fixed_seconds: float | None = None
    load_gbps: float | None = None


@dataclass(frozen=True)
class NodeProfile:
    """A node's measured tiers and loader costs: its entry in the cluster inventory.

    Attributes:
        name: node name (hostname by default).
        address: the node's ``sllm serve`` URL.
        measured_at: ISO 8601 UTC time of the measurement.
        host: cpus, memory_bytes, gpus (names), platform.
        tiers: tier name -> TierBandwidth.
        loader_fixed_seconds: model skeleton build + weight assignment per load, seconds.
        capacities: tier name -> capacity in bytes, where configured.
        seconds_per_tensor: the load paths' fixed parts' cost per tensor, seconds, measured on
            a model of ``probe_tensors`` tensors (:func:`sllm.core.loadpath.measure_tensor_cost`);
            None: not measured.
        tokenizer_seconds: seconds to parse the probe model's tokenizer (what a node pays at
            its first load of a model; :func:`measure_tokenizer_seconds`); None: not measured.
    """

    name: str
    address: str
    measured_at: str
    sllm_version: str
    host: dict[str, Any]
    tiers: dict[str, TierBandwidth]
    loader_fixed_seconds: float
    capacities: dict[str, int] = field(default_factory=dict)
    seconds_per_tensor: float | None = None
    probe_tensors: int | None = None
    tokenizer_seconds: float | None = None

    def to_toml_dict(self) -> dict[str, Any]:
        """The TOML document: ``[node]``, ``[node.host]``, ``[node.tiers.<tier>]``, ``[node.loader]``."""
        node: dict[str, Any] = {
            "name": self.name,
            "address": self.address,
            "measured_at": self.measured_at,
            "sllm_version": self.sllm_version,
            "host": self.host,
            "tiers": {},
            "loader": {"fixed_seconds": round(self.loader_fixed_seconds, 6)},
        }
        if self.seconds_per_tensor is not None:
            node["loader"].update(seconds_per_tensor=round(self.seconds_per_tensor, 9), probe_tensors=self.probe_tensors)
        if self.tokenizer_seconds is not None:
            node["loader"]["tokenizer_seconds"] = round(self.tokenizer_seconds, 6)
        for tier, bw in self.tiers.items():
            entry = {k: v for k, v in asdict(bw).items() if k != "tier" and v is not None}  # TOML has no null
            for k, digits in (("gbps", 4), ("seconds", 6), ("load_fixed_seconds", 6), ("load_gbps", 4)):
                if k in entry:
                    entry[k] = round(entry[k], digits)
            if tier in self.capacities:
                entry["capacity_bytes"] = self.capacities[tier]
            node["tiers"][tier] = entry
        return {"node": node}


def host_facts() -> dict[str, Any]:
    """CPU count, memory bytes, GPU names (pynvml, when there is a driver), platform."""
    import psutil

    gpus: list[str] = []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                gpus.append(name.decode() if isinstance(name, bytes) else str(name))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVIDIA driver: no GPUs
        gpus = []
    return {
        "cpus": os.cpu_count() or 1,
        "memory_bytes": int(psutil.virtual_memory().total),
        "gpus": gpus,
        "platform": platform.platform(),
    }


def _write_probe_file(directory: Path, nbytes: int) -> Path:
    """A file of ``nbytes`` pseudo-random bytes in ``directory`` (fsynced), for read probes."""
    directory.mkdir(parents=True, exist_ok=True)
    path = temporary_sibling(directory / "read-probe")
    block = os.urandom(PROBE_CHUNK_BYTES)
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    return path


def measure_ssd(
    directory: str | os.PathLike[str],
    nbytes: int = 1 << 30,
    *,
    threads_options: Sequence[int] = (1, 2, 4, 8),
    runs: int = 3,
) -> TierBandwidth:
    """Cold read bandwidth of the filesystem holding ``directory``, as the loader reads.

    Writes a probe file of ``nbytes`` (rounded to 4 KiB) there, then for each thread
    count evicts it from the page cache and reads it with O_DIRECT (where allowed) into a
    touched host buffer, ``runs`` times; keeps the best median. The probe is deleted.
    """
    nbytes = max(4096, nbytes // 4096 * 4096)
    path = _write_probe_file(Path(directory), nbytes)
    buf = HostBuffer(nbytes)
    best: TierBandwidth | None = None
    try:
        for threads in threads_options:
            times, direct = [], False
            for _ in range(runs):
                evict_page_cache(path)
                started = time.perf_counter()
                direct = read_whole(path, buf.memoryview(nbytes), chunk_bytes=PROBE_CHUNK_BYTES, threads=threads)
                times.append(time.perf_counter() - started)
            seconds = statistics.median(times)
            result = TierBandwidth(
                "ssd", nbytes / seconds / 1e9, nbytes, seconds, threads,
                f"{'O_DIRECT' if direct else 'buffered'}, page cache evicted", str(directory),
            )
            if best is None or result.gbps > best.gbps:
                best = result
    finally:
        path.unlink(missing_ok=True)
    assert best is not None
    return best


def measure_dram_to_device(nbytes: int = 1 << 30, *, device: str = "cpu", runs: int = 3) -> TierBandwidth:
    """Bandwidth from a host pool buffer to ``device``: pinned H2D copies with CUDA,
    memcpy between two touched host buffers on the CPU."""
    import torch

    src = HostBuffer(nbytes, pinned=device.startswith("cuda"))
    src_bytes = src.tensor[:nbytes]
    if device.startswith("cuda"):
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        detail = "pinned host-to-device copy" if src.pinned else "pageable host-to-device copy"
    else:
        dst = HostBuffer(nbytes).tensor[:nbytes]
        detail = "memcpy between touched host buffers"
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        dst.copy_(src_bytes, non_blocking=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times[1:])  # the first copy warms caches and TLBs
    return TierBandwidth("dram", nbytes / seconds / 1e9, nbytes, seconds, 0, detail, device)


def measure_remote(fetch: Callable[[], int], location: str, runs: int = 1) -> TierBandwidth:
    """Bandwidth of a remote download: ``fetch()`` downloads something and returns its bytes."""
    times, nbytes = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        nbytes = fetch()
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return TierBandwidth("remote", nbytes / seconds / 1e9, nbytes, seconds, 0, "download", location)


def measure_loader_fixed_seconds(model_dir: str | os.PathLike[str], runs: int = 3) -> float:
    """Median seconds a load spends past its reads (skeleton + weight assignment + ties),
    with the bytes already in the pool (a DRAM hit) and the released skeleton reused, as
    on a serving node; after one untimed load that pays transformers' lazy import of the
    architecture. (A first load of an architecture builds its skeleton while its reads
    are in flight, so that cost hides behind the reads.)"""
    from sllm.core.loader import load_model, release

    release(load_model(model_dir))
    times = []
    for _ in range(runs):
        model = load_model(model_dir)
        times.append(model.sllm_report.build_seconds)
        release(model)
    return statistics.median(times)


def measure_tokenizer_seconds(model_dir: str | os.PathLike[str], runs: int = 3) -> float:
    """Median seconds of ``AutoTokenizer.from_pretrained(model_dir)`` over ``runs`` parses,
    after one untimed parse (transformers' lazy imports): what ``sllm serve`` pays beside a
    load when it holds no tokenizer of the model (:class:`sllm.server.loading.TokenizerCache`).

    Raises:
        whatever transformers raises for a directory without a tokenizer.
    """
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir)
    times = []
    for _ in range(max(1, runs)):
        started = time.perf_counter()
        AutoTokenizer.from_pretrained(model_dir)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def build_profile(
    tiers: dict[str, TierBandwidth],
    *,
    loader_fixed_seconds: float,
    address: str = "http://127.0.0.1:8343",
    name: str | None = None,
    capacities: dict[str, int] | None = None,
    tensor_cost: tuple[float, int] | None = None,
    tokenizer_seconds: float | None = None,
) -> NodeProfile:
    """Assemble a :class:`NodeProfile` from measurements and this host's facts
    (``tensor_cost``: seconds per tensor and the probe's tensor count, or None;
    ``tokenizer_seconds``: the probe's tokenizer parse, or None)."""
    return NodeProfile(
        name=name or socket.gethostname(),
        address=address,
        measured_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        sllm_version=__version__,
        host=host_facts(),
        tiers=tiers,
        loader_fixed_seconds=loader_fixed_seconds,
        capacities=capacities or {},
        seconds_per_tensor=tensor_cost[0] if tensor_cost else None,
        probe_tensors=tensor_cost[1] if tensor_cost else None,
        tokenizer_seconds=tokenizer_seconds,
    )


def write_profile(profile: NodeProfile, path: str | os.PathLike[str]) -> Path:
    """Write ``profile`` as TOML to ``path`` atomically (temporary name, fsync, rename)."""
    import tomli_w

    path = Path(path)
    atomic_write_bytes(path, tomli_w.dumps(profile.to_toml_dict()).encode())
    return path


def read_profile(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a node profile TOML file (tomllib) into plain data."""
    import tomllib

    with open(path, "rb") as f:
        return tomllib.load(f)


@dataclass(frozen=True)
class TierLoad:
    """One model-ready load of the same checkpoint from one tier.

    Attributes:
        tier: "remote" (pulled through remote -> SSD -> DRAM, pipelined), "ssd" (page
            cache evicted, pool reserved) or "dram" (bytes already in the host pool).
        seconds: wall time to a ready model.
        nbytes: checkpoint bytes.
        gbps: ``nbytes / seconds / 1e9``.
        detail: what that tier's load did.
        fixed_seconds: its fixed part (:class:`sllm.core.loadpath.LoadPath`), seconds.
        load_gbps: its per-byte part as a bandwidth, GB/s (None: no bytes move).
    """

    tier: str
    seconds: float
    nbytes: int
    gbps: float
    detail: str
    fixed_seconds: float = 0.0
    load_gbps: float | None = None


def profile_node(
    model_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    remote_url: str | None = None,
    remote_model: str | None = None,
    ssd_dir: str | os.PathLike[str] | None = None,
    probe_bytes: int | None = None,
    runs: int = 3,
    address: str = "http://127.0.0.1:8343",
) -> tuple[NodeProfile, list[TierLoad]]:
    """Measure this node's tiers, and load ``model_dir`` from each the way ``sllm serve``
    does (:func:`sllm.core.loadpath.measure_load_paths`), recording each tier's load-path
    fixed cost and bandwidth in the profile, and their cost per tensor
    (:func:`sllm.core.loadpath.measure_tensor_cost`).

    Args:
        model_dir: a converted checkpoint on the SSD tier's filesystem.
        device: where loads go ("cpu", "cuda:N").
        remote_url: a remote holding the same checkpoint as ``<remote_model>/`` (optional).
        remote_model: its name there (default: ``model_dir``'s directory name).
        ssd_dir: where to probe the SSD tier (default: ``model_dir``'s parent).
        probe_bytes: bytes of the bandwidth probes (default: the checkpoint size, at most 1 GiB).
        runs: repetitions per bandwidth probe.

    Returns: the node profile and one :class:`TierLoad` per tier measured.

    Raises:
        CheckpointError: ``model_dir`` is not a valid checkpoint. RemoteError, CacheError:
        the remote pull failed.
    """
    from dataclasses import replace

    from sllm.core.format import open_checkpoint
    from sllm.core.loadpath import measure_load_paths, measure_tensor_cost

    model_dir = Path(model_dir)
    ckpt = open_checkpoint(model_dir)
    nbytes = ckpt.manifest.total_bytes
    probe = probe_bytes or min(nbytes, 1 << 30)
    tiers = {
        "ssd": measure_ssd(ssd_dir or model_dir.parent, probe, runs=runs),
        "dram": measure_dram_to_device(probe, device=device, runs=runs),
    }
    fixed = measure_loader_fixed_seconds(model_dir)
    paths = measure_load_paths(model_dir, device=device, remote_url=remote_url, remote_model=remote_model,
                               work_dir=model_dir.parent, runs=runs, dram_gbps=tiers["dram"].gbps)
    if "remote" in paths:
        r = paths["remote"]
        tiers["remote"] = TierBandwidth(
            "remote", r.gbps or nbytes / r.seconds / 1e9, nbytes, r.seconds, 0,
            "pull into SSD and DRAM, pipelined by chunk (GB/s: the pull's streaming rate)", remote_url or "",
        )
    for tier, path in paths.items():
        tiers[tier] = replace(tiers[tier], load_fixed_seconds=path.fixed_seconds, load_gbps=path.gbps)
    how = {"remote": "remote -> SSD + DRAM pipelined, then built on the DRAM lease (as sllm serve)",
           "ssd": "SSD -> DRAM (page cache evicted), then built on the DRAM lease",
           "dram": "a DRAM hit, built on the lease"}
    loads = [TierLoad(t, p.seconds, nbytes, nbytes / p.seconds / 1e9, how[t], p.fixed_seconds, p.gbps)
             for t in ("remote", "ssd", "dram") if (p := paths.get(t)) is not None]
    try:
        cost = measure_tensor_cost(model_dir, device=device, runs=runs, dram_gbps=tiers["dram"].gbps)
    except Exception as exc:  # noqa: BLE001 - a refinement: without it the profile is still whole
        logging.getLogger("sllm").warning("%s: no per-tensor load cost (its 1- and 4-layer copies did not build: "
                                          "%s: %s)", model_dir, type(exc).__name__, exc)
        cost = None
    try:
        tokenizer = measure_tokenizer_seconds(model_dir)
    except Exception as exc:  # noqa: BLE001 - as above: a checkpoint without a tokenizer still profiles
        logging.getLogger("sllm").warning("%s: no tokenizer parse time (%s: %s)", model_dir, type(exc).__name__, exc)
        tokenizer = None
    return build_profile(tiers, loader_fixed_seconds=fixed, address=address, tensor_cost=cost,
                         tokenizer_seconds=tokenizer), loads
