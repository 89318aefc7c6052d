"""``sllm load-bench MODEL_DIR``: time sllm's loader against its peers (safetensors, Run:ai
Model Streamer, fastsafetensors, tensorizer, torch.load, from_pretrained) on one model, cold
and warm, and check the targets of the loader.

Thin: it parses flags, calls :func:`sllm.core.bench.prepare` and
:func:`sllm.core.bench.run_bench`, and renders the result (a table, ``--json``, and the
``--plot`` PNG, drawn here with matplotlib). The measuring happens in fresh worker processes
started by the core; this module imports no torch at import time.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from sllm.commands._options import DeviceOpt, JsonOpt, QuietOpt, ThreadsOpt
from sllm.commands._output import byte_progress, emit_json, handle_errors, stdout, table
from sllm.errors import EXIT_FAILED

#: Columns the results table gets when stdout is a file or a pipe.
MIN_WIDTH = 110


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _via(row) -> str:
    """How the bytes arrived, for sllm and raw rows: O_DIRECT, buffered, page-cache or pool."""
    return row.via


def _wide_table(title: str, columns: list[str], rows: list[list]) -> None:
    """Like ``_output.table``, but never narrower than :data:`MIN_WIDTH` columns when stdout
    is not a terminal (rich assumes 80 there, which would cut method names)."""
    from rich.table import Table

    t = Table(title=title)
    for i, c in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], (int, float)) for r in rows)
        t.add_column(c, justify="right" if numeric else "left", no_wrap=not numeric)
    for r in rows:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r])
    if stdout.is_terminal:
        stdout.print(t)
    else:
        from rich.console import Console

        Console(file=sys.stdout, width=max(stdout.width, MIN_WIDTH)).print(t)


def _render(result) -> None:
    """The rows table, then the targets table, then notes (stdout)."""
    rows = [
        [r.loader, r.level, r.temperature, _via(r), r.seconds_median, r.seconds_min, r.seconds_max, r.gbps,
         _fmt_ratio(r.vs_sllm)]
        for r in result.rows
    ]  # fmt: skip
    _wide_table(
        f"load-bench {result.model_dir}: {result.nbytes / 1e9:.3f} GB, {result.partitions} partition(s), "
        f"device {result.device}, {result.runs} run(s)",
        ["method", "ready", "cache", "via", "median s", "min s", "max s", "GB/s", "x sllm"],
        rows,
    )
    stdout.print(
        "x sllm: median time over sllm's at the same readiness and cache state (> 1 is slower; "
        "raw compares with sllm model, sllm-page-cache with sllm cold)"
    )
    marks = {True: "met", False: "MISSED", None: "n/a"}
    table(
        "targets (model-ready medians)",
        ["target", "value", "needed", "status"],
        [[t.description, _fmt_ratio(t.value), f"{t.comparison} {t.threshold:g}x", marks[t.met]]
         for t in result.targets],
    )  # fmt: skip
    for method, why in result.failures.items():
        stdout.print(f"failed: {method}: {why}")
    for note in result.notes:
        stdout.print(f"note: {note}")


def draw_plot(result, path: Path) -> None:
    """Draw the model-ready medians (cold and warm, min-max as error bars) to a PNG.

    Raises:
        UsageError: matplotlib is not installed (install the ``plot`` extra).
    """
    plt = import_pyplot()
    rows = [r for r in result.rows if r.level in ("model", "bytes")]
    names = list(dict.fromkeys(r.method for r in rows))
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.5))
    height = 0.38
    for k, temp in enumerate(("cold", "warm")):
        by = {r.method: r for r in rows if r.temperature == temp}
        ys = [i + (k - 0.5) * height for i, n in enumerate(names) if n in by]
        rs = [by[n] for n in names if n in by]
        ax.barh(
            ys,
            [r.seconds_median for r in rs],
            height=height,
            label=temp,
            xerr=[[r.seconds_median - r.seconds_min for r in rs], [r.seconds_max - r.seconds_median for r in rs]],
        )
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds to ready (median; bars: min-max)")
    ax.set_title(f"{Path(result.model_dir).name}: {result.nbytes / 1e9:.2f} GB, {result.device}, {result.runs} runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def import_pyplot():
    """``matplotlib.pyplot`` with the Agg backend.

    Raises:
        UsageError: matplotlib is missing, with the install hint.
    """
    from sllm.errors import UsageError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib, which is not installed",
                         hint="pip install 'sllm[plot]'") from exc  # fmt: skip
    return plt


@handle_errors
def load_bench(
    model_dir: Annotated[
        Path, typer.Argument(help="A converted sllm checkpoint, or a Hugging Face model directory (converted once).")
    ],
    hf_dir: Annotated[
        Path | None,
        typer.Option("--hf-dir", help="Hugging Face source for the baselines (default: MODEL_DIR when it is one)."),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="Where the conversion and a pytorch_model.bin copy go; reused across runs "
            "(default: .sllm-bench-NAME beside the Hugging Face directory).",
        ),
    ] = None,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Fresh processes per method; each times cold and warm.")] = 3,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Comma-separated subset: raw, touch, sllm, sllm-reserved, sllm-page-cache, safetensors, runai, "
            "fastsafetensors, tensorizer, torch-load, torch-load-mmap, from-pretrained, or LOADER:LEVEL "
            "(e.g. sllm:model). Default: all. runai, fastsafetensors and tensorizer need pip install 'sllm[bench]'.",
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw the model-ready times to this PNG (needs matplotlib).")
    ] = None,
    tiers: Annotated[
        bool,
        typer.Option(
            "--tiers",
            help="Instead: measure this node's storage tiers (SSD, DRAM to device, remote), load the model "
            "from each, and write the node profile (TOML) that the cluster inventory uses.",
        ),
    ] = False,
    remote: Annotated[
        str | None,
        typer.Option("--remote", envvar="SLLM_REMOTE", help="With --tiers: a remote (dir, http(s)://, s3://) "
                     "holding the same converted model, to measure the remote tier."),
    ] = None,
    remote_model: Annotated[
        str | None,
        typer.Option("--remote-model", help="With --remote: the model's name there (default: its directory name)."),
    ] = None,
    profile_path: Annotated[
        Path, typer.Option("--profile", help="With --tiers: where the node profile TOML is written.")
    ] = Path("node-profile.toml"),
    address: Annotated[
        str, typer.Option("--address", help="With --tiers: this node's sllm serve URL, recorded in the profile.")
    ] = "http://127.0.0.1:8343",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Time sllm's loader against its peers, cold and warm, each in a fresh process.

    Methods: raw (an O_DIRECT read of the same bytes into touched memory: the floor),
    touch (a fresh process faulting in as much new memory, no I/O: what a fresh process
    pays beyond the raw read), sllm (load_model and load_state_dict as the first load of a
    fresh process, nothing reserved; warm = the reload after `del`), sllm-reserved (host
    memory pool reserved at start, as a server with a budget), sllm-page-cache (a fresh
    process whose files are in the page cache), safetensors (load_file), runai (Run:ai Model Streamer),
    fastsafetensors, tensorizer, torch-load and torch-load-mmap (weights_only=True),
    from-pretrained. Each runs in a fresh process per run, with the architecture's module
    imported beforehand (untimed): cold after evicting the model's files from the page
    cache (posix_fadvise DONTNEED), then warm. A load counts as done when every page of
    every tensor is resident (or the GPU is synchronised).

    A Hugging Face MODEL_DIR is converted once into the work directory; when it has
    safetensors only, a pytorch_model.bin copy is written there for the torch.load rows.
    Prints median/min/max seconds, GB/s, the time relative to sllm, and whether the
    loader's targets are met (cold state dict and model within 1.15x of the raw read, and
    of the slower of the raw read and the first touch; the state dict ahead of every peer,
    page-cache loads no slower than safetensors warm, the reload after del a pool hit,
    2.5x/5x faster than from_pretrained cold/warm). Progress goes to stderr; exits 1 when
    a method failed.

    With --tiers it profiles the node instead: cold SSD bandwidth (O_DIRECT, best thread
    count), DRAM-to-device bandwidth, the remote's (with --remote), the loader's fixed cost
    per load, and the same model loaded from each tier the way `sllm serve` loads it (the
    tier cache brings it to DRAM, then the model is built on the DRAM lease), split into
    each tier's fixed cost and load-path bandwidth (the slope of the pull's own progress; an
    O_DIRECT read of the SSD entry right after each SSD cold start, the fixed cost being the
    median difference; the host-to-device copy for a DRAM hit on a GPU), which the scheduler's estimates use
    (tiers.T.load_fixed_seconds and load_gbps in the profile); the profile goes to --profile.
    """
    from sllm.core import bench

    if tiers:
        _tiers(model_dir, hf_dir, work_dir, device, remote, remote_model, profile_path, address, runs,
               json_output, quiet)
        return
    selected = tuple(bench.select_methods(methods.split(",") if methods else None))
    if plot is not None:
        import_pyplot()  # fail before the long run, not after it
    config = bench.BenchConfig(
        model_dir=model_dir, hf_dir=hf_dir, work_dir=work_dir, runs=runs, threads=threads, device=device,
        methods=selected,
    )  # fmt: skip

    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    with byte_progress("converting", enabled=not (quiet or json_output)) as on_progress:
        prepared = bench.prepare(config, log=log, on_progress=on_progress)
    result = bench.run_bench(config, prepared, log=log)
    if plot is not None:
        draw_plot(result, plot)
        log(f"plot written to {plot}")
    if json_output:
        emit_json(result)
    else:
        _render(result)
    if result.failures:
        raise typer.Exit(EXIT_FAILED)


def _tiers(model_dir: Path, hf_dir: Path | None, work_dir: Path | None, device: str, remote: str | None,
           remote_model: str | None, profile_path: Path, address: str, runs: int, json_output: bool,
           quiet: bool) -> None:
    """``load-bench --tiers``: profile the node, print the tiers and loads, write the profile."""
    from sllm.core import bench, profile

    config = bench.BenchConfig(model_dir=model_dir, hf_dir=hf_dir, work_dir=work_dir, runs=runs, threads=None,
                               device=device, methods=tuple(bench.select_methods(["sllm"])))
    with byte_progress("converting", enabled=not (quiet or json_output)) as on_progress:
        prepared = bench.prepare(config, on_progress=on_progress)
    node, loads = profile.profile_node(prepared.sllm_dir, device=device, remote_url=remote, remote_model=remote_model,
                                       runs=runs, address=address)
    profile.write_profile(node, profile_path)
    if json_output:
        emit_json({"profile_path": str(profile_path), "profile": node, "loads": loads})
        return
    table(f"storage tiers of {node.name}", ["tier", "GB/s", "seconds", "bytes", "threads", "how", "where"],
          [[b.tier, b.gbps, b.seconds, b.nbytes, b.threads, b.detail, b.location] for b in node.tiers.values()])
    table(f"{prepared.sllm_dir.name}: model ready from each tier ({device}), = fixed + bytes / load GB/s",
          ["tier", "seconds", "GB/s", "fixed s", "load GB/s", "how"],
          [[t.tier, t.seconds, t.gbps, t.fixed_seconds, t.load_gbps if t.load_gbps else "-", t.detail] for t in loads])
    extra = (f"; {node.seconds_per_tensor * 1e6:.1f} us per tensor ({node.probe_tensors} in this model)"
             if node.seconds_per_tensor is not None else "")
    if node.tokenizer_seconds is not None:
        extra += f"; its tokenizer parses in {node.tokenizer_seconds:.3f} s"
    print(f"loader fixed cost per load: {node.loader_fixed_seconds:.3f} s{extra}; profile written to "
          f"{profile_path}", file=sys.stderr)
