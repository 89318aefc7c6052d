"""How an engine batches: :class:`EngineConfig`, the ``sllm serve`` flags of the same names.

Plain data, no torch: ``sllm serve`` builds it before anything heavy is imported. What it
does not do: size the KV cache in blocks (the engine does, from the model's geometry).
"""

from __future__ import annotations

from dataclasses import dataclass

from sllm.errors import UsageError

#: KV cache of an engine when its config gives none, bytes (capped at what ``max_num_seqs``
#: full-context requests need, and at least one full context).
DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    """How an engine batches (``sllm serve`` flags of the same names).

    Attributes:
        max_num_seqs: most requests running at once (holding KV); more wait in the queue.
            1 gives the one-request-at-a-time engine. Default 64.
        max_num_batched_tokens: most tokens in one forward pass: every running request's
            next token plus chunks of prefills. Bounds a step's time, so the inter-token
            latency of running requests while a long prompt is prefilled. Default 512.
        kv_cache_bytes: bytes of KV cache (a whole number of blocks is allocated); None:
            :data:`DEFAULT_KV_CACHE_BYTES`, capped at ``max_num_seqs`` full contexts and at
            least one full context.
        block_size: tokens per KV block. Default 16.
        deterministic: a request's tokens do not depend on the batch (row-by-row attention
            and padded row counts; costs throughput). Default False.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    kv_cache_bytes: int | None = None
    block_size: int = 16
    deterministic: bool = False

    def check(self) -> None:
        """Raises: UsageError: a field out of its range."""
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} {getattr(self, name)}: must be >= 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise UsageError(f"kv_cache_bytes {self.kv_cache_bytes}: must be >= 1")
