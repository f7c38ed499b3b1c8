"""Evaluate distac models on their tasks, with normalized accuracy, ECE and reliability diagrams."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distac.atomic import atomic_write_json, atomic_write_text
from distac.data import TaskData, canonical_task, load_model_task
from distac.errors import CheckpointError, ConfigError
from distac.evaluation.calibration import calibration_report
from distac.evaluation.metrics import TaskMetrics, compute_metrics, reliability_bins
from distac.models import load_model
from distac.models.base import ClassifierModel, ModelSpec
from distac.models.inference import predict_logits


def model_logits(
    model: ClassifierModel, task: TaskData, split: str, examples: int | None, device: str, model_source: object = None
) -> tuple[torch.Tensor, torch.Tensor]:
    model.check_task(task, model_source=model_source)
    data = task.split(split).subsample(examples, seed=17)  # None: all; fewer than 1 is a DataError there
    model.check_labels(data.labels, f"{task.source or task.name} ({split})")
    logits = predict_logits(model, data.inputs, device=device)
    bad = int((~torch.isfinite(logits)).any(dim=-1).sum())
    if bad:  # metrics and temperature fitting on NaN logits would crash or mislead
        raise CheckpointError(
            f"{model_source or 'the model'}: {bad} of {len(logits)} {task.name} {split} examples get NaN/Inf logits; "
            "its weights are broken (a merge at too large a coefficient?)"
        )
    return logits, torch.as_tensor(data.labels)


def evaluate_model(
    model: ClassifierModel, task: TaskData, split: str = "test", examples: int | None = None, device: str = "auto"
) -> TaskMetrics:
    logits, labels = model_logits(model, task, split, examples, device)
    return compute_metrics(logits, labels, task.metric)


def evaluate_paths(
    models: Sequence[Path],
    individual: Sequence[Path] | None,
    *,
    split: str,
    examples: int | None,
    device: str,
    data_root: Path | None,
    output: Path | None,
    use_temperature: bool = True,
) -> dict[str, Any]:
    """Score each model on its task. A model that ``distac calibrate`` fitted (``calibration.json``
    beside it) is scored with its logits divided by that temperature unless ``use_temperature`` is
    off: accuracy stays, entropy, ECE and NLL are the calibrated model's. Each row says which T."""
    if individual is not None and len(individual) != len(models):
        # the usual slip is ``--individual a b c``: a list option takes one value per flag, so b and c are
        # evaluated as models and the counts disagree. Say so, with the repeated form
        shown = ", ".join(map(str, models[:6])) + (f" and {len(models) - 6} more" if len(models) > 6 else "")
        raise ConfigError(
            f"--individual must name one model per evaluated model, in the same order: got {len(individual)} "
            f"for {len(models)} (evaluated: {shown}). Repeat the option once per model: --individual A "
            "--individual B; in '--individual A B' only A is a reference and B is evaluated as a model"
        )
    if individual is not None:  # before any work: a reference for another task makes "normalized" meaningless
        for path, reference in zip(models, individual, strict=True):
            task, reference_task = ModelSpec.read(path).task, ModelSpec.read(reference).task
            if task and reference_task and canonical_task(task) != canonical_task(reference_task):
                raise ConfigError(
                    f"--individual {reference} is a model for task {reference_task!r}, but {path} is evaluated on "
                    f"{task!r}; give the fine-tuned model of {task!r}, in the same order as the models"
                )
    rows = []
    for i, path in enumerate(models):
        model = load_model(path)
        task = load_model_task(model.spec, data_root, default=path.name)
        logits, labels = model_logits(model, task, split, examples, device, model_source=path)
        temperature = stored_temperature(path) if use_temperature else None
        if temperature is not None:
            logits = logits / temperature
        metrics = compute_metrics(logits, labels, task.metric)
        row: dict[str, Any] = {
            "model": str(path),
            "task": task.name,
            "temperature": temperature or 1.0,
            **metrics.to_dict(),
            "reliability": reliability_bins(logits, labels),
        }
        if individual is not None:
            ref = evaluate_model(load_model(individual[i]), task, split, examples, device)
            row["individual"] = ref.score
            row["normalized"] = metrics.score / ref.score if ref.score else 0.0
        rows.append(row)
    keys = ["score", "accuracy", "entropy", "ece"] + (["normalized"] if individual is not None else [])
    average = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    table = {"split": split, "rows": rows, "average": average}
    if output is not None:  # only once every model was evaluated: a failure leaves no partial report
        from distac.evaluation.plots import reliability_diagram

        for i, (path, row) in enumerate(zip(models, rows, strict=True)):
            reliability_diagram(
                row["reliability"], output / f"reliability_{i}_{row['task']}.png", title=f"{path.name} on {row['task']}"
            )
        atomic_write_json(output / "evaluation.json", table)
        lines = ["| model | task | score | normalized | entropy | ECE |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['task']} | {r['score']:.4f} | {r.get('normalized', float('nan')):.4f} | "
                f"{r['entropy']:.4f} | {r['ece']:.4f} |"
            )
        atomic_write_text(output / "evaluation.md", "\n".join(lines) + "\n")
    return table


def stored_temperature(path: Path) -> float | None:
    """The temperature ``distac calibrate`` stored for the model at ``path``, or None."""
    file = path / "calibration.json"
    if not file.is_file():
        return None
    try:
        temperature = json.loads(file.read_text())["temperature"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{file}: unreadable calibration record ({error}); rerun distac calibrate") from error
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature <= 0:
        raise CheckpointError(f"{file}: temperature must be a positive number, got {temperature!r}")
    return float(temperature)


def calibrate_path(path: Path, *, examples: int | None, device: str, data_root: Path | None) -> dict[str, Any]:
    model = load_model(path)
    task = load_model_task(model.spec, data_root, default=path.name)
    val_logits, val_labels = model_logits(model, task, "validation", examples, device, model_source=path)
    test_logits, test_labels = model_logits(model, task, "test", examples, device, model_source=path)
    report = calibration_report(val_logits, val_labels, test_logits, test_labels, task.metric)
    atomic_write_json(path / "calibration.json", report)
    return report
