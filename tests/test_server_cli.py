"""``sllm serve``: flags, one-line errors, the --json announcement, a clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest
from typer.testing import CliRunner

from sllm.cli import app
from sllm.commands._options import parse_bytes
from sllm.errors import UsageError


def test_parse_bytes():
    assert parse_bytes("1500", "--max-memory") == 1500
    assert parse_bytes("1.5GB", "--max-memory") == parse_bytes("1.5g", "--max-memory") == 1_500_000_000
    assert parse_bytes("8GiB", "--max-memory") == 8 * 2**30 and parse_bytes("512 MiB", "--max-memory") == 512 * 2**20
    for bad in ("lots", "-1", "0", "1.5 parsecs", ""):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_bytes(bad, "--max-memory", minimum=1)
    assert parse_bytes("0", "--dram-capacity") == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "/no/such/dir"], "--models /no/such/dir: not a directory"),
        (["--max-memory", "lots"], "--max-memory 'lots': not a size"),
        (["--log-level", "loud"], "--log-level 'loud'"),
    ],
)
def test_bad_flags_are_one_line_errors_exit_2(args, message, models_dir):
    full = ["serve", "--models", str(models_dir), *args] if args[0] != "--models" else ["serve", *args]
    result = CliRunner().invoke(app, full)
    assert result.exit_code == 2
    assert f"sllm: error: {message}" in result.output
    assert "Traceback" not in result.output


def test_busy_port_is_a_one_line_error(models_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--models", str(models_dir), "--port", str(port)])
    assert result.exit_code == 2
    assert f"sllm: error: cannot listen on 127.0.0.1:{port}" in result.output


def test_cli_import_pulls_no_torch_and_lists_serve():
    code = "import sys, sllm.cli; bad = {'torch', 'transformers', 'fastapi', 'uvicorn'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for flag in ("--models", "--host", "--port", "--api-key", "--keep-alive", "--max-memory", "--device", "--json"):
        assert flag in result.output


def test_serve_announces_json_serves_and_stops_on_sigterm(models_dir):
    env = {**os.environ, "SLLM_API_KEY": "k3y"}
    cmd = [sys.executable, "-m", "sllm", "serve", "--models", str(models_dir), "--port", "0", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(300, proc.kill)  # a hang guard
    timer.start()
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        assert info["models"] == ["gpt2-a", "gpt2-b"] and info["url"].startswith("http://127.0.0.1:")
        with httpx.Client(base_url=info["url"], timeout=120) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/v1/models").status_code == 401  # the key came from SLLM_API_KEY
            r = http.post(
                "/v1/completions",
                json={"model": "gpt2-b", "prompt": "Hi", "max_tokens": 3, "temperature": 0},
                headers={"Authorization": "Bearer k3y"},
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out == ""  # stdout carried exactly the one JSON line, read above
    assert "Traceback" not in err


def test_serve_needs_models_or_a_cache_and_checks_cache_sizes(tmp_path):
    result = CliRunner().invoke(app, ["serve"], env={"SLLM_CACHE_DIR": None, "SLLM_REMOTE": None})
    assert result.exit_code == 2
    assert "sllm: error: give --models DIR, or --cache-dir/--remote to serve from the tier cache" in result.output
    result = CliRunner().invoke(app, ["serve", "--cache-dir", str(tmp_path), "--dram-capacity", "lots"])
    assert result.exit_code == 2 and "sllm: error: --dram-capacity 'lots': not a size" in result.output


def test_serve_from_the_tier_cache_set_by_the_environment(models_dir, tmp_path):
    env = {**os.environ, "SLLM_CACHE_DIR": str(tmp_path / "cache"), "SLLM_REMOTE": str(models_dir)}
    env.pop("SLLM_API_KEY", None)
    cmd = [sys.executable, "-m", "sllm", "serve", "--dram-capacity", "64MiB", "--ssd-capacity", "1GB",
           "--port", "0", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(300, proc.kill)  # a hang guard
    timer.start()
    try:
        info = json.loads(proc.stdout.readline())
        assert info["models"] == []  # nothing cached yet; the remote lists gpt2-a and gpt2-b
        with httpx.Client(base_url=info["url"], timeout=120) as http:
            cards = {m["id"]: m["tiers"] for m in http.get("/v1/models").json()["data"]}
            assert cards == {"gpt2-a": ["remote"], "gpt2-b": ["remote"]}
            r = http.post("/v1/completions", json={"model": "gpt2-b", "prompt": "Hi", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        result = CliRunner().invoke(app, ["cache", "ls", "--server", info["url"], "--json"])
        assert result.exit_code == 0, result.output
        assert [(m["model"], m["tier"]) for m in json.loads(result.stdout)["models"]] == [
            ("gpt2-b", "device"), ("gpt2-b", "dram"), ("gpt2-b", "ssd")]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert (tmp_path / "cache" / "models" / "gpt2-b" / "sllm.json").is_file()
    assert "Traceback" not in err
