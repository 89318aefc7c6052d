"""``--load-format sllm``: a vLLM ``BaseModelLoader`` that reads weights with sllm's loader.

vLLM builds the model itself (its own modules, quantization, tensor-parallel layout) and
asks the loader to fill it (``load_weights(model, model_config)``). This loader reads the
sllm checkpoint with :class:`sllm.integrations.vllm.stream.StreamedLoad`: each partition into
one pooled host buffer with large parallel (O_DIRECT) reads, every tensor a view at its
offset, handed on as soon as its bytes land. It hands ``model.load_weights`` those views under
the source checkpoint's names (:mod:`sllm.integrations.vllm.names`), so vLLM's own per-model
weight loaders copy each into its parameter while the next chunks are read (slicing it for
tensor parallelism: one checkpoint serves any TP degree). Then the buffers go back to the
pool, and the model's parameters, as those loaders left them, are written as its vLLM layout
(:mod:`sllm.integrations.vllm.layout`): later loads of the same model, vLLM version and rank
read that instead and make every parameter a view of the read buffer, with no copy. With
``cache_dir`` in the extra config the checkpoint comes through sllm's tier cache (pulled
from a remote into the SSD tier first).

It imports vLLM, so only vLLM imports it (through :func:`sllm.integrations.vllm.register`).
It does not build models, pick devices or change vLLM's memory accounting.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from sllm.core.convert import write_tensors
from sllm.core.format import Checkpoint, open_checkpoint
from sllm.core.loader import LoadReport
from sllm.core.pool import HostMemoryPool
from sllm.errors import CheckpointError, SllmError
from sllm.integrations.vllm.layout import (
    alias,
    default_layout_dir,
    layout_key,
    model_tensors,
    open_layout,
    trim,
    unusable,
)
from sllm.integrations.vllm.names import source_weights
from sllm.integrations.vllm.options import LoaderOptions
from sllm.integrations.vllm.stream import StreamedLoad
from sllm.io.atomic import remove_stale_temporaries
from sllm.io.reader import DEFAULT_READ_THREADS

#: Layout directories this process has swept of dead writers' temporaries.
_swept: set[Path] = set()

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
        last_layout: how that load filled the model (see the attribute).

    Raises (constructor): UsageError for a bad extra config.
    """

    last_report: LoadReport | None = None
    #: How this process's last load filled the model: "aliased" (views of vLLM's layout),
    #: "written" (by name: vLLM's loaders copied; then the layout was written), "name-mapped"
    #: (by name, the layout not written), "off" (by name, ``layout`` false) or "unusable: why"
    #: (by name, no layout can stand for this model).
    last_layout: str = ""
    #: The threads still flushing layouts this process wrote (each ends with its rename).
    layout_writes: list[threading.Thread] = []
    #: (bytes still viewed, bytes given back) of the last aliased load's buffers after vLLM
    #: processed the weights (one-load pools only); None otherwise.
    last_trim: tuple[int, int] | None = None
    #: The host memory pool the partition buffers are leased from. None (vLLM's own
    #: processes): a pool of one load, emptied after it, so no host copy outlives the load.
    #: A long-lived process (``sllm serve --backend vllm``) sets its node's pool here, so
    #: a model reloaded soon after is not read again (the DRAM tier).
    pool: HostMemoryPool | None = None

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = LoaderOptions.parse(load_config.model_loader_extra_config)
        self._aliased: StreamedLoad | None = None

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

    def load_model(self, vllm_config: Any, model_config: ModelConfig, prefix: str = "") -> torch.nn.Module:
        """vLLM's load (build, :meth:`load_weights`, process weights), then the dead pages of
        an aliased one-load buffer given back (:func:`~sllm.integrations.vllm.layout.trim`)."""
        self._aliased = None
        SllmModelLoader.last_trim = None
        model = super().load_model(vllm_config, model_config, prefix)
        load, self._aliased = self._aliased, None
        if load is not None and SllmModelLoader.pool is None:
            trims = trim(load.leases, model)
            load.leases.clear()  # the model's views own the memory now
            SllmModelLoader.last_trim = (sum(t.live_bytes for t in trims), sum(t.freed_bytes for t in trims))
            logger.info("sllm: %.2f GB of the layout's buffer still viewed by the model, %.2f GB given back%s",
                        sum(t.live_bytes for t in trims) / 1e9, sum(t.freed_bytes for t in trims) / 1e9,
                        "".join(f" ({t.skipped})" for t in trims if t.skipped))
        return model

    def load_weights(self, model: torch.nn.Module, model_config: ModelConfig) -> None:
        """Fill ``model``'s parameters from the checkpoint.

        Through the layout (:mod:`sllm.integrations.vllm.layout`) where there is one for
        this model and rank: every parameter and buffer becomes a view of the read buffer.
        Otherwise the checkpoint's tensors go to ``model.load_weights`` under its names (vLLM's
        loaders copy them), and then the layout is written for the next load (where one can
        stand for the model: unquantized, in host memory).

        Raises:
            CheckpointError: not an sllm checkpoint, truncated or malformed metadata (the
            message names the file), a checksum mismatch with ``verify``, or a model
            parameter the checkpoint has no tensor for. Other SllmError subclasses from the
            tier cache. A layout that is damaged or not the model's is not an error: it is
            logged, the load goes by name and the layout is written again.
        """
        with _one_line(), self._checkpoint_dir(model_config) as path:
            started = time.perf_counter()
            ckpt = open_checkpoint(path)
            pool = SllmModelLoader.pool or HostMemoryPool()
            tensors = model_tensors(model)
            where = self._layout_path(ckpt, tensors, model_config)
            layout = None
            if where is not None:
                try:
                    layout = open_layout(where, tensors)
                except CheckpointError as exc:  # a cache: the checkpoint itself is fine
                    logger.warning("sllm: ignoring the vLLM layout (%s); loading by name and writing it again", exc)
            load = StreamedLoad(layout or ckpt, pool, threads=self.options.threads or DEFAULT_READ_THREADS,
                                direct_io=self.options.direct_io, verify=self.options.verify)
            if layout is not None:
                try:
                    alias(tensors, load.tensors())
                except BaseException:
                    pool.reclaim(load.leases)  # some parameters may view the buffers already
                    raise
                self._aliased = load
                if SllmModelLoader.pool is not None:  # back to the node's pool once the model is gone,
                    for host in load.leases:  # as plain memory: vLLM may change weights in place
                        host.tag = None
                    pool.reclaim(load.leases)
                SllmModelLoader.last_layout = "aliased"
            else:
                self._name_mapped(model, model_config, ckpt, load, pool)
                if where is not None:
                    SllmModelLoader.last_layout = "name-mapped"
            seconds = time.perf_counter() - started
            r = load.report
            SllmModelLoader.last_report = r
            if r is not None:
                logger.info(
                    "sllm: %.2f GB read and loaded into the model in %.2f s (%.2f GB/s, %s%s%s)",
                    r.nbytes / 1e9, seconds, r.nbytes / seconds / 1e9, "O_DIRECT" if r.direct_io else "buffered",
                    ", from the host memory pool" if r.pool_hit else "",
                    ", parameters aliased to vLLM's layout" if layout is not None else "",
                )
            if where is not None and layout is None:
                self._write_layout(where, tensors, model)

    def _layout_path(self, ckpt: Checkpoint, tensors: dict[str, torch.Tensor], model_config: ModelConfig) -> Path | None:
        """Where this model's layout is (or would be written); None where none can stand for it."""
        SllmModelLoader.last_layout = "off"
        if not self.options.layout:
            return None
        why = unusable(tensors, model_config.quantization)
        if why is not None:
            SllmModelLoader.last_layout = f"unusable: {why}"
            logger.info("sllm: no vLLM layout for this model (%s)", why)
            return None
        import vllm
        from vllm.distributed.parallel_state import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        pp = get_pp_group()
        key = layout_key(ckpt, tensors, vllm_version=vllm.__version__,
                         tp=(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()),
                         pp=(pp.rank_in_group, pp.world_size))
        return Path(self.options.layout_dir or default_layout_dir()) / key

    def _name_mapped(self, model: torch.nn.Module, model_config: ModelConfig, ckpt: Checkpoint,
                     load: StreamedLoad, pool: HostMemoryPool) -> None:
        """The checkpoint's tensors to ``model.load_weights`` under its names (vLLM copies them)."""
        try:
            names = model.load_weights(source_weights(ckpt, load.tensors()))
        finally:
            load.release()
            if SllmModelLoader.pool is None:
                pool.clear()
        if names is not None and model_config.quantization is None:
            try:
                DefaultModelLoader.track_weights_loading(self, model, set(names))
            except ValueError as exc:
                raise CheckpointError(
                    f"{ckpt.path}: the checkpoint has no tensor for some of vLLM's parameters "
                    f"({str(exc).split(':', 1)[-1].strip()[:300]})"
                ) from exc

    def _write_layout(self, where: Path, before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
        """Write the model's parameters and buffers as its layout; a failure only warns.

        Only when vLLM's loaders filled the tensors the key was made from (same names,
        shapes and dtypes): a loader that swapped a parameter for another shape would make
        the key name a layout it is not."""
        tensors = model_tensors(model)
        if [(n, t.shape, t.dtype) for n, t in tensors.items()] != [(n, t.shape, t.dtype) for n, t in before.items()]:
            logger.warning("sllm: vLLM's weight loaders changed the model's parameters; no vLLM layout written")
            return
        started = time.perf_counter()
        if where.parent not in _swept:  # once per process: later temporaries may be this process's own
            remove_stale_temporaries(where.parent)
            _swept.add(where.parent)
        written = threading.Event()
        failed: list[BaseException] = []

        def write() -> None:
            try:
                write_tensors(tensors, where, model_id=where.name, force=True, on_written=written.set)
                logger.info("sllm: vLLM layout in place at %s after %.2f s", where, time.perf_counter() - started)
            except Exception as exc:  # a cache that cannot be written must not fail the engine
                failed.append(exc)
                logger.warning("sllm: could not write the vLLM layout %s (%s); later loads copy as this one did",
                               where, exc)
            finally:
                written.set()

        # Not a daemon: the interpreter's exit waits for the flush and the rename.
        thread = threading.Thread(target=write, name="sllm-vllm-layout")
        thread.start()
        written.wait()  # every byte is in the files: vLLM may process the weights from here
        if not failed:
            SllmModelLoader.last_layout = "written"
            logger.info("sllm: vLLM layout written in %.2f s (flushed and renamed into place in the background; "
                        "later loads alias it)", time.perf_counter() - started)
        SllmModelLoader.layout_writes[:] = [t for t in SllmModelLoader.layout_writes if t.is_alive()] + [thread]


@contextlib.contextmanager
def _one_line() -> Iterator[None]:
    """Fold an SllmError's hint into its message, so vLLM's last traceback line says it all."""
    try:
        yield
    except SllmError as exc:
        if exc.hint and exc.hint not in str(exc):
            raise type(exc)(f"{exc} ({exc.hint})") from exc
        raise
