"""The startup-time-optimized scheduler (ServerlessLLM §6): where should a request for a model run?

:func:`plan` ranks every node of the cluster by the estimated time to the request's first
token, from plain data (the :class:`~sllm.core.inventory.Inventory` and each node's
:class:`~sllm.core.inventory.NodeState`), with :mod:`sllm.core.estimator`'s estimates:

- the model is resident: 0 s (action "resident");
- it is already in the node's loader queue: what is left of the queue up to it ("loading");
- the node has room: load it from the fastest tier holding it, the remote pull included
  on nodes that hold nothing ("load");
- the node lacks room: free it by unloading idle, unpinned models, least recently used
  first (each costs :data:`UNLOAD_SECONDS`; "unload"), and when that is not enough and
  migration is available, by migrating the running requests of busy models to the node
  that can take them soonest (each costs its destination's load estimate plus
  ``a * tokens + b`` per request; "migrate"), then load;
- otherwise, when the node reports its decode time per token and its mean completion
  length, wait for busy models to finish: each request's expected remaining decode is
  ``max(0, mean_generated - generated so far) * decode_seconds_per_token``, a model frees
  its memory when its last request ends; a load in progress frees its bytes once it has
  finished (its queue estimate), taken room and served the requests waiting for it
  (prefill and ``mean_generated`` tokens of decode); the wait is until enough bytes are
  free after the loads in progress have taken theirs ("wait"; the node itself queues the
  load until then, up to the ``budget_wait_seconds`` its ``/status`` reports: a longer wait
  is "unavailable");
- otherwise the node cannot start it now ("unavailable", ranked last, with the reason).

Freeing room and the transfer overlap as ``sllm serve`` orders them: a model of the node's
tier cache is fetched into DRAM first (its queue and transfer) and room is made after, so an
"unload", "migrate" or "wait" option costs ``max(freeing, queue + transfer) + fixed``; a
model of a ``--models`` directory reserves its room before it is read, so there the costs
add up, ``freeing + queue + transfer + fixed``. A node that lists the tokenizers it holds
(``/status`` ``tokenizers``) and lacks the model's parses one beside the load: beside the
transfer and the fixed cost when the node holds a copy (``--models``, SSD or DRAM), after a
remote pull beside the fixed cost (:func:`sllm.core.estimator.tokenizer_overlap`); the load takes at least the
node's ``tokenizer_seconds``.

With ``prompt_tokens`` the estimated prefill ``a * tokens + b`` (the node's fit) is added.
Nodes that are down are listed apart. Ties break deterministically: seconds, then the
action (resident, loading, load, unload, migrate), then the tier (fastest first), then the
node name; the same input gives the same plan.

Live migration itself is the migration issue's: it implements :class:`Migrator` and
registers it with :func:`register_migrator`; until then ``migrate`` options are planned
(``--simulate`` uses them) but ``--apply`` refuses them. This module does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sllm.core.estimator import (
    EstimateError,
    LoadEstimate,
    MigrationEstimate,
    estimate_load,
    estimate_migration,
    prefill_seconds,
    queue_seconds,
    tokenizer_overlap,
)
from sllm.core.inventory import Inventory, NodeSpec, NodeState
from sllm.errors import SchedulingError

#: Seconds to unload one idle model (release its buffers); small against any load.
UNLOAD_SECONDS = 0.01
ACTIONS = ("resident", "loading", "load", "unload", "migrate", "wait", "unavailable")
TIER_RANK = {"device": 0, "dram": 1, "ssd": 2, "remote": 3, None: 4}


@dataclass(frozen=True)
class Unload:
    """An idle model to unload: name, bytes freed, seconds idle."""

    model: str
    nbytes: int
    idle_seconds: float


@dataclass(frozen=True)
class Move:
    """A busy model whose running requests migrate to ``destination`` to make room.

    Attributes:
        model, nbytes: what moves. requests: the request ids. destination: the node taking them.
        destination_action: how the destination gets the model ("resident", "load", ...).
        load_seconds: the destination's time to have the model ready.
        migration: the ``a * tokens + b`` estimate of re-prefilling the requests there.
        seconds: load_seconds + migration.seconds.
    """

    model: str
    nbytes: int
    requests: tuple[str, ...]
    destination: str
    destination_action: str
    load_seconds: float
    migration: MigrationEstimate
    seconds: float


@dataclass(frozen=True)
class Option:
    """One node's way to start the model, and its estimated time to first token.

    Attributes:
        node: the node. action: one of :data:`ACTIONS`. tier: where the bytes come from
        ("device" when resident; None when unavailable).
        seconds: estimated time to first token (``math.inf`` when unavailable).
        load: the load estimate and its breakdown (None when resident or unavailable).
        unload: idle models unloaded first. migrate: busy models migrated away first.
        freeing_seconds: the unloads' and migrations' (or the wait's) time: during the
            fetch of a tier-cache model, before the load of a ``--models`` one (module
            docstring).
        prefill_seconds: the request's prefill estimate (0 without ``prompt_tokens``).
        reasons: human-readable lines saying why.
    """

    node: str
    action: str
    tier: str | None
    seconds: float
    load: LoadEstimate | None = None
    unload: tuple[Unload, ...] = ()
    migrate: tuple[Move, ...] = ()
    freeing_seconds: float = 0.0
    prefill_seconds: float = 0.0
    reasons: tuple[str, ...] = ()

    @property
    def feasible(self) -> bool:
        """True unless the node cannot start the model now."""
        return self.action != "unavailable"

    def sort_key(self) -> tuple:
        """The deterministic ranking key (module docstring)."""
        return (not self.feasible, self.seconds, ACTIONS.index(self.action), TIER_RANK.get(self.tier, 4), self.node)


@dataclass(frozen=True)
class Plan:
    """The ranked options for one model.

    Attributes:
        model: the model. nbytes: its checkpoint bytes. prompt_tokens: the request's.
        options: the up nodes' options, best first. down: (node, why) of nodes skipped.
        migration: whether migrate options were considered.
    """

    model: str
    nbytes: int
    prompt_tokens: int
    options: tuple[Option, ...]
    down: tuple[tuple[str, str], ...] = ()
    migration: bool = False

    @property
    def best(self) -> Option | None:
        """The first feasible option, or None."""
        return self.options[0] if self.options and self.options[0].feasible else None


class Migrator(Protocol):
    """Carries out a live migration (paper §5); the migration issue implements it."""

    def migrate(self, model: str, source: NodeSpec, destination: NodeSpec, request_ids: Sequence[str]) -> None:
        """Move ``request_ids`` of ``model`` from ``source`` to ``destination``.

        Raises: MigrationError (the source keeps the requests)."""
        ...


_migrator: Migrator | None = None


def register_migrator(migrator: Migrator | None) -> None:
    """Make ``migrator`` the one ``--apply`` uses (None: migration unavailable)."""
    global _migrator
    _migrator = migrator


def get_migrator() -> Migrator | None:
    """The registered :class:`Migrator`, or None while live migration is not available."""
    return _migrator


# ---------------------------------------------------------------------------------------


def model_size(model: str, inventory: Inventory, states: Mapping[str, NodeState]) -> int:
    """``model``'s checkpoint bytes: as an up node reports them, else the inventory's ``[models]``.

    Raises:
        SchedulingError: no node and no inventory entry knows the size.
    """
    for name in sorted(states):
        st = states[name]
        if st.up and st.model_bytes.get(model):
            return int(st.model_bytes[model])
    if model in inventory.model_bytes:
        return int(inventory.model_bytes[model])
    raise SchedulingError(f"the size of {model!r} is unknown: no node holds it",
                          hint=f'add [models."{model}"] nbytes = BYTES to the inventory')


def with_remote_facts(model: str, inventory: Inventory, states: Mapping[str, NodeState],
                      ask: Callable[[NodeSpec], Mapping[str, Any] | None]) -> Inventory:
    """``inventory`` knowing ``model``'s size (and tensor count) when neither a node nor the
    inventory does (a model only the remote holds): ``ask(node)`` returns the model's card
    as a node that can pull it reads it from the remote (``GET /v1/models/MODEL``:
    ``nbytes`` from the manifest, ``tensors`` from the tensor index, or None); the up nodes
    with a remote are asked in name order until one gives the size (one that raises is
    skipped). Unchanged when the size is known already or nobody answers (then
    :func:`model_size` raises as before). Pure but for ``ask``."""
    try:
        model_size(model, inventory, states)
        return inventory
    except SchedulingError:
        pass
    for name in sorted(states):
        st = states[name]
        if not (st.up and st.has_remote) or name not in inventory.nodes:
            continue
        try:
            card = ask(inventory.nodes[name]) or {}
            nbytes, tensors = int(card.get("nbytes") or 0), int(card.get("tensors") or 0)
        except Exception:  # noqa: BLE001 - a node that cannot answer (or answers nonsense) is skipped, as a down node
            continue
        if nbytes > 0:
            counts = {**inventory.model_tensors, model: tensors} if tensors > 0 else inventory.model_tensors
            return replace(inventory, model_bytes={**inventory.model_bytes, model: nbytes}, model_tensors=counts)
    return inventory


def source_tier(model: str, state: NodeState) -> str | None:
    """The fastest tier of the node holding ``model``: "device", "dram", "ssd" ("local"
    counts as "ssd"), "remote" (when the node can pull), or None."""
    if state.resident_model(model) is not None:
        return "device"
    tiers = state.tiers.get(model, ())
    if "dram" in tiers:
        return "dram"
    if "ssd" in tiers or "local" in tiers:
        return "ssd"
    return "remote" if state.has_remote else None


def _tensors(model: str, states: Mapping[str, NodeState], inventory: Inventory) -> int | None:
    """The tensor count of ``model``'s checkpoint from any node that has its index (the same
    checkpoint everywhere), else the inventory's (``[models]``, or the remote's index as
    :func:`with_remote_facts` read it), else None (the estimate then uses the profile's probe
    count)."""
    counted = (st.model_tensors[model] for st in states.values() if st.up and st.model_tensors.get(model))
    return next(counted, inventory.model_tensors.get(model))


def _budget(spec: NodeSpec, state: NodeState) -> int | None:
    return state.max_memory_bytes if state.max_memory_bytes is not None else spec.memory_budget_bytes


def _used(state: NodeState, reserved: Mapping[str, int]) -> int:
    loading = sum(j.nbytes for j in state.loader if state.resident_model(j.model) is None)
    return state.resident_bytes + loading + reserved.get(state.name, 0)


def node_option(
    model: str,
    nbytes: int,
    spec: NodeSpec,
    state: NodeState,
    *,
    inventory: Inventory,
    states: Mapping[str, NodeState],
    prompt_tokens: int = 0,
    migration: bool = False,
    reserved: Mapping[str, int] | None = None,
    unload_seconds: float = UNLOAD_SECONDS,
) -> Option:
    """The option of one up node (module docstring); ``reserved``: bytes already promised on
    nodes by migrations planned in this pass."""
    reserved = reserved or {}
    fit = state.prefill.get(model)
    prefill = prefill_seconds(prompt_tokens, fit) if prompt_tokens else 0.0
    tier = source_tier(model, state)
    if tier == "device":
        res = state.resident_model(model)
        busy = len(res.requests) if res else 0
        return Option(spec.name, "resident", "device", prefill, prefill_seconds=prefill,
                      reasons=(f"resident, serving {busy} request(s)",))
    queued = [j.model for j in state.loader]
    if model in queued:
        q = _loading_seconds(spec, state, queued.index(model), inventory)
        return Option(spec.name, "loading", state.loader[queued.index(model)].tier or None, q + prefill,
                      prefill_seconds=prefill, reasons=(f"already in the loader queue: {q:.3f} s left",))
    if tier is None:
        return Option(spec.name, "unavailable", None, math.inf, reasons=("no tier holds it and the node has no remote",))
    budget = _budget(spec, state)
    if budget is not None and nbytes > budget:
        return Option(spec.name, "unavailable", tier, math.inf,
                      reasons=(f"needs {nbytes} bytes; the node's budget is {budget} bytes",))
    overlaps = _fetched_first(model, state)
    # the parse runs beside the read of a local, SSD or DRAM copy, and after a remote pull (estimator.tokenizer_overlap)
    parse = None if state.tokenizers is None or model in state.tokenizers else tokenizer_overlap(tier, overlaps)
    try:
        load = estimate_load(spec, model, tier, nbytes, queue=state.loader, remote_gbps=inventory.remote_gbps,
                             tensors=_tensors(model, states, inventory), tokenizer=parse)
    except EstimateError as exc:
        return Option(spec.name, "unavailable", tier, math.inf, reasons=(str(exc),))
    reasons = [f"load from {tier}: {load.transfer_seconds:.3f} s transfer + {load.queue_seconds:.3f} s queue + "
               f"{load.fixed_seconds:.3f} s fixed"]
    free = math.inf if budget is None else budget - _used(state, reserved)
    if free >= nbytes:
        return Option(spec.name, "load", tier, load.total_seconds + prefill, load, prefill_seconds=prefill,
                      reasons=tuple(reasons))
    unloads: list[Unload] = []
    idle = sorted((r for r in state.resident if not r.requests and not r.pinned and not r.held),
                  key=lambda r: (-r.idle_seconds, r.model))
    for r in idle:
        if free >= nbytes:
            break
        unloads.append(Unload(r.model, r.nbytes, r.idle_seconds))
        free += r.nbytes
    freeing = unload_seconds * len(unloads)
    if unloads:
        reasons.append(f"unload idle {', '.join(u.model for u in unloads)} to make room")
    if free >= nbytes:
        return Option(spec.name, "unload", tier, _freed_then_loaded(freeing, load, overlaps) + prefill, load, tuple(unloads),
                      freeing_seconds=freeing, prefill_seconds=prefill, reasons=tuple(reasons))
    moves, taken = [], 0
    if migration:
        moves, taken = _plan_moves(model, spec, state, nbytes - free, inventory, states, dict(reserved), unload_seconds)
    if taken < nbytes - free:
        wait = _wait_for_room(spec, state, nbytes, free, model, inventory=inventory)
        if wait is None:
            why = "no room, and the models in use cannot all migrate elsewhere" if migration else \
                f"no room: models in use hold {state.resident_bytes} bytes of {budget}"
            return Option(spec.name, "unavailable", tier, math.inf, load, tuple(unloads), reasons=(*reasons, why))
        limit = state.budget_wait_seconds  # the node fails a load whose room takes longer, once it is fetched
        waited = wait - (load.queue_seconds + load.transfer_seconds if overlaps else 0.0)
        if limit is not None and waited > limit:
            return Option(spec.name, "unavailable", tier, math.inf, load, tuple(unloads), reasons=(
                *reasons, f"no room for {wait:.1f} s: the node gives a load {limit:g} s to find room"))
        freeing += wait
        reasons.append(f"no room: models in use or loading should free it in {wait:.3f} s"
                       + (", while the node fetches it" if overlaps else ""))
        return Option(spec.name, "wait", tier, _freed_then_loaded(freeing, load, overlaps) + prefill, load, tuple(unloads),
                      freeing_seconds=freeing, prefill_seconds=prefill, reasons=tuple(reasons))
    freeing += sum(m.seconds for m in moves)
    reasons.append("migrate " + ", ".join(f"{m.model} ({len(m.requests)} request(s)) to {m.destination}" for m in moves))
    return Option(spec.name, "migrate", tier, _freed_then_loaded(freeing, load, overlaps) + prefill, load, tuple(unloads),
                  tuple(moves), freeing, prefill, tuple(reasons))


def _fetched_first(model: str, state: NodeState) -> bool:
    """True when ``state``'s node brings ``model`` to DRAM before it makes room for it (a
    model of its tier cache, or one only the remote holds); False for a model only a
    ``--models`` directory holds, whose room is reserved before it is read."""
    tiers = state.tiers.get(model, ())
    return "local" not in tiers or "dram" in tiers or "ssd" in tiers


def _freed_then_loaded(freeing: float, load: LoadEstimate, overlaps: bool) -> float:
    """Seconds until the model is ready when making room takes ``freeing`` seconds: during
    the queue and transfer when ``overlaps`` (the node fetches first), else before them."""
    if overlaps:
        return max(freeing, load.queue_seconds + load.transfer_seconds) + load.fixed_seconds
    return freeing + load.total_seconds


def _loading_seconds(spec: NodeSpec, state: NodeState, index: int, inventory: Inventory) -> float:
    """What is left of loader job ``state.loader[index]``: the jobs ahead of it in its queue and itself."""
    job = state.loader[index]
    ahead = [j for j in state.loader[:index] if j.resource in ("", job.resource)] + [job]
    return queue_seconds(spec, ahead, remote_gbps=inventory.remote_gbps)


def _wait_for_room(spec: NodeSpec, state: NodeState, nbytes: int, free: float, model: str, *,
                   inventory: Inventory) -> float | None:
    """Seconds until ``nbytes`` more fit on ``state``'s node, ``free`` bytes being free now
    once the idle models are unloaded (the loads in progress counted as held), or None when
    the node does not report its decode rate and mean completion length, or when what is in
    use never frees enough.

    Memory frees on two counts (module docstring):

    - a busy (or held) resident model, when its last request ends: ``max(0, mean_generated -
      generated so far) * decode_seconds_per_token`` for each; a pinned model never frees;
    - a load in progress: it finishes (what is left of its queue, as a "loading" option
      estimates it), takes room, serves the requests waiting for it (the prefill fit's
      intercept ``b``, since their prompts are not reported, plus ``mean_generated *
      decode_seconds_per_token``: they decode together, batched), and is then idle, so
      unloadable.

    The loads in progress take room in the order they finish (each as soon as enough is
    free: a load the budget cannot hold yet waits for a busy model, as the node's own loader
    does; one that can never fit holds nothing, the node fails it); the new load comes
    after them. Requests that arrive later for these models, which keep them resident
    longer, are not foreseen. Pure and deterministic.
    """
    d, mean_gen = state.decode_seconds_per_token, state.mean_generated_tokens
    if d is None or mean_gen is None:
        return None
    releases = sorted((max((max(0.0, mean_gen - q.completion_tokens) * d for q in r.requests), default=0.0), r.model,
                       r.nbytes) for r in state.resident
                      if (r.requests or r.held) and not r.pinned and r.model != model)  # pinned: never unloaded
    loads = sorted((_loading_seconds(spec, state, i, inventory), i, j.model, j.nbytes)
                   for i, j in enumerate(state.loader)
                   if j.nbytes and j.model != model and state.resident_model(j.model) is None)
    room = free + sum(nb for *_, nb in loads)  # what the loads in progress will take, given back to place them
    pending = list(releases)  # (seconds, model, bytes), soonest first
    clock = 0.0  # the latest release counted in ``room``: ``room`` is free from then on

    def fits(needed: float) -> bool:
        """Whether ``needed`` bytes are ever free, once everything in use has freed its bytes."""
        return room + sum(nb for *_, nb in pending) >= needed

    def until(needed: float, since: float) -> float:
        """The first moment at or after ``since`` (and ``clock``) with ``needed`` bytes free (they fit)."""
        nonlocal room, clock
        while pending and (pending[0][0] <= max(since, clock) or room < needed):
            seconds, _, nb = pending.pop(0)
            room += nb
            clock = max(clock, seconds)
        return max(since, clock)

    for ready, _, job_model, nb in loads:
        if not fits(nb):
            continue  # it can never get room (the node's loader fails it): it holds none
        start = until(nb, ready)
        room -= nb
        serve = prefill_seconds(0, state.prefill.get(job_model)) + mean_gen * d
        pending.append((start + serve, job_model, nb))
        pending.sort()
    return until(nbytes, 0.0) if fits(nbytes) else None


def _plan_moves(
    model: str, spec: NodeSpec, state: NodeState, needed: int, inventory: Inventory,
    states: Mapping[str, NodeState], reserved: dict[str, int], unload_seconds: float,
) -> tuple[list[Move], int]:
    """Busy models of ``state`` to migrate, cheapest first, until ``needed`` bytes are freed;
    their destinations must take them without migrating in turn. Returns (moves, bytes freed)."""
    busy = sorted((r for r in state.resident if r.requests and not r.pinned and not r.held and r.model != model),
                  key=lambda r: (sum(q.tokens for q in r.requests), r.model))
    moves: list[Move] = []
    freed = 0
    for r in busy:
        if freed >= needed:
            break
        best: Option | None = None
        for name in sorted(states):
            other = states[name]
            if name == spec.name or not other.up or name not in inventory.nodes:
                continue
            opt = node_option(r.model, r.nbytes, inventory.nodes[name], other, inventory=inventory, states=states,
                              reserved=reserved, unload_seconds=unload_seconds)
            if opt.action in ("wait", "migrate") or opt.tier == "remote":
                continue  # a destination takes it from a local tier now (a remote pull to make room costs more
                # than the estimate shows: it holds that node's loader and network for every later request).
                # With equal sizes such a move never beats pulling the requested model there directly; what
                # the filter loses is a small busy model freeing room for a big one, or a peer already pulling
                # it. Letting remote destinations in took gpu_cluster_contended.toml's simulated P99 at 2 req/s
                # from 17.4 to 43.7 s (35 migrations, not 1): the estimate misses what moves cost later requests
            if opt.feasible and (best is None or opt.sort_key() < best.sort_key()):
                best = opt
        if best is None:
            continue
        fit = states[best.node].prefill.get(r.model) or state.prefill.get(r.model)
        mig = estimate_migration(r.model, [q.tokens for q in r.requests], fit)
        if best.action not in ("resident", "loading"):
            reserved[best.node] = reserved.get(best.node, 0) + r.nbytes
        moves.append(Move(r.model, r.nbytes, tuple(q.id for q in r.requests), best.node, best.action,
                          best.seconds, mig, best.seconds + mig.seconds))
        freed += r.nbytes
    return moves, freed


def plan(
    model: str,
    inventory: Inventory,
    states: Mapping[str, NodeState],
    *,
    nbytes: int | None = None,
    prompt_tokens: int = 0,
    migration: bool = False,
    exclude: Sequence[str] = (),
    unload_seconds: float = UNLOAD_SECONDS,
) -> Plan:
    """Rank the cluster's nodes for a request for ``model`` (module docstring).

    Args:
        model: the model's name.
        inventory: the nodes' profiles. states: name -> live state (a node missing here
            counts as down).
        nbytes: the checkpoint's bytes (default: :func:`model_size`).
        prompt_tokens: the request's prompt length (adds the prefill estimate).
        migration: consider migrating running requests to make room.
        exclude: node names to leave out (e.g. the node that forwarded the request).

    Raises:
        SchedulingError: the model's size is unknown.
    """
    nbytes = nbytes if nbytes is not None else model_size(model, inventory, states)
    options, down = [], []
    for name, spec in sorted(inventory.nodes.items()):
        if name in exclude:
            continue
        state = states.get(name)
        if state is None or not state.up:
            down.append((name, state.error if state is not None and state.error else "no status"))
            continue
        options.append(node_option(model, nbytes, spec, state, inventory=inventory, states=states,
                                   prompt_tokens=prompt_tokens, migration=migration, unload_seconds=unload_seconds))
    options.sort(key=Option.sort_key)
    return Plan(model, nbytes, prompt_tokens, tuple(options), tuple(down), migration)


@dataclass(frozen=True)
class PlanSummary:
    """A flattened view of an :class:`Option` for tables and JSON (seconds rounded to µs)."""

    rank: int
    node: str
    action: str
    tier: str | None
    seconds: float | None
    queue_seconds: float
    transfer_seconds: float
    fixed_seconds: float
    freeing_seconds: float
    prefill_seconds: float
    unload: list[str] = field(default_factory=list)
    migrate: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def summarize(p: Plan) -> list[PlanSummary]:
    """One :class:`PlanSummary` per option, in rank order (1 = best)."""
    out = []
    for i, o in enumerate(p.options, 1):
        ld = o.load
        out.append(PlanSummary(
            i, o.node, o.action, o.tier, None if math.isinf(o.seconds) else round(o.seconds, 6),
            round(ld.queue_seconds, 6) if ld else 0.0, round(ld.transfer_seconds, 6) if ld else 0.0,
            round(ld.fixed_seconds, 6) if ld else 0.0, round(o.freeing_seconds, 6), round(o.prefill_seconds, 6),
            [u.model for u in o.unload], [f"{m.model}->{m.destination}" for m in o.migrate], list(o.reasons),
        ))
    return out
