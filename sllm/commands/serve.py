"""``sllm serve --models DIR``: run this node's OpenAI-compatible inference server.

Thin: it checks the flags, binds the socket (so a busy port is a one-line error), builds
:func:`sllm.server.app.create_app` and runs it with uvicorn until Ctrl-C or SIGTERM. Once
listening it prints the URL on stderr, or with ``--json`` one JSON line
``{"url": ..., "models": [...]}`` on stdout (the only thing on stdout; logs go to stderr).
It imports no torch, transformers or FastAPI until it runs.

With ``--cache-dir`` or ``--remote`` (or SLLM_CACHE_DIR / SLLM_REMOTE) the node serves
through the tier cache, with the same cache flags as ``sllm cache`` (``_options.py``).
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from sllm.commands._options import (
    DEFAULT_CACHE_DIR,
    DeviceOpt,
    DirectIoOpt,
    DramCapacityOpt,
    RemoteOpt,
    ServeCacheDirOpt,
    SsdCapacityOpt,
    ThreadsOpt,
    cache_config,
    parse_bytes,
)
from sllm.commands._output import handle_errors
from sllm.errors import UsageError

DEFAULT_PORT = 8343


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        UsageError: the address cannot be resolved or bound (in use, not ours).
    """
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = info[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="pick another --port") from exc
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, every logger (access log included) on stderr."""
    fmt = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(name)s: %(message)s"}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    loggers = {name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
               for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "sllm")}  # fmt: skip
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"default": fmt},
            "handlers": {"stderr": handler}, "loggers": loggers}  # fmt: skip


@handle_errors
def serve(
    models: Annotated[
        Path | None,
        typer.Option(
            "--models",
            metavar="DIR",
            help="Directory of converted models (sllm convert), one per subdirectory; the model id is the "
            "subdirectory's name. Rescanned when a request names an unknown id. Needed unless the node "
            "serves from its tier cache (--cache-dir, --remote).",
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. The default serves this machine only; 0.0.0.0 exposes the "
            "node to the network (set --api-key)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port; 0 picks a free one (printed).")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="SLLM_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on every route but /health (401 otherwise).",
        ),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option(
            "--admin-key",
            envvar="SLLM_ADMIN_KEY",
            show_envvar=True,
            help="Key of the cache routes (/v1/cache: pin, evict, pull). Default: the --api-key.",
        ),
    ] = None,
    drain_seconds: Annotated[
        float,
        typer.Option(
            "--drain-seconds", min=0, metavar="SECONDS",
            help="On SIGTERM or Ctrl-C, how long generations in flight may run to their end; the rest then end "
            "with an error event. New requests get 503 meanwhile.",
        ),
    ] = 30.0,
    max_body_bytes: Annotated[
        str,
        typer.Option("--max-body-bytes", metavar="BYTES", help="Largest request body (413 above it)."),
    ] = "2MiB",
    keep_alive: Annotated[
        float,
        typer.Option(
            "--keep-alive", min=0, metavar="SECONDS", help="Idle seconds before a loaded model is unloaded (scale to zero)."
        ),
    ] = 300.0,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            metavar="BYTES",
            help="Budget for resident models, weights and KV caches, bytes (suffixes: GB=10^9, GiB=2^30). "
            "Least recently used idle models are unloaded to make room. Default: no limit.",
        ),
    ] = None,
    max_num_seqs: Annotated[
        int,
        typer.Option(
            "--max-num-seqs", min=1, metavar="N",
            help="Most requests a model runs at once (continuous batching); more wait in its queue. "
            "1 runs one request at a time.",
        ),
    ] = 64,
    max_num_batched_tokens: Annotated[
        int,
        typer.Option(
            "--max-num-batched-tokens", min=1, metavar="N",
            help="Most tokens in one forward pass: each running request's next token plus chunks of new "
            "prompts (chunked prefill). Bounds the inter-token latency while long prompts are prefilled.",
        ),
    ] = 512,
    kv_cache_memory: Annotated[
        str | None,
        typer.Option(
            "--kv-cache-memory", metavar="BYTES",
            help="KV cache of each loaded model, bytes (suffixes as --max-memory); counted in --max-memory "
            "beside its weights. Requests wait for room, and the newest is preempted (recomputed later) "
            "when it runs out. Default: 1 GiB, capped at --max-num-seqs full contexts, at least one.",
        ),
    ] = None,
    deterministic: Annotated[
        bool,
        typer.Option(
            "--deterministic",
            help="A request's tokens do not depend on what it is batched with, nor on preemption or "
            "resumption (row-by-row attention; costs throughput). Without it they almost always agree.",
        ),
    ] = False,
    cache_dir: ServeCacheDirOpt = None,
    ssd_capacity: SsdCapacityOpt = None,
    dram_capacity: DramCapacityOpt = None,
    remote: RemoteOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    direct_io: DirectIoOpt = None,
    backend: Annotated[
        str,
        typer.Option("--backend", help="What generates: sllm (its own engine) or vllm (vLLM's engine in this "
                     "process, weights through --load-format sllm; needs vLLM installed)."),
    ] = "sllm",
    log_level: Annotated[
        str, typer.Option("--log-level", help="stderr log level: debug, info (access log), warning, error.")
    ] = "warning",
    inventory: Annotated[
        Path | None,
        typer.Option("--inventory", envvar="SLLM_INVENTORY", metavar="FILE",
                     help="A cluster inventory (sllm-schedule-plan(1)): make this node a front door that forwards a "
                     "request to the node the scheduler picks and streams the answer back (one hop)."),
    ] = None,
    node_name: Annotated[
        str | None,
        typer.Option("--node-name", metavar="NAME", help="With --inventory: this node's name there (default: the "
                     "node whose url is this node's address)."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help='Once listening, print one line {"url": ..., "models": [...]} on stdout.')
    ] = False,
) -> None:
    """Serve the models in DIR over an OpenAI-compatible HTTP API, loading each on demand.

    A request naming a model that is not resident loads it through sllm's fast loader
    (concurrent requests share that one load); the response header x-sllm-load-seconds
    says how long it waited (0 when warm). Models idle for --keep-alive seconds are
    unloaded; the node keeps the tokenizers of the last 8 models it loaded, so a reload does
    not parse them again. At start the node faults in host memory for its models in the
    background (what --max-memory or --dram-capacity holds, largest models first; without
    either, the largest model's size if it fits half the available memory), so that a cold
    start reads into touched memory; /status says pool_ready when that is done. Routes: POST
    /v1/completions, POST /v1/chat/completions (stream: true for Server-Sent Events), GET
    /v1/models, GET /status, GET /health, and under /v1/cache (--admin-key) the tiers: list,
    pin, evict, pull, and POST /v1/cache/MODEL/load, which loads MODEL onto the device as a
    cold request would (schedule-plan --apply) and answers with the tier it came from and
    the load's seconds.

    With --cache-dir or --remote the node serves through the tier cache (as `sllm cache`):
    the models in its SSD and DRAM tiers and on the remote are servable too. A request for a
    model that no tier holds pulls it from the remote, remote -> SSD -> DRAM pipelined by
    chunk, and loads it from DRAM; a model on SSD loads from there (filling DRAM when there
    is room); a DRAM hit reads nothing. A failed pull fails only that model's requests
    (503). `sllm cache ... --server URL` lists, pins, evicts and pulls on the running node.

    Each model batches its requests continuously: one forward pass per step over every
    running request's next token plus chunks of new prompts (--max-num-seqs,
    --max-num-batched-tokens), over a paged KV cache of --kv-cache-memory bytes that
    counts in --max-memory; when it is full the newest request is preempted and
    recomputed later. /status shows each model's KV blocks and bytes, used and free.

    Determinism: with --deterministic a request's tokens (greedy, or sampled with a seed)
    do not depend on the other requests, on how its prompt was chunked, or on preemption,
    for a given machine, thread count and library build; without it they agree almost
    always (floating-point sums depend on the batch's shape, see the README).

    Prints the URL on stderr once listening, or with --json one line {"url", "models"} on
    stdout. Runs until Ctrl-C or SIGTERM, then drains: it stops accepting, answers new
    requests with 503, lets generations in flight finish for up to --drain-seconds, ends the
    rest with an error event and [DONE], unloads every model and exits 0.

    Limits, enforced before any work (413 for the body, 400 for the rest): body
    --max-body-bytes (2 MiB), prompt 1,000,000 characters (and the model's context in
    tokens), 512 chat messages, 4 stop strings of at most 256 characters, model names of at
    most 200 bytes. Keys (--api-key, --admin-key) are printable ASCII.

    Examples: sllm serve --models ./models --port 8343 --keep-alive 60 --max-memory 8GiB;
    sllm serve --remote s3://bucket/models --cache-dir /nvme/sllm --ssd-capacity 500GB --dram-capacity 64GiB
    """
    if models is None and cache_dir is None and remote is None:
        raise UsageError("give --models DIR, or --cache-dir/--remote to serve from the tier cache",
                         hint="convert a model with `sllm convert SRC DIR/NAME`")
    if models is not None and not models.is_dir():
        raise UsageError(f"--models {models}: not a directory", hint="convert a model with `sllm convert SRC DIR/NAME`")
    if log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise UsageError(f"--log-level {log_level!r}: choose debug, info, warning or error")
    if backend not in ("sllm", "vllm"):
        raise UsageError(f"--backend {backend!r}: choose sllm or vllm")
    from sllm.core.engine.config import EngineConfig  # no torch either
    from sllm.server.state import RequestLimits, ServeConfig  # no torch: the app and uvicorn come in _run

    cache = None
    if cache_dir is not None or remote is not None:
        cache = cache_config(cache_dir or Path(DEFAULT_CACHE_DIR), ssd_capacity=ssd_capacity,
                             dram_capacity=dram_capacity, remote=remote)
    config = ServeConfig(
        models_dir=models.resolve() if models is not None else None,
        device=device,
        keep_alive_seconds=keep_alive,
        max_memory_bytes=parse_bytes(max_memory, "--max-memory", minimum=1) if max_memory is not None else None,
        api_key=api_key or None,
        admin_key=admin_key or None,
        drain_seconds=drain_seconds,
        limits=RequestLimits(max_body_bytes=parse_bytes(max_body_bytes, "--max-body-bytes", minimum=1024)),
        loader_threads=threads,
        direct_io=direct_io,
        cache=cache,
        backend=backend,
        engine=EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_bytes=parse_bytes(kv_cache_memory, "--kv-cache-memory", minimum=1)
            if kv_cache_memory is not None else None,
            deterministic=deterministic,
        ),
    )
    inv = None
    if inventory is not None:
        from sllm.core.inventory import TomlInventory

        inv = TomlInventory(inventory).load()
    elif node_name is not None:
        raise UsageError("--node-name needs --inventory")
    _run(config, host, port, log_level, json_out, inv, node_name)


def _front_door(inv: Any, node_name: str | None, url: str) -> Any:
    """The :class:`~sllm.server.frontdoor.FrontDoor` of this node (found by name, else by URL).

    Raises:
        UsageError: no node of the inventory is this one.
    """
    from sllm.client import HttpMigrator
    from sllm.server.frontdoor import FrontDoor

    if node_name is None:
        same = [n for n, s in inv.nodes.items() if s.url.rstrip("/") == url.rstrip("/")
                or s.url.rstrip("/") == url.replace("127.0.0.1", "localhost").rstrip("/")]
        if len(same) != 1:
            raise UsageError(f"--inventory {inv.source}: no node has url {url}; name this node with --node-name")
        node_name = same[0]
    return FrontDoor(inv, node_name, migrator=HttpMigrator())


def _run(config: Any, host: str, port: int, log_level: str, json_out: bool, inv: Any = None,
         node_name: str | None = None) -> None:
    """Bind, build the app, announce once listening, serve until a signal."""
    from sllm.server.app import NodeServer, create_app, uvicorn_config
    from sllm.server.warmup import enable_heap_freezing

    enable_heap_freezing()  # this process is the node's: full collections would pause every stream

    sock = _bind(host, port)
    url = _url(sock)
    try:
        app = create_app(config, front_door=_front_door(inv, node_name, url) if inv is not None else None)
    except BaseException:
        sock.close()
        raise
    ids = app.state.manager.scan()

    def announce() -> None:
        if json_out:
            sys.stdout.write(json.dumps({"url": url, "models": ids}) + "\n")
            sys.stdout.flush()
        else:
            remote = config.cache.remote_url if config.cache is not None else None
            pulled = f", and models pulled from {remote} on demand," if remote else ""
            print(f"sllm: serving {len(ids)} model(s) ({', '.join(ids) or 'none yet'}){pulled} on {url}; Ctrl-C stops",
                  file=sys.stderr, flush=True)  # fmt: skip

    class Server(NodeServer):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                announce()

    uv_config = uvicorn_config(app, config.drain_seconds, log_config=_log_config(log_level),
                               log_level=log_level.lower())  # fmt: skip
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if main else None
    try:  # uvicorn shuts down gracefully on SIGINT/SIGTERM (the drain), then re-raises the signal
        Server(uv_config, app, config.drain_seconds).run(sockets=[sock])
    finally:
        sock.close()
        if main:
            signal.signal(signal.SIGTERM, previous)


def _stopped(signum: int, frame: Any) -> None:
    """SIGTERM after the graceful shutdown: a normal stop, exit 0."""
    print("sllm: stopped", file=sys.stderr)
    raise typer.Exit(0)
