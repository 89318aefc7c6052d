"""The tier cache (sllm/core/cache/): pulls through a directory, HTTP and S3 remote into the
SSD and DRAM tiers (bit-exact loads), the chunk pipeline, LRU eviction, pins, leases, crash
leftovers, and bad remote input. Real servers on loopback; tiny models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_remote import (
    KiB,
    RangeServer,
    free_port,
    make_checkpoint,
    s3_server,  # noqa: F401 - a fixture
    upload_tree,
)

from sllm.core.cache import CacheConfig, TierCache, entry_name
from sllm.core.format import INDEX_FILE, MANIFEST_FILE
from sllm.errors import CacheError, CheckpointError, ChecksumMismatch, RemoteError, TruncatedPartition, UsageError
from sllm.io.atomic import TMP_PREFIX
from sllm.io.remote import RemoteConfig

ENTRY = 256 * KiB  # partition bytes of each fake model


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Path:
    """A directory remote with fake models a, b, c (256 KiB each, 64 KiB chunks)."""
    root = tmp_path_factory.mktemp("fakes")
    for seed, name in enumerate("abc"):
        make_checkpoint(root / name, ENTRY, seed=seed)
    return root


@pytest.fixture(scope="module")
def gpt2_remote(tiny_hf_gpt2, tmp_path_factory) -> Path:
    """A directory remote with the tiny GPT-2 converted with 64 KiB chunks (~200 chunks)."""
    from sllm.core.convert import convert

    root = tmp_path_factory.mktemp("gpt2-remote")
    convert(tiny_hf_gpt2, root / "gpt2", chunk_bytes=64 * KiB)
    return root


def entry_bytes(remote_root: Path, model: str) -> int:
    return sum(p.stat().st_size for p in (remote_root / model).iterdir())


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / "models").iterdir())


def source_tensors(hf_dir: Path):
    from safetensors.torch import load_file

    return load_file(hf_dir / "model.safetensors")


def assert_bit_exact(state_dict, reference) -> None:
    import torch

    assert set(reference) <= set(state_dict)
    for name, t in reference.items():
        assert state_dict[name].dtype == t.dtype and torch.equal(state_dict[name], t), name


# ---------------------------------------------------------------------------------------
# Pull through each remote, then load bit-exact
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dir", "http", "s3"])
def test_pull_into_ssd_then_load_bit_exact(kind, gpt2_remote, tiny_hf_gpt2, tmp_path, request):
    from sllm.core.loader import load_state_dict, release

    with RangeServer(gpt2_remote, piece_bytes=256 * KiB) as server:
        if kind == "dir":
            url, rc = str(gpt2_remote), RemoteConfig()
        elif kind == "http":
            url, rc = server.url, RemoteConfig()
        else:
            endpoint = request.getfixturevalue("s3_server")
            upload_tree(endpoint, "sllm", "models", gpt2_remote)
            url, rc = "s3://sllm/models", RemoteConfig(s3_endpoint_url=endpoint)
        cache = TierCache(CacheConfig(tmp_path / "cache", remote_url=url, remote=rc))
        assert cache.locate("gpt2").tiers == ("remote",)
        progress = []
        result = cache.pull("gpt2", on_progress=lambda done, total: progress.append((done, total)))
        cache.close()
    assert result.source == "remote" and result.tiers == ("ssd",)
    assert result.nbytes == result.fetched_bytes == entry_bytes(gpt2_remote, "gpt2")
    assert progress[-1] == (result.nbytes, result.nbytes) and len(progress) > 100  # one per chunk at least
    path = Path(result.path)
    assert path == tmp_path / "cache" / "models" / "gpt2"
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in (gpt2_remote / "gpt2").iterdir())
    sd = load_state_dict(path, verify=True)
    assert_bit_exact(sd, source_tensors(tiny_hf_gpt2))
    release(sd)
    assert cache.verify("gpt2").chunks == len(json.loads((path / MANIFEST_FILE).read_text())["partitions"][0]["chunks"])
    [row] = cache.ls()
    assert (row.model, row.tier, row.state, row.nbytes, row.pinned) == ("gpt2", "ssd", "whole", result.nbytes, False)
    again = cache.pull("gpt2")  # a hit: nothing downloaded, the remote is not even needed
    assert (again.source, again.fetched_bytes) == ("ssd", 0)
    [ssd] = cache.stats()
    assert (ssd.hits, ssd.misses, ssd.entries, ssd.used_bytes) == (1, 1, 1, result.nbytes)


def test_dram_pull_is_filled_by_the_pipeline_and_loads_bit_exact(gpt2_remote, tiny_hf_gpt2, tmp_path):
    from sllm.core.loader import tensor_views

    with RangeServer(gpt2_remote) as server:
        cache = TierCache(CacheConfig(tmp_path / "c", dram_capacity_bytes=64 << 20, remote_url=server.url))
        with cache.acquire("gpt2") as lease:
            sd = tensor_views(lease.partition_tensors(), lease.tensors)
            assert_bit_exact(sd, source_tensors(tiny_hf_gpt2))
            assert lease.config()["model_type"] == "gpt2"
            assert cache.locate("gpt2", check_remote=False).tiers == ("dram", "ssd")
            assert [r.in_use for r in cache.ls() if r.tier == "dram"] == [True]
        assert server.gets["gpt2/partition-0.bin"] == 1  # SSD and DRAM filled from one download
    assert cache.verify("gpt2").tiers == ("dram", "ssd")
    assert cache.pull("gpt2", dram=True).source == "dram"
    cache.evict("gpt2", "dram")
    with cache.acquire("gpt2") as lease:  # refilled from the SSD tier now
        assert_bit_exact(tensor_views(lease.partition_tensors(), lease.tensors), source_tensors(tiny_hf_gpt2))
    dram, ssd = cache.stats()
    assert (dram.hits, dram.misses, ssd.hits, ssd.misses) == (1, 2, 1, 1)


def test_chunks_reach_ssd_and_dram_while_later_chunks_are_still_downloading(fakes, tmp_path):
    """The server withholds the last piece until the client has written chunk 0: a pull that
    waited for the whole download before writing would never see the gate open (it would
    time out and the assertions below would fail)."""
    gate = threading.Event()
    source = (fakes / "a" / "partition-0.bin").read_bytes()
    piece = 16 * KiB

    opened = []

    def hold_last_piece(path: str, end: int) -> None:
        if path == "a/partition-0.bin" and end == ENTRY - piece:
            opened.append(gate.wait(timeout=30))

    seen = {}
    with RangeServer(fakes, piece_bytes=piece, on_piece=hold_last_piece) as server:
        cache = TierCache(CacheConfig(tmp_path / "c", dram_capacity_bytes=16 << 20, remote_url=server.url))
        side = (fakes / "a" / "config.json").stat().st_size

        def on_progress(done: int, total: int) -> None:
            if done >= side + 64 * KiB and not gate.is_set():
                [tmp] = [p for p in (tmp_path / "c" / "models").iterdir() if p.name.startswith(TMP_PREFIX)]
                seen["ssd_chunk0"] = (tmp / "partition-0.bin").read_bytes()[: 64 * KiB]
                seen["listed"] = [(r.model, r.tier, r.state) for r in cache.ls()]
                gate.set()

        with cache.acquire("a", on_progress=on_progress) as lease:
            assert bytes(lease.views()[0]) == source
    assert opened == [True]  # the client wrote chunk 0 before the last piece was sent
    assert seen["ssd_chunk0"] == source[: 64 * KiB]
    assert ("a", "dram", "loading") in seen["listed"] and ("a", "ssd", "pulling") in seen["listed"]
    assert ("a", "ssd", "whole") not in seen["listed"]


def test_threads_pulling_one_model_download_it_once(fakes, tmp_path):
    with RangeServer(fakes, piece_bytes=16 * KiB, delay_seconds=0.002) as server:
        cache = TierCache(CacheConfig(tmp_path / "c", remote_url=server.url))
        results, errors = [], []

        def pull() -> None:
            try:
                results.append(cache.pull("a").source)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=pull) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and sorted(results) == ["remote", "ssd", "ssd"]
    assert server.gets["a/partition-0.bin"] == 1
    cache.verify("a")


# ---------------------------------------------------------------------------------------
# LRU, pins, leases
# ---------------------------------------------------------------------------------------


def test_lru_eviction_under_ssd_capacity(fakes, tmp_path):
    one = entry_bytes(fakes, "a")
    cache = TierCache(CacheConfig(tmp_path / "c", ssd_capacity_bytes=2 * one + one // 2, remote_url=str(fakes)))
    assert cache.pull("a").evicted == () and cache.pull("b").evicted == ()
    assert cache.pull("a").source == "ssd"  # a is now more recently used than b
    result = cache.pull("c")
    assert result.evicted == ("ssd:b",)
    assert [r.model for r in cache.ls()] == ["a", "c"]
    [ssd] = cache.stats()
    assert ssd.used_bytes <= ssd.capacity_bytes and ssd.evictions == 1
    assert not (tmp_path / "c" / "models" / "b").exists() and leftovers(tmp_path / "c") == ["a", "c"]


def test_pinned_models_are_not_evicted(fakes, tmp_path):
    one = entry_bytes(fakes, "a")
    cache = TierCache(CacheConfig(tmp_path / "c", ssd_capacity_bytes=2 * one + one // 2, remote_url=str(fakes)))
    cache.pull("a")
    cache.pull("b")
    assert cache.pin("a") == ("ssd",)
    assert cache.pull("c").evicted == ("ssd:b",)  # b is more recent than a but a is pinned
    cache.pin("c")
    with pytest.raises(CacheError, match="unpinned, unused") as err:
        cache.pull("b")
    assert "raise --ssd-capacity" in err.value.hint
    with pytest.raises(CacheError, match="pinned"):
        cache.evict("a")
    assert [r.model for r in cache.ls() if r.pinned] == ["a", "c"]
    cache.unpin("a")
    assert cache.pull("b").evicted == ("ssd:a",)
    with pytest.raises(CacheError, match="not cached"):
        cache.pin("a")


def test_model_in_use_on_ssd_is_never_evicted(fakes, tmp_path):
    from sllm.core.loader import load_state_dict

    one = entry_bytes(fakes, "a")
    cache = TierCache(CacheConfig(tmp_path / "c", ssd_capacity_bytes=one + one // 2, remote_url=str(fakes)))
    with cache.ssd_lease("a", pull=True) as path:
        sd = load_state_dict(path)  # being loaded: the lease is held
        with pytest.raises(CacheError, match="in use"):
            cache.evict("a")
        with pytest.raises(CacheError, match="unused models to evict"):
            cache.pull("b")
        assert [(r.model, r.in_use) for r in cache.ls()] == [("a", True)]
        assert bytes(sd["w"].numpy()) == (fakes / "a" / "partition-0.bin").read_bytes()
    assert cache.pull("b").evicted == ("ssd:a",)
    with pytest.raises(CacheError, match="not in the SSD tier") as err:
        with cache.ssd_lease("a"):
            pass
    assert "sllm cache pull a" in err.value.hint


def test_a_lease_held_by_another_process_blocks_eviction(fakes, tmp_path):
    cache = TierCache(CacheConfig(tmp_path / "c", remote_url=str(fakes)))
    cache.pull("a")
    code = ("import sys; from pathlib import Path; from sllm.core.cache import CacheConfig, TierCache\n"
            f"c = TierCache(CacheConfig(Path({str(tmp_path / 'c')!r})))\n"
            "with c.ssd_lease('a'):\n    print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(CacheError, match="in use"):
            cache.evict("a")
        assert [r.in_use for r in cache.ls()] == [True]
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert cache.evict("a").tiers == ("ssd",)


def test_dram_tier_lru_pins_and_leases(fakes, tmp_path):
    cache = TierCache(CacheConfig(tmp_path / "c", dram_capacity_bytes=4 << 20, remote_url=str(fakes)))
    # each fake needs one 2 MiB buffer: two fit
    lease_a = cache.acquire("a")
    cache.pull("b", dram=True)
    cache.pin("b", "dram")
    with pytest.raises(CacheError, match="pinned or in use"):
        cache.pull("c", dram=True)  # a is leased, b is pinned
    with pytest.raises(CacheError, match="in use"):
        cache.evict("a", "dram")
    lease_a.release()
    lease_a.release()  # idempotent
    with pytest.raises(CacheError, match="after release"):
        lease_a.views()
    result = cache.pull("c", dram=True)
    assert result.evicted == ("dram:a",) and result.source == "remote"
    assert [(r.model, r.tier) for r in cache.ls()][:2] == [("b", "dram"), ("c", "dram")]
    dram = cache.stats()[0]
    assert (dram.entries, dram.pinned, dram.evictions, dram.used_bytes) == (2, 1, 1, 4 << 20)


def test_a_model_being_loaded_into_dram_is_never_evicted(fakes, tmp_path):
    gate = threading.Event()

    opened = []

    def hold(path: str, end: int) -> None:
        if path == "a/partition-0.bin" and end == ENTRY - 16 * KiB:
            opened.append(gate.wait(timeout=30))

    seen = {}
    with RangeServer(fakes, piece_bytes=16 * KiB, on_piece=hold) as server:
        cache = TierCache(CacheConfig(tmp_path / "c", dram_capacity_bytes=2 << 20, remote_url=server.url))

        def on_progress(done: int, total: int) -> None:
            if not gate.is_set() and done > 64 * KiB:
                for attempt in ("pull", "evict"):
                    try:
                        cache.pull("b", dram=True) if attempt == "pull" else cache.evict("a", "dram")
                    except CacheError as exc:
                        seen[attempt] = str(exc)
                gate.set()

        with cache.acquire("a", on_progress=on_progress) as lease:
            assert bytes(lease.views()[0]) == (fakes / "a" / "partition-0.bin").read_bytes()
    assert opened == [True]
    assert "b: needs" in seen["pull"] and "in use" in seen["pull"]
    assert "not cached in the dram tier" in seen["evict"]  # not whole yet: not an entry
    assert cache.locate("a", check_remote=False).tiers == ("dram", "ssd")


def test_a_model_larger_than_the_tier_is_refused(fakes, tmp_path):
    cache = TierCache(CacheConfig(tmp_path / "c", ssd_capacity_bytes=100 * KiB, remote_url=str(fakes)))
    with pytest.raises(CacheError, match="more than the SSD tier's capacity"):
        cache.pull("a")
    assert leftovers(tmp_path / "c") == [] and cache.stats()[0].reserved_bytes == 0


# ---------------------------------------------------------------------------------------
# State across restarts and crashes
# ---------------------------------------------------------------------------------------


def test_state_survives_restart_and_reconciles_with_the_directory(fakes, tmp_path):
    cache_dir = tmp_path / "c"
    one = entry_bytes(fakes, "a")
    cache = TierCache(CacheConfig(cache_dir, ssd_capacity_bytes=3 * one, remote_url=str(fakes)))
    cache.pull("a")
    cache.pin("a")
    # a process killed after renaming its download into place but before recording it
    shutil.copytree(fakes / "b", cache_dir / "models" / "b")
    # and one killed mid-download: its temporary carries its (dead) pid
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache_dir / "models" / f"{TMP_PREFIX}c-{int(dead.stdout)}-deadbeef"
    shutil.copytree(fakes / "c", stale)
    (stale / "partition-0.bin").write_bytes(b"\0" * 4096)
    again = TierCache(CacheConfig(cache_dir))  # no capacity given: the recorded one holds
    assert not stale.exists()
    rows = {r.model: r for r in again.ls()}
    assert set(rows) == {"a", "b"} and rows["a"].pinned and not rows["b"].pinned
    assert again.stats()[0].capacity_bytes == 3 * one and again.stats()[0].misses == 1
    again.verify("b")
    shutil.rmtree(cache_dir / "models" / "b")  # removed behind the cache's back
    assert [r.model for r in again.ls()] == ["a"]


def test_verify_names_the_corrupt_file_and_chunk(fakes, tmp_path):
    cache = TierCache(CacheConfig(tmp_path / "c", remote_url=str(fakes)))
    path = Path(cache.pull("a").path)
    with open(path / "partition-0.bin", "r+b") as f:
        f.seek(3 * 64 * KiB + 7)
        f.write(b"\xff")
    with pytest.raises(ChecksumMismatch, match=r"partition-0.bin: chunk 3 \(bytes 196608-262144\)") as err:
        cache.verify("a")
    assert "sllm cache evict a" in err.value.hint
    with open(path / "partition-0.bin", "r+b") as f:
        f.truncate(ENTRY - 4096)
    with pytest.raises(TruncatedPartition):
        cache.verify("a")
    cache.evict("a")
    assert cache.pull("a").source == "remote" and cache.verify("a").nbytes == ENTRY


# ---------------------------------------------------------------------------------------
# Bad remote input
# ---------------------------------------------------------------------------------------


def _bad_remote(kind: str, fakes: Path, tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "remote"
    shutil.copytree(fakes, root)
    server = {}
    if kind == "checksum":
        with open(root / "a" / "partition-0.bin", "r+b") as f:
            f.seek(100_000)
            f.write(b"\x00\x01")
    elif kind == "size":
        with open(root / "a" / "partition-0.bin", "ab") as f:
            f.write(b"\0" * 4096)
    elif kind == "truncated":
        server = {"truncate_at": 100_000}
    elif kind == "manifest":
        (root / "a" / MANIFEST_FILE).write_text("{not json")
    elif kind == "index":
        (root / "a" / INDEX_FILE).write_text('{"format_version": 1, "tensors": {"../x": {}}}')
    return root, server


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("missing", RemoteError, r"/a/sllm\.json: not found \(HTTP 404\)"),
        ("checksum", RemoteError, r"/a/partition-0\.bin: chunk 1 \(bytes 65536-131072\) fails its sha256 checksum"),
        ("size", RemoteError, r"/a/partition-0\.bin: 266240 bytes on the remote, the manifest records 262144"),
        ("truncated", RemoteError, r"/a/partition-0\.bin: truncated"),
        ("manifest", CheckpointError, r"/a/sllm\.json: cannot parse JSON"),
        ("index", CheckpointError, r"/a/tensor_index\.json: tensor name '\.\./x'"),
        ("unreachable", RemoteError, r"cannot connect, host unreachable"),
    ],
)
def test_bad_remote_input_leaves_nothing_that_looks_whole(kind, error, message, fakes, tmp_path):
    root, server_options = _bad_remote(kind, fakes, tmp_path)
    if kind == "missing":
        shutil.rmtree(root / "a")
    with RangeServer(root, piece_bytes=16 * KiB, **server_options) as server:
        url = f"http://127.0.0.1:{free_port()}" if kind == "unreachable" else server.url
        cache = TierCache(CacheConfig(tmp_path / "c", dram_capacity_bytes=8 << 20, remote_url=url,
                                      remote=RemoteConfig(timeout_seconds=5)))
        with pytest.raises(error, match=message) as err:
            cache.pull("a", dram=True)
    assert "\n" not in str(err.value)
    assert cache.ls() == [] and leftovers(tmp_path / "c") == []
    assert cache.locate("a", check_remote=False).tiers == ()
    dram, ssd = cache.stats()
    assert dram.reserved_bytes == ssd.reserved_bytes == 0 and dram.used_bytes == 0


def test_no_remote_configured(tmp_path):
    cache = TierCache(CacheConfig(tmp_path / "c"))
    with pytest.raises(CacheError, match="no remote") as err:
        cache.pull("a")
    assert "--remote" in err.value.hint
    with pytest.raises(CacheError, match="DRAM tier is disabled"):
        cache.acquire("a")


@pytest.mark.parametrize("name", ["../x", "a--b", ".hidden", "a//b", "", "a/../b", "a b"])
def test_unsafe_model_names_are_refused(name, tmp_path):
    cache = TierCache(CacheConfig(tmp_path / "c", remote_url=str(tmp_path)))
    with pytest.raises(UsageError, match="model name"):
        cache.pull(name)


def test_entry_names():
    assert entry_name("gpt2") == "gpt2" and entry_name("org/Model-1.5B_x") == "org--Model-1.5B_x"


def test_cache_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CacheError, match="cannot create the cache directory"):
        TierCache(CacheConfig(tmp_path / "file" / "c"))




def test_pieces_smaller_than_chunks_still_check_whole_chunks(fakes, tmp_path):
    root, _ = _bad_remote("checksum", fakes, tmp_path)
    config = dict(piece_bytes=12 * KiB, queue_pieces=2)  # 12 KiB does not divide a 64 KiB chunk
    cache = TierCache(CacheConfig(tmp_path / "c", remote_url=str(root), dram_capacity_bytes=8 << 20, **config))
    with pytest.raises(RemoteError, match=r"chunk 1 \(bytes 65536-131072\) fails its sha256"):
        cache.pull("a")
    progress = []
    result = cache.pull("b", dram=True, on_progress=lambda done, total: progress.append(done))
    assert result.source == "remote" and cache.verify("b").tiers == ("dram", "ssd")
    assert len(progress) > ENTRY // (64 * KiB)  # reported per piece, not per chunk
    assert leftovers(tmp_path / "c") == ["b"]


@pytest.mark.cuda
def test_dram_tier_buffers_are_pinned_and_copy_to_the_device_bit_exact(gpt2_remote, tiny_hf_gpt2, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sllm.core.loader import tensor_views

    cache = TierCache(CacheConfig(tmp_path / "c", dram_capacity_bytes=64 << 20, remote_url=str(gpt2_remote)))
    with cache.acquire("gpt2") as lease:
        assert lease.pinned_memory
        device = [t.to("cuda", non_blocking=True) for t in lease.partition_tensors()]
        torch.cuda.synchronize()
    sd = tensor_views(device, lease.tensors)
    ref = source_tensors(tiny_hf_gpt2)
    assert all(torch.equal(sd[k].cpu(), v) for k, v in ref.items())
