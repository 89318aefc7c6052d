"""Per-request sampling: parameters, per-step seeds, and picking one token from one row of logits.

The randomness of generated-token ``i`` of a request seeded ``s`` comes from
:func:`step_seed` ``(s, i)`` through a fresh CPU ``torch.Generator``, never from a
generator's hidden state, so a run resumed from its token list (preemption, migration)
draws exactly what the uninterrupted run would have drawn (DESIGN.md "Engine contract").

Sampling works on one row at a time, in float64, so a row's token does not depend on
which other rows share the step. What it does not do: logits processors (repetition
penalties, min-p), or anything batched over rows; the engine calls it once per sampled row.
"""

from __future__ import annotations

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
    for generated-token index ``step``.

    Greedy: argmax (the first of equal maxima). Sampled: in float64, the logits minus
    their maximum, divided by the temperature (so nothing overflows: the maximum maps to
    0 and the rest to values <= 0, -inf at worst, for every temperature > 0; a tiny
    temperature leaves only the argmax, as greedy), then softmax, truncated to the top-p
    nucleus (sorted by probability, stable) when ``top_p < 1``, then the inverse CDF at a
    uniform drawn from a CPU ``torch.Generator`` seeded :func:`step_seed` ``(params.seed,
    step)``; the draw depends neither on the device nor on earlier steps.

    Raises:
        ValueError: logits with no finite maximum (all NaN or -inf): the forward pass failed.
    """
    if params.greedy:
        return int(torch.argmax(logits))
    x = logits.detach().to("cpu")
    order = None
    if params.top_p < 1:  # sorting the logits orders the probabilities the same way, ties included
        x, order = torch.sort(x, descending=True, stable=True)
    x = x.to(torch.float64)
    top = torch.max(x)
    if not torch.isfinite(top):
        raise ValueError(f"logits have no finite maximum ({float(top)}): the forward pass produced NaN or inf")
    probs = torch.softmax((x - top) / params.temperature, dim=-1)
    if order is not None:
        mass_before = torch.cumsum(probs, 0) - probs
        probs = torch.where(mass_before < params.top_p, probs, torch.zeros_like(probs))
    cdf = torch.cumsum(probs, 0)
    gen = torch.Generator().manual_seed(step_seed(params.seed or 0, step))
    u = float(torch.rand((), generator=gen, dtype=torch.float64)) * float(cdf[-1])
    # the first index whose CDF exceeds u has probability > 0; u rounds to cdf[-1] at worst
    i = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True))
    if i >= len(cdf):
        i = int(torch.nonzero(probs).flatten()[-1])
    return int(order[i]) if order is not None else i
