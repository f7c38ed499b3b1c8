"""Simple weight averaging (model soup over fine-tuned models; Wortsman et al. 2022, the "average"
baseline of Ilharco et al. ICLR 2023 and of TALL masks).

    theta = theta_pre + mean_t(tau_t)            i.e. task_vector = (1/T) * sum_t tau_t

This is task arithmetic with alpha = 1/T; the coefficient is kept outside so the default is 1.0
(``default_coefficient``), which gives the plain average of the fine-tuned weights. Experiments merge
it there, with no validation search (``tunes_coefficient = False``), since a searched scale would turn
it into task arithmetic.

Hyperparameters: none (besides ``device``).
Non-matrix parameters: every key (biases, norms, embeddings) is averaged the same way.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from distac.merging.base import MergeInputs, MergeMethod, MergeResult
from distac.merging.task_arithmetic import sum_key


class SimpleAverage(MergeMethod):
    name: ClassVar[str] = "average"
    default_coefficient: ClassVar[float] = 1.0
    tunes_coefficient: ClassVar[bool] = False  # fixed 1/T (METHODS-SPEC 2.3): a searched scale would be TA

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        super().__init__(device=device)

    def _merge(self, inputs: MergeInputs) -> MergeResult:
        merged = {key: inputs.output(key, sum_key(inputs, key) / inputs.num_tasks) for key in inputs.keys}
        return MergeResult(task_vector=merged, info=self._info(inputs))
