"""What the tier cache's modules share: its configuration, the records its operations
return (``sllm cache`` renders them, ``--json`` dumps them), model names, and small
filesystem helpers. No tier logic here."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sllm.errors import CacheError, UsageError
from sllm.io.remote import RemoteConfig

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


#: One ``/``-separated part of a model name.
NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: The longest model name, bytes: an entry's directory name, its lock files' suffixes and a
#: temporary's prefix and pid must fit in a directory entry's 255 bytes.
MAX_NAME_BYTES = 200


def entry_name(model: str) -> str:
    """The directory name of ``model`` in the SSD tier: its ``/``-separated parts joined by ``--``.

    Raises:
        UsageError: a name with an empty part, a part that starts with ``.`` or ``-``,
            characters other than letters, digits, ``._-``, or ``--`` inside a part; a name
            longer than :data:`MAX_NAME_BYTES` bytes (checked first, before any filesystem call).
    """
    if len(model.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise UsageError(f"model name of {len(model.encode('utf-8', 'surrogatepass'))} bytes: at most {MAX_NAME_BYTES}")
    parts = model.split("/")
    if not all(NAME_PART.fullmatch(p) and "--" not in p for p in parts):
        raise UsageError(
            f"model name {model!r}: use letters, digits and '._-' in '/'-separated parts (no '--', no leading '.')"
        )
    return "--".join(parts)


def hit_rate(hits: int, misses: int) -> float | None:
    """``hits / (hits + misses)``; None before the first lookup."""
    return hits / (hits + misses) if hits + misses else None


    return True


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files directly in ``path``."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


@contextlib.contextmanager
def try_exclusive(path: Path) -> Iterator[bool]:
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


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``.

    Raises:
        CacheError: it cannot be written.
    """
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CacheError(f"{path}: cannot write ({exc.strerror})") from exc
