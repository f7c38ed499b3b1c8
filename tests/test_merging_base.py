"""Interface-level tests of distac.merging: input validation, apply_merge, the registry,
hyperparameter ranges and the matrix-key rules."""

from __future__ import annotations

import pytest
import torch

from distac.merging import (
    MergeConfigError,
    MergeResult,
    apply_merge,
    available_methods,
    get_method,
    is_2d_matrix,
    is_block_linear,
)
from distac.merging.base import resolve_matrix_rule

ALL_METHODS = [
    "average",
    "task_arithmetic",
    "ties",
    "tall_masks",
    "consensus_ta",
    "emr",
    "tsvm",
    "iso_c",
    "iso_cts",
    "wudi",
]


def _tv(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.attn.weight": torch.randn(4, 3, generator=g),
        "blocks.0.attn.bias": torch.randn(4, generator=g),
    }


# ----------------------------------------------------------------------------------------- registry
def test_registry_lists_exactly_the_ten_methods() -> None:
    assert available_methods() == ALL_METHODS


@pytest.mark.parametrize("name", ALL_METHODS)
def test_get_method_returns_instance_with_that_name(name: str) -> None:
    method = get_method(name)
    assert method.name == name
    assert method.task_conditional == (name in {"tall_masks", "emr"})
    assert isinstance(method.default_coefficient, float)


def test_default_coefficients_follow_the_spec() -> None:
    expected = {
        "average": 1.0,
        "task_arithmetic": 0.3,
        "ties": 1.0,
        "tall_masks": 1.0,
        "consensus_ta": 0.3,
        "emr": 1.0,
        "tsvm": 1.0,
        "iso_c": 1.0,
        "iso_cts": 1.0,
        "wudi": 1.0,
    }
    assert {name: get_method(name).default_coefficient for name in ALL_METHODS} == expected


def test_unknown_method_lists_known_names() -> None:
    with pytest.raises(MergeConfigError, match="unknown merging method 'tie'.*task_arithmetic.*wudi"):
        get_method("tie")


def test_unknown_hyperparameter_is_a_config_error_naming_it() -> None:
    with pytest.raises(MergeConfigError, match="no hyperparameter 'densty'.*density"):
        get_method("ties", densty=0.2)


def test_merge_config_error_is_a_value_error() -> None:
    assert issubclass(MergeConfigError, ValueError)


@pytest.mark.parametrize(
    ("name", "kwargs", "fragment"),
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"merge_func": "max"}, "merge_func"),
        ("tall_masks", {"lambda_t": -0.1}, "lambda_t"),
        ("tall_masks", {"lambda_t": {"a": float("nan")}}, r"lambda_t\['a'\]"),
        ("tall_masks", {"lambda_t": {}}, "lambda_t"),
        ("tall_masks", {"use_ties": "yes"}, "use_ties"),
        ("consensus_ta", {"k": -1}, "k must be"),
        ("consensus_ta", {"k": 1.5}, "k must be an integer"),
        ("consensus_ta", {"ties_density": 0.0}, "ties_density"),
        ("tsvm", {"sv_reduction": 0.0}, "sv_reduction"),
        ("tsvm", {"matrix_keys": "linear"}, "matrix_keys"),
        ("iso_cts", {"common_space_fraction": 0.0}, "common_space_fraction"),
        ("iso_cts", {"common_space_fraction": 1.2}, "common_space_fraction"),
        ("iso_c", {"matrix_keys": 3}, "matrix_keys"),
        ("wudi", {"iterations": -1}, "iterations"),
        ("wudi", {"iterations": 2.5}, "iterations"),
        ("wudi", {"lr": 0.0}, "lr"),
        ("wudi", {"lr": True}, "lr"),
        ("wudi", {"non_matrix": "keep"}, "non_matrix"),
        ("average", {"device": "not-a-device"}, "device"),
    ],
)
def test_out_of_range_hyperparameters_raise_naming_the_parameter(name: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(MergeConfigError, match=fragment):
        get_method(name, **kwargs)


def test_hyperparameters_are_recorded_in_info() -> None:
    result = get_method("ties", density=0.5, merge_func="sum").merge([_tv(0), _tv(1)])
    assert result.info["hyperparameters"] == {"density": 0.5, "elect": "mass", "merge_func": "sum"}
    assert result.info["method"] == "ties"
    assert result.info["num_tasks"] == 2
    assert result.info["task_names"] == ["task_0", "task_1"]
    assert result.info["num_parameters"] == 16


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("name", ALL_METHODS)
def test_empty_task_vector_list_is_rejected(name: str) -> None:
    with pytest.raises(MergeConfigError, match="at least one task vector"):
        get_method(name).merge([])


@pytest.mark.parametrize("name", ALL_METHODS)
def test_mismatched_keys_are_rejected_naming_the_key(name: str) -> None:
    other = _tv(1)
    other["blocks.0.extra"] = torch.zeros(2)
    with pytest.raises(MergeConfigError, match=r"task vector 'b'.*unexpected key 'blocks\.0\.extra'"):
        get_method(name).merge([_tv(0), other], task_names=["a", "b"])
    missing = _tv(1)
    del missing["blocks.0.attn.bias"]
    with pytest.raises(MergeConfigError, match=r"missing key 'blocks\.0\.attn\.bias'"):
        get_method(name).merge([_tv(0), missing])


@pytest.mark.parametrize("name", ALL_METHODS)
def test_mismatched_shapes_are_rejected_naming_the_key(name: str) -> None:
    other = _tv(1)
    other["blocks.0.attn.weight"] = torch.zeros(3, 4)
    with pytest.raises(MergeConfigError, match=r"key 'blocks\.0\.attn\.weight' has shape \(3, 4\).*\(4, 3\)"):
        get_method(name).merge([_tv(0), other])


def test_other_input_errors() -> None:
    method = get_method("task_arithmetic")
    with pytest.raises(MergeConfigError, match="sequence of state dicts"):
        method.merge(_tv(0))  # type: ignore[arg-type]
    with pytest.raises(MergeConfigError, match="no parameters"):
        method.merge([_tv(0), {}])
    integer = _tv(1)
    integer["blocks.0.attn.bias"] = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(MergeConfigError, match=r"'blocks\.0\.attn\.bias'.*not a floating-point"):
        method.merge([_tv(0), integer])
    with pytest.raises(MergeConfigError, match="2 names for 3 task vectors"):
        method.merge([_tv(0), _tv(1), _tv(2)], task_names=["a", "b"])
    with pytest.raises(MergeConfigError, match=r"unique; duplicated: \['a'\]"):
        method.merge([_tv(0), _tv(1)], task_names=["a", "a"])
    pretrained = {"blocks.0.attn.weight": torch.zeros(4, 3)}
    with pytest.raises(MergeConfigError, match=r"'blocks\.0\.attn\.bias'.*missing from the pretrained"):
        method.merge([_tv(0)], pretrained=pretrained)
    pretrained["blocks.0.attn.bias"] = torch.zeros(5)
    with pytest.raises(MergeConfigError, match=r"'blocks\.0\.attn\.bias' has shape \(4,\).*\(5,\) in the pretrained"):
        method.merge([_tv(0)], pretrained=pretrained)


def test_inputs_are_not_modified() -> None:
    tvs = [_tv(0), _tv(1), _tv(2)]
    copies = [{k: v.clone() for k, v in tv.items()} for tv in tvs]
    for name in ALL_METHODS:
        get_method(name, **({"iterations": 3} if name == "wudi" else {})).merge(tvs)
    for tv, copy in zip(tvs, copies, strict=True):
        for key in tv:
            assert torch.equal(tv[key], copy[key]), key


# ----------------------------------------------------------------------------------------- apply_merge
def test_apply_merge_adds_scaled_update_and_copies_other_keys() -> None:
    pretrained = {
        "w": torch.tensor([1.0, 2.0]),
        "frozen": torch.tensor([7.0]),
        "step": torch.tensor(3, dtype=torch.int64),
    }
    result = MergeResult(task_vector={"w": torch.tensor([0.5, -1.0])})
    merged = apply_merge(pretrained, result, 0.5)
    assert torch.equal(merged["w"], torch.tensor([1.25, 1.5]))
    assert merged["frozen"] is pretrained["frozen"]
    assert merged["step"] is pretrained["step"]
    assert torch.equal(apply_merge(pretrained, result, 0.0)["w"], pretrained["w"])
    # a task-agnostic result accepts (and ignores) task=
    assert torch.equal(apply_merge(pretrained, result, 0.5, task="anything")["w"], merged["w"])


def test_apply_merge_keeps_low_precision_dtype_and_adds_in_float32() -> None:
    pretrained = {"w": torch.full((3,), 1024.0, dtype=torch.bfloat16)}
    # bfloat16 spacing at 1024 is 8: 1024 + 3 * [1, 2, 3] = [1027, 1030, 1033] computed in float32
    # and rounded once to the nearest bfloat16 gives [1024, 1032, 1032].
    result = MergeResult(task_vector={"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)})
    merged = apply_merge(pretrained, result, 3.0)
    assert merged["w"].dtype == torch.bfloat16
    assert merged["w"].tolist() == [1024.0, 1032.0, 1032.0]


def test_apply_merge_task_conditional_needs_a_known_task() -> None:
    pretrained = {"w": torch.zeros(2)}
    result = MergeResult(
        task_vector={"w": torch.ones(2)},
        per_task={"a": {"w": torch.tensor([1.0, 0.0])}, "b": {"w": torch.tensor([0.0, 2.0])}},
        info={"method": "emr"},
    )
    assert torch.equal(apply_merge(pretrained, result, 1.0, task="b")["w"], torch.tensor([0.0, 2.0]))
    with pytest.raises(MergeConfigError, match=r"task-conditional \(emr\): pass task="):
        apply_merge(pretrained, result, 1.0)
    with pytest.raises(MergeConfigError, match="task 'c' is not in the merge result"):
        apply_merge(pretrained, result, 1.0, task="c")


def test_apply_merge_rejects_bad_updates() -> None:
    pretrained = {"w": torch.zeros(2)}
    with pytest.raises(MergeConfigError, match="'v' of the merged update is missing"):
        apply_merge(pretrained, MergeResult(task_vector={"v": torch.ones(2)}), 1.0)
    with pytest.raises(MergeConfigError, match=r"'w' has shape \(3,\)"):
        apply_merge(pretrained, MergeResult(task_vector={"w": torch.ones(3)}), 1.0)
    with pytest.raises(MergeConfigError, match="coefficient"):
        apply_merge(pretrained, MergeResult(task_vector={"w": torch.ones(2)}), float("nan"))


# ----------------------------------------------------------------------------------------- matrix rules
MATRIX = torch.zeros(4, 4)


@pytest.mark.parametrize(
    ("key", "block_linear"),
    [
        ("vision_model.encoder.layers.3.self_attn.q_proj.weight", True),
        ("vision_model.encoder.layers.3.mlp.fc1.weight", True),
        ("visual.transformer.resblocks.0.attn.in_proj_weight", True),
        ("visual.transformer.resblocks.0.mlp.c_proj.weight", True),
        ("backbone.encoder.layer.5.attention.self.query.weight", True),
        ("blocks.2.mlp.fc2.weight", True),
        ("vision_model.embeddings.position_embedding.weight", False),
        ("embeddings.word_embeddings.weight", False),
        ("visual_projection.weight", False),
        ("visual.proj", False),
        ("pooler.dense.weight", False),
        ("text_projection", False),
    ],
)
def test_block_linear_rule(key: str, block_linear: bool) -> None:
    assert is_block_linear(key, MATRIX) is block_linear


def test_block_linear_and_2d_rules_reject_non_matrices() -> None:
    assert not is_block_linear("encoder.layers.0.fc1.bias", torch.zeros(4))
    assert not is_block_linear("encoder.layers.0.conv.weight", torch.zeros(2, 2, 3, 3))
    assert not is_2d_matrix("encoder.layers.0.fc1.bias", torch.zeros(4))
    assert is_2d_matrix("vision_model.embeddings.position_embedding.weight", MATRIX)
    assert not is_2d_matrix("text_projection", MATRIX)


def test_matrix_rule_can_be_an_explicit_key_collection_or_predicate() -> None:
    predicate, description = resolve_matrix_rule({"a", "b"})
    assert description == "explicit:2 keys"
    assert predicate("a", MATRIX) and not predicate("c", MATRIX) and not predicate("a", torch.zeros(4))
    predicate, description = resolve_matrix_rule(lambda key, tensor: key.startswith("x"))
    assert description == "custom:<lambda>" and predicate("xy", MATRIX)
    with pytest.raises(MergeConfigError, match="strings only"):
        resolve_matrix_rule([1, 2])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "consensus_ta", "emr", "tsvm", "iso_cts", "wudi"])
def test_a_nan_in_a_task_vector_is_an_error_naming_task_and_key(method: str) -> None:
    """An audit found TIES silently dropping the NaN, WUDI spreading it over the matrix and TSV-M
    failing in LAPACK; every method must refuse it up front."""
    from distac.merging import get_method

    good = {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4)}
    bad = {k: v.clone() for k, v in good.items()}
    bad["layer.weight"][1, 2] = float("nan")
    with pytest.raises(MergeConfigError, match=r"key 'layer.weight' of task vector 'b' holds 1 NaN/Inf"):
        get_method(method).merge([good, bad], task_names=["a", "b"])
