"""Classification metrics: accuracy, MCC, prediction entropy, expected calibration error, NLL.

Definitions follow METHODS-SPEC: entropy in nats with probabilities clamped at 1e-9; ECE with 15
equal-width confidence bins, weighted by bin size (Guo et al. 2017).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

ECE_BINS = 15


def _check(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.as_tensor(logits).float()
    labels = torch.as_tensor(labels).long().reshape(-1)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no examples to score")
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits but {labels.shape[0]} labels")
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]")
    return logits, labels


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    logits, labels = _check(logits, labels)
    return float((logits.argmax(-1) == labels).float().mean())


def matthews_corrcoef(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> float:
    """Multi-class MCC (Gorodkin 2004), equal to the binary phi coefficient for two classes; 0 when undefined."""
    predictions = torch.as_tensor(predictions).long().reshape(-1)
    labels = torch.as_tensor(labels).long().reshape(-1)
    k = num_classes or int(max(predictions.max(), labels.max())) + 1
    confusion = torch.zeros(k, k, dtype=torch.float64)
    confusion.index_put_((labels, predictions), torch.ones_like(labels, dtype=torch.float64), accumulate=True)
    t = confusion.sum(1)  # true occurrences per class
    p = confusion.sum(0)  # predicted occurrences per class
    c = confusion.trace()
    s = confusion.sum()
    numerator = c * s - (t * p).sum()
    denominator = math.sqrt(float(s * s - (p * p).sum())) * math.sqrt(float(s * s - (t * t).sum()))
    return float(numerator / denominator) if denominator > 0 else 0.0


def mean_entropy(logits: torch.Tensor) -> float:
    probs = F.softmax(torch.as_tensor(logits).float(), dim=-1)
    return float(-(probs * probs.clamp_min(1e-9).log()).sum(-1).mean())


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per-bin mean confidence, accuracy and count over equal-width confidence bins (0, 1]."""
    logits, labels = _check(logits, labels)
    probs = F.softmax(logits, dim=-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for i in range(bins):
        mask = (confidence > edges[i]) & (confidence <= edges[i + 1])
        n = int(mask.sum())
        out.append(
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "count": n,
                "confidence": float(confidence[mask].mean()) if n else 0.0,
                "accuracy": float(correct[mask].mean()) if n else 0.0,
            }
        )
    return out


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    data = reliability_bins(logits, labels, bins)
    total = sum(b["count"] for b in data)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in data))


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> float:
    logits, labels = _check(logits, labels)
    return float(F.cross_entropy(logits, labels))


def normalized_accuracy(merged: float, individual: float) -> float:
    """Merged score / individual fine-tuned score (the paper's normalized accuracy)."""
    return merged / individual if individual else 0.0


@dataclass
class TaskMetrics:
    """``score`` is the task's primary metric (accuracy, or MCC for CoLA)."""

    score: float
    accuracy: float
    entropy: float
    ece: float
    nll: float
    n: int
    metric: str = "accuracy"

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, metric: str = "accuracy") -> TaskMetrics:
    logits, labels = _check(logits, labels)
    acc = accuracy(logits, labels)
    if metric == "mcc":
        score = matthews_corrcoef(logits.argmax(-1), labels, logits.shape[1])
    elif metric == "accuracy":
        score = acc
    else:
        raise ValueError(f"unknown metric {metric!r} (accuracy or mcc)")
    return TaskMetrics(
        score=score,
        accuracy=acc,
        entropy=mean_entropy(logits),
        ece=expected_calibration_error(logits, labels),
        nll=negative_log_likelihood(logits, labels),
        n=int(labels.shape[0]),
        metric=metric,
    )
