"""BatchNorm running statistics after the weights have moved.

BatchNorm layers normalise with running means and variances estimated during fine-tuning, for
the fine-tuned weights. Every operation of this library changes the weights but not those
estimates: rescaling a task vector (DisTaC's theta_pre + kappa * tau) and merging several. On a
CNN the stale statistics can kill the network outright: a 10x-learning-rate MNIST source rescaled
by kappa = 0.109 scores 11.3 % (chance) under its own statistics and 83.6 % once they are
re-estimated on 256 unlabeled training images (results/vision/README.md). Re-estimating them needs
inputs only, never labels, so it fits DisTaC's unlabeled-data setting; it is what permutation and
merging work on CNNs does after changing weights (the "reset BN statistics" step).

:func:`torch.optim.swa_utils.update_bn` does the same estimate but puts the *whole* model in train
mode, which also switches on dropout and drop-path and biases the estimate of every BatchNorm layer
behind them; here only the BatchNorm layers are switched, so the rest of the network computes
exactly what it computes at evaluation.

Text models (LayerNorm) and CLIP ViTs have no BatchNorm: every function here is then a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from distac.errors import DataError
from distac.models.base import ClassifierModel, move_inputs
from distac.models.inference import batches, pick_device

#: choices of the ``batchnorm_statistics`` options (conditioning, merge evaluation, ``distac merge``):
#: recompute when weights were changed and the model has BatchNorm / always recompute / never
BATCHNORM_CHOICES = ("auto", "recompute", "keep")
#: unlabeled examples used for the estimate unless a caller says otherwise
DEFAULT_BATCHNORM_EXAMPLES = 256


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics (timm's BatchNormAct2d included)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


def resolve_batchnorm_choice(choice: str, model: nn.Module, *, weights_changed: bool = True) -> bool:
    """Whether to re-estimate: ``auto`` does so when the model has BatchNorm and its weights moved."""
    if choice not in BATCHNORM_CHOICES:
        raise ValueError(f"batchnorm_statistics must be one of {', '.join(BATCHNORM_CHOICES)}, got {choice!r}")
    if choice == "keep" or not has_batchnorm(model):
        return False
    return choice == "recompute" or weights_changed


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the running statistics (to restore them after a temporary re-estimate)."""
    names = {id(m) for m in batchnorm_layers(model)}
    out = {}
    for module_name, module in model.named_modules():
        if id(module) in names:
            for buffer_name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    out[f"{module_name}.{buffer_name}" if module_name else buffer_name] = buffer.detach().clone()
    return out


def estimation_inputs(raw: Sequence[Any] | np.ndarray, n: int, seed: int = 0) -> Sequence[Any] | np.ndarray:
    """A seeded random subset of ``n`` inputs: split files are often sorted by class, and an
    estimate from their first rows would see one class only."""
    if n >= len(raw):
        return raw
    index = np.sort(np.random.default_rng([seed, 2**20]).permutation(len(raw))[:n])
    return raw[index] if isinstance(raw, np.ndarray) else [raw[i] for i in index]


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: ClassifierModel,
    raw: Sequence[Any] | np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance on the inputs ``raw``.

    The statistics are reset and accumulated as an exact average over all batches (``momentum =
    None``), BatchNorm layers alone in train mode; the model is left in eval mode on ``device``.
    Returns the number of layers updated (0: the model has no BatchNorm and nothing was run).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    if len(raw) == 0:
        raise DataError("no unlabeled inputs to estimate the BatchNorm statistics on")
    device = pick_device(str(device) if device is not None else None)
    model.eval().to(device)
    momenta = {m: m.momentum for m in layers}
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch counts equally
            m.train()
        for _, chunk in batches(raw, batch_size):
            model(move_inputs(model.encode(chunk), device))
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.eval()
    return len(layers)
