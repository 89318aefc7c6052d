"""The node's live-migration routes (listed in ``migration.py``), and the service behind them.

:class:`Migrations` is the node's migration service: as a source it runs
:func:`~sllm.server.migration_out.migrate_out` for ``POST /v1/migrations`` (and for the
scheduler's :class:`~sllm.core.scheduler.Migrator`, through the same route), as a
destination it is :class:`~sllm.server.migration_in.IncomingMigrations`. Both record into
one :class:`~sllm.server.migration.MigrationLog` (``/status`` ``migrations``).

Statuses: 400 a bad body; 404 an unknown model, request or migration id (or no request of
the model decoding here); 409 a round that does not continue D's copies, or an id in use;
502 the migration was aborted because the other node failed (the body's ``migration``
field is the record: every request decodes on here); 503 the destination could not load
the model, or the node drains. The admin key guards them (``gate.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from sllm.core.migration import DEFAULT_DELTA, DEFAULT_MAX_ROUNDS, MAX_ID_CHARS, MAX_REQUESTS
from sllm.errors import MigrationError, UsageError
from sllm.server import schemas
from sllm.server.migration import MigrationLog, Peer
from sllm.server.migration_in import IncomingMigrations, UnknownMigration
from sllm.server.migration_out import migrate_out, new_migration_id
from sllm.server.models import ModelLoadFailed, ModelManager
from sllm.server.requests import unavailable
from sllm.server.state import ShuttingDown

log = logging.getLogger("sllm.server")

_Id = Field(min_length=1, max_length=MAX_ID_CHARS)


class MigrateRequest(BaseModel):
    """``POST /v1/migrations``: move this node's requests of ``model`` to ``destination``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=schemas.MAX_MODEL_NAME_CHARS)
    destination: str = Field(min_length=1, max_length=2048, pattern=r"^https?://",
                             description="the destination node's base URL")
    destination_api_key: str | None = Field(None, max_length=4096,
                                            description="its admin key (or API key) when it has one")
    request_ids: list[str] | None = Field(None, max_length=MAX_REQUESTS,
                                          description="these requests only (default: all of the model's)")
    delta: int = Field(DEFAULT_DELTA, ge=0, le=1 << 20,
                       description="hand over once at most this many tokens per request are new")
    max_rounds: int = Field(DEFAULT_MAX_ROUNDS, ge=0, le=64,
                            description="rounds after the first copy before handing over (0: stop-and-copy)")


class PrepareRequest(BaseModel):
    """``POST /v1/migrations/incoming``: D prepares to receive (loads the model)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = _Id
    model: str = Field(min_length=1, max_length=schemas.MAX_MODEL_NAME_CHARS)
    source: str = Field("", max_length=2048)


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = _Id
    start: int = Field(ge=0)
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1 << 20)
    prompt_len: int | None = Field(None, ge=1)
    params: dict[str, Any] | None = None
    length: int | None = Field(None, ge=1)
    digest: str | None = Field(None, min_length=64, max_length=64)


class RoundRequest(BaseModel):
    """One round (``sllm.core.migration.Round``); checked again by ``parse_round``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    index: int = Field(ge=0)
    final: bool = False
    drop: list[str] = Field(default_factory=list, max_length=MAX_REQUESTS)
    requests: list[CopyRequest] = Field(default_factory=list, max_length=MAX_REQUESTS)


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[str] = Field(max_length=MAX_REQUESTS)


class Migrations:
    """The node's migration service (module docstring).

    Args:
        manager: the node's model manager. requests: its requests in flight
            (:class:`~sllm.server.requests.Requests`). name: this node's name for the peer.
    """

    def __init__(self, manager: ModelManager, requests: Any, name: str = "") -> None:
        self.manager, self.requests, self.name = manager, requests, name
        self.log = MigrationLog()
        self.incoming = IncomingMigrations(manager, self.log)
        self.outgoing: dict[str, asyncio.Task] = {}
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Build the HTTP client now, in a thread: its TLS context takes tens of milliseconds
        of CPU that a first migration would otherwise take from the streams it moves."""
        if self._client is None:
            self._client = await asyncio.to_thread(httpx.AsyncClient)

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    async def migrate(self, body: MigrateRequest) -> dict[str, Any]:
        """Run one outgoing migration; the record as JSON.

        Raises:
            ModelNotFound: no request of the model here, or an unknown request id.
            MigrationError: aborted (the requests decode on here).
        """
        runs = [c for c in self.requests.inflight if c.model == body.model and c.migratable]
        if body.request_ids is not None:
            by_id = {c.id: c for c in runs}
            missing = [r for r in body.request_ids if r not in by_id]
            if missing:
                raise NoSuchRequests(f"request(s) {', '.join(missing[:5])}: not decoding {body.model!r} on this node")
            runs = [by_id[r] for r in body.request_ids]
        if not runs:
            raise NoSuchRequests(f"no request of {body.model!r} is decoding on this node")
        if not hasattr(runs[0].engine, "hold_after_next_token"):
            raise UsageError(f"{body.model!r} runs on an engine without live migration (sllm serve --backend sllm has it)")
        peer = Peer(body.destination, body.destination_api_key, self.client())
        mid = new_migration_id()
        task = asyncio.ensure_future(migrate_out(runs, peer, self.log, model=body.model, source=self.name,
                                                 delta=body.delta, max_rounds=body.max_rounds, migration_id=mid))
        self.outgoing[mid] = task
        try:
            rec = await asyncio.shield(task)
        except (asyncio.CancelledError, MigrationError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not task.cancelled():
                raise
            found = self.log.find(mid)
            err = MigrationError(found.error if found is not None and found.error else "aborted")
            err.record = dataclasses.asdict(found) if found is not None else None  # type: ignore[attr-defined]
            raise err from None
        finally:
            if task.done():
                self.outgoing.pop(mid, None)
        return dataclasses.asdict(rec)

    def abort(self, mid: str) -> bool:
        """Abort an outgoing migration before its handover (its requests decode on here);
        False when none of that id is in progress (or it has handed over already)."""
        task = self.outgoing.get(mid)
        rec = self.log.active.get(mid + "out")
        if task is None or task.done() or rec is None or rec.phase in ("done",) or rec.outcome is not None:
            return False
        task.cancel()
        return True

    def status(self) -> dict[str, Any]:
        return self.log.status()

    async def close(self) -> None:
        self.incoming.close()
        if self._client is not None:
            await self._client.aclose()


class NoSuchRequests(MigrationError):
    """Nothing to migrate by that name (404)."""


def add_migration_routes(app: FastAPI, service: Migrations, error: Any) -> None:
    """Register the migration routes; ``error(status, message, type_, **kw)`` builds error responses."""
    err = {"model": schemas.ErrorResponse}
    answers = {s: {"description": d, **err} for s, d in (
        (404, "unknown model, request or migration"), (409, "a round that does not continue the copies"),
        (502, "aborted: the other node failed; the requests decode on here"),
        (503, "the model could not be loaded here, or the node drains"))}

    def failed(exc: MigrationError) -> JSONResponse:
        if isinstance(exc, (UnknownMigration, NoSuchRequests)):
            return error(404, str(exc), code="not_found")
        return error(409, str(exc), code="migration_conflict")

    @app.post("/v1/migrations", responses=answers)
    async def migrate(body: MigrateRequest) -> Any:
        try:
            return await service.migrate(body)
        except NoSuchRequests as exc:
            return error(404, str(exc), param="request_ids", code="not_found")
        except MigrationError as exc:
            out = schemas.error_body(str(exc), "server_error", code="migration_aborted")
            out["migration"] = getattr(exc, "record", None)
            return JSONResponse(out, status_code=502)

    @app.delete("/v1/migrations/{mid}", responses=answers)
    async def abort_out(mid: str) -> Any:
        if not service.abort(mid):
            return error(404, f"migration {mid!r}: no outgoing migration of that id before its handover here",
                         code="not_found")
        return {"id": mid, "aborted": True}

    @app.post("/v1/migrations/incoming", responses=answers)
    async def prepare(body: PrepareRequest) -> Any:
        try:
            return await service.incoming.prepare(body.id, body.model, body.source)
        except MigrationError as exc:
            return failed(exc)
        except (ModelLoadFailed, ShuttingDown) as exc:  # 503: the source carries on
            return unavailable(exc, 0.0)

    @app.post("/v1/migrations/incoming/{mid}/rounds", responses=answers)
    async def round_(mid: str, body: RoundRequest) -> Any:
        try:
            return await service.incoming.round(mid, body.model_dump(exclude_none=True))
        except MigrationError as exc:
            return failed(exc)

    @app.post("/v1/migrations/incoming/{mid}/stream", response_model=None, responses={
        200: {"description": "NDJSON: the tokens D generates and each request's end",
              "content": {"application/x-ndjson": {}}}, **answers})
    async def stream(mid: str, request: Request) -> Any:
        try:
            lines = await service.incoming.stream(mid)
        except MigrationError as exc:
            return failed(exc)
        return StreamingResponse(lines, media_type="application/x-ndjson")

    @app.post("/v1/migrations/incoming/{mid}/cancel", responses=answers)
    async def cancel(mid: str, body: CancelRequest) -> Any:
        try:
            return {"id": mid, "cancelled": service.incoming.cancel(mid, body.ids)}
        except MigrationError as exc:
            return failed(exc)

    @app.delete("/v1/migrations/incoming/{mid}", responses=answers)
    async def abort(mid: str) -> Any:
        return {"id": mid, "aborted": service.incoming.abort(mid, "aborted by the source")}
