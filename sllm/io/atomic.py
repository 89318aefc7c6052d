"""Crash-safe writes: temporary names renamed into place, fsync, and advisory file locks.

Everything sllm writes (a converted checkpoint, a cache entry, a node profile) is written
under a temporary name unique to the process beside its destination, flushed, and renamed
into place, so a crash, Ctrl-C or kill -9 leaves either the old entry or the new one and
never a half-written one under the real name. Leftover temporaries carry the prefix
:data:`TMP_PREFIX` and are removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from sllm.errors import DestinationExists, SllmError

TMP_PREFIX = ".sllm-tmp-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(dst: Path) -> Path:
    """A fresh path beside ``dst`` named ``.sllm-tmp-<dst name>-<pid>-<random>``."""
    return dst.parent / f"{TMP_PREFIX}{dst.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``dst``; on success rename it to ``dst``.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and
    ``dst`` is left as it was. With ``force``, an existing ``dst`` is replaced: it is moved
    aside first and deleted only after the new directory is in place.

    Raises:
        DestinationExists: ``dst`` exists and ``force`` is False (checked before and after).
        SllmError: the parent directory cannot be written.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise DestinationExists(f"{dst}: already exists (use --force to replace it)")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(dst)
        tmp.mkdir()
    except OSError as exc:
        raise SllmError(f"{dst.parent}: cannot write ({exc.strerror})") from exc
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                fsync_file(child)
        _fsync_dir(tmp)
        old = None
        if dst.exists():
            if not force:
                raise DestinationExists(f"{dst}: already exists (use --force to replace it)")
            old = temporary_sibling(dst)
            os.rename(dst, old)
        os.rename(tmp, dst)
        _fsync_dir(dst.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_file(path: Path) -> None:
    """Flush a file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(dst: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``dst`` through a temporary sibling, fsync, and rename.

    Raises:
        SllmError: the file cannot be written.
    """
    dst = Path(dst)
    tmp = temporary_sibling(dst)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SllmError(f"{dst}: cannot write ({exc.strerror})") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, shared: bool = False) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``path`` (created if missing) for the ``with`` body.

    Exclusive by default; ``shared=True`` for readers. Blocks until the lock is granted.
    The kernel releases it when the process dies, so a killed process never leaves a stale
    lock behind.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete ``.sllm-tmp-*`` entries left in ``directory`` by dead processes; return them.

    An entry whose embedded pid is still alive is kept (another process is writing it).
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        parts = entry.name.rsplit("-", 2)
        pid = int(parts[-2]) if len(parts) == 3 and parts[-2].isdigit() else None
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    """True when a process ``pid`` exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
