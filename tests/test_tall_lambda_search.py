"""Choosing TALL masks' lambda_t per task on validation (METHODS-SPEC 4.3-4.4): each task's own masked
model theta_0 + m_t * tau_MTL at coefficient 1, scored on that task's validation split; Consensus TA then
merges with those lambdas, and experiments / ``distac merge --search`` do this unless lambda_t is given."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distac.experiments.merge_eval import choose_tall_lambdas, searches_tall_lambdas

GRID = (0.2, 0.3, 0.4, 0.5, 0.6)


def _reference_kept(pretrained: dict, vectors: dict, task: str, lam: float) -> int:
    """Entries the task's TALL mask keeps, from the spec: m_t = |tau_t| > lambda * |tau_MTL - tau_t|."""
    kept = 0
    for k in pretrained:
        mtl = sum(v[k] for v in vectors.values())
        kept += int((vectors[task][k].abs() > lam * (mtl - vectors[task][k]).abs()).sum())
    return kept


class _TargetDensityBank:
    """Scores a backbone by how near the number of entries it changes is to a per-task target, so each
    task prefers its own lambda and the choice can be worked out by hand."""

    def __init__(self, pretrained: dict, targets: dict[str, int]) -> None:
        self.pretrained, self.targets = pretrained, targets
        self.calls: list[tuple[str, str]] = []

    def score(self, task: str, backbone: dict, split: str) -> SimpleNamespace:
        self.calls.append((task, split))
        changed = sum(int((backbone[k] != v).sum()) for k, v in self.pretrained.items())
        return SimpleNamespace(score=-abs(changed - self.targets[task]))


def test_each_task_gets_the_lambda_of_its_own_best_masked_model() -> None:
    torch.manual_seed(0)
    pretrained = {"w": torch.randn(16, 12), "b": torch.randn(12)}
    vectors = {name: {k: torch.randn_like(v) for k, v in pretrained.items()} for name in ("a", "b", "c")}
    wanted = {"a": 0.2, "b": 0.4, "c": 0.6}
    counts = {t: [_reference_kept(pretrained, vectors, t, lam) for lam in GRID] for t in vectors}
    assert all(len(set(c)) == len(GRID) for c in counts.values())  # each lambda keeps a different number
    bank = _TargetDensityBank(pretrained, {t: counts[t][GRID.index(lam)] for t, lam in wanted.items()})
    result = choose_tall_lambdas(pretrained, vectors, bank)  # type: ignore[arg-type]
    # the masked model of task t is theta_0 + m_t * tau_MTL (coefficient 1): it changes exactly the
    # entries its mask keeps, so each task finds the lambda whose count it was given
    assert result.best == wanted
    assert all(score == 0 for score in result.best_scores.values())
    assert {split for _, split in bank.calls} == {"validation"} and len(bank.calls) == len(GRID) * 3
    assert [p["lambda"] for p in result.scores["a"]] == list(GRID)


def test_lambda_t_is_searched_for_tall_methods_unless_given() -> None:
    assert searches_tall_lambdas("consensus_ta", {}) and searches_tall_lambdas("tall_masks", None)
    assert not searches_tall_lambdas("consensus_ta", {"lambda_t": 0.4})
    assert not searches_tall_lambdas("ties", {})


@pytest.mark.parametrize("name", ["tall_masks", "average"])
def test_fixed_scale_methods_are_not_searched_by_default(name: str) -> None:
    from distac.merging.registry import method_class

    # TALL masks merge at 1.0 and tune lambda_t instead; the average is a fixed 1/T (METHODS-SPEC 2.3, 4.3)
    assert method_class(name).tunes_coefficient is False
    assert method_class("consensus_ta").tunes_coefficient is True  # its alpha is searched (4.4)
