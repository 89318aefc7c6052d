"""The ``sllm`` command: a Typer app that registers one function per subcommand.

Importing this module imports no torch (a test checks it): command modules import the
core only inside their functions. Errors become one-line messages in
``sllm.commands._output.handle_errors``; exit codes are in ``sllm.errors``.
"""

from __future__ import annotations

import typer

from sllm import __version__
from sllm.commands import cache, convert, inventory, load, load_bench, migrate, schedule_plan, serve

app = typer.Typer(
    name="sllm",
    help="Low-latency serverless LLM inference: convert checkpoints for fast loading, load, serve, measure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"sllm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Low-latency serverless LLM inference.

    Environment: SLLM_DEBUG=1 shows tracebacks of internal errors.
    """


app.command("convert")(convert.convert)
app.command("load")(load.load)
app.command("load-bench")(load_bench.load_bench)
app.command("serve")(serve.serve)
app.command("migrate")(migrate.migrate)
app.command("schedule-plan")(schedule_plan.schedule_plan)
app.add_typer(cache.app, name="cache")
app.add_typer(inventory.app, name="inventory")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
