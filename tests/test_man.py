"""The man pages in ``man/`` match what ``tools/gen_man.py`` generates, and render.

If the first test fails, a command's help changed (or a command was added): run
``make man`` and commit ``man/``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"


def _gen_man():
    spec = importlib.util.spec_from_file_location("gen_man", ROOT / "tools" / "gen_man.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_pages_match_the_generator(tmp_path):
    gen = _gen_man()
    gen.write(tmp_path, gen.generate())
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.1")}
    committed = {p.name: p.read_text() for p in MAN.glob("*.1")}
    assert set(fresh) == set(committed), "man/ is out of date: run `make man`"
    for name, text in fresh.items():
        assert committed[name] == text, f"man/{name} is out of date: run `make man`"
    for page in ("sllm.1", "sllm-convert.1", "sllm-load-bench.1"):
        assert page in fresh
    assert (MAN / "sllm-format.5").is_file()


def test_every_command_page_has_the_sections():
    for page in MAN.glob("*.1"):
        text = page.read_text()
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "ENVIRONMENT", "FILES",
                        "EXAMPLES", "SEE ALSO"):  # fmt: skip
            assert f".SH {section}" in text, f"{page.name} has no {section}"
        assert "SLLM_DEBUG" in text and "130" in text


def _render(page: Path) -> str:
    if shutil.which("man") is None or shutil.which("groff") is None:
        pytest.skip("man/groff not installed")
    env = {**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_convert_page_renders():
    out = _render(MAN / "sllm-convert.1")
    for section in ("NAME", "SYNOPSIS", "OPTIONS", "EXIT STATUS", "ENVIRONMENT", "EXAMPLES"):
        assert f"\n{section}\n" in out, section
    assert "sllm convert [OPTIONS] SRC DST" in out
    assert "--dtype" in out and "--partitions" in out


def test_format_page_renders():
    out = _render(MAN / "sllm-format.5")
    for section in ("NAME", "MANIFEST (sllm.json)", "TENSOR INDEX (tensor_index.json)", "VALIDATION", "WRITING"):
        assert f"\n{section}\n" in out, section
    assert "TruncatedPartition" in out and "chunk_bytes" in out
