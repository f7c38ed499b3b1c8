"""Batched inference shared by evaluation, diagnosis, distillation and coefficient search."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from distac.errors import ConfigError
from distac.models.base import ClassifierModel, Inputs, move_inputs

log = logging.getLogger("distac.models")


def pick_device(requested: str | None = None) -> torch.device:
    """``auto`` (or None) = CUDA when available, else CPU. Anything else must parse as a torch device
    that exists here: ``--device cuda`` on a machine without one is a clear error, not a crash in the
    first forward pass."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ConfigError(
            f"device {requested!r} is not a torch device (auto, cpu, cuda, cuda:1, ...): {error}"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(
                f"device {requested!r}: this machine has {count} CUDA device(s); use --device cpu or auto"
            )
    return device


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 kernels natively on this CPU (AVX-512 with BF16, or AMX). Only then does
    bf16 autocast pay on a CPU; torch exposes the check only as a private op, so any failure reads as
    "no"."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_autocast(requested: bool, device: torch.device) -> bool:
    """Whether to run under bf16 autocast: on CUDA, and on a CPU with native bf16 kernels. Measured in
    ``benchmarks/results``: on a 2-core AVX-512 CPU with oneDNN bf16 a training step is 1.64x faster
    under autocast, on a 2-core AVX2 CPU without it 15.6x slower. So a request on a CPU without
    native bf16 (or on another device) is ignored with a warning, and a config written for a GPU still
    runs on a laptop and says why it is not mixed precision there."""
    if not requested:
        return False
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return True
    log.warning(
        "mixed_precision (bf16 autocast) needs CUDA or a CPU with native bf16 kernels (oneDNN); running in "
        "float32 on %s (CPU capability %s)",
        device,
        torch.backends.cpu.get_cpu_capability(),
    )
    return False


def batches(raw: Sequence[Any] | np.ndarray, batch_size: int) -> Iterator[tuple[int, Any]]:
    for start in range(0, len(raw), batch_size):
        yield start, raw[start : start + batch_size]


def predict_logits(
    model: ClassifierModel,
    raw: Sequence[Any] | np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    autocast: bool = False,
) -> torch.Tensor:
    """Logits for all ``raw`` inputs, float32 on the CPU, in input order; the model is left in eval mode."""
    return _predict(model, model, raw, batch_size, device, autocast)


def predict_features(
    model: ClassifierModel,
    raw: Sequence[Any] | np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The pooled features the head classifies, float32 on the CPU, in input order (eval mode)."""
    return _predict(model, model.features, raw, batch_size, device, False)


@torch.no_grad()
def _predict(
    model: ClassifierModel,
    forward: Any,
    raw: Sequence[Any] | np.ndarray,
    batch_size: int,
    device: torch.device | str | None,
    autocast: bool,
) -> torch.Tensor:
    device = pick_device(str(device) if device is not None else None)
    autocast = bf16_autocast(autocast, device)
    model.eval().to(device)
    outputs = []
    for _, chunk in batches(raw, batch_size):
        inputs: Inputs = move_inputs(model.encode(chunk), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs.append(forward(inputs).float().cpu())
    if not outputs:
        raise ValueError("no inputs to predict")
    return torch.cat(outputs)


def encode_all(model: ClassifierModel, raw: Sequence[Any] | np.ndarray, batch_size: int = 256) -> list[Inputs]:
    """Pre-encode inputs once (tokenisation / resizing) so training loops do not redo it."""
    return [model.encode(chunk) for _, chunk in batches(raw, batch_size)]
