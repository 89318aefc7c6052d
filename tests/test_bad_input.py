"""Bad input: one clear error naming the file and the problem, a non-zero exit, nothing written."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from sllm.core.convert import convert
from sllm.core.loader import load_state_dict
from sllm.errors import (
    ChecksumMismatch,
    MisalignedOffset,
    NotAModelDirectory,
    OffsetOutOfRange,
    OverlappingTensors,
    ShapeMismatch,
    TruncatedPartition,
    UnknownDtype,
    UnsafePickle,
    UnsafeTensorName,
)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SLLM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "sllm", *args], capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[0].startswith("sllm: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([ln for ln in lines if not ln.startswith("hint:")]) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert proc.stdout == ""


@pytest.fixture
def ckpt(tiny_sllm_gpt2, tmp_path):
    """A private copy of the converted tiny model that a test may damage."""
    return shutil.copytree(tiny_sllm_gpt2, tmp_path / "ckpt")


def edit_index(ckpt, fn):
    path = ckpt / "tensor_index.json"
    doc = json.loads(path.read_text())
    fn(doc["tensors"])
    path.write_text(json.dumps(doc))


def first(tensors):
    return tensors["transformer.h.0.attn.c_attn.weight"]


# -- convert -----------------------------------------------------------------------------


def test_convert_missing_dir(tmp_path):
    proc = run_cli("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert_one_line_error(proc, str(tmp_path / "nope"), "not a directory")
    assert not (tmp_path / "out").exists()


def test_convert_non_model_dir(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    proc = run_cli("convert", str(tmp_path / "src"), str(tmp_path / "out"))
    assert_one_line_error(proc, "no model.safetensors")
    assert not (tmp_path / "out").exists()


def test_convert_truncated_safetensors(tiny_hf_gpt2, tmp_path):
    src = shutil.copytree(tiny_hf_gpt2, tmp_path / "src")
    f = src / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    proc = run_cli("convert", str(src), str(tmp_path / "out"))
    assert_one_line_error(proc, "model.safetensors")
    assert list(tmp_path.iterdir()) == [src]  # no DST, no temporary


def test_convert_truncated_bin(tmp_path):
    from sllm.zoo import TINY_GPT2, build_random_checkpoint

    src = build_random_checkpoint("gpt2", tmp_path / "src", safe_serialization=False, **TINY_GPT2)
    f = src / "pytorch_model.bin"
    os.truncate(f, f.stat().st_size - 5000)
    proc = run_cli("convert", str(src), str(tmp_path / "out"))
    assert_one_line_error(proc, "pytorch_model.bin")
    assert not (tmp_path / "out").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sllm-pwned",))


def test_convert_refuses_pickled_callable(tiny_hf_gpt2, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(tiny_hf_gpt2 / "config.json", src / "config.json")
    torch.save({"weight": torch.zeros(2), "payload": _Exploit()}, src / "pytorch_model.bin")
    with pytest.raises(UnsafePickle):
        convert(src, tmp_path / "out")
    proc = run_cli("convert", str(src), str(tmp_path / "out"))
    assert_one_line_error(proc, "pytorch_model.bin", "refused to unpickle")
    assert not os.path.exists("/tmp/sllm-pwned")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_legacy_pickle_callable(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(UnsafePickle):
        convert(src, tmp_path / "out")
    assert not os.path.exists("/tmp/sllm-pwned")


def test_convert_tensor_name_with_separator(tiny_hf_gpt2, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    save_file({"../evil/weight": torch.zeros(4)}, src / "model.safetensors")
    with pytest.raises(UnsafeTensorName):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_dst_exists(tiny_hf_gpt2, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = run_cli("convert", str(tiny_hf_gpt2), str(tmp_path / "out"))
    assert_one_line_error(proc, "already exists", "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_convert_bad_dtype(tiny_hf_gpt2, tmp_path):
    proc = run_cli("convert", str(tiny_hf_gpt2), str(tmp_path / "out"), "--dtype", "int3")
    assert_one_line_error(proc, "--dtype", "int3")
    assert not (tmp_path / "out").exists()


def test_convert_interrupted_leaves_nothing(tiny_hf_gpt2, tmp_path):
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_hf_gpt2, tmp_path / "out", on_progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_killed_convert_temporary_is_swept_by_the_next_run(tmp_path):
    """kill -9 mid-conversion: the destination never appears, and the ``.sllm-tmp-*`` left
    (keyed by the dead pid) is removed by the next convert into the same parent; a live
    writer's temporary is kept, and a temporary's name is never a model's."""
    import time

    from sllm.core.format import is_temporary_name
    from sllm.zoo import build_random_checkpoint

    src = build_random_checkpoint("gpt2", tmp_path / "src", n_layer=12, n_embd=256, n_head=4)
    parent = tmp_path / "models"
    parent.mkdir()
    temps: list = []
    for _ in range(3):  # the kill must land while the temporary exists
        proc = subprocess.Popen(
            [sys.executable, "-m", "sllm", "convert", str(src), str(parent / "out"), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                temps = [p for p in parent.iterdir() if p.name.startswith(".sllm-tmp-out-")]
                if temps and any((t / "partition-0.bin").exists() for t in temps):
                    break  # writing partitions: mid-way
                time.sleep(0.002)
            proc.kill()
        finally:
            proc.wait(timeout=30)
        if proc.returncode != 0 and temps:
            break
        shutil.rmtree(parent / "out", ignore_errors=True)
    else:
        pytest.skip("every conversion finished before the kill landed")
    assert not (parent / "out").exists()
    (leftover,) = temps
    assert leftover.is_dir() and f"-{proc.pid}-" in leftover.name
    assert is_temporary_name(leftover.name) and not is_temporary_name("out")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = parent / f".sllm-tmp-other-{writer.pid}-abcdef12"
        live.mkdir()
        result = convert(src, parent / "second")
        assert result.swept == [leftover.name]
        assert sorted(p.name for p in parent.iterdir()) == [live.name, "second"]
    finally:
        writer.kill()
        writer.wait(timeout=30)


def test_convert_missing_weight_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    from sllm.zoo import TINY_GPT2, build_random_checkpoint

    src = build_random_checkpoint("gpt2", tmp_path / "src", **TINY_GPT2)
    sd = load_file(src / "model.safetensors")
    del sd["transformer.h.1.ln_2.bias"], sd["transformer.h.0.attn.c_proj.weight"]
    save_file(sd, src / "model.safetensors")
    proc = run_cli("convert", str(src), str(tmp_path / "out"))
    assert_one_line_error(
        proc, str(src), "2 weight(s) of GPT2LMHeadModel randomly initialised",
        "'transformer.h.0.attn.c_proj.weight', 'transformer.h.1.ln_2.bias'",
    )
    assert not (tmp_path / "out").exists()


# -- load ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "error", "fragment"),
    [
        (lambda t: first(t).update(offset=first(t)["offset"] + 4096 * 10**6), OffsetOutOfRange, "past the end"),
        (lambda t: first(t).update(nbytes=first(t)["nbytes"] + 4), ShapeMismatch, "nbytes"),
        (lambda t: first(t).update(dtype="float12"), UnknownDtype, "float12"),
        (lambda t: first(t).update(offset=first(t)["offset"] + 8), MisalignedOffset, "not a multiple"),
        (lambda t: t.update({"a/b": dict(first(t))}), UnsafeTensorName, "a/b"),
        (
            lambda t: t["transformer.h.0.attn.c_proj.weight"].update(offset=first(t)["offset"]),
            OverlappingTensors,
            "overlap",
        ),
    ],
    ids=["offset-past-end", "nbytes-mismatch", "unknown-dtype", "misaligned", "path-separator", "overlap"],
)
def test_load_rejects_bad_index(ckpt, damage, error, fragment):
    edit_index(ckpt, damage)
    with pytest.raises(error, match=fragment):
        load_state_dict(ckpt)
    proc = run_cli("load", str(ckpt))
    assert_one_line_error(proc, "tensor_index.json", fragment)


def test_load_truncated_partition(ckpt):
    part = ckpt / "partition-0.bin"
    os.truncate(part, part.stat().st_size - 4096)
    with pytest.raises(TruncatedPartition):
        load_state_dict(ckpt)
    assert_one_line_error(run_cli("load", str(ckpt)), "partition-0.bin", "bytes")


def test_load_not_a_checkpoint(tiny_hf_gpt2):
    with pytest.raises(NotAModelDirectory):
        load_state_dict(tiny_hf_gpt2)
    assert_one_line_error(run_cli("load", str(tiny_hf_gpt2)), "sllm.json is missing")


def test_load_corrupted_chunk_with_verify(ckpt):
    part = ckpt / "partition-0.bin"
    with open(part, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    load_state_dict(ckpt)  # without verify the bytes are taken as they are
    with pytest.raises(ChecksumMismatch, match="chunk 0"):
        load_state_dict(ckpt, verify=True)
    assert_one_line_error(run_cli("load", str(ckpt), "--verify"), "partition-0.bin", "checksum")


def test_bad_manifest_json(ckpt):
    (ckpt / "sllm.json").write_text("{not json")
    assert_one_line_error(run_cli("load", str(ckpt)), "sllm.json", "cannot parse")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.update(format_version=3), "format_version 3 is not supported"),
        (lambda m: m["key_mapping"].update(tensors={"a": {"sources": "x"}}), "key_mapping.tensors['a']"),
        (lambda m: m["key_mapping"].update(shared=["lm_head.weight"]), "key_mapping.shared must be an object"),
    ],
    ids=["future-version", "mapped-sources-not-a-list", "shared-not-an-object"],
)
def test_bad_key_mapping_or_version(ckpt, edit, fragment):
    from sllm.errors import ManifestError

    path = ckpt / "sllm.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=re.escape(fragment)):
        load_state_dict(ckpt)
    assert_one_line_error(run_cli("load", str(ckpt)), "sllm.json", fragment)


def test_zip_check_is_not_fooled(tmp_path):
    """A .bin that is a zip but not a torch archive is a clear error, not a crash."""
    src = tmp_path / "src"
    src.mkdir()
    with zipfile.ZipFile(src / "pytorch_model.bin", "w") as z:
        z.writestr("hello.txt", "hi")
    proc = run_cli("convert", str(src), str(tmp_path / "out"))
    assert_one_line_error(proc, "pytorch_model.bin")
