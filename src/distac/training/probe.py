"""Linear probing: fit a task head on the *pretrained* backbone's features before fine-tuning.

Two fine-tuning set-ups use it (``FinetuneConfig.head``):

* ``probe`` - LP-FT (Kumar et al., ICLR 2022): fit the head first, then train backbone and head
  together, so the early updates do not go into fixing a random head.
* ``frozen_probe`` - fit the head, freeze it, and train only the backbone. This is the set-up of the
  paper's CLIP sources for models without a zero-shot head: CLIP fine-tunes its image encoder under
  a frozen text head, so everything a source learns, its confidence included, lives in the merged
  task vector. With a head that trains, label smoothing can lower confidence in the head, which is
  never merged (``results/REPORT.md``, claims 4-6).

The probe depends on the task's training data, the pretrained backbone and its own settings only,
never on the source's recipe (learning rate, loss): every source of a task starts from the same
head, and under ``frozen_probe`` ends with it, as every CLIP source of a task shares its zero-shot head.

It is L2-regularised multinomial logistic regression on features computed once in eval mode. A
backbone with BatchNorm first gets its statistics re-estimated on the task's training inputs (in
place): training-mode BatchNorm normalises with the task's batch statistics from the first step, and
distac evaluates every merged backbone with statistics re-estimated per task, so a head fitted on
features under the pretrained (ImageNet) statistics fits neither. Measured on MNIST at 64 px: such a
head, 90.5 % accurate on validation under ImageNet statistics, scored 11.2 % on the pretrained
backbone under re-estimated ones; fitted under re-estimated statistics it scores 68 %. It is fitted
to convergence with L-BFGS on standardised
features (so one regularisation grid suits a CNN's features of norm 65 and a sentence encoder's of
norm 5) and folded back into the linear head: W = W_z / sd, b = b_z - W_z (mean / sd). The
regularisation strength is ``l2``, or, as in CLIP's linear-probe protocol, the value of
:data:`PROBE_L2_GRID` with the lowest validation cross-entropy. The problem is convex and starts
from a zero head, so the result does not depend on the head's random initialisation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from distac.data.tasks import Split
from distac.errors import ConfigError, DataError
from distac.models.base import ClassifierModel
from distac.models.batchnorm import recompute_batchnorm_statistics
from distac.models.inference import predict_features

log = logging.getLogger("distac.training")


#: Regularisation strengths tried when none is given (on standardised features; mean cross-entropy).
PROBE_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class ProbeResult:
    l2: float
    batchnorm_layers: int  # BatchNorm layers whose statistics were re-estimated on the training inputs
    train_loss: float
    train_accuracy: float
    validation_accuracy: float | None
    seconds: float
    validation_loss_by_l2: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def linear_head(model: ClassifierModel, source: object = "model") -> nn.Linear:
    """The model's head if it is a trainable linear layer; a clear error otherwise (CLIP's and the
    text models' zero-shot heads are fixed class embeddings: they have nothing to probe)."""
    head = model.head
    if not isinstance(head, nn.Linear):
        raise ConfigError(
            f"{source}: head={type(head).__name__} has no linear head to probe (zero-shot heads are already "
            "frozen class embeddings); use finetune.head=train"
        )
    return head


def _fit(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float, iterations: int):
    """Weights and bias of L2-regularised logistic regression (L-BFGS, strong Wolfe line search)."""
    weight = torch.zeros(classes, features.shape[1], device=features.device, requires_grad=True)
    bias = torch.zeros(classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_linear_probe(
    model: ClassifierModel,
    train: Split,
    validation: Split | None,
    *,
    iterations: int,
    l2: float | None,
    device: torch.device | str,
    batch_size: int = 128,
    source: object = "model",
) -> ProbeResult:
    """Replace ``model.head``'s weights by a logistic-regression fit on the backbone's features;
    ``l2=None`` picks the strength on ``validation`` (the middle of the grid without one)."""
    start = time.perf_counter()
    head = linear_head(model, source)
    if len(train) == 0:
        raise DataError(f"{source}: no training examples to fit the linear probe on")
    batchnorm = recompute_batchnorm_statistics(model, train.inputs, batch_size=batch_size, device=device)
    features = predict_features(model, train.inputs, batch_size=batch_size, device=device)
    device = model.device  # predict_features moved the model there
    mean, std = features.mean(0), features.std(0).nan_to_num(0.0).clamp_min(1e-6)
    standardised = ((features - mean) / std).to(device)
    labels = torch.as_tensor(train.labels, device=device)
    classes = head.out_features
    scores: dict[str, float] = {}
    fits: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
    if l2 is None and validation is not None and len(validation) > 0:
        val_features = predict_features(model, validation.inputs, batch_size=batch_size, device=device)
        val_standardised = ((val_features - mean) / std).to(device)
        val_labels = torch.as_tensor(validation.labels, device=device)
        for candidate in PROBE_L2_GRID:
            weight, bias = fits[candidate] = _fit(standardised, labels, classes, candidate, iterations)
            with torch.no_grad():
                scores[repr(candidate)] = float(
                    nn.functional.cross_entropy(val_standardised @ weight.T + bias, val_labels)
                )
        l2 = min(PROBE_L2_GRID, key=lambda c: scores[repr(c)])
    elif l2 is None:
        l2 = PROBE_L2_GRID[len(PROBE_L2_GRID) // 2]
    weight, bias = fits[l2] if l2 in fits else _fit(standardised, labels, classes, l2, iterations)
    with torch.no_grad():
        logits = standardised @ weight.T + bias
        train_loss = float(nn.functional.cross_entropy(logits, labels))
        train_accuracy = float((logits.argmax(-1) == labels).float().mean())
        validation_accuracy = None
        if scores:
            val_logits = val_standardised @ weight.T + bias
            validation_accuracy = float((val_logits.argmax(-1) == val_labels).float().mean())
        folded = weight / std.to(device)  # head(x) = W_z (x - mean) / std + b_z
        if head.bias is None and mean.abs().max() > 0:  # refused before the head is touched
            raise ConfigError(f"{source}: the head has no bias, so the probe cannot centre its features")
        head.weight.copy_(folded)
        if head.bias is not None:
            head.bias.copy_(bias - folded @ mean.to(device))
    seconds = time.perf_counter() - start
    log.info(
        "linear probe %s: l2 %g, train loss %.4f, train accuracy %.3f, validation accuracy %s (%.1f s)",
        source,
        l2,
        train_loss,
        train_accuracy,
        "n/a" if validation_accuracy is None else f"{validation_accuracy:.3f}",
        seconds,
    )
    return ProbeResult(l2, batchnorm, train_loss, train_accuracy, validation_accuracy, seconds, scores)
