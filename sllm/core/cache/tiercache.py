"""The cache of one node, :class:`TierCache`: remote -> SSD -> DRAM, where a pull comes
from, pins, eviction and verification across the tiers (package docstring). The tiers
themselves are ``ssd.py`` and ``dram.py``; the download pipeline is ``pipeline.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sllm.core.cache.base import (
    NAME_PART,
    CacheConfig,
    CachedModel,
    EvictResult,
    Location,
    ProgressCallback,
    PullResult,
    TierStats,
    VerifyResult,
    dir_bytes,
    entry_name,
    write_file,
)
from sllm.core.cache.dram import DramLease, DramTier
from sllm.core.cache.pipeline import fetch_metadata, pipelined_fetch
from sllm.core.cache.ssd import SsdTier
from sllm.core.format import INDEX_FILE, MANIFEST_FILE, open_checkpoint
from sllm.errors import CacheError, ChecksumMismatch, RemoteError, UsageError
from sllm.io.reader import chunk_ranges
from sllm.io.remote import Remote, hash_file_chunks, open_remote

if TYPE_CHECKING:

    from sllm.core.pool import HostMemoryPool


class TierCache:
    """The tiers of one node: remote -> SSD -> DRAM (see the module docstring).

    Args:
        config: directories, capacities, the remote.
        pool: the host memory pool of the DRAM tier (the loader's pool in a server);
            default: a pool of its own when ``config.dram_capacity_bytes`` > 0.
        remote: an open remote to use instead of opening ``config.remote_url``.

    Raises (constructor):
        CacheError: the cache directory cannot be created.
    """

    def __init__(self, config: CacheConfig, *, pool: HostMemoryPool | None = None, remote: Remote | None = None):
        self.config = config
        self.ssd = SsdTier(config.cache_dir, config.ssd_capacity_bytes, fsync=config.fsync)
        self.dram = DramTier(config.dram_capacity_bytes, pool) if config.dram_capacity_bytes > 0 else None
        self._remote = remote
        self._model_locks: dict[str, tuple[threading.Lock, int]] = {}  # model -> (lock, users)
        self._locks_lock = threading.Lock()

    def remote(self) -> Remote:
        """The remote, opened on first use.

        Raises:
            CacheError: no remote is configured. UsageError/RemoteError: a bad remote URL.
        """
        if self._remote is None:
            if not self.config.remote_url:
                raise CacheError("no remote is configured to pull from", hint="pass --remote URL or set SLLM_REMOTE")
            self._remote = open_remote(self.config.remote_url, self.config.remote)
        return self._remote

    def close(self) -> None:
        """Close the remote's connections."""
        if self._remote is not None:
            self._remote.close()

    @contextlib.contextmanager
    def _model_lock(self, model: str) -> Iterator[None]:
        """Hold this process's lock of ``model``; the entry lives only while someone holds
        or waits for it (names asked for once cost nothing that lasts)."""
        with self._locks_lock:
            lock, users = self._model_locks.get(model, (threading.Lock(), 0))
            self._model_locks[model] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._locks_lock:
                lock, users = self._model_locks[model]
                if users == 1:
                    del self._model_locks[model]
                else:
                    self._model_locks[model] = (lock, users - 1)

    # -- queries ------------------------------------------------------------------------

    def locate(self, model: str, *, check_remote: bool = True) -> Location:
        """The tiers that hold ``model`` whole, fastest first ("remote" when the remote has
        its manifest; that asks the remote, unless ``check_remote`` is False).

        Raises:
            UsageError: a bad model name. RemoteError: the remote cannot be reached.
        """
        entry_name(model)
        tiers = []
        if self.dram is not None and self.dram.has(model):
            tiers.append("dram")
        if self.ssd.has(model):
            tiers.append("ssd")
        if check_remote and (self.config.remote_url or self._remote is not None):
            if self.remote().exists(f"{model}/{MANIFEST_FILE}"):
                tiers.append("remote")
        return Location(model, tuple(tiers), tiers[0] if tiers else None)

    def ls(self) -> list[CachedModel]:
        """Every model in every local tier (DRAM first), least recently used first per tier."""
        return (self.dram.entries() if self.dram is not None else []) + self.ssd.entries()

    def stats(self) -> list[TierStats]:
        """Capacity, use and hit counters per local tier."""
        return ([self.dram.stats()] if self.dram is not None else []) + [self.ssd.stats()]

    # -- pulls ----------------------------------------------------------------------------

    def pull(self, model: str, *, dram: bool = False, on_progress: ProgressCallback | None = None) -> PullResult:
        """Make ``model`` whole in the SSD tier (and the DRAM tier with ``dram``).

        A model already there is a hit. Otherwise it comes from the SSD tier (into DRAM) or
        from the remote, pipelined by chunk into SSD and DRAM at once. Another process
        pulling the same model is waited for. ``on_progress(done_bytes, total_bytes)``.

        Raises:
            UsageError: a bad model name. CacheError: it does not fit, or no remote.
            RemoteError: the remote failed (not found, truncated, checksum mismatch,
            unreachable). CheckpointError subclasses: bad metadata on the remote. Nothing
            is left in any tier when it fails.
        """
        result, lease = self._pull(model, dram=dram, on_progress=on_progress)
        if lease is not None:
            lease.release()
        return result

    def pull_for_load(self, model: str, *, on_progress: ProgressCallback | None = None
                      ) -> tuple[PullResult, DramLease | None]:
        """Make ``model`` whole in the SSD tier and, when the DRAM tier has room, in DRAM.

        What a server does before loading a model: a DRAM hit is leased at once; an SSD
        entry is read into DRAM; a remote model is pulled through the pipeline into SSD and
        DRAM at once. When the DRAM tier is disabled, or cannot make room (the model is too
        large, or the rest is pinned or in use), the model is left in the SSD tier only and
        the lease is None: load it from :meth:`ssd_lease`. ``result.source`` says which
        tier the bytes came from. ``on_progress(done_bytes, total_bytes)``.

        Returns: (what the pull did, a DRAM lease or None).

        Raises:
            As :meth:`pull`, except that a lack of DRAM is not an error.
        """
        return self._pull(model, dram=self.dram is not None, on_progress=on_progress, dram_optional=True)

    def remote_models(self) -> list[str] | None:
        """The models on the remote, when it can be listed (a directory remote); None when it
        cannot (http(s) and s3 remotes name models, they do not list them) or none is set.

        A model is a directory holding ``sllm.json``, at the top or one level down
        (``org/name``).

        Raises:
            RemoteError: the remote's directory cannot be read.
        """
        from sllm.io.remote import DirectoryRemote

        if not (self.config.remote_url or self._remote is not None):
            return None
        remote = self.remote()
        if not isinstance(remote, DirectoryRemote):
            return None
        found: list[str] = []
        try:
            for d in sorted(remote.root.iterdir()):
                if not d.is_dir() or d.name.startswith("."):
                    continue
                if (d / MANIFEST_FILE).is_file():
                    found.append(d.name)
                    continue
                found.extend(f"{d.name}/{sub.name}" for sub in sorted(d.iterdir())
                             if sub.is_dir() and (sub / MANIFEST_FILE).is_file())
        except OSError as exc:
            raise RemoteError(f"{remote.root}: cannot list ({exc.strerror})") from exc
        return [m for m in found if NAME_PART.fullmatch(m.split("/")[-1])]

    def acquire(self, model: str, *, on_progress: ProgressCallback | None = None) -> DramLease:
        """A lease on ``model`` in the DRAM tier, pulling it through the tiers if needed.

        The entry is not evictable while leased; see :class:`DramLease` for the loader.

        Raises:
            CacheError: the DRAM tier is disabled (capacity 0) or too small; and as :meth:`pull`.
        """
        if self.dram is None:
            raise CacheError("the DRAM tier is disabled", hint="give it a capacity (--dram-capacity)")
        _, lease = self._pull(model, dram=True, on_progress=on_progress)
        assert lease is not None
        return lease

    @contextlib.contextmanager
    def ssd_lease(self, model: str, *, pull: bool = False,
                  on_progress: ProgressCallback | None = None) -> Iterator[Path]:
        """Hold ``model``'s SSD entry in use for the body; yield its directory (for the loader).

        With ``pull``, pull it first if missing.

        Raises:
            CacheError: not in the SSD tier (without ``pull``); and as :meth:`pull`.
        """
        entry_name(model)
        for attempt in range(2):
            if pull and not self.ssd.has(model):
                self.pull(model, on_progress=on_progress)
            try:
                lease = self.ssd.lease(model)
                path = lease.__enter__()
            except CacheError:
                if pull and attempt == 0:  # evicted by another process between pull and lease
                    continue
                raise
            try:
                yield path
            finally:
                lease.__exit__(None, None, None)
            return

    def _pull(self, model: str, *, dram: bool, on_progress: ProgressCallback | None, dram_optional: bool = False
              ) -> tuple[PullResult, DramLease | None]:
        entry_name(model)
        if dram and self.dram is None:
            raise CacheError("the DRAM tier is disabled", hint="give it a capacity (--dram-capacity)")
        started = time.perf_counter()
        with self._model_lock(model) if dram else contextlib.nullcontext():
            if dram:
                assert self.dram is not None
                lease = self.dram.hold(model)
                if lease is not None:
                    self.dram.hits += 1
                    nbytes = lease.manifest.total_bytes
                    return self._result(model, "dram", nbytes, 0, started, []), lease
                self.dram.misses += 1
            if not self.ssd.has(model):
                self._check_remote_has(model)  # before the pull lock: an unknown name leaves no lock file
            with self.ssd.pull_lock(model):
                if self.ssd.has(model):
                    self.ssd.count("hits", touch=model)
                    lease, evicted = (self._ssd_to_dram(model, on_progress, optional=dram_optional)
                                      if dram else (None, []))
                    nbytes = dir_bytes(self.ssd.path_of(model)) if self.ssd.has(model) else 0
                    return self._result(model, "ssd", nbytes, 0, started, evicted), lease
                return self._remote_pull(model, dram=dram, started=started, on_progress=on_progress,
                                         dram_optional=dram_optional)

    def _check_remote_has(self, model: str) -> None:
        """Raises: CacheError: no remote. RemoteError: it does not hold ``model`` (marked
        ``not_found``) or cannot be reached."""
        self.remote().size(f"{model}/{MANIFEST_FILE}")

    def _result(self, model: str, source: str, nbytes: int, fetched: int, started: float,
                evicted: list[str]) -> PullResult:
        seconds = time.perf_counter() - started
        moved = fetched if source == "remote" else nbytes
        return PullResult(
            model=model, source=source, nbytes=nbytes, fetched_bytes=fetched, seconds=seconds,
            gbps=moved / seconds / 1e9 if seconds > 0 else 0.0,
            tiers=self.locate(model, check_remote=False).tiers, evicted=tuple(evicted),
            path=str(self.ssd.path_of(model)) if self.ssd.has(model) else None,
        )

    def _ssd_to_dram(self, model: str, on_progress: ProgressCallback | None, *, optional: bool = False
                     ) -> tuple[DramLease | None, list[str]]:
        """Read an SSD entry into fresh DRAM-tier buffers (parallel reads, O_DIRECT where possible).

        With ``optional``, a DRAM tier without room gives (None, []) instead of CacheError.
        """
        from sllm.io.reader import ParallelRead

        assert self.dram is not None
        with self.ssd.lease(model) as path:
            ckpt = open_checkpoint(path)
            files = {}
            for name in ckpt.manifest.files:
                try:
                    files[name] = (path / name).read_bytes()
                except OSError as exc:
                    raise CacheError(f"{path / name}: cannot read ({exc.strerror})") from exc
            try:
                lease, evicted = self.dram.reserve(model, ckpt.manifest, ckpt.tensors, files)
            except CacheError:
                if optional:
                    return None, []
                raise
            try:
                done, total = 0, ckpt.manifest.total_bytes
                for p, view in enumerate(lease.views()):
                    read = ParallelRead(ckpt.partition_path(p), view, chunk_bytes=ckpt.manifest.chunk_bytes,
                                        threads=self.config.read_threads)
                    for i in read:
                        s, e = read.ranges[i]
                        done += e - s
                        if on_progress:
                            on_progress(done, total)
            except BaseException:
                lease.release()
                self.dram.abort(lease)
                raise
            self.dram.commit(lease)
        return lease, evicted

    def _remote_pull(self, model: str, *, dram: bool, started: float, on_progress: ProgressCallback | None,
                     dram_optional: bool = False) -> tuple[PullResult, DramLease | None]:
        remote = self.remote()
        try:
            meta = fetch_metadata(remote, model)
        except BaseException:
            self.ssd.count("misses")  # a successful pull counts its miss with its reservation
            raise
        total = meta.nbytes
        done = [0]

        def on_bytes(n: int) -> None:
            done[0] += n
            if on_progress:
                on_progress(done[0], total)

        with self.ssd.download(model, total) as slot:
            files: dict[str, bytes] = {}
            for name, size in meta.files.items():
                data = remote.read_bytes(f"{model}/{name}", max_bytes=max(size, 1))
                if len(data) != size:
                    raise RemoteError(f"{remote.url_of(f'{model}/{name}')}: got {len(data)} bytes, expected {size}")
                write_file(slot.tmp / name, data)
                files[name] = data
                on_bytes(size)
            lease, evicted = (None, [])
            if dram:
                assert self.dram is not None
                try:
                    lease, evicted = self.dram.reserve(model, meta.manifest, meta.tensors, files)
                except CacheError:
                    if not dram_optional:
                        raise  # with optional DRAM, the pipeline fills the SSD tier only
            try:
                fetched = pipelined_fetch(
                    remote, meta, slot.tmp, dram_views=lease.views() if lease else None,
                    piece_bytes=self.config.piece_bytes, queue_pieces=self.config.queue_pieces,
                    fsync=self.config.fsync, on_bytes=on_bytes,
                )
                write_file(slot.tmp / INDEX_FILE, meta.index_bytes)
                write_file(slot.tmp / MANIFEST_FILE, meta.manifest_bytes)
                on_bytes(len(meta.index_bytes) + len(meta.manifest_bytes))
                self.ssd.commit(slot)
            except BaseException:
                if lease is not None:
                    lease.release()
                    self.dram.abort(lease)  # type: ignore[union-attr]
                raise
            if lease is not None:
                self.dram.commit(lease)  # type: ignore[union-attr]
        fetched += sum(meta.files.values()) + len(meta.index_bytes) + len(meta.manifest_bytes)
        return self._result(model, "remote", total, fetched, started, slot.evicted + evicted), lease

    # -- pins, eviction, verification -----------------------------------------------------

    def _tiers_arg(self, tier: str | None) -> list[str]:
        if tier is None:
            return ["dram", "ssd"] if self.dram is not None else ["ssd"]
        if tier not in ("dram", "ssd"):
            raise UsageError(f"tier {tier!r}: choose dram or ssd")
        if tier == "dram" and self.dram is None:
            raise CacheError("the DRAM tier is disabled in this process",
                             hint="DRAM entries live in a running `sllm serve`")
        return [tier]

    def _set_pinned(self, model: str, tier: str | None, pinned: bool) -> tuple[str, ...]:
        entry_name(model)
        done = tuple(t for t in self._tiers_arg(tier)
                     if (self.dram.set_pinned(model, pinned) if t == "dram" else self.ssd.set_pinned(model, pinned)))
        if not done:
            raise CacheError(f"{model}: not cached in the {tier or 'local'} tier(s)", hint="run `sllm cache ls`")
        return done

    def pin(self, model: str, tier: str | None = None) -> tuple[str, ...]:
        """Exclude ``model`` from LRU eviction in ``tier`` (default: every tier holding it).

        Returns: the tiers where it is now pinned.

        Raises:
            CacheError: no such tier holds it.
        """
        return self._set_pinned(model, tier, True)

    def unpin(self, model: str, tier: str | None = None) -> tuple[str, ...]:
        """Undo :meth:`pin`. Raises CacheError when no such tier holds it."""
        return self._set_pinned(model, tier, False)

    def evict(self, model: str, tier: str | None = None) -> EvictResult:
        """Remove ``model`` from ``tier`` (default: every local tier holding it).

        Raises:
            CacheError: not there, pinned, or in use (nothing is removed from any tier then
            when ``tier`` is None and the first refusal comes before any removal).
        """
        entry_name(model)
        tiers = [t for t in self._tiers_arg(tier)
                 if (self.dram.has(model) if t == "dram" else self.ssd.has(model))]
        if not tiers:
            where = f"the {tier} tier" if tier else "any local tier"
            raise CacheError(f"{model}: not cached in {where}", hint="run `sllm cache ls`")
        freed = 0
        for t in tiers:
            freed += self.dram.evict(model) if t == "dram" else self.ssd.evict(model)  # type: ignore[union-attr]
        return EvictResult(model, tuple(tiers), freed)

    def verify(self, model: str, tier: str | None = None) -> VerifyResult:
        """Check every chunk's sha256 (and every file size) of ``model`` in ``tier``
        (default: every local tier holding it).

        Raises:
            ChecksumMismatch: a chunk differs from the manifest (names the file and chunk).
            TruncatedPartition and other CheckpointError subclasses: a bad entry.
            CacheError: not cached there.
        """
        entry_name(model)
        started = time.perf_counter()
        tiers = [t for t in self._tiers_arg(tier)
                 if (self.dram.has(model) if t == "dram" else self.ssd.has(model))]
        if not tiers:
            raise CacheError(f"{model}: not cached in {f'the {tier} tier' if tier else 'any local tier'}",
                             hint="run `sllm cache ls`")
        nbytes = chunks = 0
        hint = f"evict it (`sllm cache evict {model}`) and pull it again"
        for t in tiers:
            if t == "dram":
                manifest, views = self.dram.views_of(model)  # type: ignore[union-attr]
                for p, view in zip(manifest.partitions, views, strict=True):
                    for i, (s, e) in enumerate(chunk_ranges(p.nbytes, manifest.chunk_bytes)):
                        if hashlib.sha256(view[s:e]).hexdigest() != p.chunks[i]:
                            raise ChecksumMismatch(f"{model}: DRAM copy of {p.file} chunk {i} (bytes {s}-{e}) fails "
                                                   "its sha256 checksum", hint=hint)
                        chunks += 1
                nbytes += manifest.total_bytes
                continue
            with self.ssd.lease(model) as path:
                ckpt = open_checkpoint(path)
                for p in ckpt.manifest.partitions:
                    def check(i: int, s: int, e: int, digest: str, p=p) -> None:
                        if digest != p.chunks[i]:
                            raise ChecksumMismatch(f"{path / p.file}: chunk {i} (bytes {s}-{e}) fails its sha256 "
                                                   "checksum", hint=hint)

                    try:
                        hash_file_chunks(path / p.file, p.nbytes, ckpt.manifest.chunk_bytes,
                                         threads=self.config.read_threads, on_chunk=check)
                    except RemoteError as exc:  # a local read error, worded by the io layer
                        raise CacheError(str(exc), hint=hint) from exc
                    chunks += len(p.chunks)
                nbytes += ckpt.manifest.total_bytes
        return VerifyResult(model, tuple(tiers), nbytes, chunks, time.perf_counter() - started)
