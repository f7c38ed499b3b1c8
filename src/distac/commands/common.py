"""Options and helpers shared by several commands."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from distac.merging.base import MERGE_RECORD

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


@contextlib.contextmanager
def report_directory(output: Path | None) -> Iterator[Path | None]:
    """Where a command writes its report files (``diagnose -o``, ``evaluate -o``): a temporary directory
    that replaces ``output`` once every file is written, or None when there is no ``output``.

    It goes through :func:`distac.atomic.atomic_directory`, as ``merge`` and ``finetune`` outputs do, so the
    directory carries the ``.distac_output`` marker: the same command run again into the same ``-o`` may
    replace it (writing the files into the directory directly left it unmarked, and the second run was
    refused as "files distac did not write"), and a failed run leaves no partial report. Check the output
    with :func:`distac.checkpoints.check_output_path` before the work, naming the inputs: the swap replaces
    the whole directory, so an output over an input would delete it."""
    if output is None:
        yield None
        return
    from distac.atomic import atomic_directory

    with atomic_directory(output) as tmp:
        yield tmp


def expand_model_dirs(paths: Sequence[Path]) -> list[Path]:
    """The distac model directories ``paths`` name, a ``distac merge`` output standing for its models.

    ``distac merge`` of distac model directories writes no single model: each task keeps its own head, so
    the output holds one complete model per task (``OUTPUT/<task>/``, the merged backbone with that task's
    head) beside the record ``OUTPUT/merge.json``. Such a folder is taken as those models, in the order of
    the merge's sources (the order ``--individual`` references follow). Its ``merge.json`` given as a path
    (``OUTPUT/*`` in a shell expands to it beside the models) stands for the models not also named.
    Anything else is kept as given, so a wrong path still fails with the loader's own message."""
    from distac.models.base import SPEC_FILE

    named = {p.resolve() for p in paths}
    out: list[Path] = []
    for path in paths:
        if path.is_dir() and not (path / SPEC_FILE).is_file() and (path / MERGE_RECORD).is_file():
            out.extend(merged_models(path))
        elif path.name == MERGE_RECORD and path.is_file() and not (path.parent / SPEC_FILE).is_file():
            out.extend(m for m in merged_models(path.parent) if m.resolve() not in named)
        else:
            out.append(path)
    return out


def merged_models(output: Path) -> list[Path]:
    """The per-task distac models in the merge output ``output``, in the order its ``merge.json`` lists the
    sources (the sorted subfolders holding a model, when the record does not say)."""
    from distac.errors import CheckpointError
    from distac.models.base import SPEC_FILE

    try:
        record = json.loads((output / MERGE_RECORD).read_text(encoding="utf-8"))
        names = [str(source["name"]) for source in record["sources"]]
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        names = []  # an unreadable record: the subfolders say which models there are
    models = [output / name for name in names if Path(name).name == name and (output / name / SPEC_FILE).is_file()]
    if names and models and len(models) != len(names):
        missing = [name for name in names if output / name not in models]
        raise CheckpointError(
            f"{output}: its {MERGE_RECORD} lists the tasks {names}, but {missing} hold no distac model "
            f"(no {SPEC_FILE}); the merge output is incomplete, run distac merge again"
        )
    if not models:
        models = sorted(p.parent for p in output.glob(f"*/{SPEC_FILE}") if not p.parent.name.startswith("."))
    if not models:
        raise CheckpointError(
            f"{output}: a merge of plain checkpoints (its {MERGE_RECORD} beside no distac model per task); "
            "this command takes distac model directories (distac finetune outputs, or a merge of them)"
        )
    return models
