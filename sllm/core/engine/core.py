"""The engine: requests in, tokens streamed out, one batched forward pass per step.

An :class:`Engine` owns one transformers causal LM, its paged KV cache and a background
thread. Each step (:meth:`Engine.step`) the scheduler (``scheduler.py``) picks the
running requests' next tokens (one per decoding request, a chunk of each prefilling one)
within ``max_num_batched_tokens``, admits queued requests when there is room, and preempts
by recompute when KV blocks run out; the runner (``runner.py``) runs them as one forward
pass; then each request that reached the end of its tokens samples its next token
(``sampling.py``), which is appended, streamed to its listener, and checked against its
stop tokens and budget. Requests join and leave between steps (continuous batching).

Each request is a :class:`Generation` whose full token list (prompt + generated) is
first-class state: submitting ``gen.tokens`` with the same :class:`SamplingParams` and
``prompt_len`` to a fresh engine (on this node or another) prefills them and continues
where the original was; preemption does the same inside one engine. The randomness of step
``i`` is :func:`step_seed` ``(seed, i)``. In deterministic mode (``EngineConfig``) a
request's tokens do not depend on what it is batched with, how its prefill was chunked, or
whether it was preempted or resumed (see ``runner.py`` and ``attention.py`` for how); in
the default mode they agree almost always, but floating-point reductions may differ in the
last bits with the batch's shape (README "Determinism").

The engine thread is guarded: a forward pass that raises fails the requests of that step
(finish reason "error") and the engine carries on with the next step; a cancelled request
(:meth:`Generation.cancel`, a client gone) frees its KV blocks at once.

What it does not do: tokenization (the engine takes and returns token ids; text, chat
templates and stop *strings* are the server's, ``sllm/server/text.py``), HTTP, or loading
weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sllm.core.engine.config import DEFAULT_KV_CACHE_BYTES, EngineConfig
from sllm.core.engine.kv import KVStats, PagedKV, kv_bytes_per_block, kv_geometry
from sllm.core.engine.runner import Runner, Work
from sllm.core.engine.sampling import SamplingParams, sample_rows, sample_token
from sllm.core.engine.scheduler import Scheduler, SchedulerConfig, SeqState, blocks_for
from sllm.errors import UsageError

log = logging.getLogger("sllm.engine")
_ids = itertools.count(1)

#: How a generation ended: a stop token, its token budget or the model's context, a cancel
#: (client gone, stop string seen, engine closed), or an exception in the forward pass.
FINISH_REASONS = ("stop", "length", "cancelled", "error")

Listener = Callable[["Generation", "int | None"], None]


@dataclass(frozen=True)
class GenerationState:
    """A snapshot of one unfinished request: what ``/status`` shows and migration sends."""

    id: str
    prompt_tokens: int
    completion_tokens: int


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
        self, request_id: str, tokens: list[int], prompt_len: int, params: SamplingParams, listener: Listener | None,
        engine: Engine | None = None,
    ) -> None:
        self.id = request_id
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.params = params
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._engine = engine
        self._listener = listener
        self._queue: queue.SimpleQueue[int | None] | None = queue.SimpleQueue() if listener is None else None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._caught_up = threading.Event()  # held, and every token but the last is in the cache
        self._hold_next = False  # hold right after the next token is appended (Engine.hold_after_next_token)
        self._paused = threading.Event()

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
        """Stop this request: its KV blocks are freed at once, it ends "cancelled" at the
        engine's next step (its listener hears of it on the engine thread). Idempotent."""
        self._cancelled.set()
        if self._engine is not None:
            self._engine._cancel(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (True) or ``timeout`` seconds pass (False)."""
        return self._done.wait(timeout)

    def wait_caught_up(self, timeout: float | None = None) -> bool:
        """Block until this held request has every token but the last in its KV cache, or
        has finished (True), or ``timeout`` seconds pass (False). See :meth:`Engine.hold`."""
        return self._caught_up.wait(timeout)

    def state(self) -> GenerationState:
        return GenerationState(self.id, self.prompt_len, self.step)

    def _emit(self, token: int | None) -> None:
        if self._listener is not None:
            try:
                self._listener(self, token)
            except Exception:  # a listener that cannot take tokens (its loop closed): stop
                if token is not None:
                    self.cancel()
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
    """Runs the requests of one model, batched step by step over a paged KV cache.

    Args:
        model: a transformers causal LM in eval mode (any device) whose attention goes
            through transformers' ``AttentionInterface``; the engine switches it to its
            paged attention (calls without the engine's batch, e.g. ``generate``, still use SDPA).
        name: a label for the engine thread and messages.
        max_context: the longest token list, tokens (default: from the model's config).
        start: start the background thread that steps requests (default). With False,
            call :meth:`step` yourself (deterministic tests).
        config: batching limits, KV cache size, deterministic mode.

    Thread-safe: :meth:`submit`, :meth:`Generation.cancel`, :meth:`active`,
    :meth:`kv_stats` and :meth:`close` may be called from any thread; listeners run on the
    engine thread and must be quick.

    Raises (constructor):
        UsageError: a bad config, a model the paged cache cannot serve, or a KV cache
            smaller than one block.
    """

    def __init__(self, model: Any, *, name: str = "model", max_context: int | None = None, start: bool = True,
                 config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        config.check()
        self.model = model
        self.name = name
        self.max_context = max_context or context_length(model.config)
        param = next(model.parameters())
        self.device = param.device
        geometry = kv_geometry(model.config, param.dtype)
        self.bytes_per_block = kv_bytes_per_block(geometry, config.block_size)
        num_blocks = self._num_blocks(config)
        if num_blocks < 1:
            raise UsageError(f"kv_cache_bytes {config.kv_cache_bytes}: less than one KV block "
                             f"({self.bytes_per_block} bytes of {config.block_size} tokens)")
        self.kv = PagedKV(geometry, num_blocks, config.block_size, self.device)
        self._runner = Runner(model, self.kv, deterministic=config.deterministic)
        self._sched = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, num_blocks,
                                                config.block_size))
        self._gens: dict[str, Generation] = {}
        self._ended: list[tuple[Generation, str]] = []  # removed from the scheduler, not yet told
        self._cond = threading.Condition(threading.RLock())
        self._step_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=f"sllm-engine-{name}", daemon=True)
            self._thread.start()

    def _num_blocks(self, config: EngineConfig) -> int:
        if config.kv_cache_bytes is not None:
            return config.kv_cache_bytes // self.bytes_per_block
        full = blocks_for(self.max_context or 2048, config.block_size)
        return max(full, min(config.max_num_seqs * full, DEFAULT_KV_CACHE_BYTES // self.bytes_per_block))

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache's blocks (what the node's memory budget counts)."""
        return self.kv.nbytes

    def submit(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        *,
        prompt_len: int | None = None,
        request_id: str | None = None,
        listener: Listener | None = None,
        hold: bool = False,
    ) -> Generation:
        """Queue (or resume) a generation from ``tokens``; it starts when the scheduler admits it.

        Args:
            tokens: the prompt, or to resume, a generation's full token list.
            params: sampling parameters; a None seed is replaced by a random one.
            prompt_len: how many of ``tokens`` are prompt (default all: a new request).
                Resuming passes the original prompt length, so that step indices, seeds and
                the ``max_tokens`` budget continue where they were.
            request_id: default "gen-<n>"; must not be one of this engine's unfinished requests.
            listener: ``listener(gen, token)`` on the engine thread after each token, then
                ``listener(gen, None)`` once when finished. Without one, iterate the result.
            hold: prefill but sample nothing until :meth:`release` (a live migration's
                destination copy, :meth:`hold`).

        Raises:
            UsageError: empty ``tokens``, a bad ``prompt_len``, bad params, a token list that
                fills the model's context, a request that could not fit the KV cache even
                alone, a duplicate id, or a closed engine.
        """
        params.check()
        tokens = [int(t) for t in tokens]
        prompt_len = len(tokens) if prompt_len is None else prompt_len
        if not tokens or not 1 <= prompt_len <= len(tokens):
            raise UsageError(f"{len(tokens)} tokens with prompt_len {prompt_len}: need 1 <= prompt_len <= len(tokens)")
        if self.max_context is not None and len(tokens) >= self.max_context:
            raise UsageError(f"{len(tokens)} tokens: the model's context is {self.max_context} tokens")
        longest = prompt_len + params.max_tokens
        if self.max_context is not None:
            longest = min(longest, self.max_context)
        need = blocks_for(max(longest, len(tokens)), self.config.block_size)
        if need > self.kv.num_blocks:
            raise UsageError(
                f"{max(longest, len(tokens))} tokens need {need} KV blocks of {self.config.block_size} tokens and this "
                f"engine's KV cache holds {self.kv.num_blocks} ({self.kv.nbytes} bytes): lower max_tokens or raise "
                "--kv-cache-memory")
        if params.seed is None and not params.greedy:
            params = dataclasses.replace(params, seed=secrets.randbits(63))
        gen = Generation(request_id or f"gen-{next(_ids)}", tokens, prompt_len, params, listener, self)
        with self._cond:
            if self._closed:
                raise UsageError(f"engine {self.name!r} is closed")
            if gen.id in self._gens:
                raise UsageError(f"request id {gen.id!r} is already running on engine {self.name!r}")
            if gen.step >= params.max_tokens:
                gen.finish_reason = "length"
                gen._done.set()
            else:
                self._gens[gen.id] = gen
                self._sched.add(SeqState(gen.id, len(tokens), held=hold))
                if hold and len(tokens) == 1:
                    gen._caught_up.set()
                self._cond.notify()
        if gen.done:
            gen._emit(None)
        return gen

    def generate(self, tokens: Sequence[int], params: SamplingParams, **kwargs: Any) -> list[int]:
        """Submit and block until done; returns the generated token ids (not the prompt)."""
        gen = self.submit(tokens, params, **kwargs)
        if self._thread is None:
            while not gen.done:
                self.step()
        list(gen)
        return gen.generated

    # -- live migration: hold, extend, release (DESIGN.md "Live migration") ----------------

    def hold(self, gen: Generation) -> int:
        """Stop sampling ``gen`` and return its token count, final until :meth:`release`.

        Waits for a step in progress (at most one step), so no token is appended after this
        returns; the request keeps its KV blocks (and may still prefill). Call it from any
        thread but the engine's (a listener must not).

        Raises:
            UsageError: ``gen`` is not an unfinished request of this engine.
        """
        with self._cond:
            self._seq(gen).held = True
        with self._step_lock:  # a step planned before the hold has finished
            pass
        with self._cond:
            return len(gen.tokens)

    def hold_after_next_token(self, gens: Sequence[Generation], timeout: float = 1.0) -> None:
        """Hold each of ``gens`` right after its next token is appended (decoding ones; the
        others at once), so that a migration's handover starts the moment a token has been
        streamed, not up to a step later. Returns when all are held or finished; after
        ``timeout`` seconds the rest are held at once (:meth:`hold`).

        Raises:
            UsageError: one of ``gens`` is not an unfinished request of this engine.
        """
        now: list[Generation] = []
        with self._cond:
            for gen in gens:
                seq = self._seq(gen)
                gen._paused.clear()
                if seq.held:
                    gen._paused.set()
                elif seq.num_computed == seq.num_tokens - 1:  # decoding: its next step samples
                    gen._hold_next = True
                else:
                    now.append(gen)
        deadline = time.monotonic() + timeout
        for gen in gens:
            if gen not in now and not gen._paused.wait(max(0.0, deadline - time.monotonic())):
                now.append(gen)
        for gen in now:
            with self._cond:
                gen._hold_next = False
                if self._gens.get(gen.id) is gen:
                    self._sched.get(gen.id).held = True
        if now:
            with self._step_lock:
                pass

    def extend(self, gen: Generation, tokens: Sequence[int], *, release: bool = False) -> None:
        """Append ``tokens`` to a held request's token list (a live migration's next delta);
        their prefill is scheduled. With ``release``, also :meth:`release` it in the same
        step: the step that prefills the delta samples the next token.

        Raises:
            UsageError: ``gen`` is not a held, unfinished request of this engine, or the
                tokens would fill the model's context or exceed ``max_tokens``.
        """
        tokens = [int(t) for t in tokens]
        with self._cond:
            seq = self._seq(gen)
            if not seq.held:
                raise UsageError(f"request {gen.id!r} is not held: only a held request is extended")
            total = len(gen.tokens) + len(tokens)
            if self.max_context is not None and total >= self.max_context:
                raise UsageError(f"{total} tokens: the model's context is {self.max_context} tokens")
            if total - gen.prompt_len >= gen.params.max_tokens:
                raise UsageError(f"request {gen.id!r}: {total - gen.prompt_len} generated tokens leave nothing of "
                                 f"its max_tokens {gen.params.max_tokens} to generate")
            if tokens:
                gen.tokens.extend(tokens)
                seq.num_tokens += len(tokens)
                gen._caught_up.clear()
            if release:
                seq.held = False
            elif not seq.remaining:
                gen._caught_up.set()
            self._cond.notify()

    def release(self, gen: Generation) -> None:
        """Let a held request sample again (the migration's handover on the destination, or
        an aborted migration on the source). Idempotent; a finished request is ignored."""
        with self._cond:
            if self._gens.get(gen.id) is gen:
                self._sched.get(gen.id).held = False
                self._cond.notify()

    def _seq(self, gen: Generation) -> SeqState:
        if self._gens.get(gen.id) is not gen:
            raise UsageError(f"request {gen.id!r} is not running on engine {self.name!r}")
        return self._sched.get(gen.id)

    def active(self) -> list[GenerationState]:
        """Snapshots of the unfinished requests (running and queued), in submission order."""
        with self._cond:
            return [g.state() for g in self._gens.values()]

    def kv_stats(self) -> KVStats:
        """The KV cache's blocks and bytes, used and free, and the queue."""
        with self._cond:
            b, s = self._sched.blocks, self._sched
            return KVStats(
                block_size=b.block_size, total_blocks=b.num_blocks, used_blocks=b.num_used,
                bytes_per_block=self.bytes_per_block, total_bytes=b.num_blocks * self.bytes_per_block,
                used_bytes=b.num_used * self.bytes_per_block, free_bytes=b.num_free * self.bytes_per_block,
                running=len(s.running), waiting=len(s.waiting), preemptions=s.preemptions)

    def step(self) -> int:
        """Run one step: tell cancelled requests, plan, one forward pass, sample. Returns
        how many requests the forward pass ran (0: nothing to do)."""
        with self._step_lock:
            with self._cond:
                plan = self._sched.schedule()
                work = [(self._gens[c.id], c) for c in plan.chunks]
                jobs = [Work(g.tokens, c.start, c.num_tokens, tuple(self._sched.blocks.table(c.id)), c.samples)
                        for g, c in work]
            self._tell_ended()
            if not work:
                return 0
            try:
                with torch.inference_mode():
                    logits = self._runner.run(jobs)
            except Exception as exc:  # a failed forward (out of memory, a bad kernel) fails this step's requests
                log.error("engine %s: forward pass failed for %d requests: %s: %s", self.name, len(work),
                          type(exc).__name__, exc)
                for gen, _ in work:
                    self._end(gen, "error", exc)
                self._tell_ended()
                return len(work)
            picks: list[tuple[Generation, int]] = []  # (request, its row of logits)
            row = 0
            with self._cond:
                for gen, c in work:
                    if c.id in self._sched and self._gens.get(c.id) is gen:  # not cancelled meanwhile
                        seq = self._sched.get(c.id)
                        seq.num_computed += c.num_tokens
                        if c.samples:
                            picks.append((gen, row))
                        elif seq.held and not seq.remaining:
                            gen._caught_up.set()
                    row += c.samples
            try:
                tokens = sample_rows(logits[[i for _, i in picks]], [g.params for g, _ in picks],
                                     [g.step for g, _ in picks]) if picks else []
            except Exception:  # a row without finite logits: sample one by one, failing only those
                tokens = []
                for gen, i in picks:
                    try:
                        tokens.append(sample_token(logits[i], gen.params, gen.step))
                    except Exception as exc:
                        self._end(gen, "error", exc)
                        tokens.append(None)
            for (gen, _), token in zip(picks, tokens):
                if token is not None:
                    self._accept(gen, token)
            self._tell_ended()
            return len(work)

    def _accept(self, gen: Generation, token: int) -> None:
        if token in gen.params.stop_token_ids:
            self._end(gen, "stop")
            return
        with self._cond:
            if gen.id not in self._sched:  # cancelled while sampling
                return
            gen.tokens.append(token)
            self._sched.advance(gen.id, 0, 1)
            if self.exhausted(gen):  # ended with this token (a hold waiting for it hears of the end)
                self._end(gen, "length")
            elif gen._hold_next:
                gen._hold_next = False
                self._sched.get(gen.id).held = True
                gen._paused.set()
        gen._emit(token)

    def exhausted(self, gen: Generation, tokens: int | None = None) -> bool:
        """Whether ``gen`` (or a list of ``tokens`` of it) has used its ``max_tokens`` or the
        model's context: it ends with its last token, whatever the engine says yet."""
        n = len(gen.tokens) if tokens is None else tokens
        return n - gen.prompt_len >= gen.params.max_tokens or (self.max_context is not None and n >= self.max_context)

    def _end(self, gen: Generation, reason: str, error: BaseException | None = None) -> None:
        """Remove ``gen`` (its KV freed now); it is told on the engine thread (:meth:`_tell_ended`)."""
        with self._cond:
            if self._gens.get(gen.id) is not gen:
                return
            del self._gens[gen.id]
            self._sched.remove(gen.id)
            if error is not None:
                gen.error = error
            self._ended.append((gen, reason))
            self._cond.notify()

    def _cancel(self, gen: Generation) -> None:
        self._end(gen, "cancelled")

    def _tell_ended(self) -> None:
        with self._cond:
            ended, self._ended = self._ended, []
        for gen, reason in ended:
            if gen.done:
                continue
            gen.finish_reason = reason
            gen._done.set()
            gen._caught_up.set()
            gen._paused.set()
            gen._emit(None)

    def close(self) -> None:
        """Stop the thread; unfinished requests end "cancelled"; free the KV cache. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._cond:
            rest = list(self._gens.values())
        for gen in rest:
            self._end(gen, "cancelled")
        self._tell_ended()
        if self._thread is None or not self._thread.is_alive():  # not from a step of its own thread
            self.kv.free()  # the KV cache's memory now, not when a collection finds the engine's cycles

    def _run(self) -> None:
        while True:
            with self._cond:
                while not len(self._sched) and not self._ended and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                if not self.step():
                    with self._cond:
                        self._cond.wait(0.05)
            except Exception as exc:  # a bug outside the forward pass: fail what runs, keep serving
                log.exception("engine %s: step failed", self.name)
                with self._cond:
                    rest = list(self._gens.values())
                for gen in rest:
                    self._end(gen, "error", exc)
                try:
                    self._tell_ended()
                except Exception:
                    log.exception("engine %s: telling requests of the failure failed", self.name)
