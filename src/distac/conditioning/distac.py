"""DisTaC: condition a task vector before merging, with unlabeled data only.

1. Rescale: the student starts at theta_pre + kappa * tau (kappa < 1 shrinks a too-long vector;
   kappa = 1 for low-confidence sources).
2. Distill: the frozen original fine-tuned model is the teacher. Loss = T_s * T_t *
   KL(softmax(z_t / T_t) || softmax(z_s / T_s)) + beta * ||theta - theta_init||^2, where
   theta_init is the scaled start. T_s > T_t makes the student more confident than the teacher.

Defaults follow the paper (REFERENCE.md): Adam, lr 1e-5, no weight decay, cosine schedule, gradient
clip 1.0, 500 steps, beta 0.5, head frozen. The released code keeps a 500-step linear warm-up over
the whole run; ``schedule="reference"`` reproduces that instead.

Inputs are not augmented here, so teacher logits are computed once and cached (the saving the
paper mentions); ``cache_teacher_logits=False`` runs the teacher on-line, for comparison.
Student batches use eval mode (no dropout, BatchNorm statistics frozen at the teacher's), so the
student reproduces the teacher's function exactly at kappa = 1 and runs are deterministic.
An interrupted run resumes from ``work_dir`` and ends with the same weights as a straight run.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distac.atomic import atomic_path
from distac.checkpoints import StateDict
from distac.conditioning.losses import distillation_loss
from distac.data import TaskData
from distac.errors import CheckpointError
from distac.models.base import ClassifierModel, move_inputs
from distac.models.inference import pick_device, predict_logits
from distac.training.finetune import progress_bar

STATE_FILE = "condition_state.pt"


@dataclass
class ConditionConfig:
    kappa: float = 1.0
    steps: int = 500
    lr: float = 1e-5
    batch_size: int = 128
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0
    beta: float = 0.5
    grad_clip: float | None = 1.0
    schedule: str = "cosine"  # or "reference": linear warm-up over the whole run, as the released code
    num_unlabeled: int | None = None
    cache_teacher_logits: bool = True
    log_every: int = 25
    eval_examples: int = 200
    checkpoint_every: int | None = 50
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 < self.kappa <= 10.0:
            raise ValueError(f"kappa must be in (0, 10], got {self.kappa}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.teacher_temperature <= 0 or self.student_temperature <= 0:
            raise ValueError("temperatures must be > 0")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.schedule not in {"cosine", "reference"}:
            raise ValueError(f"schedule must be 'cosine' or 'reference', got {self.schedule!r}")


@dataclass
class ConditionResult:
    student: ClassifierModel
    history: list[dict[str, float]]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"history": self.history, "seconds": self.seconds, "config": self.config}


def scaled_student(teacher: ClassifierModel, pretrained: StateDict, kappa: float) -> ClassifierModel:
    """A copy of the teacher whose task-vector parameters are theta_pre + kappa * tau."""
    student = copy.deepcopy(teacher)
    state = student.state_dict()
    selector = student.task_vector_selector()
    keys = [k for k, v in state.items() if selector(k, v)]
    missing = [k for k in keys if k not in pretrained]
    if missing:
        raise CheckpointError(f"the pretrained state lacks {missing[:5]}")
    update = {
        k: (pretrained[k].float() + kappa * (state[k].float() - pretrained[k].float())).to(state[k].dtype) for k in keys
    }
    student.load_state_dict(update, strict=False)
    return student


def _norm(params: dict[str, torch.Tensor], reference: StateDict) -> float:
    return math.sqrt(
        sum(float((p.detach().float() - reference[k].float().to(p.device)).pow(2).sum()) for k, p in params.items())
    )


def condition(
    teacher: ClassifierModel,
    pretrained: StateDict,
    task: TaskData,
    config: ConditionConfig,
    *,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> ConditionResult:
    """Run DisTaC on one source. Only ``task.unlabeled`` inputs are used for training."""
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = scaled_student(teacher, pretrained, config.kappa).to(device).eval()
    selector = student.task_vector_selector()
    trainable = {n: p for n, p in student.named_parameters() if selector(n, p)}
    for name, p in student.named_parameters():
        p.requires_grad_(name in trainable)
    init = {n: p.detach().clone() for n, p in trainable.items()}
    original_norm = _norm({n: teacher.get_parameter(n) for n in trainable}, pretrained)
    scaled_norm = _norm(trainable, pretrained)

    unlabeled = task.unlabeled(config.num_unlabeled, seed=config.seed)
    if len(unlabeled) == 0:
        raise ValueError(f"{task.name}: no unlabeled inputs to distill on")
    teacher_logits = (
        predict_logits(teacher, unlabeled, batch_size=256, device=device) if config.cache_teacher_logits else None
    )
    val = task.validation.subsample(config.eval_examples, seed=config.seed + 1)

    optimizer = torch.optim.Adam(list(trainable.values()), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    history: list[dict[str, float]] = []
    start_step = 0
    state_file = Path(work_dir) / STATE_FILE if work_dir is not None else None
    if state_file is not None and state_file.is_file():
        saved = torch.load(state_file, map_location=device, weights_only=True)
        student.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history = [dict(h) for h in saved["history"]]
        start_step = int(saved["step"])
    started = time.perf_counter()
    if start_step == 0:
        history.append(_log(0, student, val, task, trainable, pretrained, original_norm, scaled_norm, device, {}))
    with progress_bar(f"DisTaC {task.name}", config.steps, progress) as bar:
        job = bar.add_task("distill", total=config.steps, completed=start_step, status="")
        for step in range(start_step, config.steps):
            index = _batch_indices(len(unlabeled), config.batch_size, step, config.seed)
            raw = unlabeled[index] if isinstance(unlabeled, np.ndarray) else [unlabeled[i] for i in index]
            inputs = move_inputs(student.encode(raw), device)
            if teacher_logits is not None:
                target = teacher_logits[torch.as_tensor(index)].to(device)
            else:
                with torch.no_grad():
                    target = teacher(inputs).float()
            kl = distillation_loss(student(inputs), target, config.student_temperature, config.teacher_temperature)
            anchor = sum((p - init[n]).pow(2).sum() for n, p in trainable.items())
            loss = kl + config.beta * anchor
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.grad_clip)
            optimizer.step()
            scheduler.step()
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                history.append(
                    _log(
                        done,
                        student,
                        val,
                        task,
                        trainable,
                        pretrained,
                        original_norm,
                        scaled_norm,
                        device,
                        {"loss": float(loss), "kl": float(kl), "l2": float(anchor)},
                    )
                )
            if (
                state_file is not None
                and config.checkpoint_every
                and (done % config.checkpoint_every == 0)
                and (done < config.steps)
            ):
                _save_state(state_file, student, optimizer, scheduler, history, done)
            bar.update(job, advance=1, status=f"kl {float(kl):.4f}")
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    if state_file is not None and state_file.is_file():
        state_file.unlink()
    return ConditionResult(student, history, time.perf_counter() - started, asdict(config))


def _schedule(config: ConditionConfig):  # noqa: ANN202
    steps = config.steps
    if config.schedule == "reference":
        return lambda k: min(1.0, (k + 1) / 500)
    return lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Batch ``step`` of a seeded epoch-wise shuffle: a pure function of the step, so resume is exact."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch_size:
        return order
    return order[position * batch_size : (position + 1) * batch_size]


@torch.no_grad()
def _log(
    step: int,
    student: ClassifierModel,
    val: Any,
    task: TaskData,
    trainable: dict[str, torch.Tensor],
    pretrained: StateDict,
    original_norm: float,
    scaled_norm: float,
    device: torch.device,
    losses: dict[str, float],
) -> dict[str, float]:
    logits = predict_logits(student, val.inputs, batch_size=256, device=device)
    probs = torch.softmax(logits, -1)
    norm = _norm(trainable, pretrained)
    entry = {
        "step": step,
        **losses,
        "norm": norm,
        "norm_ratio_to_scaled": norm / scaled_norm if scaled_norm else 0.0,
        "norm_ratio_to_original": norm / original_norm if original_norm else 0.0,
        "entropy": float(-(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()),
        "val_accuracy": float((logits.argmax(-1) == torch.as_tensor(val.labels)).float().mean()),
    }
    student.eval()
    return entry


def _save_state(
    file: Path,
    student: ClassifierModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: list[dict[str, float]],
    step: int,
) -> None:
    payload = {
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
        "step": step,
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(file) as tmp:
        torch.save(payload, tmp)
