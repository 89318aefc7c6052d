"""Bytes in and out: parallel reads, O_DIRECT, page-cache eviction, host buffers, atomic writes.

Knows nothing of models. The only place where ``OSError`` becomes an sllm error.
"""
