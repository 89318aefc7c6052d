"""Per-request sampling: parameters, per-step seeds, and picking one token from one row of logits.

The randomness of generated-token ``i`` of a request seeded ``s`` comes from
:func:`step_seed` ``(s, i)`` through a fresh CPU ``torch.Generator``, never from a
generator's hidden state, so a run resumed from its token list (preemption, migration)
draws exactly what the uninterrupted run would have drawn (DESIGN.md "Engine contract").

Sampling works in float64, on all of a step's rows at once but with row-wise operations
only, so a row's token does not depend on which other rows share the step. What it does
not do: logits processors (repetition penalties, min-p).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sllm.errors import UsageError

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        max_tokens: tokens to generate at most, counted from ``prompt_len`` (so a resumed
            request keeps its original budget). >= 1. Default 16.
        temperature: 0 for greedy (argmax); > 0 divides the logits before the softmax.
            Any positive value is sound: a tiny one (1e-40) behaves as greedy. Default 0.
        top_p: nucleus sampling: keep the most likely tokens whose probabilities sum to at
            least ``top_p`` (0 < top_p <= 1; 1 keeps all). Ignored when greedy.
        seed: the seed of every step's randomness (:func:`step_seed`); None draws a random
            one at submission, recorded in :attr:`Generation.params` so that the run can
            still be resumed identically.
        stop_token_ids: token ids that end the generation (finish reason "stop"); the stop
            token itself is not appended to the token list.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def check(self) -> None:
        """Raises: UsageError: a field out of its range (NaN and infinities included)."""
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens {self.max_tokens}: must be >= 1")
        if not 0 <= self.temperature < float("inf"):
            raise UsageError(f"temperature {self.temperature}: must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step`` (0-based index of the generated token) of a run seeded
    ``seed``: two rounds of splitmix64, 63 bits (what ``torch.Generator.manual_seed`` takes).

    A pure function of its arguments, the same in every process and on every device.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 1


def sample_token(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    """Pick the next token from ``logits`` (shape ``(vocab,)``, any float dtype and device)
    for generated-token index ``step``: :func:`sample_rows` on one row.

    Raises:
        ValueError: sampled logits with no finite maximum (all NaN or -inf).
    """
    return sample_rows(logits.unsqueeze(0), [params], [step])[0]


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]) -> list[int]:
    """Pick one token per row of ``logits`` (shape ``(rows, vocab)``): row ``i`` with
    ``params[i]`` at generated-token index ``steps[i]``.

    Greedy rows: argmax (the first of equal maxima). Sampled rows: in float64, the row
    minus its maximum, divided by its temperature (so nothing overflows: the maximum maps
    to 0 and the rest to values <= 0, -inf at worst, for every temperature > 0; a tiny
    temperature leaves only the argmax, as greedy), then softmax, truncated to the top-p
    nucleus (sorted by probability, stable) when ``top_p < 1``, then the inverse CDF at a
    uniform drawn from a CPU ``torch.Generator`` seeded :func:`step_seed` ``(seed, step)``;
    the draw depends neither on the device nor on earlier steps. Rows are processed
    together (nucleus rows and the others apart), but every operation works row by row
    (sorting, the softmax's per-row reductions, sequential cumulative sums, searches), so a
    row's token does not depend on which other rows share the call.

    Raises:
        ValueError: a sampled row with no finite maximum (all NaN or -inf): the forward pass failed.
    """
    out = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        picks = torch.argmax(logits[greedy] if len(greedy) < len(params) else logits, dim=-1).tolist()
        for i, t in zip(greedy, picks):
            out[i] = int(t)
    for nucleus in (False, True):
        rows = [i for i, p in enumerate(params) if not p.greedy and (p.top_p < 1) == nucleus]
        if rows:
            for i, t in zip(rows, _draw(logits[rows].detach().to("cpu"), [params[i] for i in rows],
                                        [steps[i] for i in rows], nucleus)):
                out[i] = t
    return out


def _draw(x: torch.Tensor, params: list[SamplingParams], steps: list[int], nucleus: bool) -> list[int]:
    """Inverse-CDF draws for rows ``x`` (``(rows, vocab)``, CPU) as :func:`sample_rows` says."""
    order = None
    if nucleus:  # sorting the logits orders the probabilities the same way (ties: lower id first)
        x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    x = x.to(torch.float64)
    top = x.max(dim=-1, keepdim=True).values
    if not bool(torch.isfinite(top).all()):
        raise ValueError("logits have no finite maximum: the forward pass produced NaN or inf")
    temperature = torch.tensor([[p.temperature] for p in params], dtype=torch.float64)
    probs = torch.softmax((x - top) / temperature, dim=-1)
    if nucleus:
        top_p = torch.tensor([[p.top_p] for p in params], dtype=torch.float64)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        probs = torch.where(mass_before < top_p, probs, torch.zeros_like(probs))
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.tensor([[float(torch.rand((), generator=torch.Generator().manual_seed(step_seed(p.seed or 0, s)),
                                        dtype=torch.float64))] for p, s in zip(params, steps)], dtype=torch.float64)
    # the first index whose CDF exceeds u * total has probability > 0; it rounds to the total at worst
    picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].tolist()
    out = []
    for j, k in enumerate(picks):
        if k >= cdf.shape[1]:
            k = int(torch.nonzero(probs[j]).flatten()[-1])
        out.append(int(order[j, k]) if order is not None else int(k))
    return out
