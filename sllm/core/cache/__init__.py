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

The package moves bytes only through ``sllm/io/`` (remote streams, parallel reads, atomic
writes), except the positional writes of the SSD entry's partition files. It does not print,
parse flags or read the environment: commands build a :class:`CacheConfig`.

Modules: ``base.py`` (configuration, result records, names), ``pipeline.py`` (remote
metadata and the chunk pipeline), ``ssd.py`` (the SSD tier), ``dram.py`` (the DRAM tier),
``tiercache.py`` (:class:`TierCache`, the tiers together). Import from the package:
``from sllm.core.cache import TierCache, CacheConfig``.
"""

from __future__ import annotations

from sllm.core.cache.base import (
    FLUSH_BYTES,
    MAX_METADATA_BYTES,
    PIECE_BYTES,
    STATE_FILE,
    STATE_VERSION,
    TIERS,
    CacheConfig,
    CachedModel,
    EvictResult,
    Location,
    ProgressCallback,
    PullResult,
    TierStats,
    VerifyResult,
    entry_name,
)
from sllm.core.cache.dram import DramLease, DramTier
from sllm.core.cache.pipeline import RemoteModel, fetch_metadata, pipelined_fetch
from sllm.core.cache.ssd import SsdTier
from sllm.core.cache.tiercache import TierCache

__all__ = [
    "FLUSH_BYTES",
    "MAX_METADATA_BYTES",
    "PIECE_BYTES",
    "STATE_FILE",
    "STATE_VERSION",
    "TIERS",
    "CacheConfig",
    "CachedModel",
    "DramLease",
    "DramTier",
    "EvictResult",
    "Location",
    "ProgressCallback",
    "PullResult",
    "RemoteModel",
    "SsdTier",
    "TierCache",
    "TierStats",
    "VerifyResult",
    "entry_name",
    "fetch_metadata",
    "pipelined_fetch",
]
