"""A conditioning resume state is only continued by a run with the same options: continuing it
with another kappa, temperature or data setting would give a model that neither run describes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import killed_after_saving

import distac.conditioning.distac as conditioning
from distac.conditioning.distac import STATE_FILE, ConditionConfig, condition
from distac.data import load_task
from distac.errors import CheckpointError
from distac.models import ModelSpec, build_model


def test_resume_refuses_other_options_and_accepts_logging_changes(
    tmp_path: Path, tiny_bert_dir: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = load_task("sst2", data_root).limit(32, 16, 16)
    spec = ModelSpec("hf-text", str(tiny_bert_dir), task.num_classes, task="sst2", options={"max_length": 16})
    torch.manual_seed(0)
    teacher = build_model(spec, pretrained=True)
    selector = teacher.task_vector_selector()
    pretrained = {k: v.clone() for k, v in build_model(spec, pretrained=True).state_dict().items() if selector(k, v)}
    config = ConditionConfig(
        kappa=0.5, steps=4, lr=1e-3, batch_size=8, checkpoint_every=2, log_every=2, eval_examples=16, device="cpu"
    )
    work = tmp_path / "work"
    with killed_after_saving(monkeypatch, conditioning):
        condition(teacher, pretrained, task, config, work_dir=work, progress=False)
    assert (work / STATE_FILE).is_file()

    for changed in ({"kappa": 0.4}, {"student_temperature": 2.0}, {"num_unlabeled": 16}):
        with pytest.raises(CheckpointError, match=f"{STATE_FILE}.*other options or inputs \\({next(iter(changed))}"):
            condition(teacher, pretrained, task, replace(config, **changed), work_dir=work, progress=False)
    # other inputs: another teacher (a source of the same task), another unlabeled subset. They used to
    # resume the old student under the new teacher, or on other data
    other_teacher = build_model(spec, pretrained=True)
    with torch.no_grad():
        next(other_teacher.backbone.parameters()).add_(0.01)
    with pytest.raises(CheckpointError, match=r"other options or inputs \(run\.teacher\)"):
        condition(other_teacher, pretrained, task, config, work_dir=work, progress=False)
    other_data = load_task("sst2", data_root).limit(32, 16, 16, seed=1)
    with pytest.raises(CheckpointError, match=r"other options or inputs \(run\.data\)"):
        condition(teacher, pretrained, other_data, config, work_dir=work, progress=False)
    # logging and checkpoint cadence do not change the result: the run continues from step 2
    result = condition(teacher, pretrained, task, replace(config, log_every=1), work_dir=work, progress=False)
    assert not (work / STATE_FILE).exists()
    assert min(h["step"] for h in result.history) == 0 and max(h["step"] for h in result.history) == 4


def test_clear_state_removes_the_state_and_an_emptied_work_dir_but_keeps_other_files(tmp_path: Path) -> None:
    from distac.resume import clear_state

    work = tmp_path / "out.work"
    (work / "fsdp").mkdir(parents=True)
    (work / "state.pt").write_bytes(b"x")
    (work / "fsdp" / "shard").write_bytes(b"x")
    clear_state(work / "state.pt", work / "fsdp")
    assert not work.exists()

    (work / "fsdp").mkdir(parents=True)
    (work / "state.pt").write_bytes(b"x")
    (work / "notes.txt").write_text("mine")
    clear_state(work / "state.pt", work / "fsdp")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    clear_state(work / "state.pt", work / "fsdp")  # idempotent: nothing left to delete
    assert (work / "notes.txt").read_text() == "mine"
