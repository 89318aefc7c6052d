"""The SSD tier: whole entries in the node's cache directory, state in ``state.json``,
shared by every ``sllm`` process on the node through file locks (see the package docstring
for crash safety and in-use protection). It does not download (``pipeline.py``) nor decide
where a model comes from (``tiercache.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm.core.cache.base import (
    STATE_FILE,
    STATE_VERSION,
    CachedModel,
    TierStats,
    dir_bytes,
    entry_name,
    hit_rate,
    try_exclusive,
)
from sllm.core.format import open_checkpoint
from sllm.errors import CacheError
from sllm.io.atomic import (
    TMP_PREFIX,
    atomic_write_bytes,
    file_lock,
    pid_alive,
    remove_stale_temporaries,
    temporary_sibling,
)


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
                entries[model] = {"nbytes": dir_bytes(d), "last_used": d.stat().st_mtime, "pinned": False}
        for token, pull in list(state["pulls"].items()):
            if not pid_alive(int(pull.get("pid", 0))):
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
                with try_exclusive(self._lock_path(model, "lease")) as free:
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
                hit_rate=hit_rate(hits, misses),
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
            with try_exclusive(self._lock_path(model, "lease")) as free:
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
                if stack.enter_context(try_exclusive(self._lock_path(name, "lease"))):
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
            state["entries"][slot.model] = {"nbytes": dir_bytes(dst), "last_used": time.time(), "pinned": False}
        return dst
