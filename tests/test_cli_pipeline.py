"""The user's workflow through the CLI, end to end on real data with a tiny random BERT backbone:
finetune (one source with a 10x learning rate) -> diagnose -> condition (kappa auto) -> merge
(coefficient search) -> evaluate (normalized accuracy) -> calibrate.

The tiny backbone keeps this a fast plumbing test; the method's effects are measured on the real
MiniLM in test_distac_method.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distac.cli import app

runner = CliRunner()


def _run(args: list[str]) -> str:
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, data_root: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("cli_sources")
    common = [
        "--backbone",
        str(tiny_bert_dir),
        "--steps",
        "12",
        "--batch-size",
        "16",
        "--train-examples",
        "96",
        "--max-length",
        "32",
        "--device",
        "cpu",
        "--data-root",
        str(data_root),
    ]
    paths = {
        "sst2": out / "sst2",
        "trec": out / "trec",
        "agnews_small": out / "agnews_small",
    }
    _run(["finetune", "--task", "sst2", "--output", str(paths["sst2"]), "--lr", "1e-3", *common])
    _run(["finetune", "--task", "trec", "--output", str(paths["trec"]), "--lr", "1e-4", *common])
    _run(
        [
            "finetune",
            "--task",
            "agnews_small",
            "--output",
            str(paths["agnews_small"]),
            "--lr",
            "1e-4",
            "--loss",
            "label_smoothing",
            "--alpha",
            "0.1",
            *common,
        ]
    )
    return paths


def test_finetune_writes_a_loadable_model_with_its_record(sources: dict[str, Path]) -> None:
    from distac.models import load_model

    record = json.loads((sources["agnews_small"] / "finetune.json").read_text())
    assert record["config"]["loss"]["kind"] == "label_smoothing"
    assert record["config"]["lr"] == pytest.approx(1e-4)
    model = load_model(sources["trec"])
    assert model.spec.task == "trec" and model.spec.num_labels == 6


def test_diagnose_flags_the_long_source(sources: dict[str, Path], tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "diag"
    text = _run(
        [
            "diagnose",
            *map(str, sources.values()),
            "--output",
            str(out),
            "--examples",
            "64",
            "--device",
            "cpu",
            "--data-root",
            str(data_root),
        ]
    )
    assert "long" in text
    report = json.loads((out / "diagnosis.json").read_text())
    flags = {s["name"]: s["flags"] for s in report["sources"]}
    assert "long" in flags["sst2"], flags  # tuned with a 10x learning rate
    assert "long" not in flags["trec"]
    assert (out / "diagnosis.png").stat().st_size > 1000


def test_condition_merge_evaluate_calibrate(sources: dict[str, Path], tmp_path: Path, data_root: Path) -> None:
    conditioned = tmp_path / "sst2-distac"
    others = [a for t in ("trec", "agnews_small") for a in ("--others", str(sources[t]))]
    _run(
        [
            "condition",
            str(sources["sst2"]),
            "--output",
            str(conditioned),
            "--kappa",
            "auto",
            *others,
            "--steps",
            "6",
            "--batch-size",
            "16",
            "--unlabeled",
            "64",
            "--device",
            "cpu",
            "--data-root",
            str(data_root),
        ]
    )
    record = json.loads((conditioned / "condition.json").read_text())
    kappa = record["config"]["kappa"]
    assert 0 < kappa < 1, kappa  # the long source is shrunk, never stretched
    assert record["history"][-1]["norm_ratio_to_original"] == pytest.approx(kappa, rel=0.2)

    merged = tmp_path / "merged"
    members = [str(conditioned), str(sources["trec"]), str(sources["agnews_small"])]
    _run(
        [
            "merge",
            *members,
            "--method",
            "ties",
            "--output",
            str(merged),
            "--search",
            "--grid",
            "0:1:0.5",
            "--name",
            "sst2",
            "--name",
            "trec",
            "--name",
            "agnews_small",
            "--validation-examples",
            "32",
            "--device",
            "cpu",
            "--data-root",
            str(data_root),
        ]
    )
    merge_record = json.loads((merged / "merge.json").read_text())
    assert merge_record["coefficient"] in (0.0, 0.5, 1.0)
    task_dirs = sorted(p for p in merged.iterdir() if p.is_dir())
    assert [p.name for p in task_dirs] == ["agnews_small", "sst2", "trec"]

    evaluation = tmp_path / "eval"
    individual = [str(sources["agnews_small"]), str(sources["sst2"]), str(sources["trec"])]
    _run(
        [
            "evaluate",
            *map(str, task_dirs),
            *[a for i in individual for a in ("--individual", i)],
            "--examples",
            "64",
            "--output",
            str(evaluation),
            "--device",
            "cpu",
            "--data-root",
            str(data_root),
        ]
    )
    table = json.loads((evaluation / "evaluation.json").read_text())
    assert {r["task"] for r in table["rows"]} == {"sst2", "trec", "agnews_small"}
    assert all("normalized" in r and "ece" in r for r in table["rows"])
    assert len(list(evaluation.glob("reliability_*.png"))) == 3

    text = _run(["calibrate", str(task_dirs[2]), "--examples", "64", "--device", "cpu", "--data-root", str(data_root)])
    assert "temperature scaling" in text
    report = json.loads((task_dirs[2] / "calibration.json").read_text())
    assert report["after"]["accuracy"] == report["before"]["accuracy"]  # T > 0 never changes the argmax
    assert report["after"]["nll"] <= report["before"]["nll"] + 1e-6
    # evaluate now applies the stored temperature (it used to be written and never read)
    common = ["--examples", "64", "--device", "cpu", "--data-root", str(data_root)]
    scaled, raw = tmp_path / "eval_scaled", tmp_path / "eval_raw"
    _run(["evaluate", str(task_dirs[2]), "-o", str(scaled), *common])
    _run(["evaluate", str(task_dirs[2]), "-o", str(raw), "--uncalibrated", *common])
    scaled_row = json.loads((scaled / "evaluation.json").read_text())["rows"][0]
    raw_row = json.loads((raw / "evaluation.json").read_text())["rows"][0]
    assert scaled_row["temperature"] == report["temperature"] and raw_row["temperature"] == 1.0
    assert scaled_row["accuracy"] == raw_row["accuracy"]
    assert scaled_row["ece"] == pytest.approx(report["after"]["ece"], abs=1e-6)  # the same test examples
    assert raw_row["ece"] == pytest.approx(report["before"]["ece"], abs=1e-6)


def test_merge_search_chooses_consensus_lambda_t_per_task_unless_given(
    sources: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    """METHODS-SPEC 4.4: Consensus TA uses TALL masks whose lambda_t each task picks on its validation
    split; the merge record says what was chosen and the written model is merged with it."""
    common = ["--method", "consensus_ta", "--search", "--grid", "0:1:0.5", "--validation-examples", "32"]
    common += ["--device", "cpu", "--data-root", str(data_root)]
    members = [str(sources["trec"]), str(sources["agnews_small"])]
    _run(["merge", *members, *common, "-o", str(tmp_path / "searched")])
    record = json.loads((tmp_path / "searched" / "merge.json").read_text())
    search = record["lambda_t_search"]
    assert set(search["best"]) == {"trec", "agnews_small"}
    for task, curve in search["scores"].items():
        assert [p["lambda"] for p in curve] == [0.2, 0.3, 0.4, 0.5, 0.6]
        best = max(curve, key=lambda p: p["score"])  # the first maximum: ties go to the smaller lambda
        assert search["best"][task] == best["lambda"] and search["best_scores"][task] == best["score"]
    assert record["info"]["lambdas"] == search["best"] == record["hyperparameters"]["lambda_t"]

    _run(["merge", *members, *common, "--set", "lambda_t=0.4", "-o", str(tmp_path / "pinned")])
    pinned = json.loads((tmp_path / "pinned" / "merge.json").read_text())
    assert pinned["lambda_t_search"] is None
    assert pinned["info"]["lambdas"] == {"trec": 0.4, "agnews_small": 0.4}


def test_demo_command_runs_every_stage_and_prints_the_table(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """The README's first command, wired end to end (tiny backbone and data; the real demo uses MiniLM)."""
    output = _run(
        [
            "demo",
            "--run-dir",
            str(tmp_path / "demo"),
            "--set",
            f"backbone={tiny_bert_dir}",
            "--set",
            "tasks=[sst2, trec]",
            "--set",
            "limits={train: 48, validation: 16, test: 16}",
            "--set",
            "finetune.steps=2",
            "--set",
            "condition.steps=2",
            "--set",
            "condition.eval_examples=16",
            "--set",
            "grid=[0.0, 1.0]",
            "--set",
            "device=cpu",
        ]
    )
    assert "source diagnosis" in output and "merged test score" in output and "demo finished" in output
    assert "fine-tuning sst2 [lr_x10]" in output  # bracketed names are printed, not eaten as markup
    assert "Task arithmetic" in output and "TIES" in output and "individual" in output
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["scenarios"]) == {"original", "norm_mismatch"}
    assert (tmp_path / "demo" / "table1.md").is_file()
    # every merge says how it recalibrates: a temperature per task, fitted on validation, and the test
    # confidence under it (entropy rises with T > 1 and falls with T < 1)
    for record_file in (tmp_path / "demo" / "merges").rglob("*.json"):
        if record_file.name.startswith("individual"):
            continue
        for row in json.loads(record_file.read_text())["test"].values():
            after = row["calibrated"]
            assert 0.05 <= after["temperature"] <= 20.0
            if after["temperature"] > 1.0 + 1e-6:
                assert after["entropy"] >= row["entropy"] - 1e-6
            elif after["temperature"] < 1.0 - 1e-6:
                assert after["entropy"] <= row["entropy"] + 1e-6
    assert "Calibration of the merged models" in (tmp_path / "demo" / "table1.md").read_text()
