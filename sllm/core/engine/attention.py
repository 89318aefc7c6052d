"""Paged attention over packed rows, plugged into transformers' attention registry.

The engine runs one forward pass per step over a packed batch: the new tokens of every
scheduled request side by side as one sequence of ``T`` rows (input ``(1, T)``, explicit
``position_ids``). transformers' model code does everything but attention (embeddings,
projections, MLPs, norms, the LM head); for attention each layer calls the function
registered under :data:`ATTENTION_NAME` in ``transformers.AttentionInterface`` (the
library's extension point for attention kernels), which is :func:`paged_attention`. It
receives the layer's new queries, keys and values, writes the keys and values into the
:class:`~sllm.core.engine.kv.PagedKV` slots of their rows, and attends each row to its own
request's cached prefix. The per-step metadata travels as the ``sllm_batch`` keyword, which
transformers passes through to the attention function unchanged. A call without it (for
example ``model.generate`` on the same model) falls back to transformers' SDPA attention.

Two ways to attend, chosen per step (:class:`PagedBatch`):

- fast (default): the decode rows of all requests in one SDPA call over keys padded to the
  longest (padding masked, read from the zero slot), each prefill chunk in one causal SDPA
  call. Floating-point reductions then depend on the batch's shape: a row's result can
  differ in the last bits with what runs beside it.
- deterministic: every row attends in its own SDPA call over exactly its own prefix
  (query ``(1, H, 1, D)``, keys ``(1, H_kv, p + 1, D)``), so its result is a function of
  that request's tokens alone, whether it is a decode row, a prefill row, batched or alone.

What it does not do: choose rows or blocks (``scheduler.py``, ``runner.py``), or touch the
linear layers (the runner pads the row count instead, see ``runner.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sllm.core.engine.kv import PagedKV

#: The name under which :func:`paged_attention` is registered with transformers.
ATTENTION_NAME = "sllm_paged"


@dataclass
class PrefillGroup:
    """One request's prefill chunk: packed rows ``[row, row + n)`` at positions
    ``[start, start + n)``; ``slots`` (``(start + n,)``) hold its positions ``0 .. start+n-1``."""

    row: int
    n: int
    start: int
    slots: torch.Tensor


@dataclass
class PagedBatch:
    """Where each packed row's keys and values go, and what each row attends to.

    Attributes:
        kv: the cache.
        write_slots: ``(T,)`` int64: the slot of each row (padding rows: the trash slot).
        deterministic: attend row by row (see the module docstring).
        decode_rows: ``(R,)`` int64 rows that are a request's only row this step (fast mode).
        decode_slots: ``(R, L)`` int64 their prefixes' slots, padded with the zero slot.
        decode_mask: ``(R, 1, 1, L)`` bool, True where a key is real; None without padding.
        prefills: the other requests' chunks (fast mode).
        rows: ``(row, slots of positions 0..p)`` for every real row (deterministic mode).
    """

    kv: PagedKV
    write_slots: torch.Tensor
    deterministic: bool = False
    decode_rows: torch.Tensor | None = None
    decode_slots: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None
    prefills: list[PrefillGroup] = field(default_factory=list)
    rows: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> torch.Tensor:
        """Write this layer's keys/values, attend; ``query`` ``(1, H, T, D)``, ``key``/``value``
        ``(1, H_kv, T, D)``; returns ``(1, T, H, D)`` (padding rows zero)."""
        kc, vc = self.kv.keys[layer], self.kv.values[layer]
        kc.index_copy_(0, self.write_slots, key[0].transpose(0, 1))
        vc.index_copy_(0, self.write_slots, value[0].transpose(0, 1))
        q = query[0].transpose(0, 1)  # (T, H, D)
        out = torch.zeros_like(q)
        extra = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
        if self.deterministic:
            for row, slots in self.rows:
                k = kc.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # (1, H_kv, p+1, D)
                v = vc.index_select(0, slots).transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(q[row].unsqueeze(0).unsqueeze(2), k, v, scale=scaling, **extra)
                out[row] = o[0, :, 0]
            return out.unsqueeze(0)
        if self.decode_rows is not None:
            r, length = self.decode_slots.shape
            k = kc.index_select(0, self.decode_slots.flatten()).view(r, length, *kc.shape[1:]).transpose(1, 2)
            v = vc.index_select(0, self.decode_slots.flatten()).view(r, length, *vc.shape[1:]).transpose(1, 2)
            qd = q.index_select(0, self.decode_rows).unsqueeze(2)  # (R, H, 1, D)
            o = F.scaled_dot_product_attention(qd, k, v, attn_mask=self.decode_mask, scale=scaling, **extra)
            out.index_copy_(0, self.decode_rows, o[:, :, 0])
        for g in self.prefills:
            k = kc.index_select(0, g.slots).transpose(0, 1).unsqueeze(0)  # (1, H_kv, start+n, D)
            v = vc.index_select(0, g.slots).transpose(0, 1).unsqueeze(0)
            qp = q[g.row : g.row + g.n].transpose(0, 1).unsqueeze(0)  # (1, H, n, D)
            if g.start == 0:
                o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scaling, **extra)
            else:  # query i (position start+i) sees keys 0 .. start+i
                mask = torch.arange(g.start + g.n, device=q.device)[None, :] <= (
                    g.start + torch.arange(g.n, device=q.device)[:, None])
                o = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scaling, **extra)
            out[g.row : g.row + g.n] = o[0].transpose(0, 1)
        return out.unsqueeze(0)


def paged_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (``AttentionInterface``): with an
    ``sllm_batch`` keyword, paged attention (:meth:`PagedBatch.attend`); without, SDPA."""
    batch: PagedBatch | None = kwargs.pop("sllm_batch", None)
    if batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return batch.attend(module.layer_idx, query, key, value, scaling), None


def register() -> None:
    """Register :func:`paged_attention` (and SDPA's mask builder, for calls without a batch)
    under :data:`ATTENTION_NAME`; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
