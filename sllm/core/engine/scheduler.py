"""The engine's step scheduler: plain state in, a step plan out (no torch, no model).

Iteration-level scheduling (Orca, OSDI 2022) with chunked prefill under a per-step token
budget and recompute preemption, after vLLM's v1 scheduler
(``vllm/v1/core/sched/scheduler.py``) and its block manager
(``vllm/v1/core/kv_cache_manager.py``):

- A request is a :class:`SeqState`: how many tokens it has (prompt + generated) and how
  many of them have their keys and values in the cache (``num_computed``). A step runs
  ``tokens[num_computed : num_computed + n]`` of each scheduled request; when that reaches
  the end of its tokens the step samples its next token. Prefill, decode and resuming from
  a token list are the same operation.
- Each step, :meth:`Scheduler.schedule` gives the running requests their tokens first,
  decodes (one token left) before partial prefills, each in admission order, within
  ``max_num_batched_tokens``; then, if nothing was preempted, it admits waiting requests
  in order (first come, first served; no overtaking) while there are fewer than
  ``max_num_seqs`` running, budget left, and KV blocks for their first chunk.
- KV memory is :class:`BlockManager` blocks of ``block_size`` tokens. When a running
  request needs a block and none is free, the most recently admitted running request is
  preempted: its blocks are freed, its token list kept, and it goes back to the front of
  the queue, to be prefilled again later (vLLM's recompute preemption; the same
  mechanism live migration uses).

What it does not do: run the model, sample, or know about cancellation other than being
told (:meth:`Scheduler.remove`). The caller reports each step's outcome with
:meth:`Scheduler.advance`.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold ``num_tokens`` tokens: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Fixed-size KV blocks: a free list and each request's block table.

    Block ids are ``0 .. num_blocks-1``; block ``b`` holds token positions
    ``[k * block_size, (k + 1) * block_size)`` of the request whose table has ``b`` at
    index ``k``. Freed blocks are reused lowest id first (deterministic).

    Raises (constructor):
        ValueError: ``num_blocks`` or ``block_size`` < 1.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks {num_blocks}, block_size {block_size}: both must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def table(self, seq_id: str) -> list[int]:
        """The blocks of ``seq_id`` in position order (empty when it holds none)."""
        return self._tables.get(seq_id, [])

    def missing(self, seq_id: str, num_tokens: int) -> int:
        """How many more blocks ``seq_id`` needs to hold ``num_tokens`` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.table(seq_id)))

    def grow(self, seq_id: str, num_tokens: int) -> bool:
        """Give ``seq_id`` the blocks to hold ``num_tokens`` tokens; False (and nothing
        allocated) when not enough are free."""
        need = self.missing(seq_id, num_tokens)
        if need > len(self._free):
            return False
        if need:
            table = self._tables.setdefault(seq_id, [])
            table.extend(self._free.pop() for _ in range(need))
        return True

    def free(self, seq_id: str) -> int:
        """Return every block of ``seq_id`` to the free list; how many were freed."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(table)
        self._free.sort(reverse=True)
        return len(table)


@dataclass(eq=False)
class SeqState:
    """The scheduler's view of one request.

    Attributes:
        id: request id (unique among the scheduler's requests).
        num_tokens: prompt + generated tokens so far.
        num_computed: leading tokens whose keys and values are in the cache.
        arrival: admission priority (lower first); set by :meth:`Scheduler.add`.
        held: sample nothing: the request's tokens but the last are prefilled and it then
            waits, keeping its KV, until released (live migration: the destination's copy
            before the handover, the source's requests during it).
    """

    id: str
    num_tokens: int
    num_computed: int = 0
    arrival: int = -1
    held: bool = False

    @property
    def target(self) -> int:
        """Tokens to have in the cache before this request's next step: all of them, or
        all but the last while held (that one runs with the step that samples)."""
        return self.num_tokens - 1 if self.held else self.num_tokens

    @property
    def remaining(self) -> int:
        """Tokens to run before the next token can be sampled (or, held, before it is caught up)."""
        return max(0, self.target - self.num_computed)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine's steps (vLLM's names).

    Attributes:
        max_num_seqs: most requests running (holding KV) at once; >= 1.
        max_num_batched_tokens: most tokens in one forward pass (decode tokens plus
            prefill chunks); >= 1.
        num_blocks: KV blocks in the cache; >= 1.
        block_size: tokens per KV block; >= 1.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    num_blocks: int
    block_size: int


@dataclass(frozen=True)
class Chunk:
    """One request's share of a step: tokens ``[start, start + num_tokens)`` run, and
    ``samples`` says whether the step then picks its next token."""

    id: str
    start: int
    num_tokens: int
    samples: bool


@dataclass(frozen=True)
class StepPlan:
    """What one step runs. ``chunks`` in batch order; ``preempted``: requests whose KV
    this plan dropped (back in the queue); ``admitted``: requests it started."""

    chunks: tuple[Chunk, ...] = ()
    preempted: tuple[str, ...] = ()
    admitted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(eq=False)
class Scheduler:
    """Running and waiting requests, their KV blocks, and the policy that plans each step."""

    config: SchedulerConfig
    running: list[SeqState] = field(default_factory=list)
    waiting: deque[SeqState] = field(default_factory=deque)
    preemptions: int = 0

    def __post_init__(self) -> None:
        c = self.config
        if c.max_num_seqs < 1 or c.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs {c.max_num_seqs}, max_num_batched_tokens {c.max_num_batched_tokens}: >= 1")
        self.blocks = BlockManager(c.num_blocks, c.block_size)
        self._arrivals = itertools.count()
        self._by_id: dict[str, SeqState] = {}

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, seq_id: str) -> SeqState:
        return self._by_id[seq_id]

    def add(self, seq: SeqState) -> None:
        """Queue a new request (its ``num_computed`` is reset: it holds no KV yet).

        Raises:
            ValueError: an id already queued or running.
        """
        if seq.id in self._by_id:
            raise ValueError(f"request {seq.id!r} is already scheduled")
        seq.num_computed = 0
        seq.arrival = next(self._arrivals)
        self._by_id[seq.id] = seq
        self.waiting.append(seq)

    def remove(self, seq_id: str) -> bool:
        """Forget a request (finished or cancelled) and free its KV blocks at once; False
        if it was not there."""
        seq = self._by_id.pop(seq_id, None)
        if seq is None:
            return False
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq_id)
        return True

    def advance(self, seq_id: str, num_computed: int, appended: int) -> None:
        """Record a step's outcome: ``num_computed`` more tokens are in the cache and
        ``appended`` tokens (0 or 1) were added to the request's list."""
        seq = self._by_id[seq_id]
        seq.num_computed += num_computed
        seq.num_tokens += appended

    def _preempt(self, seq: SeqState) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.id)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> StepPlan:
        """Plan the next step (allocating the KV blocks it writes, preempting if short)."""
        budget = self.config.max_num_batched_tokens
        planned: dict[str, Chunk] = {}
        preempted: list[str] = []
        for seq in sorted(self.running, key=lambda s: (s.remaining > 1, s.arrival)):
            if budget == 0:
                break
            if seq not in self.running or not seq.remaining:  # preempted in this loop, or held and caught up
                continue
            n = min(seq.remaining, budget)
            while not self.blocks.grow(seq.id, seq.num_computed + n):
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim)
                preempted.append(victim.id)
                if victim.id in planned:
                    budget += planned.pop(victim.id).num_tokens
                if victim is seq:
                    break
            else:
                planned[seq.id] = Chunk(seq.id, seq.num_computed, n, not seq.held and seq.num_computed + n == seq.num_tokens)
                budget -= n
        admitted: list[str] = []
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.remaining, budget)
            if not self.blocks.grow(seq.id, n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            if n:  # (a held request of one token has nothing to run yet)
                planned[seq.id] = Chunk(seq.id, 0, n, not seq.held and n == seq.num_tokens)
            admitted.append(seq.id)
            budget -= n
        return StepPlan(tuple(planned.values()), tuple(preempted), tuple(admitted))
