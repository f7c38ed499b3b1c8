"""One process or many: how the training loops run under ``accelerate launch`` / ``torchrun``.

:func:`runtime` returns a :class:`Runtime`. Without a launcher it is a plain single-process
runtime (the device from ``--device``, no wrapper, no collective: exactly the loops' historic
behaviour). Under a multi-process launcher (``WORLD_SIZE`` > 1, or ``accelerate launch
--use_fsdp``) it wraps an :class:`accelerate.Accelerator`: the model is prepared for DDP (or FSDP,
as the accelerate config says), gradients are averaged across processes, gradient clipping goes
through ``accelerator.clip_grad_norm_`` and state dicts through ``accelerator.get_state_dict``.

Equivalence with one process: every process computes the *same* global batch indices (a pure
function of the step and seed) and takes its own contiguous slice (:meth:`Runtime.local`). Each
process scales its batch-mean loss by ``len(slice) * num_processes / len(batch)`` (1.0 when the
batch divides evenly); DDP then averages gradients, which gives exactly the gradient of the mean
loss over the whole global batch. Terms that do not depend on the data (DisTaC's L2 anchor) are
added to the gradient after the average, once.

Only the main process writes files, logs and shows progress.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from distac.errors import ConfigError
from distac.models.inference import pick_device

_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _env_int(names: Iterable[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return default


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes"}


def launched_distributed() -> bool:
    """True under a multi-process launcher (accelerate, torchrun, mpirun) or accelerate's FSDP mode."""
    return _env_int(_WORLD_SIZE_VARS, 1) > 1 or _env_flag("ACCELERATE_USE_FSDP")


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 without a launcher)."""
    return _env_int(_RANK_VARS, 0) if launched_distributed() else 0


def is_main_process() -> bool:
    """Whether this process writes outputs and prints (usable before any :class:`Runtime` exists)."""
    return process_rank() == 0


@dataclass
class Runtime:
    """Where and how a training loop runs. ``accelerator`` is None for a plain single process."""

    device: torch.device
    accelerator: Any = None

    # -- who am I --------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.accelerator is not None

    @property
    def num_processes(self) -> int:
        return int(self.accelerator.num_processes) if self.accelerator is not None else 1

    @property
    def process_index(self) -> int:
        return int(self.accelerator.process_index) if self.accelerator is not None else 0

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    @property
    def sharded(self) -> bool:
        """FSDP: parameters, gradients and optimizer state are sharded across processes."""
        if self.accelerator is None:
            return False
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    # -- data ------------------------------------------------------------------------------------
    def local(self, items: np.ndarray | list[int]) -> np.ndarray:
        """This process's contiguous slice of a global batch (all of it for one process)."""
        items = np.asarray(items)
        if self.num_processes == 1:
            return items
        if len(items) < self.num_processes:
            raise ConfigError(
                f"a global batch of {len(items)} examples cannot be split over {self.num_processes} processes: "
                "use a batch size (and number of examples) of at least the number of processes, ideally a multiple"
            )
        return np.array_split(items, self.num_processes)[self.process_index]

    def loss_weight(self, local_size: int, global_size: int) -> float:
        """Factor that turns a batch-mean loss over the local slice into this process's share of the
        global batch-mean loss, so that DDP's gradient average equals the single-process gradient."""
        return local_size * self.num_processes / global_size

    # -- model and optimizer ---------------------------------------------------------------------
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        """DDP / FSDP wrap (and device placement). The learning-rate scheduler is deliberately not
        prepared: accelerate would step it once per process, and the schedule is per global step."""
        if self.accelerator is None:
            return model.to(self.device), optimizer
        model, optimizer = self.accelerator.prepare(model, optimizer)
        return model, optimizer

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """A model that is only run forward (the DisTaC teacher): sharded under FSDP, else a replica."""
        if self.sharded:
            if getattr(self.accelerator, "is_fsdp2", False):
                # accelerate's prepare() wants an optimizer with every FSDP2 model; shard it directly
                from accelerate.utils.fsdp_utils import fsdp2_prepare_model

                return fsdp2_prepare_model(self.accelerator, model)
            return self.accelerator.prepare_model(model)
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else model

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm_(self, model: nn.Module, parameters: list[nn.Parameter], max_norm: float) -> Any:
        """Clip by the global gradient norm. Under FSDP accelerate needs *all* the prepared model's
        parameters (frozen ones have no gradient and do not count)."""
        if self.accelerator is None:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if self.sharded:
            parameters = list(model.parameters())
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state dict with its original key names. Collective under FSDP (every
        process must call it); the result is complete on the main process."""
        if self.accelerator is None:
            return model.state_dict()
        return self.accelerator.get_state_dict(model)

    # -- collectives -----------------------------------------------------------------------------
    def sum(self, value: torch.Tensor | float) -> float:
        """Sum of a scalar over processes (the value itself for one process)."""
        tensor = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1)
        if self.accelerator is None:
            return float(tensor)
        return float(self.accelerator.reduce(tensor.to(self.device), reduction="sum").sum())

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process (picklable objects)."""
        if self.accelerator is None:
            return obj
        from accelerate.utils import broadcast_object_list

        payload = [obj if self.is_main else None]
        broadcast_object_list(payload, from_process=0)
        return payload[0]

    def gather_concat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's CPU tensor along dim 0, in process order."""
        if self.accelerator is None:
            return tensor
        from accelerate.utils import gather_object

        return torch.cat(gather_object([tensor.cpu()]))

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        with self.accelerator.main_process_first() if self.accelerator is not None else contextlib.nullcontext():
            yield


def runtime(device: str | None = "auto") -> Runtime:
    """The runtime for this process: plain without a launcher, accelerate-backed under one.

    ``device`` picks the device of a plain run (``cpu``, ``cuda:1``, ``auto``). Under a launcher each
    process uses the device accelerate assigns it (GPU ``LOCAL_RANK``); ``cpu`` (or ``auto`` on a
    machine without CUDA) selects multi-process CPU training over gloo.
    """
    requested = pick_device(device)
    if not launched_distributed():
        return Runtime(requested)
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("DeepSpeed is not supported by distac's training loops; use DDP or FSDP (--use_fsdp)")
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    find_unused = _env_flag("DISTAC_FIND_UNUSED_PARAMETERS")
    accelerator = Accelerator(
        cpu=requested.type == "cpu",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )
    return Runtime(accelerator.device, accelerator)
