"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
NeurIPS 2024): Elect, Mask, Rescale. Task-conditional and tuning-free.

Elect a unified task vector, elementwise:

    gamma = +1 where sum_t tau_t > 0, and -1 otherwise (exact zeros included, as in the code)
    eps   = max |tau_t| over the tasks whose sign agrees with gamma (tau_t * gamma > 0; 0 if none)
    tau_uni = gamma * eps

Per task, a mask and a scalar rescaler:

    M_t = 1[tau_t * gamma > 0]
    lambda_t = sum_keys mean(|tau_t^key|) / sum_keys mean(|M_t^key * tau_uni^key|)
    theta_t = theta_pre + lambda_t * (M_t * tau_uni)

The rescaler is a *sum of per-key means* like the reference code (METHODS-SPEC 4.5), not a global
L1 ratio, so small tensors (biases, norms) weigh as much as large matrices. A task whose masked
update is all zero gets lambda_t = 0. ``task_vector`` is tau_uni; ``per_task`` holds
lambda_t * M_t * tau_uni. There is no scaling coefficient in the paper: ``default_coefficient=1.0``.

Hyperparameters: none. Non-matrix parameters: every floating-point key (biases, norms, embeddings)
is elected, masked and rescaled exactly like the weight matrices (the ViT code merges all image
encoder keys; per-task classification heads are not task-vector keys in distac).

Memory: two passes over the keys (lambda needs every key), keeping only tau_uni in float32; the
masks are recomputed in the second pass as M_t = 1[tau_t * tau_uni > 0], which equals the
definition because eps > 0 wherever some task agrees with gamma.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from distac.merging.base import MergeInputs, MergeMethod, MergeResult, StateDict


class EMR(MergeMethod):
    name: ClassVar[str] = "emr"
    task_conditional: ClassVar[bool] = True
    default_coefficient: ClassVar[float] = 1.0
    tunes_coefficient: ClassVar[bool] = False  # tuning-free in its paper: no validation search

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        super().__init__(device=device)

    def _merge(self, inputs: MergeInputs) -> MergeResult:
        num_tasks = inputs.num_tasks
        unified: dict[str, torch.Tensor] = {}
        numerator = [0.0] * num_tasks
        denominator = [0.0] * num_tasks
        for key in inputs.keys:
            stack = inputs.stack(key)
            gamma = torch.where(stack.sum(dim=0) > 0, 1.0, -1.0).to(stack.dtype)
            agree = stack * gamma > 0
            magnitude = stack.abs()
            eps = torch.where(agree, magnitude, torch.zeros((), dtype=stack.dtype, device=stack.device)).amax(dim=0)
            unified[key] = gamma * eps
            if stack[0].numel() == 0:
                continue
            for task in range(num_tasks):
                numerator[task] += float(magnitude[task].mean(dtype=torch.float64))
                masked = torch.where(agree[task], eps, torch.zeros((), dtype=eps.dtype, device=eps.device))
                denominator[task] += float(masked.mean(dtype=torch.float64))
        lambdas = [n / d if d > 0 else 0.0 for n, d in zip(numerator, denominator, strict=True)]
        per_task: dict[str, StateDict] = {name: {} for name in inputs.task_names}
        kept = [0] * num_tasks
        for key in inputs.keys:
            uni = unified[key]
            zero = torch.zeros((), dtype=uni.dtype, device=uni.device)
            for task, name in enumerate(inputs.task_names):
                mask = inputs.tensor(task, key) * uni > 0
                kept[task] += int(mask.sum())
                per_task[name][key] = inputs.output(key, lambdas[task] * torch.where(mask, uni, zero))
        total = inputs.numel()
        shared = {key: inputs.output(key, value) for key, value in unified.items()}
        info = self._info(
            inputs,
            lambdas=dict(zip(inputs.task_names, lambdas, strict=True)),
            mask_density={name: kept[i] / total for i, name in enumerate(inputs.task_names)},
        )
        return MergeResult(task_vector=shared, per_task=per_task, info=info)
