"""Live migration, the destination's side: take a model's requests over from another node.

:class:`IncomingMigrations` keeps one :class:`Incoming` per migration this node receives:

1. :meth:`IncomingMigrations.prepare` leases the model (loading it through the tiers like
   any request; a load that fails is a 503 and the source carries on).
2. :meth:`IncomingMigrations.round` checks a round (:func:`sllm.core.migration.check_round`)
   and applies it to the model's engine: a request new here is submitted *held* (prefilled,
   nothing sampled), a known one extended by its delta. A non-final round is answered once
   every copy has caught up (its tokens but the last are in the KV cache); the final round
   (the handover) is verified against the source's lengths and digests and then releases
   the copies in the same engine call, so the step that prefills the final delta samples
   the next token.
3. :meth:`IncomingMigrations.stream` sends the tokens the copies generate, each with its
   position in the request's token list, and each request's end. The engine's listener
   queues them, so nothing is lost between the handover and the stream's reader.

Everything allocated here (the lease, the held requests' KV blocks) is freed when the
migration ends whichever way: every request finished, an abort, the stream closed early,
or :data:`~sllm.server.migration.IDLE_SECONDS` without a message before the handover.

It knows the engine and the model manager; it knows nothing of the source's clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sllm.core.engine import SamplingParams
from sllm.core.migration import check_round, parse_round
from sllm.errors import MigrationError, UsageError
from sllm.server.migration import IDLE_SECONDS, ROUND_SECONDS, MigrationLog, MigrationRecord, ndjson
from sllm.server.models import Lease, ModelManager

log = logging.getLogger("sllm.server")

_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
#: Seconds a round's copies may take to catch up before the round fails (within the
#: source's own timeout for the round).
CATCH_UP_SECONDS = ROUND_SECONDS - 5


class UnknownMigration(MigrationError):
    """No migration of that id is in progress here (404)."""


@dataclass(eq=False)
class Incoming:
    """One migration this node receives: its lease, its copies, the events for the stream."""

    id: str
    model: str
    lease: Lease
    record: MigrationRecord
    gens: dict[str, Any] = field(default_factory=dict)  # request id -> Generation
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    live: bool = False  # handed over: the copies generate
    streaming: bool = False
    ended: bool = False
    last_message: float = field(default_factory=time.monotonic)
    busy: int = 0  # rounds being applied (a long prefill is not silence)
    unfinished: set[str] = field(default_factory=set)


def sampling_params(obj: dict[str, Any], rid: str) -> SamplingParams:
    """:class:`SamplingParams` from a round's ``params``.

    Raises:
        MigrationError: an unknown field, a wrong type or a value out of range.
    """
    unknown = set(obj) - _PARAM_FIELDS
    if unknown:
        raise MigrationError(f"request {rid!r}: unknown sampling parameters {sorted(unknown)}")
    try:
        params = SamplingParams(**{**obj, "stop_token_ids": tuple(int(t) for t in obj.get("stop_token_ids", ()))})
        params.check()
    except (TypeError, ValueError, UsageError) as exc:
        raise MigrationError(f"request {rid!r}: bad sampling parameters: {exc}") from exc
    if params.seed is None and not params.greedy:
        raise MigrationError(f"request {rid!r}: a sampled request must carry its seed")
    return params


class IncomingMigrations:
    """The migrations this node receives (module docstring). Event-loop only."""

    def __init__(self, manager: ModelManager, log_: MigrationLog) -> None:
        self.manager, self.log = manager, log_
        self.active: dict[str, Incoming] = {}
        self._watchdog: asyncio.Task | None = None

    def get(self, mid: str) -> Incoming:
        inc = self.active.get(mid)
        if inc is None:
            raise UnknownMigration(f"migration {mid!r}: not in progress on this node")
        return inc

    async def prepare(self, mid: str, model: str, source: str) -> dict[str, Any]:
        """Step 1: make ``model`` resident and hold a lease on it for the migration.

        Raises:
            MigrationError: the id is in use. ModelNotFound, ModelLoadFailed, ShuttingDown:
            from the lease (the route maps them to 404 and 503).
        """
        if mid in self.active:
            raise MigrationError(f"migration {mid!r}: already in progress on this node")
        rec = MigrationRecord(mid, "in", model, source, [])
        t0 = time.monotonic()
        lease = await self.manager.acquire(model)
        if mid in self.active:  # prepared twice concurrently
            self.manager.release(lease)
            raise MigrationError(f"migration {mid!r}: already in progress on this node")
        if not hasattr(lease.resident.engine, "extend"):
            self.manager.release(lease)
            raise MigrationError(f"{model!r} runs on an engine without live migration here (--backend sllm has it)")
        self.active[mid] = Incoming(mid, model, lease, self.log.start(rec))
        rec.phase = "copy"
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        return {"id": mid, "model": model, "load_seconds": time.monotonic() - t0,
                "kv_free_bytes": lease.resident.engine.kv_stats().free_bytes}

    async def round(self, mid: str, body: Any) -> dict[str, Any]:
        """Steps 2-4: apply one round; answers each copy's token count.

        Raises:
            UnknownMigration: no such migration. MigrationError: a round that does not
            continue the copies (offsets, digests), bad parameters, or the engine refusing
            a request (KV cache too small, context); the migration is then aborted here.
        """
        inc = self.get(mid)
        inc.last_message = time.monotonic()
        engine = inc.lease.resident.engine
        try:
            if inc.live:
                raise MigrationError(f"migration {mid!r}: already handed over")
            rnd = parse_round(body, vocab_size=getattr(inc.lease.resident.model.config, "vocab_size", None))
            check_round(rnd, {rid: g.tokens for rid, g in inc.gens.items()})
            for rid in rnd.drop:
                gen = inc.gens.pop(rid, None)
                inc.unfinished.discard(rid)
                if gen is not None:
                    gen.cancel()
            loop = asyncio.get_running_loop()
            for r in rnd.requests:
                gen = inc.gens.get(r.id)
                if gen is None:
                    params = sampling_params(r.params or {}, r.id)
                    listener = self._listener(loop, inc)
                    gen = engine.submit(r.tokens, params, prompt_len=r.prompt_len, request_id=r.id,
                                        listener=listener, hold=True)
                    inc.gens[r.id] = gen
                    inc.unfinished.add(r.id)
                    inc.record.requests.append(r.id)
                    if rnd.final:
                        engine.release(gen)
                else:
                    engine.extend(gen, r.tokens, release=rnd.final)
            inc.record.rounds.append({"index": rnd.index, "tokens": rnd.num_tokens, "final": rnd.final})
            inc.record.bytes_sent += rnd.nbytes
            if rnd.final:
                inc.live = True
                inc.record.phase = "handover"
                for gen in inc.gens.values():
                    engine.release(gen)
                self._maybe_done(inc)
            else:
                inc.busy += 1
                try:
                    await asyncio.to_thread(_wait_caught_up, list(inc.gens.values()), CATCH_UP_SECONDS)
                finally:
                    inc.busy -= 1
        except (MigrationError, UsageError) as exc:
            self.abort(mid, str(exc))
            raise MigrationError(str(exc)) from exc
        inc.last_message = time.monotonic()
        return {"id": mid, "index": rnd.index, "lengths": {rid: len(g.tokens) for rid, g in inc.gens.items()}}

    async def stream(self, mid: str) -> AsyncIterator[bytes]:
        """Step 4's tokens, NDJSON (module docstring of ``migration.py``). Closing it before
        every request finished cancels the rest and ends the migration here.

        Raises:
            UnknownMigration: no such migration. MigrationError: a stream is already open.
        """
        inc = self.get(mid)
        if inc.streaming:
            raise MigrationError(f"migration {mid!r}: its stream is already open")
        inc.streaming = True

        async def lines() -> AsyncIterator[bytes]:
            try:
                yield ndjson({"id": None, "open": mid})
                while True:
                    ev = await inc.events.get()
                    if ev is None:
                        return
                    yield ndjson(ev)
            finally:
                if not inc.ended:
                    self.abort(mid, "the source closed the token stream", outcome="failed" if inc.live else "aborted")

        return lines()

    def cancel(self, mid: str, ids: list[str]) -> int:
        """Cancel some requests of a migration (their client went away on the relay node)."""
        inc = self.get(mid)
        n = 0
        for rid in ids:
            gen = inc.gens.get(rid)
            if gen is not None and not gen.done:
                gen.cancel()
                n += 1
        return n

    def abort(self, mid: str, why: str, *, outcome: str = "aborted") -> bool:
        """End a migration here: cancel its copies (their KV freed at once), give the lease
        back, close the stream. Idempotent; False when there was none."""
        inc = self.active.pop(mid, None)
        if inc is None:
            return False
        inc.ended = True
        for gen in inc.gens.values():
            gen.cancel()
        self.manager.release(inc.lease)
        inc.events.put_nowait(None)
        self.log.end(inc.record, outcome, why)
        log.info("migration %s in: %s (%s)", mid, outcome, why)
        return True

    def _listener(self, loop: asyncio.AbstractEventLoop, inc: Incoming) -> Any:
        def listener(gen: Any, token: int | None) -> None:  # engine thread: the position is final here
            if token is not None:
                ev: dict[str, Any] = {"id": gen.id, "pos": len(gen.tokens) - 1, "token": token}
            else:
                err = f"{type(gen.error).__name__}: {gen.error}" if gen.error is not None else None
                ev = {"id": gen.id, "finish_reason": gen.finish_reason, "error": err}
            loop.call_soon_threadsafe(self._on_event, inc, ev)

        return listener

    def _on_event(self, inc: Incoming, ev: dict[str, Any]) -> None:  # event loop
        if inc.ended and "finish_reason" in ev:
            return  # the copies an abort cancelled
        inc.events.put_nowait(ev)
        if "finish_reason" in ev:
            inc.unfinished.discard(ev["id"])
            self._maybe_done(inc)

    def _maybe_done(self, inc: Incoming) -> None:
        if inc.live and not inc.unfinished and not inc.ended:
            inc.ended = True
            self.active.pop(inc.id, None)
            self.manager.release(inc.lease)
            inc.events.put_nowait(None)
            self.log.end(inc.record, "done")

    async def _watch(self) -> None:
        """Abort migrations whose source went quiet before the handover, or never opened the
        stream after it."""
        while self.active:
            await asyncio.sleep(min(1.0, IDLE_SECONDS / 4))
            now = time.monotonic()
            for mid, inc in list(self.active.items()):
                quiet = now - inc.last_message > IDLE_SECONDS and not inc.busy
                if quiet and (not inc.live or not inc.streaming):
                    self.abort(mid, f"no message from the source for {IDLE_SECONDS:.0f} s")

    def close(self) -> None:
        for mid in list(self.active):
            self.abort(mid, "this node is shutting down")


def _wait_caught_up(gens: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for gen in gens:
        if not gen.wait_caught_up(max(0.0, deadline - time.monotonic())):
            raise MigrationError(f"request {gen.id!r}: not caught up after {timeout:.0f} s")
