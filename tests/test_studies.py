"""The paper's side studies in the pipeline (toy scale, tiny random BERT on real text subsets):
further low-confidence causes as scenarios (Table 2), the label-smoothing sweep (Figure 4), and
conditioning on less or corrupted unlabeled data (Tables 3-4); plus the corruptions themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distac.data.corruption import blur_images, corrupt_unlabeled, drop_words
from distac.errors import ConfigError
from distac.experiments.config import ExperimentConfig
from distac.experiments.pipeline import ExperimentRunner
from distac.experiments.report import write_report

# ------------------------------------------------------------------------------------ corruptions


def test_blur_smooths_edges_and_keeps_flat_images() -> None:
    checker = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    rgb = np.repeat(checker[None, :, :, None], 3, axis=3)  # (1, 16, 16, 3)
    blurred = blur_images(rgb, sigma=1.5)
    assert blurred.shape == rgb.shape and blurred.dtype == np.uint8
    assert blurred.std() < 0.2 * rgb.std()  # a 1-pixel checkerboard is mostly averaged away
    assert abs(float(blurred.mean()) - float(rgb.mean())) < 8  # brightness is kept
    flat = np.full((2, 9, 9), 77, dtype=np.uint8)  # grayscale (N, H, W), kernel larger than the image
    assert np.array_equal(blur_images(flat, sigma=5.0), flat)
    assert np.array_equal(blur_images(rgb, sigma=0.0), rgb)


def test_word_dropout_is_seeded_and_keeps_a_word() -> None:
    pairs = [("the movie was good fun", "a second sentence here"), ("single", None)]
    dropped = drop_words(pairs, 0.5, seed=3)
    assert dropped == drop_words(pairs, 0.5, seed=3)
    assert dropped[1] == ("single", None)  # the last word always survives; None stays None
    for (a, _), (a2, _) in zip(pairs, dropped, strict=True):
        assert set(a2.split()) <= set(a.split()) and len(a2.split()) >= 1
    assert drop_words(pairs, 0.0) == pairs
    almost_all = drop_words([("one two three four five six seven eight", None)] * 50, 0.9, seed=0)
    assert np.mean([len(a.split()) for a, _ in almost_all]) < 3


def test_corruption_refuses_the_wrong_modality() -> None:
    with pytest.raises(ConfigError, match="needs image inputs"):
        corrupt_unlabeled([("text", None)], "blur", 1.0)
    with pytest.raises(ConfigError, match="needs text inputs"):
        corrupt_unlabeled(np.zeros((1, 4, 4, 3), np.uint8), "word_dropout", 0.1)
    with pytest.raises(ConfigError, match="unknown unlabeled-data corruption"):
        corrupt_unlabeled([("text", None)], "jpeg", 1.0)


# ------------------------------------------------------------------------------------ config


def _config(backbone: str, **changes: object) -> ExperimentConfig:
    values: dict = {
        "name": "toy-studies",
        "family": "hf-text",
        "backbone": backbone,
        "tasks": ["sst2", "trec"],
        "model_options": {"max_length": 24},
        "limits": {"train": 48, "validation": 16, "test": 24},
        "device": "cpu",
        "finetune": {"steps": 3, "lr": 1e-3, "batch_size": 16},
        "scenarios": {
            "norm_mismatch": {"recipe": "base", "long_recipe": "lr_x10", "long_tasks": ["sst2"]},
            "low_confidence": {"recipe": "label_smoothing"},
            "mixup": {"recipe": "mixup", "kind": "low_confidence", "methods": ["task_arithmetic"]},
        },
        "methods": ["task_arithmetic", "ties"],
        "grid": [0.0, 1.0],
        "condition": {"steps": 2, "batch_size": 16, "num_unlabeled": 32, "log_every": 1, "eval_examples": 16},
        "studies": {
            "label_smoothing_sweep": {
                "alphas": [0.0, 0.1, 0.3, 0.2],
                "methods": ["task_arithmetic"],
                "distac_alphas": [0.1, 0.3],
            },
            "unlabeled_data": {
                "amounts": [8],
                "corruptions": [{"kind": "word_dropout", "strength": 0.5}],
                "methods": ["task_arithmetic"],
            },
            "unlabeled_data@low_confidence": {"scenario": "low_confidence", "amounts": [8]},
        },
    }
    values.update(changes)
    return ExperimentConfig(**values)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"studies": {"figure9": {}}}, "unknown study 'figure9'"),
        ({"studies": {"label_smoothing_sweep": {"alphas": [1.5]}}}, "alphas"),
        ({"studies": {"label_smoothing_sweep": {"distac_alphas": [-0.1]}}}, "distac_alphas"),
        ({"studies": {"label_smoothing_sweep": {"methods": ["wudi"]}}}, "not in methods"),
        ({"studies": {"unlabeled_data": {"long_task": "cola"}}}, "not one of the tasks"),
        ({"studies": {"unlabeled_data": {"corruptions": [{"kind": "jpeg"}]}}}, "corruptions\\[0\\]"),
        ({"studies": {"unlabeled_data": {"amounts": [0]}}}, "amounts"),
        ({"studies": {"scale_curve": {"scale": [1]}}}, "unknown key"),
        ({"studies": {"figure9@x": {}}}, "unknown study 'figure9@x'"),
        ({"studies": {"unlabeled_data@x": {"scenario": "original"}}}, "not a norm_mismatch or low_confidence"),
        ({"scenarios": {"mixup": {"recipe": "mixup", "kind": "cheap"}}}, "kind must be one of"),
        ({"scenarios": {"mixup": {"recipe": "mixup", "methods": ["wudi"]}}}, "not in methods"),
        ({"condition": {"unlabeled_corruption": "jpeg"}}, "unlabeled_corruption"),
    ],
)
def test_study_config_errors_are_clear(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config("all-MiniLM-L6-v2", **changes)


def test_a_scenario_takes_its_conditioning_settings_from_its_kind() -> None:
    config = _config("all-MiniLM-L6-v2")
    mixup = config.condition_settings("mixup")
    assert (mixup["teacher_temperature"], mixup["student_temperature"]) == (1.0, 4.0)  # low-confidence pair
    assert config.condition_settings("norm_mismatch")["student_temperature"] == 1.0
    assert mixup["num_unlabeled"] == 32  # the shared settings stay


def test_a_low_confidence_scenario_on_normal_sources_conditions_every_task_at_kappa_one(tmp_path: Path) -> None:
    """DisTaC on healthy cross-entropy sources ("sharpening", results/text-zeroshot): a scenario of kind
    low_confidence on the base recipe; an `original` scenario on the same recipe conditions nothing."""
    scenarios = {"original": {"recipe": "base"}, "sharpened": {"recipe": "base", "kind": "low_confidence"}}
    config = _config("all-MiniLM-L6-v2", scenarios=scenarios, studies={})
    runner = ExperimentRunner(config, tmp_path, echo=lambda _: None)
    key, recipes, condition_tasks, kappa_rule = runner.scenario_plan("sharpened", scenarios["sharpened"])
    assert (key, recipes, condition_tasks, kappa_rule) == (
        "sharpened",
        {"sst2": "base", "trec": "base"},
        ["sst2", "trec"],
        "one",
    )
    assert runner.config.condition_settings("sharpened")["student_temperature"] == 4.0
    assert runner.scenario_plan("original", scenarios["original"])[2] == []


# ------------------------------------------------------------------------------------ pipeline


def test_studies_run_reuse_cached_stages_and_report(tmp_path: Path, tiny_bert_dir: Path, data_root: Path) -> None:
    config = _config(str(tiny_bert_dir))
    results = ExperimentRunner(config, tmp_path, data_root=data_root, echo=lambda _: None).run()

    # Table 2: mixup is a low-confidence scenario, conditioned with the low-confidence temperatures
    mixup = results["scenarios"]["mixup"]["average"]
    assert {"plain", "distac"} <= set(mixup) and mixup["kappas"] == {"sst2": 1.0, "trec": 1.0}
    assert "task_arithmetic" in mixup["distac"] and "ties" not in mixup["distac"]  # the scenario's own methods
    record = json.loads((tmp_path / "conditioned/mixup/mixup-trec/condition.json").read_text())
    assert record["config"]["student_temperature"] == 4.0
    finetune = json.loads((tmp_path / "sources/mixup/trec/finetune.json").read_text())
    assert finetune["config"]["loss"]["kind"] == "mixup"

    # Figure 4: alpha 0.1 is the low-confidence recipe: its sources and merges are shared, not redone
    sweep = results["studies"]["label_smoothing_sweep"]
    recipes = ["base", "label_smoothing", "label_smoothing_0.3", "label_smoothing_0.2"]
    assert [p["recipe"] for p in sweep["points"]] == recipes
    low = results["scenarios"]["low_confidence"]["average"]
    shared = sweep["points"][1]
    assert shared["plain"]["task_arithmetic"]["absolute"] == low["plain"]["task_arithmetic"]["absolute"]
    assert shared["distac"]["task_arithmetic"]["absolute"] == low["distac"]["task_arithmetic"]["absolute"]
    finetune = json.loads((tmp_path / "sources/label_smoothing_0.3/sst2/finetune.json").read_text())
    assert finetune["config"]["loss"] == {"kind": "label_smoothing", "alpha": 0.3, "gamma": 2.0}
    assert ["distac" in p for p in sweep["points"]] == [False, True, True, False]  # only distac_alphas
    for point in sweep["points"]:
        assert set(point["plain"]) == {"task_arithmetic"} and 0.0 <= point["source_entropy"] <= np.log(6)

    # Tables 3-4: the default variant is the scenario's own conditioned model; others are distinct runs
    study = results["studies"]["unlabeled_data"]
    assert [r["variant"] for r in study["rows"]] == ["no conditioning", "default", "n8", "word_dropout0.5"]
    nm = results["scenarios"]["norm_mismatch"]["choices"]["sst2"]
    assert study["rows"][0]["merges"]["task_arithmetic"]["absolute"] == nm["plain"]["task_arithmetic"]["absolute"]
    assert study["rows"][1]["merges"]["task_arithmetic"]["absolute"] == nm["distac"]["task_arithmetic"]["absolute"]
    assert study["kappa"] == pytest.approx(nm["kappas"]["sst2"])
    small = json.loads((tmp_path / "conditioned/norm_mismatch/lr_x10-sst2-n8/condition.json").read_text())
    assert small["config"]["num_unlabeled"] == 8 and small["kappa"] == pytest.approx(study["kappa"])
    dropped_dir = tmp_path / "conditioned/norm_mismatch/lr_x10-sst2-word_dropout0.5"
    dropped = json.loads((dropped_dir / "condition.json").read_text())
    assert dropped["config"]["unlabeled_corruption"] == "word_dropout"
    assert dropped["config"]["corruption_strength"] == 0.5

    # ... and in the low-confidence setting every source is conditioned again, at kappa 1
    low_study = results["studies"]["unlabeled_data@low_confidence"]
    assert low_study["long_task"] is None and low_study["kappas"] == {"sst2": 1.0, "trec": 1.0}
    assert [r["variant"] for r in low_study["rows"]] == ["no conditioning", "default", "n8"]
    for row, variant in zip(low_study["rows"], ("plain", "distac"), strict=False):
        assert row["merges"]["task_arithmetic"]["absolute"] == low[variant]["task_arithmetic"]["absolute"]
    for task in ("sst2", "trec"):
        record = json.loads(
            (tmp_path / f"conditioned/low_confidence/label_smoothing-{task}-n8/condition.json").read_text()
        )
        assert record["config"]["num_unlabeled"] == 8 and record["config"]["student_temperature"] == 4.0
        assert record["kappa"] == 1.0

    report = write_report(tmp_path).read_text()
    assert "Figure 4 analog" in report and "Tables 3-4 analog" in report and "word_dropout 0.5" in report
    assert "every `low_confidence` source (2, κ = 1)" in report
    assert (tmp_path / "label_smoothing_sweep.png").stat().st_size > 1000


def test_unknown_scenario_or_study_selection_fails_before_any_work(tmp_path: Path) -> None:
    runner = ExperimentRunner(_config("all-MiniLM-L6-v2"), tmp_path / "run", echo=lambda _: None)
    with pytest.raises(ConfigError, match="--scenario \\['orignal'\\]"):
        runner.run(scenarios=["orignal"])
    with pytest.raises(ConfigError, match="--study \\['scale_curve'\\]"):
        runner.run(studies=["scale_curve"])
    assert not (tmp_path / "run").exists()


def test_a_run_dir_made_with_other_settings_is_refused(tmp_path: Path) -> None:
    from distac.atomic import atomic_write_json

    made = _config("all-MiniLM-L6-v2")
    atomic_write_json(tmp_path / "config.json", made.to_json())
    # more scenarios, studies or methods only add stages: accepted
    grown = _config("all-MiniLM-L6-v2", methods=["task_arithmetic", "ties", "tsvm"], studies={})
    ExperimentRunner(grown, tmp_path, echo=lambda _: None).check_cache_compatible()
    # a changed learning rate, data limit or recipe would reuse stale cached models: refused
    for changes, named in (
        ({"finetune": {"steps": 3, "lr": 3e-3, "batch_size": 16}}, "finetune"),
        ({"limits": {"train": 64, "validation": 16, "test": 24}}, "limits"),
        ({"recipes": {**made.recipes, "mixup": {"loss": {"kind": "focal"}}}}, "recipes.mixup"),
    ):
        runner = ExperimentRunner(_config("all-MiniLM-L6-v2", **changes), tmp_path, echo=lambda _: None)
        with pytest.raises(ConfigError, match=f"other settings \\({named}; see .*config.json"):
            runner.run()
