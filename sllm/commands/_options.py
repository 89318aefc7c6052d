"""Option aliases shared by several commands, so that a flag means the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", min=1, help="Reader threads per partition (default 4).")
]
DirectIoOpt = Annotated[
    bool | None,
    typer.Option("--direct-io/--no-direct-io", help="Force O_DIRECT on or off (default: on where the filesystem allows)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where tensors go: cpu, cuda, cuda:N.")]
