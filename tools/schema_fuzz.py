"""Fuzz a real ``sllm serve`` with schemathesis, driven by the node's own OpenAPI schema.

Builds a tiny random-weight GPT-2 (offline), converts it, starts ``sllm serve`` on a free
loopback port with a tier cache (so the cache routes exist), and runs ``schemathesis run``
against ``/openapi.json`` with a fixed number of examples per operation and a fixed seed.
It fails (non-zero exit) on any 500 or any response the schema does not allow (status code,
content type, headers, body shape), and on invalid input that is not rejected with a 4xx.
Bounded: ``--max-examples`` per operation, a time budget, every request with a timeout.

    python tools/schema_fuzz.py [--max-examples 25] [--seconds 100]

Used by ``.ci/run``; it is a check, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,negative_data_rejection")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-examples", type=int, default=25)
    ap.add_argument("--seconds", type=int, default=100, help="time budget of the fuzzing")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    from sllm.core.convert import convert
    from sllm.zoo import TINY_GPT2, build_random_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="sllm-fuzz-"))
    server = None
    try:
        hf = build_random_checkpoint("gpt2", tmp / "hf", **TINY_GPT2)
        convert(hf, tmp / "models" / "gpt2-tiny")
        env = {**os.environ, "SLLM_DEBUG": "0"}
        server = subprocess.Popen(
            [sys.executable, "-m", "sllm", "serve", "--models", str(tmp / "models"), "--port", "0", "--json",
             "--cache-dir", str(tmp / "cache"), "--drain-seconds", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = server.stdout.readline()
        if not line:
            print(server.stderr.read(), file=sys.stderr)
            return 1
        url = json.loads(line)["url"]
        st = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
        config = Path(__file__).with_name("schemathesis.toml")
        cmd = [st, "--config-file", str(config), "run", f"{url}/openapi.json", "--checks", CHECKS,
               "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--max-time", str(args.seconds),
               "--request-timeout", "30",
               "--workers", "1", "--generation-database", "none", "--no-color", "--output-truncate", "true",
               "--suppress-health-check", "all"]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        code = subprocess.run(cmd, timeout=args.seconds + 120).returncode
        return code
    finally:
        if server is not None:
            server.terminate()
            try:
                _, err = server.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                _, err = server.communicate()
            if "Traceback" in (err or ""):
                print("the server logged a traceback:\n" + err, file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
