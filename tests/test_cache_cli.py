"""``sllm cache``: output and exit codes (Typer's CliRunner), and real ``sllm cache pull``
processes: kill -9 at random points, two at once, and bad remotes (one line on stderr)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_remote import (
    S3_ENV,
    KiB,
    RangeServer,
    free_port,
    make_checkpoint,
    s3_server,  # noqa: F401 - a fixture, used through request.getfixturevalue
    upload_tree,
)
from typer.testing import CliRunner

from sllm.cli import app
from sllm.commands._options import parse_bytes
from sllm.commands.cache import human_bytes
from sllm.core.cache import CacheConfig, TierCache
from sllm.errors import UsageError
from sllm.io.atomic import TMP_PREFIX

runner = CliRunner()


@pytest.fixture(scope="module")
def remote_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-remote")
    make_checkpoint(root / "a", 256 * KiB, seed=1)
    make_checkpoint(root / "b", 256 * KiB, seed=2)
    make_checkpoint(root / "big", 1024 * KiB, seed=3)  # 16 chunks, for the kill test
    return root


def cli(*args: str):
    result = runner.invoke(app, ["cache", *args])
    return result


def sllm_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
    env.update(extra)
    return env


def sllm(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sllm", "cache", *args], capture_output=True, text=True,
                          env=sllm_env(**extra_env), timeout=120)


def test_pull_ls_pin_evict_verify_stats_json(remote_root, tmp_path):
    d = ["--cache-dir", str(tmp_path / "c")]
    r = cli("pull", "a", *d, "--remote", str(remote_root), "--json", "--ssd-capacity", "1MiB")
    assert r.exit_code == 0, r.stderr
    pulled = json.loads(r.stdout)  # exactly one document
    assert (pulled["model"], pulled["source"], pulled["tiers"]) == ("a", "remote", ["ssd"])
    assert pulled["nbytes"] == pulled["fetched_bytes"] > 256 * KiB
    ls = json.loads(cli("ls", *d, "--json").stdout)
    assert [(m["model"], m["tier"], m["state"], m["pinned"]) for m in ls["models"]] == [("a", "ssd", "whole", False)]
    assert json.loads(cli("pin", "a", *d, "--json").stdout) == {"model": "a", "tiers": ["ssd"], "pinned": True}
    r = cli("evict", "a", *d)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.splitlines() == ["sllm: error: a: pinned in the SSD tier", "hint: run `sllm cache unpin a` first"]
    assert cli("unpin", "a", *d).stdout.strip() == "a: unpinned in ssd"
    v = json.loads(cli("verify", "a", *d, "--json").stdout)
    assert v["ok"] is True and v["chunks"] == 4 and v["nbytes"] == 256 * KiB
    [ssd] = json.loads(cli("stats", *d, "--json").stdout)["tiers"]
    assert (ssd["tier"], ssd["capacity_bytes"], ssd["entries"], ssd["misses"], ssd["hit_rate"]) == (
        "ssd", 1024 * KiB, 1, 1, 0.0)
    ev = json.loads(cli("evict", "a", *d, "--json").stdout)
    assert ev["tiers"] == ["ssd"] and ev["freed_bytes"] == pulled["nbytes"]
    assert json.loads(cli("ls", *d, "--json").stdout)["models"] == []


def test_tables_and_env_defaults(remote_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SLLM_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("SLLM_REMOTE", str(remote_root))
    r = cli("pull", "b", "--quiet")
    assert r.exit_code == 0 and "b" in r.stdout and "remote" in r.stdout and r.stderr == ""
    assert (tmp_path / "c" / "models" / "b").is_dir()
    r = cli("ls")
    assert r.exit_code == 0 and "whole" in r.stdout and "b" in r.stdout
    r = cli("stats")
    assert r.exit_code == 0 and "unlimited" in r.stdout and "0 of 1" in r.stdout
    assert cli("verify", "b").stdout.startswith("b: ok (4 chunks")


def test_verify_failure_exits_2_with_the_chunk(remote_root, tmp_path):
    d = ["--cache-dir", str(tmp_path / "c")]
    assert cli("pull", "a", *d, "--remote", str(remote_root), "-q").exit_code == 0
    with open(tmp_path / "c" / "models" / "a" / "partition-0.bin", "r+b") as f:
        f.write(b"corrupt")
    r = cli("verify", "a", *d)
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.splitlines()[0].startswith("sllm: error: ") and "partition-0.bin: chunk 0" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pull", "a", "--ssd-capacity", "10XB"], "--ssd-capacity '10XB': not a size"),
        (["evict", "a", "--tier", "dram"], "--tier dram: the DRAM tier lives in a running `sllm serve`; pass its "
         "address with --server URL"),
        (["pin", "a", "--tier", "device"], "--tier device: the device tier lives in a running `sllm serve`"),
        (["pin", "a", "--tier", "gpu"], "--tier 'gpu': choose device, dram, ssd"),
        (["pull", "../etc"], "model name '../etc'"),
        (["pull", "a"], "no remote is configured"),
        (["evict", "nope"], "nope: not cached in the ssd tier"),
    ],
)
def test_usage_errors(args, message, tmp_path):
    r = runner.invoke(app, ["cache", *args, "--cache-dir", str(tmp_path / "c")], env={"SLLM_REMOTE": None})
    assert r.exit_code in (1, 2) and r.stdout == ""
    assert r.stderr.splitlines()[0].startswith("sllm: error: ")
    assert message in r.stderr


def test_parse_and_show_bytes():
    assert parse_bytes("10GB", "--ssd-capacity") == 10**10 and parse_bytes("64GiB", "--ssd-capacity") == 64 * 2**30
    assert parse_bytes("1000", "--ssd-capacity") == 1000
    assert parse_bytes("1.5 MiB", "--ssd-capacity") == 1572864 and parse_bytes("2k", "--ssd-capacity") == 2000
    with pytest.raises(UsageError, match="--ssd-capacity '-1GB': not a size"):
        parse_bytes("-1GB", "--ssd-capacity")
    assert human_bytes(16_002_596) == "16.0 MB" and human_bytes(None) == "unlimited" and human_bytes(12) == "12 B"


# ---------------------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------------------


def _whole_entries_verify(cache_dir: Path) -> list[str]:
    """Open the cache as a new process would; every entry `ls` shows whole must verify."""
    cache = TierCache(CacheConfig(cache_dir))
    rows = cache.ls()
    assert all(r.state == "whole" for r in rows)  # pulls of killed processes are gone
    for r in rows:
        cache.verify(r.model)
    return [r.model for r in rows]


def test_kill_9_at_random_points_never_leaves_a_bad_whole_entry(remote_root, tmp_path):
    """20 pulls killed with SIGKILL: most after the (throttled) server has sent a random number
    of pieces of the partition, so kills land mid-download and around the final rename; a
    few after a random delay (start-up, metadata). After each: what `ls` shows whole
    verifies, nothing half is shown. Finally a pull completes."""
    rng = random.Random(1234)
    cache_dir = tmp_path / "c"
    pieces = 64  # 1 MiB in 16 KiB pieces
    target = {"n": 0, "sent": 0}
    reached = threading.Event()

    def count(path: str, end: int) -> None:
        if path == "big/partition-0.bin":
            target["sent"] += 1
            if target["sent"] >= target["n"]:
                reached.set()

    outcomes = {"whole": 0, "partial": 0, "nothing": 0}
    with RangeServer(remote_root, piece_bytes=16 * KiB, delay_seconds=0.004, on_piece=count) as server:
        cmd = [sys.executable, "-m", "sllm", "cache", "pull", "big", "--cache-dir", str(cache_dir),
               "--remote", server.url, "--quiet"]
        for i in range(20):
            target.update(n=rng.randint(1, pieces), sent=0)
            reached.clear()
            proc = subprocess.Popen(cmd, env=sllm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if i % 5 == 4:
                threading.Event().wait(rng.uniform(0.0, 0.8))
            else:
                while not reached.wait(0.01) and proc.poll() is None:
                    pass
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            temporaries = [p for p in (cache_dir / "models").iterdir() if p.name.startswith(TMP_PREFIX)] \
                if (cache_dir / "models").is_dir() else []
            models = _whole_entries_verify(cache_dir)
            outcomes["whole" if models else "partial" if temporaries else "nothing"] += 1
            if models:
                TierCache(CacheConfig(cache_dir)).evict("big")  # so the next kill lands mid-download again
        assert outcomes["partial"] >= 5, outcomes  # the kills did land mid-download
        done = subprocess.run([*cmd, "--json"], env=sllm_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"] == "remote"
    assert _whole_entries_verify(cache_dir) == ["big"]
    assert [p.name for p in (cache_dir / "models").iterdir()] == ["big"]  # no temporaries left


def test_two_pulls_at_once_end_with_one_correct_entry(remote_root, tmp_path):
    cache_dir = tmp_path / "c"
    with RangeServer(remote_root, piece_bytes=16 * KiB, delay_seconds=0.004) as server:
        cmd = [sys.executable, "-m", "sllm", "cache", "pull", "big", "--cache-dir", str(cache_dir),
               "--remote", server.url, "--json"]
        procs = [subprocess.Popen(cmd, env=sllm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    assert sorted(json.loads(o)["source"] for o, _ in outs) == ["remote", "ssd"]
    assert server.gets["big/partition-0.bin"] == 1
    assert _whole_entries_verify(cache_dir) == ["big"]
    assert sorted(p.name for p in (cache_dir / "models").iterdir()) == ["big"]


@pytest.mark.parametrize("kind", ["missing", "truncated", "checksum", "unreachable"])
def test_bad_remote_is_one_line_and_leaves_nothing(kind, remote_root, tmp_path):
    root = tmp_path / "remote"
    shutil.copytree(remote_root / "a", root / "a")
    if kind == "missing":
        shutil.rmtree(root / "a")
    if kind == "checksum":
        with open(root / "a" / "partition-0.bin", "r+b") as f:
            f.seek(200_000)
            f.write(b"!")
    with RangeServer(root, truncate_at=150_000 if kind == "truncated" else None) as server:
        url = f"http://127.0.0.1:{free_port()}" if kind == "unreachable" else server.url
        r = sllm("pull", "a", "--cache-dir", str(tmp_path / "c"), "--remote", url, SLLM_REMOTE_TIMEOUT="5")
    assert r.returncode == 1 and r.stdout == ""
    [line] = r.stderr.splitlines()
    expected = {"missing": "/a/sllm.json: not found (HTTP 404)", "truncated": "/a/partition-0.bin: truncated",
                "checksum": "/a/partition-0.bin: chunk 3 (bytes 196608-262144) fails its sha256 checksum",
                "unreachable": "cannot connect, host unreachable"}[kind]
    assert line.startswith(f"sllm: error: {url}/a/") and expected in line
    assert json.loads(sllm("ls", "--cache-dir", str(tmp_path / "c"), "--json").stdout)["models"] == []
    assert list((tmp_path / "c" / "models").iterdir()) == []


def test_pull_from_s3_through_the_environment(remote_root, tmp_path, request):
    endpoint = request.getfixturevalue("s3_server")
    upload_tree(endpoint, "cli-bucket", "zoo", remote_root)
    r = sllm("pull", "a", "--cache-dir", str(tmp_path / "c"), "--remote", "s3://cli-bucket/zoo", "--json",
             SLLM_S3_ENDPOINT=endpoint, **S3_ENV)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == "remote"
    assert _whole_entries_verify(tmp_path / "c") == ["a"]
    assert (tmp_path / "c" / "models" / "a" / "partition-0.bin").read_bytes() == \
        (remote_root / "a" / "partition-0.bin").read_bytes()
