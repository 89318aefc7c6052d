"""The node's tier cache as its model manager uses it: where a model's bytes come from, and
how a cold start takes them (DESIGN.md "Tiers"; ServerlessLLM §4).

:class:`NodeTiers` wraps the node's :class:`~sllm.core.cache.TierCache` (SSD tier in
``--cache-dir``, DRAM tier in the manager's host memory pool, ``--remote``) for
:class:`~sllm.server.models.ModelManager`:

- :meth:`NodeTiers.cached` and :meth:`NodeTiers.remote_models`: the catalogue's cache part;
- :meth:`NodeTiers.fetch` (blocking, run in a worker thread): bring a model to the fastest
  tier that can hold it, before a load: a DRAM hit needs no read; an SSD entry is read into
  DRAM when the tier has room; a model that no tier holds is pulled from the remote through
  the chunk pipeline, remote -> SSD -> DRAM at once. The :class:`Fetched` result holds the
  DRAM lease, so the entry cannot be evicted under the load;
- :meth:`NodeTiers.source` (blocking): the files for the tokenizer and the function that
  loads the weights, from the DRAM lease (no read; on the CPU the model's weights are views
  of the DRAM buffers and the lease lives as long as the model, given back when it
  unloads) or from the SSD entry (held by an SSD lease while it is read).

It knows nothing of HTTP (``cache_api.py`` serves the tiers) nor of residency (``models.py``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm.core.cache import CacheConfig, DramLease, TierCache, entry_name
from sllm.errors import SllmError, UsageError

if TYPE_CHECKING:
    from sllm.core.pool import HostMemoryPool

log = logging.getLogger("sllm.server")


@dataclass
class Fetched:
    """A model brought to the node's fastest tier with room for it, ready to load.

    Attributes:
        model: the model name.
        source: the tier its bytes came from: "dram" (a hit, nothing read), "ssd" or "remote".
        pull_seconds: time the cache took (download, SSD -> DRAM read; ~0 on a DRAM hit), seconds.
        fetched_bytes: bytes downloaded from the remote (0 unless ``source`` is "remote").
        nbytes: the weights' bytes (all partitions).
        lease: the DRAM entry, held (not evictable) until the load takes it or :meth:`close`;
            None when the model is in the SSD tier only (no DRAM tier, or no room in it).
    """

    model: str
    source: str
    pull_seconds: float
    fetched_bytes: int
    nbytes: int
    lease: DramLease | None

    def close(self) -> None:
        """Give the DRAM lease back unless a load took it. Idempotent."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()


class NodeTiers:
    """The node's tier cache.

    Args:
        config: the cache directory, capacities and remote (``sllm serve`` flags).
        pool: the manager's host memory pool; the DRAM tier's buffers come from it.

    Raises (constructor):
        CacheError: the cache directory cannot be created or locked.
    """

    def __init__(self, config: CacheConfig, pool: HostMemoryPool) -> None:
        self.config = config
        self.cache = TierCache(config, pool=pool)

    @property
    def has_remote(self) -> bool:
        """True when models can be pulled from a remote."""
        return bool(self.config.remote_url)

    def close(self) -> None:
        """Close the remote's connections."""
        self.cache.close()

    # -- the catalogue --------------------------------------------------------------------

    def cached(self) -> dict[str, list[str]]:
        """Models whole in a local tier: name -> tiers holding them, fastest first ("dram", "ssd")."""
        out: dict[str, list[str]] = {}
        for row in self.cache.ls():
            if row.state == "whole":
                out.setdefault(row.model, []).append(row.tier)
        return out

    def remote_models(self) -> list[str]:
        """Models the remote lists ([] when it cannot list, or fails: logged, never raised)."""
        try:
            return self.cache.remote_models() or []
        except SllmError as exc:
            log.warning("listing the remote's models failed: %s", exc)
            return []

    def nbytes_of(self, model: str) -> int | None:
        """The weights' bytes of a model cached on SSD or in DRAM; None when unknown."""
        from sllm.core.format import open_checkpoint

        if self.cache.dram is not None and self.cache.dram.has(model):
            with contextlib.suppress(SllmError):
                return self.cache.dram.views_of(model)[0].total_bytes
        if self.cache.ssd.has(model):
            with contextlib.suppress(SllmError, OSError):
                return open_checkpoint(self.cache.ssd.path_of(model)).manifest.total_bytes
        return None

    def facts_of(self, model: str) -> tuple[int | None, int | None]:
        """(weights' bytes, tensor count) of a model cached in DRAM or on SSD, each None when
        unknown: :meth:`nbytes_of`, with the count from the SSD entry's index when it has one
        (its checkpoint opened once)."""
        from sllm.core.format import open_checkpoint

        if self.cache.ssd.has(model):
            with contextlib.suppress(SllmError, OSError):
                ckpt = open_checkpoint(self.cache.ssd.path_of(model))
                return ckpt.manifest.total_bytes, len(ckpt.tensors)
        return self.nbytes_of(model), None

    def created_of(self, model: str) -> float | None:
        """When ``model``'s SSD entry was written (its manifest's mtime, Unix seconds); None
        when it is not on SSD."""
        from sllm.core.format import MANIFEST_FILE

        try:
            return (self.cache.ssd.path_of(model) / MANIFEST_FILE).stat().st_mtime
        except OSError:
            return None

    def local_tier(self, model: str) -> str | None:
        """The fastest local tier holding ``model`` whole ("dram" or "ssd"), or None. Blocking
        (the SSD tier's state)."""
        return self.cache.locate(model, check_remote=False).fastest

    def remote_facts(self, model: str) -> tuple[int, int | None] | None:
        """(weights' bytes, tensor count) of ``model`` on the remote: the bytes from its
        manifest (``sllm.json``'s ``total_bytes``), the count from its tensor index (None
        when the index cannot be read or does not validate against the manifest); two small
        reads. None when the remote does not hold the model. Blocking.

        Raises:
            RemoteError: the remote cannot be reached. ManifestError: a bad manifest.
        """
        from sllm.core.cache.pipeline import read_index, read_manifest
        from sllm.errors import RemoteError

        remote = self.cache.remote()
        try:
            manifest, _ = read_manifest(remote, model)
        except RemoteError as exc:
            if getattr(exc, "not_found", False):
                return None
            raise
        try:  # the count only refines an estimate: a pull reports a bad index, not this
            tensors: int | None = len(read_index(remote, model, manifest)[0])
        except SllmError:
            tensors = None
        return manifest.total_bytes, tensors

    def remote_has(self, model: str) -> bool:
        """True when the remote holds ``model`` (one request for its manifest). Blocking.

        Raises:
            RemoteError: the remote cannot be reached.
        """
        return "remote" in self.cache.locate(model).tiers

    @staticmethod
    def valid_name(model: str) -> bool:
        """True when ``model`` can name a cache entry (``name`` or ``org/name``)."""
        try:
            entry_name(model)
        except UsageError:
            return False
        return True

    # -- cold starts ----------------------------------------------------------------------

    def fetch(self, model: str) -> Fetched:
        """Bring ``model`` to the fastest tier with room (see the module docstring). Blocking.

        Raises:
            RemoteError: the remote failed (not found, unreachable, truncated, checksum).
            CheckpointError subclasses: bad metadata. CacheError: it fits in no tier, or no
            remote is configured. Nothing is left in any tier when it fails.
        """
        started = time.perf_counter()
        result, lease = self.cache.pull_for_load(model)
        if lease is not None:
            nbytes = lease.manifest.total_bytes
        else:
            nbytes = self.nbytes_of(model) or 0
        return Fetched(model, result.source, time.perf_counter() - started, result.fetched_bytes, nbytes, lease)

    @contextlib.contextmanager
    def source(
        self, fetched: Fetched, *, device: str, pool: HostMemoryPool, threads: int | None, direct_io: bool | None
    ) -> Iterator[tuple[Path, Callable[[], Any]]]:
        """Yield (a directory with the model's config and tokenizer files, a function that
        loads its weights onto ``device``). Blocking; the body runs the load.

        From a DRAM lease: the side files are written to a temporary directory, and the
        weights come from the lease's buffers (:func:`sllm.core.loader.load_model_from_host`,
        which takes the lease over). From the SSD tier: the entry's directory, held by an
        SSD lease for the body, loaded with :func:`sllm.core.loader.load_model` through ``pool``.

        Raises:
            CacheError: the SSD entry went away and cannot be pulled again; and as the loader.
        """
        from sllm.core.loader import load_model, load_model_from_host

        lease, fetched.lease = fetched.lease, None
        if lease is None:
            with self.cache.ssd_lease(fetched.model, pull=True) as path:
                yield path, lambda: load_model(path, device, threads=threads, direct_io=direct_io, pool=pool)
            return
        taken = False

        def load() -> Any:
            nonlocal taken
            taken = True
            return load_model_from_host(lease, device)

        try:
            with tempfile.TemporaryDirectory(prefix="sllm-files-") as tmp:
                for name, data in lease.files.items():
                    (Path(tmp) / name).write_bytes(data)
                yield Path(tmp), load
        finally:
            if not taken:
                lease.release()
