"""Live migration on a node: what both sides share (the protocol is ``sllm/core/migration.py``).

- :class:`MigrationLog`: every migration's outcome, in and out, for ``GET /status``
  (``migrations``: counts by outcome, the ones in progress, the latest finished).
- :class:`Peer`: the other node's migration routes over HTTP (httpx), with the timeouts
  each step gets; any failure to reach it, or an error answer, is a
  :class:`~sllm.errors.MigrationError` naming the node and the step.

The source's side is ``migration_out.py``, the destination's ``migration_in.py``, the routes
``migration_api.py``. Routes, on every node (the admin key guards them, ``gate.py``):

- ``POST /v1/migrations``: migrate this node's requests of a model to another node (S).
- ``POST /v1/migrations/incoming``: prepare to receive (D loads the model).
- ``POST /v1/migrations/incoming/{id}/rounds``: one round (``Round``'s JSON).
- ``POST /v1/migrations/incoming/{id}/stream``: D's generated tokens, NDJSON, one line per
  token ``{"id", "pos", "token"}`` and one per finished request ``{"id", "finish_reason",
  "error"}``; the stream closing before every request finished cancels the rest on D.
- ``POST /v1/migrations/incoming/{id}/cancel``: cancel some of its requests on D.
- ``DELETE /v1/migrations/incoming/{id}``: abort; D frees what it allocated.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from sllm.errors import MigrationError

#: Seconds D waits for the next message of a migration before the handover, then aborts it
#: (a source that died or hung leaves nothing allocated on D). ``SLLM_MIGRATION_IDLE_SECONDS``.
IDLE_SECONDS = float(os.environ.get("SLLM_MIGRATION_IDLE_SECONDS", "30"))
#: Seconds S gives D to make the model resident (a cold load from the remote may take minutes).
PREPARE_SECONDS = 600.0
#: Seconds S gives one round (D prefills the tokens before it answers).
ROUND_SECONDS = 120.0
#: Seconds for an abort or a cancel (best effort: D also aborts on its own).
ABORT_SECONDS = 2.0
#: Finished migrations kept in ``/status``.
KEEP_RECENT = 32
OUTCOMES = ("done", "aborted", "resumed", "failed")


@dataclass
class MigrationRecord:
    """One migration as ``/status`` shows it (seconds; tokens).

    ``role``: "out" (this node is the source) or "in". ``outcome``: None while in progress,
    "done" (handed over), "aborted" (the source kept its requests), "resumed" (handed over,
    then the destination failed and the relay node resumed them), "failed" (in: D's copy
    was given up after the handover, e.g. the relay closed the stream).
    """

    id: str
    role: str
    model: str
    peer: str
    requests: list[str]
    started: float = field(default_factory=time.time)
    phase: str = "prepare"
    outcome: str | None = None
    error: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    longest_pause_seconds: float | None = None
    handover_seconds: float | None = None  # from the start to D's answer to the final round
    converged: bool | None = None  # handed over at most delta new tokens (not because max_rounds ran out)
    total_seconds: float | None = None
    bytes_sent: int = 0
    kv_bytes_replaced: int | None = None


class MigrationLog:
    """The node's migrations (see the module docstring). Event-loop only."""

    def __init__(self) -> None:
        self.active: dict[str, MigrationRecord] = {}
        self.recent: collections.deque[MigrationRecord] = collections.deque(maxlen=KEEP_RECENT)
        self.counts = {f"{role}_{o}": 0 for role in ("out", "in") for o in OUTCOMES}

    def start(self, rec: MigrationRecord) -> MigrationRecord:
        self.active[rec.id + rec.role] = rec
        return rec

    def end(self, rec: MigrationRecord, outcome: str, error: str | None = None) -> None:
        """Record ``rec``'s outcome (the first one counts; a later "resumed" replaces "done")."""
        if rec.outcome is not None and not (rec.outcome == "done" and outcome == "resumed"):
            return
        if rec.outcome is not None:
            self.counts[f"{rec.role}_{rec.outcome}"] -= 1
        rec.outcome, rec.error = outcome, error if error is not None else rec.error
        rec.phase = "done" if outcome in ("done", "resumed") else "aborted"
        rec.total_seconds = rec.total_seconds if rec.total_seconds is not None else time.time() - rec.started
        self.counts[f"{rec.role}_{outcome}"] += 1
        if self.active.pop(rec.id + rec.role, None) is not None:
            self.recent.append(rec)

    def find(self, mid: str, role: str = "out") -> MigrationRecord | None:
        """The record of migration ``mid`` (active or recent), or None."""
        rec = self.active.get(mid + role)
        return rec or next((r for r in self.recent if r.id == mid and r.role == role), None)

    def status(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "active": [asdict(r) for r in self.active.values()],
                "recent": [asdict(r) for r in reversed(self.recent)]}


class Peer:
    """Another node's migration routes.

    Args:
        url: its base URL. api_key: its admin key (or API key), or None.
        client: the shared ``httpx.AsyncClient``.
    """

    def __init__(self, url: str, api_key: str | None, client: httpx.AsyncClient) -> None:
        self.url, self.client = url.rstrip("/"), client
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

    async def post(self, path: str, body: Any, *, timeout: float, step: str) -> dict[str, Any]:
        """POST JSON, return the JSON answer.

        Raises:
            MigrationError: unreachable, timed out, or an error status (its message quoted).
        """
        try:
            r = await self.client.post(self.url + path, json=body, headers=self.headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise MigrationError(f"{step}: {self.url} unreachable: {type(exc).__name__}: {exc}") from exc
        return _answer(r, step)

    async def delete(self, path: str, *, timeout: float = ABORT_SECONDS) -> None:
        """Best effort; never raises."""
        try:
            await self.client.delete(self.url + path, headers=self.headers, timeout=timeout)
        except httpx.HTTPError:
            pass

    async def stream(self, path: str, body: Any) -> tuple[httpx.Response, AsyncIterator[dict[str, Any]]]:
        """Open an NDJSON stream (no read timeout: tokens come as they are generated).

        Raises:
            MigrationError: unreachable or an error status.
        """
        req = self.client.build_request("POST", self.url + path, json=body, headers=self.headers,
                                        timeout=httpx.Timeout(None, connect=5.0))
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise MigrationError(f"stream: {self.url} unreachable: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            await resp.aread()
            await resp.aclose()
            _answer(resp, "stream")

        async def events() -> AsyncIterator[dict[str, Any]]:
            async for line in resp.aiter_lines():
                if line:
                    yield json.loads(line)

        return resp, events()


def _answer(r: httpx.Response, step: str) -> dict[str, Any]:
    """The JSON object of a good answer. Raises: MigrationError: an error status (the
    message is the client's: URL, status, the node's own message)."""
    from sllm.client import _message

    if r.status_code >= 400:
        raise MigrationError(f"{step}: {_message(r)}")
    try:
        body = r.json()
    except ValueError:
        body = {}
    return body if isinstance(body, dict) else {}


def ndjson(obj: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()
