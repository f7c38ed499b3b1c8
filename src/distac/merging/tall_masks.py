"""TALL masks and Consensus merging (Wang et al., "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024).

Both start from a multi-task vector tau_MTL: the task-arithmetic sum (default) or, with
``use_ties=True``, TIES with ``ties_density`` (paper: 0.2) and disjoint *sum* (as the reference code
does for its TIES-based variants).

TALL masks (task-conditional, ``name = "tall_masks"``). Per task, a binary mask keeps the entries
where the task's own update dominates what the other tasks add:

    m_t = 1[ |tau_t| > lambda_t * |tau_MTL - tau_t| ]          theta_t = theta_pre + m_t * tau_MTL

with coefficient 1.0 (``default_coefficient``). ``lambda_t`` is chosen *per task* on that task's
validation accuracy from {0.2, 0.3, 0.4, 0.5, 0.6} in the paper (:data:`TALL_LAMBDA_GRID`,
:func:`search_tall_lambdas`); experiments and ``distac merge --search`` do that for TALL masks and
Consensus TA unless ``lambda_t`` is given. Without that search the default is 0.6 (FusionBench's single
default, the top of the paper's grid). ``lambda_t`` is a float (all tasks) or a mapping task ->
lambda covering every task. With one task, tau_MTL = tau_1 and the mask keeps every nonzero entry,
so theta_1 is reproduced exactly.

Consensus TA (task-agnostic, ``name = "consensus_ta"``). Keep the entries that at least ``k`` TALL
masks keep (paper and DisTaC: k = 2; count 0 = "catastrophic", count 1 = "selfish" weights are
dropped):

    C = 1[ sum_t m_t >= k ]          theta = theta_pre + alpha * (C * tau_MTL)

k = 0 recovers task arithmetic, k > T gives the zero vector. alpha is searched on validation data
(DisTaC: {0, 0.05, ..., 1}); ``default_coefficient = 0.3`` is task arithmetic's default, since the
paper gives no search-free value and C * tau_MTL is a sparsified TA sum.

Non-matrix parameters: masked exactly like weight matrices (every key, elementwise).

Memory: masks are never materialised for all keys at once; each key's T masks are built, used
(and, for Consensus, counted) and dropped. The per-task outputs of ``tall_masks`` are full state
dicts, as the :class:`~distac.merging.base.MergeResult` contract requires.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from distac.merging.base import (
    MergeConfigError,
    MergeInputs,
    MergeMethod,
    MergeResult,
    StateDict,
    check_number,
)
from distac.merging.task_arithmetic import sum_key
from distac.merging.ties import ties_merge

log = logging.getLogger("distac.merging")

#: The per-task lambda grid of the TALL-masks paper and code.
TALL_LAMBDA_GRID: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_TALL_LAMBDA = 0.6


def tall_mask(tau_t: torch.Tensor, tau_mtl: torch.Tensor, lambda_t: float) -> torch.Tensor:
    """m_t = |tau_t| > lambda_t * |tau_MTL - tau_t| (boolean, same shape)."""
    return tau_t.abs() > lambda_t * (tau_mtl - tau_t).abs()


def _check_lambda(name: str, value: object) -> float:
    return float(check_number(name, value, low=0.0))


class _TallBase(MergeMethod):
    """Shared validation and tau_MTL construction of TALL masks and Consensus."""

    def __init__(
        self,
        lambda_t: float | Mapping[str, float],
        use_ties: bool,
        ties_density: float,
        device: str | torch.device | None,
    ) -> None:
        super().__init__(device=device)
        if isinstance(lambda_t, Mapping):
            if not lambda_t:
                raise MergeConfigError("lambda_t mapping is empty; give one lambda per task or a single float")
            self.lambda_t: float | dict[str, float] = {
                str(task): _check_lambda(f"lambda_t[{task!r}]", value) for task, value in lambda_t.items()
            }
        else:
            self.lambda_t = _check_lambda("lambda_t", lambda_t)
        if not isinstance(use_ties, bool):
            raise MergeConfigError(f"use_ties must be True or False, got {use_ties!r}")
        self.use_ties = use_ties
        self.ties_density = float(check_number("ties_density", ties_density, low=0.0, high=1.0, low_inclusive=False))
        self._set_hyperparameters(
            lambda_t=self.lambda_t if isinstance(self.lambda_t, float) else dict(self.lambda_t),
            use_ties=self.use_ties,
            ties_density=self.ties_density,
        )

    def _lambdas(self, task_names: Sequence[str]) -> list[float]:
        if not isinstance(self.lambda_t, dict):
            return [self.lambda_t] * len(task_names)
        missing = [t for t in task_names if t not in self.lambda_t]
        if missing:
            raise MergeConfigError(
                f"lambda_t has no value for task {missing[0]!r}; it covers {sorted(self.lambda_t)} "
                f"but the tasks are {list(task_names)}"
            )
        extra = sorted(set(self.lambda_t) - set(task_names))
        if extra:
            raise MergeConfigError(f"lambda_t names unknown task {extra[0]!r}; the tasks are {list(task_names)}")
        return [self.lambda_t[t] for t in task_names]

    def _multitask_vector(self, inputs: MergeInputs) -> tuple[Callable[[str], torch.Tensor], dict[str, Any]]:
        """A function key -> float32 tau_MTL for that key, and diagnostics. The TA sum is computed
        per key on demand; TIES needs its global thresholds first, so it is computed up front."""
        if not self.use_ties:
            return (lambda key: sum_key(inputs, key)), {}
        output = ties_merge(inputs, self.ties_density, "sum")
        return output.merged.__getitem__, {"ties": output.diagnostics}


class TallMasks(_TallBase):
    name: ClassVar[str] = "tall_masks"
    task_conditional: ClassVar[bool] = True
    default_coefficient: ClassVar[float] = 1.0
    tunes_coefficient: ClassVar[bool] = False  # coefficient 1.0 (METHODS-SPEC 4.3); lambda_t is what is tuned

    def __init__(
        self,
        lambda_t: float | Mapping[str, float] = DEFAULT_TALL_LAMBDA,
        use_ties: bool = False,
        ties_density: float = 0.2,
        *,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(lambda_t, use_ties, ties_density, device)

    def _merge(self, inputs: MergeInputs) -> MergeResult:
        lambdas = self._lambdas(inputs.task_names)
        mtl_for, diagnostics = self._multitask_vector(inputs)
        shared: StateDict = {}
        per_task: dict[str, StateDict] = {name: {} for name in inputs.task_names}
        kept = [0] * inputs.num_tasks
        for key in inputs.keys:
            mtl = mtl_for(key)
            zero = torch.zeros((), dtype=mtl.dtype, device=mtl.device)
            for task, name in enumerate(inputs.task_names):
                mask = tall_mask(inputs.tensor(task, key), mtl, lambdas[task])
                kept[task] += int(mask.sum())
                per_task[name][key] = inputs.output(key, torch.where(mask, mtl, zero))
            shared[key] = inputs.output(key, mtl)
        total = inputs.numel()
        info = self._info(
            inputs,
            lambdas=dict(zip(inputs.task_names, lambdas, strict=True)),
            mask_density={name: kept[i] / total for i, name in enumerate(inputs.task_names)},
            **diagnostics,
        )
        return MergeResult(task_vector=shared, per_task=per_task, info=info)


class ConsensusTA(_TallBase):
    name: ClassVar[str] = "consensus_ta"
    default_coefficient: ClassVar[float] = 0.3

    def __init__(
        self,
        k: int = 2,
        lambda_t: float | Mapping[str, float] = DEFAULT_TALL_LAMBDA,
        use_ties: bool = False,
        ties_density: float = 0.2,
        *,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(lambda_t, use_ties, ties_density, device)
        self.k = int(check_number("k", k, low=0, integer=True))
        self._set_hyperparameters(k=self.k)

    def _merge(self, inputs: MergeInputs) -> MergeResult:
        if self.k > inputs.num_tasks:
            log.warning(
                "consensus_ta: k=%d exceeds the %d source(s), so no weight reaches consensus and the merge is the "
                "pretrained model; lower k or merge more sources",
                self.k,
                inputs.num_tasks,
            )
        lambdas = self._lambdas(inputs.task_names)
        mtl_for, diagnostics = self._multitask_vector(inputs)
        merged: StateDict = {}
        histogram = torch.zeros(inputs.num_tasks + 1, dtype=torch.int64)
        for key in inputs.keys:
            mtl = mtl_for(key)
            count = torch.zeros(mtl.shape, dtype=torch.int32, device=mtl.device)
            for task in range(inputs.num_tasks):
                count += tall_mask(inputs.tensor(task, key), mtl, lambdas[task])
            histogram += torch.bincount(count.flatten(), minlength=inputs.num_tasks + 1).cpu()
            keep = count >= self.k
            merged[key] = inputs.output(
                key, torch.where(keep, mtl, torch.zeros((), dtype=mtl.dtype, device=mtl.device))
            )
        total = inputs.numel()
        kept = int(histogram[self.k :].sum()) if self.k <= inputs.num_tasks else 0
        info = self._info(
            inputs,
            lambdas=dict(zip(inputs.task_names, lambdas, strict=True)),
            kept_fraction=kept / total,
            mask_count_fraction=[int(h) / total for h in histogram],
            **diagnostics,
        )
        return MergeResult(task_vector=merged, info=info)


# ------------------------------------------------------------------------------------ lambda search
@dataclass
class TallLambdaSearchResult:
    """Per-task choice of lambda_t: ``best[task]``, its score, and every score seen."""

    best: dict[str, float]
    best_scores: dict[str, float]
    scores: dict[str, list[dict[str, float]]]

    def to_json(self) -> dict[str, Any]:
        return {
            "best": dict(self.best),
            "best_scores": dict(self.best_scores),
            "scores": {task: [dict(point) for point in curve] for task, curve in self.scores.items()},
        }


def search_tall_lambdas(
    evaluate: Callable[[str, float], float],
    task_names: Sequence[str],
    grid: Sequence[float] = TALL_LAMBDA_GRID,
) -> TallLambdaSearchResult:
    """Choose lambda_t per task as the paper does: the value in ``grid`` that maximises that task's
    validation score ``evaluate(task, lambda_t)`` (strictly greater wins, so ties go to the smaller
    lambda). Pass the result's ``best`` as ``lambda_t`` to :class:`TallMasks` / :class:`ConsensusTA`.

    The grid is the outer loop, so an ``evaluate`` that caches one ``TallMasks(lambda_t=lam).merge``
    per lambda (e.g. with ``functools.lru_cache``) merges only ``len(grid)`` times.
    """
    names = list(task_names)
    if not names:
        raise MergeConfigError("task_names is empty")
    if len(set(names)) != len(names):
        raise MergeConfigError(f"task_names must be unique, got {names}")
    values = [_check_lambda("grid value", v) for v in grid]
    if not values:
        raise MergeConfigError("grid is empty")
    if len(set(values)) != len(values):
        raise MergeConfigError(f"grid has duplicate values: {values}")
    values.sort()
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    best: dict[str, float] = {}
    best_scores: dict[str, float] = {}
    for lam in values:
        for name in names:
            score = float(evaluate(name, lam))
            if not math.isfinite(score):
                raise MergeConfigError(f"evaluate({name!r}, {lam}) returned a non-finite score {score}")
            scores[name].append({"lambda": lam, "score": score})
            if name not in best or score > best_scores[name]:
                best[name], best_scores[name] = lam, score
    return TallLambdaSearchResult(best=best, best_scores=best_scores, scores=scores)
