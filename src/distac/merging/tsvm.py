"""TSV-M, Task Singular Vectors: Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025).

For every weight matrix (``matrix_keys``, default :func:`~distac.merging.base.is_2d_matrix`: every
2D key except ``text_projection``, embeddings included, as in the official code) of shape m x n,
with r = min(m, n):

1. thin SVD of each task's update, tau_t = U_t diag(s_t) V_t^T, and keep its top k = floor(r / T)
   singular triplets (``sv_reduction = 1/T``; an explicit ``sv_reduction`` gives k = int(r * it));
2. concatenate them task by task: U_hat = [U_1[:, :k], ..., U_T[:, :k]], s_hat likewise,
   V_hat^T = [V_1^T[:k]; ...; V_T^T[:k]];
3. decorrelate the tasks: replace U_hat and V_hat^T by their polar factors (nearest matrices with
   orthonormal columns / rows; Procrustes via SVD);
4. tau^(l) = U_perp diag(s_hat) V_perp^T. The singular values are kept, so this behaves like a
   *sum* of tasks (no 1/T).

The reference pads U_hat/V_hat to r slots with zeros when T*k < r; the padded slots carry zero
singular values and, for full-rank blocks, do not change the other columns of the polar factor,
so they are skipped here. If T > r, k = 0 and that matrix's merged update is zero, as in the
reference code.

Non-matrix parameters (biases, LayerNorms, class embedding, 4D conv stems, and anything
``matrix_keys`` rejects): the plain mean (1/T) * sum_t tau_t.

theta = theta_pre + alpha * tau. ``default_coefficient = 1.0`` (the TSV authors' and FusionBench's
untuned value); the official search is alpha in {0.1, ..., 3.0}, DisTaC's {0, 0.05, ..., 1}.
With one task, k = r and the result is tau itself up to SVD round-off.
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


def tsvm_matrix(stack: torch.Tensor, k: int) -> torch.Tensor:
    """TSV-M of one key: ``stack`` is (T, m, n) float32; returns the (m, n) merged matrix."""
    num_tasks, rows, cols = stack.shape
    if k <= 0:
        return torch.zeros(rows, cols, dtype=stack.dtype, device=stack.device)
    u, s, vh = thin_svd(stack)
    u_hat = u[:, :, :k].permute(1, 0, 2).reshape(rows, num_tasks * k)
    s_hat = s[:, :k].reshape(num_tasks * k)
    vh_hat = vh[:, :k, :].reshape(num_tasks * k, cols)
    del u, s, vh
    return (polar_factor(u_hat) * s_hat) @ polar_factor(vh_hat)


class TSVM(MergeMethod):
    name: ClassVar[str] = "tsvm"
    default_coefficient: ClassVar[float] = 1.0

    def __init__(
        self,
        sv_reduction: float | None = None,
        matrix_keys: MatrixRule = "all_2d",
        *,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__(device=device)
        if sv_reduction is not None:
            sv_reduction = float(check_number("sv_reduction", sv_reduction, low=0.0, high=1.0, low_inclusive=False))
        self.sv_reduction = sv_reduction
        self.is_matrix, rule = resolve_matrix_rule(matrix_keys)
        self._set_hyperparameters(sv_reduction=sv_reduction, matrix_keys=rule)

    def rank_per_task(self, rank: int, num_tasks: int) -> int:
        if self.sv_reduction is None:
            return rank // num_tasks
        return int(rank * self.sv_reduction)

    def _merge(self, inputs: MergeInputs) -> MergeResult:
        merged: StateDict = {}
        ranks: dict[str, int] = {}
        matrix_keys: list[str] = []
        for key in inputs.keys:
            reference = inputs.task_vectors[0][key]
            if self.is_matrix(key, reference):
                rows, cols = matrix_shape(reference)
                k = self.rank_per_task(min(rows, cols), inputs.num_tasks)
                ranks[f"{rows}x{cols}"] = k
                matrix_keys.append(key)
                merged[key] = inputs.output(
                    key, tsvm_matrix(as_matrices(inputs.stack(key)), k).reshape(reference.shape)
                )
            else:
                merged[key] = inputs.output(key, sum_key(inputs, key) / inputs.num_tasks)
        warn_if_no_matrices(self, inputs, matrix_keys)
        info = self._info(inputs, matrix_keys=matrix_keys, rank_per_task=ranks)
        return MergeResult(task_vector=merged, info=info)
