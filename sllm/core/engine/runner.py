"""One engine step on the model: a step plan's chunks in, the sampled rows' logits out.

Builds the packed batch of a step (token ids, positions, KV slots, what each row attends
to: :class:`~sllm.core.engine.attention.PagedBatch`) and runs the transformers model once
with it, keeping only the logits of the rows that sample (``logits_to_keep``). The model's
attention implementation is switched to :data:`~sllm.core.engine.attention.ATTENTION_NAME`
when the runner is made; the model's forward gets ``cache=None`` and ``use_cache=False``
(the deprecated ``past_key_values`` argument is never passed: the cache is sllm's).

Deterministic mode pads the row count to a multiple of :data:`ROW_MULTIPLE` (padding rows
write to the trash slot and attend to nothing), because the BLAS matrix multiply gives a
row the same bits for every row count that is such a multiple, and different ones below
it (measured with MKL on x86-64: a 1-row product takes a matrix-vector path); together
with row-by-row attention, a row's logits are then a function of its request alone.

What it does not do: choose the chunks (``scheduler.py``) or sample (``sampling.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sllm.core.engine.attention import ATTENTION_NAME, PagedBatch, PrefillGroup, register
from sllm.core.engine.kv import TRASH_SLOT, ZERO_SLOT, PagedKV
from sllm.errors import UsageError

#: Deterministic mode pads a step's rows (and its logit rows) to a multiple of this.
ROW_MULTIPLE = 4


@dataclass(frozen=True)
class Work:
    """One request's chunk, with what the runner needs: its tokens (prompt + generated),
    positions ``[start, start + n)`` to run, its block table, whether it samples."""

    tokens: Sequence[int]
    start: int
    n: int
    table: Sequence[int]
    samples: bool


class Runner:
    """Runs packed steps of one model over one :class:`PagedKV`.

    Raises (constructor):
        UsageError: a model whose attention does not go through transformers'
            ``AttentionInterface`` (it cannot use the paged cache).
    """

    def __init__(self, model: Any, kv: PagedKV, *, deterministic: bool = False) -> None:
        register()
        if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
            if not model._can_set_attn_implementation():
                raise UsageError(f"{type(model).__name__}: its attention does not use transformers' AttentionInterface")
            model.set_attn_implementation(ATTENTION_NAME)
        self.model = model
        self.kv = kv
        self.deterministic = deterministic
        self.device = kv.keys[0].device
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device)  # 4D: transformers builds none

    def batch(self, work: Sequence[Work]) -> tuple[PagedBatch, list[int], list[int], list[int]]:
        """The step's attention metadata, token ids, positions and logit rows."""
        kv, ids, pos, wslots, logit_rows = self.kv, [], [], [], []
        dec_rows: list[int] = []
        dec_slots: list[list[int]] = []
        batch = PagedBatch(kv, torch.empty(0), deterministic=self.deterministic)
        row = 0
        for w in work:
            stop = w.start + w.n
            ids.extend(w.tokens[w.start : stop])
            pos.extend(range(w.start, stop))
            slots = kv.slots(list(w.table), 0, stop)
            wslots.extend(slots[w.start :])
            if self.deterministic:
                st = torch.tensor(slots, dtype=torch.long, device=self.device)
                batch.rows.extend((row + i, st[: w.start + i + 1]) for i in range(w.n))
            elif w.n == 1:
                dec_rows.append(row)
                dec_slots.append(slots)
            else:
                batch.prefills.append(PrefillGroup(row, w.n, w.start, torch.tensor(slots, device=self.device)))
            if w.samples:
                logit_rows.append(row + w.n - 1)
            row += w.n
        if self.deterministic:
            pad = -row % ROW_MULTIPLE
            ids += [0] * pad
            pos += [0] * pad
            wslots += [TRASH_SLOT] * pad
        if dec_rows:
            longest = max(map(len, dec_slots))
            batch.decode_rows = torch.tensor(dec_rows, device=self.device)
            batch.decode_slots = torch.tensor([s + [ZERO_SLOT] * (longest - len(s)) for s in dec_slots],
                                              device=self.device)
            if any(len(s) < longest for s in dec_slots):
                lengths = torch.tensor([len(s) for s in dec_slots], device=self.device)
                mask = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]
                batch.decode_mask = mask[:, None, None, :]
        batch.write_slots = torch.tensor(wslots, dtype=torch.long, device=self.device)
        return batch, ids, pos, logit_rows

    def run(self, work: Sequence[Work]) -> torch.Tensor:
        """One forward pass over ``work``; returns the logits ``(S, vocab)`` of the chunks
        that sample, in order (S may be 0)."""
        batch, ids, pos, logit_rows = self.batch(work)
        keep = list(logit_rows) or [0]
        if self.deterministic:
            keep += [keep[-1]] * (-len(keep) % ROW_MULTIPLE)
        kwargs: dict[str, Any] = {}
        if self._keep:
            kwargs["logits_to_keep"] = torch.tensor(keep, device=self.device)
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([pos], device=self.device),
            attention_mask=self._mask,
            use_cache=False,
            sllm_batch=batch,
            **kwargs,
        )
        logits = out.logits[0]
        if not self._keep:
            logits = logits[torch.tensor(keep, device=self.device)]
        return logits[: len(logit_rows)]
