"""What-if simulation of a cluster serving a workload (``sllm schedule-plan --simulate``).

A discrete-event simulation (SimPy) of the inventory's nodes serving a list of
:class:`~sllm.core.workload.Request`, under one placement policy. It reuses the real
decision code: at each arrival the policy sees every node's :class:`NodeState` built from
the simulated state and (for ``sllm``) calls :func:`sllm.core.scheduler.plan`; every load
takes :func:`sllm.core.estimator.estimate_transfer` plus the tier's fixed cost; migrations
take :func:`~sllm.core.estimator.estimate_migration`. Only the engines and links are
modelled:

- each node queues loads per resource as ``sllm serve`` does: a remote pull holds its link,
  an SSD read its disk, one load at a time each, a DRAM hit neither; then the load waits
  for room in the memory budget (least recently used idle models unload to make room; it
  waits while models in use hold it, for at most ``budget_wait_seconds``, then fails with the
  requests waiting for it, as ``sllm serve`` does) and pays the loader's fixed cost; the parse of the model's
  tokenizer (the node's ``tokenizer_seconds``) runs beside the transfer and that cost (after it,
  beside the fixed cost only, for a remote pull: :func:`sllm.core.estimator.tokenizer_overlap`)
  where the node holds none of the model's (it keeps the last ``tokenizer_cache`` models', and
  its state lists them, as ``/status`` does). DRAM and SSD tiers
  evict LRU under their capacities (a load fills both on its way up); the remote is behind
  every node;
- a resident model serves any number of requests at once (batched): a request takes
  ``a * prompt + b`` to its first token (the node's prefill fit) and then
  ``generated * decode_seconds_per_token``; a model idle for ``keep_alive_seconds`` unloads;
- a migration (policy ``sllm``) loads the model on the destination, re-prefills the running
  requests there (``a * tokens + b`` each) while the source keeps decoding, then moves them
  and frees the source.

Policies (:data:`POLICIES`): ``sllm`` (the scheduler, with migration), ``sllm-no-migration``,
``serverlessllm`` (the anchor's rules: only nodes holding a local copy are candidates, the
remote tier is never estimated, DRAM to device at a hard-coded 25 GB/s, disk bandwidth as a
buffered read measures it, i.e. the page cache's (the node's DRAM figure), migration constants
a = 0.01 s/token and b = 0.1 s never fitted; its free-GPU accounting bug is not modelled),
``availability`` (the model's resident node if any, else a random node with room, loading from
wherever the model is: Shepherd*-like) and ``random``. Not modelled: remote bandwidth shared
between concurrent pulls, network hops, engine batching limits.
"""

from __future__ import annotations

import math
import random
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sllm.core.estimator import (
    DEFAULT_FIT,
    covering_parse,
    estimate_migration,
    estimate_transfer,
    fixed_seconds,
    prefill_seconds,
    tokenizer_overlap,
)
from sllm.core.inventory import (
    RESOURCE_OF,
    Inventory,
    LoaderJob,
    NodeSpec,
    NodeState,
    PrefillFit,
    ResidentModel,
    RunningRequest,
    TierSpec,
)
from sllm.core.node_state import BUDGET_WAIT_SECONDS
from sllm.core.scheduler import Option, plan
from sllm.core.simresults import PolicyResult, RequestRecord, estimate_errors, percentile, summarize
from sllm.core.workload import Request
from sllm.errors import UsageError

POLICIES = ("sllm", "sllm-no-migration", "serverlessllm", "availability", "random")
#: ServerlessLLM's hard-coded PCIe bandwidth, GB/s, and its unfitted migration constants.
ANCHOR_PCIE_GBPS = 25.0
ANCHOR_FIT = PrefillFit(0.01, 0.1, 0)


@dataclass(frozen=True)
class SimConfig:
    """How the simulated cluster behaves.

    Attributes:
        keep_alive_seconds: idle seconds before a model unloads (as ``sllm serve --keep-alive``).
        replicas: SSD copies of each model at the start, placed round-robin over the nodes; a
            node whose SSD capacity cannot hold all its copies keeps the models listed first.
        prefill: the prefill fit of nodes that give none (``[nodes.X.engine]``).
        decode_seconds_per_token: decode time per generated token of nodes that give none.
        seed: seeds the ``random`` and ``availability`` choices.
        forward_seconds: a front door's routing and forwarding hop, added before the first
            token of a request that enters at a node (``Request.door``) other than the one
            that serves it (0: not modelled).
        request_seconds: what every request spends outside the engine before its first token
            (the HTTP round trip, tokenization, the first SSE event), beyond the prefill fit,
            which a node measures from submission to its engine (0: not modelled).
        tokenizer_cache: tokenizers a node keeps, the last models' it loaded (as ``sllm
            serve``: ``sllm.server.loading.TOKENIZER_CACHE_SIZE``).
        budget_wait_seconds: how long a load waits for room in a node's budget before it
            fails, with every request waiting for it (as ``sllm serve``:
            :data:`~sllm.core.node_state.BUDGET_WAIT_SECONDS`; nodes report it to the
            scheduler); None: as long as it takes.
    """

    keep_alive_seconds: float = 60.0
    replicas: int = 1
    prefill: PrefillFit = PrefillFit(1e-4, 0.02, 0)
    decode_seconds_per_token: float = 0.02
    seed: int = 0
    forward_seconds: float = 0.0
    request_seconds: float = 0.0
    tokenizer_cache: int = 8
    budget_wait_seconds: float | None = BUDGET_WAIT_SECONDS


class _Lru:
    """A tier's models, least recently used first, within ``capacity`` bytes (None: no limit)."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, model: str) -> bool:
        return model in self.items

    def put(self, model: str, nbytes: int, protected: set[str] | frozenset[str] = frozenset()) -> None:
        if self.capacity is not None and nbytes > self.capacity:
            return
        self.items[model] = nbytes
        self.items.move_to_end(model)
        while self.capacity is not None and sum(self.items.values()) > self.capacity:
            victim = next((m for m in self.items if m != model and m not in protected), None)
            if victim is None:
                return
            del self.items[victim]


class _AnyModel(Mapping):
    """A prefill-fit mapping that answers the node's fit for every model."""

    def __init__(self, fit: PrefillFit) -> None:
        self.fit = fit

    def __getitem__(self, key: str) -> PrefillFit:
        return self.fit

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@dataclass
class _Active:
    request: Request
    node: _Node
    inst: _Instance
    decode_start: float | None = None


@dataclass
class _Instance:
    model: str
    nbytes: int
    last_used: float
    active: dict[int, _Active] = field(default_factory=dict)
    migrating: bool = False


@dataclass
class _Job:
    model: str
    nbytes: int
    tier: str
    created: float
    start: float | None = None
    resource: str | None = None
    work_seconds: float = 0.0  # transfer + fixed cost: the rest of its time is queueing
    failed: bool = False  # no room within the budget wait


class _Node:
    def __init__(self, env: Any, spec: NodeSpec, cfg: SimConfig) -> None:
        import simpy

        self.env, self.spec = env, spec
        self.link = simpy.Resource(env, capacity=1)  # remote pulls, one at a time
        self.disk = simpy.Resource(env, capacity=1)  # SSD reads, one at a time
        self.jobs: list[_Job] = []
        self.loading: dict[str, Any] = {}
        self.instances: dict[str, _Instance] = {}
        self.pending: Counter[str] = Counter()
        dram, ssd = spec.tiers.get("dram"), spec.tiers.get("ssd")
        self.dram = _Lru(dram.capacity_bytes if dram else 0)
        self.ssd = _Lru(ssd.capacity_bytes if ssd else 0)
        self.budget = spec.memory_budget_bytes if spec.memory_budget_bytes is not None else math.inf
        self.reserved = 0
        self.fit = spec.prefill or cfg.prefill
        self.decode = spec.decode_seconds_per_token if spec.decode_seconds_per_token is not None \
            else cfg.decode_seconds_per_token
        self._freed = env.event()
        self.mean_generated: float | None = None
        self.tokenizers: OrderedDict[str, None] = OrderedDict()  # models whose tokenizer it holds, LRU first
        self.tokenizer_cache = cfg.tokenizer_cache
        self.budget_wait = cfg.budget_wait_seconds

    def hold_tokenizer(self, model: str) -> None:
        self.tokenizers[model] = None
        self.tokenizers.move_to_end(model)
        while len(self.tokenizers) > self.tokenizer_cache:
            self.tokenizers.popitem(last=False)

    def used(self) -> int:
        return sum(i.nbytes for i in self.instances.values()) + self.reserved

    def notify(self) -> None:
        ev, self._freed = self._freed, self.env.event()
        ev.succeed()

    def tier_of(self, model: str) -> str:
        if model in self.instances:
            return "device"
        return "dram" if model in self.dram else "ssd" if model in self.ssd else "remote"

    def idle(self, inst: _Instance) -> bool:
        return not inst.active and not self.pending[inst.model] and not inst.migrating

    def unload(self, model: str) -> None:
        self.instances.pop(model, None)
        self.notify()

    def state(self, now: float, fit: PrefillFit | None = None) -> NodeState:
        resident = []
        for m, inst in sorted(self.instances.items()):
            reqs = tuple(RunningRequest(str(a.request.id), a.request.prompt_tokens,
                                        0 if a.decode_start is None or not self.decode else
                                        min(a.request.generated_tokens, int((now - a.decode_start) / self.decode)))
                         for a in inst.active.values())
            busy = bool(reqs) or self.pending[m] > 0
            resident.append(ResidentModel(m, inst.nbytes, held=inst.migrating or (self.pending[m] > 0 and not reqs),
                                          idle_seconds=0.0 if busy else now - inst.last_used, requests=reqs))
        models = set(self.dram.items) | set(self.ssd.items)
        tiers = {m: tuple(t for t, lru in (("dram", self.dram), ("ssd", self.ssd)) if m in lru) for m in sorted(models)}
        jobs = sorted(self.jobs, key=lambda j: (j.start is None, j.created))
        loader = tuple(LoaderJob(j.model, j.nbytes, j.tier, 0.0 if j.start is None else now - j.start,
                                 j.start is not None, j.resource) for j in jobs)
        budget = None if math.isinf(self.budget) else int(self.budget)
        return NodeState(self.spec.name, max_memory_bytes=budget, resident=tuple(resident), tiers=tiers,
                         loader=loader, prefill=_AnyModel(fit or self.fit), has_remote=True,
                         decode_seconds_per_token=self.decode, mean_generated_tokens=self.mean_generated,
                         tokenizers=frozenset(self.tokenizers), budget_wait_seconds=self.budget_wait)


class Simulation:
    """One run of one policy over a workload (module docstring).

    Args:
        inventory: the nodes (their tiers need ``capacity_bytes`` for eviction to happen;
            a node's budget is its ``max_memory_bytes`` or device memory).
        models: model name -> bytes.
        requests: the workload, each with its model.
        policy: one of :data:`POLICIES`.
        config: :class:`SimConfig`.

    Raises:
        UsageError: an unknown policy, no nodes, or a request for a model not in ``models``.
    """

    def __init__(self, inventory: Inventory, models: Mapping[str, int], requests: Sequence[Request], policy: str,
                 config: SimConfig = SimConfig()) -> None:
        import simpy

        if policy not in POLICIES:
            raise UsageError(f"--policy {policy!r}: choose {', '.join(POLICIES)}")
        if not inventory.nodes:
            raise UsageError(f"{inventory.source}: the inventory has no nodes to simulate")
        unknown = {r.model for r in requests} - set(models)
        if unknown:
            raise UsageError(f"requests for models not in --models: {', '.join(sorted(unknown))}")
        self.inventory, self.models, self.requests, self.policy, self.config = (
            inventory, dict(models), list(requests), policy, config)
        self.env = simpy.Environment()
        self.nodes = {n: _Node(self.env, s, config) for n, s in sorted(inventory.nodes.items())}
        self.rng = random.Random(config.seed)
        self.records: list[RequestRecord] = []
        self.loads: Counter[str] = Counter()
        self.migrations = 0
        self.anchor = _anchor_inventory(inventory)
        mean_gen = sum(r.generated_tokens for r in self.requests) / len(self.requests) if self.requests else None
        for node in self.nodes.values():
            node.mean_generated = mean_gen  # as a node's /status reports its own mean completion length
        names = list(self.nodes)
        # placed last to first, so that an SSD too small for all its copies keeps the models listed first
        # (the most popular under assign_models' Zipf order), not the last ones put
        for i, (m, nbytes) in reversed(list(enumerate(self.models.items()))):
            for k in range(min(config.replicas, len(names))):
                self.nodes[names[(i + k) % len(names)]].ssd.put(m, nbytes)

    # -- the run --------------------------------------------------------------------------

    def run(self) -> PolicyResult:
        """Simulate until every request is done; the policy's figures."""
        for r in sorted(self.requests, key=lambda r: (r.arrival_seconds, r.id)):
            self.env.process(self._arrive(r))
        self.env.run()
        done = {rec.id for rec in self.records}
        self.records += [RequestRecord(r.id, r.model, "-", r.arrival_seconds, None, math.nan, math.nan, "-")
                         for r in self.requests if r.id not in done]  # still waiting for room at the end
        return summarize(self.policy, self.records, self.loads, self.migrations)

    def _arrive(self, r: Request) -> Iterator[Any]:
        yield self.env.timeout(r.arrival_seconds)
        yield from self._serve(r)

    def _serve(self, r: Request) -> Iterator[Any]:
        env = self.env
        node_name, option = self.choose(r)
        node = self.nodes[node_name]
        hops = 0.0
        if r.door and r.door != node_name and self.config.forward_seconds:
            hops += self.config.forward_seconds
            yield env.timeout(self.config.forward_seconds)  # the front door's hop
        if self.config.request_seconds:
            hops += self.config.request_seconds
            yield env.timeout(self.config.request_seconds)  # the request's own way to the engine and back
        action, estimate = (None, None) if option is None else (option.action, option.seconds + hops)
        for mv in (option.migrate if option is not None else ()):
            env.process(self._migrate(node, mv))
        node.pending[r.model] += 1
        job: _Job | None = None
        try:
            while r.model not in node.instances:
                if node.spec.memory_budget_bytes is not None and self.models[r.model] > node.budget:
                    self.records.append(RequestRecord(r.id, r.model, node_name, r.arrival_seconds, None, 0.0, 0.0, "-",
                                                      action, estimate))
                    return
                ev = node.loading.get(r.model) or env.process(self._load(node, r.model))
                job = yield ev
                if job.failed:  # no room in time: the node answers its waiting requests with an error
                    self.records.append(RequestRecord(r.id, r.model, node_name, r.arrival_seconds, None,
                                                      env.now - r.arrival_seconds, 0.0, job.tier, action, estimate))
                    return
        finally:
            node.pending[r.model] -= 1
        ready = env.now
        inst = node.instances[r.model]
        act = _Active(r, node, inst)
        inst.active[r.id] = act
        yield env.timeout(prefill_seconds(r.prompt_tokens, node.fit))
        ttft = env.now - r.arrival_seconds
        startup = ready - r.arrival_seconds
        queued = 0.0 if job is None else max(0.0, startup - job.work_seconds)
        tier = "device" if job is None else job.tier
        self.records.append(RequestRecord(r.id, r.model, node_name, r.arrival_seconds, ttft, startup, queued, tier,
                                          action, estimate))
        act.decode_start = env.now
        yield env.timeout(r.generated_tokens * act.node.decode)
        act.inst.active.pop(r.id, None)
        act.inst.last_used = env.now
        act.node.notify()
        env.process(self._reap(act.node, act.inst))

    def _load(self, node: _Node, model: str) -> Iterator[Any]:
        env, nbytes = self.env, self.models[model]
        done = env.event()
        node.loading[model] = done
        tier = node.tier_of(model)
        job = _Job(model, nbytes, tier, env.now, resource=RESOURCE_OF[tier])
        node.jobs.append(job)
        resource = {"link": node.link, "disk": node.disk}.get(job.resource or "")
        seconds = estimate_transfer(node.spec, tier, nbytes, remote_gbps=self.inventory.remote_gbps)
        parse = 0.0 if model in node.tokenizers else node.spec.tokenizer_seconds  # beside the load, as the node
        fixed = covering_parse(fixed_seconds(node.spec, tier), parse, seconds, tokenizer_overlap(tier, True))
        job.work_seconds = seconds + fixed
        try:
            if resource is None:  # a DRAM hit queues for nothing
                job.start = env.now
                yield env.timeout(seconds)
            else:
                with resource.request() as req:
                    yield req
                    job.start = env.now
                    yield env.timeout(seconds)
            job.resource, job.start = None, None  # out of the resource's queue; its bytes still count
            deadline = math.inf if node.budget_wait is None else env.now + node.budget_wait
            while node.used() + nbytes > node.budget:  # then room in the memory budget
                idle = [i for i in node.instances.values() if node.idle(i)]
                if idle:
                    node.unload(min(idle, key=lambda i: (i.last_used, i.model)).model)
                    continue
                if env.now >= deadline:
                    job.failed = True
                    break
                yield node._freed if math.isinf(deadline) else node._freed | env.timeout(deadline - env.now)
            if job.failed:
                done.succeed(job)
                return job
            node.reserved += nbytes
            yield env.timeout(fixed)
            node.reserved -= nbytes
            node.instances[model] = _Instance(model, nbytes, env.now)
            node.hold_tokenizer(model)
            protected = set(node.instances) if node.spec.device_kind == "cpu" else set()
            node.dram.put(model, nbytes, protected)
            node.ssd.put(model, nbytes)
            self.loads[tier] += 1
        finally:
            node.jobs.remove(job)
            del node.loading[model]
        done.succeed(job)
        return job

    def _reap(self, node: _Node, inst: _Instance) -> Iterator[Any]:
        ka = self.config.keep_alive_seconds
        yield self.env.timeout(ka)
        if node.instances.get(inst.model) is inst and node.idle(inst) and self.env.now - inst.last_used >= ka - 1e-9:
            node.unload(inst.model)

    def _migrate(self, src: _Node, mv: Any) -> Iterator[Any]:
        inst = src.instances.get(mv.model)
        if inst is None or inst.migrating or not inst.active:
            return
        inst.migrating = True
        dst = self.nodes[mv.destination]
        dst.pending[mv.model] += 1
        try:
            while mv.model not in dst.instances:
                job = yield dst.loading.get(mv.model) or self.env.process(self._load(dst, mv.model))
                if job.failed:  # the destination found no room: the requests stay where they are
                    return
            now = self.env.now
            tokens = [q.tokens for r in src.state(now).resident if r.model == mv.model for q in r.requests]
            yield self.env.timeout(estimate_migration(mv.model, tokens, dst.fit).seconds)
            dinst = dst.instances[mv.model]
            for rid, act in list(inst.active.items()):
                act.node, act.inst = dst, dinst
                dinst.active[rid] = act
            inst.active.clear()
        finally:
            dst.pending[mv.model] -= 1
            inst.migrating = False
        self.migrations += 1
        if src.instances.get(mv.model) is inst and src.idle(inst):
            src.unload(mv.model)

    # -- policies -------------------------------------------------------------------------

    def states(self, fit: PrefillFit | None = None, has_remote: bool = True) -> dict[str, NodeState]:
        """Every node's state now, as the scheduler sees a live cluster."""
        now = self.env.now
        return {n: replace(node.state(now, fit), has_remote=has_remote) for n, node in self.nodes.items()}

    def choose(self, r: Request) -> tuple[str, Option | None]:
        """The policy's node for ``r`` (and the scheduler's option, for the scheduler policies)."""
        nbytes = self.models[r.model]
        if self.policy in ("sllm", "sllm-no-migration"):
            p = plan(r.model, self.inventory, self.states(), nbytes=nbytes, prompt_tokens=r.prompt_tokens,
                     migration=self.policy == "sllm")
            # no feasible option: only a model larger than every budget now (loads in progress count as freeing
            # room: none of the 3110 requests at 3 req/s on gpu_cluster_contended.toml, seeds 0-5, comes here)
            return (p.best.node, p.best) if p.best else (self._least_busy(r.model), None)
        if self.policy == "serverlessllm":
            p = plan(r.model, self.anchor, self.states(ANCHOR_FIT, has_remote=False), nbytes=nbytes,
                     prompt_tokens=r.prompt_tokens, migration=True)
            if p.best:
                return p.best.node, p.best
            roomy = [n for n, node in self.nodes.items() if node.budget - node.used() >= nbytes]
            return (roomy[0] if roomy else self._least_busy(r.model)), None
        names = list(self.nodes)
        if self.policy == "availability":
            warm = [n for n in names
                    if r.model in self.nodes[n].instances and not self.nodes[n].instances[r.model].migrating]
            if warm:
                return warm[0], None
            roomy = [n for n in names if self._room_after_idle(self.nodes[n]) >= nbytes]
            return self.rng.choice(roomy or names), None
        return self.rng.choice(names), None

    def _room_after_idle(self, node: _Node) -> float:
        return node.budget - node.used() + sum(i.nbytes for i in node.instances.values() if node.idle(i))

    def _least_busy(self, model: str) -> str:
        def load(n: str) -> tuple:
            node = self.nodes[n]
            return (sum(len(i.active) for i in node.instances.values()) + sum(node.pending.values()) + len(node.jobs),
                    ("device", "dram", "ssd", "remote").index(node.tier_of(model)), n)
        return min(self.nodes, key=load)


def _anchor_inventory(inv: Inventory) -> Inventory:
    """The inventory as ServerlessLLM's scheduler sees it: PCIe at 25 GB/s, the disk at the
    page cache's speed (a buffered read of a file just written), no remote estimate."""
    nodes = {}
    for name, spec in inv.nodes.items():
        tiers = dict(spec.tiers)
        dram = tiers.get("dram")
        buffered = dram.gbps if dram else ANCHOR_PCIE_GBPS
        if "ssd" in tiers:
            tiers["ssd"] = replace(tiers["ssd"], gbps=buffered)
        tiers["dram"] = TierSpec("dram", ANCHOR_PCIE_GBPS, dram.capacity_bytes if dram else None)
        nodes[name] = replace(spec, tiers=tiers, device_kind="cuda")
    return replace(inv, nodes=nodes)


def simulate(inventory: Inventory, models: Mapping[str, int], requests: Sequence[Request], policies: Sequence[str],
             config: SimConfig = SimConfig()) -> list[PolicyResult]:
    """Run each policy on the same workload (a fresh cluster each); results in the given order.

    Raises:
        UsageError: as :class:`Simulation`.
    """
    return [Simulation(inventory, models, requests, p, config).run() for p in policies]


__all__ = ["DEFAULT_FIT", "POLICIES", "PolicyResult", "RequestRecord", "SimConfig", "Simulation", "estimate_errors",
           "percentile", "simulate", "summarize"]
