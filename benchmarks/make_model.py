#!/usr/bin/env python3
"""Build a random-weight Hugging Face checkpoint of a named real architecture, offline.

A thin command line over :func:`sllm.zoo.build_random_checkpoint`: it picks the
architecture's config (OPT-1.3B, GPT-2, Llama-style, or their tiny test variants), draws
random weights with a seed, and writes them with transformers' own ``save_pretrained``
(``model.safetensors``, sharded with an index when ``--shards`` is given, or
``pytorch_model.bin`` with ``--bin``), plus config and tokenizer files. It downloads
nothing and knows nothing of the sllm format: convert the result with ``sllm convert``
or hand it to ``sllm load-bench`` directly.

Examples::

    python benchmarks/make_model.py opt-1.3b /tmp/opt-1.3b --dtype float16
    python benchmarks/make_model.py llama-tiny /tmp/llama-tiny --shards 2MB --bin
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``ARCH DST --dtype --seed --shards SIZE --bin``)."""
    from sllm.zoo import ARCHITECTURES

    p = argparse.ArgumentParser(
        prog="make_model.py",
        description="Write a random-weight Hugging Face checkpoint of a real architecture (no download).",
    )
    p.add_argument("arch", metavar="ARCH", choices=sorted(ARCHITECTURES), help=f"one of: {', '.join(ARCHITECTURES)}")
    p.add_argument("dst", metavar="DST", type=Path, help="output directory (created; must be empty or missing)")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="dtype of the saved weights (default float16)")
    p.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default 0)")
    p.add_argument(
        "--shards", metavar="SIZE", default=None, help="largest shard, e.g. 500MB: write a sharded checkpoint + index"
    )
    p.add_argument("--bin", action="store_true", help="write pytorch_model.bin (torch.save) instead of safetensors")
    p.add_argument("--force", action="store_true", help="write into DST even if it is not empty")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the checkpoint; print ``DST`` and its size on stdout. Returns the exit status.

    Exit status: 0 written, 2 bad arguments or a non-empty DST without ``--force``.
    """
    args = parse_args(argv)
    if args.dst.exists() and any(args.dst.iterdir()) and not args.force:
        print(f"make_model.py: error: {args.dst} is not empty (use --force)", file=sys.stderr)
        return 2
    from sllm.zoo import build_random_checkpoint

    started = time.perf_counter()
    dst = build_random_checkpoint(
        args.arch,
        args.dst,
        dtype=args.dtype,
        seed=args.seed,
        safe_serialization=not args.bin,
        max_shard_size=args.shards,
    )
    seconds = time.perf_counter() - started
    weights = [f for f in dst.iterdir() if f.suffix in (".safetensors", ".bin")]
    nbytes = sum(f.stat().st_size for f in weights)
    print(f"{dst}  {args.arch} {args.dtype}  {len(weights)} weight file(s), {nbytes / 1e9:.3f} GB, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
