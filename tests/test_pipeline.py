"""The experiment pipeline end to end at toy scale (tiny random BERT on real text subsets):
every scenario of Table 1, DisTaC and scaling-alone variants, the scale-curve study, the report,
and resume without recomputation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from distac.experiments.config import ExperimentConfig
from distac.experiments.pipeline import ExperimentRunner
from distac.experiments.report import write_report


def _config(backbone: Path) -> ExperimentConfig:
    return ExperimentConfig(
        name="toy",
        family="hf-text",
        backbone=str(backbone),
        tasks=["sst2", "trec"],
        model_options={"max_length": 24},
        limits={"train": 64, "validation": 24, "test": 32},
        device="cpu",
        finetune={"steps": 4, "lr": 1e-3, "batch_size": 16},
        scenarios={
            "original": {"recipe": "base"},
            "norm_mismatch": {"recipe": "base", "long_recipe": "lr_x10", "long_tasks": ["sst2"]},
            "low_confidence": {"recipe": "label_smoothing"},
        },
        methods=["task_arithmetic", "ties", "emr"],
        grid=[0.0, 0.5, 1.0],
        condition={"steps": 3, "batch_size": 16, "num_unlabeled": 32, "log_every": 1, "eval_examples": 24},
        studies={"scaling_alone": {}, "scale_curve": {"scales": [0.0, 1.0, 2.0]}},
    )


def test_pipeline_runs_every_scenario_and_resumes(
    tmp_path: Path, tiny_bert_dir: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tiny_bert_dir)
    runner = ExperimentRunner(config, tmp_path, data_root=data_root, echo=lambda _: None)
    results = runner.run()

    scenarios = results["scenarios"]
    assert set(scenarios) == {"original", "norm_mismatch", "low_confidence"}
    nm = scenarios["norm_mismatch"]["choices"]["sst2"]
    assert set(nm) >= {"plain", "distac", "scaling_alone", "kappas"}
    assert 0 < nm["kappas"]["sst2"] < 1  # the 10x-lr source is the longest and is shrunk
    # the long source really is long, and conditioning shrinks it to about kappa * ||tau||
    norms_plain, norms_distac = nm["plain"]["norms"], nm["distac"]["norms"]
    assert norms_plain["sst2"] > norms_plain["trec"]
    assert norms_distac["sst2"] == pytest.approx(nm["kappas"]["sst2"] * norms_plain["sst2"], rel=0.25)
    # every variant is normalized by the same individual (original fine-tuned) models: scoring merges
    # must not leave merged weights in the shared source models
    assert nm["distac"]["individual"]["test"] == nm["plain"]["individual"]["test"]
    assert nm["scaling_alone"]["individual"]["test"] == nm["plain"]["individual"]["test"]
    for variant in ("plain", "distac"):
        for method in config.methods:
            entry = nm[variant][method]
            assert entry["coefficient"] in config.grid or method == "emr"
            assert 0.0 <= entry["absolute"] <= 1.0
            assert set(entry["test"]) == {"sst2", "trec"}
        # EMR is tuning-free (METHODS-SPEC 4.10): merged at 1.0, no validation search; TIES searches
        assert nm[variant]["emr"]["search"] is None and nm[variant]["emr"]["coefficient"] == 1.0
        assert nm[variant]["ties"]["search"] is not None
    low = scenarios["low_confidence"]["average"]
    assert {"plain", "distac"} <= set(low)
    assert low["kappas"] == {"sst2": 1.0, "trec": 1.0}  # every label-smoothed source conditioned, unscaled
    assert set(scenarios["original"]["average"]) == {"plain"}

    curve = results["studies"]["scale_curve"]["curves"]
    assert [p["scale"] for p in curve["sst2"]] == [0.0, 1.0, 2.0]
    individual = scenarios["original"]["average"]["plain"]["individual"]["test"]
    # scale 1 is the fine-tuned source itself: the same score as the individual model
    assert curve["trec"][1]["score"] == pytest.approx(individual["trec"]["score"])

    assert not (tmp_path / "work").exists()  # finished stages leave no empty resume folders behind

    stages = results["stage_seconds"]
    assert stages["finetune"] > 0 and stages["condition"] > 0 and stages["merge_and_evaluate"] > 0
    assert stages["finetune"] == pytest.approx(
        sum(json.loads(f.read_text())["seconds"] for f in tmp_path.glob("sources/*/*/finetune.json"))
    )
    report = write_report(tmp_path).read_text()
    assert "Task arithmetic + DisTaC" in report and "Norm mismatch" in report
    for plot in ("table1.png", "conditioning_history.png", "scale_curve.png"):
        assert (tmp_path / plot).stat().st_size > 1000, plot

    # Resume: a second run reuses every cached stage (no training, no conditioning) and agrees.
    import distac.conditioning.distac as conditioning
    import distac.training.finetune as training

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(training, "finetune", forbidden)
    monkeypatch.setattr(conditioning, "condition", forbidden)
    again = ExperimentRunner(config, tmp_path, data_root=data_root, echo=lambda _: None).run()
    assert _without_timings(again["scenarios"]) == _without_timings(results["scenarios"])

    # Rerunning one scenario updates it in the report and keeps the others (they used to vanish).
    partial = ExperimentRunner(config, tmp_path, data_root=data_root, echo=lambda _: None).run(["original"], [])
    assert list(partial["scenarios"]) == ["original", "norm_mismatch", "low_confidence"]
    assert partial["carried_over"] == ["scenario norm_mismatch", "scenario low_confidence", "study scale_curve"]
    assert _without_timings(partial["scenarios"]) == _without_timings(results["scenarios"])
    assert "Norm mismatch" in write_report(tmp_path).read_text()

    # Changing one method's options redoes that method's merges only (sources stay cached).
    messages: list[str] = []
    changed = replace(config, method_options={"ties": {"density": 0.5}})
    rerun = ExperimentRunner(changed, tmp_path, data_root=data_root, echo=messages.append).run(["original"], [])
    assert any("original" in m and "ties options changed" in m for m in messages), messages
    assert not any("task_arithmetic options changed" in m for m in messages)
    assert list(rerun["scenarios"]) == ["original"]  # other settings: nothing carried over

    # Asking for the search on tuning-free methods redoes their merges only (the run dir stays usable).
    messages.clear()
    searched = replace(changed, evaluation={"search_tuning_free": True})
    again = ExperimentRunner(searched, tmp_path, data_root=data_root, echo=messages.append).run(["original"], [])
    assert any("emr options changed" in m for m in messages) and not any("ties options" in m for m in messages)
    assert again["scenarios"]["original"]["average"]["plain"]["emr"]["search"] is not None
    ties = rerun["scenarios"]["original"]["average"]["plain"]["ties"]
    assert ties["info"]["hyperparameters"]["density"] == 0.5
    cached = json.loads(next(tmp_path.glob("merges/original/*/ties.json")).read_text())
    assert cached["info"]["hyperparameters"]["density"] == 0.5

    # The scale curve is cached with its scales: other scales are computed, not the cached curve returned.
    curve_runner = ExperimentRunner(config, tmp_path, data_root=data_root, echo=lambda _: None)
    assert [p["scale"] for p in curve_runner.scale_curve([0.0, 1.0])["curves"]["trec"]] == [0.0, 1.0]


def _without_timings(value: object) -> object:
    """Results minus wall-clock fields, which legitimately differ between runs."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value
