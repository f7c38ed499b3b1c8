"""Bad input to the model commands (finetune, condition, diagnose, merge, evaluate) on real distac model
directories: each case fails before any work with a clear error that names the file or option and the
problem, never a traceback, a silently wrong number or a destroyed input. The cases come from an audit
of the CLI; each of these failed (a traceback, an overwritten source, a wrong result) before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli_failure as _fails
from conftest import cli_ok as _ok
from conftest import save_tiny_bert

from distac.errors import DistacError


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path, data_root: Path) -> dict[str, Path]:
    """Two sources from the tiny BERT (sst2, trec), one from a BERT of the same depth but wider (48, not
    32), each a 1-step fine-tune."""
    out = tmp_path_factory.mktemp("bad_input")
    wide = save_tiny_bert(out / "tiny_bert48", tiny_bert_dir, hidden_size=48)
    common = ["--steps", "1", "--batch-size", "8", "--train-examples", "16", "--max-length", "16"]
    common += ["--device", "cpu", "--data-root", str(data_root)]
    paths = {"sst2": out / "sst2", "trec": out / "trec", "wide": out / "wide_sst2"}
    _ok(["finetune", "--task", "sst2", "--backbone", str(tiny_bert_dir), "-o", str(paths["sst2"]), *common])
    _ok(["finetune", "--task", "trec", "--backbone", str(tiny_bert_dir), "-o", str(paths["trec"]), *common])
    _ok(["finetune", "--task", "sst2", "--backbone", str(wide), "-o", str(paths["wide"]), *common])
    return paths


def _data(data_root: Path) -> list[str]:
    return ["--device", "cpu", "--data-root", str(data_root)]


def test_condition_and_finetune_refuse_to_write_over_their_input(
    models: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path, data_root: Path
) -> None:
    before = (models["sst2"] / "finetune.json").read_text()
    _fails(
        ["condition", str(models["sst2"]), "-o", str(models["sst2"]), "--steps", "1", *_data(data_root)],
        "refusing to write the output over the input",
    )
    assert (models["sst2"] / "finetune.json").read_text() == before  # the source is untouched
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_bert_dir, backbone)
    _fails(
        ["finetune", "--task", "sst2", "--backbone", str(backbone), "-o", str(backbone), "--steps", "1"],
        "refusing to write the output over the input",
    )
    assert (backbone / "config.json").is_file() and not (backbone / "distac_model.json").exists()


def test_a_relative_backbone_is_stored_as_an_absolute_path(
    tiny_bert_dir: Path, tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Later commands rebuild theta_pre from the stored backbone, maybe from another directory."""
    shutil.copytree(tiny_bert_dir, tmp_path / "bb")
    monkeypatch.chdir(tmp_path)
    _ok(["finetune", "--task", "sst2", "--backbone", "bb", "-o", "m", "--steps", "1", "--batch-size", "8",
         "--train-examples", "16", "--max-length", "16", *_data(data_root)])  # fmt: skip
    spec = json.loads((tmp_path / "m" / "distac_model.json").read_text())
    assert spec["backbone"] == str((tmp_path / "bb").resolve())


def test_a_backbone_that_cannot_be_found_is_a_clear_error(
    models: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(models["sst2"], moved)
    spec = json.loads((moved / "distac_model.json").read_text())
    spec["backbone"] = "no/such/backbone"  # e.g. a relative path written by an older version
    (moved / "distac_model.json").write_text(json.dumps(spec))
    _fails(["diagnose", str(moved), "--examples", "8", *_data(data_root)],
           "'no/such/backbone'", "no such file or directory")  # fmt: skip
    _fails(["finetune", "--task", "sst2", "--backbone", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o"),
            "--steps", "1"], "nowhere", "no such file or directory")  # fmt: skip
    spec["backbone"] = "nosuchorg/nosuchmodel"  # a hub id that is not cached (offline)
    (moved / "distac_model.json").write_text(json.dumps(spec))
    _fails(["diagnose", str(moved), "--examples", "8", *_data(data_root)],
           "'nosuchorg/nosuchmodel'", "cannot load the backbone")  # fmt: skip


def test_a_backbone_without_tokenizer_files_is_refused_and_max_length_fits_the_positions(
    tiny_bert_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from distac.models import ModelSpec, build_model

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert_dir / name, bare / name)
    _fails(
        ["finetune", "--task", "sst2", "--backbone", str(bare), "-o", str(tmp_path / "o"), "--steps", "1"],
        "no tokenizer files",
    )  # fmt: skip (it used to train on a 5-token tokenizer: every word [UNK])
    with caplog.at_level("WARNING", logger="distac.models"):
        model = build_model(ModelSpec("hf-text", str(tiny_bert_dir), 2, task="sst2", options={"max_length": 512}))
    assert model.max_length == 128 and "exceeds the 128 positions" in caplog.text
    long_text = " ".join(["word"] * 400)
    assert model(model.encode([long_text])).shape == (1, 2)  # used to crash past the position embeddings


def test_a_task_name_means_the_task_even_beside_a_folder_of_that_name(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distac.data import load_task

    (tmp_path / "sst2").mkdir()  # e.g. the output of `distac finetune --task sst2 -o sst2`
    (tmp_path / "sst2" / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    task = load_task("sst2", data_root)
    assert task.name == "sst2" and task.num_classes == 2 and len(task.train) > 100


def test_a_head_that_does_not_fit_the_task_is_refused(models: dict[str, Path], tmp_path: Path, data_root: Path) -> None:
    _fails(
        ["condition", str(models["sst2"]), "--task", "trec", "-o", str(tmp_path / "c"), "--steps", "1",
         *_data(data_root)],
        "6 classes", str(models["sst2"]), "has 2",
    )  # fmt: skip
    mislabeled = tmp_path / "mislabeled"
    shutil.copytree(models["trec"], mislabeled)
    spec = json.loads((mislabeled / "distac_model.json").read_text())
    spec.update(task="sst2", class_names=None)  # a 6-class head that claims to be an sst2 model
    (mislabeled / "distac_model.json").write_text(json.dumps(spec))
    _fails(["diagnose", str(models["sst2"]), str(mislabeled), "--examples", "8", *_data(data_root)],
           "2 classes", str(mislabeled))  # fmt: skip
    assert not (tmp_path / "c").exists()


def test_sources_of_different_architectures_are_named(models: dict[str, Path], tmp_path: Path, data_root: Path) -> None:
    _fails(["diagnose", str(models["sst2"]), str(models["wide"]), "--examples", "8", *_data(data_root)],
           str(models["wide"]), "tiny_bert48")  # fmt: skip
    _fails(["merge", str(models["sst2"]), str(models["trec"]), "-m", "ties", "-o", str(tmp_path / "x"),
            "--pretrained", str(models["wide"]), *_data(data_root)], "(--pretrained)", "has shape")  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_a_plain_pretrained_checkpoint_for_distac_sources_gets_a_hint(
    models: dict[str, Path], tiny_bert_dir: Path, tmp_path: Path, data_root: Path
) -> None:
    _fails(
        ["merge", str(models["sst2"]), str(models["trec"]), "-m", "task_arithmetic", "-o", str(tmp_path / "x"),
         "--pretrained", str(tiny_bert_dir), *_data(data_root)],
        "(--pretrained): lacks", "'backbone.' prefix", "omit --pretrained",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("grid", "needle"),
    [("0:nan:0.5", "finite"), ("0:inf:0.5", "finite"), ("0:1:1e-9", "points; at most 1000")],
)
def test_a_grid_that_cannot_be_searched_is_refused(
    models: dict[str, Path], tmp_path: Path, data_root: Path, grid: str, needle: str
) -> None:
    _fails(["merge", str(models["sst2"]), str(models["trec"]), "-m", "task_arithmetic", "--search", "--grid", grid,
            "-o", str(tmp_path / "x"), *_data(data_root)], needle)  # fmt: skip


def test_nonsense_counts_and_devices_are_refused(models: dict[str, Path], tmp_path: Path, data_root: Path) -> None:
    sources = [str(models["sst2"]), str(models["trec"])]
    _fails(["evaluate", sources[0], "--examples", "0", *_data(data_root)], "at least 1")
    _fails(["diagnose", *sources, "--examples", "-5", *_data(data_root)], "--examples must be at least 1")
    _fails(["diagnose", *sources, sources[0], *_data(data_root)], "a source is given more than once")
    _fails(["merge", *sources, "-m", "ties", "--search", "--validation-examples", "-3", "-o", str(tmp_path / "x"),
            *_data(data_root)], "--validation-examples must be at least 1")  # fmt: skip
    _fails(["merge", *sources, "-m", "ties", "--max-shard-size", "0", "-o", str(tmp_path / "x")], "positive size")
    _fails(["finetune", "--task", "sst2", "-o", str(tmp_path / "f"), "--train-examples", "0"], "--train-examples")
    _fails(["evaluate", *sources, "--individual", sources[0], *_data(data_root)], "got 1 for 2")
    _fails(  # a reference model of another task made "normalized" a meaningless number
        ["evaluate", sources[0], "--individual", sources[1], *_data(data_root)],
        "is a model for task 'trec', but",
        "evaluated on 'sst2'",
    )
    _fails(
        ["evaluate", sources[0], "--device", "bogus", "--data-root", str(data_root)], "'bogus' is not a torch device"
    )
    import torch

    if not torch.cuda.is_available():
        _fails(["evaluate", sources[0], "--device", "cuda", "--data-root", str(data_root)], "0 CUDA device(s)")
    assert not (tmp_path / "x").exists() and not (tmp_path / "f").exists()


def test_outputs_never_replace_a_file_and_failed_evaluations_leave_nothing(
    models: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    sources = [str(models["sst2"]), str(models["trec"])]
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    _fails(["merge", *sources, "-m", "ties", "-o", str(afile), *_data(data_root)], "exists and is a file")
    _fails(["merge", *sources, "-m", "ties", "-o", str(afile / "sub"), *_data(data_root)], "is a file, not a directory")
    _fails(["diagnose", *sources, "-o", str(afile), *_data(data_root)], "exists and is a file")
    _fails(["task-vector", str(models["sst2"]), str(models["trec"]), "--json", str(tmp_path)], "is a directory")
    assert afile.read_text() == "keep me" and not list(tmp_path.glob(".afile*"))
    broken = tmp_path / "broken"
    shutil.copytree(models["trec"], broken)
    spec = json.loads((broken / "distac_model.json").read_text())
    spec.update(task="sst2", class_names=None)
    (broken / "distac_model.json").write_text(json.dumps(spec))
    report = tmp_path / "report"
    _fails(["evaluate", sources[0], str(broken), "--examples", "8", "-o", str(report), *_data(data_root)],
           str(broken))  # fmt: skip
    assert not report.exists() or not any(report.iterdir())  # no plot of the first model is left behind


def test_merge_names_duplicate_sources_and_shared_folder_names(
    models: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    _fails(["merge", str(models["sst2"]), str(models["sst2"]), "-m", "ties", "-o", str(tmp_path / "x")],
           "given more than once")  # fmt: skip
    other = tmp_path / "elsewhere" / "sst2"
    shutil.copytree(models["trec"], other)
    _fails(["merge", str(models["sst2"]), str(other), "-m", "ties", "-o", str(tmp_path / "x")],
           "share the folder name", "--name")  # fmt: skip


def test_condition_takes_kappa_and_device_from_its_config_when_no_flag_is_given(
    models: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    """The flags' defaults (kappa 1, device auto) used to overwrite the config's values silently."""
    config = tmp_path / "condition.yaml"
    config.write_text("kappa: 0.3\ndevice: cpu\nsteps: 1\nbatch_size: 8\nnum_unlabeled: 16\neval_examples: 8\n")
    out = tmp_path / "conditioned"
    _ok(["condition", str(models["sst2"]), "-o", str(out), "--config", str(config), "--data-root", str(data_root)])
    record = json.loads((out / "condition.json").read_text())
    assert record["config"]["kappa"] == 0.3 and record["config"]["device"] == "cpu"
    _ok(["condition", str(models["sst2"]), "-o", str(out), "--config", str(config), "--kappa", "0.5",
         "--data-root", str(data_root)])  # fmt: skip
    assert json.loads((out / "condition.json").read_text())["config"]["kappa"] == 0.5  # the flag wins
    _fails(["condition", str(models["sst2"]), "-o", str(tmp_path / "x"), "--others", str(models["trec"])],
           "--others only serve --kappa auto")  # fmt: skip


def test_calibrate_and_evaluate_name_a_model_whose_logits_overflow(
    models: dict[str, Path], tmp_path: Path, data_root: Path
) -> None:
    """Finite but absurd weights (what a merge at a huge coefficient gives) overflow to Inf logits;
    calibrate used to crash inside the temperature fit."""
    from distac.checkpoints import load_state_dict, save_state_dict

    broken = tmp_path / "overflow"
    shutil.copytree(models["sst2"], broken)
    state = load_state_dict(broken)
    state["head.weight"] = torch.full_like(state["head.weight"], 3e38)
    save_state_dict(state, tmp_path / "weights")
    shutil.copy(tmp_path / "weights" / "model.safetensors", broken / "model.safetensors")
    for command in ("calibrate", "evaluate"):
        _fails([command, str(broken), "--examples", "8", *_data(data_root)], str(broken), "NaN/Inf logits")


def test_a_full_or_read_only_disk_is_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno
    import os

    import distac.cli as cli
    from distac.atomic import atomic_path
    from distac.checkpoints import check_output_path

    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "results.json"))

    monkeypatch.setattr(cli, "app", full_disk)
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    assert f"error: cannot write {tmp_path / 'results.json'}: No space left on device" in capsys.readouterr().err

    # torch.save on a full disk raises a RuntimeError ("unexpected pos ..."): reported as the full disk it is
    monkeypatch.setattr("distac.atomic._nearly_full", lambda directory: True)
    with pytest.raises(OSError, match="no space left") as full, atomic_path(tmp_path / "state.pt"):
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 57984 vs 57878")
    assert full.value.errno == errno.ENOSPC and not list(tmp_path.glob(".state.pt*"))

    # an output under a directory that cannot be written is refused before any work (fine-tuning used to
    # train fully, then fail creating its temporary directory)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DistacError, match="is not writable"):
        check_output_path(tmp_path / "out")
