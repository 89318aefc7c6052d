"""``sllm schedule-plan``: where should a model start, and what-if simulations of policies.

Thin. ``sllm schedule-plan MODEL --inventory cluster.toml`` reads the inventory
(:class:`sllm.core.inventory.TomlInventory`), fetches every node's ``/status`` concurrently
(down nodes are skipped), ranks the nodes with :func:`sllm.core.scheduler.plan` and prints
the options with their breakdown (a table or ``--json``); ``--apply`` carries out the best
through the nodes' APIs (unload idle models, load the model: ``/v1/cache/MODEL/load``). ``--simulate TRACE`` runs
:func:`sllm.core.simulate.simulate` instead and prints a table per policy. It imports no
torch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from sllm.commands._options import JsonOpt
from sllm.commands._output import emit_json, handle_errors, table
from sllm.commands.inventory import InventoryOpt, TimeoutOpt, live_states
from sllm.errors import EXIT_FAILED, UsageError


def _fmt(x: float | None) -> Any:
    return "-" if x is None or (isinstance(x, float) and math.isinf(x)) else x


@handle_errors
def schedule_plan(
    model: Annotated[str | None, typer.Argument(help="The model to place (not with --simulate).")] = None,
    inventory: InventoryOpt = Path("cluster.toml"),
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", min=0, help="The request's prompt length: adds each node's prefill estimate.")
    ] = 0,
    migration: Annotated[
        bool, typer.Option("--migration/--no-migration",
                           help="Consider migrating running requests to make room (--apply carries them out with "
                           "live migration, as sllm migrate).")
    ] = True,
    apply: Annotated[bool, typer.Option("--apply", help="Carry out the best option through the nodes' APIs.")] = False,
    timeout: TimeoutOpt = 1.0,
    simulate: Annotated[
        str | None,
        typer.Option("--simulate", metavar="TRACE",
                     help="Simulate the cluster serving TRACE instead: an Azure LLM inference trace CSV "
                     "(TIMESTAMP,ContextTokens,GeneratedTokens) or gamma:rps=R,cv=C,duration=S[,prompt=N,gen=N]."),
    ] = None,
    models: Annotated[
        str | None, typer.Option("--models", metavar="SPEC",
                                 help="With --simulate: the models, NAME=SIZE[xCOUNT],... (e.g. opt-6.7b=13.4GBx8).")
    ] = None,
    policy: Annotated[
        str, typer.Option("--policy", help="With --simulate: comma-separated policies among sllm, sllm-no-migration, "
                          "serverlessllm, availability, random, or all.")
    ] = "all",
    rps: Annotated[
        float | None, typer.Option("--rps", min=0.0001, help="With --simulate: rescale a trace to this mean rate, req/s.")
    ] = None,
    duration: Annotated[
        float | None, typer.Option("--duration", min=0.001, metavar="SECONDS", help="With --simulate: cut the trace.")
    ] = None,
    popularity: Annotated[
        str, typer.Option("--popularity", help="With --simulate: which model each request asks for: uniform or zipf:S.")
    ] = "uniform",
    keep_alive: Annotated[
        float, typer.Option("--keep-alive", min=0, metavar="SECONDS", help="With --simulate: the nodes' keep-alive.")
    ] = 60.0,
    replicas: Annotated[
        int, typer.Option("--replicas", min=0, help="With --simulate: SSD copies of each model at the start.")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", help="With --simulate: the seed of model choice and random policies.")] = 0,
    plot: Annotated[
        Path | None, typer.Option("--plot", metavar="FILE.png", help="With --simulate: draw the TTFT CDFs (matplotlib).")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Rank the cluster's nodes by estimated time to first token for MODEL (ServerlessLLM §6).

    Each node's option: the model resident (0 s); loading from its fastest tier holding it
    (DRAM, SSD, or the remote pull), estimated as the loader queue's wait + the tier
    pipeline's time from the node profile's bandwidths + the loader's fixed cost; after
    unloading idle models when the node lacks room; after migrating running requests
    elsewhere (a*tokens+b per request, fitted from the node's prefill timings). Nodes that do
    not answer /status within --timeout are listed as down. Exits 1 when no node can start it.

    With --simulate TRACE, simulates the inventory's nodes serving the trace under each
    policy, with the same estimator and scheduler, and prints time to first token (mean,
    P50, P90, P99), the startup breakdown, the requests that queued and those that failed
    (a load that finds no room within a node's 120 s budget wait fails, with the requests
    waiting for it, as sllm serve does; percentiles count a failed request as infinitely late).
    """
    from sllm.core.inventory import TomlInventory

    inv = TomlInventory(inventory).load()
    if simulate is not None:
        if model is not None:
            raise UsageError("give MODEL or --simulate TRACE, not both")
        _simulate(inv, simulate, models, policy, rps, duration, popularity, keep_alive, replicas, seed, plot,
                  json_output)
        return
    if model is None:
        raise UsageError("give MODEL (or --simulate TRACE)", hint="sllm schedule-plan MODEL --inventory cluster.toml")
    from sllm.client import remote_card
    from sllm.core.scheduler import plan, summarize, with_remote_facts

    states = live_states(inv, timeout)
    inv = with_remote_facts(model, inv, states, lambda spec: remote_card(spec, model, timeout))
    p = plan(model, inv, states, prompt_tokens=prompt_tokens, migration=migration)
    if apply:
        from sllm.client import HttpMigrator
        from sllm.core.scheduler import register_migrator

        register_migrator(HttpMigrator())  # live migration through the source node's POST /v1/migrations
    applied = _apply(inv, p) if apply and p.best is not None else None
    if json_output:
        emit_json({"model": p.model, "nbytes": p.nbytes, "prompt_tokens": p.prompt_tokens, "migration": p.migration,
                   "best": p.best.node if p.best else None, "options": summarize(p),
                   "breakdown": [{"node": o.node, "stages": o.load.stages if o.load else [], "pipelined":
                                  o.load.pipelined if o.load else None, "chunks": o.load.chunks if o.load else 0}
                                 for o in p.options],
                   "down": [{"node": n, "error": e} for n, e in p.down], "applied": applied})
    else:
        rows = [[s.rank, s.node, s.action, s.tier or "-", _fmt(s.seconds), s.queue_seconds, s.transfer_seconds,
                 s.fixed_seconds, s.freeing_seconds, ", ".join(s.unload + s.migrate) or "-", "; ".join(s.reasons)]
                for s in summarize(p)]
        table(f"{model}: {p.nbytes / 1e9:.3f} GB, ranked by estimated time to first token",
              ["#", "node", "action", "tier", "est s", "queue s", "transfer s", "fixed s", "freeing s",
               "unload/migrate", "why"], rows, min_width=200)
        for name, err in p.down:
            print(f"down: {name}: {err}")
        if applied is not None:
            print(f"applied on {applied['node']}: {applied['done']}")
    if p.best is None:
        print(f"sllm: error: no node can start {model} now", file=sys.stderr)
        raise typer.Exit(EXIT_FAILED)


def _apply(inv: Any, p: Any) -> dict[str, Any]:
    """Carry out ``p.best``: unload its idle models (``/v1/cache/M/evict?tier=device``),
    then load the model (``/v1/cache/M/load``: the node queues it like any cold start), with
    the node's admin key.

    Raises:
        MigrationError: the option needs a migration and no migrator is registered.
        ServerError: a node refused.
    """
    from sllm.client import NodeClient
    from sllm.core.scheduler import get_migrator
    from sllm.errors import MigrationError

    best = p.best
    spec = inv.nodes[best.node]
    done: list[str] = []
    loaded = None
    if best.migrate:
        migrator = get_migrator()
        if migrator is None:
            raise MigrationError(f"the best option on {best.node} migrates running requests, and live migration is "
                                 "not available on these nodes yet", hint="rerun with --no-migration")
        for mv in best.migrate:
            migrator.migrate(mv.model, spec, inv.nodes[mv.destination], mv.requests)
            done.append(f"migrated {mv.model} to {mv.destination}")
    with NodeClient(spec.url, api_key=spec.admin_key()) as client:
        for u in best.unload:
            client.cache_evict(u.model, "device")
            done.append(f"unloaded {u.model}")
        if best.action != "resident":
            loaded = client.cache_load(p.model)
            done.append(f"loaded {p.model} from {loaded['tier']} in {loaded['load_seconds']:.3f} s"
                        if loaded["loaded"] else f"{p.model} was resident already")
    return {"node": best.node, "done": done or ["nothing: resident"], "load": loaded}


def _simulate(inv: Any, trace: str, models: str | None, policy: str, rps: float | None, duration: float | None,
              popularity: str, keep_alive: float, replicas: int, seed: int, plot: Path | None, json_output: bool) -> None:
    from sllm.core.simulate import POLICIES, SimConfig, simulate
    from sllm.core.workload import assign_models, parse_models, parse_trace_spec

    if models is None:
        raise UsageError("--simulate needs --models NAME=SIZE[xCOUNT],...")
    policies = list(POLICIES) if policy == "all" else [p.strip() for p in policy.split(",") if p.strip()]
    for p in policies:
        if p not in POLICIES:
            raise UsageError(f"--policy {p!r}: choose {', '.join(POLICIES)} or all")
    sizes = parse_models(models, inv.model_bytes)
    requests = assign_models(parse_trace_spec(trace, seed=seed, rps=rps, duration=duration), list(sizes), seed=seed,
                             popularity=popularity)
    if not requests:
        raise UsageError(f"--simulate {trace}: no requests (check --duration)")
    results = simulate(inv, sizes, requests, policies,
                       SimConfig(keep_alive_seconds=keep_alive, replicas=replicas, seed=seed))
    if plot is not None:
        plot_cdfs(results, plot, title=f"{Path(trace).name if not trace.startswith('gamma:') else trace}, "
                  f"{len(requests)} requests")
        print(f"plot written to {plot}", file=sys.stderr)
    if json_output:
        emit_json({"trace": trace, "requests": len(requests), "models": sizes, "policies": [
            {k: v for k, v in r.__dict__.items() if k != "records"} for r in results]})
        return
    span = requests[-1].arrival_seconds if requests else 0.0
    table(f"{trace}: {len(requests)} requests over {span:.0f} s on {len(inv.nodes)} node(s), {len(sizes)} model(s)",
          ["policy", "mean s", "P50 s", "P90 s", "P99 s", "warm", "queued", "failed", "startup s", "queue s", "loads",
           "migrations"],
          [[r.policy, r.ttft_mean_seconds, r.ttft_p50_seconds, r.ttft_p90_seconds, r.ttft_p99_seconds,
            f"{r.warm_fraction:.0%}", r.queued_requests, r.requests - r.served, r.startup_mean_seconds,
            r.queued_mean_seconds,
            " ".join(f"{k}:{v}" for k, v in r.loads.items()) or "-", r.migrations] for r in results], min_width=160)


def plot_cdfs(results: Sequence[Any], path: str | Path, title: str = "") -> Path:
    """Draw each policy's time-to-first-token CDF (each a :class:`sllm.core.simulate.PolicyResult`) to
    ``path`` (PNG; needs matplotlib).

    Raises:
        UsageError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib", hint="pip install 'sllm[plot]'") from exc
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for res in results:
        xs = sorted(r.ttft_seconds for r in res.records if r.ttft_seconds is not None)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=res.policy)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("time to first token, s")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title or "time to first token")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
