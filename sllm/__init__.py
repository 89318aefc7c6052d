"""sllm: low-latency serverless LLM inference.

Public API (imported lazily, so ``import sllm`` and ``sllm --help`` do not import torch):

- :func:`load_state_dict` (path, device="cpu", *, threads, direct_io, verify) -> dict[str, Tensor]
- :func:`load_model` (path, device="cpu", ...) -> transformers.PreTrainedModel, eval mode
- :func:`release` (model or state dict): give its host buffers back to the pool
- :func:`convert` (src, dst, ...) -> ConvertResult
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_state_dict": "sllm.core.loader",
    "load_model": "sllm.core.loader",
    "load_checkpoint": "sllm.core.loader",
    "release": "sllm.core.loader",
    "convert": "sllm.core.convert",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sllm' has no attribute {name!r}")
