"""The ``s3://`` remote: a bucket and key prefix read with ranged ``GetObject`` (boto3,
imported on first use; ``pip install 'sllm[s3]'``). Endpoint and region come from
:class:`~sllm.io.remote.RemoteConfig`. Part of :mod:`sllm.io.remote`, which registers it.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from typing import Any

from sllm.errors import RemoteError, UsageError
from sllm.io.remote import RangeStream, Remote, RemoteConfig, _check_relpath, not_found_error


def _s3_error(url: str, exc: BaseException) -> RemoteError:
    """One line for a botocore/urllib3 exception."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            return not_found_error(f"{url}: not found ({code})")
        if code in ("InvalidRange", "416"):
            return RemoteError(f"{url}: truncated: the object is shorter than the range asked ({code})")
        return RemoteError(f"{url}: S3 error {code or status} ({err.get('Message', '')})".rstrip(" ()"))
    if isinstance(exc, EndpointConnectionError):
        return RemoteError(f"{url}: cannot connect, host unreachable ({exc})")
    if isinstance(exc, NoCredentialsError):
        return RemoteError(f"{url}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    name = type(exc).__name__
    if "Timeout" in name:
        return RemoteError(f"{url}: timed out ({name})")
    if "IncompleteRead" in name or "Protocol" in name or "ResponseStreaming" in name:
        return RemoteError(f"{url}: truncated: the connection closed mid-transfer ({name})")
    return RemoteError(f"{url}: transfer failed ({name}: {exc})")


def _s3_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 comes with botocore
        return (BotoCoreError, ClientError, OSError)
    return (BotoCoreError, ClientError, Urllib3Error, OSError)


class _S3Range(RangeStream):
    def __init__(self, url: str, body: Any, start: int, end: int, piece_bytes: int,
                 stall_seconds: float | None = None) -> None:
        super().__init__(url, start, end, stall_seconds=stall_seconds)
        self.body = body
        self.piece_bytes = piece_bytes
        self._left = memoryview(b"")

    def _read_some(self, view: memoryview) -> int:
        if not self._left:
            try:
                data = self.body.read(min(self.piece_bytes, self.end - self.pos))
            except _s3_errors() as exc:
                raise _s3_error(self.url, exc) from exc
            if not data:
                return 0
            self._left = memoryview(data)
        n = min(len(view), len(self._left))
        view[:n] = self._left[:n]
        self._left = self._left[n:]
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.body.close()


class S3Remote(Remote):
    """``s3://bucket/prefix`` through boto3 (install the ``s3`` extra: ``pip install 'sllm[s3]'``).

    Credentials come from boto3's usual chain (environment, ~/.aws, instance role); the
    endpoint from :attr:`RemoteConfig.s3_endpoint_url` (an S3-compatible server).
    """

    schemes = ("s3",)

    def __init__(self, url: str, config: RemoteConfig | None = None) -> None:
        super().__init__(url, config)
        parsed = urllib.parse.urlsplit(url)
        if not parsed.netloc:
            raise UsageError(f"{url}: an s3 URL names a bucket: s3://BUCKET[/PREFIX]")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise RemoteError(
                f"{url}: s3 remotes need boto3, which is not installed (pip install 'sllm[s3]')"
            ) from exc
        cfg = Config(
            connect_timeout=self.config.timeout_seconds,
            read_timeout=self.config.timeout_seconds,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"} if self.config.s3_endpoint_url else {},
        )
        try:
            self._s3 = boto3.session.Session().client(
                "s3", endpoint_url=self.config.s3_endpoint_url, region_name=self.config.s3_region, config=cfg
            )
        except Exception as exc:  # noqa: BLE001 - botocore raises many kinds here (bad endpoint, region)
            raise RemoteError(f"{url}: cannot create an S3 client ({type(exc).__name__}: {exc})") from exc

    def _key(self, path: str) -> str:
        path = _check_relpath(path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def url_of(self, path: str) -> str:
        return f"s3://{self.bucket}/{self._key(path)}"

    def size(self, path: str) -> int:
        url = self.url_of(path)
        try:
            r = self._s3.head_object(Bucket=self.bucket, Key=self._key(path))
        except _s3_errors() as exc:
            raise _s3_error(url, exc) from exc
        return int(r["ContentLength"])

    def list(self, prefix: str) -> dict[str, int]:
        key = self._key(prefix).rstrip("/") + "/"
        url = f"s3://{self.bucket}/{key}"
        out: dict[str, int] = {}
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key, Delimiter="/")
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(key):]] = int(obj["Size"])
        except _s3_errors() as exc:
            raise _s3_error(url, exc) from exc
        if not out:
            raise not_found_error(f"{url}: not found (no objects under this prefix)")
        return dict(sorted(out.items()))

    def open_range(self, path: str, start: int, end: int) -> RangeStream:
        url = self.url_of(path)
        if end <= start:
            return _S3Range(url, _EmptyBody(), start, end, 1)
        try:
            r = self._s3.get_object(Bucket=self.bucket, Key=self._key(path), Range=f"bytes={start}-{end - 1}")
        except _s3_errors() as exc:
            raise _s3_error(url, exc) from exc
        got = r.get("ContentRange") or ""
        length = int(r.get("ContentLength", -1))
        if length != end - start or (got and not got.startswith(f"bytes {start}-{end - 1}/")):
            r["Body"].close()
            raise RemoteError(
                f"{url}: truncated: asked for bytes {start}-{end - 1}, got {length} bytes ({got or 'no Content-Range'})"
            )
        return _S3Range(url, r["Body"], start, end, self.config.piece_bytes, self.config.stall_seconds)


class _EmptyBody:
    def read(self, n: int) -> bytes:
        return b""

    def close(self) -> None:
        pass
