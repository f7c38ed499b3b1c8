"""Resume state for the training loops (fine-tuning and DisTaC conditioning).

A loop that is given a ``work_dir`` saves its state there every ``checkpoint_every`` steps and, when
it starts and finds one, continues from it; it deletes the state when it ends. A resumed run ends
with the same weights as a straight one.

* One process or DDP: one file (``torch.save`` of plain tensors, lists and dicts, read back with
  ``weights_only=True``), written atomically by the main process and read by it and broadcast.
* FSDP: accelerate's sharded checkpoint (every process writes its shards, so the work directory must
  be on a filesystem all processes share), plus a JSON file with the loop's own state, swapped into
  place as a whole.

The torch random-number generators (dropout) are saved per process (:func:`rng_states`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distac.atomic import atomic_path, atomic_write_json, remove_stale_temporaries
from distac.distributed import Runtime
from distac.errors import CheckpointError

SHARDED_META_FILE = "distac_state.json"


def resume_options(config: Any, free: tuple[str, ...]) -> dict[str, Any]:
    """The options of a loop's config dataclass that a resume state must have been saved with:
    all but ``free`` (those that cannot change the weights the run ends with)."""
    return {k: v for k, v in asdict(config).items() if k not in free}


def check_resume_options(recorded: dict[str, Any], wanted: dict[str, Any], file: Path, run: str) -> None:
    """Refuse to continue a state saved with other options or inputs (the ``run.*`` entries of
    :func:`run_identity`): the result would be neither run. States saved before inputs were recorded
    are checked on their options only."""
    keys = [k for k in set(wanted) | set(recorded) if not (k.startswith(IDENTITY_PREFIX) and k not in recorded)]
    changed = sorted(k for k in keys if recorded.get(k) != wanted.get(k))
    if changed:
        raise CheckpointError(
            f"{file} was saved by a {run} run with other options or inputs ({', '.join(changed)}): "
            "rerun with the same ones, or delete it to start over"
        )


#: Resume-state entries that describe the run's inputs rather than its options.
IDENTITY_PREFIX = "run."


def run_identity(
    task: Any, spec: Any, inputs: Any, labels: Any = None, *, teacher: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """What a resume state must have been saved with besides the options: the task, the model it trains
    (architecture, head, backbone reference, options), a fingerprint of the data it reads, and for
    conditioning the teacher's weights. Without them a run killed on one task, source or data subset
    resumed on another and saved a model that is half of each (or crashed on an index past the data)."""
    identity = {
        f"{IDENTITY_PREFIX}task": str(task.name),
        f"{IDENTITY_PREFIX}model": _model_identity(spec),
        f"{IDENTITY_PREFIX}data": data_fingerprint(inputs, labels),
    }
    if teacher is not None:
        identity[f"{IDENTITY_PREFIX}teacher"] = weights_fingerprint(teacher)
    return identity


def _model_identity(spec: Any) -> dict[str, Any]:
    """The model spec as a resume state records it, without ``task_source``: where the task's data was
    read from (a dataset path the CLI records, the library does not) says nothing about what is trained,
    and the data itself is fingerprinted apart, so a state saved by the library resumes under the CLI."""
    record = json.loads(json.dumps(spec.to_json(), default=str))
    record.pop("task_source", None)
    return record


def data_fingerprint(inputs: Any, labels: Any = None, sample: int = 64) -> str:
    """A short hash of a data set: its size, its labels and its first ``sample`` inputs."""
    digest = hashlib.sha1(str(len(inputs)).encode())
    if labels is not None:
        digest.update(np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
    for item in list(inputs[:sample]):
        digest.update(np.ascontiguousarray(item).tobytes() if isinstance(item, np.ndarray) else repr(item).encode())
    return digest.hexdigest()[:16]


def weights_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a state dict from each tensor's name, shape and float64 sum and sum of squares
    (9 significant digits: the same file read on another device gives the same fingerprint)."""
    digest = hashlib.sha1()
    for key in sorted(state):
        tensor = state[key].detach()
        values = tensor.double() if tensor.is_floating_point() else tensor.to(torch.float64)
        digest.update(f"{key}{tuple(tensor.shape)}{float(values.sum()):.9e}{float(values.pow(2).sum()):.9e}".encode())
    return digest.hexdigest()[:16]


def load_state(rt: Runtime, file: Path, device: torch.device) -> dict[str, Any] | None:
    """The resume state, read by the main process and broadcast to the others (None: start fresh)."""
    saved = None
    if rt.is_main and file.is_file():
        saved = torch.load(file, map_location="cpu" if rt.distributed else device, weights_only=True)
    return rt.broadcast(saved)


def save_state(file: Path, payload: dict[str, Any]) -> None:
    """Write a resume state atomically (main process only)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(file) as tmp:
        torch.save(payload, tmp)


def clear_state(state_file: Path, sharded_dir: Path) -> None:
    """A finished run's cleanup (main process): delete its resume state, then the work directory
    itself if nothing else is in it, so finished runs leave no empty ``*.work`` folders behind.
    Anything else a user keeps there stays."""
    state_file.unlink(missing_ok=True)
    remove_stale_temporaries(state_file)  # a state write a kill interrupted
    shutil.rmtree(sharded_dir, ignore_errors=True)
    for leftover in (
        sharded_dir.with_name(sharded_dir.name + ".tmp"),
        sharded_dir.with_name(sharded_dir.name + ".old"),
    ):
        shutil.rmtree(leftover, ignore_errors=True)  # an FSDP state swap a crash interrupted
    try:
        state_file.parent.rmdir()
    except OSError:  # not empty, already gone, or the current directory
        pass


def save_sharded_state(rt: Runtime, directory: Path, meta: dict[str, Any]) -> None:
    """FSDP resume state: accelerate's sharded checkpoint plus ``meta`` (JSON), swapped into place
    atomically. Collective: every process must call it."""
    tmp = directory.with_name(directory.name + ".tmp")
    if rt.is_main and tmp.exists():
        shutil.rmtree(tmp)
    rt.barrier()
    rt.accelerator.save_state(str(tmp))
    rt.barrier()
    if rt.is_main:
        atomic_write_json(tmp / SHARDED_META_FILE, meta)
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    rt.barrier()


def load_sharded_state(rt: Runtime, directory: Path) -> dict[str, Any] | None:
    """Load an FSDP resume state into the prepared objects (collective); its ``meta``, or None."""
    meta = None
    if rt.is_main and (directory / SHARDED_META_FILE).is_file():
        meta = json.loads((directory / SHARDED_META_FILE).read_text())
    meta = rt.broadcast(meta)
    if meta is not None:
        rt.accelerator.load_state(str(directory))
    return meta


def rng_states(rt: Runtime) -> dict[str, torch.Tensor]:
    """Every process's torch generator states, one row per process (CPU, and CUDA when training on
    a GPU). Collective: every process must call it; the result is complete on every process."""
    states = {"cpu": rt.gather_concat(torch.get_rng_state().unsqueeze(0))}
    if rt.device.type == "cuda":
        states["cuda"] = rt.gather_concat(torch.cuda.get_rng_state(rt.device).unsqueeze(0))
    return states


def restore_rng_states(rt: Runtime, states: dict[str, torch.Tensor]) -> None:
    """Restore this process's row of :func:`rng_states` (the main process's row if the state was
    saved by fewer processes)."""
    for kind, rows in states.items():
        row = rows[rt.process_index if rt.process_index < len(rows) else 0].cpu()
        if kind == "cpu":
            torch.set_rng_state(row)
        elif kind == "cuda" and rt.device.type == "cuda":
            torch.cuda.set_rng_state(row, rt.device)
