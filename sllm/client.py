"""A small httpx client for one sllm node's HTTP API (``sllm serve``).

Covers what sllm's own tools need: health, models, status, completions (whole or streamed
as :class:`Chunk` objects, with the cold-start cost the server reports), and the node's
cache tiers (``/v1/cache``: list, pin, unpin, evict, pull, load; ``sllm cache --server``). Any
OpenAI client works against the same routes; this one adds sllm's extras
(``x-sllm-load-seconds``, ``/status``) and sllm's errors. httpx errors and HTTP error
answers become :class:`~sllm.errors.ServerError` here, chained with ``from``.

It does not start servers, retry, or know about models.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from sllm.errors import ServerError

LOAD_HEADER = "x-sllm-load-seconds"


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of a completion.

    Attributes:
        text: new text (may be "").
        finish_reason: None until the last chunk: "stop" or "length".
        usage: token counts, on the final chunk only (``prompt_tokens``, ``completion_tokens``).
        load_seconds: what the request waited for its model to load (0 when warm), seconds.
    """

    text: str
    finish_reason: str | None
    usage: dict[str, int] | None
    load_seconds: float


class NodeClient:
    """Talk to the node at ``url`` (e.g. ``http://127.0.0.1:8343``).

    Args:
        url: the node's base URL, without ``/v1``.
        api_key: sent as ``Authorization: Bearer`` when given.
        timeout: seconds for connect and for each read; a cold start of a large model
            counts against the read, so the default is generous (300).
    """

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def health(self) -> bool:
        """True when the node answers ``/health``; False when it cannot be reached."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def models(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries: id, resident, nbytes, error. Raises: ServerError."""
        return self._request("GET", "/v1/models").json()["data"]

    def model(self, model: str) -> dict[str, Any]:
        """``/v1/models/MODEL``: id, resident, nbytes (for a model only the node's remote
        holds, from the remote's manifest), tiers, error. Raises: ServerError (HTTP 404: unknown)."""
        return self._request("GET", f"/v1/models/{urllib.parse.quote(model, safe='/')}").json()

    def status(self) -> dict[str, Any]:
        """``/status``. Raises: ServerError."""
        return self._request("GET", "/status").json()

    # -- the cache tiers (sllm/server/cache_api.py) ---------------------------------------

    def cache_ls(self) -> dict[str, Any]:
        """``GET /v1/cache``: ``{"cache_dir", "remote", "models": [row...], "tiers": [stats...]}``,
        rows per model and tier ("device", "dram", "ssd"). Raises: ServerError."""
        return self._request("GET", "/v1/cache").json()

    def cache_pin(self, model: str, tier: str | None = None) -> dict[str, Any]:
        """Pin ``model`` in ``tier`` (None: every tier holding it): ``{"model", "tiers", "pinned"}``.

        Raises: ServerError (HTTP 404: not in the tier)."""
        return self._cache_post(model, "pin", tier)

    def cache_unpin(self, model: str, tier: str | None = None) -> dict[str, Any]:
        """Undo :meth:`cache_pin`. Raises: ServerError."""
        return self._cache_post(model, "unpin", tier)

    def cache_evict(self, model: str, tier: str | None = None) -> dict[str, Any]:
        """Evict ``model`` from ``tier`` (None: every tier holding it, device first):
        ``{"model", "tiers", "freed_bytes"}``.

        Raises:
            ServerError: HTTP 409 when a tier refuses (pinned, in use, requests in flight),
            404 when no such tier holds it.
        """
        return self._cache_post(model, "evict", tier)

    def cache_pull(self, model: str, tier: str | None = None) -> dict[str, Any]:
        """Pull ``model`` into the node's ``tier`` ("dram" or "ssd"; None: DRAM when the node
        has that tier): the node's PullResult as a dict (model, source, nbytes,
        fetched_bytes, seconds, gbps, tiers, evicted, path).

        Raises: ServerError (HTTP 503 when the pull failed: the message says why)."""
        return self._cache_post(model, "pull", tier)

    def cache_load(self, model: str) -> dict[str, Any]:
        """Make ``model`` resident on the node's device (``POST /v1/cache/MODEL/load``; the node
        loads it from its fastest tier, pulling from the remote when none holds it; a resident
        model is left as it is): model, tier (where the bytes came from), loaded (False: it
        was resident already), load_seconds, queue_seconds, waited_seconds, nbytes.

        Raises: ServerError (HTTP 404: unknown model; 503: the load or pull failed)."""
        return self._cache_post(model, "load", None)

    def _cache_post(self, model: str, action: str, tier: str | None) -> dict[str, Any]:
        path = f"/v1/cache/{urllib.parse.quote(model, safe='/')}/{action}"
        return self._request("POST", path, params={"tier": tier} if tier else None).json()

    def migrate(self, model: str, destination: str, *, destination_api_key: str | None = None,
                request_ids: list[str] | None = None, delta: int | None = None,
                max_rounds: int | None = None) -> dict[str, Any]:
        """Live-migrate this node's requests of ``model`` to the node at ``destination``
        (``POST /v1/migrations``; this node needs its admin key); the migration's record:
        rounds (tokens, seconds), ``longest_pause_seconds``, ``total_seconds``, ``outcome``.

        Raises:
            MigrationError: aborted (the requests decode on here; the message says why),
                or nothing to migrate. ServerError: the node could not be reached.
        """
        from sllm.errors import MigrationError

        body: dict[str, Any] = {"model": model, "destination": destination}
        for k, v in (("destination_api_key", destination_api_key), ("request_ids", request_ids), ("delta", delta),
                     ("max_rounds", max_rounds)):
            if v is not None:
                body[k] = v
        try:
            r = self._http.post("/v1/migrations", json=body, timeout=None)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {self.url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code in (404, 502):
            raise MigrationError(_message(r))
        if r.status_code >= 400:
            raise ServerError(_message(r))
        return r.json()

    def complete(self, model: str, prompt: str | list[int], **params: Any) -> dict[str, Any]:
        """A whole completion: the OpenAI response body plus ``load_seconds``.

        ``params``: max_tokens, temperature, top_p, seed, stop. Raises: ServerError.
        """
        r = self._request("POST", "/v1/completions", json={"model": model, "prompt": prompt, **params})
        return {**r.json(), "load_seconds": float(r.headers.get(LOAD_HEADER, 0))}

    def stream(self, model: str, prompt: str | list[int], **params: Any) -> Iterator[Chunk]:
        """A streamed completion, chunk by chunk as the server sends them.

        Raises:
            ServerError: an HTTP error answer, a failure mid-stream, or no connection.
        """
        body = {"model": model, "prompt": prompt, **params, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with self._http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    raise ServerError(_message(r))
                load_seconds = float(r.headers.get(LOAD_HEADER, 0))
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        return
                    yield _chunk(json.loads(data), load_seconds, self.url)
        except httpx.HTTPError as exc:
            raise ServerError(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach {self.url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code >= 400:
            raise ServerError(_message(r))
        return r


def _chunk(event: dict[str, Any], load_seconds: float, url: str) -> Chunk:
    if "error" in event:
        raise ServerError(f"{url}: {event['error'].get('message', event['error'])}")
    choices = event.get("choices") or [{}]
    return Chunk(
        text=choices[0].get("text") or "",
        finish_reason=choices[0].get("finish_reason"),
        usage=event.get("usage"),
        load_seconds=load_seconds,
    )


def _message(r: httpx.Response) -> str:
    """``"<url>: HTTP 503: <the server's message>"`` from an error answer."""
    try:
        detail = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = r.text[:200] or r.reason_phrase
    return f"{r.request.url}: HTTP {r.status_code}: {detail}"


class HttpMigrator:
    """The scheduler's :class:`~sllm.core.scheduler.Migrator` over the nodes' APIs: asks the
    source node to migrate (``POST /v1/migrations``), with the destination's URL and key
    from the inventory. ``schedule-plan --apply`` and front doors register it."""

    def migrate(self, model: str, source: Any, destination: Any, request_ids: Any) -> None:
        """Raises: MigrationError (the source keeps the requests), ServerError (unreachable)."""
        with NodeClient(source.url, api_key=source.admin_key()) as c:  # /v1/migrations takes the admin key
            c.migrate(model, destination.url, destination_api_key=destination.admin_key(),
                      request_ids=list(request_ids) or None)


def remote_card(node: Any, model: str, timeout: float) -> dict[str, Any]:
    """``model``'s card from ``node`` (an inventory ``NodeSpec``: its ``url`` and
    ``api_key()``), ``GET /v1/models/MODEL``: for a model only its remote holds, ``nbytes``
    from the remote's manifest and ``tensors`` from its tensor index (None when unreadable),
    as the scheduler sizes a remote-only model. Waits ``timeout`` seconds beyond the node's
    own bounded question to its remote. Raises: ServerError (unreachable, unknown model)."""
    from sllm.server.models import REMOTE_LOOKUP_SECONDS

    with NodeClient(node.url, api_key=node.api_key(), timeout=timeout + REMOTE_LOOKUP_SECONDS) as c:
        return c.model(model)
