"""``sllm migrate``: live-migrate running generations from one node to another.

Thin: it resolves ``--from`` and ``--to`` (URLs, or node names of ``--inventory``, whose
keys come from their ``admin_key_env``, else ``api_key_env``), asks the source node to migrate
(``POST /v1/migrations``, :meth:`sllm.client.NodeClient.migrate`) and prints what the
source recorded: each round's tokens and seconds, the longest pause a client's stream saw,
the total time, and the bytes sent against the KV cache they replace. The protocol is
``sllm/core/migration.py``; the steps run on the nodes (``sllm/server/migration_*.py``).
It imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sllm.commands._options import JsonOpt
from sllm.commands._output import emit_json, handle_errors, table
from sllm.errors import UsageError


def resolve(node: str, inventory: Path | None, api_key: str | None, flag: str) -> tuple[str, str | None]:
    """(URL, key) of ``node``: a URL as given (key ``api_key``), or an inventory node's.

    Raises:
        UsageError: a name without ``--inventory``. InventoryError: not a node of it.
    """
    if node.startswith(("http://", "https://")):
        return node.rstrip("/"), api_key
    if inventory is None:
        raise UsageError(f"{flag} {node!r}: not a URL; give --inventory to name nodes")
    from sllm.core.inventory import TomlInventory
    from sllm.errors import InventoryError

    inv = TomlInventory(inventory).load()
    spec = inv.nodes.get(node)
    if spec is None:
        raise InventoryError(f"{inventory}: no node {node!r} (its nodes: {', '.join(inv.nodes) or 'none'})")
    return spec.url.rstrip("/"), spec.admin_key() or api_key


@handle_errors
def migrate(
    source: Annotated[str, typer.Option("--from", metavar="NODE", help="The source node: its URL, or its name in "
                                        "--inventory.")],
    destination: Annotated[str, typer.Option("--to", metavar="NODE", help="The destination node: URL or name.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Migrate all of this model's running requests.")]
    = None,
    request: Annotated[list[str] | None, typer.Option("--request", metavar="ID", help="Migrate this request (its id: "
                                                      "the completion's id, e.g. cmpl-...). Repeatable; needs --model.")]
    = None,
    delta: Annotated[int | None, typer.Option("--delta", min=0, help="Hand over once at most this many tokens per "
                                              "request are new (default 4).")] = None,
    max_rounds: Annotated[int | None, typer.Option("--max-rounds", min=0, help="Rounds after the first copy before "
                                                   "handing over regardless (default 3; 0 is stop-and-copy).")] = None,
    inventory: Annotated[Path | None, typer.Option("--inventory", "-i", envvar="SLLM_INVENTORY", metavar="FILE",
                                                   help="The cluster inventory, to name nodes.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SLLM_API_KEY", show_envvar=True,
                                                help="The nodes' admin key (or API key) when given by URL.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Move running generations to another node without breaking their streams.

    The destination loads the model and prefills each request's tokens while the source
    keeps decoding; rounds send the tokens generated since, until at most --delta are new
    (or --max-rounds); then the source pauses them, sends the last tokens, the destination
    checks it holds exactly the source's tokens and decodes on, and the source relays its
    tokens to the clients, who see one stream with every token once. If the destination
    fails before the handover, the source carries on; after it, the source resumes from the
    tokens it relayed. Exit 0 when handed over, 1 when aborted (the requests run on).

    Examples: sllm migrate --from http://127.0.0.1:8343 --to http://127.0.0.1:8344 -m opt-1.3b;
    sllm migrate -i cluster.toml --from a --to b -m opt-1.3b --json
    """
    from sllm.client import NodeClient

    if model is None:
        raise UsageError("give --model M (all its requests, or those named by --request)")
    src_url, src_key = resolve(source, inventory, api_key, "--from")
    dst_url, dst_key = resolve(destination, inventory, api_key, "--to")
    if src_url == dst_url:
        raise UsageError(f"--from and --to are the same node ({src_url})")
    from contextlib import nullcontext

    from sllm.commands._output import stderr

    spinner = stderr.status(f"migrating {model} from {src_url} to {dst_url}") if stderr.is_terminal else nullcontext()
    with spinner, NodeClient(src_url, api_key=src_key) as client:
        rec = client.migrate(model, dst_url, destination_api_key=dst_key, request_ids=request or None, delta=delta,
                             max_rounds=max_rounds)
    if json_output:
        emit_json(rec)
        return
    _print(rec)


def _print(rec: dict[str, Any]) -> None:
    rows = [[r["index"], "final" if r["final"] else "copy", r["tokens"], r["lag"], r["seconds"]] for r in rec["rounds"]]
    table(f"migration {rec['id']}: {rec['model']}, {len(rec['requests'])} request(s) to {rec['peer']}",
          ["round", "kind", "tokens sent", "new tokens closed", "seconds"], rows)
    pause = rec.get("longest_pause_seconds")
    kv = rec.get("kv_bytes_replaced")
    conv = {True: "converged", False: "round cap reached", None: "stop-and-copy"}[rec.get("converged")]
    print(f"outcome: {rec['outcome']} ({conv}); longest pause seen by a stream: "
          f"{'-' if pause is None else f'{pause * 1000:.1f} ms'}; total {rec['total_seconds']:.3f} s; "
          f"{rec['bytes_sent']} bytes of tokens sent" + (f" for {kv} bytes of KV cache" if kv else ""))
