"""The paged KV cache's storage: per-layer key and value tensors addressed by slot.

A cache of ``num_blocks`` blocks of ``block_size`` tokens is, for each layer, a key and a
value tensor of shape ``(RESERVED_SLOTS + num_blocks * block_size, kv_heads, head_dim)``
in the model's dtype on its device. Token position ``p`` of a request whose block table is
``table`` lives in slot ``RESERVED_SLOTS + table[p // block_size] * block_size + p %
block_size``. Slot 0 is all zeros (what padded reads gather, so that masked positions
never multiply garbage) and slot 1 is where padding rows write; neither belongs to a block.

The tensors are made with ``torch.empty``, so on the CPU a page of memory is touched only
when a token is first written there; the engine counts the whole cache
(:func:`kv_bytes_per_block` times the blocks) in the node's memory budget up front.

What it does not do: decide which request gets which block (``scheduler.py``) or compute
attention (``attention.py``). Models whose layers are not all full attention (sliding
windows, linear-attention layers) are refused: their caches are not this shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sllm.errors import UsageError

#: Slots before the first block: 0 is zeros (padding reads), 1 takes padding writes.
RESERVED_SLOTS = 2
ZERO_SLOT = 0
TRASH_SLOT = 1


@dataclass(frozen=True)
class KVGeometry:
    """The shape of one token's cache entry: ``layers`` x (key, value) x ``kv_heads`` x ``head_dim``."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        """2 (key and value) * layers * kv_heads * head_dim * dtype size, bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize


def kv_geometry(config: Any, dtype: torch.dtype) -> KVGeometry:
    """The cache geometry of a transformers decoder config (transformers' own helpers find
    the KV heads, GQA included, and the head size).

    Raises:
        UsageError: a model with sliding-window or other non-full-attention layers.
    """
    from transformers.generation.continuous_batching.utils import find_head_dim, find_num_key_value_heads

    layer_types = getattr(config, "layer_types", None) or ()
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        raise UsageError(f"{getattr(config, 'model_type', 'this model')}: the engine's paged cache needs full attention "
                         "in every layer (no sliding windows)")
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        raise UsageError(f"{getattr(config, 'model_type', 'this model')}: its config gives no num_hidden_layers")
    return KVGeometry(layers, find_num_key_value_heads(config), find_head_dim(config), dtype)


def kv_bytes_per_block(geometry: KVGeometry, block_size: int) -> int:
    """Bytes of one block: ``block_size`` tokens of :meth:`KVGeometry.bytes_per_token`."""
    return block_size * geometry.bytes_per_token()


@dataclass(frozen=True)
class KVStats:
    """One engine's KV cache and queue, for ``/status``.

    Attributes:
        block_size: tokens per block.
        total_blocks, used_blocks: blocks in the cache, blocks held by running requests.
        bytes_per_block: bytes of one block (all layers, keys and values).
        total_bytes, used_bytes, free_bytes: the same in bytes.
        running, waiting: requests holding KV, requests queued for admission.
        preemptions: requests preempted (KV dropped, to be recomputed) since the start.
    """

    block_size: int
    total_blocks: int
    used_blocks: int
    bytes_per_block: int
    total_bytes: int
    used_bytes: int
    free_bytes: int
    running: int
    waiting: int
    preemptions: int


class PagedKV:
    """The key and value tensors of every layer (see the module docstring for the layout).

    Args:
        geometry: from :func:`kv_geometry`.
        num_blocks: blocks in the cache (>= 1).
        block_size: tokens per block (>= 1).
        device: where the model runs.
    """

    def __init__(self, geometry: KVGeometry, num_blocks: int, block_size: int, device: torch.device) -> None:
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.block_size = block_size
        slots = RESERVED_SLOTS + num_blocks * block_size
        shape = (slots, geometry.kv_heads, geometry.head_dim)
        self.keys = [torch.empty(shape, dtype=geometry.dtype, device=device) for _ in range(geometry.layers)]
        self.values = [torch.empty(shape, dtype=geometry.dtype, device=device) for _ in range(geometry.layers)]
        for t in (*self.keys, *self.values):
            t[:RESERVED_SLOTS].zero_()

    def free(self) -> None:
        """Drop the key and value tensors (the engine closed): their memory goes back at once,
        whether or not the engine's objects wait for the garbage collector."""
        self.keys, self.values = [], []

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (the reserved slots not counted)."""
        return self.num_blocks * kv_bytes_per_block(self.geometry, self.block_size)

    def slots(self, table: list[int], start: int, stop: int) -> list[int]:
        """Slot indices of token positions ``[start, stop)`` of a request with block table ``table``."""
        bs = self.block_size
        return [RESERVED_SLOTS + table[p // bs] * bs + p % bs for p in range(start, stop)]
