"""Warm-up of a serving process: the work a first cold start would otherwise pay once.

:func:`import_model_code` imports the transformers code of a checkpoint's architecture
(about 2 s the first time, DESIGN.md "Checkpoint format"), one thread at a time;
:func:`warm_device` runs a first forward pass's kernels on small tensors;
:func:`freeze_heap` takes what has been imported and loaded out of the garbage collector's
view, and :class:`UnloadCollection` collects unloaded models' garbage when no cold start
waits. All are optimisations: failures are logged at debug level and left for the load to report. It
knows nothing of models' lifecycle (``models.py``) or HTTP.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("sllm.server")

_import_lock = threading.Lock()


def import_model_code(path: Path) -> None:
    """Import the transformers code that loading ``path`` needs, one thread at a time.

    transformers' lazy module is not safe to import from two threads at once (one of them
    sees a half-initialised module: "cannot import name 'AutoConfig'"), and a load runs the
    loader and the tokenizer in two threads. Failures are left for the load to report.
    """
    import importlib
    import json

    with _import_lock:
        try:
            import transformers
            from transformers import AutoConfig, AutoTokenizer  # noqa: F401

            config = json.loads((path / "config.json").read_text())
            mtype = str(config.get("model_type", "")).replace("-", "_")
            importlib.import_module(f"transformers.models.{mtype}.modeling_{mtype}")
            for name in config.get("architectures") or []:
                getattr(transformers, name, None)
        except Exception:  # an optimisation and a guard, not a check
            log.debug("importing the code of %s failed", path, exc_info=True)


def warm_device(device: str) -> None:
    """Run the kernels of a first forward pass once on small tensors of ``device``, so the
    first cold start does not pay one-time initialisation (the CUDA context, cuBLAS
    handles, lazy kernel loading: about 0.4-1 s on an H100; math library set-up on a CPU).
    Failures are ignored: the load reports real problems."""
    try:
        import torch
        import torch.nn.functional as F

        dev = torch.device(device)
        with torch.inference_mode():
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                x = torch.randn(2, 8, 64, device=dev, dtype=dtype)
                w = torch.randn(64, 64, device=dev, dtype=dtype)
                y = F.layer_norm(F.gelu(F.linear(x, w)), (64,)) + F.relu(x).softmax(-1)
                q = y.view(2, 8, 4, 16).transpose(1, 2)
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
                torch.argmax(F.embedding(torch.tensor([[1, 2]], device=dev), w), dim=-1).tolist()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception:
        log.debug("warming %s failed", device, exc_info=True)


_freezing = False


def enable_heap_freezing() -> None:
    """Let :func:`freeze_heap` act: ``sllm serve`` owns its process's collector; a program
    that embeds the server keeps its own (and the test suite its)."""
    global _freezing
    _freezing = True


def freeze_heap(*, collect: bool = True, thaw: bool = False) -> None:
    """Move every object to the collector's permanent generation (``gc.freeze``), so that
    full collections stop scanning them.

    A serving process holds about 250,000 objects (torch, transformers, the models' modules);
    a full collection scans them all, about 140 ms with every thread stopped on this
    project's CI machine: a pause in every stream (and the longest gap of a live migration,
    whose rounds allocate). Called with ``collect`` after the warm-up (at start), without it
    after a load (instant: nothing on the cold start's path), and with ``thaw`` after an
    unload, in a background thread: unfreeze, so that the model's and its engine's cyclic
    garbage (KV cache tensors among it) is collected, then collect and freeze again. Does
    nothing until :func:`enable_heap_freezing`.
    """
    if not _freezing:
        return
    if thaw:
        gc.unfreeze()
    if collect:
        gc.collect()
    gc.freeze()


def warm_up(dirs: Callable[[], list[Path]], device: str) -> None:
    """A node's warm-up at start (blocking; run it in a thread): the transformers code of
    every checkpoint in ``dirs()``, the device's first kernels, then the heap frozen."""
    for path in dirs():
        import_model_code(path)
    warm_device(device)
    freeze_heap()


#: The longest an unload's collection waits for the node to be quiet, seconds.
COLLECT_DEFER_SECONDS = 10.0


class UnloadCollection:
    """The full collection an unload needs (:func:`freeze_heap` with ``thaw``: the model's and
    its engine's cyclic garbage), held back while a cold start is under way. It stops every
    thread for about 140 ms, and a load that unloaded an idle model to make room in the
    budget would otherwise wait it out before its first token (0.19-0.22 s of each such cold
    start on a 2-core VM, through ``sllm serve``).

    Args:
        submit: runs a function in a background thread (the node's metadata threads).
        clock: monotonic seconds.

    :meth:`unloaded` marks garbage; :meth:`poll` (from the event loop, after an unload, a
    cold start's first token, and each reaper tick) submits the collection when the node is
    not ``busy``, or once it has waited :data:`COLLECT_DEFER_SECONDS`.
    """

    def __init__(self, submit: Callable[..., Any], clock: Callable[[], float] = time.monotonic) -> None:
        self._submit, self._clock = submit, clock
        self.since: float | None = None  # when the oldest uncollected unload happened

    def unloaded(self) -> None:
        """An unload left garbage to collect (any thread)."""
        if self.since is None:
            self.since = self._clock()

    def poll(self, busy: bool) -> bool:
        """Submit the collection if garbage waits and the node is quiet (or it waited long
        enough); True when it did."""
        if self.since is None or (busy and self._clock() - self.since < COLLECT_DEFER_SECONDS):
            return False
        self.since = None
        self._submit(freeze_heap, thaw=True)
        return True
