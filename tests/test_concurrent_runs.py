"""Two runs on one run directory (``--scenario mixup`` and ``--scenario focal`` side by side) share its
stages and its report: a stage one of them is making is waited for and reused, not made twice, and
neither drops the other's column from results.json."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from distac.atomic import exclusive
from distac.experiments.config import load_experiment
from distac.experiments.pipeline import ExperimentRunner


def test_exclusive_waits_for_the_holder_and_says_so(tmp_path: Path) -> None:
    target = tmp_path / "sources" / "base" / "sst2"
    held, events, told = threading.Event(), [], []

    def holder() -> None:
        with exclusive(target):
            held.set()
            time.sleep(0.3)
            events.append("holder done")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    with exclusive(target, told.append):
        events.append("second in")
    thread.join()
    assert events == ["holder done", "second in"]
    assert told == [f"waiting for another run that is making {target}"]
    assert not any(p.name == "sst2" for p in target.parent.iterdir())  # the lock is hidden, never the stage


def test_a_killed_holder_leaves_no_held_lock(tmp_path: Path) -> None:
    target = tmp_path / "merges" / "original" / "ties.json"
    code = (
        "import sys, time\nfrom distac.atomic import exclusive\n"
        f"with exclusive({str(target)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        told: list[str] = []
        waiter = threading.Thread(target=lambda: exclusive(target, told.append).__enter__())
        waiter.daemon = True
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and told  # really held by the other process
        process.kill()
        process.wait(10)
        waiter.join(10)
        assert not waiter.is_alive()  # SIGKILL released it
    finally:
        process.kill()


def _runner(run_dir: Path, data_root: Path) -> ExperimentRunner:
    return ExperimentRunner(load_experiment("demo"), run_dir, data_root=data_root, echo=lambda _: None)


def test_two_runs_make_a_shared_source_once(tmp_path: Path, data_root: Path, monkeypatch) -> None:  # noqa: ANN001
    made: list[str] = []

    def fake_finetune(self: ExperimentRunner, recipe: str, task: str, out: Path) -> None:
        made.append(f"{recipe}/{task}")
        time.sleep(0.3)  # long enough for the other run to find no source yet
        out.mkdir(parents=True)
        (out / "distac_model.json").write_text(json.dumps({"class_names": self.task_data(task).class_names}))

    monkeypatch.setattr(ExperimentRunner, "_finetune_source", fake_finetune)
    runs = [_runner(tmp_path, data_root) for _ in range(2)]
    for run in runs:
        run.task_data("sst2")  # loaded up front, so both threads reach the stage together
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda r=run: paths.append(r.ensure_source("base", "sst2"))) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert made == ["base/sst2"]
    assert paths == [tmp_path / "sources" / "base" / "sst2"] * 2


def test_runs_side_by_side_keep_each_others_scenarios(tmp_path: Path, data_root: Path, monkeypatch) -> None:  # noqa: ANN001
    """The second run read results.json before the first wrote its scenario; it used to overwrite it."""
    first, second = _runner(tmp_path, data_root), _runner(tmp_path, data_root)
    monkeypatch.setattr(ExperimentRunner, "stage_seconds", lambda self: {})

    def original(self: ExperimentRunner, scenario: str) -> dict[str, str]:
        if scenario == "original":  # while this run is busy, the other one finishes its scenario
            second.run(scenarios=["norm_mismatch"], studies=[])
        return {"made": scenario}

    monkeypatch.setattr(ExperimentRunner, "run_scenario", original)
    returned = first.run(scenarios=["original"], studies=[])
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["scenarios"] == {"original": {"made": "original"}, "norm_mismatch": {"made": "norm_mismatch"}}
    assert returned["scenarios"] == report["scenarios"]
    # a report of other settings is not merged in: its numbers are not comparable
    changed = json.loads((tmp_path / "results.json").read_text())
    changed["config"]["seed"] = 99
    (tmp_path / "results.json").write_text(json.dumps(changed))
    monkeypatch.setattr(ExperimentRunner, "run_scenario", lambda self, scenario: {"made": scenario})
    _runner(tmp_path, data_root).run(scenarios=["original"], studies=[])
    assert json.loads((tmp_path / "results.json").read_text())["scenarios"] == {"original": {"made": "original"}}
