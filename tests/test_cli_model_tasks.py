"""How the model commands pair a model with its task, from an audit of the CLI: a model fine-tuned on a
dataset path is found again by the commands that score it, a text model is never fed images (nor an image
model text), ``condition`` only shrinks a task vector, ``--family``'s help lists the registry's families,
and finetune.json records the training subset it used, and ``merge --streaming`` refuses distac model
directories. Each test failed before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_failure as _fails
from conftest import cli_ok as _ok
from typer.testing import CliRunner

from distac.cli import app
from distac.errors import ConfigError

runner = CliRunner()
FAST = ["--steps", "1", "--batch-size", "8", "--train-examples", "16", "--max-length", "16", "--device", "cpu"]


def _write_text_task(directory: Path) -> Path:
    """A small text task of the user's own (train.tsv / test.tsv, word labels)."""
    directory.mkdir(parents=True)
    good = ["a fine film", "great acting", "a joy to watch", "wonderful and warm", "i loved it"]
    bad = ["a dull film", "poor acting", "a chore to watch", "cold and empty", "i hated it"]
    rows = [f"{t} {i}\t\tpos" for i in range(4) for t in good] + [f"{t} {i}\t\tneg" for i in range(4) for t in bad]
    header = "text_a\ttext_b\tlabel\n"
    (directory / "train.tsv").write_text(header + "\n".join(rows) + "\n")
    (directory / "test.tsv").write_text(header + "\n".join(rows[::4]) + "\n")
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, data_root: Path) -> dict[str, Path]:
    """A tiny-BERT source of the shared sst2 and one of a user's task given as a relative path (1 step each)."""
    out = tmp_path_factory.mktemp("model_tasks")
    _write_text_task(out / "myroot" / "mytask")
    paths = {"sst2": out / "ft_sst2", "mytask": out / "ft_my"}
    _ok(["finetune", "--task", "sst2", "--backbone", str(tiny_bert_dir), "-o", str(paths["sst2"]), *FAST,
         "--data-root", str(data_root)])  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(out)  # the task path as a user types it, relative to where the command runs
        _ok(["finetune", "--task", "myroot/mytask", "--backbone", str(tiny_bert_dir), "-o", "ft_my", *FAST])
    return paths


def test_a_model_of_a_dataset_path_is_scored_beside_models_of_shared_tasks(
    models: dict[str, Path], data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = json.loads((models["mytask"] / "distac_model.json").read_text())
    dataset = models["mytask"].parent / "myroot" / "mytask"
    assert spec["task"] == "mytask" and spec["task_source"] == str(dataset.resolve())
    assert "task_source" not in json.loads((models["sst2"] / "distac_model.json").read_text())  # a named task
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded path is absolute
    # the shared data root serves sst2; mytask is not in it and comes from the path the model recorded
    table = _ok(["evaluate", str(models["mytask"]), str(models["sst2"]), "--examples", "8", "--device", "cpu",
                 "--data-root", str(data_root)])  # fmt: skip
    assert "mytask" in table and "sst2" in table
    calibrated = tmp_path / "calibrated"
    shutil.copytree(models["mytask"], calibrated)
    _ok(["calibrate", str(calibrated), "--examples", "8", "--device", "cpu", "--data-root", str(data_root)])
    assert (calibrated / "calibration.json").is_file()
    _ok(["condition", str(models["mytask"]), "-o", str(tmp_path / "conditioned"), "--steps", "1", "--batch-size",
         "8", "--unlabeled", "16", "--set", "eval_examples=8", "--device", "cpu",
         "--data-root", str(data_root)])  # fmt: skip
    conditioned = json.loads((tmp_path / "conditioned" / "distac_model.json").read_text())
    assert conditioned["task_source"] == spec["task_source"]  # the conditioned model finds its data too


def test_an_unknown_task_points_to_data_root_and_a_gone_dataset(
    models: dict[str, Path], data_root: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "moved_model"
    shutil.copytree(models["mytask"], moved)
    spec = json.loads((moved / "distac_model.json").read_text())
    spec["task_source"] = str(tmp_path / "gone" / "mytask")
    (moved / "distac_model.json").write_text(json.dumps(spec))
    _fails(["evaluate", str(moved), "--examples", "8", "--device", "cpu", "--data-root", str(data_root)],
           "unknown task 'mytask'", "--data-root", "is gone too")  # fmt: skip
    own_root = models["mytask"].parent / "myroot"  # --data-root still works, and comes first
    _ok(["evaluate", str(moved), "--examples", "8", "--device", "cpu", "--data-root", str(own_root)])


def test_a_dataset_named_in_a_data_root_of_its_own_is_recorded_too(
    tiny_bert_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    from distac.data import load_model_task, task_dataset_path
    from distac.models.base import ModelSpec

    _write_text_task(tmp_path / "root" / "mytask")
    assert task_dataset_path("mytask", tmp_path / "root") == (tmp_path / "root" / "mytask").resolve()
    assert task_dataset_path("sst2", data_root) is None  # the shared data's own task: nothing to record
    spec = ModelSpec("hf-text", "x", 2, task="mytask", task_source=str(tmp_path / "root" / "mytask"))
    assert load_model_task(spec, data_root).source == str(tmp_path / "root" / "mytask")
    assert ModelSpec.from_json(spec.to_json()) == spec
    named = ModelSpec("hf-text", "x", 2, task="sst2")
    assert "task_source" not in named.to_json()  # the spec (and resume identity) of a named task is unchanged
    assert load_model_task(named, data_root).source == str(data_root / "text" / "sst2")


def test_a_text_model_is_never_paired_with_an_image_task_nor_the_reverse(
    models: dict[str, Path], tiny_bert_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    data = ["--data-root", str(data_root)]
    # used to be a raw transformers ValueError from deep inside the tokenizer
    _fails(["finetune", "--task", "mnist", "--backbone", str(tiny_bert_dir), "-o", str(tmp_path / "x"), *FAST, *data],
           "'mnist' is an image task", "'hf-text' reads text", "clip, timm, vision")  # fmt: skip
    # used to fail in the image transform: "expected images shaped (N,H,W[,C]), got (8, 2)"
    _fails(["finetune", "--task", "trec", "--family", "timm", "--backbone", "efficientnet-lite0", "-o",
            str(tmp_path / "y"), *FAST, *data], "'trec' is a text task", "'timm' reads image", "hf-text")  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    _fails(["condition", str(models["sst2"]), "--task", "mnist", "-o", str(tmp_path / "c"), "--steps", "1", *data],
           "'mnist' is an image task", str(models["sst2"]))  # fmt: skip
    claims_mnist = tmp_path / "claims_mnist"  # a text model whose spec names an image task
    shutil.copytree(models["sst2"], claims_mnist)
    spec = json.loads((claims_mnist / "distac_model.json").read_text())
    spec.update(task="mnist", class_names=None)
    (claims_mnist / "distac_model.json").write_text(json.dumps(spec))
    for command in (["evaluate"], ["calibrate"], ["diagnose", str(models["sst2"])]):
        _fails([*command, str(claims_mnist), "--examples", "8", "--device", "cpu", *data],
               "'mnist' is an image task", str(claims_mnist), "'hf-text'")  # fmt: skip


def test_family_help_lists_the_registry_and_an_unknown_family_is_named(tmp_path: Path) -> None:
    from distac.models.base import MODEL_FAMILY_INFO, ClassifierModel
    from distac.models.registry import MODEL_FAMILIES, _model_class

    help_text = " ".join(runner.invoke(app, ["finetune", "--help"]).output.replace("│", " ").split())
    for name, family in MODEL_FAMILY_INFO.items():
        assert f"{name}: {family.summary}" in help_text  # vision too, which the old help left out
        assert issubclass(_model_class(name), ClassifierModel)
    assert tuple(MODEL_FAMILY_INFO) == MODEL_FAMILIES
    _fails(["finetune", "--task", "sst2", "--family", "bert", "-o", str(tmp_path / "z")],
           "unknown model family 'bert'", "vision")  # fmt: skip


def test_condition_only_shrinks_and_never_compares_a_source_with_itself(
    models: dict[str, Path], data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distac.conditioning.distac import ConditionConfig

    fast = ["--steps", "1", "--batch-size", "8", "--unlabeled", "16", "--device", "cpu", "--data-root", str(data_root)]
    out = str(tmp_path / "c")
    for kappa in ("2", "1.5", "0", "-0.5", "nan"):  # kappa 2 used to stretch the task vector silently
        _fails(["condition", str(models["sst2"]), "-o", out, "--kappa", kappa, *fast], "--kappa must be in (0.0, 1.0]")
    config = tmp_path / "condition.yaml"
    config.write_text("kappa: 3\n")  # the config's kappa too
    _fails(["condition", str(models["sst2"]), "-o", out, "--config", str(config), *fast], "(0.0, 1.0]")
    monkeypatch.chdir(models["sst2"].parent)  # the source under another spelling of its path
    _fails(["condition", str(models["sst2"]), "-o", out, "--kappa", "auto", "--others", f"./{models['sst2'].name}",
            *fast], "--others holds the conditioned source")  # fmt: skip
    _fails(["condition", str(models["sst2"]), "-o", out, "--kappa", "auto", "--others", str(models["mytask"]),
            "--others", str(models["mytask"]), *fast], "given more than once")  # fmt: skip
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match=r"condition\.kappa must be in \(0\.0, 1\.0\]"):
        ConditionConfig(kappa=1.5)
    assert ConditionConfig(kappa=1.0).kappa == 1.0


def test_finetune_records_the_training_subset_it_used_and_trains_on_the_same_examples(
    models: dict[str, Path], tiny_bert_dir: Path, data_root: Path
) -> None:
    from distac.data import load_task
    from distac.models import ModelSpec, build_model, load_model
    from distac.training.finetune import FinetuneConfig, finetune

    record = json.loads((models["sst2"] / "finetune.json").read_text())
    assert record["config"]["max_train_examples"] == 16  # was null with --train-examples 16
    # the subset is the one TaskData.limit took in the command before: the same weights come out
    task = load_task("sst2", data_root)
    spec = ModelSpec("hf-text", str(tiny_bert_dir), 2, task="sst2", class_names=task.class_names,
                     options={"max_length": 16})  # fmt: skip
    model = build_model(spec)
    config = FinetuneConfig(steps=1, batch_size=8, device="cpu")
    finetune(model, task.limit(train=16, seed=config.seed), config, progress=False)
    saved = load_model(models["sst2"]).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_streaming_merge_of_distac_models_is_refused_before_any_work(
    models: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """A streamed merge writes one checkpoint; distac models keep a head per task. It used to stream the
    model files as plain checkpoints and write one model whose head merged the unrelated task heads."""
    out = tmp_path / "streamed"
    _fails(["merge", str(models["sst2"]), str(models["mytask"]), "-m", "task_arithmetic", "-l", "0.3",
            "-p", str(tiny_bert_dir), "--streaming", "-o", str(out)], "drop --streaming")  # fmt: skip
    assert not out.exists()
