"""Diagnose harmful sources before merging: long task vectors and low-confidence predictions.

* Norm disparity of source i = ||tau_i|| / mean_{j != i} ||tau_j||. Flagged ``long`` above
  ``long_threshold`` (default 1.5: the paper's norm-mismatch sources are several times longer,
  normally tuned ones differ by well under 50 %).
* Low confidence, measured on held-out inputs two ways. (a) Underconfidence: accuracy minus mean
  max-probability above ``underconfidence_threshold`` (default 0.1): right answers given with little
  confidence; it needs no comparison with other sources, so a suite where *every* source is
  underconfident is flagged too. (b) Relative entropy: normalized entropy H / log(C) above
  ``entropy_threshold`` (0.3) and at least ``entropy_ratio`` (default 3) x the median of the other
  sources; ``entropy_ratio=None`` (CLI: 0) turns it off.
  Rule (a) alone misses the paper's case: label-smoothed or mixup sources are often *not*
  underconfident, they are unsure and about as often wrong (measured on MiniLM sources with frozen
  class-name heads: accuracy minus confidence -0.26 to +0.09 for label smoothing 0.1, so none was
  flagged), yet their normalized entropy is 0.37-0.58 against 0.02-0.13 for cross-entropy sources of
  the same tasks. Rule (b) flags such a source among normal ones. The ratio is 3 because entropies of
  tasks with different class counts and difficulty differ by less: among the cross-entropy sources
  we measured (8 text tasks with trained heads, 5 image tasks) the least confident sits 1.4-2.9x above
  the others' median (2.9: the demo's SNLI, 47 % accurate, next to a confident long SST-2 source);
  with class-name heads, where normal sources are near-certain (0.02-0.13), SST-2
  and SNLI sit 3x and 7x above it, but under the 0.3 floor (0.13, 0.29). A false flag recommends
  sharpening a normal source, which did not hurt merges where we tried it (results/text-zeroshot,
  results/vision-frozen: "DisTaC on normal sources"). When every source is smoothed, (b) has no
  normal source to compare with: a tiny ratio (``--entropy-ratio 0.01``) flags every source above
  ``--entropy-threshold``, by entropy alone.

Recommendations: kappa (shrink rule) for long sources; for low-confidence sources kappa = 1 and a
student temperature above the teacher's (ratio chosen so the sharpened entropy moves towards the
others' median; at least ``LOW_CONFIDENCE_STUDENT_TEMPERATURE``, 4).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distac.atomic import atomic_write_json, atomic_write_text, atomic_write_with
from distac.checkpoints import StateDict
from distac.conditioning.losses import LOW_CONFIDENCE_STUDENT_TEMPERATURE, scaling_coefficient
from distac.data import TaskData
from distac.evaluation.metrics import compute_metrics
from distac.models.base import ClassifierModel
from distac.models.inference import predict_logits
from distac.task_vectors import TaskVector, layer_group


@dataclass
class SourceModel:
    name: str
    model: ClassifierModel
    task: TaskData


@dataclass
class DiagnosisReport:
    sources: list[dict[str, Any]]
    cosine: list[list[float]]
    thresholds: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"sources": self.sources, "cosine": self.cosine, "thresholds": self.thresholds}

    def flagged(self, flag: str) -> list[str]:
        return [s["name"] for s in self.sources if flag in s["flags"]]

    def markdown(self) -> str:
        lines = [
            "| source | ‖τ‖ | disparity | accuracy | mean conf. | norm. entropy | ECE | flags | recommendation |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self.sources:
            lines.append(
                f"| {s['name']} | {s['norm']:.3f} | {s['disparity']:.2f} | {s['accuracy']:.3f} | "
                f"{s['mean_confidence']:.3f} | "
                f"{s['normalized_entropy']:.3f} | {s['ece']:.3f} | {', '.join(s['flags']) or '-'} | "
                f"{s['recommendation']} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path) -> Path:
        directory = Path(directory)
        atomic_write_json(directory / "diagnosis.json", self.to_json())
        atomic_write_text(directory / "diagnosis.md", self.markdown())
        plot_diagnosis(self, directory / "diagnosis.png")
        return directory


def diagnose(
    pretrained: StateDict,
    sources: Sequence[SourceModel],
    *,
    num_examples: int | None = 200,
    split: str = "validation",
    long_threshold: float = 1.5,
    entropy_threshold: float = 0.3,
    entropy_ratio: float | None = 3.0,
    underconfidence_threshold: float = 0.1,
    device: str = "auto",
) -> DiagnosisReport:
    if not sources:
        raise ValueError("diagnose needs at least one source")
    vectors = []
    for source in sources:
        state = source.model.state_dict()
        selector = source.model.task_vector_selector()
        keys = [k for k, v in state.items() if selector(k, v)]
        vectors.append(TaskVector({k: state[k].float() - pretrained[k].float() for k in keys}, name=source.name))
    norms = [v.norm() for v in vectors]
    rows = []
    for i, (source, vector) in enumerate(zip(sources, vectors, strict=True)):
        data = source.task.split(split).subsample(num_examples, seed=0)
        logits = predict_logits(source.model, data.inputs, device=device)
        metrics = compute_metrics(logits, torch.as_tensor(data.labels), source.task.metric)
        others = [n for j, n in enumerate(norms) if j != i]
        disparity = norms[i] / (sum(others) / len(others)) if others else 1.0
        layers = vector.layer_norms()
        confidence = float(torch.softmax(logits.float(), -1).max(-1).values.mean())
        rows.append(
            {
                "name": source.name,
                "norm": norms[i],
                "disparity": disparity,
                "accuracy": metrics.accuracy,
                "score": metrics.score,
                "entropy": metrics.entropy,
                "normalized_entropy": metrics.entropy / math.log(logits.shape[1]),
                "ece": metrics.ece,
                "mean_confidence": confidence,
                "underconfidence": metrics.accuracy - confidence,
                "layer_norms": {layer_group(k): v for k, v in layers.items()},
                "flags": [],
            }
        )
    for i, row in enumerate(rows):
        others = [r["normalized_entropy"] for j, r in enumerate(rows) if j != i]
        median = statistics.median(others) if others else 0.0
        if row["disparity"] > long_threshold:
            row["flags"].append("long")
        relatively_unsure = (
            bool(entropy_ratio)  # None or 0: off
            and row["normalized_entropy"] > entropy_threshold
            and (not others or row["normalized_entropy"] >= entropy_ratio * median)
        )
        if row["underconfidence"] > underconfidence_threshold or relatively_unsure:
            row["flags"].append("low_confidence")
        kappa = scaling_coefficient(norms, i) if "long" in row["flags"] else 1.0
        ratio = 1.0
        if "low_confidence" in row["flags"]:
            # T_s / T_t scales the student's logits by that ratio at temperature 1 (METHODS-SPEC 1.5).
            floor = LOW_CONFIDENCE_STUDENT_TEMPERATURE
            ratio = max(floor, row["normalized_entropy"] / max(median, 1e-3)) if others else floor
            ratio = min(ratio, 10.0)
        row["recommendation_detail"] = {"kappa": kappa, "teacher_temperature": 1.0, "student_temperature": ratio}
        if row["flags"]:
            row["recommendation"] = f"condition: kappa={kappa:.3f}, T_t=1, T_s={ratio:.2g}"
        else:
            row["recommendation"] = "none"
    cosine = [[a.cosine(b) for b in vectors] for a in vectors]
    thresholds = {
        "long": long_threshold,
        "entropy": entropy_threshold,
        "entropy_ratio": entropy_ratio,
        "underconfidence": underconfidence_threshold,
    }
    return DiagnosisReport(rows, cosine, thresholds)


def plot_diagnosis(report: DiagnosisReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in report.sources]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    colors = ["tab:red" if s["flags"] else "tab:blue" for s in report.sources]
    axes[0].bar(names, [s["norm"] for s in report.sources], color=colors)
    axes[0].set_title("task-vector norm ||tau||")
    axes[1].bar(names, [s["normalized_entropy"] for s in report.sources], color=colors)
    axes[1].set_title("normalized prediction entropy")
    image = axes[2].imshow(report.cosine, vmin=-1, vmax=1, cmap="coolwarm")
    axes[2].set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes[2].set_yticks(range(len(names)), names)
    axes[2].set_title("cosine similarity of task vectors")
    fig.colorbar(image, ax=axes[2])
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
