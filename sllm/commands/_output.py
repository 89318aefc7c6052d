"""Output for every command: one-line errors on stderr, ``--json`` on stdout, rich progress.

stdout carries only the result (a table or exactly one JSON document); progress, warnings
and errors go to stderr. Errors become user messages here and nowhere else: an
:class:`~sllm.errors.SllmError` prints ``sllm: error: <message>`` (plus its hint) and exits
with its code; Ctrl-C exits 130; anything else is a bug and shows its traceback only with
``SLLM_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from sllm.errors import EXIT_FAILED, EXIT_INTERRUPTED, SllmError

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True)


def fail(message: str, code: int, hint: str | None = None) -> None:
    """Print ``sllm: error: message`` (and ``hint``) on stderr and exit with ``code``."""
    print(f"sllm: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    raise typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: SllmError -> one line + its exit code; Ctrl-C -> 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SllmError as exc:
            if os.environ.get("SLLM_DEBUG") == "1":
                raise
            fail(str(exc), exc.exit_code, exc.hint)
        except KeyboardInterrupt:
            print("sllm: interrupted", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug: say so in one line unless debugging
            if os.environ.get("SLLM_DEBUG") == "1":
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (set SLLM_DEBUG=1 for the traceback)", EXIT_FAILED)

    return wrapper


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples to plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def emit_json(obj: Any) -> None:
    """Write exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: list[str], rows: list[list[Any]], *, min_width: int | None = None) -> None:
    """Print a rich table on stdout; numeric columns right-aligned. ``min_width``: columns
    to assume when stdout is not a terminal (rich assumes 80 there, which cuts wide tables)."""
    t = Table(title=title)
    for i, c in enumerate(columns):
        numeric = rows and all(isinstance(r[i], (int, float)) for r in rows)
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r])
    if min_width and not stdout.is_terminal:
        Console(file=sys.stdout, width=max(stdout.width, min_width)).print(t)
    else:
        stdout.print(t)


@contextlib.contextmanager
def byte_progress(description: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yield an ``on_progress(done_bytes, total_bytes)`` callback drawing a rich bar on stderr.

    The bar shows only when ``enabled`` and stderr is a terminal; otherwise the callback
    does nothing.
    """
    if not (enabled and stderr.is_terminal):
        yield lambda done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update
