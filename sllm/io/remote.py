"""Remote stores that checkpoints are pulled from: a directory, ``http(s)://``, ``s3://``.

A remote is a read-only tree of files under a base location. This module stats files,
lists a directory of them, and streams a byte range of one file into a caller's buffer (or
a whole file into a caller's open file) in pieces, checking that exactly the asked bytes
arrive. It never writes to a remote, and knows nothing of models, manifests or caches:
callers pass paths relative to the base (``"gpt2/partition-0.bin"``) and byte ranges.

Schemes are a registry (:data:`REMOTES`, :func:`get_remote_class`, :func:`open_remote`):

=============================  ==========================================================
``/some/dir``, ``file:///d``   :class:`DirectoryRemote` (a local disk or an NFS mount)
``http://``, ``https://``      :class:`HttpRemote` (httpx; ``Range`` requests, streamed)
``s3://bucket/prefix``         :class:`S3Remote` (boto3, the optional ``s3`` extra)
=============================  ==========================================================

Every ``OSError``, httpx and botocore error is translated here, once, into
:class:`sllm.errors.RemoteError` with one line naming the URL and the problem (not found,
truncated, unreachable, timed out), chained ``from exc``. httpx and boto3 are imported only
when a remote of their scheme is opened, so importing this module is cheap.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from sllm.errors import RemoteError, UsageError
from sllm.io.reader import hash_file_chunks  # noqa: F401 - re-exported: checksums of local copies

#: Bytes asked of the network per read (a piece); a chunk is filled from several pieces.
DEFAULT_PIECE_BYTES = 1024 * 1024
#: The largest file :meth:`Remote.read_bytes` accepts (manifests, indexes, configs), bytes.
DEFAULT_MAX_SMALL_BYTES = 256 * 1024 * 1024

#: A transfer must move at least this many bytes per ``stall_seconds`` (:class:`RemoteConfig`).
STALL_MIN_BYTES = 64 * 1024

ProgressCallback = Callable[[int, int], None]


def redact_url(url: str | None) -> str | None:
    """``url`` fit to show: user, password and query string (presigned signatures, tokens)
    removed, e.g. ``https://user:secret@host/m?X-Amz-Signature=...`` -> ``https://host/m``.
    A local path is returned as it is; None stays None."""
    if not url or "://" not in url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class RemoteConfig:
    """How remotes connect. Commands build it (:meth:`from_env`); this module reads no environment.

    Attributes:
        timeout_seconds: seconds to wait for a connection or for the next bytes of a
            response before giving up with "timed out" (default 30).
        stall_seconds: a transfer that moves fewer than :data:`STALL_MIN_BYTES` bytes in
            this many seconds fails as "stalled" (default 60; ``SLLM_REMOTE_STALL_SECONDS``),
            so a remote that trickles bytes slowly enough never to trip ``timeout_seconds``
            still cannot hold a pull, and the node's link, forever.
        piece_bytes: bytes asked of the network per read (default 1 MiB).
        s3_endpoint_url: the S3 API endpoint (e.g. ``http://127.0.0.1:9000`` for a local
            S3-compatible server); None uses boto3's default (AWS, or boto3's own
            ``AWS_ENDPOINT_URL`` handling).
        s3_region: the S3 region name; None uses boto3's default.
    """

    timeout_seconds: float = 30.0
    stall_seconds: float = 60.0
    piece_bytes: int = DEFAULT_PIECE_BYTES
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> RemoteConfig:
        """A config from environment variables: ``SLLM_S3_ENDPOINT`` (first) or
        ``AWS_ENDPOINT_URL`` for the S3 endpoint, ``AWS_DEFAULT_REGION`` for the region,
        ``SLLM_REMOTE_TIMEOUT`` and ``SLLM_REMOTE_STALL_SECONDS`` (seconds). ``overrides`` win."""
        values: dict[str, Any] = {
            "s3_endpoint_url": environ.get("SLLM_S3_ENDPOINT") or environ.get("AWS_ENDPOINT_URL") or None,
            "s3_region": environ.get("AWS_DEFAULT_REGION") or environ.get("AWS_REGION") or None,
        }
        for var, key in (("SLLM_REMOTE_TIMEOUT", "timeout_seconds"), ("SLLM_REMOTE_STALL_SECONDS", "stall_seconds")):
            if environ.get(var):
                try:
                    values[key] = float(environ[var])
                except ValueError as exc:
                    raise UsageError(f"{var}={environ[var]!r}: not a number") from exc
        values.update(overrides)
        return cls(**values)


def _check_relpath(path: str) -> str:
    """Refuse paths that could leave the remote's base (absolute, ``..``, empty parts)."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path or "\x00" in path:
        raise UsageError(f"remote path {path!r}: must be a relative path without '.', '..' or empty parts")
    return path


class RangeStream(ABC):
    """Bytes ``[start, end)`` of one remote file, read in order into caller buffers.

    Use as a context manager; :meth:`readinto` fills a whole view or raises.
    """

    def __init__(self, url: str, start: int, end: int, *, stall_seconds: float | None = None) -> None:
        self.url = url
        self.start = start
        self.end = end
        self.pos = start
        self.stall_seconds = stall_seconds
        self._window_start = time.monotonic()
        self._window_bytes = 0

    @abstractmethod
    def _read_some(self, view: memoryview) -> int:
        """Fill a prefix of ``view`` with the next bytes; return how many (0 at the end)."""

    def readinto(self, view: memoryview) -> None:
        """Fill ``view`` completely with the next ``len(view)`` bytes of the range.

        Raises:
            RemoteError: the view runs past the range's end, or the remote sent fewer bytes
                than the range holds ("truncated"), or the transfer failed.
        """
        view = view.cast("B") if view.format != "B" else view
        if self.pos + len(view) > self.end:
            raise RemoteError(f"{self.url}: read of {len(view)} bytes at {self.pos} runs past the range end {self.end}")
        done = 0
        while done < len(view):
            n = self._read_some(view[done:])
            if n == 0:
                raise RemoteError(
                    f"{self.url}: truncated: the transfer ended at byte {self.pos + done}, expected {self.end}"
                )
            done += n
            self._progress(n)
        self.pos += done

    def _progress(self, n: int) -> None:
        """Fail a transfer that makes no progress: fewer than :data:`STALL_MIN_BYTES` in
        ``stall_seconds`` (a trickle that never trips a per-read timeout).

        Raises:
            RemoteError: "stalled".
        """
        if self.stall_seconds is None:
            return
        self._window_bytes += n
        now = time.monotonic()
        if self._window_bytes >= STALL_MIN_BYTES:
            self._window_start, self._window_bytes = now, 0
        elif now - self._window_start > self.stall_seconds:
            raise RemoteError(f"{self.url}: stalled: {self._window_bytes} bytes in the last "
                              f"{now - self._window_start:.0f} s (at byte {self.pos}); giving up")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection or file."""

    def __enter__(self) -> RangeStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Remote(ABC):
    """A read-only store of files under a base URL. Subclasses implement one scheme.

    Paths are relative to the base, with ``/`` separators (see :meth:`url_of`).
    """

    #: the URL schemes the class serves (keys of :data:`REMOTES`)
    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, url: str, config: RemoteConfig | None = None) -> None:
        self.url = url
        self.config = config or RemoteConfig()

    def url_of(self, path: str) -> str:
        """The full URL of ``path``, for messages."""
        return f"{self.url.rstrip('/')}/{_check_relpath(path)}"

    @abstractmethod
    def size(self, path: str) -> int:
        """The size of the file at ``path``, bytes.

        Raises:
            RemoteError: not found, unreachable, or the size is not given.
        """

    @abstractmethod
    def list(self, prefix: str) -> dict[str, int]:
        """The files directly under directory ``prefix``: name -> size in bytes.

        Raises:
            RemoteError: the prefix does not exist or cannot be listed (plain HTTP cannot).
        """

    @abstractmethod
    def open_range(self, path: str, start: int, end: int) -> RangeStream:
        """A stream of bytes ``[start, end)`` of ``path`` (one request, read in pieces).

        Raises:
            RemoteError: not found, unreachable, or the file is shorter than ``end``.
        """

    def exists(self, path: str) -> bool:
        """True when ``path`` is a file on the remote; False when it is not found.

        Raises:
            RemoteError: the remote cannot be reached (only "not found" is False).
        """
        try:
            self.size(path)
        except RemoteError as exc:
            if getattr(exc, "not_found", False):
                return False
            raise
        return True

    def fetch_into(self, path: str, out: memoryview, *, offset: int = 0) -> None:
        """Fill ``out`` with bytes ``[offset, offset + len(out))`` of ``path``.

        Raises:
            RemoteError: as :meth:`open_range` and :meth:`RangeStream.readinto`.
        """
        if len(out) == 0:
            return
        with self.open_range(path, offset, offset + len(out)) as stream:
            stream.readinto(out)

    def read_bytes(self, path: str, *, max_bytes: int = DEFAULT_MAX_SMALL_BYTES) -> bytes:
        """The whole content of a small file (a manifest, a config).

        Raises:
            RemoteError: as :meth:`size` / :meth:`fetch_into`, or the file is larger than
                ``max_bytes``.
        """
        nbytes = self.size(path)
        if nbytes > max_bytes:
            raise RemoteError(f"{self.url_of(path)}: {nbytes} bytes, more than the {max_bytes} allowed for this file")
        buf = bytearray(nbytes)
        self.fetch_into(path, memoryview(buf))
        return bytes(buf)

    def fetch_to_file(
        self,
        path: str,
        dst: BinaryIO,
        *,
        nbytes: int | None = None,
        chunk_bytes: int = DEFAULT_PIECE_BYTES,
        on_progress: ProgressCallback | None = None,
    ) -> int:
        """Copy the whole file ``path`` into the caller's open binary file ``dst``, in chunks.

        Args:
            nbytes: the expected size, bytes (None: ask the remote). A remote file of another
                size is an error.
            chunk_bytes: bytes per write.
            on_progress: ``on_progress(done_bytes, total_bytes)`` after each chunk.

        Returns: the bytes written.

        Raises:
            RemoteError: as :meth:`open_range`, or a size other than ``nbytes``.
        """
        size = self.size(path)
        if nbytes is not None and size != nbytes:
            raise RemoteError(f"{self.url_of(path)}: {size} bytes on the remote, expected {nbytes}")
        buf = memoryview(bytearray(min(chunk_bytes, max(size, 1))))
        done = 0
        if size:
            with self.open_range(path, 0, size) as stream:
                while done < size:
                    view = buf[: min(len(buf), size - done)]
                    stream.readinto(view)
                    dst.write(view)
                    done += len(view)
                    if on_progress:
                        on_progress(done, size)
        return done

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def not_found_error(message: str) -> RemoteError:
    """A RemoteError marked ``not_found`` (so :meth:`Remote.exists` can tell it from an outage)."""
    err = RemoteError(message)
    err.not_found = True  # type: ignore[attr-defined]
    return err


# ---------------------------------------------------------------------------------------
# Directory (and file://)
# ---------------------------------------------------------------------------------------


class _FileRange(RangeStream):
    def __init__(self, url: str, f: BinaryIO, start: int, end: int) -> None:
        super().__init__(url, start, end)
        self.f = f

    def _read_some(self, view: memoryview) -> int:
        try:
            return self.f.readinto(view) or 0
        except OSError as exc:
            raise RemoteError(f"{self.url}: read failed at byte {self.pos} ({exc.strerror})") from exc

    def close(self) -> None:
        self.f.close()


class DirectoryRemote(Remote):
    """A directory on a local or network filesystem (``/path`` or ``file:///path``)."""

    schemes = ("file", "")

    def __init__(self, url: str, config: RemoteConfig | None = None) -> None:
        super().__init__(url, config)
        parsed = urllib.parse.urlsplit(url)
        self.root = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
        if not self.root.is_dir():
            raise RemoteError(f"{url}: not a directory")

    def url_of(self, path: str) -> str:
        return str(self.root / _check_relpath(path))

    def size(self, path: str) -> int:
        p = self.root / _check_relpath(path)
        try:
            st = p.stat()
        except FileNotFoundError as exc:
            raise not_found_error(f"{p}: not found") from exc
        except OSError as exc:
            raise RemoteError(f"{p}: cannot stat ({exc.strerror})") from exc
        if not p.is_file():
            raise RemoteError(f"{p}: not a regular file")
        return st.st_size

    def list(self, prefix: str) -> dict[str, int]:
        d = self.root / _check_relpath(prefix)
        try:
            return {e.name: e.stat().st_size for e in sorted(d.iterdir()) if e.is_file()}
        except FileNotFoundError as exc:
            raise not_found_error(f"{d}: not found") from exc
        except OSError as exc:
            raise RemoteError(f"{d}: cannot list ({exc.strerror})") from exc

    def open_range(self, path: str, start: int, end: int) -> RangeStream:
        p = self.root / _check_relpath(path)
        size = self.size(path)
        if size < end:
            raise RemoteError(f"{p}: truncated: {size} bytes, expected at least {end}")
        try:
            f = open(p, "rb", buffering=0)  # noqa: SIM115 - closed by the stream
            f.seek(start)
        except OSError as exc:
            raise RemoteError(f"{p}: cannot open ({exc.strerror})") from exc
        return _FileRange(str(p), f, start, end)


# ---------------------------------------------------------------------------------------
# HTTP(S)
# ---------------------------------------------------------------------------------------


def _http_error(url: str, exc: Exception) -> RemoteError:
    """One line for an httpx exception (imported lazily by the caller)."""
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return RemoteError(f"{url}: cannot connect, host unreachable ({exc})")
    if isinstance(exc, httpx.TimeoutException):
        return RemoteError(f"{url}: timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.RemoteProtocolError):
        return RemoteError(f"{url}: truncated: the server closed the connection mid-transfer ({exc})")
    return RemoteError(f"{url}: transfer failed ({type(exc).__name__}: {exc})")


def _status_error(url: str, status: int, reason: str) -> RemoteError:
    if status == 404:
        return not_found_error(f"{url}: not found (HTTP 404)")
    if status == 416:
        return RemoteError(f"{url}: truncated: the file is shorter than the range asked (HTTP 416)")
    return RemoteError(f"{url}: HTTP {status} {reason}".rstrip())


class _HttpRange(RangeStream):
    def __init__(self, url: str, response: Any, start: int, end: int, piece_bytes: int,
                 stall_seconds: float | None = None) -> None:
        super().__init__(url, start, end, stall_seconds=stall_seconds)
        self.response = response
        self._pieces = response.iter_raw()  # as the bytes arrive: a chunk size here would buffer
        self._left = memoryview(b"")

    def _read_some(self, view: memoryview) -> int:
        import httpx

        if not self._left:
            try:
                self._left = memoryview(next(self._pieces))
            except StopIteration:
                return 0
            except httpx.HTTPError as exc:
                raise _http_error(self.url, exc) from exc
        n = min(len(view), len(self._left))
        view[:n] = self._left[:n]
        self._left = self._left[n:]
        return n

    def close(self) -> None:
        self.response.close()


class HttpRemote(Remote):
    """A base URL served over HTTP(S); files are fetched with ``Range`` requests (httpx).

    Listing is not possible over plain HTTP: callers know the file names (a manifest).
    """

    schemes = ("http", "https")

    def __init__(self, url: str, config: RemoteConfig | None = None) -> None:
        super().__init__(url, config)
        import httpx

        timeout = httpx.Timeout(self.config.timeout_seconds)
        self._client = httpx.Client(
            timeout=timeout, follow_redirects=True, headers={"Accept-Encoding": "identity"}
        )

    def url_of(self, path: str) -> str:
        """The URL of ``path`` for messages: credentials and query removed (:func:`redact_url`)."""
        return redact_url(self._request_url(path)) or ""

    def _request_url(self, path: str) -> str:
        return f"{self.url.rstrip('/')}/{urllib.parse.quote(_check_relpath(path))}"

    def size(self, path: str) -> int:
        import httpx

        url = self.url_of(path)
        try:
            r = self._client.head(self._request_url(path))
            if r.status_code in (405, 501):  # no HEAD: ask for the first byte instead
                with self._client.stream("GET", self._request_url(path), headers={"Range": "bytes=0-0"}) as g:
                    if g.status_code == 206 and "/" in g.headers.get("content-range", ""):
                        total = g.headers["content-range"].rsplit("/", 1)[1]
                        if total.isdigit():
                            return int(total)
                    r = g
        except httpx.HTTPError as exc:
            raise _http_error(url, exc) from exc
        if r.status_code != 200:
            raise _status_error(url, r.status_code, r.reason_phrase)
        length = r.headers.get("content-length")
        if length is None or not length.isdigit():
            raise RemoteError(f"{url}: the server gives no Content-Length, so the size cannot be checked")
        return int(length)

    def list(self, prefix: str) -> dict[str, int]:
        raise RemoteError(f"{self.url_of(prefix)}: an http(s) remote cannot list files (name them instead)")

    def open_range(self, path: str, start: int, end: int) -> RangeStream:
        import httpx

        url = self.url_of(path)
        if end <= start:
            return _HttpRange(url, _EmptyResponse(), start, end, 1)
        try:
            req = self._client.build_request("GET", self._request_url(path), headers={"Range": f"bytes={start}-{end - 1}"})
            r = self._client.send(req, stream=True)
        except httpx.HTTPError as exc:
            raise _http_error(url, exc) from exc
        try:
            if r.status_code == 206:
                got = r.headers.get("content-range", "")
                want = f"bytes {start}-{end - 1}/"
                if not got.startswith(want):
                    total = got.rsplit("/", 1)[-1]
                    if total.isdigit() and int(total) < end:
                        raise RemoteError(f"{url}: truncated: the file is {total} bytes, expected at least {end}")
                    raise RemoteError(f"{url}: asked for bytes {start}-{end - 1}, the server sent {got!r}")
            elif r.status_code == 200 and start == 0:
                length = r.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) < end:
                    raise RemoteError(f"{url}: truncated: {length} bytes, expected at least {end}")
            elif r.status_code == 200:
                raise RemoteError(f"{url}: the server ignores Range requests, so bytes {start}- cannot be fetched")
            else:
                raise _status_error(url, r.status_code, r.reason_phrase)
        except BaseException:
            r.close()
            raise
        return _HttpRange(url, r, start, end, self.config.piece_bytes, self.config.stall_seconds)

    def close(self) -> None:
        self._client.close()


class _EmptyResponse:
    def iter_raw(self, n: int | None = None) -> Iterator[bytes]:
        return iter(())

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------

from sllm.io.s3 import S3Remote  # noqa: E402 - s3.py builds on the classes above

#: URL scheme -> remote class ("" is a plain local path).
REMOTES: dict[str, type[Remote]] = {
    "": DirectoryRemote,
    "file": DirectoryRemote,
    "http": HttpRemote,
    "https": HttpRemote,
    "s3": S3Remote,
}



def get_remote_class(scheme: str) -> type[Remote]:
    """The remote class for a URL scheme.

    Raises:
        UsageError: an unknown scheme; the message lists the known ones.
    """
    try:
        return REMOTES[scheme.lower()]
    except KeyError:
        known = ", ".join(f"{s}://" for s in REMOTES if s) + ", or a directory path"
        raise UsageError(f"remote scheme {scheme!r} is not supported: use {known}") from None


def open_remote(url: str | os.PathLike[str], config: RemoteConfig | None = None) -> Remote:
    """Open the remote at ``url``: a directory path, ``file://``, ``http(s)://`` or ``s3://``.

    Raises:
        UsageError: an unknown scheme. RemoteError: a directory that does not exist, or
        boto3 missing for ``s3://``.
    """
    url = os.fspath(url)
    scheme = urllib.parse.urlsplit(url).scheme
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = ""
    return get_remote_class(scheme)(url, config)
