"""Integrations of sllm's checkpoint format and loader with other serving engines.

Each subpackage imports its engine only when that engine calls it (an entry point), so
``import sllm`` and ``sllm --help`` never import one. Nothing here is imported by
``sllm/core`` or ``sllm/io``.
"""
