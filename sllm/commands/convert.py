"""``sllm convert SRC DST``: a Hugging Face checkpoint to the loading-optimized sllm format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sllm.commands._options import JsonOpt, QuietOpt
from sllm.commands._output import byte_progress, emit_json, handle_errors, stderr, table

DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="keep (the dtype from_pretrained loads: the config's, else the checkpoint's), float16, bfloat16 or "
        "float32 (integer tensors are never cast).",
    ),
]


@handle_errors
def convert(
    src: Annotated[Path, typer.Argument(help="Hugging Face model directory (safetensors or .bin, single or sharded).")],
    dst: Annotated[Path, typer.Argument(help="Output directory for the sllm checkpoint (must not exist).")],
    dtype: DtypeOpt = "keep",
    partitions: Annotated[
        int, typer.Option("--partitions", min=1, help="Partition files, one per target device, balanced by bytes.")
    ] = 1,
    alignment: Annotated[
        int, typer.Option("--alignment", help="Byte alignment of every tensor; a power of two (4096 allows O_DIRECT).")
    ] = 4096,
    chunk_mib: Annotated[
        int, typer.Option("--chunk-mib", min=1, help="Checksummed chunk size in MiB (the loader's read unit).")
    ] = 16,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists (atomically).")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a Hugging Face checkpoint into an sllm checkpoint.

    Applies transformers' own loading rules once (base-model prefix, renamings, fused MoE
    experts, ignorable keys dropped, tied weights), so the stored tensors are the model's
    runtime parameters; refuses a checkpoint that from_pretrained would leave with randomly
    initialised weights. Tensors are laid out aligned and contiguous in partition files with
    a tensor index, so loading is a few large reads and no deserialization. Writes into a
    temporary directory beside DST and renames it into place: an interrupted run leaves no
    DST, and the next run removes temporaries of killed runs.
    """
    from sllm.core.convert import convert as run_convert

    with byte_progress(f"converting {src.name}", enabled=not (quiet or json_output)) as on_progress:
        result = run_convert(
            src,
            dst,
            dtype=dtype,
            partitions=partitions,
            alignment=alignment,
            chunk_bytes=chunk_mib * 1024 * 1024,
            force=force,
            on_progress=on_progress,
        )
    if json_output:
        emit_json(result)
        return
    table(
        f"converted {src} -> {result.path}",
        ["partition", "bytes"],
        [[f"partition-{i}.bin", n] for i, n in enumerate(result.partitions)],
    )
    stderr.print(
        f"{result.tensors} tensors, {result.nbytes / 1e9:.3f} GB, dtype {result.dtype}, in {result.seconds:.2f} s"
    )
    if result.model_class:
        stderr.print(f"{result.model_class}: {result.mapped} tensors renamed or fused by transformers' loading rules")
    unused = [n for n, why in result.dropped.items() if not why.startswith("ignored")]
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        stderr.print(f"warning: dropped {len(unused)} source tensors the model has no weight for "
                     f"(from_pretrained drops them too): {shown}", markup=False)
