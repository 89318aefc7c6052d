#!/usr/bin/env python3
"""vLLM engine start and weight loading: ``--load-format sllm`` against vLLM's own loaders.

A program, not a test: it prints a table and one JSON line and asserts nothing on time.
Run it in the vLLM environment (``make vllm-env``; ``.venv-vllm/bin/python``).

On one random-weight model (default the GPT-2-medium shape in float32, 24 layers, hidden
1024: 1.42 GB; ``--layers/--hidden/--heads`` change it), written by transformers'
``save_pretrained`` (``model.safetensors``) and converted with ``sllm convert``:

- for each load format (``sllm`` on the converted directory; ``safetensors``, vLLM's default
  loader, and ``fastsafetensors`` / ``runai_streamer`` where their packages import, on the
  Hugging Face directory), a fresh Python process builds one ``vllm.LLM`` in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and reports the engine start (the ``LLM(...)``
  call, seconds) and the weight loading inside it (the loader's ``load_weights``: reading
  the checkpoint and filling vLLM's parameters), **cold** (the model files, and sllm's vLLM
  layout, evicted from the page cache first, ``posix_fadvise(DONTNEED)``) and **warm** (the
  same again with those files read once before: in the page cache, which sllm's O_DIRECT
  reads of the cold run would not leave them in), in the same run. sllm has three rows:
  ``sllm-first``, a load with no vLLM layout yet (its tensors through vLLM's weight loaders
  by name, then the layout written: the first start of a model on a node), ``sllm``
  (default flags once the layout exists: every later start) and ``sllm-by-name``
  (``{"layout": false}``);
- the **raw O_DIRECT read** of the same bytes (the sllm partition file into one fresh host
  buffer with sllm's reader: 4 threads, the manifest's chunk size), cold: the floor any
  loader of those bytes has to pay.

Each figure is the median over ``--runs`` processes. Example::

    .venv-vllm/bin/python benchmarks/vllm_load.py --work-dir bench-out/vllm --runs 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENV = dict(
    VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
    DO_NOT_TRACK="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
)
#: row -> (vLLM load format, the module it needs (None: always there), extra loader config).
#: "sllm" is the default flags once the model's vLLM layout exists (written by its first load:
#: row "sllm-first", which starts each run without one); "sllm-by-name" turns the layout off.
FORMATS: dict[str, tuple[str, str | None, dict | None]] = {
    "sllm-first": ("sllm", None, None),
    "sllm": ("sllm", None, None),
    "sllm-by-name": ("sllm", None, {"layout": False}),
    "safetensors": ("safetensors", None, None),
    "fastsafetensors": ("fastsafetensors", "fastsafetensors", None),
    "runai_streamer": ("runai_streamer", "runai_model_streamer", None),
}


def child(model: str, load_format: str, extra: str = "null") -> int:
    """In a fresh process: build one engine, print ``{"start_s", "weights_s", "tokens", "layout"}`` as JSON."""
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    import vllm.model_executor.model_loader as ml
    from vllm import LLM, SamplingParams

    timings: list[float] = []
    original = ml.get_model_loader

    def timed_loader(load_config):  # get_model() looks this name up in its module at call time
        loader = original(load_config)
        load_weights = loader.load_weights

        def timed(*args, **kwargs):
            started = time.perf_counter()
            load_weights(*args, **kwargs)
            timings.append(time.perf_counter() - started)

        loader.load_weights = timed
        return loader

    ml.get_model_loader = timed_loader
    started = time.perf_counter()
    config = json.loads(extra)
    kwargs = {} if config is None else {"model_loader_extra_config": config}
    llm = LLM(model=model, load_format=load_format, dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              **kwargs)
    start_s = time.perf_counter() - started
    out = llm.generate(["Hello, my name is"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    layout = None
    if load_format == "sllm":
        from sllm.integrations.vllm.loader import SllmModelLoader

        layout = SllmModelLoader.last_layout
    print(json.dumps({"start_s": start_s, "weights_s": timings[0] if timings else None,
                      "tokens": list(out[0].outputs[0].token_ids), "layout": layout}), flush=True)
    return 0


def evict(directory: Path) -> None:
    """Drop every file under ``directory`` from the page cache."""
    from sllm.io.reader import evict_page_cache

    for f in directory.rglob("*"):
        if f.is_file():
            evict_page_cache(f)


def cache(directory: Path) -> None:
    """Read every file under ``directory`` once (buffered), so its pages are in the page cache."""
    for f in directory.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass


def run_child(model: Path, load_format: str, timeout: float, extra: dict | None = None,
              layouts: Path | None = None) -> dict:
    """One engine start in a fresh interpreter; its JSON result (``error`` on failure)."""
    env = dict(os.environ, **ENV, **({"SLLM_VLLM_LAYOUT_DIR": str(layouts)} if layouts else {}))
    proc = subprocess.run([sys.executable, __file__, "--child", str(model), load_format, json.dumps(extra)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def raw_read(ckpt_dir: Path) -> tuple[float, int, bool]:
    """Seconds, bytes and O_DIRECT of reading the sllm partitions cold into fresh host buffers."""
    from sllm.core.format import open_checkpoint
    from sllm.io.hostmem import HostBuffer
    from sllm.io.reader import DEFAULT_READ_THREADS, read_whole

    ckpt = open_checkpoint(ckpt_dir)
    evict(ckpt_dir)
    # Fresh, not pre-faulted: the loader's pool buffers are faulted in by the reads too.
    bufs = [HostBuffer(p.nbytes, populate=False) for p in ckpt.manifest.partitions]
    started = time.perf_counter()
    direct = True
    for part, buf in zip(ckpt.manifest.partitions, bufs, strict=True):
        direct &= read_whole(ckpt_dir / part.file, buf.memoryview(part.nbytes), chunk_bytes=ckpt.manifest.chunk_bytes,
                             threads=DEFAULT_READ_THREADS)
    seconds = time.perf_counter() - started
    del bufs
    return seconds, ckpt.manifest.total_bytes, direct


def prepare(work: Path, layers: int, hidden: int, heads: int) -> tuple[Path, Path]:
    """The Hugging Face checkpoint and its sllm conversion in ``work`` (built once, reused)."""
    from sllm.core.convert import convert
    from sllm.zoo import build_random_checkpoint

    src, dst = work / f"gpt2-{layers}x{hidden}-hf", work / f"gpt2-{layers}x{hidden}-sllm"
    if not (src / "model.safetensors").exists():
        build_random_checkpoint("gpt2", src, dtype="float32", n_layer=layers, n_embd=hidden, n_head=heads)
    if not (dst / "sllm.json").exists():
        convert(src, dst, force=True)
    return src, dst


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and one JSON line."""
    p = argparse.ArgumentParser(prog="vllm_load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("bench-out/vllm"), help="where the models are written")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--runs", type=int, default=1, help="processes per figure (median)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated load formats")
    p.add_argument("--timeout", type=float, default=600, help="seconds per engine start")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "FORMAT", "EXTRA"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    src, dst = prepare(args.work_dir, args.layers, args.hidden, args.heads)
    rows: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    layouts = args.work_dir / "vllm-layouts"
    for fmt in args.formats.split(","):
        load_format, need, extra = FORMATS[fmt]
        if need is not None and importlib.util.find_spec(need) is None:
            skipped[fmt] = f"{need} is not installed"
            continue
        model = dst if load_format == "sllm" else src
        figures: dict[str, list[dict]] = {"cold": [], "warm": []}
        for _ in range(args.runs):
            for kind in figures:
                if fmt == "sllm-first":
                    shutil.rmtree(layouts, ignore_errors=True)
                for where in (model, layouts):
                    if where.exists():
                        (evict if kind == "cold" else cache)(where)
                figures[kind].append(run_child(model, load_format, args.timeout, extra, layouts))
        errors = [r["error"] for rs in figures.values() for r in rs if "error" in r]
        if errors:
            skipped[fmt] = errors[0]
            continue
        rows[fmt] = {
            f"{kind}_{what}": statistics.median(r[what] for r in rs)
            for kind, rs in figures.items() for what in ("start_s", "weights_s")
        }
        rows[fmt]["tokens"] = figures["warm"][0]["tokens"]
        rows[fmt]["layout"] = sorted({r["layout"] for rs in figures.values() for r in rs if r.get("layout")})
    raws = [raw_read(dst) for _ in range(args.runs)]
    raw_s, nbytes, direct = statistics.median(r[0] for r in raws), raws[0][1], all(r[2] for r in raws)

    print(f"model: GPT-2 shape, {args.layers} layers, hidden {args.hidden}, float32, {nbytes / 1e9:.2f} GB; "
          f"median of {args.runs} process(es) per figure")
    print(f"{'load format':<16} {'start cold s':>12} {'weights cold s':>14} {'start warm s':>12} {'weights warm s':>14}"
          f" {'cold vs raw':>11}")
    for fmt, r in rows.items():
        print(f"{fmt:<16} {r['cold_start_s']:>12.2f} {r['cold_weights_s']:>14.2f} {r['warm_start_s']:>12.2f} "
              f"{r['warm_weights_s']:>14.2f} {r['cold_weights_s'] / raw_s:>10.2f}x  {','.join(r['layout'])}")
    print(f"{'raw read (' + ('O_DIRECT' if direct else 'buffered') + ')':<16} {'':>12} {raw_s:>14.2f} "
          f"{'':>12} {'':>14} {nbytes / raw_s / 1e9:>7.2f}GB/s")
    for fmt, why in skipped.items():
        print(f"{fmt}: not measured ({why})")
    same = len({tuple(r["tokens"]) for r in rows.values()}) <= 1
    print(f"greedy tokens identical across formats: {same}")
    print(json.dumps({"benchmark": "vllm_load", "nbytes": nbytes, "runs": args.runs, "raw_read_s": raw_s,
                      "raw_direct_io": direct, "formats": rows, "skipped": skipped, "same_tokens": same}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
