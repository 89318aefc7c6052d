"""``sllm load MODEL_DIR``: load a converted checkpoint once and print the load figures.

A quick check that a checkpoint is whole (``--verify`` checks every chunk's sha256) and a
one-shot measurement of the loader; ``sllm load-bench`` compares loaders properly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sllm.commands._options import DeviceOpt, DirectIoOpt, JsonOpt, QuietOpt, ThreadsOpt
from sllm.commands._output import byte_progress, emit_json, handle_errors, table


@handle_errors
def load(
    model_dir: Annotated[Path, typer.Argument(help="A converted sllm checkpoint directory.")],
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    direct_io: DirectIoOpt = None,
    verify: Annotated[bool, typer.Option("--verify", help="Check every chunk's sha256 while loading.")] = False,
    state_dict_only: Annotated[
        bool, typer.Option("--state-dict", help="Stop at the state dict; do not build the transformers model.")
    ] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Load MODEL_DIR with sllm's loader and print bytes, seconds and GB/s."""
    from sllm.core import loader

    with byte_progress(f"loading {model_dir.name}", enabled=not (quiet or json_output)) as on_progress:
        if state_dict_only:
            obj = loader.load_state_dict(
                model_dir, device, threads=threads, direct_io=direct_io, verify=verify, on_progress=on_progress
            )
        else:
            obj = loader.load_model(
                model_dir, device, threads=threads, direct_io=direct_io, verify=verify, on_progress=on_progress
            )
    report = loader.report_of(obj)
    loader.release(obj)
    if json_output:
        emit_json(report)
        return
    table(
        f"loaded {model_dir}",
        ["bytes", "read s", "build s", "total s", "GB/s", "O_DIRECT", "device"],
        [[report.nbytes, report.read_seconds, report.build_seconds, report.total_seconds, report.gbps,
          "yes" if report.direct_io else "no", report.device]],
    )
