"""The decode loop: prefill, then one token per step, for many requests on one model.

An :class:`Engine` owns one transformers causal LM and a background thread that steps
every active request in turn: a new request is prefilled (its whole token list in one
forward pass, filling its KV cache), then each round advances every active request by
exactly one token. No request waits for another's whole generation: with ``n`` active
requests a token costs at most one step of each of the others.

Each request is a :class:`Generation` whose full token list (prompt + generated) is
first-class state. Generation is resumable from that list alone: submitting
``gen.tokens`` with the same :class:`SamplingParams` and ``prompt_len`` to a fresh engine
(on this node or another) prefills them and continues exactly where the original was.
That holds for sampled runs too, because the randomness of step ``i`` comes from
:func:`step_seed` ``(seed, i)`` through a fresh ``torch.Generator``, never from a
generator's hidden state (live migration, DESIGN.md "Live migration").

What it does not do: tokenization (the engine takes and returns token ids; text, chat
templates and stop *strings* are the server's, ``sllm/server/text.py``), HTTP, loading
weights, or batching: each forward pass runs one request (batch 1), which keeps greedy
output token-identical to ``transformers``' ``generate(do_sample=False)`` and a resumed
run identical to an uninterrupted one. Batching the decode steps of several requests
would raise throughput on a GPU; it is the next step, not this module's.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sllm.errors import UsageError

_MASK64 = (1 << 64) - 1
_ids = itertools.count(1)

#: How a generation ended: a stop token, its token budget or the model's context, a cancel
#: (client gone, stop string seen, engine closed), or an exception in the forward pass.
FINISH_REASONS = ("stop", "length", "cancelled", "error")

Listener = Callable[["Generation", "int | None"], None]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        max_tokens: tokens to generate at most, counted from ``prompt_len`` (so a resumed
            request keeps its original budget). >= 1. Default 16.
        temperature: 0 for greedy (argmax); > 0 divides the logits before the softmax.
            Default 0.
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
        """Raises: UsageError: a field out of its range."""
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens {self.max_tokens}: must be >= 1")
        if not self.temperature >= 0:
            raise UsageError(f"temperature {self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationState:
    """A snapshot of one active request: what ``/status`` shows and migration sends."""

    id: str
    prompt_tokens: int
    completion_tokens: int


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
    """Pick the next token from ``logits`` (shape ``(vocab,)``) for generated-token index ``step``.

    Greedy: argmax. Sampled: softmax(logits / temperature) in float32, truncated to the
    top-p nucleus (sorted by probability, stable), then the inverse CDF at a uniform drawn
    from a CPU ``torch.Generator`` seeded :func:`step_seed` ``(params.seed, step)``; the
    draw does not depend on the device or on earlier steps.
    """
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    sorted_p, order = torch.sort(probs, descending=True, stable=True)
    if params.top_p < 1:
        mass_before = torch.cumsum(sorted_p, 0) - sorted_p
        sorted_p = torch.where(mass_before < params.top_p, sorted_p, torch.zeros_like(sorted_p))
    cdf = torch.cumsum(sorted_p, 0)
    gen = torch.Generator().manual_seed(step_seed(params.seed or 0, step))
    u = float(torch.rand((), generator=gen, dtype=torch.float64)) * float(cdf[-1])
    i = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype, device=cdf.device)))
    kept = int(torch.count_nonzero(sorted_p))
    return int(order[min(i, kept - 1)])


class Generation:
    """One request: its token list, its parameters, and how it ended.

    Attributes:
        id: request id (unique in the process unless given).
        tokens: prompt + generated token ids so far; only the engine thread appends.
        prompt_len: how many of ``tokens`` are the prompt.
        params: the sampling parameters, with the seed resolved.
        finish_reason: None while running, else one of :data:`FINISH_REASONS`.
        error: the exception that ended it when ``finish_reason == "error"``.

    Without a listener, iterate it to receive token ids as they are generated (blocking);
    the iteration raises the forward pass's exception, if any, at the end.
    """

    def __init__(
        self, request_id: str, tokens: list[int], prompt_len: int, params: SamplingParams, listener: Listener | None
    ) -> None:
        self.id = request_id
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.params = params
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cache: Any = None  # transformers Cache: per layer K, V of shape (1, heads, len(tokens)-1, head_dim)
        self._listener = listener
        self._queue: queue.SimpleQueue[int | None] | None = queue.SimpleQueue() if listener is None else None
        self._cancelled = threading.Event()
        self._done = threading.Event()

    @property
    def generated(self) -> list[int]:
        """The generated token ids (``tokens[prompt_len:]``)."""
        return self.tokens[self.prompt_len :]

    @property
    def step(self) -> int:
        """Index of the next token to generate: how many have been generated."""
        return len(self.tokens) - self.prompt_len

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next turn (finish reason "cancelled")."""
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (True) or ``timeout`` seconds pass (False)."""
        return self._done.wait(timeout)

    def state(self) -> GenerationState:
        return GenerationState(self.id, self.prompt_len, self.step)

    def _emit(self, token: int | None) -> None:
        if self._listener is not None:
            try:
                self._listener(self, token)
            except Exception:  # a listener that cannot take tokens (its loop closed): stop
                self._cancelled.set()
        else:
            assert self._queue is not None
            self._queue.put(token)

    def __iter__(self) -> Iterator[int]:
        if self._queue is None:
            raise TypeError("a Generation with a listener is not iterable")
        while (token := self._queue.get()) is not None:
            yield token
        if self.error is not None:
            raise self.error


def context_length(config: Any) -> int | None:
    """The model's maximum sequence length, tokens, from its transformers config (None if unknown)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Engine:
    """Runs the requests of one model, interleaved one token at a time.

    Args:
        model: a transformers causal LM in eval mode (any device).
        name: a label for the engine thread and messages.
        max_context: the longest token list, tokens (default: from the model's config).
        start: start the background thread that steps requests (default). With False,
            call :meth:`step` yourself (deterministic tests).

    Thread-safe: :meth:`submit`, :meth:`cancel`, :meth:`active` and :meth:`close` may be
    called from any thread; listeners run on the engine thread and must be quick.
    """

    def __init__(self, model: Any, *, name: str = "model", max_context: int | None = None, start: bool = True) -> None:
        self.model = model
        self.name = name
        self.max_context = max_context or context_length(model.config)
        self.device = next(model.parameters()).device
        self._active: list[Generation] = []
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=f"sllm-engine-{name}", daemon=True)
            self._thread.start()

    def submit(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        *,
        prompt_len: int | None = None,
        request_id: str | None = None,
        listener: Listener | None = None,
    ) -> Generation:
        """Start (or resume) a generation from ``tokens``.

        Args:
            tokens: the prompt, or to resume, a generation's full token list.
            params: sampling parameters; a None seed is replaced by a random one.
            prompt_len: how many of ``tokens`` are prompt (default all: a new request).
                Resuming passes the original prompt length, so that step indices, seeds and
                the ``max_tokens`` budget continue where they were.
            request_id: default "gen-<n>".
            listener: ``listener(gen, token)`` on the engine thread after each token, then
                ``listener(gen, None)`` once when finished. Without one, iterate the result.

        Raises:
            UsageError: empty ``tokens``, a bad ``prompt_len``, bad params, a token list that
                fills the model's context, or a closed engine.
        """
        params.check()
        tokens = [int(t) for t in tokens]
        prompt_len = len(tokens) if prompt_len is None else prompt_len
        if not tokens or not 1 <= prompt_len <= len(tokens):
            raise UsageError(f"{len(tokens)} tokens with prompt_len {prompt_len}: need 1 <= prompt_len <= len(tokens)")
        if self.max_context is not None and len(tokens) >= self.max_context:
            raise UsageError(f"{len(tokens)} tokens: the model's context is {self.max_context} tokens")
        if params.seed is None and not params.greedy:
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        gen = Generation(request_id or f"gen-{next(_ids)}", tokens, prompt_len, params, listener)
        with self._cond:
            if self._closed:
                raise UsageError(f"engine {self.name!r} is closed")
            if gen.step >= params.max_tokens:
                self._finish(gen, "length")
                return gen
            self._active.append(gen)
            self._cond.notify()
        return gen

    def generate(self, tokens: Sequence[int], params: SamplingParams, **kwargs: Any) -> list[int]:
        """Submit and block until done; returns the generated token ids (not the prompt)."""
        gen = self.submit(tokens, params, **kwargs)
        if self._thread is None:
            while not gen.done:
                self.step()
        list(gen)
        return gen.generated

    def active(self) -> list[GenerationState]:
        """Snapshots of the unfinished requests, in submission order."""
        with self._cond:
            return [g.state() for g in self._active]

    def step(self) -> int:
        """Advance every active request by one token (prefilling new ones). Returns how many ran."""
        with self._cond:
            batch = list(self._active)
        with self._step_lock, torch.inference_mode():
            for gen in batch:
                self._advance(gen)
        return len(batch)

    def close(self) -> None:
        """Stop the thread; unfinished requests end "cancelled". Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._cond:
            rest, self._active = self._active, []
        for gen in rest:
            self._finish(gen, "cancelled")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._active and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            self.step()

    def _advance(self, gen: Generation) -> None:
        """One forward pass for ``gen`` (prefill when it has no cache), one token appended."""
        if gen._cancelled.is_set():
            self._finish(gen, "cancelled")
            return
        try:
            if gen.cache is None:  # prefill: input (1, len(tokens))
                ids = torch.tensor([gen.tokens], dtype=torch.long, device=self.device)
            else:  # decode: input (1, 1), the cache holds the rest
                ids = torch.tensor([[gen.tokens[-1]]], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, past_key_values=gen.cache, use_cache=True)
            gen.cache = out.past_key_values
            token = sample_token(out.logits[0, -1], gen.params, gen.step)
        except Exception as exc:  # a failed forward pass (e.g. out of memory) ends only this request
            gen.error = exc
            self._finish(gen, "error")
            return
        if token in gen.params.stop_token_ids:
            self._finish(gen, "stop")
            return
        gen.tokens.append(token)
        gen._emit(token)
        if gen.step >= gen.params.max_tokens or (self.max_context is not None and len(gen.tokens) >= self.max_context):
            self._finish(gen, "length")

    def _finish(self, gen: Generation, reason: str) -> None:
        if gen.done:
            return
        gen.finish_reason = reason
        gen.cache = None
        with self._cond:
            if gen in self._active:
                self._active.remove(gen)
        gen._done.set()
        gen._emit(None)
