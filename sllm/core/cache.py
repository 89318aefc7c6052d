"""The tiered checkpoint cache: remote -> SSD -> DRAM, LRU per tier, pipelined by chunk.

A model (a converted sllm checkpoint, ``sllm/core/format.py``) lives in one or more tiers:

- **remote** (``sllm/io/remote.py``): a directory, ``http(s)://`` or ``s3://`` base under
  which ``<model>/sllm.json`` and its files lie. Read only.
- **ssd**: the node's cache directory, with a byte capacity. State survives restarts and
  is shared by every ``sllm`` process on the node (file locks).
- **dram**: host buffers of this process's :class:`~sllm.core.pool.HostMemoryPool`, one
  per partition, with a byte capacity. Only a long-lived process (``sllm serve``) has one.

(The device tier is the serving process's resident models: ``sllm/server/`` owns it.)

A pull from the remote is **pipelined** (DESIGN.md "Tiers", paper §4): a downloader
thread streams each partition in pieces of a few MiB (straight into the DRAM tier's buffer
when the model goes to DRAM) and hands them over a bounded queue to the writer, which
writes them into the SSD entry and hashes them, checking each manifest chunk's sha256 as
its last piece lands, while later pieces are still arriving; a flusher thread writes dirty
pages back as it goes, so the final fsync is short. The load takes about the time of its
slowest tier, not the sum.

Crash safety of the SSD tier: an entry ``<cache>/models/<name>/`` exists only when whole.
It is downloaded into a temporary sibling (``.sllm-tmp-*``), every size and chunk checksum
is checked, files are fsynced, and the directory is renamed into place under the cache
lock. kill -9 at any point leaves a temporary (removed by the next process) or a whole
entry; ``state.json`` (last use, pins, counters) is rewritten atomically and reconciled
with the directory under the lock, so it cannot disagree with what is on disk for long.

Eviction: each tier drops least-recently-used models that are neither pinned nor in use.
"In use" on SSD is a shared ``flock`` on ``locks/<name>.lease`` (held by any process that
reads the entry); eviction needs that lock exclusively and skips the entry otherwise, so a
model being loaded is never evicted. Downloads in flight are not entries and count against
the capacity as reservations. In DRAM, a lease count does the same.

This module moves bytes only through ``sllm/io/`` (remote streams, parallel reads, atomic
writes), except the positional writes of the SSD entry's partition files. It does not print,
parse flags or read the environment: commands build a :class:`CacheConfig`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm.core.format import (
    INDEX_FILE,
    MANIFEST_FILE,
    Manifest,
    TensorEntry,
    open_checkpoint,
    parse_index,
    parse_manifest,
)
from sllm.errors import CacheError, ChecksumMismatch, ManifestError, RemoteError, UsageError
from sllm.io.atomic import TMP_PREFIX, atomic_write_bytes, file_lock, remove_stale_temporaries, temporary_sibling
from sllm.io.reader import chunk_ranges
from sllm.io.remote import Remote, RemoteConfig, hash_file_chunks, open_remote

if TYPE_CHECKING:
    import torch

    from sllm.core.pool import HostMemoryPool
    from sllm.io.hostmem import HostBuffer

ProgressCallback = Callable[[int, int], None]

#: Tiers, fastest first.
TIERS = ("dram", "ssd", "remote")
#: Bytes handed from the downloader to the writer at a time: the pipeline's grain, bytes
#: (checksums stay per manifest chunk, which may be larger).
PIECE_BYTES = 4 * 1024 * 1024
#: Bytes written between background flushes of a download, bytes.
FLUSH_BYTES = 16 * 1024 * 1024
#: The largest manifest or tensor index accepted from a remote, bytes.
MAX_METADATA_BYTES = 64 * 1024 * 1024
STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass(frozen=True)
class CacheConfig:
    """Configuration of a :class:`TierCache`.

    Attributes:
        cache_dir: the SSD tier's directory (created if missing).
        ssd_capacity_bytes: the most bytes the SSD tier holds (entries plus downloads in
            flight); None keeps the capacity recorded in the cache directory by an earlier
            run, or no limit if none was.
        dram_capacity_bytes: the most bytes of host buffers the DRAM tier holds; 0 (default)
            disables the tier (a CLI process has no use for one).
        remote_url: where models are pulled from (directory, ``http(s)://``, ``s3://``);
            None: no remote, only cached models can be used.
        remote: connection settings for the remote.
        piece_bytes: bytes the downloader hands to the writer at a time (the pipeline's
            grain; default 4 MiB, at most a manifest chunk).
        queue_pieces: pieces in flight between the downloader and the writer; bounds the
            extra memory of an SSD-only pull to ``(queue_pieces + 2) * piece_bytes`` bytes.
        read_threads: reader threads for SSD -> DRAM reads and checksum verification.
        fsync: flush files to stable storage before an entry is renamed into place.
    """

    cache_dir: Path
    ssd_capacity_bytes: int | None = None
    dram_capacity_bytes: int = 0
    remote_url: str | None = None
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    piece_bytes: int = PIECE_BYTES
    queue_pieces: int = 8
    read_threads: int = 4
    fsync: bool = True


@dataclass(frozen=True)
class CachedModel:
    """One model in one tier (a row of ``sllm cache ls``).

    Attributes:
        model: the model name (``gpt2`` or ``org/name``).
        tier: "dram" or "ssd".
        nbytes: bytes it occupies in the tier (a reservation for "pulling").
        last_used: Unix time, seconds, of the last pull or lease.
        pinned: excluded from LRU eviction.
        in_use: leased by a reader now (never evicted while so).
        state: "whole" (usable), "pulling" (a download in flight, not usable yet), or
            "loading" (DRAM buffers being filled).
        path: the SSD entry's directory (None in DRAM).
    """

    model: str
    tier: str
    nbytes: int
    last_used: float
    pinned: bool
    in_use: bool
    state: str
    path: str | None = None


@dataclass(frozen=True)
class Location:
    """Which tiers hold ``model`` whole, fastest first (``fastest`` is None when none does)."""

    model: str
    tiers: tuple[str, ...]
    fastest: str | None


@dataclass(frozen=True)
class PullResult:
    """What a pull did.

    Attributes:
        model: the model name.
        source: the tier the bytes came from ("dram", "ssd" or "remote"): a hit in the
            first tier asked for, or where a miss was served from.
        nbytes: the SSD entry's bytes (partitions and metadata files); for a DRAM hit, the
            partitions' bytes.
        fetched_bytes: bytes downloaded from the remote (0 on a hit).
        seconds: wall time of the pull.
        gbps: ``fetched_bytes / seconds / 1e9`` for a remote pull, else
            ``nbytes / seconds / 1e9``.
        tiers: the tiers holding the model afterwards.
        evicted: models evicted to make room, as "tier:model".
        path: the SSD entry's directory.
    """

    model: str
    source: str
    nbytes: int
    fetched_bytes: int
    seconds: float
    gbps: float
    tiers: tuple[str, ...]
    evicted: tuple[str, ...]
    path: str | None


@dataclass(frozen=True)
class VerifyResult:
    """A successful verification: every chunk of every partition matched the manifest."""

    model: str
    tiers: tuple[str, ...]
    nbytes: int
    chunks: int
    seconds: float


@dataclass(frozen=True)
class EvictResult:
    """What :meth:`TierCache.evict` removed: the tiers and the bytes freed."""

    model: str
    tiers: tuple[str, ...]
    freed_bytes: int


@dataclass(frozen=True)
class TierStats:
    """Occupancy and hit counters of one tier.

    Attributes:
        tier: "dram" or "ssd".
        capacity_bytes: the tier's capacity (None: no limit).
        used_bytes: bytes held by whole entries.
        reserved_bytes: bytes reserved by pulls in flight.
        entries: whole entries.
        pinned: pinned entries.
        hits: pulls served by this tier. misses: pulls it could not serve.
        hit_rate: ``hits / (hits + misses)``, None before the first pull.
        evictions: entries dropped by LRU or ``evict``.
        path: the SSD tier's directory.
    """

    tier: str
    capacity_bytes: int | None
    used_bytes: int
    reserved_bytes: int
    entries: int
    pinned: int
    hits: int
    misses: int
    hit_rate: float | None
    evictions: int
    path: str | None = None


_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def entry_name(model: str) -> str:
    """The directory name of ``model`` in the SSD tier: its ``/``-separated parts joined by ``--``.

    Raises:
        UsageError: a name with an empty part, a part that starts with ``.`` or ``-``,
            characters other than letters, digits, ``._-``, or ``--`` inside a part.
    """
    parts = model.split("/")
    if not all(_NAME_PART.fullmatch(p) and "--" not in p for p in parts):
        raise UsageError(
            f"model name {model!r}: use letters, digits and '._-' in '/'-separated parts (no '--', no leading '.')"
        )
    return "--".join(parts)


def _hit_rate(hits: int, misses: int) -> float | None:
    return hits / (hits + misses) if hits + misses else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


@contextlib.contextmanager
def _try_exclusive(path: Path) -> Iterator[bool]:
    """Try an exclusive flock on ``path`` without waiting; yield whether it was granted."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Remote metadata and the chunk pipeline
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteModel:
    """A model's metadata read from a remote, with every file's size checked.

    Attributes:
        model: the model name (its directory under the remote base).
        manifest, tensors: parsed and validated ``sllm.json`` and ``tensor_index.json``.
        manifest_bytes, index_bytes: their raw bytes, written as they came.
        files: copied side file name -> size in bytes (config, tokenizer).
    """

    model: str
    manifest: Manifest
    tensors: dict[str, TensorEntry]
    manifest_bytes: bytes
    index_bytes: bytes
    files: dict[str, int]

    @property
    def nbytes(self) -> int:
        """Bytes of the whole entry on disk."""
        return self.manifest.total_bytes + len(self.manifest_bytes) + len(self.index_bytes) + sum(self.files.values())


def _json(data: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{where}: cannot parse JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    return doc


def fetch_metadata(remote: Remote, model: str) -> RemoteModel:
    """Read ``model``'s manifest and index from ``remote``, and check every file's size.

    Raises:
        RemoteError: a file is missing, unreachable, or of another size than recorded.
        ManifestError and other CheckpointError subclasses: bad metadata (names the URL).
    """
    manifest_path, index_path = f"{model}/{MANIFEST_FILE}", f"{model}/{INDEX_FILE}"
    manifest_bytes = remote.read_bytes(manifest_path, max_bytes=MAX_METADATA_BYTES)
    manifest = parse_manifest(_json(manifest_bytes, remote.url_of(manifest_path)), remote.url_of(manifest_path))
    index_bytes = remote.read_bytes(index_path, max_bytes=MAX_METADATA_BYTES)
    tensors = parse_index(_json(index_bytes, remote.url_of(index_path)), manifest, remote.url_of(index_path))
    for p in manifest.partitions:
        size = remote.size(f"{model}/{p.file}")
        if size != p.nbytes:
            raise RemoteError(
                f"{remote.url_of(f'{model}/{p.file}')}: {size} bytes on the remote, the manifest records {p.nbytes}"
            )
    files = {name: remote.size(f"{model}/{name}") for name in manifest.files}
    return RemoteModel(model, manifest, tensors, manifest_bytes, index_bytes, files)


def _pwrite_full(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as exc:
        raise CacheError(f"{path}: cannot write at byte {offset + done} ({exc.strerror})") from exc


class _FlushBehind:
    """Flushes written data to disk in a background thread while later chunks are written
    (``fdatasync`` after every ``every_bytes``), so the final fsync of a download has little
    left to do instead of a whole file's worth of dirty pages."""

    def __init__(self, every_bytes: int = FLUSH_BYTES) -> None:
        self.every_bytes = every_bytes
        self._dirty: set[int] = set()
        self._since = 0
        self._due = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sllm-flush", daemon=True)
        self._thread.start()

    def wrote(self, fd: int, nbytes: int) -> None:
        """Note ``nbytes`` written to ``fd``; wake the flusher every ``every_bytes``."""
        with self._cond:
            self._dirty.add(fd)
            self._since += nbytes
            if self._since >= self.every_bytes:
                self._since, self._due = 0, True
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._due or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                fds, self._dirty, self._due = self._dirty, set(), False
            for fd in fds:
                with contextlib.suppress(OSError):  # the caller's final fsync reports errors
                    os.fdatasync(fd)

    def close(self) -> None:
        """Stop the thread (after its flush in progress, if any). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


def pipelined_fetch(
    remote: Remote,
    meta: RemoteModel,
    dst_dir: Path,
    *,
    dram_views: list[memoryview] | None = None,
    piece_bytes: int = PIECE_BYTES,
    queue_pieces: int = 8,
    fsync: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Download every partition of ``meta`` into ``dst_dir`` (and ``dram_views``), pipelined.

    A downloader thread streams each partition (one ranged request per partition) in pieces
    of ``piece_bytes`` (at most a chunk) and queues them (at most ``queue_pieces`` waiting);
    this thread writes each piece at its offset in ``dst_dir/partition-N.bin`` and feeds it
    to its chunk's sha256, which is compared with the manifest when the chunk's last piece
    is in. With ``dram_views`` (one writable view of at least the partition's size per
    partition) pieces are downloaded straight into those views, so the DRAM tier is filled
    as the SSD one is; without, ``queue_pieces + 2`` piece buffers are recycled (the extra
    memory). ``on_bytes(n)`` runs after each piece is written. With ``fsync``, written data
    is flushed to disk in the background as the download goes on, and fully at the end.

    Returns: bytes downloaded.

    Raises:
        RemoteError: a transfer failed, the remote sent fewer bytes, or a chunk's sha256
            differs from the manifest's. CacheError: the SSD file cannot be written.
        Partially written files are left for the caller to delete.
    """
    manifest = meta.manifest
    chunk = manifest.chunk_bytes
    piece_bytes = max(1, min(piece_bytes, chunk))
    # (partition, chunk number, chunk start, piece start, view, buffer to recycle, last piece of its chunk)
    Item = tuple[int, int, int, int, memoryview, bytearray | None, bool]
    work: queue.Queue[Item | None] = queue.Queue(maxsize=queue_pieces)
    free: queue.Queue[bytearray] = queue.Queue()
    if dram_views is None:
        for _ in range(queue_pieces + 2):
            free.put(bytearray(piece_bytes))
    stop = threading.Event()
    failure: list[BaseException] = []
    sources = [f"{meta.model}/{p.file}" for p in manifest.partitions]

    def download() -> None:
        try:
            for p, info in enumerate(manifest.partitions):
                if info.nbytes == 0:
                    continue
                with remote.open_range(sources[p], 0, info.nbytes) as stream:
                    for i, (cs, ce) in enumerate(chunk_ranges(info.nbytes, chunk)):
                        for s in range(cs, ce, piece_bytes):
                            e = min(s + piece_bytes, ce)
                            if stop.is_set():
                                return
                            owner = None
                            if dram_views is not None:
                                view = dram_views[p][s:e]
                            else:
                                owner = free.get()
                                view = memoryview(owner)[: e - s]
                            stream.readinto(view)
                            work.put((p, i, cs, s, view, owner, e == ce))
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, re-raised there
            failure.append(exc)
        finally:
            work.put(None)

    paths = [dst_dir / p.file for p in manifest.partitions]
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise CacheError(f"{dst_dir}: cannot create a partition file ({exc.strerror})") from exc
    thread = threading.Thread(target=download, name="sllm-download", daemon=True)
    thread.start()
    flusher = _FlushBehind() if fsync else None
    fetched = 0
    digest = hashlib.sha256()
    finished = False  # the downloader's end marker was taken off the queue
    try:
        while (item := work.get()) is not None:
            p, i, cs, s, view, owner, last = item
            if s == cs:
                digest = hashlib.sha256()
            digest.update(view)  # releases the GIL for large buffers, like pwrite
            _pwrite_full(fds[p], view, s, paths[p])
            if flusher is not None:
                flusher.wrote(fds[p], len(view))
            if owner is not None:
                free.put(owner)
            if last and digest.hexdigest() != manifest.partitions[p].chunks[i]:
                raise RemoteError(
                    f"{remote.url_of(sources[p])}: chunk {i} (bytes {cs}-{s + len(view)}) fails its sha256 "
                    "checksum: the remote copy differs from its manifest"
                )
            fetched += len(view)
            if on_bytes:
                on_bytes(len(view))
        finished = True
        thread.join()
        if failure:
            raise failure[0]
        if fetched != manifest.total_bytes:  # defensive: the loop above covers every chunk
            raise RemoteError(f"{remote.url}: {meta.model}: got {fetched} bytes, expected {manifest.total_bytes}")
        if flusher is not None:
            flusher.close()
            for n, fd in enumerate(fds):
                try:
                    os.fsync(fd)
                except OSError as exc:
                    raise CacheError(f"{paths[n]}: cannot flush to disk ({exc.strerror})") from exc
    except Exception:
        stop.set()
        if not finished:  # unblock the downloader (queue and buffers), then let it finish
            if dram_views is None:
                free.put(bytearray(piece_bytes))  # stands in for the buffer this thread held
            while (item := work.get()) is not None:
                if item[5] is not None:
                    free.put(item[5])
        thread.join()
        raise
    except BaseException:  # Ctrl-C: do not wait for a stalled network read
        stop.set()
        raise
    finally:
        if flusher is not None:
            flusher.close()
        for fd in fds:
            os.close(fd)
    return fetched


# ---------------------------------------------------------------------------------------
# SSD tier
# ---------------------------------------------------------------------------------------


@dataclass
class _Download:
    """A download slot: its temporary directory and reservation token."""

    model: str
    tmp: Path
    token: str
    evicted: list[str]


class SsdTier:
    """The cache directory: whole entries under ``models/``, state in ``state.json``.

    Layout::

        <root>/.lock               the cache lock (held briefly for every state change)
        <root>/state.json          {"entries": {model: {nbytes, last_used, pinned}},
                                    "pulls": {token: {model, nbytes, pid}}, "stats": {...},
                                    "capacity_bytes": N}
        <root>/models/<name>/      whole entries only (converted model directories)
        <root>/models/.sllm-tmp-*  downloads in flight, or leftovers of killed processes
        <root>/locks/<name>.pull   held by the process pulling that model
        <root>/locks/<name>.lease  shared by readers of the entry; eviction needs it

    Raises (constructor):
        CacheError: the directory cannot be created or written.
    """

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int | None = None, *, fsync: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.models_dir = self.root / "models"
        self.locks_dir = self.root / "locks"
        self.fsync = fsync
        try:
            self.models_dir.mkdir(parents=True, exist_ok=True)
            self.locks_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise CacheError(f"{self.root}: cannot create the cache directory ({exc.strerror})") from exc
        with self._locked() as state:
            remove_stale_temporaries(self.models_dir)  # downloads and evictions of dead processes
            remove_stale_temporaries(self.root)  # state.json writes of dead processes
            if capacity_bytes is not None:
                state["capacity_bytes"] = int(capacity_bytes)
            self.capacity_bytes: int | None = state.get("capacity_bytes")

    # -- state ------------------------------------------------------------------------

    def path_of(self, model: str) -> Path:
        """The entry directory of ``model`` (whether or not it exists)."""
        return self.models_dir / entry_name(model)

    def _lock_path(self, model: str, kind: str) -> Path:
        return self.locks_dir / f"{entry_name(model)}.{kind}"

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads((self.root / STATE_FILE).read_bytes())
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise ValueError("unknown state version")
        except (OSError, ValueError):
            state = {"version": STATE_VERSION}  # rebuilt from the directory below
        for key in ("entries", "pulls", "stats"):
            if not isinstance(state.get(key), dict):
                state[key] = {}
        return state

    def _reconcile(self, state: dict[str, Any]) -> None:
        """Make ``state`` agree with the directory: adopt entries renamed in by a process
        killed before it recorded them, forget removed ones, drop dead pulls."""
        on_disk = {}
        for d in self.models_dir.iterdir():
            if d.name.startswith(".") or d.name.startswith(TMP_PREFIX) or not d.is_dir():
                continue
            on_disk["/".join(d.name.split("--"))] = d
        entries = state["entries"]
        for model in list(entries):
            if model not in on_disk:
                del entries[model]
        for model, d in on_disk.items():
            if model not in entries:
                entries[model] = {"nbytes": _dir_bytes(d), "last_used": d.stat().st_mtime, "pinned": False}
        for token, pull in list(state["pulls"].items()):
            if not _alive(int(pull.get("pid", 0))):
                del state["pulls"][token]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the cache lock; yield the reconciled state; write it back if changed."""
        try:
            lock = file_lock(self.root / ".lock")
            lock.__enter__()
        except OSError as exc:
            raise CacheError(f"{self.root}: cannot lock the cache ({exc.strerror})") from exc
        try:
            state = self._read_state()
            before = json.dumps(state, sort_keys=True)
            self._reconcile(state)
            yield state
            after = json.dumps(state, sort_keys=True, indent=1)
            if json.dumps(state, sort_keys=True) != before:
                atomic_write_bytes(self.root / STATE_FILE, after.encode() + b"\n")
        finally:
            lock.__exit__(None, None, None)

    def count(self, key: str, n: int = 1, *, touch: str | None = None) -> None:
        """Add ``n`` to a persistent counter ("hits", "misses", "evictions"); with ``touch``,
        also mark that model's entry as used now."""
        with self._locked() as state:
            state["stats"][key] = int(state["stats"].get(key, 0)) + n
            if touch is not None and touch in state["entries"]:
                state["entries"][touch]["last_used"] = time.time()

    # -- queries ----------------------------------------------------------------------

    def has(self, model: str) -> bool:
        """True when a whole entry of ``model`` exists."""
        return self.path_of(model).is_dir()

    def entries(self) -> list[CachedModel]:
        """Whole entries and pulls in flight, least recently used first."""
        rows = []
        with self._locked() as state:
            for model, e in sorted(state["entries"].items(), key=lambda kv: kv[1]["last_used"]):
                with _try_exclusive(self._lock_path(model, "lease")) as free:
                    in_use = not free
                rows.append(CachedModel(model, "ssd", int(e["nbytes"]), float(e["last_used"]), bool(e["pinned"]),
                                        in_use, "whole", str(self.path_of(model))))
            for pull in state["pulls"].values():
                rows.append(CachedModel(pull["model"], "ssd", int(pull["nbytes"]), float(pull.get("started", 0)),
                                        False, True, "pulling", None))
        return rows

    def stats(self) -> TierStats:
        with self._locked() as state:
            entries, s = state["entries"], state["stats"]
            hits, misses = int(s.get("hits", 0)), int(s.get("misses", 0))
            return TierStats(
                tier="ssd",
                capacity_bytes=state.get("capacity_bytes"),
                used_bytes=sum(int(e["nbytes"]) for e in entries.values()),
                reserved_bytes=sum(int(p["nbytes"]) for p in state["pulls"].values()),
                entries=len(entries),
                pinned=sum(1 for e in entries.values() if e["pinned"]),
                hits=hits,
                misses=misses,
                hit_rate=_hit_rate(hits, misses),
                evictions=int(s.get("evictions", 0)),
                path=str(self.root),
            )

    # -- leases, pins, eviction ---------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, model: str) -> Iterator[Path]:
        """Hold ``model``'s SSD entry in use (not evictable, by any process) for the body.

        Yields the entry's directory, for the loader to read.

        Raises:
            CacheError: the model is not in the SSD tier.
        """
        with file_lock(self._lock_path(model, "lease"), shared=True):
            with self._locked() as state:
                entry = state["entries"].get(model)
                if entry is None:
                    raise CacheError(f"{model}: not in the SSD tier {self.models_dir}",
                                     hint=f"run `sllm cache pull {model}`")
                entry["last_used"] = time.time()
            yield self.path_of(model)

    def set_pinned(self, model: str, pinned: bool) -> bool:
        """Pin or unpin ``model``'s entry; return False when the tier does not hold it."""
        with self._locked() as state:
            entry = state["entries"].get(model)
            if entry is None:
                return False
            entry["pinned"] = pinned
            return True

    def _take_away(self, state: dict[str, Any], model: str) -> Path:
        """Rename ``model``'s entry out of sight (caller holds its lease exclusively)."""
        gone = temporary_sibling(self.path_of(model))
        try:
            os.rename(self.path_of(model), gone)
        except OSError as exc:
            raise CacheError(f"{self.path_of(model)}: cannot evict ({exc.strerror})") from exc
        del state["entries"][model]
        state["stats"]["evictions"] = int(state["stats"].get("evictions", 0)) + 1
        return gone

    def evict(self, model: str) -> int:
        """Remove ``model``'s entry; return the bytes freed.

        Raises:
            CacheError: not in the tier, pinned, or in use.
        """
        with self._locked() as state:
            entry = state["entries"].get(model)
            if entry is None:
                raise CacheError(f"{model}: not in the SSD tier {self.models_dir}", hint="run `sllm cache ls`")
            if entry["pinned"]:
                raise CacheError(f"{model}: pinned in the SSD tier", hint=f"run `sllm cache unpin {model}` first")
            with _try_exclusive(self._lock_path(model, "lease")) as free:
                if not free:
                    raise CacheError(f"{model}: in use in the SSD tier (a process is reading it)")
                nbytes = int(entry["nbytes"])
                gone = self._take_away(state, model)
        shutil.rmtree(gone, ignore_errors=True)
        return nbytes

    def _make_room(self, state: dict[str, Any], model: str, need: int) -> list[tuple[str, Path]]:
        """Evict LRU entries (unpinned, unused, not ``model``) until ``need`` more bytes fit.

        Nothing is evicted when even evicting every candidate would not make room.

        Raises:
            CacheError: the model does not fit.
        """
        cap = state.get("capacity_bytes")
        if cap is None:
            return []
        used = sum(int(e["nbytes"]) for e in state["entries"].values())
        used += sum(int(p["nbytes"]) for p in state["pulls"].values())
        if used + need <= cap:
            return []
        if need > cap:
            raise CacheError(f"{model}: needs {need} bytes, more than the SSD tier's capacity of {cap} bytes",
                             hint="raise --ssd-capacity")
        with contextlib.ExitStack() as stack:
            candidates = []
            for name, e in sorted(state["entries"].items(), key=lambda kv: kv[1]["last_used"]):
                if e["pinned"] or name == model:
                    continue
                if stack.enter_context(_try_exclusive(self._lock_path(name, "lease"))):
                    candidates.append((name, int(e["nbytes"])))
            if used - sum(n for _, n in candidates) + need > cap:
                raise CacheError(
                    f"{model}: needs {need} bytes; the SSD tier has {cap - used} of {cap} free and only "
                    f"{sum(n for _, n in candidates)} bytes of unpinned, unused models to evict",
                    hint="raise --ssd-capacity, or unpin or evict models (`sllm cache ls`)",
                )
            gone = []
            for name, nbytes in candidates:
                if used + need <= cap:
                    break
                gone.append((name, self._take_away(state, name)))
                used -= nbytes
            return gone

    # -- downloads ----------------------------------------------------------------------

    @contextlib.contextmanager
    def pull_lock(self, model: str) -> Iterator[None]:
        """Hold ``model``'s pull lock: one process downloads it, others wait and then hit."""
        with file_lock(self._lock_path(model, "pull")):
            yield

    @contextlib.contextmanager
    def download(self, model: str, nbytes: int) -> Iterator[_Download]:
        """Count a miss, reserve ``nbytes`` (evicting LRU entries), and yield a temporary directory.

        The body fills the directory and calls :meth:`commit`; on any exception the
        directory and the reservation are removed.

        Raises:
            CacheError: the model does not fit, or the directory cannot be created.
        """
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with self._locked() as state:
            state["stats"]["misses"] = int(state["stats"].get("misses", 0)) + 1
            gone = self._make_room(state, model, nbytes)
            state["pulls"][token] = {"model": model, "nbytes": nbytes, "pid": os.getpid(), "started": time.time()}
        for _, path in gone:
            shutil.rmtree(path, ignore_errors=True)
        tmp = temporary_sibling(self.path_of(model))
        slot = _Download(model, tmp, token, [f"ssd:{name}" for name, _ in gone])
        try:
            try:
                tmp.mkdir()
            except OSError as exc:
                raise CacheError(f"{tmp}: cannot create ({exc.strerror})") from exc
            yield slot
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(Exception), self._locked() as state:
                state["pulls"].pop(token, None)
            raise

    def commit(self, slot: _Download) -> Path:
        """Check the downloaded directory and rename it into place as the model's entry.

        Raises:
            CheckpointError subclasses: the directory is not a valid checkpoint.
            CacheError: the rename failed.
        """
        open_checkpoint(slot.tmp)  # sizes against the manifest, index against sizes
        if self.fsync:
            for f in slot.tmp.iterdir():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fd = os.open(slot.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dst = self.path_of(slot.model)
        with self._locked() as state:
            try:
                os.rename(slot.tmp, dst)
            except OSError as exc:
                raise CacheError(f"{dst}: cannot rename the download into place ({exc.strerror})") from exc
            state["pulls"].pop(slot.token, None)
            state["entries"][slot.model] = {"nbytes": _dir_bytes(dst), "last_used": time.time(), "pinned": False}
        return dst


# ---------------------------------------------------------------------------------------
# DRAM tier
# ---------------------------------------------------------------------------------------


@dataclass
class _DramEntry:
    model: str
    manifest: Manifest
    tensors: dict[str, TensorEntry]
    files: dict[str, bytes]
    buffers: list[HostBuffer]
    nbytes: int
    last_used: float
    pinned: bool = False
    refs: int = 0
    whole: bool = False


class DramLease:
    """A model's partitions held in DRAM-tier host buffers, not evictable until released.

    How the loader uses it (no disk read, no copy on CPU)::

        with cache.acquire("gpt2") as lease:
            buffers = lease.partition_tensors()            # one uint8 tensor per partition
            state_dict = loader.tensor_views(buffers, lease.tensors)
            # CUDA: copy each buffer to the device (pinned when the pool pins), then the
            # lease may be released; CPU: keep the lease as long as the tensors live.

    Attributes:
        model: the model name.
        manifest: the checkpoint's manifest (partition sizes, chunk checksums).
        tensors: the validated tensor index (offsets into the partition buffers).
        files: the copied side files (``config.json``, tokenizer files), name -> bytes.
    """

    def __init__(self, tier: DramTier, entry: _DramEntry) -> None:
        self._tier = tier
        self._entry = entry
        self.model = entry.model
        self.manifest = entry.manifest
        self.tensors = entry.tensors
        self.files = entry.files
        self._released = False

    @property
    def pinned_memory(self) -> bool:
        """True when the host buffers are page-locked (fast, asynchronous H2D copies)."""
        return all(b.pinned for b in self._entry.buffers)

    def views(self) -> list[memoryview]:
        """One read-only-by-contract memoryview per partition, exactly its size in bytes."""
        self._check()
        return [b.memoryview(p.nbytes) for b, p in zip(self._entry.buffers, self.manifest.partitions, strict=True)]

    def partition_tensors(self) -> list[torch.Tensor]:
        """One ``torch.uint8`` tensor of shape ``(partition nbytes,)`` per partition."""
        self._check()
        return [b.tensor[: p.nbytes] for b, p in zip(self._entry.buffers, self.manifest.partitions, strict=True)]

    def config(self) -> dict[str, Any]:
        """The model's ``config.json`` as a dict.

        Raises:
            CacheError: the checkpoint has no config.json.
        """
        try:
            return json.loads(self.files["config.json"])
        except (KeyError, ValueError) as exc:
            raise CacheError(f"{self.model}: the DRAM entry has no readable config.json") from exc

    def _check(self) -> None:
        if self._released:
            raise CacheError(f"{self.model}: DRAM lease used after release")

    def release(self) -> None:
        """Give the lease back (the entry stays cached and becomes evictable). Idempotent."""
        if not self._released:
            self._released = True
            self._tier._unref(self._entry)

    def __enter__(self) -> DramLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class DramTier:
    """Models' partitions in host buffers of a :class:`HostMemoryPool`, LRU under a capacity.

    Args:
        capacity_bytes: the most bytes of buffers (rounded up to 2 MiB each) held.
        pool: the pool buffers come from (the loader's, in a server); default: a pool of
            its own with this capacity.

    Thread-safe; process-local.
    """

    def __init__(self, capacity_bytes: int, pool: HostMemoryPool | None = None) -> None:
        from sllm.core.pool import HostMemoryPool

        self.capacity_bytes = int(capacity_bytes)
        self.pool = pool if pool is not None else HostMemoryPool(capacity_bytes=self.capacity_bytes)
        self._entries: dict[str, _DramEntry] = {}
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def hold(self, model: str) -> DramLease | None:
        """A lease on ``model`` if it is whole in DRAM (counted as a hit), else None."""
        with self._lock:
            e = self._entries.get(model)
            if e is None or not e.whole:
                return None
            e.refs += 1
            e.last_used = time.time()
            return DramLease(self, e)

    def has(self, model: str) -> bool:
        with self._lock:
            e = self._entries.get(model)
            return e is not None and e.whole

    def reserve(self, model: str, manifest: Manifest, tensors: dict[str, TensorEntry],
                files: dict[str, bytes]) -> tuple[DramLease, list[str]]:
        """Allocate buffers for ``model`` (evicting LRU entries); the entry is "loading",
        held by the returned lease, and invisible to :meth:`hold` until :meth:`commit`.

        Returns: (the lease, the models evicted as "dram:model").

        Raises:
            CacheError: it does not fit even after evicting every idle, unpinned model.
        """
        from sllm.io.hostmem import round_up

        need = sum(round_up(p.nbytes) for p in manifest.partitions)
        with self._lock:
            if model in self._entries:
                raise CacheError(f"{model}: already in the DRAM tier")
            used = sum(e.nbytes for e in self._entries.values())
            if need > self.capacity_bytes:
                raise CacheError(f"{model}: needs {need} bytes of DRAM, more than the tier's capacity "
                                 f"of {self.capacity_bytes}", hint="raise --dram-capacity")
            idle = sorted((e for e in self._entries.values() if e.whole and not e.pinned and e.refs == 0),
                          key=lambda e: e.last_used)
            if used - sum(e.nbytes for e in idle) + need > self.capacity_bytes:
                raise CacheError(f"{model}: needs {need} bytes of DRAM; {self.capacity_bytes - used} free and the "
                                 "rest is pinned or in use", hint="raise --dram-capacity or unpin models")
            evicted = []
            for e in idle:
                if used + need <= self.capacity_bytes:
                    break
                self._drop(e)
                used -= e.nbytes
                evicted.append(f"dram:{e.model}")
            entry = _DramEntry(model, manifest, tensors, files, [], need, time.time(), refs=1)
            self._entries[model] = entry
        try:
            for p in manifest.partitions:
                entry.buffers.append(self.pool.acquire(p.nbytes))
        except BaseException:
            self.abort(entry)
            raise
        return DramLease(self, entry), evicted

    def commit(self, lease: DramLease) -> None:
        """Make a filled entry visible."""
        with self._lock:
            lease._entry.whole = True

    def abort(self, entry_or_lease: _DramEntry | DramLease) -> None:
        """Drop an entry that could not be filled."""
        entry = entry_or_lease._entry if isinstance(entry_or_lease, DramLease) else entry_or_lease
        with self._lock:
            if self._entries.get(entry.model) is entry:
                del self._entries[entry.model]
            for b in entry.buffers:
                self.pool.release(b)
            entry.buffers = []

    def _drop(self, e: _DramEntry) -> None:
        del self._entries[e.model]
        for b in e.buffers:
            self.pool.release(b)
        e.buffers = []
        self.evictions += 1

    def _unref(self, e: _DramEntry) -> None:
        with self._lock:
            e.refs -= 1

    def set_pinned(self, model: str, pinned: bool) -> bool:
        with self._lock:
            e = self._entries.get(model)
            if e is None or not e.whole:
                return False
            e.pinned = pinned
            return True

    def evict(self, model: str) -> int:
        """Drop ``model``'s buffers; return the bytes freed.

        Raises:
            CacheError: not in the tier, pinned, or leased.
        """
        with self._lock:
            e = self._entries.get(model)
            if e is None or not e.whole:
                raise CacheError(f"{model}: not in the DRAM tier")
            if e.pinned:
                raise CacheError(f"{model}: pinned in the DRAM tier", hint=f"unpin {model} first")
            if e.refs:
                raise CacheError(f"{model}: in use in the DRAM tier ({e.refs} lease(s))")
            self._drop(e)
            return e.nbytes

    def entries(self) -> list[CachedModel]:
        with self._lock:
            return [CachedModel(e.model, "dram", e.nbytes, e.last_used, e.pinned, e.refs > 0,
                                "whole" if e.whole else "loading")
                    for e in sorted(self._entries.values(), key=lambda e: e.last_used)]

    def views_of(self, model: str) -> tuple[Manifest, list[memoryview]]:
        """For verification: the manifest and partition views of a whole entry."""
        with self._lock:
            e = self._entries.get(model)
            if e is None or not e.whole:
                raise CacheError(f"{model}: not in the DRAM tier")
            return e.manifest, [b.memoryview(p.nbytes) for b, p in zip(e.buffers, e.manifest.partitions, strict=True)]

    def stats(self) -> TierStats:
        with self._lock:
            whole = [e for e in self._entries.values() if e.whole]
            return TierStats(
                tier="dram",
                capacity_bytes=self.capacity_bytes,
                used_bytes=sum(e.nbytes for e in whole),
                reserved_bytes=sum(e.nbytes for e in self._entries.values() if not e.whole),
                entries=len(whole),
                pinned=sum(1 for e in whole if e.pinned),
                hits=self.hits,
                misses=self.misses,
                hit_rate=_hit_rate(self.hits, self.misses),
                evictions=self.evictions,
            )


# ---------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------


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
        self._model_locks: dict[str, threading.Lock] = {}
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

    def _model_lock(self, model: str) -> threading.Lock:
        with self._locks_lock:
            return self._model_locks.setdefault(model, threading.Lock())

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

    def _pull(self, model: str, *, dram: bool, on_progress: ProgressCallback | None
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
            with self.ssd.pull_lock(model):
                if self.ssd.has(model):
                    self.ssd.count("hits", touch=model)
                    lease, evicted = self._ssd_to_dram(model, on_progress) if dram else (None, [])
                    nbytes = _dir_bytes(self.ssd.path_of(model)) if self.ssd.has(model) else 0
                    return self._result(model, "ssd", nbytes, 0, started, evicted), lease
                return self._remote_pull(model, dram=dram, started=started, on_progress=on_progress)

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

    def _ssd_to_dram(self, model: str, on_progress: ProgressCallback | None) -> tuple[DramLease, list[str]]:
        """Read an SSD entry into fresh DRAM-tier buffers (parallel reads, O_DIRECT where possible)."""
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
            lease, evicted = self.dram.reserve(model, ckpt.manifest, ckpt.tensors, files)
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

    def _remote_pull(self, model: str, *, dram: bool, started: float,
                     on_progress: ProgressCallback | None) -> tuple[PullResult, DramLease | None]:
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
                _write(slot.tmp / name, data)
                files[name] = data
                on_bytes(size)
            lease, evicted = (None, [])
            if dram:
                assert self.dram is not None
                lease, evicted = self.dram.reserve(model, meta.manifest, meta.tensors, files)
            try:
                fetched = pipelined_fetch(
                    remote, meta, slot.tmp, dram_views=lease.views() if lease else None,
                    piece_bytes=self.config.piece_bytes, queue_pieces=self.config.queue_pieces,
                    fsync=self.config.fsync, on_bytes=on_bytes,
                )
                _write(slot.tmp / INDEX_FILE, meta.index_bytes)
                _write(slot.tmp / MANIFEST_FILE, meta.manifest_bytes)
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


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CacheError(f"{path}: cannot write ({exc.strerror})") from exc
