"""The node's HTTP API: an OpenAI-compatible FastAPI app over a :class:`ModelManager`.

Routes: ``GET /health`` (never guarded), ``GET /status``, ``GET /v1/models[/{id}]``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as Server-Sent Events in
OpenAI's chunk format, ending ``data: [DONE]``), and the cache API under ``/v1/cache``
(``cache_api.py``). Every response carries ``x-sllm-load-seconds``: the seconds the request
waited for its model to load (0 warm).

Errors use OpenAI's shape with these statuses: 400 bad parameters (never 500 for bad
input), 401 missing or wrong API key, 404 unknown model or route (or a model not in the
cache tier asked about), 409 a cache tier refuses (pinned, in use, requests in flight), 503
the model failed to load or to be pulled from the remote (corrupt checkpoint, memory budget,
remote not found or unreachable, checksum; code ``model_pull_failed`` for pulls; with
``x-should-retry: false``). A 500 means a bug. A failure after a stream has started is sent
as an ``error`` event.

This module maps HTTP to calls; the lifecycle is ``models.py``, text handling ``text.py``,
generation ``sllm.core.engine``. :func:`create_app` builds a testable app; ``sllm serve``
runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from sllm.core.engine import SamplingParams
from sllm.errors import CacheError, ServerError, UsageError
from sllm.server import schemas
from sllm.server.cache_api import add_cache_routes, error_body_for
from sllm.server.models import Lease, ModelLoadFailed, ModelManager, ModelNotFound, NotInTier, ServeConfig, TierConflict
from sllm.server.text import TextStream, chat_ids, encode

log = logging.getLogger("sllm.server")

LOAD_HEADER = "x-sllm-load-seconds"


def create_app(
    config: ServeConfig, *, clock: Callable[[], float] = time.monotonic, manager: ModelManager | None = None
) -> FastAPI:
    """The app for one node. The manager starts (keep-alive reaper) and closes (unloads
    every model) with the app's lifespan.

    Raises:
        OSError: ``config.models_dir`` cannot be listed.
        CacheError: ``config.cache``'s directory cannot be created or locked.
    """
    manager = manager or ModelManager(config, clock=clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.start()
        try:
            yield
        finally:
            await manager.close()

    app = FastAPI(title="sllm node", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager = manager
    app.add_middleware(_Gate, api_key=config.api_key)
    _add_error_handlers(app)
    _add_routes(app, manager)
    add_cache_routes(app, manager, _error)
    return app


def _version() -> str:
    from sllm import __version__

    return __version__


# ---------------------------------------------------------------------------------------
# Middleware and errors
# ---------------------------------------------------------------------------------------


class _Gate:
    """Pure ASGI middleware: the API key check (all routes but /health) and the default
    ``x-sllm-load-seconds: 0`` on responses that did not set it."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
            body = schemas.error_body(
                "missing or incorrect API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )
            resp = JSONResponse(body, status_code=401, headers={LOAD_HEADER: "0", "www-authenticate": "Bearer"})
            await resp(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if LOAD_HEADER not in headers:
                    headers.append(LOAD_HEADER, "0")
            await send(message)

        await self.app(scope, receive, send_with_header)

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key or "")
        return False


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
    return "; ".join(parts) or "invalid request", param


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

    @app.exception_handler(TierConflict)
    async def _conflict(request: Request, exc: TierConflict) -> JSONResponse:
        return JSONResponse(error_body_for(exc), status_code=409)

    @app.exception_handler(NotInTier)
    async def _not_in_tier(request: Request, exc: NotInTier) -> JSONResponse:
        return JSONResponse(error_body_for(exc), status_code=404)

    @app.exception_handler(UsageError)
    async def _bad(request: Request, exc: UsageError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def _load_failed(exc: ModelLoadFailed, waited: float) -> JSONResponse:
    if exc.phase == "pull":
        code = "model_pull_failed"
    else:
        code = "insufficient_memory" if isinstance(exc.__cause__, CacheError) else "model_load_failed"
    headers = {LOAD_HEADER: f"{waited:.6f}", "x-should-retry": "false"}
    return _error(503, str(exc), "server_error", param="model", code=code, headers=headers)


# ---------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, manager: ModelManager) -> None:
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return manager.status()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        cards = [schemas.model_card(m.pop("id"), m.pop("created"), **m) for m in manager.catalog()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        for m in manager.catalog():
            if m["id"] == model_id:
                return schemas.model_card(m.pop("id"), m.pop("created"), **m)
        raise ModelNotFound(f"model {model_id!r} not found; this node serves: {', '.join(manager.scan()) or 'none'}")

    @app.post("/v1/completions")
    async def completions(body: schemas.CompletionRequest) -> Any:
        return await _complete(manager, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: schemas.ChatCompletionRequest) -> Any:
        return await _complete(manager, body, chat=True)


async def _complete(manager: ModelManager, body: Any, *, chat: bool) -> Any:
    """Lease the model (loading it if needed), start the generation, answer or stream."""
    manager.lookup(body.model)  # 404 before anything else
    t0 = time.monotonic()
    try:
        lease = await manager.acquire(body.model)
    except ModelLoadFailed as exc:
        return _load_failed(exc, time.monotonic() - t0)
    try:
        run = _Run(manager, lease, body, chat)
    except BaseException:
        manager.release(lease)
        raise
    headers = {LOAD_HEADER: f"{lease.load_seconds:.6f}"}
    if body.stream:
        return StreamingResponse(_sse(run), media_type="text/event-stream", headers=headers)
    try:
        text = "".join([d async for d in run.deltas()])
    finally:
        run.cancel()
    if chat:
        out = schemas.chat_body(run.id, body.model, run.created, text, run.finish)
    else:
        out = schemas.completion_body(run.id, body.model, run.created, text=text, finish=run.finish, chat=False)
    out["usage"] = run.usage()
    return JSONResponse(out, headers=headers)


async def _sse(run: _Run) -> AsyncIterator[str]:
    """The SSE body: a chunk per text delta, a last chunk with the finish reason, usage
    when asked (``stream_options.include_usage``), then ``data: [DONE]``."""

    def event(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    chunk = lambda text, finish=None, first=False: schemas.completion_body(  # noqa: E731
        run.id, run.model, run.created, text=text, finish=finish, chat=run.chat, first=first
    )
    try:
        if run.chat:
            yield event(chunk("", first=True))
        async for delta in run.deltas():
            if delta:
                yield event(chunk(delta))
        yield event(chunk(None if run.chat else "", finish=run.finish))
        if run.include_usage:
            yield event({**chunk(None), "choices": [], "usage": run.usage()})
    except ServerError as exc:
        yield event(schemas.error_body(str(exc), "server_error"))
    finally:
        run.cancel()
    yield "data: [DONE]\n\n"


class _Run:
    """One request's generation: prompt ids in, text deltas out, usage at the end.

    Tokenizes on construction and submits to the model's engine; tokens come back from
    the engine thread through an asyncio queue. The lease is given back when the engine
    finishes the generation (whether or not anyone still reads the stream).

    Raises (constructor):
        UsageError: an empty or too long prompt, a token id outside the vocabulary.
    """

    def __init__(self, manager: ModelManager, lease: Lease, body: Any, chat: bool) -> None:
        res = lease.resident
        self.manager, self.lease, self.chat, self.model = manager, lease, chat, body.model
        self.id = schemas.new_id("chatcmpl" if chat else "cmpl")
        self.created = schemas.now()
        self.include_usage = body.include_usage
        self.finish: str | None = None
        prompt = _prompt_ids(res.tokenizer, res.model.config, body, chat)
        context = res.engine.max_context
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = schemas.DEFAULT_COMPLETION_MAX_TOKENS if not chat else (context or 0) - len(prompt)
        if context is not None and len(prompt) + max_tokens > context:
            raise UsageError(
                f"this model's context is {context} tokens; the request asks for {len(prompt) + max_tokens} "
                f"({len(prompt)} in the prompt, {max_tokens} to generate): shorten the prompt or lower max_tokens"
            )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_token_ids=_eos_ids(res.tokenizer, res.model),
        )
        self.text = TextStream(res.tokenizer, body.stop)
        self.prompt_tokens = len(prompt)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.gen = res.engine.submit(prompt, params, request_id=self.id, listener=self._listener)

    def _listener(self, gen: Any, token: int | None) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._on_token, token)

    def _on_token(self, token: int | None) -> None:  # event loop
        self._queue.put_nowait(token)
        if token is None:
            self.manager.release(self.lease)

    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas as tokens arrive; sets :attr:`finish`. Raises ServerError if the
        generation failed."""
        first = True
        while (token := await self._queue.get()) is not None:
            if first:
                self.manager.first_token(self.lease)
                first = False
            delta = self.text.push(token)
            if self.text.stopped:
                self.gen.cancel()
                self.finish = "stop"
                yield delta
                return
            yield delta
        if self.gen.finish_reason == "error":
            raise ServerError(f"generation failed: {type(self.gen.error).__name__}: {self.gen.error}")
        if self.gen.finish_reason == "cancelled":
            raise ServerError("generation cancelled: the model was unloaded (server shutting down)")
        self.finish = self.gen.finish_reason
        yield self.text.flush()

    def usage(self) -> dict[str, int]:
        return schemas.usage(self.prompt_tokens, len(self.text.ids))

    def cancel(self) -> None:
        self.gen.cancel()


def _prompt_ids(tokenizer: Any, config: Any, body: Any, chat: bool) -> list[int]:
    """Raises: UsageError: empty prompt or a token id outside the vocabulary."""
    if chat:
        ids = chat_ids(tokenizer, [(m.role, m.text()) for m in body.messages])
    elif isinstance(body.prompt, list):
        ids = list(body.prompt)
        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and any(t >= vocab for t in ids):
            raise UsageError(f"prompt: token ids must be < the vocabulary size {vocab}")
    else:
        ids = encode(tokenizer, body.prompt)
    if not ids:
        raise UsageError("prompt: empty (this tokenizer has no BOS token to start from)")
    return ids


def _eos_ids(tokenizer: Any, model: Any) -> tuple[int, ...]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return tuple(sorted(ids))
