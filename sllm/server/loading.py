"""The blocking half of a node's cold start, run in a load thread: the weights (the loader,
or the tier cache's DRAM lease or SSD entry) and the tokenizer in parallel, then the engine.

:mod:`sllm.server.models` decides when and in which resource's queue this runs; this module
only does it. It knows nothing of the event loop or HTTP.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm.errors import CheckpointError
from sllm.server.state import Entry, ServeConfig
from sllm.server.warmup import import_model_code

if TYPE_CHECKING:
    from sllm.server.tiers import Fetched, NodeTiers


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
) -> tuple[Any, Any, Any]:
    """Load ``entry``: (model, tokenizer, engine). Blocking.

    A local entry (``fetched`` None) loads from its directory with ``loader(path, config,
    pool)``; a cache entry from ``fetched`` (:meth:`NodeTiers.source`: its DRAM lease, or
    its SSD entry held by a lease while it is read).

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
                from transformers import AutoTokenizer

                box["tokenizer"] = AutoTokenizer.from_pretrained(path)
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
