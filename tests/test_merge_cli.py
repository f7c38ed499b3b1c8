"""``distac merge`` on real files: plain checkpoints (HF-style dirs) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distac.checkpoints import load_state_dict, save_state_dict
from distac.cli import app
from distac.commands.merge import parse_grid, parse_size
from distac.errors import DistacError

runner = CliRunner()


def _write_sources(tmp_path: Path) -> tuple[Path, list[Path], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    pre = {
        "encoder.0.weight": torch.randn(6, 4, generator=g),
        "encoder.0.bias": torch.randn(6, generator=g),
        "classifier.weight": torch.randn(3, 6, generator=g),
    }
    save_state_dict(pre, tmp_path / "pre")
    (tmp_path / "pre" / "config.json").write_text('{"model_type": "toy"}')
    fts, states = [], []
    for i in range(3):
        ft = {k: v + 0.1 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in pre.items()}
        save_state_dict(ft, tmp_path / f"ft{i}")
        fts.append(tmp_path / f"ft{i}")
        states.append(ft)
    return tmp_path / "pre", fts, pre, states


def test_task_arithmetic_merge_matches_hand_computation(tmp_path: Path) -> None:
    pre_dir, fts, pre, states = _write_sources(tmp_path)
    result = runner.invoke(
        app,
        [
            "merge",
            *map(str, fts),
            "--method",
            "task_arithmetic",
            "--pretrained",
            str(pre_dir),
            "--coefficient",
            "0.3",
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    merged = load_state_dict(tmp_path / "out")
    expected = pre["encoder.0.weight"] + 0.3 * sum(s["encoder.0.weight"] - pre["encoder.0.weight"] for s in states)
    assert torch.allclose(merged["encoder.0.weight"], expected, atol=1e-6)
    assert torch.equal(merged["classifier.weight"], pre["classifier.weight"])  # heads are not merged
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["method"] == "task_arithmetic" and record["coefficient"] == 0.3
    assert (tmp_path / "out" / "config.json").is_file()


def test_task_conditional_method_writes_one_model_per_task(tmp_path: Path) -> None:
    pre_dir, fts, _, _ = _write_sources(tmp_path)
    result = runner.invoke(
        app,
        ["merge", *map(str, fts), "--method", "emr", "--pretrained", str(pre_dir), "--output", str(tmp_path / "emr")],
    )
    assert result.exit_code == 0, result.output
    outs = sorted(p.name for p in (tmp_path / "emr").iterdir() if p.is_dir())
    assert outs == ["ft0", "ft1", "ft2"]
    assert json.loads((tmp_path / "emr" / "merge.json").read_text())["task_conditional"] is True
    a, b = load_state_dict(tmp_path / "emr" / "ft0"), load_state_dict(tmp_path / "emr" / "ft1")
    assert not torch.equal(a["encoder.0.weight"], b["encoder.0.weight"])


def test_bad_inputs_fail_before_writing(tmp_path: Path) -> None:
    pre_dir, fts, pre, _ = _write_sources(tmp_path)
    result = runner.invoke(
        app,
        ["merge", *map(str, fts), "--method", "nope", "--pretrained", str(pre_dir), "--output", str(tmp_path / "x")],
    )
    assert result.exit_code != 0 and not (tmp_path / "x").exists()
    assert "nope" in str(result.exception) or "nope" in result.output
    bad = dict(pre)
    bad["encoder.0.weight"] = torch.zeros(5, 4)
    save_state_dict(bad, tmp_path / "bad")
    result = runner.invoke(
        app,
        [
            "merge",
            str(fts[0]),
            str(tmp_path / "bad"),
            "--method",
            "ties",
            "--pretrained",
            str(pre_dir),
            "--output",
            str(tmp_path / "y"),
        ],
    )
    assert result.exit_code != 0 and not (tmp_path / "y").exists()
    assert "encoder.0.weight" in str(result.exception)


def test_size_and_grid_parsing() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_grid("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(Exception, match="start:stop:step"):
        parse_grid("0-1")


def _merge(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, ["merge", *args])
    """(exit code as the CLI's users see it, message): a DistacError is exit 2 in ``distac.cli.main``."""
    message = " ".join(result.output.replace("│", " ").split())
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert isinstance(result.exception, DistacError), repr(result.exception)
        return 2, f"{message} {result.exception}"
    return result.exit_code, message


def test_an_existing_directory_of_the_users_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The output directory is swapped in whole; it used to delete whatever was there (an audit found a
    user's notes gone, and `-o .` crash after the merge). Now only an empty folder or an earlier distac
    output is replaced, and the refusal comes before any work."""
    pre_dir, fts, _, _ = _write_sources(tmp_path)
    base = [*map(str, fts), "-m", "task_arithmetic", "-p", str(pre_dir)]
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("do not lose me")
    code, message = _merge([*base, "-o", str(mine)])
    assert code == 2 and "holds files distac did not write (notes.txt, sub)" in message, message
    assert (mine / "notes.txt").read_text() == "do not lose me" and (mine / "sub").is_dir()

    monkeypatch.chdir(mine)
    code, message = _merge([*base, "-o", "."])
    assert code == 2 and "is the working directory or contains it" in message, message
    monkeypatch.chdir(tmp_path)

    (tmp_path / "empty").mkdir()
    assert _merge([*base, "-o", str(tmp_path / "empty")])[0] == 0  # an empty folder is fine
    assert (tmp_path / "empty" / ".distac_output").is_file()
    assert _merge([*base, "-l", "0.5", "-o", str(tmp_path / "empty")])[0] == 0  # so is distac's own output
    assert json.loads((tmp_path / "empty" / "merge.json").read_text())["coefficient"] == 0.5
    assert _merge([*map(str, fts), "-m", "emr", "-p", str(pre_dir), "-o", str(tmp_path / "emr")])[0] == 0
    (tmp_path / "emr" / ".distac_output").unlink()  # an output from before the marker: per-task merge.json
    assert _merge([*map(str, fts), "-m", "emr", "-p", str(pre_dir), "-o", str(tmp_path / "emr")])[0] == 0


def test_task_names_cannot_leave_the_output_directory(tmp_path: Path) -> None:
    pre_dir, fts, _, _ = _write_sources(tmp_path)
    base = [*map(str, fts[:2]), "-m", "tall_masks", "-p", str(pre_dir), "-o", str(tmp_path / "out")]
    for names in (["../escaped", "b"], [str(tmp_path / "victim"), "b"], [".", "b"]):
        code, message = _merge([*base, "--name", names[0], "--name", names[1]])
        assert code == 2 and "plain folder names" in message, (names, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1", "ft2", "pre"]


def test_include_and_exclude_add_to_the_default_exclusions(tmp_path: Path) -> None:
    """--exclude of one layer used to replace the default exclusions, so classifier heads got merged."""
    pre_dir, fts, pre, states = _write_sources(tmp_path)
    base = [*map(str, fts), "-m", "task_arithmetic", "-p", str(pre_dir), "-l", "0.3"]
    assert _merge([*base, "--exclude", "encoder.0.bias", "-o", str(tmp_path / "out")])[0] == 0
    merged = load_state_dict(tmp_path / "out")
    assert torch.equal(merged["classifier.weight"], pre["classifier.weight"])  # the head stays theta_pre's
    assert torch.equal(merged["encoder.0.bias"], pre["encoder.0.bias"])  # excluded by the user
    expected = pre["encoder.0.weight"] + 0.3 * sum(s["encoder.0.weight"] - pre["encoder.0.weight"] for s in states)
    assert torch.allclose(merged["encoder.0.weight"], expected, atol=1e-6)


def test_flags_that_would_be_ignored_are_refused(tmp_path: Path) -> None:
    pre_dir, fts, _, _ = _write_sources(tmp_path)
    base = [*map(str, fts), "-m", "task_arithmetic", "-p", str(pre_dir), "-o", str(tmp_path / "out")]
    cases = [
        (["--device", "tpu"], "not a torch device"),
        (["--device", "cuda:7"], "CUDA device"),
        (["--streaming", "--search"], "--streaming cannot"),
        (["--search", "-l", "0.3"], "--search chooses lambda itself"),
        (["--grid", "0:1:0.1"], "add --search or drop --grid"),
        (["-l", "1e40"], "NaN/Inf"),  # it wrote an all-Inf model that distac then refused to load
    ]
    for flags, needle in cases:
        code, message = _merge([*base, *flags])
        assert code == 2 and needle in message, (flags, message)
    assert not (tmp_path / "out").exists()
    code, message = _merge([*map(str, fts), "-m", "ties", "-p", str(pre_dir), "-o", str(tmp_path / "m.safetensors")])
    assert code == 2 and "is a directory" in message, message
    assert _merge([*base, "--device", "cpu"])[0] == 0


def test_merge_json_records_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths given relative to the working directory are recorded absolute, so the provenance still
    points at the inputs when merge.json is read from elsewhere."""
    _write_sources(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert _merge(["ft0", "ft1", "-m", "task_arithmetic", "-p", "pre", "-o", "out"])[0] == 0
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["pretrained"] == str(tmp_path / "pre")
    assert [s["path"] for s in record["sources"]] == [str(tmp_path / "ft0"), str(tmp_path / "ft1")]
