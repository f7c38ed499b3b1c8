"""A run dir is resumed only with the settings its cached stages were made with: checked before any
stage is made (the demo fine-tuned its sources first), and a redefined scenario counts (its conditioned
models and merges are cached under its name)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distac.cli import app
from distac.errors import ConfigError
from distac.experiments.config import load_experiment
from distac.experiments.pipeline import ExperimentRunner


def _runner(run_dir: Path, **changes: object) -> ExperimentRunner:
    return ExperimentRunner(replace(load_experiment("demo"), **changes), run_dir, echo=lambda _: None)


def test_a_redefined_scenario_is_refused_but_more_long_tasks_or_methods_are_not(tmp_path: Path) -> None:
    base = load_experiment("demo")
    _runner(tmp_path).open_run_dir()
    scenarios = json.loads(json.dumps(base.scenarios))
    scenarios["norm_mismatch"]["long_tasks"] = ["sst2", "trec"]  # another choice: its own cached stages
    scenarios["norm_mismatch"]["methods"] = ["ties"]
    _runner(tmp_path, scenarios=scenarios).check_cache_compatible()
    scenarios["norm_mismatch"]["kappa"] = "one"  # the long source would be conditioned unscaled
    with pytest.raises(ConfigError, match=r"other settings \(scenarios\.norm_mismatch;"):
        _runner(tmp_path, scenarios=scenarios).check_cache_compatible()
    added = {**json.loads(json.dumps(base.scenarios)), "low_confidence": {"recipe": "label_smoothing"}}
    _runner(tmp_path, scenarios=added).check_cache_compatible()  # a new scenario only adds stages


def test_the_demo_refuses_a_run_dir_of_other_settings_before_fine_tuning(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import distac.training.finetune as training

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("fine-tuned before checking the run dir's settings")

    monkeypatch.setattr(training, "finetune", forbidden)
    _runner(tmp_path).open_run_dir()
    result = CliRunner().invoke(app, ["demo", "--run-dir", str(tmp_path), "--set", "finetune.lr=3e-5"])
    assert isinstance(result.exception, ConfigError)
    assert "holds stages made with other settings (finetune" in str(result.exception)


def test_other_data_under_the_same_task_name_is_refused(tmp_path: Path, data_root: Path) -> None:
    """A rerun with another --data-root (or $DISTAC_DATA) whose sst2 is other data reused every cached stage."""
    runner = ExperimentRunner(load_experiment("demo"), tmp_path, data_root=data_root, echo=lambda _: None)
    runner.task_data("sst2")
    recorded = json.loads((tmp_path / "data.json").read_text())
    assert set(recorded["sst2"]) == {"train", "validation", "test"}
    again = ExperimentRunner(load_experiment("demo"), tmp_path, data_root=data_root, echo=lambda _: None)
    again.task_data("sst2")  # the same data (wherever it lies): fine
    recorded["sst2"]["train"] = "0" * 16  # as if the run dir had been made on another sst2
    (tmp_path / "data.json").write_text(json.dumps(recorded))
    other = ExperimentRunner(load_experiment("demo"), tmp_path, data_root=data_root, echo=lambda _: None)
    with pytest.raises(ConfigError, match=r"made on other sst2 data .*splits train differ"):
        other.task_data("sst2")


def test_a_cached_source_with_other_class_names_is_named_not_reused(tmp_path: Path, data_root: Path) -> None:
    """AG News's names were permuted before 2026-11-27: a source cached then has heads for other names."""
    runner = ExperimentRunner(load_experiment("demo"), tmp_path, data_root=data_root, echo=lambda _: None)
    source = runner.source_dir("base", "agnews_small")
    source.mkdir(parents=True)
    (source / "distac_model.json").write_text(json.dumps({"class_names": ["world", "sports", "business", "sci/tech"]}))
    with pytest.raises(ConfigError, match=r"cached source made with other class names for agnews_small"):
        runner.ensure_source("base", "agnews_small")
