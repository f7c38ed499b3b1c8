"""The ``distac`` command-line tool.

Each subcommand lives in its own module under :mod:`distac.commands` and registers itself on
the Typer app here, so a command's options sit next to the code that runs it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys

import typer

from distac import __version__
from distac.errors import DistacError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="distac",
    help=(
        "Robust model merging with DisTaC: fine-tune sources, diagnose harmful ones (norm disparity, low "
        "confidence), condition them by distillation, merge with any method, evaluate and calibrate."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_MODULES = (
    "info",
    "finetune",
    "diagnose",
    "condition",
    "merge",
    "evaluate",
    "calibrate",
    "experiment",
    "demo",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"distac {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"distac.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"distac.commands.{name}":
                continue
            raise
        module.register(app)


_register_commands()


#: OS errors that are the user's environment, not a bug: one line, not a traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _on_interrupt(signum: int, frame: object) -> None:
    typer.secho(
        "\ninterrupted: finished stages and the last saved resume state are kept; rerun the same command to continue",
        fg=typer.colors.YELLOW,
        err=True,
    )
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: distac errors, a full or read-only disk become one clear line and exit code 2, not a
    traceback; Ctrl-C says how to continue (exit code 130)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)
    try:
        app()
    except DistacError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        typer.secho(f"error: cannot write{where}: {exc.strerror or exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
