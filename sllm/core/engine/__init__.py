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

The public names are re-exported here: ``from sllm.core.engine import Engine``.
"""

from sllm.core.engine.core import (
    DEFAULT_KV_CACHE_BYTES,
    FINISH_REASONS,
    Engine,
    EngineConfig,
    Generation,
    GenerationState,
    Listener,
    context_length,
)
from sllm.core.engine.kv import KVStats
from sllm.core.engine.sampling import SamplingParams, sample_token, step_seed

__all__ = [
    "DEFAULT_KV_CACHE_BYTES",
    "FINISH_REASONS",
    "Engine",
    "EngineConfig",
    "Generation",
    "GenerationState",
    "KVStats",
    "Listener",
    "SamplingParams",
    "context_length",
    "sample_token",
    "step_seed",
]
