"""sllm inside vLLM, without a patch.

``register`` is the ``vllm.general_plugins`` entry point (pyproject.toml): vLLM calls it in
every engine process, and it registers ``--load-format sllm``
(:class:`sllm.integrations.vllm.loader.SllmModelLoader`) with
``vllm.model_executor.model_loader.register_model_loader``. Importing this package imports
neither vLLM nor torch; the loader module does, when vLLM calls ``register``.
"""

from __future__ import annotations

LOAD_FORMAT = "sllm"


def register() -> None:
    """Register ``--load-format sllm`` with vLLM (idempotent: vLLM may call it more than once)."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

    from sllm.integrations.vllm.loader import SllmModelLoader

    if _LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT) is not SllmModelLoader:
        register_model_loader(LOAD_FORMAT)(SllmModelLoader)
