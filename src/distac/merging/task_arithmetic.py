"""Task Arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

    tau_MTL = sum_t tau_t,        theta = theta_pre + alpha * tau_MTL

Hyperparameters: none besides the scaling coefficient alpha, which lives outside ``merge()``
(:func:`distac.merging.apply_merge`). DisTaC selects alpha on validation data over
{0.0, 0.05, ..., 1.0} (:mod:`distac.merging.coefficient_search`). Without a search,
``default_coefficient = 0.3``: the usual 8-task ViT value (FusionBench's default; METHODS-SPEC 4.1),
not a number the original paper prescribes.

Non-matrix parameters: summed like everything else (biases, LayerNorms, embeddings, conv stems).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from distac.merging.base import MergeInputs, MergeMethod, MergeResult


def sum_key(inputs: MergeInputs, key: str) -> torch.Tensor:
    """sum_t tau_t for one key in float32, accumulated one task at a time (no T-fold stack)."""
    total = inputs.tensor(0, key).clone()
    for task in range(1, inputs.num_tasks):
        total += inputs.tensor(task, key)
    return total


class TaskArithmetic(MergeMethod):
    name: ClassVar[str] = "task_arithmetic"
    default_coefficient: ClassVar[float] = 0.3

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        super().__init__(device=device)

    def _merge(self, inputs: MergeInputs) -> MergeResult:
        merged = {key: inputs.output(key, sum_key(inputs, key)) for key in inputs.keys}
        return MergeResult(task_vector=merged, info=self._info(inputs))
