"""The node's front gate: pure ASGI middleware that runs before any route.

:class:`Gate`, outermost first:

1. **Bugs become one 500.** An exception no route handled is logged once, one line plus
   its traceback, and answered with a 500 in OpenAI's error shape (if the response has not
   started); it is not re-raised, so the server does not log it a second time.
2. **Keys.** Every route but ``/health`` needs ``Authorization: Bearer KEY`` when the node
   has an API key; the cache routes (``/v1/cache...``: pin, evict, pull, load) and the migration
   routes (``/v1/migrations...``) need the admin key
   when one is set, else the API key. Keys are compared as bytes in constant time, so a
   header that is not ASCII is a 401 like any wrong key, never an error.
3. **Body size.** A body over ``max_body_bytes`` is a 413 before it is read: by its
   ``Content-Length``, or, for a chunked body, as soon as the bytes received pass the limit.
4. Every response carries ``x-sllm-load-seconds`` (0 unless a route set it).

It knows nothing of models or generation.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders

from sllm.server.schemas import error_body

log = logging.getLogger("sllm.server")

LOAD_HEADER = "x-sllm-load-seconds"
#: Routes that need the admin key (when the node has one): the cache's and live migration's.
ADMIN_PREFIX = ("/v1/cache", "/v1/migrations")


class Gate:
    """The middleware (see the module docstring).

    Args:
        app: the ASGI app it wraps.
        api_key: the key of every route but ``/health``; None: open.
        admin_key: the key of the admin routes; None: ``api_key``.
        max_body_bytes: the largest request body, bytes.
    """

    def __init__(self, app: Any, *, api_key: str | None, admin_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode("ascii") if api_key else None
        self.admin_key = admin_key.encode("ascii") if admin_key else self.api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_header(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                if LOAD_HEADER not in headers:
                    headers.append(LOAD_HEADER, "0")
            await send(message)

        try:
            await self._guarded(scope, receive, send_with_header)
        except Exception:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                body = error_body("internal error (a bug in sllm; the node's log has the traceback)", "server_error")
                await JSONResponse(body, status_code=500)(scope, receive, send_with_header)

    async def _guarded(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope["path"]
        key = self.admin_key if path.startswith(ADMIN_PREFIX) else self.api_key
        if key is not None and path != "/health" and not _authorized(scope, key):
            which = "admin key" if path.startswith(ADMIN_PREFIX) and self.admin_key != self.api_key else "API key"
            body = error_body(f"missing or incorrect {which}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            await JSONResponse(body, status_code=401, headers={"www-authenticate": "Bearer"})(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_body_bytes:
            await _too_large(self.max_body_bytes, length)(scope, receive, send)
            return
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await _read_capped(receive, self.max_body_bytes)
            if body is None:
                await _too_large(self.max_body_bytes, None)(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)


def _authorized(scope: dict, key: bytes) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
    return False


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int, got: int | None) -> JSONResponse:
    size = f"{got} bytes" if got is not None else "more"
    return JSONResponse(error_body(f"request body of {size} is over this node's limit of {limit} bytes",
                                   code="request_too_large"), status_code=413)  # fmt: skip


async def _read_capped(receive: Any, limit: int) -> bytes | None:
    """The whole body of a request without ``Content-Length``; None once it passes ``limit``."""
    parts, total = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(parts)
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives ``body`` once, then defers to the real one (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
