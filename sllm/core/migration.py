"""Live migration's protocol: token-based and multi-round (ServerlessLLM §5), as plain data.

A running generation moves from a source node S to a destination node D by sending its
*tokens*, not its KV cache (4 bytes a token instead of about 0.5 MiB a token for a 7B model):
D recomputes the cache by prefilling them. The server runs the steps
(``sllm/server/migration.py``); this module decides them and checks what arrives.

1. **Prepare.** D makes the model resident through its tiers; S keeps decoding.
2. **Copy.** Round 0: S sends each request's token list, prompt length and sampling
   parameters (the seed recorded at submission, so sampled runs continue their random
   stream); D submits them *held* (prefilled, nothing sampled) while S keeps decoding.
3. **Rounds.** S sends the tokens generated since the last round; D prefills them (the
   round's answer comes once D has caught up). Repeated until at most ``delta`` tokens are
   new for every request, or ``max_rounds`` rounds after round 0 are spent.
4. **Handover.** S pauses the requests (no token is appended after the pause), sends the
   final delta with each request's length and :func:`token_digest`; D checks that it holds
   exactly S's tokens, releases its copies (the step that prefills the final delta samples
   the next token) and streams the tokens it generates, each with its position; S drops
   its KV and relays them to the client.

Text does not travel: the node the client is connected to keeps its detokenizer and its
stop-string check (the held-back bytes and stop-string prefix stay where they are), and D
sends token ids with their positions; a stop string found there cancels D's copy.

``max_rounds = 0`` is stop-and-copy: pause at once and send everything in the final round.
Every request of a model on S may move at once (D batches them). A request that ends on S
while it is copied is dropped from the migration (D cancels its copy).

What arrives is checked before use: a delta must start where D's copy ends (its offset is
D's length), ids and lengths are bounded, token ids are non-negative and below the
vocabulary, and the handover's lengths and digests must match D's copies, else
:class:`~sllm.errors.MigrationError` and the migration aborts (S carries on).

Failure safety lives in the runner: before the handover S still decodes (or, paused, still
holds its KV) and resumes on any error; after it, the node relaying the stream keeps every
token it relayed and resumes from that list if D dies (the engine's resume-from-tokens).

What it does not do: HTTP, engines, or timing (the runner measures and passes times in).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sllm.errors import MigrationError

#: Rounds after round 0 before the handover, when the caller gives none (Llumnix caps
#: pre-copy at 3 stages; ServerlessLLM has no cap).
DEFAULT_MAX_ROUNDS = 3
#: Hand over once at most this many tokens per request are new: the final delta is then
#: prefilled in the same step that samples the next token, so the pause is about one step
#: plus two loopback round trips. ``benchmarks/migration.py --lengths 1024 --delta D`` on the
#: CI machine's CPU: the gap across the handover 55.6, 57.1 and 59.8 ms for D = 1, 4 and 8
#: (flat), D = 1 needing one more round more often; 4 is the middle.
DEFAULT_DELTA = 4
#: Most requests in one migration, and most tokens in one request's list.
MAX_REQUESTS = 4096
MAX_TOKENS = 1 << 20
#: Longest request id, characters.
MAX_ID_CHARS = 128

PHASES = ("prepare", "copy", "handover", "done", "aborted")


def token_digest(tokens: Sequence[int]) -> str:
    """SHA-256 (hex) of ``tokens`` as little-endian uint32s: what the handover compares."""
    return hashlib.sha256(struct.pack(f"<{len(tokens)}I", *tokens)).hexdigest()


@dataclass(frozen=True)
class RequestCopy:
    """One request's part of a round (the wire form, JSON).

    Attributes:
        id: the request id (the same on both nodes).
        start: the position of ``tokens[0]`` in the request's token list: 0 in the first
            round that carries the request, else the length D already holds.
        tokens: token ids ``[start, start + len)``.
        prompt_len: the prompt's tokens (first round only; else None).
        params: the sampling parameters, :class:`~sllm.core.engine.SamplingParams` fields
            with the seed resolved (first round only; else None).
        length, digest: the handover's check (final round only): the total token count
            and :func:`token_digest` of the whole list.
    """

    id: str
    start: int
    tokens: tuple[int, ...]
    prompt_len: int | None = None
    params: dict[str, Any] | None = None
    length: int | None = None
    digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "start": self.start, "tokens": list(self.tokens)}
        for name in ("prompt_len", "params", "length", "digest"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class Round:
    """One message from S to D: round ``index`` (0 is the first copy), its requests' deltas,
    the requests dropped (ended on S), and whether it is the handover (``final``)."""

    index: int
    requests: tuple[RequestCopy, ...]
    final: bool = False
    drop: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Tokens this round carries."""
        return sum(len(r.tokens) for r in self.requests)

    @property
    def nbytes(self) -> int:
        """Bytes of token ids this round carries (4 per token, as ``token_digest`` packs them)."""
        return 4 * self.num_tokens

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "final": self.final, "drop": list(self.drop),
                "requests": [r.to_json() for r in self.requests]}


def _int(obj: Mapping[str, Any], key: str, lo: int, hi: int, what: str) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise MigrationError(f"{what}: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def parse_round(obj: Any, *, vocab_size: int | None = None) -> Round:
    """A :class:`Round` from its JSON, every field checked.

    Raises:
        MigrationError: a missing or mistyped field, an id over :data:`MAX_ID_CHARS`, more
            than :data:`MAX_REQUESTS` requests or :data:`MAX_TOKENS` tokens, a token id
            that is negative or not below ``vocab_size``, a duplicate id.
    """
    if not isinstance(obj, Mapping):
        raise MigrationError("round: a JSON object expected")
    index = _int(obj, "index", 0, 1 << 30, "round")
    reqs, drop = obj.get("requests", []), obj.get("drop", [])
    if not isinstance(reqs, list) or len(reqs) > MAX_REQUESTS:
        raise MigrationError(f"round {index}: requests must be a list of at most {MAX_REQUESTS}")
    if not isinstance(drop, list) or not all(isinstance(d, str) and len(d) <= MAX_ID_CHARS for d in drop):
        raise MigrationError(f"round {index}: drop must be a list of request ids")
    top = vocab_size if vocab_size is not None else 1 << 32
    out: list[RequestCopy] = []
    for r in reqs:
        if not isinstance(r, Mapping) or not isinstance(r.get("id"), str) or not 0 < len(r["id"]) <= MAX_ID_CHARS:
            raise MigrationError(f"round {index}: each request needs an id of 1 to {MAX_ID_CHARS} characters")
        rid = r["id"]
        what = f"round {index}, request {rid!r}"
        start = _int(r, "start", 0, MAX_TOKENS, what)
        toks = r.get("tokens")
        if not isinstance(toks, list) or len(toks) > MAX_TOKENS or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < top for t in toks):
            raise MigrationError(f"{what}: tokens must be a list of token ids in [0, {top})")
        prompt_len = _int(r, "prompt_len", 1, MAX_TOKENS, what) if "prompt_len" in r else None
        params = r.get("params")
        if params is not None and not isinstance(params, Mapping):
            raise MigrationError(f"{what}: params must be an object")
        length = _int(r, "length", 1, MAX_TOKENS, what) if "length" in r else None
        digest = r.get("digest")
        if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
            raise MigrationError(f"{what}: digest must be 64 hex characters")
        out.append(RequestCopy(rid, start, tuple(toks), prompt_len, dict(params) if params else None, length, digest))
    if len({r.id for r in out}) != len(out):
        raise MigrationError(f"round {index}: a request id appears twice")
    return Round(index, tuple(out), bool(obj.get("final", False)), tuple(drop))


def check_round(rnd: Round, held: Mapping[str, Sequence[int]]) -> None:
    """D's check of a round against its copies ``held`` (request id -> its token list).

    A request D does not hold must arrive whole (start 0, with prompt_len and params, and
    ``prompt_len <= len(tokens)``); one it holds must continue it (start == its length). In
    the final round every request D holds and does not drop must be named, with a length and
    a digest equal to D's copy after the delta.

    Raises:
        MigrationError: the first mismatch, naming the request.
    """
    for r in rnd.requests:
        have = held.get(r.id)
        if have is None:
            if r.start != 0 or r.prompt_len is None or r.params is None:
                raise MigrationError(f"request {r.id!r}: not held here; its first round must carry its whole "
                                     "token list (start 0), prompt_len and params")
            if not r.tokens or r.prompt_len > len(r.tokens):
                raise MigrationError(f"request {r.id!r}: prompt_len {r.prompt_len} with {len(r.tokens)} tokens")
        elif r.start != len(have):
            raise MigrationError(f"request {r.id!r}: delta starts at {r.start}, the copy here has {len(have)} tokens")
    if not rnd.final:
        return
    named = {r.id: r for r in rnd.requests}
    for rid in held:
        if rid in rnd.drop:
            continue
        r = named.get(rid)
        if r is None or r.length is None or r.digest is None:
            raise MigrationError(f"request {rid!r}: the handover must give its length and digest")
    for r in rnd.requests:
        if r.length is None or r.digest is None:
            raise MigrationError(f"request {r.id!r}: the handover must give its length and digest")
        full = list(held.get(r.id, ())) + list(r.tokens)
        if len(full) != r.length or token_digest(full) != r.digest:
            raise MigrationError(f"request {r.id!r}: the copy here ({len(full)} tokens) differs from the source's "
                                 f"({r.length} tokens)")


@dataclass
class RoundRecord:
    """What one round carried and took: ``tokens`` sent, the most ``lag`` (new tokens of
    one request) it closed, and its ``seconds`` from send to D's answer."""

    index: int
    tokens: int
    lag: int
    final: bool
    seconds: float = 0.0


@dataclass
class SourceMigration:
    """S's side of one migration, as a state machine over plain data.

    Args:
        migration_id: its id (both nodes use it). model: the model's name.
        delta: hand over once at most this many tokens per request are new (>= 0).
        max_rounds: rounds after round 0 before handing over regardless (>= 0; 0 is
            stop-and-copy).

    Drive it with :meth:`next_round` (S's current token lists in, the round to send out),
    :meth:`acked` after D answers, and :meth:`abort`. ``sent`` is what D holds.

    Raises (constructor):
        MigrationError: a negative ``delta`` or ``max_rounds``.
    """

    migration_id: str
    model: str
    delta: int = DEFAULT_DELTA
    max_rounds: int = DEFAULT_MAX_ROUNDS
    phase: str = "prepare"
    sent: dict[str, int] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    error: str | None = None
    converged: bool | None = None  # handed over because at most delta tokens were new (not the cap)

    def __post_init__(self) -> None:
        if self.delta < 0 or self.max_rounds < 0:
            raise MigrationError(f"delta {self.delta}, max_rounds {self.max_rounds}: both must be >= 0")

    def prepared(self) -> None:
        """D has the model resident: copying starts."""
        self._expect("prepare")
        self.phase = "copy"

    def should_hand_over(self, current: Mapping[str, int]) -> bool:
        """Whether the next round is the handover: stop-and-copy, ``max_rounds`` rounds after
        round 0 spent, or (after round 0) at most ``delta`` new tokens for every request."""
        if self.max_rounds == 0 or len(self.rounds) > self.max_rounds:
            return True
        return bool(self.rounds) and self.lag(current) <= self.delta

    def lag(self, current: Mapping[str, int]) -> int:
        """The most tokens S has beyond what D holds, over the requests still migrating."""
        return max((n - self.sent.get(rid, 0) for rid, n in current.items()), default=0)

    def next_round(self, tokens: Mapping[str, Sequence[int]], *, final: bool,
                   prompt_lens: Mapping[str, int] | None = None,
                   params: Mapping[str, Mapping[str, Any]] | None = None) -> Round:
        """The round to send: each request's tokens beyond what D holds.

        Args:
            tokens: each migrating request's whole token list on S now (requests that ended
                on S are left out and dropped).
            final: the handover (S has paused the requests: the lists are final); each
                request then carries its length and digest.
            prompt_lens, params: for requests D does not hold yet (round 0).

        Raises:
            MigrationError: called outside the copy phase, a request list shorter than what
                D holds, or a request new to D without its prompt length and parameters.
        """
        self._expect("copy")
        if final and self.max_rounds:
            self.converged = bool(self.rounds) and self.lag({rid: len(t) for rid, t in tokens.items()}) <= self.delta
        drop = tuple(rid for rid in self.sent if rid not in tokens)
        reqs = []
        for rid, toks in tokens.items():
            start = self.sent.get(rid, 0)
            if len(toks) < start:
                raise MigrationError(f"request {rid!r}: {len(toks)} tokens on the source, {start} sent")
            first = rid not in self.sent
            if first and (prompt_lens is None or rid not in prompt_lens or params is None or rid not in params):
                raise MigrationError(f"request {rid!r}: its first round needs its prompt length and parameters")
            reqs.append(RequestCopy(
                rid, start, tuple(toks[start:]),
                prompt_lens[rid] if first else None, dict(params[rid]) if first else None,  # type: ignore[index]
                len(toks) if final else None, token_digest(toks) if final else None))
        rnd = Round(len(self.rounds), tuple(reqs), final, drop)
        lag = max((len(r.tokens) for r in reqs if r.start), default=0)
        self.rounds.append(RoundRecord(rnd.index, rnd.num_tokens, lag, final))
        if final:
            self.phase = "handover"
        return rnd

    def acked(self, rnd: Round, seconds: float) -> None:
        """D answered ``rnd`` after ``seconds``: it holds the tokens sent. The handover's
        answer ends the migration ("done")."""
        for r in rnd.requests:
            self.sent[r.id] = r.start + len(r.tokens)
        for rid in rnd.drop:
            self.sent.pop(rid, None)
        self.rounds[rnd.index].seconds = seconds
        if rnd.final:
            self.phase = "done"

    def abort(self, why: str) -> None:
        """The migration cannot finish (S keeps or resumes the requests); ``why`` is recorded."""
        if self.phase not in ("done", "aborted"):
            self.phase, self.error = "aborted", why

    def _expect(self, phase: str) -> None:
        if self.phase != phase:
            raise MigrationError(f"migration {self.migration_id}: in phase {self.phase!r}, not {phase!r}")
