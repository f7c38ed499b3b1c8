"""Evaluate merges the way the paper does: one shared coefficient chosen on validation data,
then absolute and normalized test accuracy per task.

A merged model for task t is the source model of t (its head) with the shared backbone parameters
replaced by the merged ones. One model object per task is kept and its backbone weights are
swapped in place, so a coefficient search costs forward passes only. BatchNorm running statistics
are per task too: by default (``batchnorm_statistics="auto"``) they are re-estimated for every
merged backbone on unlabeled training inputs of the task (:mod:`distac.models.batchnorm`), since
the source's own statistics describe the source's weights, not the merge; ``"keep"`` uses the
source's.

Each test row also says how well the merged model can be recalibrated afterwards, as the paper
proposes: a temperature fitted on the task's validation logits at the chosen coefficient
(:mod:`distac.evaluation.calibration`), and the test ECE / NLL / entropy under it (``calibrated``).
Accuracy is unchanged by a temperature, so only the confidence metrics move.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from distac.checkpoints import StateDict
from distac.config import check_choice_option, check_option
from distac.data import TaskData
from distac.errors import ConfigError
from distac.evaluation.calibration import calibration_report
from distac.evaluation.metrics import TaskMetrics, compute_metrics
from distac.merging.base import MergeResult, apply_merge
from distac.merging.coefficient_search import search_coefficient
from distac.merging.registry import get_method
from distac.merging.tall_masks import TALL_LAMBDA_GRID, TallLambdaSearchResult, search_tall_lambdas
from distac.models.base import ClassifierModel
from distac.models.batchnorm import (
    BATCHNORM_CHOICES,
    DEFAULT_BATCHNORM_EXAMPLES,
    batchnorm_buffers,
    estimation_inputs,
    recompute_batchnorm_statistics,
    resolve_batchnorm_choice,
)
from distac.models.inference import predict_logits


@dataclass
class EvalSettings:
    batch_size: int = 128
    device: str = "auto"
    validation_examples: int | None = None
    test_examples: int | None = None
    batchnorm_statistics: str = "auto"  # auto / recompute: re-estimate for merged backbones; keep: the source's
    batchnorm_examples: int = DEFAULT_BATCHNORM_EXAMPLES
    #: Search lambda on validation for the tuning-free methods too (EMR, WUDI, TALL masks, average). Off:
    #: they merge at their paper's 1.0, as METHODS-SPEC 4.10 has it; the text8 and vision pages were made
    #: with it on.
    search_tuning_free: bool = False

    def __post_init__(self) -> None:
        check_choice_option("evaluation", "batchnorm_statistics", self.batchnorm_statistics, BATCHNORM_CHOICES)
        check_option("evaluation", "batchnorm_examples", self.batchnorm_examples, low=1, integer=True)
        if not isinstance(self.search_tuning_free, bool):
            raise ConfigError(f"evaluation.search_tuning_free: true or false, got {self.search_tuning_free!r}")


class TaskModelBank:
    """One model per task; ``score`` loads a backbone state into the task's model and evaluates it."""

    def __init__(
        self,
        models: Mapping[str, ClassifierModel],
        tasks: Mapping[str, TaskData],
        settings: EvalSettings,
    ) -> None:
        self.models = dict(models)
        self.tasks = dict(tasks)
        self.settings = settings
        first = next(iter(self.models.values()))
        self.selector = first.task_vector_selector()
        self.keys = [k for k, v in first.state_dict().items() if self.selector(k, v)]
        self._originals = {
            t: {k: v.detach().clone() for k, v in m.state_dict().items() if k in self.keys}
            for t, m in self.models.items()
        }
        self._statistics = {t: batchnorm_buffers(m) for t, m in self.models.items()}
        self._estimation_inputs: dict[str, Any] = {}

    def recomputes_batchnorm(self, task: str) -> bool:
        """Whether merged backbones of ``task`` get freshly estimated BatchNorm statistics."""
        return resolve_batchnorm_choice(self.settings.batchnorm_statistics, self.models[task])

    def batchnorm_mode(self, tasks: Sequence[str] | None = None) -> str:
        """What merged backbones of ``tasks`` get, as merge records store it: "recompute" or "keep"."""
        tasks = list(self.models) if tasks is None else tasks
        return "recompute" if any(self.recomputes_batchnorm(t) for t in tasks) else "keep"

    def _batchnorm_inputs(self, task: str) -> Any:
        if task not in self._estimation_inputs:
            raw = self.tasks[task].unlabeled()
            self._estimation_inputs[task] = estimation_inputs(raw, self.settings.batchnorm_examples, seed=0)
        return self._estimation_inputs[task]

    def original_backbone(self, task: str) -> StateDict:
        return self._originals[task]

    def _split(self, task: str, split: str):  # noqa: ANN202
        data = self.tasks[task].split(split)
        limit = self.settings.validation_examples if split == "validation" else self.settings.test_examples
        return data.subsample(limit, seed=17) if limit else data

    def score(self, task: str, backbone: Mapping[str, torch.Tensor] | None, split: str) -> TaskMetrics:
        """Metrics of ``backbone`` (None: the task's own source) with the task's head on ``split``."""
        logits, labels = self.logits(task, backbone, (split,))[split]
        return compute_metrics(logits, labels, metric=self.tasks[task].metric)

    @torch.no_grad()
    def logits(
        self, task: str, backbone: Mapping[str, torch.Tensor] | None, splits: Sequence[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(logits, labels) per split, from one load of ``backbone`` (and one BatchNorm re-estimation)."""
        model = self.models[task]
        state = backbone if backbone is not None else self._originals[task]
        model.load_state_dict({k: state[k] for k in self.keys}, strict=False)
        try:
            if backbone is not None and self.recomputes_batchnorm(task):
                recompute_batchnorm_statistics(
                    model,
                    self._batchnorm_inputs(task),
                    batch_size=self.settings.batch_size,
                    device=self.settings.device,
                )
            out = {}
            for split in splits:
                data = self._split(task, split)
                logits = predict_logits(
                    model, data.inputs, batch_size=self.settings.batch_size, device=self.settings.device
                )
                out[split] = (logits, torch.as_tensor(data.labels))
        finally:
            # Put the source's own weights back: callers share these model objects (another bank, task
            # vectors computed from model.state_dict()), and a merged backbone left behind would
            # silently become their "individual" model.
            if backbone is not None:
                model.load_state_dict({**self._originals[task], **self._statistics[task]}, strict=False)
        return out


def individual_scores(bank: TaskModelBank, split: str) -> dict[str, TaskMetrics]:
    return {t: bank.score(t, None, split) for t in bank.models}


@dataclass
class MergeEvaluation:
    method: str
    coefficient: float
    search: dict[str, Any] | None
    test: dict[str, dict[str, Any]]  # per task: TaskMetrics fields, normalized, calibrated
    absolute: float
    normalized: float
    merge_seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    #: "recompute" when the merged backbones got freshly estimated BatchNorm statistics, else "keep"
    batchnorm_statistics: str = "keep"
    #: TALL masks / Consensus TA: the per-task lambda_t chosen on validation (None: given, not searched)
    lambda_t_search: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "coefficient": self.coefficient,
            "absolute": self.absolute,
            "normalized": self.normalized,
            "merge_seconds": self.merge_seconds,
            "test": self.test,
            "search": self.search,
            "info": self.info,
            "batchnorm_statistics": self.batchnorm_statistics,
            "lambda_t_search": self.lambda_t_search,
        }


def evaluate_method(
    method: str,
    pretrained: StateDict,
    task_vectors: Mapping[str, StateDict],
    bank: TaskModelBank,
    *,
    individual_val: Mapping[str, TaskMetrics],
    individual_test: Mapping[str, TaskMetrics],
    grid: Sequence[float] | None,
    hyperparameters: Mapping[str, Any] | None = None,
    coefficient: float | None = None,
) -> MergeEvaluation:
    """Merge, pick the coefficient on validation (unless given or the method has none), test.

    TALL masks and Consensus TA first choose their mask threshold lambda_t per task on validation, as
    their paper does (:func:`choose_tall_lambdas`), unless the hyperparameters pin ``lambda_t``."""
    names = list(task_vectors)
    options = dict(hyperparameters or {})
    configured = get_method(method, **options)
    lambda_search = None
    if searches_tall_lambdas(method, options):
        start = time.perf_counter()
        lambda_search = choose_tall_lambdas(pretrained, task_vectors, bank, options).to_json()
        lambda_search["seconds"] = time.perf_counter() - start
        options["lambda_t"] = lambda_search["best"]
    merger = configured if lambda_search is None else get_method(method, **options)
    start = time.perf_counter()
    result: MergeResult = merger.merge([task_vectors[t] for t in names], task_names=names, pretrained=pretrained)
    merge_seconds = time.perf_counter() - start
    # the record keeps the configured hyperparameters (what a cached merge is matched on); the lambdas
    # used are in the info's ``lambdas`` and how they were chosen in ``lambda_t_search``
    info = {**result.info, "hyperparameters": configured.hyperparameters}

    def merged_for(task: str, coef: float) -> StateDict:
        return apply_merge(pretrained, result, coef, task=task if result.per_task is not None else None)

    search_record = None
    if coefficient is None and grid:

        def evaluate(coef: float) -> dict[str, float]:
            shared = None if result.per_task is not None else merged_for(names[0], coef)
            return {
                t: bank.score(t, shared if shared is not None else merged_for(t, coef), "validation").score
                for t in names
            }

        reference = {t: individual_val[t].score for t in names}
        # normalized accuracy is undefined when an individual score is <= 0 (e.g. CoLA MCC of a weak
        # source): then the search ranks by the mean raw score instead.
        search = search_coefficient(evaluate, grid, reference if all(v > 0 for v in reference.values()) else None)
        coefficient = search.best_coefficient
        search_record = search.to_json()
    elif coefficient is None:
        coefficient = merger.default_coefficient
    test: dict[str, dict[str, Any]] = {}
    shared = None if result.per_task is not None else merged_for(names[0], coefficient)
    for t in names:
        backbone = shared if shared is not None else merged_for(t, coefficient)
        split_logits = bank.logits(t, backbone, ("validation", "test"))
        report = calibration_report(*split_logits["validation"], *split_logits["test"], metric=bank.tasks[t].metric)
        row = dict(report["before"])
        row["calibrated"] = {"temperature": report["temperature"]} | {
            k: report["after"][k] for k in ("entropy", "ece", "nll")
        }
        ref = individual_test[t].score
        row["normalized"] = row["score"] / ref if ref > 0 else float("nan")
        test[t] = row
    absolute = sum(r["score"] for r in test.values()) / len(test)
    defined = [r["normalized"] for r in test.values() if math.isfinite(r["normalized"])]
    normalized = sum(defined) / len(defined) if defined else float("nan")
    return MergeEvaluation(
        method,
        float(coefficient),
        search_record,
        test,
        absolute,
        normalized,
        merge_seconds,
        info=info,
        batchnorm_statistics=bank.batchnorm_mode(names),
        lambda_t_search=lambda_search,
    )


#: Methods built on TALL masks, whose mask threshold lambda_t is chosen per task on validation.
TALL_MASK_METHODS = ("tall_masks", "consensus_ta")


def searches_tall_lambdas(method: str, hyperparameters: Mapping[str, Any] | None) -> bool:
    """Whether :func:`evaluate_method` chooses lambda_t on validation: for TALL masks and Consensus TA,
    unless ``lambda_t`` is given (a float for every task, or one per task)."""
    return method in TALL_MASK_METHODS and "lambda_t" not in (hyperparameters or {})


def choose_tall_lambdas(
    pretrained: StateDict,
    task_vectors: Mapping[str, StateDict],
    bank: TaskModelBank,
    hyperparameters: Mapping[str, Any] | None = None,
    grid: Sequence[float] = TALL_LAMBDA_GRID,
) -> TallLambdaSearchResult:
    """lambda_t per task as the TALL-masks paper chooses it (METHODS-SPEC 4.3; Consensus TA reuses the
    masks, 4.4): for each lambda of ``grid``, the task's own TALL-masked model theta_0 + m_t * tau_MTL
    (coefficient 1) is scored on that task's validation split, and each task keeps its best lambda.
    tau_MTL follows the method's ``use_ties`` / ``ties_density``. One TALL merge per lambda is held
    at a time."""
    names = list(task_vectors)
    shared = {k: v for k, v in (hyperparameters or {}).items() if k in ("use_ties", "ties_density", "device")}

    @functools.lru_cache(maxsize=1)
    def masked(lambda_t: float) -> MergeResult:
        method = get_method("tall_masks", lambda_t=lambda_t, **shared)
        return method.merge([task_vectors[t] for t in names], task_names=names, pretrained=pretrained)

    def score(task: str, lambda_t: float) -> float:
        return bank.score(task, apply_merge(pretrained, masked(lambda_t), 1.0, task=task), "validation").score

    return search_tall_lambdas(score, names, grid)
