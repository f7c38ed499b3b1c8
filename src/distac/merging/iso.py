"""Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common
and Task-Specific Subspaces", ICML 2025).

Both act on the weight matrices selected by ``matrix_keys`` (default
:func:`~distac.merging.base.is_2d_matrix`: every 2D key except ``text_projection``, embeddings
included, as in the official code); every other key (biases, norms, class embedding, conv stems)
gets the plain mean (1/T) * sum_t tau_t.

Iso-C (``name = "iso_c"``): M = sum_t tau_t = U diag(s) V^T (thin SVD), and

    tau^(l) = mean(s) * U V^T

a flat ("isotropic") spectrum over all r = min(m, n) directions with the nuclear norm of M.

Iso-CTS (``name = "iso_cts"``, ``common_space_fraction`` f, default 0.8): with T tasks,

    c0 = floor(f * r);  S = round((r - c0) / T) * T  (Python round: halves go to even, as in the
    reference);  c = r - S common directions;  k = S / T directions per task.

The common subspace is the top-c singular triplets of M. Each task contributes the top-k triplets
of tau_t with the common left subspace projected out, tau_t - U_c U_c^T tau_t. The stacked
[task blocks..., common] U (m x r) and V^T (r x n) are orthogonalised by their polar factors, and
*all* r singular values (task-specific and common together) are replaced by their mean:

    tau^(l) = mean(s_stacked) * U_perp V_perp^T

With f = 1 the task-specific size is 0 and Iso-CTS equals Iso-C. For very small matrices the
rounding could ask for more task-specific directions than exist (S > r); S is then reduced by T
until it fits (the reference code would fail there).

theta = theta_pre + alpha * tau; ``default_coefficient = 1.0`` (FusionBench's untuned value; the
official search is alpha in {0.1, ..., 3.0} with early stopping, DisTaC's {0, 0.05, ..., 1}).
Neither method reproduces a single task vector (its spectrum is flattened).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from distac.merging.base import (
    MatrixRule,
    MergeInputs,
    MergeMethod,
    MergeResult,
    StateDict,
    as_matrices,
    check_number,
    matrix_shape,
    polar_factor,
    resolve_matrix_rule,
    thin_svd,
    warn_if_no_matrices,
)
from distac.merging.task_arithmetic import sum_key


def iso_c_matrix(total: torch.Tensor) -> torch.Tensor:
    """Iso-C of one key given M = sum_t tau_t (float32, m x n)."""
    u, s, vh = thin_svd(total)
    return s.mean() * (u @ vh)


def iso_cts_sizes(rank: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common size c, per-task size k) with c + T*k = rank (see the module docstring)."""
    common = int(rank * common_space_fraction)
    task_total = round((rank - common) / num_tasks) * num_tasks
    while task_total > rank:
        task_total -= num_tasks
    return rank - task_total, task_total // num_tasks


def iso_cts_matrix(stack: torch.Tensor, common_space_fraction: float) -> torch.Tensor:
    """Iso-CTS of one key: ``stack`` is (T, m, n) float32; returns the (m, n) merged matrix."""
    num_tasks, rows, cols = stack.shape
    common, k = iso_cts_sizes(min(rows, cols), num_tasks, common_space_fraction)
    u, s, vh = thin_svd(stack.sum(dim=0))
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common, :]
    if k > 0:
        residual = stack - u_c @ (u_c.mT @ stack)
        u_t, s_t, vh_t = thin_svd(residual)
        del residual
        u_all = torch.cat([u_t[:, :, :k].permute(1, 0, 2).reshape(rows, num_tasks * k), u_c], dim=1)
        s_all = torch.cat([s_t[:, :k].reshape(num_tasks * k), s_c])
        vh_all = torch.cat([vh_t[:, :k, :].reshape(num_tasks * k, cols), vh_c], dim=0)
    else:
        u_all, s_all, vh_all = u_c, s_c, vh_c
    return s_all.mean() * (polar_factor(u_all) @ polar_factor(vh_all))


class _IsoBase(MergeMethod):
    default_coefficient: ClassVar[float] = 1.0

    def __init__(self, matrix_keys: MatrixRule, device: str | torch.device | None) -> None:
        super().__init__(device=device)
        self.is_matrix, self._rule = resolve_matrix_rule(matrix_keys)

    def _merge_matrix(self, inputs: MergeInputs, key: str) -> torch.Tensor:
        raise NotImplementedError

    def _describe(self, rows: int, cols: int, num_tasks: int) -> dict[str, int]:
        """Per-shape diagnostics for ``info`` (subspace sizes)."""
        return {"rank": min(rows, cols)}

    def _merge(self, inputs: MergeInputs) -> MergeResult:
        merged: StateDict = {}
        matrix_keys: list[str] = []
        shapes: dict[str, dict[str, int]] = {}
        for key in inputs.keys:
            reference = inputs.task_vectors[0][key]
            if self.is_matrix(key, reference):
                matrix_keys.append(key)
                rows, cols = matrix_shape(reference)
                shapes[f"{rows}x{cols}"] = self._describe(rows, cols, inputs.num_tasks)
                merged[key] = inputs.output(key, self._merge_matrix(inputs, key).reshape(reference.shape))
            else:
                merged[key] = inputs.output(key, sum_key(inputs, key) / inputs.num_tasks)
        warn_if_no_matrices(self, inputs, matrix_keys)
        return MergeResult(task_vector=merged, info=self._info(inputs, matrix_keys=matrix_keys, subspaces=shapes))


class IsoC(_IsoBase):
    name: ClassVar[str] = "iso_c"

    def __init__(self, matrix_keys: MatrixRule = "all_2d", *, device: str | torch.device | None = None) -> None:
        super().__init__(matrix_keys, device)
        self._set_hyperparameters(matrix_keys=self._rule)

    def _merge_matrix(self, inputs: MergeInputs, key: str) -> torch.Tensor:
        total = sum_key(inputs, key)
        return iso_c_matrix(total.reshape(total.shape[0], -1))


class IsoCTS(_IsoBase):
    name: ClassVar[str] = "iso_cts"

    def __init__(
        self,
        common_space_fraction: float = 0.8,
        matrix_keys: MatrixRule = "all_2d",
        *,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(matrix_keys, device)
        self.common_space_fraction = float(
            check_number("common_space_fraction", common_space_fraction, low=0.0, high=1.0, low_inclusive=False)
        )
        self._set_hyperparameters(common_space_fraction=self.common_space_fraction, matrix_keys=self._rule)

    def _merge_matrix(self, inputs: MergeInputs, key: str) -> torch.Tensor:
        return iso_cts_matrix(as_matrices(inputs.stack(key)), self.common_space_fraction)

    def _describe(self, rows: int, cols: int, num_tasks: int) -> dict[str, int]:
        common, per_task = iso_cts_sizes(min(rows, cols), num_tasks, self.common_space_fraction)
        return {"rank": min(rows, cols), "common": common, "per_task": per_task}
