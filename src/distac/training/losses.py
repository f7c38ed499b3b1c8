"""Losses used to fine-tune sources, including the ones that produce low-confidence models.

* ``ce``: cross-entropy;
* ``label_smoothing``: cross-entropy against (1 - alpha) one-hot + alpha / C (paper: alpha = 0.1);
* ``mixup``: inputs (pixels, or pooled features for text) mixed with a permutation of the batch,
  lambda ~ U(0, 1) drawn each step as in the paper's Table 2;
* ``focal``: (1 - p_y)^gamma * CE (Lin et al. 2017), gamma = 2 by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distac.config import check_choice_option, check_option

LOSS_KINDS = ("ce", "label_smoothing", "mixup", "focal")


@dataclass
class LossConfig:
    kind: str = "ce"
    alpha: float = 0.1  # label smoothing
    gamma: float = 2.0  # focal loss

    def __post_init__(self) -> None:
        check_choice_option("loss", "kind", self.kind, LOSS_KINDS)
        check_option("loss", "alpha", self.alpha, low=0.0, high=1.0, high_inclusive=False)  # label smoothing
        check_option("loss", "gamma", self.gamma, low=0.0, high=100.0)  # focal loss


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def label_smoothing_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=alpha)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    return (-((1 - log_p.exp()) ** gamma) * log_p).mean()


def mixup_pairs(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """A permutation of the batch and lambda ~ U(0, 1): mix x and x[perm] as lam*x + (1-lam)*x[perm]."""
    perm = torch.randperm(batch_size, generator=generator)
    lam = float(torch.rand((), generator=generator))
    return perm, lam


def mixup_loss(logits: torch.Tensor, labels: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])


def build_loss(config: LossConfig):  # noqa: ANN201 - returns a callable(logits, labels)
    if config.kind == "label_smoothing":
        return lambda logits, labels: label_smoothing_loss(logits, labels, config.alpha)
    if config.kind == "focal":
        return lambda logits, labels: focal_loss(logits, labels, config.gamma)
    return cross_entropy
