"""Any node is a front door (DESIGN.md): with a cluster inventory (``sllm serve --inventory``),
a completion request for a model that the scheduler places on another node is forwarded
there and its response streamed back through this node.

One step of a request's life, before the model is leased: :meth:`FrontDoor.route` decides
where the request runs. A model resident here is served here at once (nothing beats 0 s);
otherwise it fetches the other nodes' ``/status`` concurrently (a short timeout: an
unreachable node is down and skipped), adds this node's own state (no HTTP to itself) and
ranks the nodes with :func:`sllm.core.scheduler.plan` (a model that only the remote holds is
sized first by a node that can pull it: ``GET /v1/models/MODEL`` reads the remote's manifest).
This node wins ties. :meth:`FrontDoor.forward`
relays the request body to the chosen node with ``x-sllm-forwarded-by: <this node>``, and
streams the answer back byte for byte (SSE events pass through unchanged, so tokens arrive
exactly once). A request that carries that header is always served where it arrives, so a
request makes at most one hop and two nodes never bounce it. Responses name the serving
node (``x-sllm-served-by``) and the estimate that chose it (``x-sllm-estimate-seconds``).
If the chosen node cannot be reached, the request is served here. When the chosen option
frees room by migrating a busy model's running requests to another node (``sllm serve``
gives it :class:`sllm.client.HttpMigrator`), the front door carries the
migrations out first, through the source node's ``POST /v1/migrations``.

It knows the scheduler and httpx; it knows nothing of models or engines.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from sllm.client import remote_card
from sllm.core.inventory import Inventory, NodeSpec, gather_states, parse_status
from sllm.core.scheduler import Migrator, Plan, plan, with_remote_facts
from sllm.errors import MigrationError, SchedulingError, ServerError

log = logging.getLogger("sllm.server")

FORWARDED_HEADER = "x-sllm-forwarded-by"
SERVED_BY_HEADER = "x-sllm-served-by"
ESTIMATE_HEADER = "x-sllm-estimate-seconds"
#: Response headers relayed from the serving node.
RELAYED = ("content-type", "x-sllm-load-seconds", SERVED_BY_HEADER, "x-should-retry", "cache-control")
#: Seconds to wait for another node's ``/status`` when routing.
ROUTE_STATUS_TIMEOUT = 0.5
#: Seconds a forwarded request may wait for the next bytes of its answer (a cold start counts).
FORWARD_READ_SECONDS = 600.0


@dataclass(frozen=True)
class Route:
    """Where a request runs.

    Attributes:
        node: the serving node's name. url: its base URL, None when it is this node.
        estimate_seconds: the scheduler's time to first token there (nan when not planned).
        plan: the ranked options (None when the model is resident here, or unplannable).
    """

    node: str
    url: str | None
    estimate_seconds: float
    plan: Plan | None = None


def _fetch_status(spec: NodeSpec, timeout: float) -> dict[str, Any]:
    from sllm.client import NodeClient

    with NodeClient(spec.url, api_key=spec.api_key(), timeout=timeout) as c:
        return c.status()


class FrontDoor:
    """Routing and forwarding for the node ``name`` of ``inventory``.

    Args:
        inventory: the cluster. name: this node's name in it.
        status_timeout: seconds for each other node's ``/status``.
        migrator: live migration, to free a node by moving its busy models' requests
            (None: routing never plans a migration).

    Raises (constructor):
        UsageError: ``name`` is not a node of the inventory.
    """

    def __init__(self, inventory: Inventory, name: str, *, status_timeout: float = ROUTE_STATUS_TIMEOUT,
                 migrator: Migrator | None = None) -> None:
        from sllm.errors import UsageError

        if name not in inventory.nodes:
            raise UsageError(f"--node-name {name!r}: not a node of {inventory.source} "
                             f"(its nodes: {', '.join(inventory.nodes) or 'none'})")
        self.inventory, self.name, self.status_timeout = inventory, name, status_timeout
        self.migrator = migrator
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        """The shared HTTP client for forwarding (a long read timeout: a cold start may take minutes)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(FORWARD_READ_SECONDS, connect=5.0))
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def route(self, model: str, local_status: Mapping[str, Any], *, prompt_tokens: int = 0) -> Route:
        """Where a request for ``model`` should run (module docstring); never raises."""
        here = parse_status(self.name, local_status)
        if here.resident_model(model) is not None:
            return Route(self.name, None, 0.0)
        others = [s for n, s in self.inventory.nodes.items() if n != self.name]
        states = await asyncio.to_thread(gather_states, others, _fetch_status, timeout=self.status_timeout)
        states[self.name] = here
        migrator = self.migrator
        inventory = await asyncio.to_thread(with_remote_facts, model, self.inventory, states,
                                            lambda spec: remote_card(spec, model, 5.0))  # a remote-only model
        try:
            p = plan(model, inventory, states, prompt_tokens=prompt_tokens, migration=migrator is not None)
        except SchedulingError as exc:
            log.info("routing %s: %s; serving it here", model, exc)
            return Route(self.name, None, math.nan)
        best = p.best
        mine = next((o for o in p.options if o.node == self.name), None)
        if best is None or best.node == self.name or (mine is not None and mine.feasible
                                                       and mine.seconds <= best.seconds):
            chosen, route = mine, Route(self.name, None, mine.seconds if mine is not None else math.nan, p)
        else:
            chosen, route = best, Route(best.node, self.inventory.nodes[best.node].url, best.seconds, p)
        if chosen is not None and chosen.migrate and migrator is not None:
            await asyncio.to_thread(self._make_room, migrator, chosen)
        return route

    def _make_room(self, migrator: Any, option: Any) -> None:
        """Carry out ``option``'s migrations (the busy models that leave its node so the model
        fits); a migration that fails leaves its requests where they were (the node then
        waits for room or answers 503), logged."""
        for mv in option.migrate:
            try:
                migrator.migrate(mv.model, self.inventory.nodes[option.node], self.inventory.nodes[mv.destination],
                                 mv.requests)
                log.info("routing: migrated %s (%d request(s)) from %s to %s to make room", mv.model,
                         len(mv.requests), option.node, mv.destination)
            except (MigrationError, ServerError) as exc:
                log.warning("routing: migrating %s from %s to %s failed: %s", mv.model, option.node,
                            mv.destination, exc)

    async def forward(self, route: Route, path: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict, Any]:
        """Send the request to ``route``'s node; returns (status, headers, async byte iterator)
        of its answer, to stream back. The iterator closes the upstream response at its end.

        Raises:
            ServerError: the node could not be reached (the caller serves the request itself).
        """
        assert route.url is not None
        spec = self.inventory.nodes[route.node]
        out = {"content-type": headers.get("content-type", "application/json"), FORWARDED_HEADER: self.name}
        key = spec.api_key()
        if key:
            out["authorization"] = f"Bearer {key}"
        client = self.client()
        try:
            req = client.build_request("POST", route.url + path, content=body, headers=out)
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise ServerError(f"forwarding to {route.node} ({route.url}) failed: {type(exc).__name__}: {exc}") from exc
        relayed = {k: v for k, v in resp.headers.items() if k.lower() in RELAYED}
        relayed.setdefault(SERVED_BY_HEADER, route.node)
        relayed[FORWARDED_HEADER] = self.name
        relayed[ESTIMATE_HEADER] = f"{route.estimate_seconds:.6f}"

        async def stream() -> Any:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return resp.status_code, relayed, stream()
