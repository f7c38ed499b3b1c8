"""DisTaC: condition a task vector before merging, with unlabeled data only.

1. Rescale: the student starts at theta_pre + kappa * tau (kappa < 1 shrinks a too-long vector;
   kappa = 1 for low-confidence sources).
2. Distill: the frozen original fine-tuned model is the teacher. Loss = T_s * T_t *
   KL(softmax(z_t / T_t) || softmax(z_s / T_s)) + beta * ||theta - theta_init||^2, where
   theta_init is the scaled start. T_s > T_t makes the student more confident than the teacher.

Defaults follow the paper (REFERENCE.md): Adam, lr 1e-5, no weight decay, cosine schedule, gradient
clip 1.0, 500 steps, beta 0.5, head frozen. The released code keeps a 500-step linear warm-up over
the whole run (cosine decay only after step 500); ``schedule="reference"`` reproduces that instead.

Inputs are not augmented here, so teacher logits are computed once and cached (the saving the
paper mentions); ``cache_teacher_logits=False`` runs the teacher on-line, for comparison.
Student batches run without dropout. Its BatchNorm layers normalise with batch statistics
(``student_batchnorm="batch"``, the default), so that the confidence a CNN student gains survives the
statistics re-estimation that merging does (see the option); ``"frozen"`` uses the running statistics,
so the student reproduces the teacher's function exactly at kappa = 1. A rescaled CNN would keep
BatchNorm statistics estimated for the full-length vector, which can make it useless (chance
accuracy, so the distillation has no signal to follow): with ``batchnorm_statistics="auto"`` they
are re-estimated on unlabeled inputs right after rescaling (kappa != 1) and then stay frozen
(:mod:`distac.models.batchnorm`).
An interrupted run resumes from ``work_dir`` and ends with the same weights as a straight run.

Under ``accelerate launch`` (DDP, or FSDP for models that do not fit one GPU) the processes split
each global batch and the run ends with the same weights as a single-process run
(:mod:`distac.distributed`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distac.checkpoints import StateDict
from distac.conditioning.losses import distillation_loss
from distac.config import check_choice_option, check_device_option, check_option, check_type_option
from distac.data import TaskData
from distac.data.corruption import CORRUPTIONS, corrupt_unlabeled
from distac.distributed import Runtime, runtime
from distac.errors import CheckpointError, DataError
from distac.models.base import ClassifierModel, move_inputs
from distac.models.batchnorm import (
    BATCHNORM_CHOICES,
    DEFAULT_BATCHNORM_EXAMPLES,
    batchnorm_layers,
    estimation_inputs,
    recompute_batchnorm_statistics,
    resolve_batchnorm_choice,
)
from distac.models.inference import bf16_autocast, predict_logits
from distac.resume import (
    SHARDED_META_FILE,  # noqa: F401  (re-exported: the FSDP state's JSON file)
    check_resume_options,
    clear_state,
    load_sharded_state,
    load_state,
    resume_options,
    run_identity,
    save_sharded_state,
    save_state,
)
from distac.training.finetune import progress_bar

log = logging.getLogger("distac.conditioning")

STATE_FILE = "condition_state.pt"
SHARDED_STATE_DIR = "condition_state_fsdp"  # FSDP runs: accelerate's sharded checkpoint


#: Where kappa may lie: (0, 1]. DisTaC shrinks a too-long task vector (kappa < 1) or keeps its length
#: (kappa = 1); above 1 it would lengthen it, the harm being removed, and at or below 0 remove or flip it.
KAPPA_INTERVAL: dict[str, Any] = {"low": 0.0, "high": 1.0, "low_inclusive": False}


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
    #: degrade the unlabeled inputs (robustness study, paper Table 4): "blur" (images, sigma =
    #: strength pixels) or "word_dropout" (text, drop probability = strength); see data.corruption
    unlabeled_corruption: str | None = None
    corruption_strength: float = 0.0
    cache_teacher_logits: bool = True
    log_every: int = 25
    eval_examples: int = 200
    checkpoint_every: int | None = 50
    seed: int = 0
    device: str = "auto"
    mixed_precision: bool = False  # bf16 autocast on CUDA or a CPU with native bf16 (else float32, a warning)
    #: BatchNorm running statistics of the rescaled student: "auto" re-estimates them on unlabeled
    #: inputs when kappa != 1 (models without BatchNorm: nothing to do), "recompute" always, "keep"
    #: never (the teacher's, as before this option existed)
    batchnorm_statistics: str = "auto"
    batchnorm_examples: int = DEFAULT_BATCHNORM_EXAMPLES
    #: How the student's BatchNorm layers normalise while it is distilled. "batch" (default): with
    #: each batch's statistics (train mode, as in fine-tuning; dropout stays off), and the running
    #: statistics are re-estimated on unlabeled inputs at the end. "frozen": with the running
    #: statistics (eval mode; at kappa = 1 the student starts as the teacher, exactly). Under frozen
    #: statistics a student can raise its confidence by scaling the weights in front of a BatchNorm
    #: layer, which the re-estimation every distac merge does undoes: vision-frozen's label-smoothed
    #: students fell from 1.01 to 0.38 nats of test entropy under their own statistics and were back
    #: at 0.99 under re-estimated ones, and their merges gained -0.5..+0.8 points; under batch
    #: statistics that scale has no effect, the confidence survives (0.74 nats) and the merges gained
    #: +0.1..+2.1 (results/vision-frozen, 2 seeds; norm mismatch: no difference). Models without
    #: BatchNorm: no difference.
    student_batchnorm: str = "batch"

    def __post_init__(self) -> None:
        # ConfigError (a ValueError) naming the option, e.g. "condition.kappa must be in (0.0, 1.0], got -1".
        # kappa only shrinks a task vector (a too-long source, kappa < 1) or keeps it (kappa = 1): above 1
        # it would lengthen it, the very harm DisTaC removes (scaling_coefficient never exceeds 1)
        c = "condition"
        check_option(c, "kappa", self.kappa, **KAPPA_INTERVAL)
        check_option(c, "steps", self.steps, low=1, integer=True)
        check_option(c, "lr", self.lr, low=0.0, high=10.0, low_inclusive=False)
        check_option(c, "batch_size", self.batch_size, low=1, integer=True)
        check_option(c, "teacher_temperature", self.teacher_temperature, low=0.0, high=1e3, low_inclusive=False)
        check_option(c, "student_temperature", self.student_temperature, low=0.0, high=1e3, low_inclusive=False)
        check_option(c, "beta", self.beta, low=0.0)
        check_option(c, "grad_clip", self.grad_clip, low=0.0, optional=True)
        check_choice_option(c, "schedule", self.schedule, ("cosine", "reference"))
        check_option(c, "num_unlabeled", self.num_unlabeled, low=1, integer=True, optional=True)
        if self.unlabeled_corruption is not None:
            check_choice_option(c, "unlabeled_corruption", self.unlabeled_corruption, CORRUPTIONS)
        check_option(c, "corruption_strength", self.corruption_strength, low=0.0, high=100.0)
        check_option(c, "log_every", self.log_every, low=1, integer=True)
        check_option(c, "eval_examples", self.eval_examples, low=1, integer=True)
        check_option(c, "checkpoint_every", self.checkpoint_every, low=0, integer=True, optional=True)
        check_option(c, "seed", self.seed, low=0, high=2**63 - 1, integer=True)
        check_type_option(c, "cache_teacher_logits", self.cache_teacher_logits, bool)
        check_type_option(c, "mixed_precision", self.mixed_precision, bool)
        check_device_option(c, "device", self.device)
        check_choice_option(c, "batchnorm_statistics", self.batchnorm_statistics, BATCHNORM_CHOICES)
        check_option(c, "batchnorm_examples", self.batchnorm_examples, low=1, integer=True)
        check_choice_option(c, "student_batchnorm", self.student_batchnorm, ("frozen", "batch"))


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
    """Run DisTaC on one source. Only ``task.unlabeled`` inputs are used for training.

    Under ``accelerate launch`` (DDP or FSDP) every process takes its slice of the same global batch
    and the result equals a single-process run (see :mod:`distac.distributed`); only the main
    process writes the resume state in ``work_dir``.
    """
    teacher.check_task(task, "validation")  # a head that does not fit the task would distill nonsense
    rt = runtime(config.device)
    device = rt.device
    autocast = bf16_autocast(config.mixed_precision, device)
    torch.manual_seed(config.seed)
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if not rt.sharded:
        teacher = teacher.to(device)
    student = scaled_student(teacher, pretrained, config.kappa).eval()
    selector = student.task_vector_selector()
    names = [n for n, p in student.named_parameters() if selector(n, p)]
    selected = set(names)
    for name, p in student.named_parameters():
        p.requires_grad_(name in selected)
    # theta_init, the anchor of the L2 term (under FSDP the anchor is taken from the sharded parameters)
    init_full = {n: student.get_parameter(n).detach().clone() for n in names}
    original_norm = _norm({n: teacher.get_parameter(n) for n in names}, pretrained)
    scaled_norm = _norm(init_full, pretrained)

    unlabeled = task.unlabeled(config.num_unlabeled, seed=config.seed)
    if len(unlabeled) == 0:
        raise DataError(f"{task.source or task.name}: no unlabeled inputs to distill on")
    if config.unlabeled_corruption is not None:
        unlabeled = corrupt_unlabeled(unlabeled, config.unlabeled_corruption, config.corruption_strength, config.seed)
    val = task.validation.subsample(config.eval_examples, seed=config.seed + 1)
    # a resume must continue this run: same task, student architecture, unlabeled inputs and teacher weights
    # (fingerprinted only when there is a resume state to write or read)
    identity = run_identity(task, teacher.spec, unlabeled, teacher=teacher.state_dict()) if work_dir is not None else {}
    resume_record = {**_resume_config(config), **identity}

    def reestimate_statistics(model: ClassifierModel) -> int:
        # a seeded subset of the unlabeled set, identical on every process (a student to be
        # sharded stays on the CPU until FSDP places it)
        return recompute_batchnorm_statistics(
            model,
            estimation_inputs(unlabeled, config.batchnorm_examples, config.seed),
            batch_size=config.batch_size,
            device=torch.device("cpu") if rt.sharded else device,
        )

    recomputed_layers = 0
    if resolve_batchnorm_choice(config.batchnorm_statistics, student, weights_changed=config.kappa != 1.0):
        recomputed_layers = reestimate_statistics(student)
    # FSDP shards modules in place: train a student that is then gathered into an unsharded copy.
    returned = copy.deepcopy(student) if rt.sharded else student
    if rt.sharded:
        teacher = rt.prepare_frozen(copy.deepcopy(teacher))
    teacher_logits = _teacher_logits(rt, teacher, unlabeled, autocast) if config.cache_teacher_logits else None

    optimizer = torch.optim.Adam([student.get_parameter(n) for n in names], lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    history: list[dict[str, float]] = []
    start_step = 0
    state_file = Path(work_dir) / STATE_FILE if work_dir is not None else None
    if state_file is not None and not rt.sharded:
        saved = _load_state(rt, state_file, device)
        if saved is not None:
            _check_resume_config(saved, resume_record, state_file)
            student.load_state_dict(saved["student"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            history = [dict(h) for h in saved["history"]]
            start_step = int(saved["step"])
    model, optimizer = rt.prepare(student, optimizer)
    if rt.sharded:
        # the prepared (sharded) parameters and their theta_init shards
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        init = {n: p.detach().clone() for n, p in trainable.items()}
        rt.accelerator.register_for_checkpointing(scheduler)
        if state_file is not None:
            meta = _load_sharded_state(rt, state_file.parent / SHARDED_STATE_DIR)
            if meta is not None:
                _check_resume_config(meta, resume_record, state_file.parent / SHARDED_STATE_DIR)
                history = [dict(h) for h in meta["history"]]
                start_step = int(meta["step"])
    else:
        trainable = {n: student.get_parameter(n) for n in names}
        init = init_full
    # "batch": the student's BatchNorm layers normalise with batch statistics in every training step
    batch_statistics = batchnorm_layers(model) if config.student_batchnorm == "batch" else []
    started = time.perf_counter()
    if start_step and rt.is_main:
        log.info("DisTaC %s: resuming from step %d of %d (%s)", task.name, start_step, config.steps, work_dir)
    if start_step == 0:
        history.append(_log(rt, 0, model, student, names, val, pretrained, original_norm, scaled_norm, device, {}))
    with progress_bar(f"DisTaC {task.name}", config.steps, progress and rt.is_main) as bar:
        job = bar.add_task("distill", total=config.steps, completed=start_step, status="")
        for step in range(start_step, config.steps):
            index = _batch_indices(len(unlabeled), config.batch_size, step, config.seed)
            for layer in batch_statistics:  # _log's validation pass put them in eval mode
                layer.train()
            local = rt.local(index)
            raw = unlabeled[local] if isinstance(unlabeled, np.ndarray) else [unlabeled[i] for i in local]
            inputs = move_inputs(student.encode(raw), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if teacher_logits is not None:
                    target = teacher_logits[torch.as_tensor(local)].to(device)
                else:
                    with torch.no_grad():
                        target = teacher(inputs).float()
                kl = distillation_loss(model(inputs), target, config.student_temperature, config.teacher_temperature)
            weight = rt.loss_weight(len(local), len(index))
            optimizer.zero_grad(set_to_none=True)
            rt.backward(kl * weight if weight != 1.0 else kl)
            done = step + 1
            logging = done % config.log_every == 0 or done == config.steps
            if logging:  # the loss terms at this step's parameters (before the update), global values
                kl_value = rt.sum(kl.detach().double() * (len(local) / len(index)))
                l2_value = _squared_distance(rt, trainable, init)
            # beta * ||theta - theta_init||^2 enters through its gradient, added once after DDP's average
            if config.beta:
                _add_anchor_gradient(trainable, init, config.beta)
            if config.grad_clip:
                rt.clip_grad_norm_(model, list(trainable.values()), config.grad_clip)
            optimizer.step()
            scheduler.step()
            if logging:
                losses = {"loss": kl_value + config.beta * l2_value, "kl": kl_value, "l2": l2_value}
                history.append(
                    _log(
                        rt,
                        done,
                        model,
                        student,
                        names,
                        val,
                        pretrained,
                        original_norm,
                        scaled_norm,
                        device,
                        losses,
                    )
                )
            if (
                state_file is not None
                and config.checkpoint_every
                and (done % config.checkpoint_every == 0)
                and (done < config.steps)
            ):
                if rt.sharded:
                    _save_sharded_state(rt, state_file.parent / SHARDED_STATE_DIR, history, done, resume_record)
                elif rt.is_main:
                    _save_state(state_file, student, optimizer, scheduler, history, done, resume_record)
            bar.update(job, advance=1, status=f"kl {float(kl.detach()):.4f}")
    if rt.sharded:
        state = rt.full_state_dict(model)  # collective; complete on the main process
        if state:
            returned.load_state_dict(state)
    student = returned
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    reestimated_layers = 0
    if batch_statistics:  # running statistics that fit the distilled weights (the same on every process)
        reestimated_layers = reestimate_statistics(student)
    rt.barrier()
    if state_file is not None and rt.is_main:
        clear_state(state_file, state_file.parent / SHARDED_STATE_DIR)
    record = {
        **asdict(config),
        "batchnorm_recomputed_layers": recomputed_layers,
        "batchnorm_reestimated_after_layers": reestimated_layers,
    }
    return ConditionResult(student, history, time.perf_counter() - started, record)


def _teacher_logits(rt: Runtime, teacher: ClassifierModel, unlabeled: Any, autocast: bool) -> torch.Tensor:
    """The teacher's logits on every unlabeled input (float32, CPU, input order), on every process.

    With replicated models each process computes its share and the shares are gathered; a sharded
    (FSDP) teacher needs every process in each forward, so there each one computes them all.
    """
    if not rt.distributed or rt.sharded or len(unlabeled) < rt.num_processes:
        return predict_logits(teacher, unlabeled, batch_size=256, device=rt.device, autocast=autocast)
    part = rt.local(np.arange(len(unlabeled)))
    raw = unlabeled[part] if isinstance(unlabeled, np.ndarray) else [unlabeled[i] for i in part]
    return rt.gather_concat(predict_logits(teacher, raw, batch_size=256, device=rt.device, autocast=autocast))


def _local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 DTensor, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


@torch.no_grad()
def _add_anchor_gradient(trainable: dict[str, torch.Tensor], init: dict[str, torch.Tensor], beta: float) -> None:
    """grad += d/dtheta beta * ||theta - theta_init||^2 = 2 beta (theta - theta_init)."""
    for name, p in trainable.items():
        diff = p.detach() - init[name]
        if p.grad is None:
            p.grad = diff.mul_(2.0 * beta)
        else:
            p.grad.add_(diff, alpha=2.0 * beta)


@torch.no_grad()
def _squared_distance(rt: Runtime, trainable: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> float:
    """||theta - theta_init||^2 over the trainable parameters (summed over shards under FSDP)."""
    total = sum(float(_local_tensor(p.detach() - init[n]).double().pow(2).sum()) for n, p in trainable.items())
    return rt.sum(total) if rt.sharded else total


#: The released code's warm-up length (``--warmup_length``, not overridden by its DisTaC script).
REFERENCE_WARMUP_STEPS = 500


def _schedule(config: ConditionConfig):  # noqa: ANN202
    steps = config.steps
    if config.schedule == "reference":
        # the released code's cosine_lr: linear warm-up lr_k = lr (k+1) / W over W = 500 steps, then cosine
        # decay over the rest (METHODS-SPEC 1.7); at the paper's 500 steps the run never leaves the warm-up
        warmup = REFERENCE_WARMUP_STEPS
        return lambda k: (
            (k + 1) / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, steps - warmup)))
        )
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
    rt: Runtime,
    step: int,
    model: torch.nn.Module,
    student: ClassifierModel,
    names: list[str],
    val: Any,
    pretrained: StateDict,
    original_norm: float,
    scaled_norm: float,
    device: torch.device,
    losses: dict[str, float],
) -> dict[str, float]:
    """A history entry, computed on the main process and identical on every process.

    Replicated models: the main process evaluates its (unwrapped) student alone. FSDP: gathering the
    weights and the validation forward are collective, so every process takes part.
    """
    entry = None
    if rt.sharded:
        state = rt.full_state_dict(model)
        logits = predict_logits(model, val.inputs, batch_size=256, device=device)
        params = {n: state[n] for n in names} if rt.is_main else {}
    elif rt.is_main:
        params = {n: student.get_parameter(n) for n in names}
        logits = predict_logits(student, val.inputs, batch_size=256, device=device)
    if rt.is_main:
        probs = torch.softmax(logits, -1)
        norm = _norm(params, pretrained)
        entry = {
            "step": step,
            **losses,
            "norm": norm,
            "norm_ratio_to_scaled": norm / scaled_norm if scaled_norm else 0.0,
            "norm_ratio_to_original": norm / original_norm if original_norm else 0.0,
            "entropy": float(-(probs * probs.clamp_min(1e-9).log()).sum(-1).mean()),
            "val_accuracy": float((logits.argmax(-1) == torch.as_tensor(val.labels)).float().mean()),
        }
    model.eval()
    student.eval()
    return rt.broadcast(entry)


def _load_state(rt: Runtime, file: Path, device: torch.device) -> dict[str, Any] | None:
    """The resume state, read by the main process and broadcast to the others (None: start fresh)."""
    return load_state(rt, file, device)


def _save_sharded_state(
    rt: Runtime, directory: Path, history: list[dict[str, float]], step: int, recorded: dict[str, Any]
) -> None:
    """FSDP resume state: accelerate's sharded checkpoint (every process writes its shards, so
    ``work_dir`` must be on a filesystem all processes share), swapped into place atomically."""
    save_sharded_state(rt, directory, {"step": step, "history": history, "config": recorded})


#: options that may change between an interrupted run and its resume without changing the result
_RESUME_FREE_OPTIONS = ("device", "checkpoint_every", "log_every")


def _resume_config(config: ConditionConfig) -> dict[str, Any]:
    return resume_options(config, _RESUME_FREE_OPTIONS)


def _check_resume_config(saved: dict[str, Any], wanted: dict[str, Any], file: Path) -> None:
    """States written before options were recorded (no ``config``) are accepted."""
    if saved.get("config") is not None:
        check_resume_options(saved["config"], wanted, file, "conditioning")


def _load_sharded_state(rt: Runtime, directory: Path) -> dict[str, Any] | None:
    return load_sharded_state(rt, directory)


def _save_state(
    file: Path,
    student: ClassifierModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    history: list[dict[str, float]],
    step: int,
    recorded: dict[str, Any],
) -> None:
    """The single-process / DDP resume state; ``recorded``: the options and inputs it was made with."""
    payload = {
        "student": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
        "step": step,
        "config": recorded,
    }
    save_state(file, payload)
