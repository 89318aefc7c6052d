"""Pipelined remote -> SSD -> DRAM load versus the same tier steps done one after another.

A program, not a test: it prints a table and one JSON line, and asserts nothing on time.

It builds a synthetic sllm checkpoint (one partition of random bytes, several chunks long),
serves it from a throttled HTTP server on loopback (or a directory with ``--remote DIR``), and
measures, each ``--repeat`` times (best kept):

- the tier steps, one after another: (1) download, remote -> memory; (2) write those bytes
  to an SSD file and fsync; (3) verify the SSD file's chunk sha256 digests; (4) SSD -> DRAM
  (page cache evicted, parallel reads into a pre-touched host buffer). Their sum is what a
  loader that does one tier at a time pays;
- ``download_streamed_to_ssd``: a plain downloader's remote -> SSD file (network and disk
  in turn, fsynced), for reference;
- ``pipelined``: ``TierCache.pull(model, dram=True)``: chunks go on to SSD and into the
  DRAM buffer, hashed, as they arrive (sllm/core/cache.py).

Usage::

    .venv/bin/python benchmarks/tier_pipeline.py --size-mib 128 --chunk-mib 8 --throttle-mbps 300
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from sllm.core.cache import CacheConfig, TierCache
from sllm.core.format import INDEX_FILE, MANIFEST_FILE, Manifest, PartitionInfo, TensorEntry, index_json, manifest_json
from sllm.io.reader import ParallelRead, evict_page_cache
from sllm.io.remote import hash_file_chunks, open_remote

MiB = 1024 * 1024


def make_model(dst: Path, nbytes: int, chunk_bytes: int) -> None:
    """A one-partition sllm checkpoint of ``nbytes`` random bytes (one uint8 tensor)."""
    dst.mkdir(parents=True)
    digests = []
    with open(dst / "partition-0.bin", "wb") as f:
        for start in range(0, nbytes, chunk_bytes):
            block = os.urandom(min(chunk_bytes, nbytes - start))
            f.write(block)
            digests.append(hashlib.sha256(block).hexdigest())
    (dst / "config.json").write_text('{"model_type": "synthetic"}\n')
    manifest = Manifest(
        model_id=dst.name, dtype="uint8", alignment=4096, chunk_bytes=chunk_bytes, total_bytes=nbytes,
        partitions=(PartitionInfo("partition-0.bin", nbytes, tuple(digests)),), files=("config.json",),
    )
    (dst / INDEX_FILE).write_bytes(index_json({"w": TensorEntry(0, 0, nbytes, (nbytes,), (1,), "uint8")}))
    (dst / MANIFEST_FILE).write_bytes(manifest_json(manifest))


class ThrottledServer:
    """Serve ``root`` over HTTP on 127.0.0.1 with Range support, at most ``bytes_per_second``
    per response (0: unthrottled)."""

    def __init__(self, root: Path, bytes_per_second: float) -> None:
        outer_root, rate = root, bytes_per_second

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()  # headers and body go in separate writes: no Nagle delay
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_HEAD(self) -> None:
                self.serve(head=True)

            def do_GET(self) -> None:
                self.serve(head=False)

            def serve(self, head: bool) -> None:
                path = outer_root / urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start, end = 0, size
                if rng := self.headers.get("Range"):
                    a, b = rng.removeprefix("bytes=").split("-")
                    start, end = int(a), min(int(b) + 1, size)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if head:
                    return
                began, sent = time.perf_counter(), 0
                with open(path, "rb") as f:
                    f.seek(start)
                    while sent < end - start:
                        piece = f.read(min(1 * MiB, end - start - sent))
                        self.wfile.write(piece)
                        sent += len(piece)
                        if rate:
                            ahead = sent / rate - (time.perf_counter() - began)
                            if ahead > 0:
                                time.sleep(ahead)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_forever(root: str, rate: float) -> None:
    """``--serve``: run the throttled server in this process and print its URL (the parent
    benchmark runs it in a child process, as a remote is another machine: it must not
    compete with the pull for the interpreter lock)."""
    server = ThrottledServer(Path(root), rate)
    print(server.url, flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    server.close()


class ChildServer:
    """:class:`ThrottledServer` in a child process."""

    def __init__(self, root: Path, rate: float) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root), "--rate", str(rate)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_once(url: str, work: Path, nbytes: int, chunk_bytes: int, threads: int) -> dict[str, float]:
    from sllm.core.pool import HostMemoryPool

    model, part = "model", "model/partition-0.bin"
    pool = HostMemoryPool()
    host = pool.acquire(nbytes)  # touched once, outside the timings, as a server's pool is
    figures = {}
    with open_remote(url) as remote:
        staging = memoryview(bytearray(nbytes))

        def download() -> None:
            with remote.open_range(part, 0, nbytes) as stream:
                for start in range(0, nbytes, chunk_bytes):
                    stream.readinto(staging[start : min(start + chunk_bytes, nbytes)])

        ssd_file = work / "sequential.bin"

        def write_ssd() -> None:
            with open(ssd_file, "wb") as f:
                f.write(staging)
                f.flush()
                os.fsync(f.fileno())

        def read_ssd() -> None:
            for _ in ParallelRead(ssd_file, host.memoryview(nbytes), chunk_bytes=chunk_bytes, threads=threads):
                pass

        def streamed_to_ssd() -> None:  # what a plain downloader does: network and disk in turn
            with open(ssd_file, "wb") as f:
                remote.fetch_to_file(part, f, nbytes=nbytes, chunk_bytes=chunk_bytes)
                f.flush()
                os.fsync(f.fileno())

        figures["step1_download"] = timed(download)
        figures["step2_write_ssd"] = timed(write_ssd)
        figures["step3_verify"] = timed(lambda: hash_file_chunks(ssd_file, nbytes, chunk_bytes, threads=threads))
        evict_page_cache(ssd_file)
        figures["step4_ssd_to_dram"] = timed(read_ssd)
        ssd_file.unlink()
        figures["download_streamed_to_ssd"] = timed(streamed_to_ssd)
        ssd_file.unlink()
        staging.release()
    pool.release(host)
    steps = [k for k in figures if k.startswith("step")]
    figures["sequential_sum"] = sum(figures[k] for k in steps)

    cache_dir = work / "cache"
    cache = TierCache(CacheConfig(cache_dir, dram_capacity_bytes=nbytes + 64 * MiB, remote_url=url,
                                  read_threads=threads), pool=pool)
    started = time.perf_counter()
    cache.acquire(model).release()
    figures["pipelined"] = time.perf_counter() - started
    cache.close()
    shutil.rmtree(cache_dir)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=128, help="model size, MiB (default 128)")
    ap.add_argument("--chunk-mib", type=int, default=8, help="checksummed chunk size, MiB (default 8)")
    ap.add_argument("--throttle-mbps", type=float, default=300.0,
                    help="HTTP server rate, MB/s (10^6 B/s); 0 for unthrottled (default 300)")
    ap.add_argument("--remote", help="use this directory as the remote instead of HTTP (it is created)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the best of each figure is kept")
    ap.add_argument("--threads", type=int, default=4, help="reader/hash threads")
    ap.add_argument("--workdir", help="where the cache and files go (default: a temporary directory)")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_forever(args.serve, args.rate)
        return 0

    nbytes, chunk = args.size_mib * MiB, args.chunk_mib * MiB
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sllm-tier-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    remote_root = Path(args.remote) if args.remote else work / "remote"
    if not (remote_root / "model" / MANIFEST_FILE).exists():
        make_model(remote_root / "model", nbytes, chunk)
    server = None if args.remote else ChildServer(remote_root, args.throttle_mbps * 1e6)
    url = str(remote_root) if server is None else server.url
    try:
        runs = [run_once(url, work, nbytes, chunk, args.threads) for _ in range(args.repeat)]
    finally:
        if server:
            server.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    slowest = max(v for k, v in best.items() if k.startswith("step"))
    where = "directory" if server is None else (
        f"HTTP at {args.throttle_mbps:g} MB/s" if args.throttle_mbps else "HTTP, unthrottled")
    print(f"model {nbytes / 1e6:.0f} MB in {nbytes // chunk} chunks of {chunk / 1e6:.1f} MB; remote {where}; "
          f"best of {args.repeat}")
    print(f"{'step':<24}{'seconds':>10}{'GB/s':>10}")
    for key, value in best.items():
        print(f"{key:<24}{value:>10.3f}{nbytes / value / 1e9:>10.3f}")
    print(f"pipelined / slowest step = {best['pipelined'] / slowest:.2f}; "
          f"pipelined / sequential sum = {best['pipelined'] / best['sequential_sum']:.2f}")
    record = {
        "benchmark": "tier_pipeline", "nbytes": nbytes, "chunk_bytes": chunk, "chunks": nbytes // chunk,
        "remote": "directory" if server is None else "http", "throttle_mbps": None if server is None else args.throttle_mbps,
        "repeat": args.repeat, **{f"{k}_seconds": round(v, 4) for k, v in best.items()},
        "slowest_step_seconds": round(slowest, 4),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
