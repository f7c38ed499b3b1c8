"""Aggregating an experiment over seeds: hand-computed means, sds and per-seed effects, and the
checks that keep a different experiment (or a repeated seed) out of the spread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distac.cli import app
from distac.errors import ConfigError
from distac.experiments.seeds import aggregate, load_runs, write_seed_report


def _entry(absolute: float) -> dict[str, float]:
    return {"absolute": absolute, "normalized": absolute / 0.8}


def _results(seed: int, ta: tuple[float, float, float], lr: float = 1e-4) -> dict:
    """A results.json with TA at (original, low confidence, low confidence + DisTaC) accuracies."""
    original, low, low_distac = ta
    return {
        "experiment": "toy",
        "config": {"seed": seed, "methods": ["task_arithmetic"], "finetune": {"lr": lr}, "scenarios": {}},
        "scenarios": {
            "original": {"average": {"plain": {"individual": _entry(0.8), "task_arithmetic": _entry(original)}}},
            "low_confidence": {
                "average": {
                    "plain": {"individual": _entry(0.78), "task_arithmetic": _entry(low)},
                    "distac": {"task_arithmetic": _entry(low_distac)},
                }
            },
        },
    }


def _write(tmp_path: Path, name: str, results: dict) -> Path:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def test_means_sds_and_effects_are_computed_per_seed(tmp_path: Path) -> None:
    a = _write(tmp_path, "s0", _results(0, (0.70, 0.50, 0.66)))
    b = _write(tmp_path, "s1", _results(1, (0.74, 0.60, 0.68)))
    summary = aggregate(load_runs([a, b]))
    assert summary["seeds"] == [0, 1]
    cell = summary["cells"]["original"]["task_arithmetic/plain"]
    assert cell["mean"] == pytest.approx(72.0)
    assert cell["sd"] == pytest.approx(math.sqrt(8.0))  # values 70, 74: sample sd = sqrt(2 * 2^2 / 1)
    effects = {(e["scenario"], e["effect"]): e for e in summary["effects"]}
    drop = effects[("low_confidence", "drop")]
    assert drop["values"] == pytest.approx([-20.0, -14.0]) and drop["mean"] == pytest.approx(-17.0)
    gain = effects[("low_confidence", "gain (distac)")]
    assert gain["values"] == pytest.approx([16.0, 8.0]) and gain["sd"] == pytest.approx(math.sqrt(32.0))
    assert ("original", "drop") not in effects  # the reference does not drop from itself

    path = write_seed_report([a, b], tmp_path / "out")
    text = path.read_text()
    assert "| Task arithmetic | 72.0 ± 2.8 | 55.0 ± 7.1 |" in text
    assert "| Low confidence | Task arithmetic | drop | -20.0 / -14.0 | -17.0 ± 4.2 |" in text
    assert json.loads((tmp_path / "out" / "seeds.json").read_text())["run_dirs"] == [str(a), str(b)]


def test_only_scenarios_every_run_has_are_aggregated(tmp_path: Path) -> None:
    partial = _results(1, (0.74, 0.60, 0.68))
    del partial["scenarios"]["low_confidence"]
    summary = aggregate(
        load_runs([_write(tmp_path, "s0", _results(0, (0.7, 0.5, 0.6))), _write(tmp_path, "s1", partial)])
    )
    assert summary["scenarios"] == ["original"] and summary["effects"] == []


def test_runs_of_different_experiments_or_the_same_seed_are_refused(tmp_path: Path) -> None:
    a = _write(tmp_path, "s0", _results(0, (0.7, 0.5, 0.6)))
    other_lr = _write(tmp_path, "lr", _results(1, (0.7, 0.5, 0.6), lr=1e-3))
    same_seed = _write(tmp_path, "again", _results(0, (0.7, 0.5, 0.6)))
    with pytest.raises(ConfigError, match=r"lr: not the same experiment .*\['finetune'\]"):
        load_runs([a, other_lr])
    with pytest.raises(ConfigError, match="share a seed"):
        load_runs([a, same_seed])
    with pytest.raises(ConfigError, match="at least two"):
        load_runs([a])
    with pytest.raises(ConfigError, match="missing/results.json: not found"):
        load_runs([a, tmp_path / "missing"])


def test_seeds_command_writes_the_report(tmp_path: Path) -> None:
    a = _write(tmp_path, "s0", _results(0, (0.70, 0.50, 0.66)))
    b = _write(tmp_path, "s1", _results(1, (0.74, 0.60, 0.68)))
    result = CliRunner().invoke(app, ["seeds", str(a), str(b), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "gain (distac)" in result.output and (tmp_path / "out" / "seeds.md").is_file()
