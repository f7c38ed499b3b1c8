"""A fine-tuning resume state is continued only by the same run: same options, task, model and data.
A run killed on one task and rerun on another (same output) used to resume and save a model that was
half of each; with fewer training examples it crashed on an index past the data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import killed_after_saving

import distac.training.finetune as training
from distac.data import load_task
from distac.errors import CheckpointError
from distac.models import ModelSpec, build_model
from distac.training.finetune import FinetuneConfig, finetune


def test_a_state_is_resumed_only_by_the_same_task_model_and_data(
    tmp_path: Path, tiny_bert_dir: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sst2 = load_task("sst2", data_root).limit(32, 16, 16)
    spec = ModelSpec("hf-text", str(tiny_bert_dir), 2, task="sst2", options={"max_length": 16})
    config = FinetuneConfig(steps=4, lr=1e-3, batch_size=8, checkpoint_every=2, device="cpu")
    work = tmp_path / "work"
    with killed_after_saving(monkeypatch, training):
        finetune(build_model(spec), sst2, config, work_dir=work, progress=False)

    fewer = load_task("sst2", data_root).limit(24, 16, 16)
    with pytest.raises(CheckpointError, match=r"other options or inputs \(run\.data\)"):
        finetune(build_model(spec), fewer, config, work_dir=work, progress=False)
    shorter = replace(spec, options={"max_length": 12})
    with pytest.raises(CheckpointError, match=r"other options or inputs \(run\.model\)"):
        finetune(build_model(shorter), sst2, config, work_dir=work, progress=False)
    with pytest.raises(CheckpointError, match=r"other options or inputs \(lr\)"):
        finetune(build_model(spec), sst2, replace(config, lr=1e-4), work_dir=work, progress=False)
    result = finetune(build_model(spec), sst2, config, work_dir=work, progress=False)  # the same run resumes
    assert len(result.losses) == 4 and not work.exists()
