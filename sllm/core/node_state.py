"""The live state of a cluster's nodes: what each reports about itself now, parsed from its
``GET /status`` (:func:`parse_status`), fetched for all nodes concurrently with a short
timeout (:func:`gather_states`); a node that does not answer is marked down, not fatal.

Plain data (:class:`NodeState` and its parts: resident models, running requests, loader
jobs, prefill fits). The HTTP call itself is injected (``fetch``), so this module does no
network I/O of its own. The static half of the inventory (nodes, tiers, bandwidths) is
:mod:`sllm.core.inventory`, which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sllm.core.inventory import NodeSpec

#: Seconds to wait for a node's ``/status`` before marking it down.
STATUS_TIMEOUT_SECONDS = 1.0

#: How long ``sllm serve`` lets a load wait for room in its memory budget (leased models to go
#: idle) before it fails the load, seconds; a node reports it in ``/status``.
BUDGET_WAIT_SECONDS = 120.0


@dataclass(frozen=True)
class RunningRequest:
    """A request a node is generating: its id and token counts (prompt, generated so far)."""

    id: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        """Prompt + generated tokens: what a migration re-prefills (paper §5)."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ResidentModel:
    """A model loaded on a node's device.

    Attributes:
        model: its name. nbytes: the memory it holds: weights and KV cache, bytes. pinned: never unloaded by the budget.
        idle_seconds: seconds since its last request ended (0 while serving).
        requests: what it is generating now.
        held: not to be unloaded or migrated now, but freed later like a busy model (the
            simulator's models that are migrating or about to admit queued requests); a live
            node reports none.
    """

    model: str
    nbytes: int
    pinned: bool = False
    idle_seconds: float = 0.0
    requests: tuple[RunningRequest, ...] = ()
    held: bool = False


#: The queue a load from each tier waits in on a node (``sllm serve`` queues loads per
#: resource): a remote pull holds the link, an SSD read the disk; a DRAM hit waits for neither.
RESOURCE_OF = {"remote": "link", "ssd": "disk", "dram": None, "device": None}


@dataclass(frozen=True)
class LoaderJob:
    """A load in one of a node's loader queues (per resource, one load at a time each).

    Attributes:
        model: what loads. nbytes: its bytes (0 when unknown yet). tier: where its bytes
        come from ("dram", "ssd", "remote"; "" when unknown). elapsed_seconds: how long the
        running one has held its resource (0 for a queued one). running: it holds its
        resource now. resource: the queue it is in ("link", "disk"; None: a DRAM hit that
        waits for none; "" unknown: counted in every queue).
    """

    model: str
    nbytes: int = 0
    tier: str = ""
    elapsed_seconds: float = 0.0
    running: bool = False
    resource: str | None = ""


@dataclass(frozen=True)
class PrefillFit:
    """A node's fit of prefill seconds = a * tokens + b for one model (paper §6).

    Attributes:
        a_seconds_per_token: slope a, seconds per token.
        b_seconds: intercept b, seconds.
        samples: prefill timings the fit used (0: the default constants).
    """

    a_seconds_per_token: float
    b_seconds: float
    samples: int = 0


@dataclass(frozen=True)
class NodeState:
    """What a node reports about itself now (``/status``), or that it is down.

    Attributes:
        name: the node's inventory name.
        up: False when ``/status`` did not answer in time (``error`` says why).
        error: why it is down (None when up).
        max_memory_bytes: its resident-weights budget (None: no limit reported).
        resident: loaded models.
        tiers: model -> local tiers holding it, fastest first ("dram", "ssd"; "local" for a
            ``--models`` directory, read like an SSD entry).
        model_bytes: model -> bytes, for the models whose size the node knows.
        loader: its loader queue, the running load first.
        prefill: model -> :class:`PrefillFit` measured there.
        has_remote: True when the node can pull from the remote store.
        decode_seconds_per_token: the node's measured decode time per token (None: unknown).
        mean_generated_tokens: the mean completion length of the requests it served (None:
            unknown). With the decode time, they let the scheduler estimate when busy models
            will free their memory.
        model_tensors: model -> its checkpoint's tensor count, where the node has the index
            (a local or SSD copy): the per-tensor part of a load's fixed cost.
        budget_wait_seconds: how long a load waits there for room in the budget before it
            fails (``sllm serve``: 120 s; None: not reported, as long as it takes).
        tokenizers: the models whose tokenizer the node holds (a load of another pays the
            node's ``tokenizer_seconds``); None: not reported (nothing counted).
    """

    name: str
    up: bool = True
    error: str | None = None
    max_memory_bytes: int | None = None
    resident: tuple[ResidentModel, ...] = ()
    tiers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    model_bytes: Mapping[str, int] = field(default_factory=dict)
    loader: tuple[LoaderJob, ...] = ()
    prefill: Mapping[str, PrefillFit] = field(default_factory=dict)
    has_remote: bool = True
    decode_seconds_per_token: float | None = None
    mean_generated_tokens: float | None = None
    model_tensors: Mapping[str, int] = field(default_factory=dict)
    budget_wait_seconds: float | None = None
    tokenizers: frozenset[str] | None = None

    def resident_model(self, model: str) -> ResidentModel | None:
        """The resident entry of ``model``, or None."""
        return next((r for r in self.resident if r.model == model), None)

    @property
    def resident_bytes(self) -> int:
        """Bytes the resident models hold: weights and KV caches."""
        return sum(r.nbytes for r in self.resident)


def parse_status(name: str, status: Mapping[str, Any]) -> NodeState:
    """A node's ``GET /status`` document as a :class:`NodeState` (fields missing from older
    nodes default to empty; a malformed document marks the node down)."""
    try:
        resident = tuple(
            ResidentModel(
                # the memory it holds: its weights and its engine's KV cache (both count in the node's budget)
                r["model"], int(r.get("nbytes") or 0) + int((r.get("kv") or {}).get("total_bytes") or 0),
                bool(r.get("pinned", False)), float(r.get("idle_seconds", 0.0)),
                tuple(RunningRequest(str(q.get("id", "")), int(q.get("prompt_tokens", 0)),
                                     int(q.get("completion_tokens", 0))) for q in r.get("requests", ())),
            )
            for r in status.get("resident", ())
        )
        tiers: dict[str, tuple[str, ...]] = {}
        sizes: dict[str, int] = {}
        for m in status.get("models", ()):
            tiers[m["model"]] = tuple(t for t in m.get("tiers", ()) if t in ("dram", "ssd", "local"))
            if m.get("nbytes"):
                sizes[m["model"]] = int(m["nbytes"])
        for name, nbytes in (status.get("model_bytes") or {}).items():
            if nbytes:
                sizes[name] = int(nbytes)
        for r in resident:
            sizes.setdefault(r.model, r.nbytes)
        loader = tuple(
            LoaderJob(j["model"], int(j.get("nbytes") or 0), str(j.get("tier") or ""),
                      float(j.get("elapsed_seconds", 0.0)), bool(j.get("running", i == 0)),
                      j["resource"] if "resource" in j else "")
            for i, j in enumerate(status.get("loader_queue", status.get("loading", ())))
        )
        prefill = {m: PrefillFit(float(f["a_seconds_per_token"]), float(f["b_seconds"]), int(f.get("samples", 0)))
                   for m, f in (status.get("prefill_fit") or {}).items()}
        cache = status.get("cache")
        engine = status.get("engine") or {}
        decode = engine.get("decode_seconds_per_token")
        mean_gen = engine.get("mean_generated_tokens")
        counts = {str(k): int(v) for k, v in (status.get("model_tensors") or {}).items() if int(v) > 0}
        budget_wait = status.get("budget_wait_seconds")
        held = status.get("tokenizers")
        return NodeState(name, True, None, status.get("max_memory_bytes"), resident, tiers, sizes, loader, prefill,
                         model_tensors=counts, has_remote=bool(cache and cache.get("remote")),
                         decode_seconds_per_token=None if decode is None else float(decode),
                         mean_generated_tokens=None if mean_gen is None else float(mean_gen),
                         budget_wait_seconds=None if budget_wait is None else float(budget_wait),
                         tokenizers=None if held is None else frozenset(str(m) for m in held))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return NodeState(name, up=False, error=f"malformed /status: {type(exc).__name__}: {exc}")


def gather_states(
    nodes: Iterable[NodeSpec],
    fetch: Callable[[NodeSpec, float], Mapping[str, Any]],
    *,
    timeout: float = STATUS_TIMEOUT_SECONDS,
) -> dict[str, NodeState]:
    """Every node's live state, fetched concurrently (one thread per node).

    Args:
        nodes: the nodes to ask.
        fetch: ``fetch(node, timeout) -> /status document``; any exception marks the node
            down with the exception's message (e.g. a :class:`~sllm.errors.ServerError`).
        timeout: seconds each fetch may take (passed to ``fetch``; also a bound on the wait).

    Returns: name -> :class:`NodeState`, sorted by name.
    """
    nodes = list(nodes)
    if not nodes:
        return {}

    def one(spec: NodeSpec) -> NodeState:
        try:
            return parse_status(spec.name, fetch(spec, timeout))
        except Exception as exc:  # noqa: BLE001 - an unreachable or broken node is down, not fatal
            return NodeState(spec.name, up=False, error=str(exc) or type(exc).__name__)

    with ThreadPoolExecutor(max_workers=min(32, len(nodes)), thread_name_prefix="sllm-status") as pool:
        futures = {spec.name: pool.submit(one, spec) for spec in nodes}
        out = {}
        for name, fut in sorted(futures.items()):
            try:
                out[name] = fut.result(timeout=timeout + 5.0)
            except Exception as exc:  # noqa: BLE001 - the fetch ignored its timeout
                out[name] = NodeState(name, up=False, error=f"no answer: {type(exc).__name__}")
    return out
