"""Loader benchmark: sllm against the usual ways of loading the same model, side by side.

For one model, ``sllm load-bench`` times, in the same run, *state-dict-ready* and
*model-ready* for sllm's loader (first load of a fresh process, with a reserved pool, and
from the page cache), safetensors, Run:ai Model Streamer, fastsafetensors, tensorizer,
``torch.load`` (plain and ``mmap=True``, always ``weights_only=True``) and
``transformers.from_pretrained``, cold (page cache evicted) and warm, plus the floor: a raw
O_DIRECT read of the same bytes into already-touched memory. Every (method, run) pair runs
in a fresh subprocess.

The package is split by concern: :mod:`~sllm.core.bench.methods` (the method registry and
how each peer loads), :mod:`~sllm.core.bench.orchestrate` (file preparation and the worker
processes), :mod:`~sllm.core.bench.worker` (one measurement, in the child), and
:mod:`~sllm.core.bench.results` (aggregation and targets). It measures and aggregates; it
never asserts on time and does not print or plot: the ``sllm load-bench`` command renders
:class:`BenchResult`. It imports neither rich nor typer, nor torch at import time.
"""

from __future__ import annotations

from sllm.core.bench.methods import LOADERS, METHODS, PEERS, Method, method_loader, select_methods
from sllm.core.bench.orchestrate import (
    WORKER_TIMEOUT_SECONDS,
    BenchConfig,
    Prepared,
    available_methods,
    prepare,
    run_bench,
    run_worker_process,
)
from sllm.core.bench.results import (
    TARGET_COLD_SPEEDUP,
    TARGET_COLD_VS_RAW,
    TARGET_WARM_SPEEDUP,
    BenchResult,
    Row,
    Target,
    aggregate,
    targets,
)
from sllm.core.bench.worker import worker_main

__all__ = [
    "LOADERS", "METHODS", "PEERS", "TARGET_COLD_SPEEDUP", "TARGET_COLD_VS_RAW", "TARGET_WARM_SPEEDUP",
    "WORKER_TIMEOUT_SECONDS", "BenchConfig", "BenchResult", "Method", "Prepared", "Row", "Target", "aggregate",
    "available_methods", "method_loader", "prepare", "run_bench", "run_worker_process", "select_methods", "targets",
    "worker_main",
]  # fmt: skip
