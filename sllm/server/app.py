"""The node's HTTP API: an OpenAI-compatible FastAPI app over a :class:`ModelManager`.

Routes: ``GET /health`` (never guarded), ``GET /status``, ``GET /v1/models[/{id}]``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as Server-Sent Events in
OpenAI's chunk format, ending ``data: [DONE]``), and the cache API under ``/v1/cache``
(``cache_api.py``). Every response carries ``x-sllm-load-seconds``: the seconds the request
waited for its model to load (0 warm).

Errors use OpenAI's shape with these statuses: 400 bad parameters (never 422, never 500 for
bad input), 401 missing or wrong key, 404 unknown model or route (or a model not in the
cache tier asked about), 409 a cache tier refuses (pinned, in use, requests in flight), 413
a body over the limit, 503 the model failed to load or to be pulled from the remote
(corrupt checkpoint, memory budget, remote not found or unreachable, checksum; code
``model_pull_failed`` for pulls; with ``x-should-retry: false``) or the node is shutting
down (code ``shutting_down``). A 500 means a bug. A failure after a stream has started is
sent as an ``error`` event. The OpenAPI schema (``/openapi.json``) states exactly these.

Routes are thin: a request's life is ``requests.py``, the lifecycle ``models.py``, the
gate (keys, body size, bugs) ``gate.py``. :func:`create_app` builds a testable app;
:class:`NodeServer` runs it with uvicorn and drains it on shutdown (``sllm serve``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sllm.errors import UsageError
from sllm.server import report, schemas
from sllm.server.cache_api import add_cache_routes, error_body_for
from sllm.server.catalog import check_model_name
from sllm.server.frontdoor import FrontDoor
from sllm.server.gate import LOAD_HEADER, Gate
from sllm.server.migration_api import Migrations, add_migration_routes
from sllm.server.models import ModelLoadFailed, ModelManager, ModelNotFound, NotInTier, ServeConfig, TierConflict
from sllm.server.requests import END_GRACE_SECONDS, Requests, unavailable

__all__ = ["LOAD_HEADER", "NodeServer", "create_app"]

log = logging.getLogger("sllm.server")


def create_app(
    config: ServeConfig, *, clock: Callable[[], float] = time.monotonic, manager: ModelManager | None = None,
    front_door: FrontDoor | None = None,
) -> FastAPI:
    """The app for one node. The manager starts (keep-alive reaper) and closes (unloads
    every model) with the app's lifespan; ``app.state.requests.drain`` ends it gracefully.
    With ``front_door`` (``sllm serve --inventory``) a completion request may be forwarded
    to the node the scheduler picks (``frontdoor.py``).

    Raises:
        OSError: ``config.models_dir`` cannot be listed.
        CacheError: ``config.cache``'s directory cannot be created or locked.
    """
    manager = manager or ModelManager(config, clock=clock)
    requests = Requests(manager, config.limits, front_door=front_door)
    migrations = Migrations(manager, requests, name=front_door.name if front_door is not None else "")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        await migrations.start()
        try:
            yield
        finally:
            requests.close()
            await migrations.close()
            if front_door is not None:
                await front_door.close()
            await manager.close()

    app = FastAPI(title="sllm node", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager = manager
    app.state.requests = requests
    app.state.migrations = migrations
    app.add_middleware(Gate, api_key=config.api_key, admin_key=config.admin_key,
                       max_body_bytes=config.limits.max_body_bytes)  # fmt: skip
    _add_error_handlers(app)
    _add_routes(app, manager, requests, migrations)
    add_cache_routes(app, manager, _error)
    add_migration_routes(app, migrations, _error)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _version() -> str:
    from sllm import __version__

    return __version__


class NodeServer(uvicorn.Server):
    """uvicorn's server with sllm's graceful shutdown: on SIGTERM (or ``should_exit``) stop
    accepting, drain the app's requests (:meth:`Requests.drain`, ``config.drain_seconds``),
    then uvicorn's own shutdown, which by then finds every stream ended."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self.node_app = app
        self.drain_seconds = drain_seconds

    async def shutdown(self, sockets: list | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        try:
            await self.node_app.state.requests.drain(self.drain_seconds)
        except Exception:
            log.exception("draining the node's requests failed")
        await super().shutdown(sockets=sockets)


def uvicorn_config(app: FastAPI, drain_seconds: float, **kw: Any) -> uvicorn.Config:
    """A uvicorn config whose own graceful timeout follows the drain."""
    return uvicorn.Config(app, timeout_graceful_shutdown=int(END_GRACE_SECONDS) + 5, server_header=False, **kw)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def _error(status: int, message: str, type_: str = "invalid_request_error", **kw: Any) -> JSONResponse:
    headers = kw.pop("headers", None)
    return JSONResponse(schemas.error_body(message, type_, **kw), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else f"request body: {msg}")
        param = param or (loc[0] if loc else None)
    message = "; ".join(parts) or "invalid request"
    return (message if len(message) <= 500 else message[:497] + "..."), param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return _error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(ModelNotFound)
    async def _not_found(request: Request, exc: ModelNotFound) -> JSONResponse:
        return _error(404, str(exc), param="model", code="model_not_found")

    @app.exception_handler(ModelLoadFailed)
    async def _load_failed(request: Request, exc: ModelLoadFailed) -> JSONResponse:
        return unavailable(exc, 0.0)

    @app.exception_handler(TierConflict)
    async def _conflict(request: Request, exc: TierConflict) -> JSONResponse:
        return JSONResponse(error_body_for(exc), status_code=409)

    @app.exception_handler(NotInTier)
    async def _not_in_tier(request: Request, exc: NotInTier) -> JSONResponse:
        return JSONResponse(error_body_for(exc), status_code=404)

    @app.exception_handler(UsageError)
    async def _bad(request: Request, exc: UsageError) -> JSONResponse:
        return _error(400, str(exc))


# ---------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------

_ERRORS = {400: "bad parameters", 401: "missing or wrong key", 404: "unknown model", 413: "body over the limit",
           503: "the model failed to load or be pulled, or the node is shutting down"}
_COMPLETION_RESPONSES: dict[int | str, Any] = {
    200: {"description": "the completion (JSON), or with stream: true Server-Sent Events",
          "content": {"application/json": {}, "text/event-stream": {}}},
    **{s: {"description": d, "model": schemas.ErrorResponse} for s, d in _ERRORS.items()},
}


def _add_routes(app: FastAPI, manager: ModelManager, requests: Requests, migrations: Migrations) -> None:
    guarded: dict[int | str, Any] = {401: {"description": "missing or wrong key", "model": schemas.ErrorResponse}}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/status", responses=guarded)
    async def status() -> dict[str, Any]:
        return {**await manager.status(), "migrations": migrations.status()}

    @app.get("/v1/models", responses=guarded)
    async def models() -> dict[str, Any]:
        cards = [schemas.model_card(m.pop("id"), m.pop("created"), **m) for m in await manager.catalog()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}", responses={
        **guarded, 400: {"description": "a bad model name", "model": schemas.ErrorResponse},
        404: {"description": "unknown model", "model": schemas.ErrorResponse},
        503: {"description": "the remote could not say whether it holds the model", "model": schemas.ErrorResponse}})
    async def model(model_id: str) -> dict[str, Any]:
        m = await report.model(manager, model_id) if check_model_name(model_id) else None
        if m is None:
            raise manager.not_found(model_id)
        return schemas.model_card(m.pop("id"), m.pop("created"), **m)

    @app.post("/v1/completions", response_model=None, responses=_COMPLETION_RESPONSES)
    async def completions(body: schemas.CompletionRequest, request: Request) -> Any:
        return await requests.complete(body, request, chat=False)

    @app.post("/v1/chat/completions", response_model=None, responses=_COMPLETION_RESPONSES)
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Any:
        return await requests.complete(body, request, chat=True)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The schema, told the truth: validation errors are 400s in OpenAI's error shape (not
    FastAPI's 422), and every guarded route can answer 401 and 413."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    error_ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, ops in spec.get("paths", {}).items():
        for op in ops.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path == "/health":
                continue
            if op.get("parameters") or op.get("requestBody"):
                responses.setdefault("400", {"description": "bad parameters", **error_ref})
            responses.setdefault("401", {"description": "missing or wrong key", **error_ref})
            responses.setdefault("413", {"description": "body over the limit", **error_ref})
    schemas_ = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas_.pop(name, None)
    served = sorted(app.state.manager.entries)  # examples a client (or a fuzzer) can use as they are
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        if served and name in schemas_:
            schemas_[name]["properties"]["model"]["examples"] = served
    app.openapi_schema = spec
    return spec
