"""What the report and merge commands write, and how their outputs are read back, through the CLI.

Each case comes from an audit of the CLI and failed before its fix:

* ``diagnose -o DIR`` / ``evaluate -o DIR`` run twice into the same DIR: the second run was refused as
  "files distac did not write", since the reports were written without the ``.distac_output`` marker;
* ``distac merge`` of distac models writes one model per task (OUTPUT/<task>/) and merge.json, and
  ``evaluate OUTPUT`` / ``evaluate OUTPUT/*`` failed on the folder and on merge.json;
* ``evaluate --individual a b`` put b among the models and failed with only "got 1 for 2";
* ``merge --search`` chose an end of its grid without a word, and its help did not say what it scores on
  or that the test scores it prints are limited by ``--validation-examples``;
* ``calibrate`` did not say that it writes into the model directory, nor that its table is the test split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import cli_failure
from conftest import cli_ok as _ok


def _flat(text: str) -> str:
    """CLI output with rich's box characters and line wrapping removed."""
    return " ".join(text.replace("│", " ").split())


def _fails(args: list[str]) -> str:
    """The flattened message of a command that fails as users see it (a DistacError or a usage error)."""
    return _flat(cli_failure(args))


def _data(data_root: Path) -> list[str]:
    return ["--device", "cpu", "--data-root", str(data_root)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, data_root: Path) -> dict[str, Path]:
    """Two 1-step fine-tunes of the tiny BERT (sst2, trec) and their task-arithmetic merge, ``merged``."""
    out = tmp_path_factory.mktemp("cli_outputs")
    common = ["--steps", "1", "--batch-size", "8", "--train-examples", "16", "--max-length", "16", *_data(data_root)]
    paths = {"sst2": out / "sst2", "trec": out / "trec", "merged": out / "merged"}
    for task in ("sst2", "trec"):
        _ok(["finetune", "--task", task, "--backbone", str(tiny_bert_dir), "-o", str(paths[task]), *common])
    # trec first: the merge's source order, not the folder names' order, is the order of its models
    _ok(["merge", str(paths["trec"]), str(paths["sst2"]), "-m", "task_arithmetic", "-l", "0.3",
         "-o", str(paths["merged"]), *_data(data_root)])  # fmt: skip
    return paths


def test_merge_of_distac_models_writes_one_model_per_task(models: dict[str, Path]) -> None:
    """The layout the README and ``merge --help`` describe."""
    merged = models["merged"]
    assert sorted(p.name for p in merged.iterdir()) == [".distac_output", "merge.json", "sst2", "trec"]
    for task in ("sst2", "trec"):
        assert (merged / task / "distac_model.json").is_file() and (merged / task / "model.safetensors").is_file()
        spec = json.loads((merged / task / "distac_model.json").read_text())
        assert spec["task"] == task


def test_diagnose_and_evaluate_may_write_into_the_same_output_again(
    models: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    sources = [str(models["sst2"]), str(models["trec"])]
    diagnosis, evaluation = tmp_path / "diag", tmp_path / "eval"
    for _ in range(2):  # the second run replaced nothing: "holds files distac did not write"
        _ok(["diagnose", *sources, "--examples", "8", "-o", str(diagnosis), *_data(data_root)])
        _ok(["evaluate", *sources, "--examples", "8", "-o", str(evaluation), *_data(data_root)])
    assert (diagnosis / ".distac_output").is_file() and (diagnosis / "diagnosis.json").is_file()
    assert (evaluation / ".distac_output").is_file() and (evaluation / "evaluation.json").is_file()
    assert not list(tmp_path.glob(".*"))  # no temporary or set-aside directory is left behind

    own = tmp_path / "mine"  # a folder of the user's own is still never replaced
    own.mkdir()
    (own / "notes.txt").write_text("keep me")
    assert "did not write" in _fails(["evaluate", sources[0], "--examples", "8", "-o", str(own), *_data(data_root)])
    assert (own / "notes.txt").read_text() == "keep me"


def test_a_report_is_never_written_over_a_model_it_reads(
    models: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    """The report directory replaces its output as a whole: over an input it would delete the model."""
    copy = tmp_path / "copy"
    shutil.copytree(models["merged"], copy)
    for command in (["evaluate", str(copy / "sst2")], ["diagnose", str(copy / "sst2"), str(copy / "trec")]):
        message = _fails([*command, "--examples", "8", "-o", str(copy), *_data(data_root)])
        assert "refusing to write the output over the input" in message
    assert (copy / "sst2" / "model.safetensors").is_file() and (copy / "trec" / "model.safetensors").is_file()


def test_evaluate_diagnose_and_calibrate_take_a_merge_output_for_its_models(
    models: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    merged = models["merged"]
    ours = tmp_path / "merged"
    shutil.copytree(merged, ours)  # calibrate writes into the models: keep the module's merge as it is
    expected = [str(ours / "trec"), str(ours / "sst2")]  # the merge's source order
    common = ["--examples", "8", *_data(data_root)]
    report = tmp_path / "report"
    _ok(["evaluate", str(ours), "-o", str(report), *common])
    assert [r["model"] for r in json.loads((report / "evaluation.json").read_text())["rows"]] == expected

    # what a shell makes of OUTPUT/*: merge.json beside the models it lists, each model once
    globbed = sorted(str(p) for p in ours.iterdir() if not p.name.startswith("."))
    individual = [a for task in ("sst2", "trec") for a in ("--individual", str(models[task]))]
    _ok(["evaluate", *globbed, *individual, "-o", str(report), *common])  # the models in the order given
    rows = json.loads((report / "evaluation.json").read_text())["rows"]
    assert [r["model"] for r in rows] == sorted(expected) and all("normalized" in r for r in rows)
    individual = [a for task in ("trec", "sst2") for a in ("--individual", str(models[task]))]
    _ok(["evaluate", str(ours), *individual, *common])  # references follow the merge's source order

    diagnosis = _flat(_ok(["diagnose", str(ours), *common]))
    assert "trec" in diagnosis and "sst2" in diagnosis

    text = _flat(_ok(["calibrate", str(ours), *common]))
    assert "fitted on validation, scored on test" in text and "before (test)" in text and "after (test)" in text
    for task in ("sst2", "trec"):
        assert "temperature" in json.loads((ours / task / "calibration.json").read_text())


def test_a_merge_of_plain_checkpoints_is_named_for_what_it_is(tmp_path: Path, data_root: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "merge.json").write_text(json.dumps({"sources": [{"name": "a", "path": "/x/a"}]}))
    (plain / "model.safetensors").write_bytes(b"")
    message = _fails(["evaluate", str(plain), *_data(data_root)])
    assert "a merge of plain checkpoints" in message and "distac model directories" in message


def test_individual_given_as_one_list_names_the_repeated_form(models: dict[str, Path], data_root: Path) -> None:
    a, b = str(models["sst2"]), str(models["trec"])
    message = _fails(["evaluate", a, "--individual", a, b, *_data(data_root)])  # b became a second model
    assert "got 1 for 2" in message and "--individual A --individual B" in message


def test_search_says_what_it_reports_and_notes_a_best_lambda_at_the_grid_edge(
    models: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    sources = [str(models["sst2"]), str(models["trec"])]
    # a two-point grid: whichever lambda wins is an end of it
    text = _flat(_ok(["merge", *sources, "-m", "task_arithmetic", "--search", "--grid", "0.5:1:0.5",
                      "--validation-examples", "8", "-o", str(tmp_path / "searched"), *_data(data_root)]))  # fmt: skip
    assert "chosen on validation; at most 8 validation and test examples per task" in text
    chosen = json.loads((tmp_path / "searched" / "merge.json").read_text())["coefficient"]
    assert f"note: lambda={chosen} is the" in text and "the best lambda may be" in text


@pytest.mark.parametrize(
    ("best", "grid", "needle"),
    [
        (1.0, [0.0, 0.5, 1.0], "largest value of the grid; the best lambda may be larger"),
        (0.05, [0.0, 0.05, 0.1, 0.15], "smallest non-zero value of the grid; the best lambda may be smaller"),
        (0.3, [0.3, 0.4, 0.5], "smallest non-zero value"),
        (0.5, [0.0, 0.25, 0.5, 0.75, 1.0], None),
        (0.0, [0.0, 0.5, 1.0], None),  # the pretrained backbone: no grid beyond it
        (0.4, [0.4], None),  # one point: no search to extend
    ],
)
def test_grid_edge_note(best: float, grid: list[float], needle: str | None) -> None:
    from distac.commands.merge import grid_edge_note

    note = grid_edge_note(best, grid)
    if needle is None:
        assert note is None
    else:
        assert note is not None and needle in note and "\n" not in note


def test_help_says_where_outputs_go_and_what_is_scored() -> None:
    merge = _flat(_ok(["merge", "--help"]))
    assert "one complete distac model per task, OUTPUT/<task>/" in merge
    assert "T times the disk of one model" in merge
    assert "validation splits" in merge and "test scores" in merge and "at most --validation-examples" in merge
    evaluate = _flat(_ok(["evaluate", "--help"]))
    assert "--individual A --individual B" in evaluate and "merge output folder" in evaluate
    calibrate = _flat(_ok(["calibrate", "--help"]))
    assert "changed in place" in calibrate and "calibration.json" in calibrate and "test split" in calibrate
