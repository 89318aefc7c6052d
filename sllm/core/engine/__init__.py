"""The engine: continuous batching of one model's requests over a paged KV cache.

Modules, in the order a step uses them:

- ``scheduler.py``: plain state in, a step plan out (which requests run how many tokens,
  which are admitted or preempted, the KV block tables); no torch.
- ``kv.py``: the paged cache's tensors and geometry, and the stats ``/status`` shows.
- ``attention.py``: the attention function registered with transformers' attention
  registry, which writes and reads the paged cache.
- ``runner.py``: one packed forward pass per step.
- ``sampling.py``: per-request sampling with per-step seeds.
- ``core.py``: :class:`Engine` and :class:`Generation`, the thread and the contract.

- ``config.py``: :class:`EngineConfig` (no torch).

The public names are re-exported here, imported on first use: ``from sllm.core.engine
import Engine``.
"""

import importlib
from typing import Any

_WHERE = {
    "DEFAULT_KV_CACHE_BYTES": "config",
    "EngineConfig": "config",
    "FINISH_REASONS": "core",
    "Engine": "core",
    "Generation": "core",
    "GenerationState": "core",
    "Listener": "core",
    "context_length": "core",
    "KVStats": "kv",
    "SamplingParams": "sampling",
    "sample_rows": "sampling",
    "sample_token": "sampling",
    "step_seed": "sampling",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:  # lazy (PEP 562): ``engine.config`` imports without torch
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
