"""Loader benchmark: sllm against the usual ways of loading the same model, side by side.

For one model this module times, in the same run, *state-dict-ready* and *model-ready*
for sllm's loader, ``safetensors.torch.load_file``, ``torch.load`` (plain and ``mmap=True``,
always ``weights_only=True``) and ``transformers.from_pretrained``, each cold (the model's
files evicted from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``) and warm
(straight after, in the same process), plus the floor: a raw O_DIRECT read of the same
bytes into already-touched memory. "Ready" means every byte of every tensor is resident:
after a load, one byte per page of each tensor's storage is read (mmap-backed loaders pay
their deferred reads there) or, on CUDA, the device is synchronised.

Every (method, run) pair runs in a fresh subprocess (``python -m sllm.core.bench --worker
SPEC``, one JSON document on stdout) so that no method warms another's memory or caches.
Inside a worker, untimed: torch and transformers are imported, the architecture's module is
imported by building the model skeleton once on the meta device (transformers' ~2 s lazy
import is counted for no method), and for sllm the host memory pool is reserved and touched
as a server does at start; the "sllm-unreserved" method skips that reservation and shows
the first load of a fresh process. Baseline models are assembled with the same
:func:`sllm.core.loader.build_model` sllm uses, so rows differ only in how bytes arrive.

Targets (issue 2, "Done when"): sllm cold model-ready within 1.15x of the raw O_DIRECT read,
at least 2.5x faster than ``from_pretrained`` cold, and sllm warm at least 5x faster than
``from_pretrained`` warm.

This module measures and aggregates; it never asserts on time and does not print: the
``sllm load-bench`` command renders :class:`BenchResult`. It imports neither rich nor typer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllm.errors import CheckpointError, NotAModelDirectory, SllmError, UsageError

Log = Callable[[str], None]
ProgressCallback = Callable[[int, int], None]

#: Targets of issue 2 (thresholds on ratios of model-ready median seconds); see :func:`targets`.
TARGET_COLD_VS_RAW = 1.15
TARGET_COLD_SPEEDUP = 2.5
TARGET_WARM_SPEEDUP = 5.0

#: Seconds one worker may run before it is killed.
WORKER_TIMEOUT_SECONDS = 1800


@dataclass(frozen=True)
class Method:
    """One way of loading the model.

    Attributes:
        loader: the family name used by ``--methods`` ("sllm", "safetensors", ...).
        level: "bytes" (raw read), "state-dict" or "model".
        needs: which files it reads: "sllm" (the converted checkpoint), "safetensors",
            "bin" (``pytorch_model.bin``) or "hf" (the Hugging Face directory).
        warm: False when only a cold load is measured.
        description: one line for the table's legend and the man page.
    """

    loader: str
    level: str
    needs: str
    warm: bool
    description: str

    @property
    def name(self) -> str:
        """``loader:level``, the row's key."""
        return f"{self.loader}:{self.level}"


#: Every method, in table order. ``--methods`` selects by loader or by ``loader:level``.
METHODS: tuple[Method, ...] = (
    Method("raw", "bytes", "sllm", True,
           "floor: cold = O_DIRECT read of the partition files into touched memory; warm = buffered read, "
           "page cache hot"),
    Method("sllm", "model", "sllm", True, "sllm.load_model, host memory pool reserved at start"),
    Method("sllm", "state-dict", "sllm", True, "sllm.load_state_dict, host memory pool reserved at start"),
    Method("sllm-unreserved", "model", "sllm", False, "sllm.load_model, first load in a process (fresh pool)"),
    Method("safetensors", "model", "safetensors", True, "safetensors.torch.load_file + build_model"),
    Method("safetensors", "state-dict", "safetensors", True, "safetensors.torch.load_file (mmap), pages touched"),
    Method("torch-load", "model", "bin", True, "torch.load(weights_only=True) + build_model"),
    Method("torch-load", "state-dict", "bin", True, "torch.load(weights_only=True)"),
    Method("torch-load-mmap", "model", "bin", True, "torch.load(mmap=True, weights_only=True) + build_model"),
    Method("torch-load-mmap", "state-dict", "bin", True, "torch.load(mmap=True, weights_only=True), pages touched"),
    Method("from-pretrained", "model", "hf", True, "transformers AutoModelForCausalLM.from_pretrained(dtype='auto')"),
)  # fmt: skip

LOADERS: tuple[str, ...] = tuple(dict.fromkeys(m.loader for m in METHODS))


def select_methods(names: list[str] | None) -> list[Method]:
    """The methods named by ``--methods`` (loader names or ``loader:level``), in table order.

    None or an empty list selects every method.

    Raises:
        UsageError: an unknown name (the message lists the valid ones).
    """
    if not names:
        return list(METHODS)
    wanted = set()
    for raw in names:
        name = raw.strip()
        hits = [m for m in METHODS if name in (m.loader, m.name)]
        if not hits:
            valid = ", ".join([*LOADERS, *(m.name for m in METHODS)])
            raise UsageError(f"--methods: unknown method {name!r}; choose from {valid}")
        wanted.update(m.name for m in hits)
    return [m for m in METHODS if m.name in wanted]


# ---------------------------------------------------------------------------------------
# Config, preparation
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        model_dir: a converted sllm checkpoint (has ``sllm.json``) or a Hugging Face
            directory (converted once into ``work_dir``).
        hf_dir: the Hugging Face source for the baselines; default ``model_dir`` when that
            is a Hugging Face directory. Without one, the baselines are skipped.
        work_dir: where the conversion and a ``pytorch_model.bin`` copy go; default
            ``.sllm-bench-<name>`` beside the Hugging Face directory, reused across runs.
        runs: processes per method (>= 1); each measures one cold and one warm load.
        threads: sllm reader threads per partition (None: the loader's default, 4).
        device: "cpu", "cuda" or "cuda:N".
        methods: the methods to run (see :func:`select_methods`).
    """

    model_dir: Path
    hf_dir: Path | None = None
    work_dir: Path | None = None
    runs: int = 3
    threads: int | None = None
    device: str = "cpu"
    methods: tuple[Method, ...] = METHODS


@dataclass(frozen=True)
class Prepared:
    """The files each method reads, after conversion (see :func:`prepare`).

    Attributes:
        sllm_dir: the converted checkpoint.
        hf_dir: the Hugging Face directory, or None.
        safetensors_files / bin_files: the weight files of each format (may be empty).
        nbytes: the checkpoint's total bytes (partitions, alignment padding included): the
            one byte count every row's GB/s is computed from.
        notes: what was converted, reused or skipped.
    """

    sllm_dir: Path
    hf_dir: Path | None
    safetensors_files: tuple[Path, ...]
    bin_files: tuple[Path, ...]
    nbytes: int
    partitions: int
    notes: tuple[str, ...] = ()

    def files_for(self, needs: str) -> tuple[Path, ...]:
        """The weight files a method with ``needs`` reads."""
        ck = self.sllm_dir
        parts = tuple(sorted(ck.glob("partition-*.bin")))
        return {"sllm": parts, "safetensors": self.safetensors_files, "bin": self.bin_files,
                "hf": self.safetensors_files or self.bin_files}[needs]  # fmt: skip

    def all_files(self) -> tuple[Path, ...]:
        """Every weight file of every format: what a cold run evicts."""
        return tuple(dict.fromkeys([*self.files_for("sllm"), *self.safetensors_files, *self.bin_files]))


def _hf_weight_files(hf_dir: Path) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    from sllm.core.convert import find_weight_files

    kind, files = find_weight_files(hf_dir)
    return (tuple(files), ()) if kind == "safetensors" else ((), tuple(files))


def _default_work_dir(hf_dir: Path) -> Path:
    hf_dir = hf_dir.resolve()
    return hf_dir.parent / f".sllm-bench-{hf_dir.name}"


def _conversion_matches(sllm_dir: Path, hf_files: tuple[Path, ...]) -> bool:
    """True when ``sllm_dir`` is a valid checkpoint converted from files of these names and sizes."""
    from sllm.core.format import open_checkpoint

    try:
        ck = open_checkpoint(sllm_dir)
    except SllmError:
        return False
    recorded = {(s.file, s.nbytes) for s in ck.manifest.sources}
    return recorded == {(p.name, p.stat().st_size) for p in hf_files}


def _write_bin_copy(safetensors_files: tuple[Path, ...], dst: Path) -> None:
    """``torch.save`` of the safetensors state dict to ``dst``, through a temporary name."""
    import torch
    from safetensors.torch import load_file

    from sllm.io.atomic import temporary_sibling

    state_dict: dict[str, Any] = {}
    for f in safetensors_files:
        state_dict.update(load_file(str(f)))
    tmp = temporary_sibling(dst)
    try:
        torch.save(state_dict, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def prepare(config: BenchConfig, *, log: Log | None = None, on_progress: ProgressCallback | None = None) -> Prepared:
    """Find or make the files every method reads: convert once, write a ``.bin`` copy once.

    A Hugging Face ``model_dir`` is converted into ``work_dir/sllm`` (dtype kept), reused
    when its manifest records the same source files and sizes. When the Hugging Face
    directory has safetensors only and a ``torch-load`` method is selected, a
    ``pytorch_model.bin`` copy is written into ``work_dir`` (untimed). Every weight file is
    flushed to disk (``fdatasync``) so that eviction leaves no dirty page behind.

    Raises:
        NotAModelDirectory: ``model_dir`` is neither an sllm checkpoint nor an HF model.
        CheckpointError: a conversion failure (the message names the file).
        UsageError: ``work_dir`` cannot be created.
    """
    from sllm.core.convert import convert
    from sllm.core.format import MANIFEST_FILE, open_checkpoint

    log = log or (lambda _msg: None)
    notes: list[str] = []
    model_dir = Path(config.model_dir)
    if not model_dir.is_dir():
        raise NotAModelDirectory(f"{model_dir}: not a directory")
    hf_dir = Path(config.hf_dir) if config.hf_dir else None
    if (model_dir / MANIFEST_FILE).is_file():
        sllm_dir = model_dir
        if hf_dir is None:
            notes.append("no Hugging Face source (--hf-dir): safetensors, torch-load and from-pretrained skipped")
    else:
        hf_dir = hf_dir or model_dir
        sllm_dir = None
    st_files: tuple[Path, ...] = ()
    bin_files: tuple[Path, ...] = ()
    if hf_dir is not None:
        st_files, bin_files = _hf_weight_files(hf_dir)
    work_dir = Path(config.work_dir) if config.work_dir else (_default_work_dir(hf_dir) if hf_dir else None)
    if work_dir is not None and (sllm_dir is None or (not bin_files and _wants(config, "bin"))):
        try:
            work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"{work_dir}: cannot create the work directory ({exc.strerror})",
                hint="pass --work-dir DIR on a writable filesystem",
            ) from exc
    if sllm_dir is None:
        assert hf_dir is not None and work_dir is not None
        sllm_dir = work_dir / "sllm"
        if _conversion_matches(sllm_dir, st_files or bin_files):
            notes.append(f"reused the conversion in {sllm_dir}")
        else:
            log(f"converting {hf_dir} -> {sllm_dir} (once)")
            convert(hf_dir, sllm_dir, force=True, on_progress=on_progress)
            notes.append(f"converted {hf_dir} into {sllm_dir}")
    if hf_dir is not None and not bin_files and _wants(config, "bin"):
        assert work_dir is not None
        bin_path = work_dir / "pytorch_model.bin"
        if not bin_path.is_file():
            log(f"writing {bin_path} (torch.save of the safetensors state dict, once)")
            _write_bin_copy(st_files, bin_path)
        notes.append(f"torch.load rows read {bin_path} (a torch.save copy of the safetensors weights)")
        bin_files = (bin_path,)
    ck = open_checkpoint(sllm_dir)
    prepared = Prepared(
        sllm_dir=sllm_dir,
        hf_dir=hf_dir,
        safetensors_files=st_files,
        bin_files=bin_files,
        nbytes=ck.manifest.total_bytes,
        partitions=len(ck.manifest.partitions),
        notes=tuple(notes),
    )
    for f in prepared.all_files():
        _flush(f)
    return prepared


def _wants(config: BenchConfig, needs: str) -> bool:
    return any(m.needs == needs for m in config.methods)


def _flush(path: Path) -> None:
    """fdatasync ``path`` so that POSIX_FADV_DONTNEED can drop all of its pages."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from exc
    try:
        os.fdatasync(fd)
    except OSError:
        pass  # some filesystems refuse; eviction is then best effort (resident_before shows it)
    finally:
        os.close(fd)


def resident_fraction(paths: tuple[Path, ...] | list[Path]) -> float | None:
    """Fraction (0..1) of the files' pages that are in the page cache, by ``mincore(2)``.

    Returns None where it cannot tell (no libc, a mapping refused). Used to show that a
    "cold" run really started cold.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = -(-size // page)
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in bytes(vec))
                total += pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


# ---------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One (method, temperature) line of the table.

    Attributes:
        method: ``loader:level``. loader, level: its parts. temperature: "cold" or "warm".
        seconds: every run's seconds, in run order.
        seconds_median / seconds_min / seconds_max: over ``seconds``.
        gbps: ``nbytes / seconds_median / 1e9``.
        nbytes: the checkpoint's bytes (the same for every row).
        vs_sllm: ``seconds_median`` over the matching sllm row's (same level and
            temperature; raw and sllm-unreserved compare with sllm model): > 1 is slower.
        resident_before_max: the largest page-cache fraction of the method's files seen
            just before a cold load (should be ~0), or None.
        extra: medians of loader-reported figures (sllm: read_seconds, build_seconds).
        direct_io: whether O_DIRECT was used (sllm and raw rows), else None.
        pool_hit: sllm rows: whether the bytes came from the host memory pool (a DRAM-tier
            hit, nothing read from storage), else None.
    """

    method: str
    loader: str
    level: str
    temperature: str
    description: str
    seconds: list[float]
    seconds_median: float
    seconds_min: float
    seconds_max: float
    gbps: float
    nbytes: int
    vs_sllm: float | None = None
    resident_before_max: float | None = None
    direct_io: bool | None = None
    pool_hit: bool | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One target of issue 2: ``value`` compared with ``threshold``.

    ``comparison`` is "<=" or ">="; ``met`` is None when a needed row is missing.
    """

    name: str
    description: str
    value: float | None
    threshold: float
    comparison: str
    met: bool | None


@dataclass(frozen=True)
class BenchResult:
    """Everything ``sllm load-bench`` prints (``--json`` is ``dataclasses.asdict`` of this).

    ``machine`` holds ``cpus``, the 1-minute load averages at start and end, and
    ``other_processes_cpus``: CPUs other processes kept busy on average during the run
    (machine busy time minus this process's and its workers', over wall time; interrupt
    time counts as others', so it reads a little high). ``seconds`` is the run's wall time.
    """

    model_dir: str
    sllm_dir: str
    hf_dir: str | None
    device: str
    threads: int | None
    runs: int
    nbytes: int
    partitions: int
    rows: list[Row]
    targets: list[Target]
    failures: dict[str, str]
    notes: list[str]
    machine: dict[str, Any]
    seconds: float


def _ref_name(m_loader: str, level: str) -> str:
    return "sllm:model" if m_loader in ("raw", "sllm-unreserved") else f"sllm:{level}"


def aggregate(methods: list[Method], samples: dict[str, dict[str, list[dict[str, Any]]]], nbytes: int) -> list[Row]:
    """Rows from per-method samples ``{method: {"cold": [sample, ...], "warm": [...]}}``.

    A sample is a worker's ``{"seconds": float, "resident_before": float|None,
    "direct_io": bool|None, "extra": {...}}``.
    """
    medians: dict[tuple[str, str], float] = {}
    rows: list[Row] = []
    for m in methods:
        for temp in ("cold", "warm"):
            runs = samples.get(m.name, {}).get(temp, [])
            if not runs:
                continue
            secs = [float(s["seconds"]) for s in runs]
            med = statistics.median(secs)
            medians[(m.name, temp)] = med
            resident = [s.get("resident_before") for s in runs if s.get("resident_before") is not None]
            extra_keys = sorted({k for s in runs for k in s.get("extra", {})})
            extra = {k: statistics.median([s["extra"][k] for s in runs if k in s.get("extra", {})]) for k in extra_keys}
            directs = {s.get("direct_io") for s in runs}
            hits = {s.get("pool_hit") for s in runs}
            rows.append(Row(
                method=m.name, loader=m.loader, level=m.level, temperature=temp, description=m.description,
                seconds=secs, seconds_median=med, seconds_min=min(secs), seconds_max=max(secs),
                gbps=nbytes / med / 1e9 if med > 0 else 0.0, nbytes=nbytes,
                resident_before_max=max(resident) if resident else None,
                direct_io=directs.pop() if len(directs) == 1 else None,
                pool_hit=hits.pop() if len(hits) == 1 else None, extra=extra,
            ))  # fmt: skip
    out = []
    for r in rows:
        ref = medians.get((_ref_name(r.loader, r.level), r.temperature))
        vs = r.seconds_median / ref if ref else None
        out.append(Row(**{**r.__dict__, "vs_sllm": vs}))
    return out


def targets(rows: list[Row]) -> list[Target]:
    """The three targets of issue 2 from the rows (model-ready medians)."""
    med = {(r.method, r.temperature): r.seconds_median for r in rows}

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> float | None:
        return med[a] / med[b] if a in med and b in med and med[b] > 0 else None

    def check(value: float | None, threshold: float, comparison: str) -> bool | None:
        if value is None:
            return None
        return value <= threshold if comparison == "<=" else value >= threshold

    specs = [
        ("cold_vs_raw", "cold: sllm time / raw O_DIRECT read time",
         ratio(("sllm:model", "cold"), ("raw:bytes", "cold")), TARGET_COLD_VS_RAW, "<="),
        ("cold_speedup_vs_from_pretrained", "cold: from_pretrained time / sllm time",
         ratio(("from-pretrained:model", "cold"), ("sllm:model", "cold")), TARGET_COLD_SPEEDUP, ">="),
        ("warm_speedup_vs_from_pretrained", "warm: from_pretrained time / sllm time",
         ratio(("from-pretrained:model", "warm"), ("sllm:model", "warm")), TARGET_WARM_SPEEDUP, ">="),
    ]  # fmt: skip
    return [Target(n, d, v, t, c, check(v, t, c)) for n, d, v, t, c in specs]


# ---------------------------------------------------------------------------------------
# Orchestration (parent process)
# ---------------------------------------------------------------------------------------


def _worker_spec(method: Method, prepared: Prepared, config: BenchConfig) -> dict[str, Any]:
    return {
        "loader": method.loader,
        "level": method.level,
        "warm": method.warm,
        "sllm_dir": str(prepared.sllm_dir),
        "hf_dir": str(prepared.hf_dir) if prepared.hf_dir else None,
        "config_dir": str(prepared.hf_dir or prepared.sllm_dir),
        "files": [str(p) for p in prepared.files_for(method.needs)],
        "evict": [str(p) for p in prepared.all_files()],
        "threads": config.threads,
        "device": config.device,
    }


def run_worker_process(spec: dict[str, Any], *, timeout: float = WORKER_TIMEOUT_SECONDS) -> dict[str, Any]:
    """Run one worker in a fresh interpreter and return its JSON result.

    Raises:
        SllmError: the worker failed (the message carries its error or stderr's last line).
    """
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    cmd = [sys.executable, "-m", "sllm.core.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SllmError(f"{spec['loader']}:{spec['level']}: worker ran over {timeout:.0f} s") from exc
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except ValueError:
        doc = {}
    if proc.returncode != 0 or "error" in doc or "cold" not in doc:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
        raise SllmError(f"{spec['loader']}:{spec['level']}: {doc.get('error') or tail[0]}")
    return doc


def available_methods(config: BenchConfig, prepared: Prepared) -> tuple[list[Method], list[str]]:
    """The selected methods whose files exist, and a note for each skipped one."""
    ok, notes = [], []
    for m in config.methods:
        if m.needs != "sllm" and prepared.hf_dir is None:
            continue  # prepare() already noted the missing HF source
        if m.needs == "safetensors" and not prepared.safetensors_files:
            notes.append(f"{m.name} skipped: the Hugging Face directory has no safetensors")
            continue
        if m.needs == "bin" and not prepared.bin_files:
            notes.append(f"{m.name} skipped: no .bin weights")
            continue
        ok.append(m)
    return ok, notes


def _cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds the whole machine has been busy, CPU-seconds of this process and its
    waited-for children), for telling how much of the machine others used during a run."""
    import psutil

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = os.times()
    return busy, own.user + own.system + own.children_user + own.children_system


def run_bench(
    config: BenchConfig,
    prepared: Prepared,
    *,
    log: Log | None = None,
    worker: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> BenchResult:
    """Run every selected method ``config.runs`` times, each run in a fresh process.

    Runs are interleaved (run 1 of every method, then run 2, ...) so that a burst of load
    from other processes on the machine spreads over the methods instead of hitting one.
    A method whose worker fails is reported in ``failures`` and left out of the rows.

    Args:
        config: what to run. prepared: from :func:`prepare`.
        log: called with a line per step (the command prints it on stderr).
        worker: runs one worker spec; default :func:`run_worker_process` (a fresh
            interpreter). Tests may pass :func:`worker_main` to run in-process.

    Raises:
        UsageError: ``runs`` < 1 or a bad device.
    """
    if config.runs < 1:
        raise UsageError(f"--runs {config.runs}: must be >= 1")
    if not (config.device == "cpu" or config.device.startswith("cuda")):
        raise UsageError(f"--device {config.device!r}: use cpu, cuda or cuda:N")
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {config.device}: CUDA is not available on this machine")
    log = log or (lambda _msg: None)
    worker = worker or run_worker_process
    started = time.perf_counter()
    methods, skip_notes = available_methods(config, prepared)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    busy_start, own_start = _cpu_seconds()
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    failures: dict[str, str] = {}
    steps = len(methods) * config.runs
    step = 0
    for run in range(config.runs):
        for m in methods:
            step += 1
            if m.name in failures:
                continue
            log(f"[{step}/{steps}] run {run + 1}/{config.runs} {m.name}")
            try:
                doc = worker(_worker_spec(m, prepared, config))
            except SllmError as exc:
                failures[m.name] = str(exc)
                log(f"  failed: {exc}")
                continue
            for temp in ("cold", "warm"):
                if doc.get(temp) is not None:
                    samples.setdefault(m.name, {}).setdefault(temp, []).append(doc[temp])
            cold = doc["cold"]["seconds"]
            warm = doc.get("warm", {}) or {}
            log(f"  cold {cold:.3f} s" + (f", warm {warm['seconds']:.3f} s" if warm else ""))
    ok_methods = [m for m in methods if m.name not in failures]
    rows = aggregate(ok_methods, samples, prepared.nbytes)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    busy_end, own_end = _cpu_seconds()
    wall = time.perf_counter() - started
    others = max(0.0, (busy_end - busy_start) - (own_end - own_start)) / wall if wall > 0 else 0.0
    cpus = os.cpu_count() or 1
    notes = [*prepared.notes, *skip_notes]
    if any(r.resident_before_max and r.resident_before_max > 0.05 for r in rows):
        notes.append("page-cache eviction was incomplete for some cold runs (see resident_before_max)")
    if others > 0.25:
        notes.append(f"the machine was busy: other processes used {others:.2f} of its {cpus} CPUs on average")
    return BenchResult(
        model_dir=str(config.model_dir), sllm_dir=str(prepared.sllm_dir),
        hf_dir=str(prepared.hf_dir) if prepared.hf_dir else None, device=config.device, threads=config.threads,
        runs=config.runs, nbytes=prepared.nbytes, partitions=prepared.partitions, rows=rows, targets=targets(rows),
        failures=failures, notes=notes,
        machine={"cpus": cpus, "loadavg_start": list(load_start or []), "loadavg_end": list(load_end or []),
                 "other_processes_cpus": others},
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def plot(result: BenchResult, path: Path) -> None:
    """Draw the model-ready medians (cold and warm, min-max as error bars) to a PNG.

    Raises:
        UsageError: matplotlib is not installed (install the ``plot`` extra).
    """
    plt = import_pyplot()
    rows = [r for r in result.rows if r.level in ("model", "bytes")]
    names = list(dict.fromkeys(r.method for r in rows))
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.5))
    height = 0.38
    for k, temp in enumerate(("cold", "warm")):
        by = {r.method: r for r in rows if r.temperature == temp}
        ys = [i + (k - 0.5) * height for i, n in enumerate(names) if n in by]
        rs = [by[n] for n in names if n in by]
        ax.barh(
            ys,
            [r.seconds_median for r in rs],
            height=height,
            label=temp,
            xerr=[[r.seconds_median - r.seconds_min for r in rs], [r.seconds_max - r.seconds_median for r in rs]],
        )
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds to ready (median; bars: min-max)")
    ax.set_title(f"{Path(result.model_dir).name}: {result.nbytes / 1e9:.2f} GB, {result.device}, {result.runs} runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def import_pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend.

    Raises:
        UsageError: matplotlib is missing, with the install hint.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         hint="pip install 'sllm[plot]'") from exc  # fmt: skip
    return plt


# ---------------------------------------------------------------------------------------
# Worker (child process)
# ---------------------------------------------------------------------------------------


def _touch(tensors: Any) -> None:
    """Make every page of each tensor's storage resident: read one byte per page (CPU)."""
    import torch

    page = os.sysconf("SC_PAGE_SIZE")
    seen: set[int] = set()
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        flat = torch.empty(0, dtype=torch.uint8).set_(storage)
        int(flat[::page].sum())


def _ready(obj: Any, device: Any) -> None:
    """Block until ``obj`` (a model or a state dict) is usable: pages touched or CUDA synced."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    if isinstance(obj, torch.nn.Module):
        _touch([*obj.parameters(), *obj.buffers()])
    else:
        _touch(obj.values())


def _baseline_loader(spec: dict[str, Any], device: Any) -> Callable[[], Any]:
    """A function that loads the model (or state dict) the baseline way."""
    import torch

    from sllm.core.loader import build_model

    files = [Path(f) for f in spec["files"]]
    loader, level = spec["loader"], spec["level"]
    if loader == "from-pretrained":
        from transformers import AutoModelForCausalLM

        kwargs = {"device_map": str(device)} if device.type == "cuda" else {}

        def load_fp() -> Any:
            return AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype="auto", **kwargs).eval()

        return load_fp

    def load_sd() -> dict[str, Any]:
        sd: dict[str, Any] = {}
        for f in files:
            if loader == "safetensors":
                from safetensors.torch import load_file

                sd.update(load_file(str(f), device=str(device)))
            else:
                sd.update(torch.load(f, map_location=device, weights_only=True, mmap=loader == "torch-load-mmap"))
        return sd

    if level == "state-dict":
        return load_sd
    return lambda: build_model(spec["config_dir"], load_sd(), device)


def _sample(fn: Callable[[], Any], device: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    obj = fn()
    _ready(obj, device)
    return obj, time.perf_counter() - started


def _evict(paths: list[str]) -> float | None:
    from sllm.io.reader import evict_page_cache

    for p in paths:
        evict_page_cache(p)
    return resident_fraction([Path(p) for p in paths])


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one method once cold and once warm in this process; return the samples.

    Untimed set-up: import torch and transformers, build the model skeleton on the meta
    device (imports the architecture's module), create the CUDA context, and for "sllm"
    reserve the host memory pool for the checkpoint's partitions.
    """
    loader, level = spec["loader"], spec["level"]
    if loader == "raw":
        return _raw_worker(spec)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(spec["device"])
    config = AutoConfig.from_pretrained(spec["config_dir"])
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)
    if device.type == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
    out: dict[str, Any] = {"cold": None, "warm": None}
    if loader in ("sllm", "sllm-unreserved"):
        from sllm.core import loader as sllm_loader
        from sllm.core.format import open_checkpoint
        from sllm.core.pool import HostMemoryPool

        pool = HostMemoryPool()  # this worker's own, so an in-process run starts fresh too
        if loader == "sllm":
            ck = open_checkpoint(spec["sllm_dir"])
            pool.reserve([p.nbytes for p in ck.manifest.partitions])
        load_fn = sllm_loader.load_model if level == "model" else sllm_loader.load_state_dict

        def fn() -> Any:
            return load_fn(spec["sllm_dir"], str(device), threads=spec["threads"], pool=pool)

        def drop(obj: Any) -> dict[str, Any]:
            r = sllm_loader.report_of(obj)
            sllm_loader.release(obj)
            return {"direct_io": r.direct_io, "pool_hit": getattr(r, "pool_hit", None),
                    "extra": {"read_seconds": r.read_seconds, "build_seconds": r.build_seconds}}  # fmt: skip
    else:
        fn = _baseline_loader(spec, device)

        def drop(obj: Any) -> dict[str, Any]:
            return {}

    for temp in ("cold", "warm"):
        if temp == "warm" and not spec["warm"]:
            break
        resident = _evict(spec["evict"]) if temp == "cold" else None
        obj, seconds = _sample(fn, device)
        out[temp] = {"seconds": seconds, "resident_before": resident, "direct_io": None, "extra": {}, **drop(obj)}
        del obj
        gc.collect()
    return out


def _raw_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Cold: O_DIRECT reads of the partitions into pre-touched buffers after eviction.
    Warm: buffered reads with the page cache hot (primed by an untimed buffered read)."""
    from sllm.core.format import open_checkpoint
    from sllm.io.hostmem import HostBuffer
    from sllm.io.reader import DEFAULT_READ_THREADS, read_whole

    ck = open_checkpoint(spec["sllm_dir"])
    parts = [(ck.partition_path(i), p.nbytes) for i, p in enumerate(ck.manifest.partitions)]
    buffers = [HostBuffer(n) for _, n in parts]  # MAP_POPULATE: touched before timing
    threads = spec["threads"] or DEFAULT_READ_THREADS

    def read(direct: bool) -> tuple[float, bool]:
        started = time.perf_counter()
        used = [read_whole(path, buf.memoryview(n), chunk_bytes=ck.manifest.chunk_bytes, threads=threads,
                           direct_io=direct) for (path, n), buf in zip(parts, buffers, strict=True)]  # fmt: skip
        return time.perf_counter() - started, all(used)

    resident = _evict(spec["evict"])
    cold, cold_direct = read(True)
    out: dict[str, Any] = {"cold": {"seconds": cold, "resident_before": resident, "direct_io": cold_direct,
                                    "extra": {}}, "warm": None}  # fmt: skip
    if spec["warm"]:
        read(False)  # prime the page cache
        warm, warm_direct = read(False)
        out["warm"] = {"seconds": warm, "resident_before": None, "direct_io": warm_direct, "extra": {}}
    return out


def _worker_cli(argv: list[str]) -> int:
    """``python -m sllm.core.bench --worker SPEC_JSON``: one JSON document on stdout.

    Anything the libraries print goes to stderr: fd 1 is pointed at stderr while the
    worker runs, and the result is written to the original stdout at the end.
    """
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m sllm.core.bench --worker SPEC_JSON", file=sys.stderr)
        return 2
    result_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        doc = worker_main(json.loads(argv[1]))
        code = 0
    except Exception as exc:  # noqa: BLE001 - reported to the parent as JSON
        doc = {"error": f"{type(exc).__name__}: {exc}"}
        code = 1
    sys.stdout.flush()
    os.write(result_fd, (json.dumps(doc) + "\n").encode())
    os.close(result_fd)
    return code


if __name__ == "__main__":
    sys.exit(_worker_cli(sys.argv[1:]))
