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

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from distac.atomic import atomic_path, atomic_write_json
from distac.distributed import Runtime
from distac.errors import CheckpointError

SHARDED_META_FILE = "distac_state.json"


def resume_options(config: Any, free: tuple[str, ...]) -> dict[str, Any]:
    """The options of a loop's config dataclass that a resume state must have been saved with:
    all but ``free`` (those that cannot change the weights the run ends with)."""
    return {k: v for k, v in asdict(config).items() if k not in free}


def check_resume_options(recorded: dict[str, Any], wanted: dict[str, Any], file: Path, run: str) -> None:
    """Refuse to continue a state saved with other options: the result would be neither run."""
    if recorded == wanted:
        return
    changed = sorted(k for k in set(wanted) | set(recorded) if recorded.get(k) != wanted.get(k))
    raise CheckpointError(
        f"{file} was saved by a {run} run with other options ({', '.join(changed)}): "
        "rerun with the same options, or delete it to start over"
    )


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
    shutil.rmtree(sharded_dir, ignore_errors=True)
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
