"""Fine-tuning of source models (the paper's sources, and its failure modes).

AdamW (weight decay 0.1) with a cosine schedule and linear warm-up, as in the paper. The knobs
that create harmful sources: a 10x learning rate (long task vector), and the losses of
:mod:`distac.training.losses` (label smoothing, mixup, focal loss: low confidence).
For CLIP only the image encoder trains (its zero-shot head is frozen); for other models the
backbone and the task head train together (``head: train``), or the head is first fitted as a
linear probe on the pretrained features and then trains too (``head: probe``, LP-FT) or stays frozen
(``head: frozen_probe``, the CLIP set-up for models without a zero-shot head; see
:mod:`distac.training.probe`).

Given a ``work_dir``, the loop saves its state there every ``checkpoint_every`` steps (model,
optimizer, schedule, data order, random generators, losses): an interrupted run resumes from it and
ends with the same weights as a straight run (:mod:`distac.resume`).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from distac.config import (
    build_dataclass,
    check_choice_option,
    check_device_option,
    check_option,
    check_type_option,
)
from distac.data import TaskData
from distac.distributed import Runtime, runtime
from distac.models.base import ClassifierModel, move_inputs
from distac.models.inference import bf16_autocast, predict_logits
from distac.resume import (
    check_resume_options,
    clear_state,
    load_sharded_state,
    load_state,
    restore_rng_states,
    resume_options,
    rng_states,
    run_identity,
    save_sharded_state,
    save_state,
)
from distac.training.losses import LossConfig, build_loss, cross_entropy, mixup_pairs
from distac.training.probe import ProbeResult, fit_linear_probe

log = logging.getLogger("distac.training")

STATE_FILE = "finetune_state.pt"
SHARDED_STATE_DIR = "finetune_state_fsdp"  # FSDP runs: accelerate's sharded checkpoint
# options a resumed run may change: they do not change the weights it ends with
_RESUME_FREE_OPTIONS = ("device", "checkpoint_every")
#: How the task head is treated: trained with the backbone; probed first, then trained; probed, then frozen.
HEAD_MODES = ("train", "probe", "frozen_probe")


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
    mixed_precision: bool = False  # bf16 autocast on CUDA or a CPU with native bf16 (else float32, a warning)
    max_train_examples: int | None = None
    eval_every: int | None = None
    eval_examples: int = 200
    checkpoint_every: int | None = 100  # with a work_dir: save the resume state every N steps (0/None: never)
    head: str = "train"  # train | probe (LP-FT) | frozen_probe (probe, then only the backbone trains)
    probe_iterations: int = 100  # L-BFGS iterations of the linear probe (head: probe / frozen_probe)
    probe_l2: float | None = None  # its L2 strength; None: the best of PROBE_L2_GRID on validation

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = build_dataclass(LossConfig, self.loss, "finetune.loss")
        # ConfigError (a ValueError) naming the option, e.g. "finetune.lr must be in (0.0, 10.0], got 0"
        f = "finetune"
        check_type_option(f, "loss", self.loss, LossConfig)
        check_option(f, "steps", self.steps, low=1, integer=True)
        check_option(f, "lr", self.lr, low=0.0, high=10.0, low_inclusive=False)
        check_option(f, "batch_size", self.batch_size, low=1, integer=True)
        check_option(f, "weight_decay", self.weight_decay, low=0.0)
        check_option(f, "warmup_ratio", self.warmup_ratio, low=0.0, high=1.0)
        check_option(f, "warmup_steps", self.warmup_steps, low=0, integer=True, optional=True)
        check_option(f, "grad_clip", self.grad_clip, low=0.0, optional=True)
        check_option(f, "seed", self.seed, low=0, high=2**63 - 1, integer=True)
        check_option(f, "max_train_examples", self.max_train_examples, low=1, integer=True, optional=True)
        check_option(f, "eval_every", self.eval_every, low=0, integer=True, optional=True)
        check_option(f, "eval_examples", self.eval_examples, low=1, integer=True)
        check_option(f, "checkpoint_every", self.checkpoint_every, low=0, integer=True, optional=True)
        check_type_option(f, "mixed_precision", self.mixed_precision, bool)
        check_device_option(f, "device", self.device)
        check_choice_option(f, "head", self.head, HEAD_MODES)
        check_option(f, "probe_iterations", self.probe_iterations, low=1, integer=True)
        check_option(f, "probe_l2", self.probe_l2, low=0.0, optional=True)


@dataclass
class FinetuneResult:
    losses: list[float]
    evaluations: list[dict[str, float]]
    seconds: float
    steps: int
    probe: ProbeResult | None = None  # the linear probe fitted first (head: probe / frozen_probe)

    def to_json(self) -> dict[str, Any]:
        return {
            "losses": self.losses[:: max(1, len(self.losses) // 100)],
            "final_loss": self.losses[-1],
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "steps": self.steps,
            **({"probe": self.probe.to_json()} if self.probe is not None else {}),
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


class _TrainForward(nn.Module):
    """The module DDP / FSDP wrap for fine-tuning: the model's forward with mixup inside it.

    Text mixup mixes pooled features, so features and head must run in one forward of the wrapped
    module. ``own`` / ``partner`` index the encoded examples: example ``own[i]`` is mixed with
    ``partner[i]`` (with one process, ``own`` is the whole batch and ``partner`` its permutation).
    """

    def __init__(self, model: ClassifierModel) -> None:
        super().__init__()
        self.model = model

    def encode(self, raw: Any) -> dict[str, torch.Tensor]:
        return self.model.encode(raw)

    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        own: torch.Tensor | None = None,
        partner: torch.Tensor | None = None,
        lam: float | None = None,
    ) -> torch.Tensor:
        if lam is None:
            return self.model(inputs)
        if "pixel_values" in inputs:
            pixels = inputs["pixel_values"]
            mixed = {k: v[own] for k, v in inputs.items()}
            mixed["pixel_values"] = lam * pixels[own] + (1 - lam) * pixels[partner]
            return self.model(mixed)
        feats = self.model.features(inputs)  # text: mix pooled features (token ids cannot be interpolated)
        return self.model.classify(lam * feats[own] + (1 - lam) * feats[partner])


def finetune(
    model: ClassifierModel,
    task: TaskData,
    config: FinetuneConfig,
    *,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Train ``model`` in place on ``task.train``; deterministic for a given seed on CPU.

    With ``work_dir`` the run saves its state there every ``config.checkpoint_every`` steps and
    resumes from it if it is there (the same weights as a straight run); the state is deleted at
    the end. Only the main process writes it (under FSDP every process writes its shards).

    Under ``accelerate launch`` each process trains on its slice of the same global batch and DDP
    averages the gradients, so the result matches a single-process run for models without dropout
    or BatchNorm in train mode (dropout masks are drawn per process, BatchNorm statistics are per
    process); see :mod:`distac.distributed`.
    """
    from transformers import get_cosine_schedule_with_warmup

    rt = runtime(config.device)
    device = rt.device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train = (
        task.train.subsample(config.max_train_examples, seed=config.seed) if config.max_train_examples else task.train
    )
    source = task.source or task.name
    model.check_labels(train.labels, source)
    probe = None
    if config.head != "train":  # deterministic: a resumed run fits the same head, then loads its state
        probe = fit_linear_probe(
            model,
            train,
            task.validation,
            iterations=config.probe_iterations,
            l2=config.probe_l2,
            device=device,
            source=source,
        )
    if not rt.sharded:
        model.to(device)
    elif probe is not None:
        model.to("cpu")  # FSDP shards the CPU copy below
    # FSDP shards modules in place: train a copy and gather the result into ``model`` at the end.
    net = _TrainForward(copy.deepcopy(model) if rt.sharded else model)
    params = net.model.trainable_parameters()
    frozen_head = list(net.model.head.parameters()) if config.head == "frozen_probe" else []
    if frozen_head:
        ids = {id(p) for p in frozen_head}
        params = [p for p in params if id(p) not in ids]
        for parameter in frozen_head:  # no gradient, and DDP / FSDP do not wait for one
            parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * config.steps)
    # transformers' warm-up is lr * k / W, so step 0 runs at lr 0: one step behind the reference code's
    # cosine_lr, lr * (k + 1) / W (METHODS-SPEC 1.7, 1.11). Known and kept: 1 of 2000 steps in the paper's
    # setting, and every published source was fine-tuned with this schedule.
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)
    loss_fn = build_loss(config.loss)
    labels_all = torch.as_tensor(train.labels)
    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    losses: list[float] = []
    evaluations: list[dict[str, float]] = []
    start_step, seconds_before = 0, 0.0
    identity = run_identity(task, model.spec, task.train.inputs, task.train.labels) if work_dir is not None else {}
    resume_config = {**_resume_config(config), **identity}

    def restore(loop: dict[str, Any], file: Path) -> None:
        nonlocal order, losses, evaluations, start_step, seconds_before
        check_resume_options(loop["config"], resume_config, file, "fine-tuning")
        rng.bit_generator.state = loop["numpy_rng"]
        generator.set_state(torch.tensor(loop["mixup_rng"], dtype=torch.uint8))
        order = [int(i) for i in loop["order"]]
        losses = [float(x) for x in loop["losses"]]
        evaluations = [dict(e) for e in loop["evaluations"]]
        start_step, seconds_before = int(loop["step"]), float(loop["seconds"])

    state_file = Path(work_dir) / STATE_FILE if work_dir is not None else None
    sharded_dir = state_file.parent / SHARDED_STATE_DIR if state_file is not None else None
    if state_file is not None and not rt.sharded:
        saved = load_state(rt, state_file, device)
        if saved is not None:
            restore(saved["loop"], state_file)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            restore_rng_states(rt, saved["rng"])
    net, optimizer = rt.prepare(net, optimizer)
    if rt.sharded and sharded_dir is not None:
        rt.accelerator.register_for_checkpointing(scheduler)
        meta = load_sharded_state(rt, sharded_dir)  # model, optimizer, scheduler and generators
        if meta is not None:
            restore(meta, sharded_dir)
    if start_step and rt.is_main:
        log.info("fine-tune %s: resuming from step %d of %d (%s)", task.name, start_step, config.steps, work_dir)
    autocast = bf16_autocast(config.mixed_precision, device)
    mixup = config.loss.kind == "mixup"
    start = time.perf_counter()
    with progress_bar(f"fine-tune {task.name}", config.steps, progress and rt.is_main) as bar:
        job = bar.add_task("train", total=config.steps, completed=start_step, status="")
        for step in range(start_step, config.steps):
            if len(order) < config.batch_size:
                order.extend(rng.permutation(len(train)).tolist())
            index, order = np.asarray(order[: config.batch_size]), order[config.batch_size :]
            own = rt.local(np.arange(len(index)))  # this process's positions in the global batch
            if mixup:
                perm, lam = mixup_pairs(len(index), generator)  # over the global batch, same on every process
                partner = perm.numpy()[own]
                encoded = np.union1d(own, partner)  # the examples this process needs: its own and their partners
                own_at = torch.as_tensor(np.searchsorted(encoded, own), device=device)
                partner_at = torch.as_tensor(np.searchsorted(encoded, partner), device=device)
            else:
                encoded = own
            raw = (
                train.inputs[index[encoded]]
                if isinstance(train.inputs, np.ndarray)
                else [train.inputs[i] for i in index[encoded]]
            )
            inputs = move_inputs(model.encode(raw), device)
            labels = labels_all[torch.as_tensor(index[own])].to(device)
            net.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if mixup:
                    logits = net(inputs, own=own_at, partner=partner_at, lam=lam).float()
                    partner_labels = labels_all[torch.as_tensor(index[partner])].to(device)
                    loss = lam * cross_entropy(logits, labels) + (1 - lam) * cross_entropy(logits, partner_labels)
                else:
                    loss = loss_fn(net(inputs).float(), labels)
            weight = rt.loss_weight(len(own), len(index))
            optimizer.zero_grad(set_to_none=True)
            rt.backward(loss * weight if weight != 1.0 else loss)
            if config.grad_clip:
                rt.clip_grad_norm_(net, params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(rt.sum(loss.detach().double() * (len(own) / len(index))))
            done = step + 1
            if config.eval_every and done % config.eval_every == 0:
                evaluations.append({"step": done, **_validation_accuracy(rt, net, task, config, device)})
            checkpoint = bool(config.checkpoint_every) and done % config.checkpoint_every == 0
            if state_file is not None and checkpoint and done < config.steps:
                loop = {
                    "step": done,
                    "config": resume_config,
                    "losses": losses,
                    "evaluations": evaluations,
                    "order": order,
                    "numpy_rng": rng.bit_generator.state,
                    "mixup_rng": generator.get_state().tolist(),
                    "seconds": seconds_before + time.perf_counter() - start,
                }
                if rt.sharded:
                    save_sharded_state(rt, sharded_dir, loop)  # collective
                else:
                    generators = rng_states(rt)  # collective
                    if rt.is_main:
                        _save_state(state_file, model, optimizer, scheduler, generators, loop)
            bar.update(job, advance=1, status=f"loss {losses[-1]:.3f}")
    if rt.sharded:
        state = rt.full_state_dict(net)  # collective; complete on the main process
        if state:
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    rt.barrier()
    if state_file is not None and sharded_dir is not None and rt.is_main:
        clear_state(state_file, sharded_dir)
    for parameter in list(model.head.parameters()) if frozen_head else []:
        parameter.requires_grad_(True)  # the model leaves as it came; the head's values are the probe's
    model.eval()
    return FinetuneResult(losses, evaluations, seconds_before + time.perf_counter() - start, config.steps, probe)


def _resume_config(config: FinetuneConfig) -> dict[str, Any]:
    return resume_options(config, _RESUME_FREE_OPTIONS)


def _save_state(
    file: Path,
    model: ClassifierModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generators: dict[str, torch.Tensor],
    loop: dict[str, Any],
) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": generators,
        "loop": loop,
    }
    save_state(file, payload)


def _validation_accuracy(
    rt: Runtime, net: nn.Module, task: TaskData, config: FinetuneConfig, device: torch.device
) -> dict:
    """Validation accuracy on the main process, the same dict on every process. Under FSDP the
    forward is collective, so every process runs it; otherwise only the main process does."""
    data = task.validation.subsample(config.eval_examples, seed=1)
    result = None
    if rt.sharded or rt.is_main:
        evaluated = net if rt.sharded else rt.unwrap(net).model
        logits = predict_logits(evaluated, data.inputs, batch_size=128, device=device)
        if rt.is_main:
            result = {"val_accuracy": float((logits.argmax(-1) == torch.as_tensor(data.labels)).float().mean())}
    net.train()
    return rt.broadcast(result)
