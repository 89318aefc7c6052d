"""The records of a node's model lifecycle: its configuration, a servable model's entry, a
resident model, a request's lease, a cold start's breakdown, and the lifecycle's errors.

Plain data for :mod:`sllm.server.models` (which owns and changes them, on the event loop),
``app.py`` and ``cache_api.py`` (which read them and map the errors to HTTP statuses). No
behaviour, no I/O.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm.errors import CacheError, ServerError, SllmError, UsageError

if TYPE_CHECKING:
    from sllm.core.cache import CacheConfig


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask, enforced before any work (over a limit: 413 for the body,
    400 for the rest, one line naming the limit).

    Attributes:
        max_body_bytes: largest request body, bytes (default 2 MiB; ``--max-body-bytes``).
            Checked against ``Content-Length`` before the body is read, and counted while
            a chunked body arrives.
        max_prompt_chars: longest text prompt, or all chat messages together, in characters
            (default 1,000,000); the token count is then bounded by the model's context.
        max_messages: most chat messages in one request (default 512).
        max_stop_sequences: most stop strings (default 4, as OpenAI).
        max_stop_chars: longest stop string, characters (default 256).
    """

    max_body_bytes: int = 2 * 1024 * 1024
    max_prompt_chars: int = 1_000_000
    max_messages: int = 512
    max_stop_sequences: int = 4
    max_stop_chars: int = 256


@dataclass(frozen=True)
class ServeConfig:
    """What a node serves and how; built by ``sllm serve`` from its flags.

    Attributes:
        models_dir: directory of converted models, one per subdirectory (id = its name);
            None when the node serves from its tier cache only.
        device: where models run: "cpu", "cuda", "cuda:N".
        keep_alive_seconds: idle seconds before a resident model is unloaded. Default 300.
        max_memory_bytes: most bytes of resident model weights (sum of checkpoint sizes);
            None for no limit. Least recently used idle models unload to make room.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <key>``
            (ASCII only; compared as bytes in constant time).
        admin_key: the key of the cache routes (``/v1/cache/...``: pin, evict, pull, load) and
            ``/status``; None (default): the same as ``api_key``.
        drain_seconds: on SIGTERM, how long generations in flight may run to their end
            before they are ended with an error event, seconds (default 30).
        limits: :class:`RequestLimits`.
        reap_interval_seconds: how often idle models are checked; default
            ``min(1, keep_alive_seconds / 4)``.
        loader_threads: reader threads per partition (None: the loader's default).
        direct_io: force O_DIRECT on or off (None: where the filesystem allows).
        cache: the tier cache (SSD directory and capacity, DRAM capacity, remote); None
            (default): no cache, only ``models_dir``.
        engine: each model's :class:`sllm.core.engine.EngineConfig` (``--max-num-seqs``,
            ``--max-num-batched-tokens``, ``--kv-cache-memory``, ``--deterministic``); None:
            its defaults. A model's KV cache counts in ``max_memory_bytes`` beside its weights.
    """

    models_dir: Path | None = None
    device: str = "cpu"
    keep_alive_seconds: float = 300.0
    max_memory_bytes: int | None = None
    api_key: str | None = None
    admin_key: str | None = None
    drain_seconds: float = 30.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    reap_interval_seconds: float | None = None
    loader_threads: int | None = None
    direct_io: bool | None = None
    cache: CacheConfig | None = None
    engine: Any = None
    #: What generates: "sllm" (sllm.core.engine) or "vllm" (sllm.integrations.vllm.backend).
    backend: str = "sllm"

    def __post_init__(self) -> None:
        for flag, key in (("--api-key", self.api_key), ("--admin-key", self.admin_key)):
            if key is not None and (not key.isascii() or not key.isprintable() or not key.strip()):
                raise UsageError(f"{flag}: use printable ASCII characters only (HTTP headers carry ASCII)")


class ModelNotFound(SllmError):
    """No model of that id in the models directory (the app answers 404)."""


class TierConflict(CacheError):
    """A tier refuses to give a model up: it is pinned, loading, or serving requests (409)."""


class NotInTier(CacheError):
    """The model is not in the tier(s) asked about, or the node has no such tier (404)."""


class ShuttingDown(ServerError):
    """The node is draining for shutdown and takes no new work (the app answers 503)."""


class ModelLoadFailed(ServerError):
    """The model could not be loaded; ``__cause__`` is the underlying error (the app answers 503).

    ``phase`` is "pull" when the tier cache could not bring the model to the node (remote
    not found or unreachable, checksum mismatch, no room), else "load".
    """

    def __init__(self, message: str, *, phase: str = "load") -> None:
        super().__init__(message)
        self.phase = phase


@dataclass
class ColdStart:
    """Where a cold request's time went, seconds (``/status`` ``last_cold_start``).

    ``queue_seconds``: waiting for the loader and for room in the memory budget;
    ``read_seconds``/``build_seconds``: the loader's report (reads from storage, or the
    host-to-device copy of a DRAM entry); ``load_seconds``: the whole load (pull, weights
    and tokenizer, from the loader's start); ``first_token_seconds``: from the end of the
    load to the first token (tokenize + prefill); ``ttft_seconds``: from the request's
    arrival to its first token. ``tier``: where the bytes came from: "local" (``--models``),
    "dram" (a DRAM-tier hit, nothing read), "ssd" or "remote"; ``pull_seconds``: what the
    tier cache took to bring them to the node (download, SSD -> DRAM); ``fetched_bytes``:
    bytes downloaded from the remote.
    """

    model: str
    queue_seconds: float
    read_seconds: float
    build_seconds: float
    load_seconds: float
    nbytes: int
    gbps: float
    tier: str = "local"
    pull_seconds: float = 0.0
    fetched_bytes: int = 0
    first_token_seconds: float | None = None
    ttft_seconds: float | None = None


@dataclass
class Resident:
    """A loaded model: weights, tokenizer, engine, and its bookkeeping (``tier``: where its
    bytes came from, as :attr:`ColdStart.tier`)."""

    model_id: str
    model: Any
    tokenizer: Any
    engine: Any
    nbytes: int
    load_seconds: float
    loaded_at: float
    last_used: float
    leases: int = 0
    tier: str = "local"
    kv_bytes: int = 0  # the engine's KV cache, counted in the memory budget beside ``nbytes``


@dataclass
class Entry:
    """A servable model: ``kind`` "local" (``path`` is its ``--models`` directory) or "cache"
    (the tier cache holds it, or its remote may; ``path`` is None). ``pinned``: never
    unloaded by keep-alive or the memory budget while resident."""

    model_id: str
    path: Path | None
    kind: str = "local"
    resident: Resident | None = None
    loading: asyncio.Future | None = None
    unloading: asyncio.Future | None = None
    waiting: int = 0
    cold: ColdStart | None = None
    pinned: bool = False


@dataclass
class Lease:
    """A request's hold on a resident model; give it back with :meth:`ModelManager.release`.

    ``load_seconds`` is what this request waited for a load (0 when the model was resident).
    """

    resident: Resident
    load_seconds: float
    arrived: float
    cold: ColdStart | None = None
    released: bool = field(default=False, repr=False)
