"""Properties every merging method must have, on a small model-shaped set of task vectors: output
keys/shapes/dtypes, no NaN, determinism, JSON-serialisable info, float32 maths for low-precision
inputs, and which methods give back the fine-tuned model when there is a single task."""

from __future__ import annotations

import json

import pytest
import torch

from distac.merging import apply_merge, get_method
from distac.merging.base import MergeResult

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

SHAPES: dict[str, tuple[int, ...]] = {
    "embeddings.patch_embedding.weight": (6, 3, 2, 2),  # 4D conv stem
    "embeddings.class_embedding": (6,),
    "embeddings.position_embedding.weight": (5, 6),  # 2D embedding
    "encoder.layers.0.self_attn.q_proj.weight": (6, 6),
    "encoder.layers.0.self_attn.q_proj.bias": (6,),
    "encoder.layers.0.mlp.fc1.weight": (12, 6),
    "encoder.layers.0.mlp.fc2.weight": (6, 12),
    "encoder.layers.0.layer_norm1.weight": (6,),
    "encoder.layers.1.mlp.fc1.weight": (12, 6),  # all-zero in every task (a frozen layer)
    "logit_scale": (),  # 0-D
}


def make_task_vectors(num_tasks: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    vectors = []
    for _ in range(num_tasks):
        tv = {}
        for key, shape in SHAPES.items():
            value = 0.01 * torch.randn(shape, generator=generator)
            if key.startswith("encoder.layers.1."):
                value = torch.zeros(shape)
            tv[key] = value.to(dtype)
        vectors.append(tv)
    return vectors


def build(name: str, **kwargs: object):
    return get_method(name, **kwargs)


def all_updates(result: MergeResult) -> list[dict[str, torch.Tensor]]:
    return [result.task_vector, *(result.per_task or {}).values()]


@pytest.fixture(scope="module")
def three_tasks() -> list[dict]:
    return make_task_vectors(3)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_keys_shapes_dtypes_and_finiteness(name: str, three_tasks: list[dict]) -> None:
    result = build(name).merge(three_tasks, task_names=["a", "b", "c"])
    if result.per_task is not None:
        assert sorted(result.per_task) == ["a", "b", "c"]
    for update in all_updates(result):
        assert list(update) == list(SHAPES)
        for key, value in update.items():
            assert value.shape == SHAPES[key], key
            assert value.dtype == torch.float32, key
            assert torch.isfinite(value).all(), key
    # the all-zero layer stays exactly zero for every method
    for update in all_updates(result):
        assert not update["encoder.layers.1.mlp.fc1.weight"].any()
    json.dumps(result.info, allow_nan=False)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_merge_is_deterministic(name: str, three_tasks: list[dict]) -> None:
    first = build(name).merge(three_tasks)
    second = build(name).merge(three_tasks)
    for a, b in zip(all_updates(first), all_updates(second), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert first.info == second.info


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_METHODS)
def test_low_precision_inputs_are_merged_in_float32_and_cast_back(name: str, dtype: torch.dtype) -> None:
    low = make_task_vectors(3, dtype=dtype, seed=1)
    upcast = [{k: v.float() for k, v in tv.items()} for tv in low]
    result = build(name).merge(low)
    reference = build(name).merge(upcast)
    for got, want in zip(all_updates(result), all_updates(reference), strict=True):
        for key, value in got.items():
            assert value.dtype == dtype, key
            # float32 maths then one rounding: identical to merging the upcast inputs and casting
            assert torch.equal(value, want[key].to(dtype)), key


@pytest.mark.parametrize("name", ALL_METHODS)
def test_explicit_compute_device_gives_same_result(name: str, three_tasks: list[dict]) -> None:
    default = build(name).merge(three_tasks)
    explicit = build(name, device="cpu").merge(three_tasks)
    for a, b in zip(all_updates(default), all_updates(explicit), strict=True):
        for key in a:
            assert torch.equal(a[key], b[key]), key


# Single task at coefficient 1. Which methods give theta_1 back and why:
#   exact (bitwise update == tau_1):
#     average, task_arithmetic         - the sum/mean of one vector is that vector;
#     tall_masks                       - tau_MTL = tau_1 and the mask keeps every nonzero entry;
#     emr                              - tau_uni = tau_1, mask = (tau_1 != 0), lambda_1 = 1 exactly;
#     ties(density=1)                  - nothing trimmed, the elected sign is tau_1's own sign;
#     consensus_ta(k=1)                - one mask, count 1 >= k wherever tau_1 != 0;
#     wudi(all_2d, non_matrix="mean")  - the loss is 0 at the TA init, the gradient is exactly 0;
#   up to SVD round-off: tsvm          - k = r, so the full SVD of tau_1 is reassembled;
#   not reproduced (by design):
#     ties (default density 0.2)       - 80% of the entries are trimmed;
#     consensus_ta (default k=2)       - one task can never reach 2 votes: the update is zero;
#     iso_c, iso_cts                   - the spectrum is flattened to its mean;
#     wudi (official defaults)         - everything outside block linears is left at theta_pre.
SINGLE_TASK_EXACT = [
    ("average", {}),
    ("task_arithmetic", {}),
    ("tall_masks", {}),
    ("emr", {}),
    ("ties", {"density": 1.0}),
    ("consensus_ta", {"k": 1}),
    ("wudi", {"matrix_keys": "all_2d", "non_matrix": "mean"}),
]
SINGLE_TASK_NOT_REPRODUCED = [
    ("ties", {}),
    ("consensus_ta", {}),
    ("iso_c", {}),
    ("iso_cts", {}),
    ("wudi", {}),
]


def _single_task_setup() -> tuple[dict, dict, dict]:
    generator = torch.Generator().manual_seed(5)
    pretrained = {key: torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}
    finetuned = {key: value + 0.01 * torch.randn(value.shape, generator=generator) for key, value in pretrained.items()}
    tau = {key: finetuned[key] - pretrained[key] for key in pretrained}
    return pretrained, finetuned, tau


@pytest.mark.parametrize(("name", "kwargs"), SINGLE_TASK_EXACT)
def test_single_task_reproduces_the_finetuned_model_exactly(name: str, kwargs: dict) -> None:
    pretrained, finetuned, tau = _single_task_setup()
    result = build(name, **kwargs).merge([tau], task_names=["only"], pretrained=pretrained)
    update = result.per_task["only"] if result.per_task is not None else result.task_vector
    for key in tau:
        assert torch.equal(update[key], tau[key]), key
    merged = apply_merge(pretrained, result, 1.0, task="only")
    for key in finetuned:
        torch.testing.assert_close(merged[key], finetuned[key], rtol=0, atol=1e-6)


def test_single_task_tsvm_reproduces_up_to_svd_roundoff() -> None:
    pretrained, finetuned, tau = _single_task_setup()
    result = build("tsvm").merge([tau], pretrained=pretrained)
    for key in tau:
        torch.testing.assert_close(result.task_vector[key], tau[key], rtol=0, atol=1e-6)
    assert result.info["rank_per_task"] == {"5x6": 5, "6x6": 6, "12x6": 6, "6x12": 6}


@pytest.mark.parametrize(("name", "kwargs"), SINGLE_TASK_NOT_REPRODUCED)
def test_single_task_is_not_reproduced_where_the_method_changes_it(name: str, kwargs: dict) -> None:
    _, _, tau = _single_task_setup()
    result = build(name, **kwargs).merge([tau])
    gap = max(float((result.task_vector[k] - tau[k]).abs().max()) for k in tau)
    assert gap > 1e-3, name


def test_coefficient_zero_gives_the_pretrained_model_for_every_method(three_tasks: list[dict]) -> None:
    generator = torch.Generator().manual_seed(9)
    pretrained = {key: torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}
    for name in ALL_METHODS:
        result = build(name).merge(three_tasks, task_names=["a", "b", "c"])
        merged = apply_merge(pretrained, result, 0.0, task="b")
        for key in pretrained:
            assert torch.equal(merged[key], pretrained[key]), (name, key)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_merge_builds_no_autograd_graph(name: str) -> None:
    # task vectors taken straight from nn.Parameters may require grad; merged updates must not
    tvs = [{k: v.clone().requires_grad_(True) for k, v in tv.items()} for tv in make_task_vectors(2)]
    result = build(name).merge(tvs)
    for update in all_updates(result):
        assert not any(v.requires_grad for v in update.values())
