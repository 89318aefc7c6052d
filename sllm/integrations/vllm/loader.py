"""``--load-format sllm``: a vLLM ``BaseModelLoader`` that reads weights with sllm's loader.

vLLM builds the model itself (its own modules, quantization, tensor-parallel layout) and
asks the loader to fill it (``load_weights(model, model_config)``). This loader reads the
sllm checkpoint with :class:`sllm.integrations.vllm.stream.StreamedLoad`: each partition into
one pooled host buffer with large parallel (O_DIRECT) reads, every tensor a view at its
offset, handed on as soon as its bytes land. It hands ``model.load_weights`` those views under
the source checkpoint's names (:mod:`sllm.integrations.vllm.names`), so vLLM's own per-model
weight loaders copy each into its parameter while the next chunks are read (slicing it for
tensor parallelism: one checkpoint serves any TP degree). Then the buffers go back to the
pool. With ``cache_dir`` in the extra config the checkpoint comes through sllm's tier cache
(pulled from a remote into the SSD tier first).

It imports vLLM, so only vLLM imports it (through :func:`sllm.integrations.vllm.register`).
It does not build models, pick devices or change vLLM's memory accounting.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from sllm.core.format import open_checkpoint
from sllm.core.loader import LoadReport
from sllm.core.pool import HostMemoryPool
from sllm.errors import CheckpointError, SllmError
from sllm.integrations.vllm.names import source_weights
from sllm.integrations.vllm.options import LoaderOptions
from sllm.integrations.vllm.stream import StreamedLoad
from sllm.io.reader import DEFAULT_READ_THREADS

# Under "vllm." so that vLLM's logging configuration shows it with its own lines.
logger = init_logger("vllm.model_executor.model_loader.sllm")


class SllmModelLoader(BaseModelLoader):
    """vLLM model loader for sllm checkpoints (``--load-format sllm``).

    Args:
        load_config: vLLM's; ``model_loader_extra_config`` is parsed by
            :meth:`LoaderOptions.parse`.

    Attributes:
        last_report: the :class:`~sllm.core.loader.LoadReport` of this process's last load
            (bytes, read seconds, GB/s, O_DIRECT), for benchmarks; None before one.

    Raises (constructor): UsageError for a bad extra config.
    """

    last_report: LoadReport | None = None
    #: The host memory pool the partition buffers are leased from. None (vLLM's own
    #: processes): a pool of one load, emptied after it, so no host copy outlives the load.
    #: A long-lived process (``sllm serve --backend vllm``) sets its node's pool here, so
    #: a model reloaded soon after is not read again (the DRAM tier).
    pool: HostMemoryPool | None = None

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = LoaderOptions.parse(load_config.model_loader_extra_config)

    @contextlib.contextmanager
    def _checkpoint_dir(self, model_config: ModelConfig) -> Iterator[Path]:
        """The sllm checkpoint directory, held (not evictable) while the body runs."""
        if not self.options.cache_dir:
            yield Path(model_config.model)
            return
        from sllm.core.cache import CacheConfig, TierCache

        name = self.options.model or Path(str(model_config.model).rstrip("/")).name
        cache = TierCache(CacheConfig(cache_dir=Path(self.options.cache_dir), remote_url=self.options.remote_url()))
        try:
            with cache.ssd_lease(name, pull=True) as path:
                yield path
        finally:
            cache.close()

    def download_model(self, model_config: ModelConfig) -> None:
        """Make the checkpoint local: pull it into the SSD tier when ``cache_dir`` is set.

        Raises:
            SllmError subclasses (CacheError, RemoteError, CheckpointError), one line each.
        """
        with _one_line(), self._checkpoint_dir(model_config):
            pass

    def load_weights(self, model: torch.nn.Module, model_config: ModelConfig) -> None:
        """Read the checkpoint and hand its tensors to ``model.load_weights``.

        Raises:
            CheckpointError: not an sllm checkpoint, truncated or malformed metadata (the
            message names the file), a checksum mismatch with ``verify``, or a model
            parameter the checkpoint has no tensor for. Other SllmError subclasses from
            the tier cache.
        """
        with _one_line(), self._checkpoint_dir(model_config) as path:
            started = time.perf_counter()
            ckpt = open_checkpoint(path)
            pool = SllmModelLoader.pool or HostMemoryPool()
            load = StreamedLoad(ckpt, pool, threads=self.options.threads or DEFAULT_READ_THREADS,
                                direct_io=self.options.direct_io, verify=self.options.verify)
            try:
                names = model.load_weights(source_weights(ckpt, load.tensors()))
            finally:
                load.release()
                if SllmModelLoader.pool is None:
                    pool.clear()
            seconds = time.perf_counter() - started
            if names is not None and model_config.quantization is None:
                try:
                    DefaultModelLoader.track_weights_loading(self, model, set(names))
                except ValueError as exc:
                    raise CheckpointError(
                        f"{path}: the checkpoint has no tensor for some of vLLM's parameters "
                        f"({str(exc).split(':', 1)[-1].strip()[:300]})"
                    ) from exc
            r = load.report
            SllmModelLoader.last_report = r
            if r is not None:
                logger.info(
                    "sllm: %.2f GB read and loaded into the model in %.2f s (%.2f GB/s, %s%s)",
                    r.nbytes / 1e9, seconds, r.nbytes / seconds / 1e9, "O_DIRECT" if r.direct_io else "buffered",
                    ", from the host memory pool" if r.pool_hit else "",
                )


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    """Fold an SllmError's hint into its message, so vLLM's last traceback line says it all."""
    try:
        yield
    except SllmError as exc:
        if exc.hint and exc.hint not in str(exc):
            raise type(exc)(f"{exc} ({exc.hint})") from exc
        raise
