"""``sllm inventory add|show``: keep the cluster inventory (a TOML file) and look at it live.

Thin: ``add`` merges the node profile that ``sllm load-bench --tiers`` wrote into the
inventory (:meth:`sllm.core.inventory.TomlInventory.add_profile`); ``show`` lists the nodes
with their tiers and, unless ``--offline``, each node's live state from ``/status``
(fetched concurrently; a node that does not answer is shown down). It imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sllm.commands._options import JsonOpt, parse_bytes
from sllm.commands._output import emit_json, handle_errors, table

app = typer.Typer(help="Keep the cluster inventory: nodes, their tiers and bandwidths, the remote store.",
                  no_args_is_help=True)

InventoryOpt = Annotated[
    Path,
    typer.Option("--inventory", "-i", envvar="SLLM_INVENTORY", metavar="FILE",
                 help="The cluster inventory TOML file (format in sllm-schedule-plan(1))."),
]
TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=0.05, metavar="SECONDS", help="How long to wait for each node's /status.")
]


def fetch_status(spec: Any, timeout: float) -> dict[str, Any]:
    """``GET /status`` of ``spec``'s node with its API key (from ``api_key_env``). Raises: ServerError."""
    from sllm.client import NodeClient

    with NodeClient(spec.url, api_key=spec.api_key(), timeout=timeout) as c:
        return c.status()


def live_states(inv: Any, timeout: float) -> dict[str, Any]:
    """Every node's :class:`~sllm.core.inventory.NodeState`, fetched concurrently."""
    from sllm.core.inventory import gather_states

    return gather_states(inv.nodes.values(), fetch_status, timeout=timeout)


@app.command("add")
@handle_errors
def add(
    profile: Annotated[Path, typer.Argument(help="A node profile written by `sllm load-bench MODEL --tiers`.")],
    inventory: InventoryOpt = Path("cluster.toml"),
    url: Annotated[str | None, typer.Option("--url", help="The node's sllm serve URL (default: the profile's).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="The node's name (default: the profile's).")] = None,
    api_key_env: Annotated[
        str | None, typer.Option("--api-key-env", metavar="VAR", help="Environment variable holding the node's API key.")
    ] = None,
    admin_key_env: Annotated[
        str | None, typer.Option("--admin-key-env", metavar="VAR",
                                 help="Environment variable holding the node's --admin-key (for schedule-plan --apply).")
    ] = None,
    max_memory: Annotated[
        str | None, typer.Option("--max-memory", metavar="BYTES", help="The node's --max-memory (e.g. 40GB).")
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Merge a node profile into the inventory (created when missing); a node of the same
    name is replaced. The file is rewritten atomically."""
    from sllm.core.inventory import TomlInventory
    from sllm.core.profile import read_profile
    from sllm.errors import InventoryError

    try:
        doc = read_profile(profile)
    except FileNotFoundError:
        raise InventoryError(f"{profile}: no such profile", hint="write one with `sllm load-bench MODEL --tiers`") from None
    except OSError as exc:
        raise InventoryError(f"{profile}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise InventoryError(f"{profile}: not valid TOML: {exc}") from exc
    spec = TomlInventory(inventory).add_profile(
        doc, url=url, name=name, api_key_env=api_key_env, admin_key_env=admin_key_env,
        max_memory_bytes=parse_bytes(max_memory, "--max-memory", minimum=1) if max_memory else None, where=str(profile))
    if json_output:
        emit_json({"inventory": str(inventory), "node": spec})
    else:
        print(f"node {spec.name} ({spec.url}) written to {inventory}")


@app.command("show")
@handle_errors
def show(
    inventory: InventoryOpt = Path("cluster.toml"),
    offline: Annotated[bool, typer.Option("--offline", help="Do not ask the nodes for their live state.")] = False,
    timeout: TimeoutOpt = 1.0,
    json_output: JsonOpt = False,
) -> None:
    """List the inventory's nodes and tiers, with each node's live state (up or down,
    resident models, loader queue)."""
    from sllm.core.inventory import TomlInventory

    inv = TomlInventory(inventory).load()
    states = {} if offline else live_states(inv, timeout)
    if json_output:
        emit_json({"inventory": str(inventory), "remote": inv.remote_url, "nodes": inv.nodes, "states": states})
        return
    rows = []
    for name, spec in inv.nodes.items():
        st = states.get(name)
        live = "-" if st is None else ("down: " + (st.error or "?") if not st.up else
                                       f"up, {len(st.resident)} resident, {len(st.loader)} loading")
        tiers = ", ".join(f"{t.tier} {t.gbps:g} GB/s" for t in spec.tiers.values())
        rows.append([name, spec.url, f"{spec.device_count}x {spec.device_kind}", tiers, spec.loader_fixed_seconds, live])
    table(f"{inventory} (remote: {inv.remote_url or 'none'})", ["node", "url", "device", "tiers", "fixed s", "state"], rows)
