"""Options and helpers shared by several commands."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=False)


def echo(message: str) -> None:
    """Print a progress line verbatim: pipeline messages hold names in brackets (``[lr_x10]``) that
    rich would otherwise take for markup and drop."""
    console.print(message, markup=False)


CONFIG_OPTION = typer.Option(None, "--config", "-c", help="YAML config file; flags given here override it.")
SET_OPTION = typer.Option(
    [], "--set", help="Override a config value, e.g. --set steps=500 (YAML syntax for the value). Repeatable."
)
#: ``merge``'s --set: hyperparameters of the merging method.
METHOD_SET_OPTION = typer.Option(
    [], "--set", help="A hyperparameter of the method, e.g. --set density=0.2 for ties (YAML value). Repeatable."
)
#: ``experiment`` / ``demo``'s --set: keys of the experiment config, dotted into its sections.
EXPERIMENT_SET_OPTION = typer.Option(
    [],
    "--set",
    help="Override an experiment-config value, e.g. --set condition.steps=500 or --set seed=1 (YAML value). "
    "Repeatable.",
)
DATA_ROOT_OPTION = typer.Option(
    None,
    "--data-root",
    help="Data root: the shared text/ and vision/ datasets, and datasets of your own named after their "
    "tasks (<root>/<task>: image folder, HF save_to_disk, train.tsv/.csv; or <root>/<task>.npz). "
    "Default: $DISTAC_DATA or ../shared/data.",
)
DEVICE_OPTION = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 or auto (CUDA when available).")
#: For commands with --config: unset means "the config's device, else auto", so a flag default
#: never overrides a value from the file.
CONFIGURABLE_DEVICE_OPTION = typer.Option(
    None, "--device", help="cpu, cuda, cuda:1 or auto (CUDA when available; default: the config's, else auto)."
)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[format_cell(v) for v in row])
    console.print(table)


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def require_distinct_sources(paths: Sequence[Path]) -> None:
    """Refuse a source given twice, under any spelling of its path: it would count twice."""
    resolved = [p.resolve() for p in paths]
    twice = sorted({str(p) for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1})
    if twice:
        raise typer.BadParameter(f"a source is given more than once: {twice}")


def merged_options(config: Mapping[str, Any], **flags: Any) -> dict[str, Any]:
    """Config values overridden by flags that the user actually gave (not None)."""
    out = dict(config)
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def require_exists(path: Path, what: str) -> Path:
    if not path.exists():
        raise typer.BadParameter(f"{what} {path} does not exist")
    return path
