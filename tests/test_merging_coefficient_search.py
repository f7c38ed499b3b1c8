"""Validation search of the shared coefficient and of TALL's per-task lambda."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from distac.merging import (
    TALL_LAMBDA_GRID,
    MergeConfigError,
    apply_merge,
    default_grid,
    get_method,
    search_coefficient,
    search_tall_lambdas,
    wide_grid,
)


def test_default_grid_is_exactly_0_to_1_step_0_05() -> None:
    grid = default_grid()
    assert len(grid) == 21
    assert grid[0] == 0.0 and grid[1] == 0.05 and grid[3] == 0.15 and grid[7] == 0.35 and grid[-1] == 1.0
    assert list(grid) == [round(i * 0.05, 2) for i in range(21)]
    assert 0.3 in grid  # 6 * 0.05 = 0.30000000000000004 without rounding
    wide = wide_grid()
    assert len(wide) == 30 and wide[0] == 0.1 and wide[2] == 0.3 and wide[-1] == 3.0


def _table(coefficient: float) -> dict[str, float]:
    # task "hard" has a low individual accuracy, so normalisation weighs it more
    table = {
        0.0: {"easy": 0.50, "hard": 0.10},
        0.05: {"easy": 0.90, "hard": 0.10},  # best raw mean (0.50)
        0.1: {"easy": 0.70, "hard": 0.20},  # best normalized mean ((0.7/0.9 + 0.2/0.25) / 2)
        0.15: {"easy": 0.60, "hard": 0.15},
    }
    return table[coefficient]


def test_search_picks_best_mean_accuracy_and_records_the_curve() -> None:
    calls: list[float] = []

    def evaluate(c: float) -> dict[str, float]:
        calls.append(c)
        return _table(c)

    result = search_coefficient(evaluate, grid=[0.15, 0.0, 0.1, 0.05])
    assert calls == [0.0, 0.05, 0.1, 0.15]  # ascending
    assert result.best_coefficient == 0.05
    assert result.best_score == pytest.approx(0.5)
    assert [p["coefficient"] for p in result.curve] == [0.0, 0.05, 0.1, 0.15]
    assert result.curve[2]["per_task"] == {"easy": 0.70, "hard": 0.20}
    assert result.curve[2]["score"] == pytest.approx(0.45)
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["best_coefficient"] == 0.05 and payload["score"] == "mean accuracy"
    assert payload["curve"][1] == {"coefficient": 0.05, "score": pytest.approx(0.5), "per_task": _table(0.05)}


def test_search_with_individual_accuracies_uses_normalized_accuracy() -> None:
    individual = {"easy": 0.9, "hard": 0.25}
    result = search_coefficient(_table, grid=[0.0, 0.05, 0.1, 0.15], individual=individual)
    assert result.best_coefficient == 0.1
    assert result.best_score == pytest.approx((0.7 / 0.9 + 0.2 / 0.25) / 2)
    assert result.normalized and result.to_json()["score"] == "mean normalized accuracy"


def test_ties_go_to_the_smallest_coefficient() -> None:
    result = search_coefficient(lambda c: {"a": 0.8 if c >= 0.5 else 0.1}, grid=[1.0, 0.5, 0.75, 0.25])
    assert result.best_coefficient == 0.5


def test_patience_stops_early_on_absolute_accuracy() -> None:
    seen: list[float] = []

    def evaluate(c: float) -> dict[str, float]:
        seen.append(c)
        return {"a": 1.0 - abs(c - 0.3)}

    result = search_coefficient(evaluate, grid=wide_grid(), patience=3)
    assert seen == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert result.best_coefficient == 0.3 and result.stopped_early
    full = search_coefficient(evaluate, grid=[0.1, 0.2, 0.3, 0.4])
    assert not full.stopped_early


def test_search_errors() -> None:
    with pytest.raises(MergeConfigError, match="grid is empty"):
        search_coefficient(lambda c: {"a": 1.0}, grid=[])
    with pytest.raises(MergeConfigError, match="duplicate"):
        search_coefficient(lambda c: {"a": 1.0}, grid=[0.1, 0.1])
    with pytest.raises(MergeConfigError, match="grid value"):
        search_coefficient(lambda c: {"a": 1.0}, grid=[float("nan")])
    with pytest.raises(MergeConfigError, match="non-empty mapping"):
        search_coefficient(lambda c: {}, grid=[0.1])
    with pytest.raises(MergeConfigError, match="accuracy of task 'a' at coefficient 0.1"):
        search_coefficient(lambda c: {"a": float("nan")}, grid=[0.1])
    with pytest.raises(MergeConfigError, match="returned tasks"):
        search_coefficient(lambda c: {"a": 1.0} if c < 0.5 else {"b": 1.0}, grid=[0.1, 0.9])
    with pytest.raises(MergeConfigError, match="no accuracy for task 'b'"):
        search_coefficient(lambda c: {"a": 1.0, "b": 1.0}, grid=[0.1], individual={"a": 0.9})
    with pytest.raises(MergeConfigError, match="must be > 0"):
        search_coefficient(lambda c: {"a": 1.0}, grid=[0.1], individual={"a": 0.0})
    with pytest.raises(MergeConfigError, match="patience"):
        search_coefficient(lambda c: {"a": 1.0}, grid=[0.1], patience=0)


def test_search_end_to_end_with_apply_merge() -> None:
    # "accuracy" of task t = 1 - distance of the merged weight to the fine-tuned one: with two
    # opposite task vectors the TA optimum is where the two distances balance.
    pretrained = {"w": torch.zeros(2)}
    tvs = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    result = get_method("task_arithmetic").merge(tvs, task_names=["a", "b"])

    def evaluate(c: float) -> dict[str, float]:
        merged = apply_merge(pretrained, result, c)["w"]
        return {name: 1.0 - float((merged - tv["w"]).norm()) for name, tv in zip(["a", "b"], tvs, strict=True)}

    # distance = sqrt((1 - c)^2 + c^2), minimal at c = 0.5
    assert search_coefficient(evaluate).best_coefficient == 0.5


# ----------------------------------------------------------------------------------------- TALL lambda search
def test_tall_lambda_search_picks_per_task_and_breaks_ties_low() -> None:
    order: list[tuple[str, float]] = []

    def evaluate(task: str, lam: float) -> float:
        order.append((task, lam))
        if task == "a":
            return {0.2: 0.5, 0.3: 0.7, 0.4: 0.6, 0.5: 0.6, 0.6: 0.1}[lam]
        return 0.9 if lam >= 0.4 else 0.3  # tie between 0.4, 0.5, 0.6 -> 0.4

    result = search_tall_lambdas(evaluate, ["a", "b"])
    assert result.best == {"a": 0.3, "b": 0.4}
    assert result.best_scores == {"a": 0.7, "b": 0.9}
    assert order[:4] == [("a", 0.2), ("b", 0.2), ("a", 0.3), ("b", 0.3)]  # grid is the outer loop
    assert [p["lambda"] for p in result.scores["a"]] == list(TALL_LAMBDA_GRID)
    json.dumps(result.to_json())
    method = get_method("tall_masks", lambda_t=result.best)
    assert method.hyperparameters["lambda_t"] == {"a": 0.3, "b": 0.4}


def test_tall_lambda_search_with_cached_merges() -> None:
    tvs = [{"w": torch.tensor([1.0, 0.2, -0.5])}, {"w": torch.tensor([0.1, 0.8, 0.5])}]
    names = ["a", "b"]
    merges: list[float] = []

    @functools.cache
    def merged(lam: float):
        merges.append(lam)
        return get_method("tall_masks", lambda_t=lam).merge(tvs, task_names=names)

    def evaluate(task: str, lam: float) -> float:
        update = merged(lam).per_task[task]["w"]
        target = tvs[names.index(task)]["w"]
        return -float((update - target).abs().sum())

    result = search_tall_lambdas(evaluate, names)
    assert merges == list(TALL_LAMBDA_GRID)
    # task a: tau_MTL = [1.1, 1.0, 0.0]; mask |tau_a| > lam |tau_b| = [1 > .1 lam, .2 > .8 lam, .5 > .5 lam].
    # Coordinate 1 is kept only for lam < 0.25 (error |1.0 - 0.2| = 0.8 instead of 0.2 when dropped), so
    # lam = 0.2 scores -1.4 and every lam >= 0.3 scores -0.8: the tie goes to 0.3.
    assert result.best_scores["a"] == pytest.approx(-0.8)
    assert result.best["a"] == 0.3


def test_tall_lambda_search_errors() -> None:
    with pytest.raises(MergeConfigError, match="task_names is empty"):
        search_tall_lambdas(lambda t, lam: 1.0, [])
    with pytest.raises(MergeConfigError, match="grid is empty"):
        search_tall_lambdas(lambda t, lam: 1.0, ["a"], grid=[])
    with pytest.raises(MergeConfigError, match="non-finite"):
        search_tall_lambdas(lambda t, lam: float("inf"), ["a"])
    with pytest.raises(MergeConfigError, match="grid value"):
        search_tall_lambdas(lambda t, lam: 1.0, ["a"], grid=[-0.1])
