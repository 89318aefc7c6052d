"""Live migration, the source's side: move this node's requests of a model to another node.

:func:`migrate_out` runs :class:`sllm.core.migration.SourceMigration`'s steps against a
:class:`~sllm.server.migration.Peer`: prepare (D loads the model while this node keeps
decoding), open D's token stream, round 0 and the catch-up rounds, then the handover:
pause the requests (``Engine.hold``: no token is appended after it returns), send the
final delta with lengths and digests, and on D's answer switch each request's
:class:`~sllm.server.requests.Completion` to a :class:`RemoteGeneration` fed by the
:class:`Relay` and drop the local copies (their KV freed, the lease given back, so the
model may unload).

The client's connection stays here (or on the front door that forwarded the request
here): the Completion keeps its own token list and text stream and accepts a relayed token
only at the next position, so every token reaches the client exactly once, whichever node
generated it. Any failure before D's answer to the handover aborts: the paused requests
are released and decode on here, D is told to abort (and aborts on its own when it hears
nothing). After the handover, a stream that breaks before a request finished resumes that
request here from its token list (the engine's resume: in deterministic mode exactly what
D would have generated).

It knows the requests in flight and the engine; the HTTP steps are ``migration.py``'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from typing import Any

from sllm.core.migration import DEFAULT_DELTA, DEFAULT_MAX_ROUNDS, SourceMigration
from sllm.errors import MigrationError, UsageError
from sllm.server.migration import (
    ABORT_SECONDS,
    PREPARE_SECONDS,
    ROUND_SECONDS,
    MigrationLog,
    MigrationRecord,
    Peer,
)

log = logging.getLogger("sllm.server")
#: Seconds :func:`migrate_out` waits, after the handover, for each request's first relayed
#: token (to report the longest pause the stream saw); requests keep streaming regardless.
PAUSE_REPORT_SECONDS = 10.0


class RemoteGeneration:
    """A request after its handover: generated on another node, relayed here.

    Looks like the engine's ``Generation`` to the Completion (``id``, ``finish_reason``,
    ``error``, ``done``, ``cancel``). Tokens that arrive before the Completion switches to it
    wait in ``pending``.
    """

    def __init__(self, relay: Relay, request_id: str) -> None:
        self.relay, self.id = relay, request_id
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.pending: list[tuple[int, int]] = []
        self.completion: Any = None
        self.first_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """The client went away (or a stop string): cancel it on D, best effort."""
        if not self.done:
            self.finish_reason = "cancelled"
            self.relay.cancel(self.id)
            if self.completion is not None:
                self.completion.deliver(self, None, None)

    def attach(self, completion: Any) -> None:
        self.completion = completion
        for pos, token in self.pending:
            completion.deliver(self, pos, token)
        self.pending.clear()

    def on_token(self, pos: int, token: int) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
        if self.completion is None:
            self.pending.append((pos, token))
        else:
            self.completion.deliver(self, pos, token)

    def on_finish(self, reason: str, error: str | None) -> None:
        if self.done:
            return
        self.finish_reason = reason
        if error:
            self.error = MigrationError(f"on {self.relay.peer.url}: {error}")
        if self.completion is not None:
            self.completion.deliver(self, None, None)


class Relay:
    """D's token stream for one migration, read into its :class:`RemoteGeneration` s.

    If the stream ends or breaks while a handed-over request is unfinished, that request is
    resumed here (:meth:`Completion.resume_local`) and the record's outcome becomes "resumed".
    """

    def __init__(self, peer: Peer, mid: str, record: MigrationRecord, log_: MigrationLog) -> None:
        self.peer, self.mid, self.record, self.log = peer, mid, record, log_
        self.remotes: dict[str, RemoteGeneration] = {}
        self.handed_over = False
        self.broken = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._resp: Any = None

    async def open(self) -> None:
        """Open the stream (D must know the migration). Raises: MigrationError."""
        self._resp, events = await self.peer.stream(f"/v1/migrations/incoming/{self.mid}/stream", {})
        it = events.__aiter__()
        first = await asyncio.wait_for(it.__anext__(), ROUND_SECONDS)  # D's "open" line
        if first.get("open") != self.mid:
            raise MigrationError(f"stream: {self.peer.url} opened {first!r}, not migration {self.mid}")
        self._task = asyncio.get_running_loop().create_task(self._read(it))

    def remote(self, rid: str) -> RemoteGeneration:
        return self.remotes.setdefault(rid, RemoteGeneration(self, rid))

    async def _read(self, it: Any) -> None:
        try:
            async for ev in it:
                rid = ev.get("id")
                if not isinstance(rid, str):
                    continue
                r = self.remote(rid)
                if "token" in ev:
                    r.on_token(int(ev["pos"]), int(ev["token"]))
                elif "finish_reason" in ev:
                    r.on_finish(str(ev["finish_reason"]), ev.get("error"))
        except Exception as exc:  # the connection broke (D died)
            log.warning("migration %s: the stream from %s broke: %s: %s", self.mid, self.peer.url,
                        type(exc).__name__, exc)
        finally:
            self.broken.set()
            await self._resp.aclose()
            await self._resume_unfinished()

    async def _resume_unfinished(self) -> None:
        if not self.handed_over:
            return
        lost = [r for r in self.remotes.values() if r.completion is not None and not r.done]
        if not lost:
            return
        why = f"the destination {self.peer.url} stopped streaming; resumed here"
        self.log.end(self.record, "resumed", why)
        for r in lost:
            r.finish_reason = "moved"  # it no longer feeds its Completion
            try:
                await r.completion.resume_local()
            except Exception as exc:
                log.warning("migration %s: resuming %s here failed: %s", self.mid, r.id, exc)
                r.completion.fail(f"the destination failed and resuming here failed: {exc}")

    def cancel(self, rid: str) -> None:
        asyncio.get_running_loop().create_task(self.peer.post(
            f"/v1/migrations/incoming/{self.mid}/cancel", {"ids": [rid]}, timeout=ABORT_SECONDS, step="cancel"))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._resp is not None:
            await self._resp.aclose()


async def migrate_out(
    runs: list[Any],
    peer: Peer,
    log_: MigrationLog,
    *,
    model: str,
    source: str,
    delta: int = DEFAULT_DELTA,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    migration_id: str | None = None,
) -> MigrationRecord:
    """Migrate ``runs`` (this node's Completions of ``model``, decoding locally) to ``peer``.

    Returns the record (rounds with tokens and seconds, the longest pause a stream saw,
    the total time, bytes sent against the KV bytes they replace). Cancelling the task
    before the handover aborts the migration the same way as a failure.

    Raises:
        MigrationError: the migration was aborted (every request decodes on here; the
            record says why). UsageError: nothing to migrate.
    """
    runs = [c for c in runs if c.migratable]
    if not runs:
        raise UsageError(f"no request of {model!r} is decoding on this node")
    engine = runs[0].engine  # the model's engine: kept here, as a request's own lease ends with it
    mid = migration_id or new_migration_id()
    sm = SourceMigration(mid, model, delta, max_rounds)
    rec = log_.start(MigrationRecord(mid, "out", model, peer.url, [c.id for c in runs]))
    relay = Relay(peer, mid, rec, log_)
    for c in runs:
        c.migrating = mid
    paused: list[Any] = []
    t0 = time.monotonic()
    try:
        await peer.post("/v1/migrations/incoming", {"id": mid, "model": model, "source": source},
                        timeout=PREPARE_SECONDS, step="prepare")
        sm.prepared()
        rec.phase = "copy"
        await relay.open()
        while True:
            live = {c.id: c for c in runs if not c.gen.done}
            final = sm.should_hand_over({rid: len(c.gen.tokens) for rid, c in live.items()})
            if final:
                holding = asyncio.ensure_future(asyncio.to_thread(_hold, engine, list(live.values())))
                try:
                    paused = await asyncio.shield(holding)
                except asyncio.CancelledError:  # aborted meanwhile: the holds finish, then are released below
                    paused = await holding
                    raise
                rec.phase = "handover"
                live = {c.id: c for c in paused}
            snap = {rid: list(c.gen.tokens) for rid, c in live.items()}
            snap = {rid: t for rid, t in snap.items() if not engine.exhausted(live[rid].gen, len(t))}
            rnd = sm.next_round(snap, final=final,
                                prompt_lens={rid: c.prompt_tokens for rid, c in live.items()},
                                params={rid: dataclasses.asdict(c.gen.params) for rid, c in live.items()})
            t = time.monotonic()
            if relay.broken.is_set():
                raise MigrationError(f"stream: {peer.url} closed the token stream")
            await peer.post(f"/v1/migrations/incoming/{mid}/rounds", rnd.to_json(), timeout=ROUND_SECONDS,
                            step=f"round {rnd.index}")
            sm.acked(rnd, time.monotonic() - t)
            rec.rounds.append({"index": rnd.index, "tokens": rnd.num_tokens, "lag": sm.rounds[-1].lag,
                               "final": final, "seconds": sm.rounds[-1].seconds})
            rec.bytes_sent += rnd.nbytes
            if final:
                break
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            why = "aborted on the source"
        else:
            why = str(exc) if isinstance(exc, MigrationError) else f"{type(exc).__name__}: {exc}"
        sm.abort(why)
        for c in paused:
            engine.release(c.gen)
        for c in runs:
            c.migrating = None
        await relay.close()
        await peer.delete(f"/v1/migrations/incoming/{mid}")
        log_.end(rec, "aborted", why)
        log.warning("migration %s of %s to %s aborted: %s", mid, model, peer.url, why)
        if isinstance(exc, MigrationError):
            raise
        if isinstance(exc, Exception):
            raise MigrationError(why) from exc
        raise
    relay.handed_over = True
    rec.handover_seconds = time.monotonic() - t0
    rec.converged = sm.converged
    moved = [c for c in paused if c.id in sm.sent]  # in the handover (not ended with their last token)
    kv = 0
    for c in paused:
        if c in moved:
            kv += len(c.tokens) * engine.bytes_per_block // engine.config.block_size
            c.hand_over(relay.remote(c.id))
        else:
            engine.release(c.gen)  # it ends here by itself
        c.migrating = None
    rec.kv_bytes_replaced = kv
    log_.end(rec, "done")
    log.info("migration %s of %s to %s: %d request(s), %d round(s)", mid, model, peer.url, len(moved), len(rec.rounds))
    await _wait_first_tokens(moved)
    pauses = [c.handover_gap for c in moved if c.handover_gap is not None]
    rec.longest_pause_seconds = max(pauses) if pauses else None
    rec.total_seconds = time.monotonic() - t0
    return rec


def new_migration_id() -> str:
    return "mig-" + secrets.token_hex(8)


def _hold(engine: Any, runs: list[Any]) -> list[Any]:
    """Pause the requests right after each one's next token (``Engine.hold_after_next_token``:
    the handover's pause starts as a token reaches the client); the ones that ended
    meanwhile are left out. Blocking: call in a thread."""
    gens = [c.gen for c in runs if not c.gen.done]
    try:
        engine.hold_after_next_token(gens)
    except UsageError:  # one ended between the check and the hold: hold them one by one
        for gen in gens:
            try:
                engine.hold(gen)
            except UsageError:
                pass
    return [c for c in runs if not c.gen.done and c.gen in gens]


async def _wait_first_tokens(runs: list[Any]) -> None:
    deadline = time.monotonic() + PAUSE_REPORT_SECONDS
    while time.monotonic() < deadline and any(c.handover_gap is None and not c.finished for c in runs):
        await asyncio.sleep(0.005)
