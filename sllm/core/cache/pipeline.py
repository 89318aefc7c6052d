"""Remote metadata and the chunk pipeline: a remote model's manifest and index, checked,
then its partitions streamed in pieces by a downloader thread while this thread writes them
into an SSD entry (and, straight from the network, into DRAM buffers), hashing each chunk
as its last piece lands. Bytes move through ``sllm/io/`` (remote streams) except the
positional writes of the partition files. It knows nothing of tiers' capacities or state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm.core.cache.base import FLUSH_BYTES, MAX_METADATA_BYTES, PIECE_BYTES
from sllm.core.format import INDEX_FILE, MANIFEST_FILE, Manifest, TensorEntry, parse_index, parse_manifest
from sllm.errors import CacheError, ManifestError, RemoteError
from sllm.io.reader import chunk_ranges
from sllm.io.remote import Remote


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


def json_object(data: bytes, where: str) -> dict[str, Any]:
    """The JSON object in ``data`` (a manifest or tensor index read from ``where``).

    Raises:
        ManifestError: not JSON, or not an object.
    """
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{where}: cannot parse JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    return doc


def read_manifest(remote: Remote, model: str) -> tuple[Manifest, bytes]:
    """``model``'s manifest on ``remote``, parsed, and its bytes.

    Raises:
        RemoteError: missing (``not_found``) or unreachable. ManifestError: bad metadata (names the URL).
    """
    path = f"{model}/{MANIFEST_FILE}"
    data = remote.read_bytes(path, max_bytes=MAX_METADATA_BYTES)
    return parse_manifest(json_object(data, remote.url_of(path)), remote.url_of(path)), data


def read_index(remote: Remote, model: str, manifest: Manifest) -> tuple[dict[str, TensorEntry], bytes]:
    """``model``'s tensor index on ``remote``, checked against ``manifest``, and its bytes.

    Raises:
        RemoteError: missing or unreachable. CheckpointError subclasses: a bad index (names the URL).
    """
    path = f"{model}/{INDEX_FILE}"
    data = remote.read_bytes(path, max_bytes=MAX_METADATA_BYTES)
    return parse_index(json_object(data, remote.url_of(path)), manifest, remote.url_of(path)), data


def fetch_metadata(remote: Remote, model: str) -> RemoteModel:
    """Read ``model``'s manifest and index from ``remote``, and check every file's size.

    Raises:
        RemoteError: a file is missing, unreachable, or of another size than recorded.
        ManifestError and other CheckpointError subclasses: bad metadata (names the URL).
    """
    manifest, manifest_bytes = read_manifest(remote, model)
    tensors, index_bytes = read_index(remote, model, manifest)
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
