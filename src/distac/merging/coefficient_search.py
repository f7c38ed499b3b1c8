"""Validation search for the one shared scaling coefficient of a merge (lambda / alpha).

DisTaC's protocol (REFERENCE.md, METHODS-SPEC 2.2-2.3): evaluate the merged model at every
coefficient of {0.0, 0.05, ..., 1.0} on the tasks' validation splits, score each coefficient by the
mean over tasks of the *normalized* accuracy (merged accuracy / that task's individual fine-tuned
accuracy, when ``individual`` is given; plain accuracy otherwise), and keep the best. Selection
uses a strict ``>``, so among equal scores the smallest coefficient wins (``find_optimal_coef`` of
the reference code, which walks the grid in ascending order).

``patience`` adds the Iso-merging repository's early stop (stop after that many consecutive
coefficients whose mean *absolute* accuracy does not beat the best so far); it is off by default
because DisTaC evaluates the whole grid. :func:`wide_grid` is the TSV/Iso grid {0.1, ..., 3.0}.

The caller supplies ``evaluate(coefficient) -> {task: accuracy}``, typically
``apply_merge(pretrained, result, coefficient)`` followed by an evaluation per task, so one
``merge()`` serves the whole grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distac.merging.base import MergeConfigError


def default_grid() -> tuple[float, ...]:
    """{0.0, 0.05, ..., 1.0}: 21 values, exactly ``round(i * 0.05, 2)`` (no float drift)."""
    return tuple(round(i * 0.05, 2) for i in range(21))


def wide_grid() -> tuple[float, ...]:
    """{0.1, 0.2, ..., 3.0}: the official TSV-M / Iso-C / Iso-CTS grid."""
    return tuple(round(i * 0.1, 1) for i in range(1, 31))


@dataclass
class CoefficientSearchResult:
    best_coefficient: float
    best_score: float
    curve: list[dict[str, Any]]
    normalized: bool = False
    individual: dict[str, float] | None = None
    stopped_early: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the project's ``to_json`` convention)."""
        return {
            "best_coefficient": self.best_coefficient,
            "best_score": self.best_score,
            "score": "mean normalized accuracy" if self.normalized else "mean accuracy",
            "individual": dict(self.individual) if self.individual is not None else None,
            "stopped_early": self.stopped_early,
            "curve": [
                {"coefficient": p["coefficient"], "score": p["score"], "per_task": dict(p["per_task"])}
                for p in self.curve
            ],
        }


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MergeConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def mean_score(per_task: Mapping[str, float], individual: Mapping[str, float] | None = None) -> float:
    """Mean over tasks of accuracy, divided by the individual accuracy of each task if given."""
    if individual is None:
        return sum(per_task.values()) / len(per_task)
    return sum(per_task[t] / individual[t] for t in per_task) / len(per_task)


def search_coefficient(
    evaluate: Callable[[float], Mapping[str, float]],
    grid: Sequence[float] = default_grid(),
    individual: Mapping[str, float] | None = None,
    *,
    patience: int | None = None,
) -> CoefficientSearchResult:
    """Evaluate every coefficient of ``grid`` (ascending) and return the best (see module docstring)."""
    values = [_finite("grid value", v) for v in grid]
    if not values:
        raise MergeConfigError("grid is empty: give at least one coefficient")
    if len(set(values)) != len(values):
        raise MergeConfigError(f"grid has duplicate coefficients: {values}")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise MergeConfigError(f"patience must be a positive integer or None, got {patience!r}")
    reference: dict[str, float] | None = None
    if individual is not None:
        reference = {str(t): _finite(f"individual[{t!r}]", v) for t, v in individual.items()}
        bad = [t for t, v in reference.items() if v <= 0]
        if bad:
            raise MergeConfigError(f"individual accuracy of task {bad[0]!r} is {reference[bad[0]]}; it must be > 0")
    values.sort()
    curve: list[dict[str, Any]] = []
    tasks: set[str] | None = None
    best_index = -1
    best_absolute = -math.inf
    since_improvement = 0
    stopped_early = False
    for coefficient in values:
        raw = evaluate(coefficient)
        if not isinstance(raw, Mapping) or not raw:
            raise MergeConfigError(
                f"evaluate({coefficient}) must return a non-empty mapping task -> accuracy, got {raw!r}"
            )
        per_task = {str(t): _finite(f"accuracy of task {t!r} at coefficient {coefficient}", a) for t, a in raw.items()}
        if tasks is None:
            tasks = set(per_task)
            if reference is not None and not tasks <= set(reference):
                missing = sorted(tasks - set(reference))
                raise MergeConfigError(f"individual has no accuracy for task {missing[0]!r}")
        elif set(per_task) != tasks:
            raise MergeConfigError(
                f"evaluate({coefficient}) returned tasks {sorted(per_task)}, but earlier coefficients returned "
                f"{sorted(tasks)}"
            )
        score = mean_score(per_task, reference)
        curve.append({"coefficient": coefficient, "score": score, "per_task": per_task})
        if best_index < 0 or score > curve[best_index]["score"]:
            best_index = len(curve) - 1
        if patience is not None:
            absolute = mean_score(per_task)
            if absolute > best_absolute:
                best_absolute, since_improvement = absolute, 0
            else:
                since_improvement += 1
                if since_improvement >= patience and coefficient != values[-1]:
                    stopped_early = True
                    break
    best = curve[best_index]
    return CoefficientSearchResult(
        best_coefficient=best["coefficient"],
        best_score=best["score"],
        curve=curve,
        normalized=reference is not None,
        individual=reference,
        stopped_early=stopped_early,
    )
