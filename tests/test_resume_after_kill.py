"""Nothing lost: long runs checkpoint and resume.

``distac finetune`` and ``distac condition`` run as real processes, are killed with SIGKILL once they
have written a resume state, and are run again: the rerun continues from the state and ends with
the same weights as a straight run, and the killed run left no output directory behind. An
in-process fine-tuning run interrupted by an exception resumes to the same weights too.

Every run uses one thread (CLI processes ``OMP_NUM_THREADS=1``, the straight reference run in this
process ``torch.set_num_threads(1)``): the same kernels, hence the same arithmetic, in every run
(and a loaded machine runs a tiny model many times faster on one thread than on two).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distac.data import load_task
from distac.errors import CheckpointError
from distac.models import ModelSpec, build_model, save_model
from distac.training import finetune as finetune_module
from distac.training.finetune import FinetuneConfig, finetune

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 16
TIMEOUT = 180  # seconds, per CLI process
# enough steps that a run is still going well after its first checkpoint when it is killed
STEPS, CHECKPOINT_EVERY = 48, 6
FINETUNE_ARGS = [
    "--steps", str(STEPS), "--lr", "1e-3", "--batch-size", "8", "--train-examples", "120", "--seed", "0",
    "--max-length", str(MAX_LENGTH), "--set", f"checkpoint_every={CHECKPOINT_EVERY}",
]  # fmt: skip
CONDITION_ARGS = [
    "--kappa", "0.5", "--steps", str(STEPS), "--lr", "1e-3", "--batch-size", "8", "--unlabeled", "64",
    "--set", f"checkpoint_every={CHECKPOINT_EVERY}", "--set", "log_every=16", "--set", "eval_examples=32",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU"):
        env.pop(var, None)
    return env


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "distac.cli", *args], cwd=log.parent, env=_env(), stdout=out, stderr=out
        )


def _run(args: list[str], log: Path) -> None:
    _wait(_start(args, log), log)


def _wait(proc: subprocess.Popen, log: Path) -> None:
    try:
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-5000:]


def _run_and_kill(args: list[str], state_file: Path, log: Path) -> None:
    """Start the command, wait until it has written its resume state, then SIGKILL it."""
    proc = _start(args, log)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not state_file.is_file():
            assert proc.poll() is None, f"ended before its first checkpoint:\n{log.read_text()[-5000:]}"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run finished before it was killed:\n{log.read_text()[-3000:]}"


def _straight(args: list[str]) -> None:
    """The uninterrupted reference: the same command, run in this process (on one thread, like the
    CLI processes) to save a process start."""
    from distac.cli import app

    app(args, standalone_mode=False)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    assert state, f"no weights in {directory}"
    return state


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _kill_and_resume(args: list[str], root: Path, output: Path, state_name: str) -> int:
    """Kill ``args`` (writing ``output``) after a checkpoint, check what it left, rerun it to the end.
    Returns the step the killed run had saved."""
    state_file = output.with_name(output.name + ".work") / state_name
    _run_and_kill(args, state_file, root / f"{output.name}-killed.log")
    assert not output.exists(), "a killed run left an output directory"
    saved = torch.load(state_file, map_location="cpu", weights_only=True)
    step = int(saved["loop"]["step"] if "loop" in saved else saved["step"])
    _run(args, root / f"{output.name}-resumed.log")
    assert f"resuming from step {step} of {STEPS}" in (root / f"{output.name}-resumed.log").read_text()
    assert not state_file.parent.exists(), "the finished run left its (now empty) work directory behind"
    return step


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: on a loaded machine a tiny model trains many times faster than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume_after_kill")


def _finetune_args(tiny_bert_dir: Path, data_root: Path, output: Path) -> list[str]:
    return [
        "finetune", "--task", "sst2", "--data-root", str(data_root), "--backbone", str(tiny_bert_dir),
        "--device", "cpu", "--output", str(output), *FINETUNE_ARGS,
    ]  # fmt: skip


def test_killed_finetune_resumes_to_the_same_weights(
    root: Path, tiny_bert_dir: Path, data_root: Path, one_thread: None
) -> None:
    args = _finetune_args(tiny_bert_dir, data_root, root / "ft-resumed")
    step = _kill_and_resume(args, root, root / "ft-resumed", finetune_module.STATE_FILE)
    assert 0 < step < STEPS and step % CHECKPOINT_EVERY == 0
    _straight(_finetune_args(tiny_bert_dir, data_root, root / "ft-straight"))
    assert not (root / "ft-straight.work").exists()
    straight, resumed = _weights(root / "ft-straight"), _weights(root / "ft-resumed")
    diff = _max_diff(straight, resumed)
    print(f"finetune killed after step {step}, resumed: max abs diff {diff:.3g}")
    assert diff <= 1e-6
    results = [json.loads((root / n / "finetune.json").read_text())["result"] for n in ("ft-straight", "ft-resumed")]
    assert results[1]["final_loss"] == pytest.approx(results[0]["final_loss"], abs=1e-6)
    assert results[1]["losses"] == pytest.approx(results[0]["losses"], abs=1e-6)


@pytest.fixture(scope="module")
def source(root: Path, tiny_bert_dir: Path, data_root: Path) -> Path:
    """A source with a non-trivial task vector: the tiny BERT plus a fixed perturbation."""
    task = load_task("sst2", data_root)
    spec = ModelSpec(
        "hf-text", str(tiny_bert_dir), task.num_classes, task=task.name, class_names=task.class_names,
        options={"max_length": MAX_LENGTH},
    )  # fmt: skip
    model = build_model(spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return save_model(model, root / "source")


def _condition_args(source: Path, data_root: Path, output: Path) -> list[str]:
    return [
        "condition", str(source), "--task", "sst2", "--data-root", str(data_root), "--device", "cpu",
        "--output", str(output), *CONDITION_ARGS,
    ]  # fmt: skip


def test_killed_condition_resumes_to_the_same_weights(
    root: Path, source: Path, data_root: Path, one_thread: None
) -> None:
    from distac.conditioning.distac import STATE_FILE

    args = _condition_args(source, data_root, root / "cond-resumed")
    step = _kill_and_resume(args, root, root / "cond-resumed", STATE_FILE)
    assert 0 < step < STEPS and step % CHECKPOINT_EVERY == 0
    _straight(_condition_args(source, data_root, root / "cond-straight"))
    straight, resumed = _weights(root / "cond-straight"), _weights(root / "cond-resumed")
    assert _max_diff(straight, _weights(source)) > 1e-4, "conditioning did not move the weights"
    diff = _max_diff(straight, resumed)
    names = ("cond-straight", "cond-resumed")
    print(f"condition killed after step {step}, resumed: max abs diff {diff:.3g}")
    assert diff <= 1e-6
    histories = [json.loads((root / n / "condition.json").read_text())["history"] for n in names]
    assert [h["step"] for h in histories[1]] == [h["step"] for h in histories[0]] == [0, 16, 32, 48]
    assert histories[1][-1]["kl"] == pytest.approx(histories[0][-1]["kl"], rel=1e-5)


@pytest.mark.parametrize(("loss", "head"), [("ce", "train"), ("mixup", "train"), ("ce", "frozen_probe")])
def test_interrupted_finetune_resumes_to_the_same_weights(
    loss: str,
    head: str,
    tiny_bert_dir: Path,
    data_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    one_thread: None,
) -> None:
    # 40 examples in batches of 16: batches straddle epochs, so the saved order carries a remainder;
    # the tiny BERT has dropout (the torch generator state), mixup draws from its own generator
    task = load_task("sst2", data_root).limit(train=40, validation=16, test=16, seed=0)
    spec = ModelSpec(
        "hf-text", str(tiny_bert_dir), task.num_classes, task=task.name, class_names=task.class_names,
        options={"max_length": MAX_LENGTH},
    )  # fmt: skip
    config = dict(
        steps=8, lr=1e-3, batch_size=16, eval_every=4, eval_examples=16, checkpoint_every=3, loss={"kind": loss},
        device="cpu", head=head,
    )  # fmt: skip
    straight_model = build_model(spec)
    start = {k: v.clone() for k, v in straight_model.state_dict().items()}
    straight = finetune(straight_model, task, FinetuneConfig(**config), progress=False)

    class Crash(Exception):
        pass

    original = finetune_module._save_state

    def save_then_crash(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        original(*args, **kwargs)
        raise Crash

    monkeypatch.setattr(finetune_module, "_save_state", save_then_crash)
    with pytest.raises(Crash):
        finetune(build_model(spec), task, FinetuneConfig(**config), work_dir=tmp_path, progress=False)
    monkeypatch.setattr(finetune_module, "_save_state", original)
    state_file = tmp_path / finetune_module.STATE_FILE
    assert torch.load(state_file, weights_only=True)["loop"]["step"] == 3

    with pytest.raises(CheckpointError, match="lr"):  # a state saved with other options is not used
        finetune(build_model(spec), task, FinetuneConfig(**{**config, "lr": 2e-3}), work_dir=tmp_path, progress=False)
    resumed_model = build_model(spec)
    with caplog.at_level(logging.INFO, logger="distac.training"):
        resumed = finetune(resumed_model, task, FinetuneConfig(**config), work_dir=tmp_path, progress=False)
    assert "resuming from step 3 of 8" in caplog.text
    assert not state_file.exists()

    a, b = straight_model.state_dict(), resumed_model.state_dict()
    diff = _max_diff(a, b)
    print(f"finetune ({loss}, head {head}) interrupted after step 3, resumed: max abs diff {diff:.3g}")
    assert diff <= 1e-6
    assert _max_diff(a, start) > 1e-4, "the run did not move the weights"
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-7) and len(resumed.losses) == 8
    assert [e["step"] for e in resumed.evaluations] == [e["step"] for e in straight.evaluations] == [4, 8]
    assert resumed.evaluations == straight.evaluations


def test_finetune_checkpoint_every_is_validated() -> None:
    from distac.errors import ConfigError

    assert FinetuneConfig(checkpoint_every=0).checkpoint_every == 0
    assert FinetuneConfig(checkpoint_every=None).checkpoint_every is None
    with pytest.raises(ConfigError, match="finetune.checkpoint_every"):
        FinetuneConfig(checkpoint_every=-1)
    with pytest.raises(ConfigError, match="finetune.checkpoint_every"):
        FinetuneConfig(checkpoint_every=2.5)
