"""load-bench's orchestration: prepare every method's files, run each (method, run) in a
fresh worker process, and aggregate.

:func:`prepare` converts a Hugging Face model once and writes the other formats the
selected peers read (a ``pytorch_model.bin`` copy for torch.load, a ``model.tensors`` file
for tensorizer), untimed and reused across runs. :func:`run_bench` runs every selected
method ``runs`` times, interleaved, each run in a fresh interpreter
(``python -m sllm.core.bench.worker SPEC``) so that no method warms another's memory or
caches, and returns a :class:`~sllm.core.bench.results.BenchResult`. It measures; it never
asserts on time and does not print (the ``sllm load-bench`` command renders and plots).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm.core.bench.methods import METHODS, Method
from sllm.core.bench.results import BenchResult, aggregate, targets
from sllm.errors import CheckpointError, NotAModelDirectory, SllmError, UsageError

Log = Callable[[str], None]
ProgressCallback = Callable[[int, int], None]

#: Seconds one worker may run before it is killed.
WORKER_TIMEOUT_SECONDS = 1800


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
        runs: processes per method (>= 1); each measures its cold and/or warm load.
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
        safetensors_files / bin_files / tensors_files: the weight files of each format
            (may be empty).
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
    tensors_files: tuple[Path, ...] = ()

    def files_for(self, needs: str) -> tuple[Path, ...]:
        """The weight files a method with ``needs`` reads."""
        ck = self.sllm_dir
        parts = tuple(sorted(ck.glob("partition-*.bin")))
        return {"sllm": parts, "safetensors": self.safetensors_files, "bin": self.bin_files,
                "tensors": self.tensors_files, "hf": self.safetensors_files or self.bin_files}[needs]  # fmt: skip

    def all_files(self) -> tuple[Path, ...]:
        """Every weight file of every format: what a cold run evicts."""
        return tuple(dict.fromkeys([*self.files_for("sllm"), *self.safetensors_files, *self.bin_files,
                                    *self.tensors_files]))


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


def _write_tensorizer_copy(safetensors_files: tuple[Path, ...], dst: Path) -> None:
    """A tensorizer file of the safetensors state dict at ``dst``, through a temporary name.

    Raises:
        UsageError: tensorizer is not installed (the ``bench`` extra).
    """
    from safetensors.torch import load_file

    from sllm.core.bench.methods import _need
    from sllm.io.atomic import temporary_sibling

    tz = _need("tensorizer", "tensorizer")
    state_dict: dict[str, Any] = {}
    for f in safetensors_files:
        state_dict.update(load_file(str(f)))
    tmp = temporary_sibling(dst)
    try:
        writer = tz.TensorSerializer(str(tmp))
        writer.write_state_dict(state_dict)
        writer.close()
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def prepare(config: BenchConfig, *, log: Log | None = None, on_progress: ProgressCallback | None = None) -> Prepared:
    """Find or make the files every method reads: convert once, write other formats once.

    A Hugging Face ``model_dir`` is converted into ``work_dir/sllm`` (dtype kept), reused
    when its manifest records the same source files and sizes. When the Hugging Face
    directory has safetensors only and a ``torch-load`` method is selected, a
    ``pytorch_model.bin`` copy is written into ``work_dir``; when a ``tensorizer`` method is
    selected, ``work_dir/model.tensors`` (both untimed, through temporary names). Every weight file is
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
    if work_dir is not None and (sllm_dir is None or (not bin_files and _wants(config, "bin"))
                                 or _wants(config, "tensors")):
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
    tensors_files: tuple[Path, ...] = ()
    if hf_dir is not None and _wants(config, "tensors") and st_files:
        assert work_dir is not None
        tz_path = work_dir / "model.tensors"
        try:
            if not tz_path.is_file():
                log(f"writing {tz_path} (tensorizer serialization of the safetensors state dict, once)")
                _write_tensorizer_copy(st_files, tz_path)
            tensors_files = (tz_path,)
        except UsageError as exc:
            notes.append(f"tensorizer rows skipped: {exc} ({exc.hint})")
    ck = open_checkpoint(sllm_dir)
    prepared = Prepared(
        sllm_dir=sllm_dir,
        hf_dir=hf_dir,
        safetensors_files=st_files,
        bin_files=bin_files,
        nbytes=ck.manifest.total_bytes,
        partitions=len(ck.manifest.partitions),
        notes=tuple(notes),
        tensors_files=tensors_files,
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


def _worker_spec(method: Method, prepared: Prepared, config: BenchConfig) -> dict[str, Any]:
    return {
        "loader": method.loader,
        "level": method.level,
        "temps": list(method.temps),
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
    cmd = [sys.executable, "-m", "sllm.core.bench.worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SllmError(f"{spec['loader']}:{spec['level']}: worker ran over {timeout:.0f} s") from exc
    try:
        doc = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except ValueError:
        doc = {}
    if proc.returncode != 0 or "error" in doc or not (doc.get("cold") or doc.get("warm")):
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
        if m.needs == "tensors" and not prepared.tensors_files:
            continue  # prepare() noted why
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
            log("  " + ", ".join(f"{t} {doc[t]['seconds']:.3f} s" for t in ("cold", "warm") if doc.get(t)))
    ok_methods = [m for m in methods if m.name not in failures]
    rows = aggregate(ok_methods, samples, prepared.nbytes)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    busy_end, own_end = _cpu_seconds()
    wall = time.perf_counter() - started
    others = max(0.0, (busy_end - busy_start) - (own_end - own_start)) / wall if wall > 0 else 0.0
    cpus = os.cpu_count() or 1
    notes = [*prepared.notes, *skip_notes]
    if any(r.temperature == "cold" and r.resident_before_max and r.resident_before_max > 0.05 for r in rows):
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
