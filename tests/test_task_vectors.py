"""Task-vector algebra on tiny random state dicts, checked against hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distac.checkpoints import save_state_dict
from distac.errors import CheckpointError
from distac.task_vectors import ParameterSelector, TaskVector, cosine_matrix


def _pre() -> dict[str, torch.Tensor]:
    return {
        "backbone.layer.0.weight": torch.zeros(2, 2),
        "backbone.layer.0.bias": torch.ones(2),
        "backbone.bn.running_mean": torch.zeros(2),
        "backbone.bn.num_batches_tracked": torch.tensor(0),
        "head.weight": torch.zeros(3, 2),
    }


def _ft(delta_w: list[list[float]], delta_b: list[float]) -> dict[str, torch.Tensor]:
    ft = {k: v.clone() for k, v in _pre().items()}
    ft["backbone.layer.0.weight"] += torch.tensor(delta_w)
    ft["backbone.layer.0.bias"] += torch.tensor(delta_b)
    ft["backbone.bn.running_mean"] += 5.0
    ft["head.weight"] += 9.0
    return ft


def test_default_selector_keeps_heads_and_statistics_out() -> None:
    tv = TaskVector.from_state_dicts(_pre(), _ft([[1, 0], [0, 2]], [2, 0]))
    assert sorted(tv.keys()) == ["backbone.layer.0.bias", "backbone.layer.0.weight"]
    # ||tau||^2 = 1 + 4 + 4 = 9
    assert tv.norm() == pytest.approx(3.0)
    assert tv.parameter_norms()["backbone.layer.0.bias"] == pytest.approx(2.0)
    assert tv.layer_norms() == {"backbone.layer.0": pytest.approx(3.0)}


def test_algebra_and_cosine_by_hand() -> None:
    a = TaskVector.from_state_dicts(_pre(), _ft([[1, 0], [0, 0]], [0, 0]))
    b = TaskVector.from_state_dicts(_pre(), _ft([[1, 1], [0, 0]], [0, 0]))
    assert a.cosine(b) == pytest.approx(1 / math.sqrt(2))
    assert (a + b).deltas["backbone.layer.0.weight"].tolist() == [[2, 1], [0, 0]]
    assert (b - a).deltas["backbone.layer.0.weight"].tolist() == [[0, 1], [0, 0]]
    assert (0.5 * b).norm() == pytest.approx(math.sqrt(2) / 2)
    assert sum([a, b]).norm() == pytest.approx(math.sqrt(5))
    assert (-a).cosine(a) == pytest.approx(-1.0)
    m = cosine_matrix([a, b])
    assert m[0][0] == pytest.approx(1.0) and m[0][1] == pytest.approx(m[1][0])


def test_apply_to_reconstructs_finetuned_and_scales() -> None:
    pre, ft = _pre(), _ft([[1, -1], [3, 2]], [0.5, 1])
    tv = TaskVector.from_state_dicts(pre, ft)
    rebuilt = tv.apply_to(pre, 1.0)
    assert torch.equal(rebuilt["backbone.layer.0.weight"], ft["backbone.layer.0.weight"])
    assert torch.equal(rebuilt["head.weight"], pre["head.weight"])  # outside the task vector: unchanged
    half = tv.apply_to(pre, 0.5)
    assert half["backbone.layer.0.bias"].tolist() == [1.25, 1.5]


def test_apply_keeps_dtype_of_half_precision_models() -> None:
    pre = {"w": torch.zeros(3, dtype=torch.float16)}
    ft = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)}
    tv = TaskVector.from_state_dicts(pre, ft, ParameterSelector(exclude=()))
    assert tv.deltas["w"].dtype == torch.float32
    assert tv.apply_to(pre, 1.0)["w"].dtype == torch.float16


def test_mismatched_architectures_are_named() -> None:
    pre = _pre()
    ft = _ft([[0, 0], [0, 0]], [0, 0])
    ft["backbone.layer.0.weight"] = torch.zeros(3, 2)
    with pytest.raises(CheckpointError, match=r"backbone.layer.0.weight.*\(3, 2\).*\(2, 2\)"):
        TaskVector.from_state_dicts(pre, ft, finetuned_source="ft.safetensors")
    del ft["backbone.layer.0.weight"]
    with pytest.raises(CheckpointError, match="missing 1 parameters"):
        TaskVector.from_state_dicts(pre, ft)


def test_from_checkpoints_and_save_load(tmp_path: Path) -> None:
    save_state_dict(_pre(), tmp_path / "pre")
    save_state_dict(_ft([[1, 0], [0, 0]], [0, 0]), tmp_path / "ft")
    tv = TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "ft")
    tv.save(tmp_path / "tau")
    again = TaskVector.load(tmp_path / "tau")
    assert again.norm() == pytest.approx(1.0)
    include_only = ParameterSelector(include=("*.bias",))
    assert TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "ft", include_only).keys() == [
        "backbone.layer.0.bias"
    ]


def test_a_few_absent_modules_get_advice_another_architecture_does_not() -> None:
    """A distac text model has no BERT pooler (mean pooling), its base does: the error names the exclude
    glob that fixes it. Missing parts of modules that are otherwise there are no such case."""
    from distac.errors import CheckpointError
    from distac.task_vectors import check_compatible

    base = {f"encoder.layer.{i}.{p}": torch.zeros(2) for i in range(6) for p in ("weight", "bias")}
    base |= {"pooler.dense.weight": torch.zeros(2), "pooler.dense.bias": torch.zeros(2)}
    without_pooler = {k: v for k, v in base.items() if not k.startswith("pooler.")}
    with pytest.raises(CheckpointError, match=r"missing 2 parameters.*--exclude 'pooler\.dense\.\*'"):
        check_compatible(base, without_pooler, base, "base", "ft")
    half_a_layer = {k: v for k, v in base.items() if k != "encoder.layer.3.bias"}
    with pytest.raises(CheckpointError, match=r"different architecture\?\)$"):
        check_compatible(base, half_a_layer, base, "base", "ft")
    other = {"conv.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"different architecture\?\)$"):
        check_compatible(base, other, base, "base", "ft")
