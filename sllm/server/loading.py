"""The blocking half of a node's cold start, run in a load thread: the weights (the loader,
or the tier cache's DRAM lease or SSD entry) and the tokenizer in parallel, then the engine.

Tokenizers outlive their model's unload in a :class:`TokenizerCache`, so a reload (after
scale to zero, from the DRAM tier) does not parse ``tokenizer.json`` again: that takes
0.14-0.24 s for GPT-2's tokenizer on a 2-core VM, against a few milliseconds for the
weights of a DRAM-tier hit.

:mod:`sllm.server.models` decides when and in which resource's queue this runs; this module
only does it. It knows nothing of the event loop or HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm.errors import CheckpointError
from sllm.server.state import Entry, ServeConfig
from sllm.server.warmup import import_model_code

if TYPE_CHECKING:
    from sllm.server.tiers import Fetched, NodeTiers


#: Tokenizers a node keeps after their models unload (least recently used dropped first).
TOKENIZER_CACHE_SIZE = 8
#: Files that cannot be a tokenizer's: weights, and sllm's manifest and tensor index.
_NOT_TOKENIZER_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".gguf")
_NOT_TOKENIZER_NAMES = ("sllm.json", "tensor_index.json")
#: Side files larger than this count by size and modification time, not bytes (reading them
#: at every load would cost more than the parse saved).
_MAX_SIDE_FILE_BYTES = 64 << 20


def side_files_digest(path: Path) -> str:
    """SHA-256 (hex) of the names and bytes of every file in ``path`` that a tokenizer may
    read: all regular files but weights (``.bin``, ``.safetensors``, ...) and sllm's manifest
    and tensor index; a file over 64 MiB counts by its size and modification time instead.
    Two directories with the same digest give the same tokenizer.

    Raises:
        OSError: ``path`` cannot be listed or a file read.
    """
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if not f.is_file() or f.name in _NOT_TOKENIZER_NAMES or f.suffix in _NOT_TOKENIZER_SUFFIXES:
            continue
        st = f.stat()
        if st.st_size > _MAX_SIDE_FILE_BYTES:
            digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0large\0".encode())
            continue
        data = f.read_bytes()
        digest.update(f"{f.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


class TokenizerCache:
    """The tokenizers of recently loaded models, keyed by (model id, :func:`side_files_digest`
    of the directory it was loaded from), at most ``capacity`` (default
    :data:`TOKENIZER_CACHE_SIZE`; 0 keeps none), least recently used dropped first.

    A model's new files (a reconversion, a new tokenizer) give a new digest, hence a fresh
    load. Each model id keeps one tokenizer; it is used by one resident copy at a time (a node
    never holds two loads of one model). Thread-safe; one parse per model at a time, so a
    load that asks while :meth:`prefetch` parses waits for that parse.
    """

    def __init__(self, capacity: int = TOKENIZER_CACHE_SIZE) -> None:
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._parsing: dict[str, threading.Lock] = {}  # model id -> held while its tokenizer is got
        self.hits = 0
        self.misses = 0

    def prefetch(self, model_id: str, path: Path) -> threading.Thread | None:
        """Parse ``model_id``'s tokenizer from ``path`` in a thread of its own (after importing
        its architecture's code, :func:`~sllm.server.warmup.import_model_code`), so that a
        cold start's :meth:`get` finds it; a failure is left for that :meth:`get` to meet.
        Returns the thread, or None when nothing is kept (``capacity`` 0)."""
        if not self.capacity:
            return None

        def run() -> None:
            try:
                import_model_code(path)
                self.get(model_id, path)
            except Exception:  # noqa: BLE001 - the load's own get() parses again and reports it
                pass

        t = threading.Thread(target=run, name=f"sllm-tokenizer-prefetch-{model_id}", daemon=True)
        t.start()
        return t

    def get(self, model_id: str, path: Path) -> Any:
        """The tokenizer of ``model_id`` loaded from ``path`` (``AutoTokenizer.from_pretrained``),
        from the cache when ``path``'s side files are those it was loaded from.

        Raises:
            whatever ``AutoTokenizer.from_pretrained`` raises (nothing is cached then).
        """
        from transformers import AutoTokenizer

        if not self.capacity:
            return AutoTokenizer.from_pretrained(path)
        with self._lock:
            parsing = self._parsing.setdefault(model_id, threading.Lock())
        with parsing:
            digest = side_files_digest(path)
            with self._lock:
                held = self._items.get(model_id)
                if held is not None and held[0] == digest:
                    self._items.move_to_end(model_id)
                    self.hits += 1
                    return held[1]
                self.misses += 1
            tokenizer = AutoTokenizer.from_pretrained(path)
            with self._lock:
                self._items[model_id] = (digest, tokenizer)
                self._items.move_to_end(model_id)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            return tokenizer

    def held(self) -> list[str]:
        """The model ids whose tokenizer is cached, sorted."""
        with self._lock:
            return sorted(self._items)


def load_blocking(
    entry: Entry,
    fetched: Fetched | None,
    *,
    config: ServeConfig,
    pool: Any,
    tiers: NodeTiers | None,
    loader: Callable[[Path, ServeConfig, Any], Any],
    release: Callable[[Any], None],
    make_engine: Callable[[Any, Entry], Any],
    tokenizers: TokenizerCache | None = None,
) -> tuple[Any, Any, Any]:
    """Load ``entry``: (model, tokenizer, engine). Blocking.

    A local entry (``fetched`` None) loads from its directory with ``loader(path, config,
    pool)``; a cache entry from ``fetched`` (:meth:`NodeTiers.source`: its DRAM lease, or
    its SSD entry held by a lease while it is read). The tokenizer comes from ``tokenizers``
    when given (a reload), else is loaded.

    Raises:
        CheckpointError: the tokenizer cannot be loaded (the weights are released first);
            and whatever the loader raises.
    """
    with contextlib.ExitStack() as stack:
        if fetched is None:
            assert entry.path is not None
            path = entry.path
            load_weights = lambda: loader(path, config, pool)  # noqa: E731
        else:
            assert tiers is not None
            if config.backend == "vllm":  # vLLM reads the SSD entry itself (--load-format sllm)
                path = stack.enter_context(tiers.cache.ssd_lease(fetched.model, pull=True))
                load_weights = lambda: loader(path, config, pool)  # noqa: E731
            else:
                path, load_weights = stack.enter_context(tiers.source(
                    fetched, device=config.device, pool=pool, threads=config.loader_threads,
                    direct_io=config.direct_io))
        import_model_code(path)
        box: dict[str, Any] = {}

        def tokenizer() -> None:
            try:
                box["tokenizer"] = (tokenizers if tokenizers is not None else TokenizerCache(0)).get(entry.model_id, path)
            except Exception as exc:
                box["error"] = exc

        t = threading.Thread(target=tokenizer, name=f"sllm-tokenizer-{entry.model_id}")
        t.start()
        try:
            model = load_weights()
        finally:
            t.join()
        if "error" in box:
            release(model)
            where = entry.path or entry.model_id
            raise CheckpointError(f"{where}: cannot load the tokenizer: {box['error']}") from box["error"]
    return model, box["tokenizer"], make_engine(model, entry)


def default_loader(path: Path, config: ServeConfig, pool: Any) -> Any:
    """The sllm backend's weights: :func:`sllm.core.loader.load_model` with the node's
    device, reader threads and O_DIRECT setting, into its host memory ``pool``."""
    from sllm.core.loader import load_model

    return load_model(path, config.device, threads=config.loader_threads, direct_io=config.direct_io, pool=pool)


def default_release(model: Any) -> None:
    """Undo :func:`default_loader` (:func:`sllm.core.loader.release`: the buffers go back to the pool)."""
    from sllm.core.loader import release

    release(model)
