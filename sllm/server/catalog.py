"""What a node can serve, read off the event loop: its ``--models`` directory and its tier
cache's local tiers, scanned in a worker thread, with each checkpoint's facts cached.

:meth:`Catalog.scan` (blocking: directory listings, the SSD tier's cross-process lock and
``state.json``) returns a :class:`Snapshot`; :meth:`Catalog.facts` (blocking) gives a local
checkpoint's size and validity, opening its manifest only when the manifest file changed
(keyed by its mtime and size), so ``GET /v1/models`` does not reopen every checkpoint each
time. Names that no request may use are never listed: hidden directories and the
temporaries of a converter or a download (:data:`sllm.io.atomic.TMP_PREFIX`), whether or
not their writer is still alive.

It owns no residency (``models.py``) and speaks no HTTP.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sllm.core.format import MANIFEST_FILE, open_checkpoint
from sllm.errors import CheckpointError, UsageError
from sllm.io.atomic import TMP_PREFIX

if TYPE_CHECKING:
    from sllm.server.tiers import NodeTiers

#: The longest model name a request may use, in UTF-8 bytes. Longer names are refused with a
#: 400 before anything touches the filesystem (a directory entry holds at most 255 bytes, and
#: the cache adds a suffix and a temporary prefix to it).
MAX_MODEL_NAME_BYTES = 200


def check_model_name(model_id: str) -> bool:
    """Check a model name before any filesystem call: False for a name that can name nothing
    here (a NUL byte, or a part that starts with ``.``: hidden, a writer's temporary, ``..``),
    which the caller answers as not found.

    Raises:
        UsageError: longer than :data:`MAX_MODEL_NAME_BYTES` bytes.
    """
    nbytes = len(model_id.encode("utf-8", "surrogatepass"))
    if nbytes > MAX_MODEL_NAME_BYTES:
        raise UsageError(f"model name of {nbytes} bytes: at most {MAX_MODEL_NAME_BYTES} bytes")
    return "\x00" not in model_id and not any(part.startswith(".") for part in model_id.split("/"))


def servable_dir_name(name: str) -> bool:
    """True for a directory name that may be a model: not hidden, not a writer's temporary."""
    return not (name.startswith(".") or name.startswith(TMP_PREFIX))


@dataclass(frozen=True)
class Snapshot:
    """One scan: ``local`` model id -> its checkpoint directory; ``cached`` model id -> the
    local tiers holding it whole, fastest first ("dram", "ssd"); ``taken`` (monotonic seconds)."""

    local: dict[str, Path] = field(default_factory=dict)
    cached: dict[str, list[str]] = field(default_factory=dict)
    taken: float = 0.0


@dataclass(frozen=True)
class Facts:
    """A local checkpoint's facts for the catalogue: ``nbytes`` (None when it does not
    validate), ``error`` (why, else None), ``created`` (its manifest's mtime, Unix seconds),
    ``tensors`` (its tensor index's entries; None when it does not validate)."""

    nbytes: int | None
    error: str | None
    created: float
    tensors: int | None = None


class Catalog:
    """Scans of one node's models (see the module docstring). Thread-safe.

    Args:
        models_dir: the ``--models`` directory, or None.
        tiers: the node's tier cache, or None.
    """

    def __init__(self, models_dir: Path | None, tiers: NodeTiers | None) -> None:
        self.models_dir = models_dir
        self.tiers = tiers
        self._facts: dict[Path, tuple[tuple[int, int], Facts]] = {}
        self._lock = threading.Lock()

    def scan(self) -> Snapshot:
        """List the local models and the tier cache's whole entries. Blocking.

        Raises:
            OSError: the models directory cannot be listed.
        """
        local: dict[str, Path] = {}
        if self.models_dir is not None:
            for p in self.models_dir.iterdir():
                if servable_dir_name(p.name) and p.is_dir() and (p / MANIFEST_FILE).is_file():
                    local[p.name] = p
        cached = self.tiers.cached() if self.tiers is not None else {}
        return Snapshot(local, cached, time.monotonic())

    def facts(self, path: Path) -> Facts:
        """Size and validity of the checkpoint at ``path``; reopened only when its manifest
        changed. Blocking."""
        manifest = path / MANIFEST_FILE
        try:
            st = manifest.stat()
        except OSError as exc:
            return Facts(None, f"{manifest}: {exc.strerror}", time.time())
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._facts.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        try:
            ckpt = open_checkpoint(path)
            facts = Facts(ckpt.manifest.total_bytes, None, st.st_mtime, len(ckpt.tensors))
        except CheckpointError as exc:
            facts = Facts(None, str(exc), st.st_mtime)
        with self._lock:
            self._facts[path] = (key, facts)
            for stale in [p for p in self._facts if not p.exists()]:
                del self._facts[stale]
        return facts
