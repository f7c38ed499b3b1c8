"""Post-hoc temperature scaling (Guo et al. 2017): one scalar T per task fitted on validation
logits by minimising NLL over log T. Dividing logits by T > 0 never changes the argmax, so
accuracy is unchanged while confidence (and ECE) is corrected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distac.evaluation.metrics import compute_metrics

MIN_T, MAX_T = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iterations: int = 200) -> float:
    """NLL-optimal temperature via LBFGS on log T, clamped to [0.05, 20]."""
    logits = torch.as_tensor(logits).float().detach()
    labels = torch.as_tensor(labels).long()
    if logits.shape[0] == 0:
        raise ValueError("no validation examples to fit a temperature on")
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(MIN_T, MAX_T))


@dataclass
class TemperatureScaler:
    temperature: float = 1.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature

    @classmethod
    def fit(cls, logits: torch.Tensor, labels: torch.Tensor) -> TemperatureScaler:
        return cls(fit_temperature(logits, labels))


def calibration_report(
    logits_val: torch.Tensor,
    labels_val: torch.Tensor,
    logits_test: torch.Tensor,
    labels_test: torch.Tensor,
    metric: str = "accuracy",
) -> dict[str, Any]:
    scaler = TemperatureScaler.fit(logits_val, labels_val)
    before = compute_metrics(logits_test, labels_test, metric)
    after = compute_metrics(scaler.apply(logits_test), labels_test, metric)
    return {"temperature": scaler.temperature, "before": before.to_dict(), "after": after.to_dict()}
