"""Aggregating an experiment over seeds: hand-computed means, sds and per-seed effects, and the
checks that keep a different experiment (or a repeated seed) out of the spread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distac.atomic import atomic_write_json
from distac.cli import app
from distac.errors import ConfigError
from distac.experiments.seeds import aggregate, load_runs, seeds_markdown, write_seed_report


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
    assert summary["left_out_scenarios"] == {"low_confidence": [1]}  # named, not dropped unseen
    assert "Left out, missing from some runs: Low confidence (not run at seed 1)." in seeds_markdown(summary)


def test_a_cell_without_spread_is_written_as_strict_json_and_shown_without_sd(tmp_path: Path) -> None:
    summary = aggregate(
        load_runs(
            [_write(tmp_path, "s0", _results(0, (0.7, 0.5, 0.6))), _write(tmp_path, "s1", _results(1, (0.7, 0.5, 0.6)))]
        )
    )
    summary["cells"]["original"]["task_arithmetic/plain"]["sd"] = float("nan")  # as for a single value
    path = tmp_path / "seeds.json"
    atomic_write_json(path, summary)
    back = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))
    assert back["cells"]["original"]["task_arithmetic/plain"]["sd"] is None
    assert "| Task arithmetic | 70.0 | 50.0 ± 0.0 |" in seeds_markdown(back)


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


def _choices_results(seed: int, long_tasks: list[str], scores: dict[str, tuple[float, float, float]]) -> dict:
    """A norm-mismatch run over several long tasks: TA at (plain, + DisTaC, + scaling only) per choice,
    original TA merge at 0.70."""
    spec = {"recipe": "base", "long_recipe": "lr_x10", "long_tasks": long_tasks}
    choices = {
        task: {
            "plain": {"task_arithmetic": _entry(plain)},
            "distac": {"task_arithmetic": _entry(distac)},
            "scaling_alone": {"task_arithmetic": _entry(scaled)},
        }
        for task, (plain, distac, scaled) in scores.items()
    }
    average = {
        variant: {"task_arithmetic": _entry(sum(s[i] for s in scores.values()) / len(scores))}
        for i, variant in enumerate(("plain", "distac", "scaling_alone"))
    }
    return {
        "experiment": "toy",
        "config": {"seed": seed, "methods": ["task_arithmetic"], "scenarios": {"norm_mismatch": spec}},
        "scenarios": {
            "original": {"average": {"plain": {"task_arithmetic": _entry(0.70)}}},
            "norm_mismatch": {"choices": choices, "average": average},
        },
    }


def test_effects_are_also_reported_per_choice_of_the_long_source(tmp_path: Path) -> None:
    a = _write(
        tmp_path, "s0", _choices_results(0, ["sst2", "trec"], {"sst2": (0.60, 0.69, 0.68), "trec": (0.66, 0.70, 0.62)})
    )
    b = _write(
        tmp_path, "s1", _choices_results(1, ["sst2", "trec"], {"sst2": (0.50, 0.70, 0.71), "trec": (0.64, 0.69, 0.60)})
    )
    summary = aggregate(load_runs([a, b]))
    effects = {(e["choice"], e["effect"]): e for e in summary["choice_effects"]}
    assert effects[("sst2", "drop")]["values"] == pytest.approx([-10.0, -20.0])  # plain − original 70
    assert effects[("sst2", "gain (distac)")]["values"] == pytest.approx([9.0, 20.0])
    assert effects[("trec", "distac − scaling only")]["values"] == pytest.approx([8.0, 9.0])
    assert effects[("trec", "distac − scaling only")]["mean"] == pytest.approx(8.5)
    assert effects[("sst2", "distac − scaling only")]["values"] == pytest.approx([1.0, -1.0])
    text = write_seed_report([a, b], tmp_path / "out").read_text()
    assert (
        "| Norm mismatch | trec | Task arithmetic | -4.0 / -6.0 (-5.0) | +4.0 / +5.0 (+4.5) | +8.0 / +9.0 (+8.5) |"
        in text
    )


def test_a_scenario_averaged_over_different_long_tasks_is_refused(tmp_path: Path) -> None:
    """Seed 0 over eight choices and seed 1 over three would put unlike averages into one spread."""
    a = _write(
        tmp_path, "s0", _choices_results(0, ["sst2", "trec"], {"sst2": (0.6, 0.7, 0.7), "trec": (0.6, 0.7, 0.6)})
    )
    b = _write(tmp_path, "s1", _choices_results(1, ["trec"], {"trec": (0.6, 0.7, 0.6)}))
    with pytest.raises(ConfigError, match="'norm_mismatch' is defined differently"):
        aggregate(load_runs([a, b]))
