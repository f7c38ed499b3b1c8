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
