"""SVD-based methods on convolutional models: ``matrix_keys='all_2d_and_conv'`` treats a kernel
(out, in, kh, kw) as the (out, in*kh*kw) matrix; the default rule leaves CNNs averaged, with a warning."""

from __future__ import annotations

import logging

import pytest
import torch

from distac.merging import get_method
from distac.merging.base import is_matrix_or_conv, matrix_shape
from distac.merging.iso import iso_c_matrix, iso_cts_matrix
from distac.merging.tsvm import tsvm_matrix


def _conv_task_vectors(num_tasks: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
            "depthwise.weight": torch.randn(6, 1, 3, 3, generator=g),
            "bn.bias": torch.randn(8, generator=g),
        }
        for _ in range(num_tasks)
    ]


def test_rule_and_shapes() -> None:
    assert is_matrix_or_conv("conv.weight", torch.zeros(8, 4, 3, 3))
    assert is_matrix_or_conv("fc.weight", torch.zeros(8, 4))
    assert not is_matrix_or_conv("bn.bias", torch.zeros(8))
    assert matrix_shape(torch.zeros(8, 4, 3, 3)) == (8, 36)
    assert matrix_shape(torch.zeros(6, 1, 3, 3)) == (6, 9)


def test_tsvm_and_iso_on_kernels_equal_the_flattened_matrix_methods() -> None:
    tvs = _conv_task_vectors()
    stack = torch.stack([tv["conv.weight"] for tv in tvs]).reshape(3, 8, 36)
    tsvm = get_method("tsvm", matrix_keys="all_2d_and_conv").merge(tvs)
    expected = tsvm_matrix(stack, 8 // 3).reshape(8, 4, 3, 3)  # rank per task: min(8, 36) // T
    torch.testing.assert_close(tsvm.task_vector["conv.weight"], expected)
    assert tsvm.info["rank_per_task"] == {"8x36": 2, "6x9": 2}
    iso = get_method("iso_cts", matrix_keys="all_2d_and_conv").merge(tvs)
    torch.testing.assert_close(iso.task_vector["conv.weight"], iso_cts_matrix(stack, 0.8).reshape(8, 4, 3, 3))
    iso_c = get_method("iso_c", matrix_keys="all_2d_and_conv").merge(tvs)
    torch.testing.assert_close(iso_c.task_vector["conv.weight"], iso_c_matrix(stack.sum(0)).reshape(8, 4, 3, 3))
    # vectors are still averaged
    torch.testing.assert_close(tsvm.task_vector["bn.bias"], sum(tv["bn.bias"] for tv in tvs) / 3)


def test_one_source_tsvm_returns_its_kernel() -> None:
    """T = 1 keeps the full rank: the merged kernel is the source's own (reshaped back)."""
    tv = _conv_task_vectors(1)
    result = get_method("tsvm", matrix_keys="all_2d_and_conv").merge(tv)
    for key in tv[0]:
        torch.testing.assert_close(result.task_vector[key], tv[0][key], atol=1e-5, rtol=1e-5)


def test_wudi_optimises_kernels() -> None:
    tvs = _conv_task_vectors()
    result = get_method("wudi", matrix_keys="all_2d_and_conv", iterations=20, lr=1e-3).merge(tvs)
    assert result.task_vector["conv.weight"].shape == (8, 4, 3, 3)
    loss = result.info["loss"]["conv.weight"]
    assert loss["final"] < loss["initial"]


def test_default_rule_on_a_cnn_warns_that_it_only_averages(caplog: pytest.LogCaptureFixture) -> None:
    tvs = _conv_task_vectors()
    with caplog.at_level(logging.WARNING, logger="distac.merging"):
        result = get_method("tsvm").merge(tvs)
    assert "selects no key" in caplog.text and "all_2d_and_conv" in caplog.text
    torch.testing.assert_close(result.task_vector["conv.weight"], sum(tv["conv.weight"] for tv in tvs) / 3)
