"""Startup-time estimators (ServerlessLLM §6), pure functions of plain data.

**Load time** of model *m* on node *n* (paper §6.1, "estimating model loading time")::

    t_load(m, n) = q(n) + t_transfer(m, n, tier) + c(n)

- ``q(n)``: the wait in *n*'s loader queue for the resource the load needs (``sllm serve``
  queues loads per resource: a remote pull waits for the node's link, an SSD read for its
  disk, a DRAM hit for neither): the time left of the load holding it plus the whole
  estimate of each one queued for it;
- ``t_transfer``: moving *m*'s bytes up from the fastest tier holding it. Its stages:
  a pull from the remote (``nbytes / remote GB/s``, and the SSD write when the node
  measured its write bandwidth separately), or an SSD read (``nbytes / ssd GB/s``), then
  DRAM to the device (``nbytes / dram GB/s``; zero on a CPU node, whose model *is* its
  DRAM buffers). The tier cache pipelines a pull by chunk, so on a pipelined node the
  stages cost the slowest stage plus the fill of the others,
  ``max(t_i) + (sum(t_i) - max(t_i)) / k`` for ``k = ceil(nbytes / chunk_bytes)`` chunks
  (the textbook pipeline, as ``benchmarks/tier_pipeline.py`` measured: the pipelined time
  is close to the slowest step, not to the sum); on an unpipelined node, ``sum(t_i)``;
- ``c(n)``: the loader's fixed cost (skeleton build, weight assignment), measured by
  ``load-bench --tiers``.

When the node's profile has the **load path** of a tier (``tiers.T.load_fixed_seconds`` and
``load_gbps``: a cold start from that tier timed the way ``sllm serve`` does it and split
into a fixed part and a per-byte part, :mod:`sllm.core.loadpath`), a load from that tier is
``q(n) + nbytes / load_gbps + load_fixed_seconds`` instead: one stage, the tier's own
fixed cost. Each tier's fixed costs differ (a pull's metadata round trips and entry commit,
an SSD entry's lease and side files); one node-wide ``c(n)`` misestimates the small, fast
loads where they dominate (``benchmarks/estimator_accuracy.py``). Those fixed parts were
timed on one model; a model with another tensor count builds a bigger or smaller skeleton
and more or fewer views, so when the profile has the per-tensor cost
(``loader.seconds_per_tensor``, timed on shallow copies of the probe's architecture:
:func:`sllm.core.loadpath.measure_tensor_cost`)
and the caller knows the model's tensor count, the fixed part is
``load_fixed_seconds + seconds_per_tensor * (tensors - probe_tensors)``, at least 0.

**Migration time** of a running request (paper §6.2)::

    t_mig = a * (prompt tokens + generated tokens) + b

with ``a`` and ``b`` fitted per model and node by least squares over the prefill timings the
node records (:func:`fit_prefill`); before :data:`MIN_FIT_SAMPLES` samples the defaults
:data:`DEFAULT_A_SECONDS_PER_TOKEN` and :data:`DEFAULT_B_SECONDS` apply.

Every estimate carries its breakdown (tier, bytes, bandwidths, stages, queue, fixed cost).
This module does not decide anything (:mod:`sllm.core.scheduler` does) and does no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sllm.core.inventory import RESOURCE_OF, LoaderJob, NodeSpec, PrefillFit, TierSpec

#: Tiers a load can start from, fastest first ("device": resident, nothing to load).
SOURCE_TIERS = ("device", "dram", "ssd", "remote")
#: Prefill timings a fit needs (with at least two distinct token counts) before it replaces the defaults.
MIN_FIT_SAMPLES = 4
#: Default a, seconds per token, before a node has fitted one: 1 ms per token, a
#: conservative prefill rate (1,000 tokens/s) for a small model on a CPU core; GPUs beat it
#: by two orders of magnitude, so the first few estimates err towards not migrating.
DEFAULT_A_SECONDS_PER_TOKEN = 1e-3
#: Default b, seconds: the fixed cost of a migration step (a request round trip and the
#: destination's first forward pass), 50 ms.
DEFAULT_B_SECONDS = 0.05
#: The default fit.
DEFAULT_FIT = PrefillFit(DEFAULT_A_SECONDS_PER_TOKEN, DEFAULT_B_SECONDS, 0)


class EstimateError(ValueError):
    """The node's profile lacks a bandwidth the estimate needs (raised only for a bad profile)."""


@dataclass(frozen=True)
class Stage:
    """One step of a load: ``nbytes`` through ``name`` at ``gbps`` GB/s takes ``seconds``."""

    name: str
    nbytes: int
    gbps: float | None
    seconds: float


@dataclass(frozen=True)
class LoadEstimate:
    """A load's estimated time and where it goes.

    Attributes:
        node: the node. model: the model. tier: where the bytes come from (SOURCE_TIERS).
        nbytes: the checkpoint's bytes.
        stages: the transfer's stages in order (empty for "device").
        pipelined: whether the stages overlap (chunked pipeline) or run one after another.
        chunks: the pipeline's chunk count ``k``.
        transfer_seconds: the stages' combined time (formula in the module docstring).
        queue_seconds: the wait in the node's loader queue.
        fixed_seconds: the fixed cost (the tier's load path's, else the loader's).
        total_seconds: queue + transfer + fixed (0 for "device").
    """

    node: str
    model: str
    tier: str
    nbytes: int
    stages: tuple[Stage, ...]
    pipelined: bool
    chunks: int
    transfer_seconds: float
    queue_seconds: float
    fixed_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class MigrationEstimate:
    """A migration's estimated time: ``a * tokens + b`` per request, summed.

    Attributes:
        model: the model whose requests move. tokens: prompt + generated tokens of each.
        a_seconds_per_token, b_seconds: the constants used. samples: the fit's sample
        count (0: the defaults). seconds: the total.
    """

    model: str
    tokens: tuple[int, ...]
    a_seconds_per_token: float
    b_seconds: float
    samples: int
    seconds: float


def _gbps(node: NodeSpec, tier: str, fallback: float | None = None) -> float:
    spec = node.tiers.get(tier)
    if spec is not None:
        return spec.gbps
    if fallback is not None:
        return fallback
    raise EstimateError(f"node {node.name}: no measured {tier} bandwidth (tiers.{tier}.gbps in the inventory)")


def _load_path(node: NodeSpec, tier: str) -> TierSpec | None:
    """The tier's spec when the profile has its measured load path, else None."""
    spec = node.tiers.get(tier)
    return spec if spec is not None and spec.load_fixed_seconds is not None else None


def fixed_seconds(node: NodeSpec, tier: str, tensors: int | None = None) -> float:
    """The fixed cost of a load from ``tier`` on ``node``, seconds: the tier's measured
    load-path fixed cost when the profile has one (corrected for a model of ``tensors``
    tensors when the profile has the per-tensor cost), else the loader's (module docstring)."""
    path = _load_path(node, tier)
    if path is None:
        return node.loader_fixed_seconds
    fixed: float = path.load_fixed_seconds  # type: ignore[assignment]
    if tensors is not None and node.load_seconds_per_tensor is not None and node.load_probe_tensors is not None:
        fixed = max(0.0, fixed + node.load_seconds_per_tensor * (tensors - node.load_probe_tensors))
    return fixed


def transfer_stages(node: NodeSpec, tier: str, nbytes: int, *, remote_gbps: float | None = None) -> list[Stage]:
    """The stages moving ``nbytes`` from ``tier`` to ``node``'s device (module docstring):
    one "T load path" stage when the profile has the tier's load path.

    Args:
        node: the node's profile. tier: "device", "dram", "ssd" or "remote".
        nbytes: checkpoint bytes.
        remote_gbps: the inventory's default remote bandwidth, for nodes without one measured.

    Raises:
        EstimateError: a bandwidth the path needs is missing. ValueError: an unknown tier.
    """
    if tier not in SOURCE_TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose {', '.join(SOURCE_TIERS)}")
    if tier == "device":
        return []
    path = _load_path(node, tier)
    if path is not None:
        g = path.load_gbps
        return [Stage(f"{tier} load path", nbytes, g, nbytes / (g * 1e9) if g else 0.0)]
    stages: list[Stage] = []
    if tier == "remote":
        g = _gbps(node, "remote", remote_gbps)
        stages.append(Stage("remote->ssd+dram", nbytes, g, nbytes / (g * 1e9)))
        ssd = node.tiers.get("ssd")
        if ssd is not None and ssd.write_gbps:
            stages.append(Stage("ssd write", nbytes, ssd.write_gbps, nbytes / (ssd.write_gbps * 1e9)))
    elif tier == "ssd":
        g = _gbps(node, "ssd")
        stages.append(Stage("ssd->dram", nbytes, g, nbytes / (g * 1e9)))
    if node.device_kind == "cpu":
        stages.append(Stage("dram->device", nbytes, None, 0.0))  # the DRAM buffers are the model
    else:
        g = _gbps(node, "dram")
        stages.append(Stage("dram->device", nbytes, g, nbytes / (g * 1e9)))
    return stages


def pipeline_seconds(stages: Sequence[Stage], *, pipelined: bool, chunks: int) -> float:
    """The stages' combined time: ``max + (sum - max) / chunks`` pipelined, ``sum`` otherwise.

    Source: the textbook k-chunk pipeline (each chunk passes every stage; the slowest stage
    sets the pace, the others add their share of one chunk to fill and drain).
    """
    times = [s.seconds for s in stages]
    if not times:
        return 0.0
    if not pipelined or len(times) == 1:
        return sum(times)
    slowest = max(times)
    return slowest + (sum(times) - slowest) / max(1, chunks)


def estimate_transfer(node: NodeSpec, tier: str, nbytes: int, *, remote_gbps: float | None = None) -> float:
    """Seconds to move ``nbytes`` from ``tier`` to the device of ``node`` (no queue, no fixed cost)."""
    stages = transfer_stages(node, tier, nbytes, remote_gbps=remote_gbps)
    return pipeline_seconds(stages, pipelined=node.pipelined, chunks=math.ceil(nbytes / node.chunk_bytes))


def queue_seconds(node: NodeSpec, jobs: Iterable[LoaderJob], *, remote_gbps: float | None = None,
                  tier: str | None = None) -> float:
    """The wait in ``node``'s loader queue for a load from ``tier``: what is left of the
    estimate of each job in the same resource's queue (:data:`RESOURCE_OF`), summed; None
    ``tier``: every job (the wait to get through all of them).

    A running job's remaining time is its estimate (transfer + fixed) less its elapsed
    seconds, at least 0; a queued job counts whole. A job of unknown size or tier counts the
    fixed cost only; a job of unknown resource counts in every queue.
    """
    total = 0.0
    if tier is not None and RESOURCE_OF.get(tier) is None:
        return 0.0  # a DRAM hit (or resident) waits in no queue
    for job in jobs:
        if tier is not None and job.resource != "" and job.resource != RESOURCE_OF[tier]:
            continue
        est = fixed_seconds(node, job.tier) if job.tier in SOURCE_TIERS else node.loader_fixed_seconds
        if job.nbytes and job.tier in SOURCE_TIERS:
            est += estimate_transfer(node, job.tier, job.nbytes, remote_gbps=remote_gbps)
        total += max(0.0, est - (job.elapsed_seconds if job.running else 0.0))
    return total


def tokenizer_overlap(tier: str, fetched_first: bool) -> str:
    """What a tokenizer's parse runs beside in ``sllm serve``, as :func:`estimate_load`'s
    ``tokenizer`` takes it: "read" (the transfer and the fixed cost) for a ``--models`` copy,
    an SSD copy (the node starts the parse with the fetch) or a DRAM hit; "fixed" (the fixed
    cost only) after a pull from the remote (the tokenizer files arrive with the pull)."""
    return "fixed" if fetched_first and tier == "remote" else "read"


def covering_parse(fixed: float, parse: float, transfer: float, beside: str) -> float:
    """A load's fixed cost, seconds, grown to cover a tokenizer parse of ``parse`` seconds
    that runs beside it ("fixed") or beside the ``transfer`` and it ("read")."""
    return max(fixed, parse - (transfer if beside == "read" else 0.0))


def estimate_load(
    node: NodeSpec,
    model: str,
    tier: str,
    nbytes: int,
    *,
    queue: Iterable[LoaderJob] = (),
    remote_gbps: float | None = None,
    tensors: int | None = None,
    tokenizer: str | None = None,
) -> LoadEstimate:
    """The load time of ``model`` on ``node`` from ``tier`` (paper §6.1; module docstring).

    Args:
        node: the node's profile (bandwidths, fixed cost, pipelining).
        model: the model's name (for the breakdown).
        tier: the fastest tier holding it: "device" (resident: 0 s), "dram", "ssd", "remote".
        nbytes: checkpoint bytes.
        queue: the node's loader queue (:class:`LoaderJob`, the running one first).
        remote_gbps: the inventory's default remote bandwidth.
        tensors: the checkpoint's tensor count (its tensor index), for the per-tensor part of
            the fixed cost; None: as many as the model the profile was measured on.
        tokenizer: what the node's parse of the model's tokenizer (``node.tokenizer_seconds``)
            runs beside (:func:`tokenizer_overlap`): "read", the transfer
            and the fixed cost; "fixed", the fixed cost only (after a remote pull); None: the
            node holds the tokenizer. The fixed cost grows to cover a longer parse.

    Raises:
        EstimateError: the profile lacks a bandwidth the path needs.
    """
    if tier == "device":
        return LoadEstimate(node.name, model, tier, nbytes, (), node.pipelined, 0, 0.0, 0.0, 0.0, 0.0)
    stages = tuple(transfer_stages(node, tier, nbytes, remote_gbps=remote_gbps))
    chunks = max(1, math.ceil(nbytes / node.chunk_bytes))
    transfer = pipeline_seconds(stages, pipelined=node.pipelined, chunks=chunks)
    queued = queue_seconds(node, queue, remote_gbps=remote_gbps, tier=tier)
    fixed = fixed_seconds(node, tier, tensors)
    if tokenizer is not None:
        fixed = covering_parse(fixed, node.tokenizer_seconds, transfer, tokenizer)
    return LoadEstimate(node.name, model, tier, nbytes, stages, node.pipelined, chunks, transfer, queued, fixed,
                        queued + transfer + fixed)


# ---------------------------------------------------------------------------------------
# Migration: a * tokens + b, fitted from prefill timings
# ---------------------------------------------------------------------------------------


def fit_prefill(samples: Sequence[tuple[int, float]], *, min_samples: int = MIN_FIT_SAMPLES) -> PrefillFit:
    """Least-squares fit of prefill seconds = a * tokens + b (paper §6.2).

    Args:
        samples: (prompt tokens, prefill seconds) pairs a node measured.
        min_samples: samples needed (with >= 2 distinct token counts) to fit; fewer give
            :data:`DEFAULT_FIT`.

    Returns: the fit (``samples`` = the count used); a negative slope or intercept (noise on
    a narrow range) is clamped to 0 and the other refitted, so estimates never shrink with
    more tokens.
    """
    xs = [float(t) for t, _ in samples]
    ys = [float(s) for _, s in samples]
    if len(xs) < min_samples or len(set(xs)) < 2:
        return DEFAULT_FIT
    a, b = statistics.linear_regression(xs, ys)
    if a < 0:
        a, b = 0.0, max(0.0, statistics.fmean(ys))
    elif b < 0:
        a, b = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0  # least squares through 0
    return PrefillFit(a, b, len(xs))


def prefill_seconds(tokens: int, fit: PrefillFit | None = None) -> float:
    """``a * tokens + b`` with ``fit`` (default :data:`DEFAULT_FIT`), seconds."""
    fit = fit or DEFAULT_FIT
    return fit.a_seconds_per_token * tokens + fit.b_seconds


def estimate_migration(model: str, tokens: Iterable[int], fit: PrefillFit | None = None) -> MigrationEstimate:
    """Time to migrate running requests of ``model`` (paper §6.2): the destination
    re-prefills each request's tokens (prompt + generated), ``a * tokens + b`` each, one
    after another; summed. ``fit``: the destination's fit for the model (None: defaults)."""
    fit = fit or DEFAULT_FIT
    tokens = tuple(int(t) for t in tokens)
    seconds = sum(prefill_seconds(t, fit) for t in tokens)
    return MigrationEstimate(model, tokens, fit.a_seconds_per_token, fit.b_seconds, fit.samples, seconds)


class TimingLog:
    """What a node records as it serves, for its ``/status``: prefill timings per model (the
    samples :func:`fit_prefill` fits) and decode rates. Keeps the last ``window`` samples per
    model. Plain data; the caller serialises access (one event loop).

    Args:
        window: samples kept per model.
    """

    def __init__(self, window: int = 256) -> None:
        from collections import deque

        self._deque = deque
        self.window = window
        self._prefill: dict[str, deque[tuple[int, float]]] = {}
        self._decode_seconds = 0.0
        self._decode_tokens = 0
        self._completions = 0
        self._completion_tokens = 0

    def record_prefill(self, model: str, tokens: int, seconds: float) -> None:
        """One prefill of ``tokens`` prompt tokens that took ``seconds`` (to the first token)."""
        self._prefill.setdefault(model, self._deque(maxlen=self.window)).append((int(tokens), float(seconds)))

    def record_completion(self, tokens: int, decode_seconds: float) -> None:
        """A finished request: ``tokens`` generated, ``decode_seconds`` from its first token to its last."""
        self._completions += 1
        self._completion_tokens += int(tokens)
        if tokens > 1:
            self._decode_tokens += int(tokens) - 1
            self._decode_seconds += float(decode_seconds)

    def fit(self, model: str) -> PrefillFit:
        """The model's prefill fit (:data:`DEFAULT_FIT` before :data:`MIN_FIT_SAMPLES`)."""
        return fit_prefill(list(self._prefill.get(model, ())))

    def status(self) -> dict[str, object]:
        """``{"prefill_fit": {model: {a_seconds_per_token, b_seconds, samples}}, "engine":
        {decode_seconds_per_token, mean_generated_tokens}}`` (None where nothing was measured)."""
        fits = {}
        for model in sorted(self._prefill):
            f = self.fit(model)
            fits[model] = {"a_seconds_per_token": f.a_seconds_per_token, "b_seconds": f.b_seconds,
                           "samples": f.samples, "recorded": len(self._prefill[model])}
        return {
            "prefill_fit": fits,
            "engine": {
                "decode_seconds_per_token": self._decode_seconds / self._decode_tokens if self._decode_tokens else None,
                "mean_generated_tokens": self._completion_tokens / self._completions if self._completions else None,
            },
        }
