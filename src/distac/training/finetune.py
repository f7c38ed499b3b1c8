"""Fine-tuning of source models (the paper's sources, and its failure modes).

AdamW (weight decay 0.1) with a cosine schedule and linear warm-up, as in the paper. The knobs
that create harmful sources: a 10x learning rate (long task vector), and the losses of
:mod:`distac.training.losses` (label smoothing, mixup, focal loss: low confidence).
For CLIP only the image encoder trains (its zero-shot head is frozen); for other models the
backbone and the task head train together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from distac.data import TaskData
from distac.models.base import ClassifierModel, move_inputs
from distac.models.inference import pick_device, predict_logits
from distac.training.losses import LossConfig, build_loss, mixup_loss, mixup_pairs


@dataclass
class FinetuneConfig:
    steps: int = 200
    lr: float = 1e-5
    batch_size: int = 32
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio (paper: 200 of 2000)
    loss: LossConfig = field(default_factory=LossConfig)
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = False  # bf16 autocast, CUDA only
    max_train_examples: int | None = None
    eval_every: int | None = None
    eval_examples: int = 200

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class FinetuneResult:
    losses: list[float]
    evaluations: list[dict[str, float]]
    seconds: float
    steps: int

    def to_json(self) -> dict[str, Any]:
        return {
            "losses": self.losses[:: max(1, len(self.losses) // 100)],
            "final_loss": self.losses[-1],
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "steps": self.steps,
        }


def progress_bar(description: str, total: int, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn(description),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def finetune(
    model: ClassifierModel, task: TaskData, config: FinetuneConfig, *, progress: bool = True
) -> FinetuneResult:
    """Train ``model`` in place on ``task.train``; deterministic for a given seed on CPU."""
    from transformers import get_cosine_schedule_with_warmup

    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train = (
        task.train.subsample(config.max_train_examples, seed=config.seed) if config.max_train_examples else task.train
    )
    model.check_labels(train.labels, task.source or task.name)
    model.to(device)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * config.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)
    loss_fn = build_loss(config.loss)
    labels_all = torch.as_tensor(train.labels)
    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    losses: list[float] = []
    evaluations: list[dict[str, float]] = []
    autocast = config.mixed_precision and device.type == "cuda"
    start = time.perf_counter()
    with progress_bar(f"fine-tune {task.name}", config.steps, progress) as bar:
        job = bar.add_task("train", total=config.steps, status="")
        for step in range(config.steps):
            if len(order) < config.batch_size:
                order.extend(rng.permutation(len(train)).tolist())
            index, order = order[: config.batch_size], order[config.batch_size :]
            raw = (
                train.inputs[np.asarray(index)]
                if isinstance(train.inputs, np.ndarray)
                else [train.inputs[i] for i in index]
            )
            inputs = move_inputs(model.encode(raw), device)
            labels = labels_all[index].to(device)
            model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if config.loss.kind == "mixup":
                    perm, lam = mixup_pairs(len(index), generator)
                    perm = perm.to(device)
                    if "pixel_values" in inputs:
                        pixels = inputs["pixel_values"]
                        inputs = {**inputs, "pixel_values": lam * pixels + (1 - lam) * pixels[perm]}
                        logits = model(inputs)
                    else:  # text: mix pooled features (token ids cannot be interpolated)
                        feats = model.features(inputs)
                        logits = model.classify(lam * feats + (1 - lam) * feats[perm])
                    loss = mixup_loss(logits.float(), labels, perm, lam)
                else:
                    loss = loss_fn(model(inputs).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss))
            if config.eval_every and (step + 1) % config.eval_every == 0:
                evaluations.append({"step": step + 1, **_validation_accuracy(model, task, config, device)})
            bar.update(job, advance=1, status=f"loss {losses[-1]:.3f}")
    model.eval()
    return FinetuneResult(losses, evaluations, time.perf_counter() - start, config.steps)


def _validation_accuracy(model: ClassifierModel, task: TaskData, config: FinetuneConfig, device: torch.device) -> dict:
    data = task.validation.subsample(config.eval_examples, seed=1)
    logits = predict_logits(model, data.inputs, batch_size=128, device=device)
    model.train()
    return {"val_accuracy": float((logits.argmax(-1) == torch.as_tensor(data.labels)).float().mean())}
