"""Remote stores (sllm/io/remote.py) against real servers on loopback: a directory, an HTTP
server with Range support and fault injection, and moto's S3-compatible server.

Also the helpers the cache tests share (``from test_remote import ...``): a tiny valid sllm
checkpoint builder, the HTTP server, and the S3 server fixture.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import random
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sllm.core.format import INDEX_FILE, MANIFEST_FILE, Manifest, PartitionInfo, TensorEntry, index_json, manifest_json
from sllm.errors import RemoteError, UsageError
from sllm.io.remote import (
    REMOTES,
    DirectoryRemote,
    HttpRemote,
    RemoteConfig,
    S3Remote,
    get_remote_class,
    hash_file_chunks,
    open_remote,
)

KiB = 1024

# ---------------------------------------------------------------------------------------
# Helpers shared with the cache tests
# ---------------------------------------------------------------------------------------


def make_checkpoint(dst: Path, nbytes: int = 256 * KiB, *, chunk_bytes: int = 64 * KiB, seed: int = 0) -> Path:
    """A valid sllm checkpoint of one uint8 tensor of ``nbytes`` random bytes, plus a config."""
    assert nbytes % 4096 == 0
    dst.mkdir(parents=True)
    data = random.Random(seed).randbytes(nbytes)
    (dst / "partition-0.bin").write_bytes(data)
    chunks = tuple(hashlib.sha256(data[s : s + chunk_bytes]).hexdigest() for s in range(0, nbytes, chunk_bytes))
    (dst / "config.json").write_text('{"model_type": "fake"}\n')
    manifest = Manifest(
        model_id=dst.name, dtype="uint8", alignment=4096, chunk_bytes=chunk_bytes, total_bytes=nbytes,
        partitions=(PartitionInfo("partition-0.bin", nbytes, chunks),), files=("config.json",),
    )
    (dst / INDEX_FILE).write_bytes(index_json({"w": TensorEntry(0, 0, nbytes, (nbytes,), (1,), "uint8")}))
    (dst / MANIFEST_FILE).write_bytes(manifest_json(manifest))
    return dst


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RangeServer:
    """A static file server for ``root`` on 127.0.0.1 with HEAD, ``Range``, and faults.

    Args:
        piece_bytes: bytes per socket write.
        delay_seconds: sleep between pieces (a throttled remote).
        truncate_at: close the connection after sending this many body bytes of any
            response (the client sees a short body).
        on_piece: ``on_piece(path, end_offset)`` after each piece is sent (may block: a gate).

    Attributes:
        gets: request path -> number of GET requests.
    """

    def __init__(self, root: Path, *, piece_bytes: int = 64 * KiB, delay_seconds: float = 0.0,
                 truncate_at: int | None = None, on_piece: Callable[[str, int], None] | None = None) -> None:
        self.root = Path(root)
        self.piece_bytes = piece_bytes
        self.delay_seconds = delay_seconds
        self.truncate_at = truncate_at
        self.on_piece = on_piece
        self.gets: dict[str, int] = {}
        self._lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()  # headers and body go in separate writes: no Nagle delay
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
                path = (outer.root / rel).resolve()
                if not head:
                    with outer._lock:
                        outer.gets[rel] = outer.gets.get(rel, 0) + 1
                if outer.root.resolve() not in path.parents or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start, end = 0, size
                rng = self.headers.get("Range")
                if rng:
                    a, b = rng.removeprefix("bytes=").split("-")
                    start, end = int(a), min(int(b) + 1, size)
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if head:
                    return
                sent = 0
                with open(path, "rb") as f:
                    f.seek(start)
                    while start + sent < end:
                        piece = f.read(min(outer.piece_bytes, end - start - sent))
                        if outer.truncate_at is not None and sent + len(piece) > outer.truncate_at:
                            self.wfile.write(piece[: outer.truncate_at - sent])
                            self.wfile.flush()
                            self.close_connection = True
                            return
                        try:
                            self.wfile.write(piece)
                            self.wfile.flush()
                        except (BrokenPipeError, ConnectionResetError):
                            self.close_connection = True
                            return
                        sent += len(piece)
                        if outer.on_piece:
                            outer.on_piece(rel, start + sent)
                        if outer.delay_seconds:
                            threading.Event().wait(outer.delay_seconds)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RangeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server on a free loopback port; yields its endpoint URL.

    Sets fake AWS credentials in the environment for the session (moto accepts any).
    """
    pytest.importorskip("moto", reason="moto[server] is in the test extra")
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "SLLM_S3_ENDPOINT"):
            mp.delenv(k, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def upload_tree(endpoint: str, bucket: str, prefix: str, root: Path) -> None:
    """Create ``bucket`` (if missing) and upload every file under ``root`` to ``prefix/...``."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}".lstrip("/"))


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    make_checkpoint(root / "m", 64 * KiB, chunk_bytes=16 * KiB, seed=3)
    (root / "m" / "empty.txt").write_bytes(b"")
    return root


def _check_remote(remote, tree: Path) -> None:
    data = (tree / "m" / "partition-0.bin").read_bytes()
    assert remote.size("m/partition-0.bin") == len(data)
    assert remote.exists("m/sllm.json") and not remote.exists("m/nope.bin")
    out = bytearray(5000)
    remote.fetch_into("m/partition-0.bin", memoryview(out), offset=12345)
    assert bytes(out) == data[12345:17345]
    assert remote.read_bytes("m/config.json") == (tree / "m" / "config.json").read_bytes()
    assert remote.read_bytes("m/empty.txt") == b""
    with remote.open_range("m/partition-0.bin", 100, 40000) as stream:
        a, b = bytearray(10), bytearray(40000 - 110)
        stream.readinto(memoryview(a))
        stream.readinto(memoryview(b))
        assert bytes(a) + bytes(b) == data[100:40000]
        with pytest.raises(RemoteError, match="past the range end"):
            stream.readinto(memoryview(bytearray(1)))
    sink = io.BytesIO()
    assert remote.fetch_to_file("m/partition-0.bin", sink, chunk_bytes=7000) == len(data)
    assert sink.getvalue() == data
    with pytest.raises(RemoteError, match="expected 1") as err:
        remote.fetch_to_file("m/partition-0.bin", io.BytesIO(), nbytes=1)
    assert "m/partition-0.bin" in str(err.value)
    with pytest.raises(RemoteError, match="not found") as err:
        remote.size("m/missing.bin")
    assert "m/missing.bin" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RemoteError, match="truncated|not satisfiable"):
        remote.fetch_into("m/partition-0.bin", memoryview(bytearray(10)), offset=len(data) - 5)
    with pytest.raises(UsageError, match="relative path"):
        remote.size("../etc/passwd")


def test_directory_remote(tree):
    with open_remote(str(tree)) as remote:
        assert isinstance(remote, DirectoryRemote)
        _check_remote(remote, tree)
        assert remote.list("m")["partition-0.bin"] == 64 * KiB
    assert isinstance(open_remote(f"file://{tree}"), DirectoryRemote)
    with pytest.raises(RemoteError, match="not a directory"):
        open_remote(str(tree / "nope"))


def test_http_remote(tree):
    with RangeServer(tree, piece_bytes=4096) as server, open_remote(server.url + "/") as remote:
        assert isinstance(remote, HttpRemote)
        _check_remote(remote, tree)
        with pytest.raises(RemoteError, match="cannot list"):
            remote.list("m")
        assert remote.url_of("m/a b.bin").endswith("/m/a%20b.bin")


def test_http_truncated_body_is_an_error(tree):
    with RangeServer(tree, truncate_at=10000) as server, open_remote(server.url) as remote:
        with pytest.raises(RemoteError, match="truncated") as err:
            remote.fetch_into("m/partition-0.bin", memoryview(bytearray(30000)))
        assert err.value.__cause__ is not None and "partition-0.bin" in str(err.value)


def test_http_unreachable_host_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    with open_remote(url, RemoteConfig(timeout_seconds=5)) as remote:
        with pytest.raises(RemoteError, match="cannot connect") as err:
            remote.size("m/sllm.json")
    assert str(err.value).startswith(f"{url}/m/sllm.json: ") and "\n" not in str(err.value)


def test_s3_remote(tree, s3_server):
    upload_tree(s3_server, "models", "base/dir", tree)
    config = RemoteConfig(s3_endpoint_url=s3_server)
    with open_remote("s3://models/base/dir", config) as remote:
        assert isinstance(remote, S3Remote)
        _check_remote(remote, tree)
        assert remote.list("m") == {p.name: p.stat().st_size for p in sorted((tree / "m").iterdir())}
        assert remote.url_of("m/sllm.json") == "s3://models/base/dir/m/sllm.json"
    with open_remote("s3://no-such-bucket", config) as remote:
        with pytest.raises(RemoteError, match="not found"):
            remote.size("m/sllm.json")
    with open_remote("s3://models", RemoteConfig(s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
                                                 timeout_seconds=2)) as remote:
        with pytest.raises(RemoteError, match="cannot connect"):
            remote.size("m/sllm.json")


def test_registry_lists_schemes_on_error():
    assert get_remote_class("HTTPS") is HttpRemote and set(REMOTES) >= {"", "file", "http", "https", "s3"}
    with pytest.raises(UsageError) as err:
        open_remote("ftp://host/models")
    assert "'ftp'" in str(err.value) and "s3://" in str(err.value) and "http://" in str(err.value)


def test_remote_config_from_env():
    c = RemoteConfig.from_env({"AWS_ENDPOINT_URL": "http://a", "SLLM_REMOTE_TIMEOUT": "3"})
    assert c.s3_endpoint_url == "http://a" and c.timeout_seconds == 3.0
    assert RemoteConfig.from_env({"AWS_ENDPOINT_URL": "http://a", "SLLM_S3_ENDPOINT": "http://b"}).s3_endpoint_url == "http://b"
    with pytest.raises(UsageError, match="SLLM_REMOTE_TIMEOUT"):
        RemoteConfig.from_env({"SLLM_REMOTE_TIMEOUT": "soon"})


def test_hash_file_chunks(tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    seen = []
    digests = hash_file_chunks(tmp_path / "f", 10_000, 4096, threads=3, on_chunk=lambda i, s, e, d: seen.append((i, s, e)))
    assert digests == [hashlib.sha256(data[s : s + 4096]).hexdigest() for s in (0, 4096, 8192)]
    assert seen == [(0, 0, 4096), (1, 4096, 8192), (2, 8192, 10_000)]
    with pytest.raises(RemoteError, match="truncated"):
        hash_file_chunks(tmp_path / "f", 20_000, 4096)


def test_boto3_missing_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_boto3(name, *args, **kwargs):
        if name == "boto3" or name.startswith("botocore"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_boto3)
    with pytest.raises(RemoteError, match=r"need boto3.*pip install 'sllm\[s3\]'"):
        open_remote("s3://bucket/prefix")


def test_importing_remote_imports_no_network_library():
    import subprocess
    import sys

    code = ("import sys, sllm.io.remote, sllm.core.cache, sllm.commands.cache; "
            "print(sorted(m for m in ('torch', 'httpx', 'boto3', 'botocore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


