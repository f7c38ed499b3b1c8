"""Config files with overrides, and the CLI skeleton."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distac.checkpoints import save_state_dict
from distac.cli import app
from distac.config import apply_overrides, build_dataclass, load_config
from distac.errors import ConfigError

runner = CliRunner()


@dataclass
class _Opts:
    steps: int = 500
    lr: float = 1e-5
    tasks: tuple[str, ...] = ()


def test_yaml_with_overrides(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("condition:\n  steps: 500\n  lr: 1.0e-5\nseed: 1\n")
    cfg = load_config(tmp_path / "c.yaml", ["condition.steps=20", "seed=3", "tasks=[sst2, cola]"])
    assert cfg == {"condition": {"steps": 20, "lr": 1e-5}, "seed": 3, "tasks": ["sst2", "cola"]}
    opts = build_dataclass(_Opts, cfg["condition"])
    assert opts.steps == 20 and opts.lr == 1e-5


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option.*'stepz'.*valid options"):
        build_dataclass(_Opts, {"stepz": 3})
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["steps"])
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml.*mapping"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_help_lists_every_subcommand() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("tasks", "inspect", "task-vector"):
        assert command in result.output


def test_task_vector_command(tmp_path: Path) -> None:
    pre = {"backbone.w": torch.zeros(3, 4), "head.weight": torch.zeros(2, 4)}
    ft = {"backbone.w": torch.full((3, 4), 0.5), "head.weight": torch.ones(2, 4)}
    save_state_dict(pre, tmp_path / "pre")
    save_state_dict(ft, tmp_path / "ft")
    result = runner.invoke(
        app,
        [
            "task-vector",
            str(tmp_path / "pre"),
            str(tmp_path / "ft"),
            "--output",
            str(tmp_path / "tau"),
            "--json",
            str(tmp_path / "n.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    import json

    norms = json.loads((tmp_path / "n.json").read_text())
    assert norms["norm"] == pytest.approx((12 * 0.25) ** 0.5)  # the head is not part of tau
    assert (tmp_path / "tau" / "model.safetensors").is_file()


def test_cli_bad_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "x.safetensors").write_bytes(b"garbage!garbage!")
    proc = subprocess.run(
        [sys.executable, "-m", "distac.cli", "inspect", str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "x.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_experiment_list_needs_no_name_and_a_missing_name_is_explained() -> None:
    listed = runner.invoke(app, ["experiment", "--list"])
    assert listed.exit_code == 0, listed.output
    assert {"demo", "text8", "vision", "clip-vit-b32", "text-confident"} <= set(listed.output.split())
    missing = runner.invoke(app, ["experiment"])
    assert missing.exit_code == 2
    assert "name an experiment" in missing.output and "text8" in missing.output
