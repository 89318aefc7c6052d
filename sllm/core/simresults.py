"""Outcomes of a cluster simulation (:mod:`sllm.core.simulate`): each request's record,
each policy's figures, and the statistics over them (nearest-rank percentiles, the
scheduler's estimate errors). Plain data and pure functions; it runs nothing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestRecord:
    """One simulated request's outcome (seconds from its arrival).

    Attributes:
        id, model, node: what, where. arrival_seconds: when it arrived.
        ttft_seconds: to its first token (None: it could not be served: its load failed,
            its model exceeds the node's budget, or it still waited when the run ended).
        startup_seconds: until its model was ready on its node (0 warm).
        queued_seconds: of that, waiting for the loader or for room.
        tier: where the load it waited for read from ("device" when warm).
        action: the scheduler's option for it (policies ``sllm``, ``sllm-no-migration``,
            ``serverlessllm``; None for the others): "resident", "load", "wait", ...
        estimate_seconds: that option's estimated time to first token, with the hops the
            simulator adds (``forward_seconds``, ``request_seconds``), to set beside
            ``ttft_seconds`` (None without an option).
    """

    id: int
    model: str
    node: str
    arrival_seconds: float
    ttft_seconds: float | None
    startup_seconds: float
    queued_seconds: float
    tier: str
    action: str | None = None
    estimate_seconds: float | None = None


@dataclass(frozen=True)
class PolicyResult:
    """A policy's figures over the workload (seconds).

    Attributes:
        policy, requests (count), served (those with a first token). ttft_mean_seconds:
        over the served; ttft_p50/p90/p99/max_seconds: over every request, one not served
        counting as infinitely late.
        warm_fraction: requests whose model was resident. queued_requests: requests that
        waited for a loader or room. loads: loads per source tier. migrations: count.
        startup_mean_seconds, queued_mean_seconds: means over all requests.
        records: per-request outcomes.
    """

    policy: str
    requests: int
    served: int
    ttft_mean_seconds: float
    ttft_p50_seconds: float
    ttft_p90_seconds: float
    ttft_p99_seconds: float
    ttft_max_seconds: float
    warm_fraction: float
    queued_requests: int
    loads: dict[str, int]
    migrations: int
    startup_mean_seconds: float
    queued_mean_seconds: float
    records: tuple[RequestRecord, ...] = field(repr=False, default=())


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of ``values`` (nan when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def estimate_errors(records: Sequence[RequestRecord]) -> dict[str, tuple[int, float, float]]:
    """How far the scheduler's estimates were from what the simulation then did, per action:
    action -> (requests, median signed error, median absolute error), the error of a request
    being ``(estimate - ttft) / ttft`` over the served requests that had an option and a
    first token after more than 0 s."""
    by: dict[str, list[float]] = {}
    for rec in records:
        if rec.action is None or rec.estimate_seconds is None or not rec.ttft_seconds:
            continue
        by.setdefault(rec.action, []).append((rec.estimate_seconds - rec.ttft_seconds) / rec.ttft_seconds)
    return {a: (len(e), statistics.median(e), statistics.median(abs(x) for x in e)) for a, e in sorted(by.items())}


def summarize(policy: str, records: Sequence[RequestRecord], loads: Mapping[str, int], migrations: int) -> PolicyResult:
    """A :class:`PolicyResult` from per-request records."""
    records = sorted(records, key=lambda r: r.id)
    ttfts = [r.ttft_seconds for r in records if r.ttft_seconds is not None]
    every = [math.inf if r.ttft_seconds is None else r.ttft_seconds for r in records]  # not served: worst
    n = len(records)
    mean = (lambda xs: sum(xs) / len(xs) if xs else math.nan)  # noqa: E731
    return PolicyResult(
        policy, n, len(ttfts), mean(ttfts), percentile(every, 50), percentile(every, 90), percentile(every, 99),
        max(every) if every else math.nan, sum(1 for r in records if r.tier == "device") / n if n else math.nan,
        sum(1 for r in records if r.queued_seconds > 1e-9), dict(sorted(loads.items())), migrations,
        mean([r.startup_seconds for r in records if r.ttft_seconds is not None]),
        mean([r.queued_seconds for r in records if r.ttft_seconds is not None]), tuple(records),
    )


__all__ = ["PolicyResult", "RequestRecord", "estimate_errors", "percentile", "summarize"]
