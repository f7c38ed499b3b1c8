"""DisTaC's loss terms against hand computation (REFERENCE.md: KL on soft targets times T_s * T_t,
student temperature above the teacher's to raise confidence, L2 anchor to the scaled start, kappa
that shrinks the longest vector to the others' mean norm)."""

from __future__ import annotations

import math

import pytest
import torch

from distac.conditioning.losses import distillation_loss, l2_to_init_penalty, scaling_coefficient


def test_distillation_loss_is_the_scaled_kl_of_soft_targets() -> None:
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    t_s, t_t = 2.0, 1.0
    expected = 0.0
    for z_s, z_t in zip(student.tolist(), teacher.tolist(), strict=True):
        p = [math.exp(v / t_t) for v in z_t]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / t_s) for v in z_s]
        q = [v / sum(q) for v in q]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = t_s * t_t * expected / len(student)
    assert distillation_loss(student, teacher, t_s, t_t).item() == pytest.approx(expected, rel=1e-5)


def test_the_loss_is_stationary_where_student_logits_are_ts_over_tt_times_the_teachers() -> None:
    teacher = torch.tensor([[2.0, -1.0, 0.5]])
    student = (4.0 / 1.0 * teacher).clone().requires_grad_(True)
    loss = distillation_loss(student, teacher, 4.0, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad is not None and student.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_temperatures_must_be_positive_and_finite(bad: float) -> None:
    logits = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="positive and finite"):
        distillation_loss(logits, logits, bad, 1.0)
    with pytest.raises(ValueError, match="positive and finite"):
        distillation_loss(logits, logits, 2.0, bad)


def test_l2_anchor_and_kappa() -> None:
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    init = [torch.tensor([0.0, 2.0]), torch.tensor([[1.0]])]
    assert l2_to_init_penalty(params, init, 0.5).item() == pytest.approx(0.5 * (1.0 + 0.0 + 4.0))
    assert scaling_coefficient([10.0, 2.0, 4.0], 0) == pytest.approx(3.0 / 10.0)  # the others' mean / own
    assert scaling_coefficient([1.0, 2.0, 4.0], 0) == 1.0  # shrink, never stretch
    assert scaling_coefficient([5.0], 0) == 1.0
    with pytest.raises(ValueError, match="finite"):  # min(1, nan) used to give kappa 1 silently
        scaling_coefficient([math.nan, 1.0], 0)


def test_reference_schedule_is_the_released_warmup_then_cosine() -> None:
    """METHODS-SPEC 1.7: lr_k = lr (k+1)/500 for k < 500, cosine decay afterwards; at 500 steps the run
    never leaves the warm-up (it used to stay at the full rate forever past step 500)."""
    from distac.conditioning.distac import ConditionConfig, _schedule

    short = _schedule(ConditionConfig(steps=500, schedule="reference"))
    assert [short(k) for k in (0, 249, 499)] == pytest.approx([1 / 500, 250 / 500, 1.0])
    long = _schedule(ConditionConfig(steps=1000, schedule="reference"))
    assert long(499) == pytest.approx(1.0) and long(500) == pytest.approx(1.0)
    assert long(750) == pytest.approx(0.5) and long(999) == pytest.approx(0.5 * (1 + math.cos(math.pi * 499 / 500)))
    cosine = _schedule(ConditionConfig(steps=1000))
    assert cosine(0) == pytest.approx(1.0) and cosine(500) == pytest.approx(0.5)
