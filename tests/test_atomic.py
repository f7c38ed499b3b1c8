"""Atomic outputs: complete or absent, never half-written, and readable like any other file."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from distac.atomic import atomic_directory, atomic_write_json, atomic_write_text


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_and_directories_get_the_umask_mode_not_the_temp_files(tmp_path: Path, umask_022: None) -> None:
    """mkstemp / mkdtemp create 0600 / 0700; a results.json or model folder must be readable by others
    as any file written with open() would be."""
    text = atomic_write_text(tmp_path / "report.md", "# report\n")
    data = atomic_write_json(tmp_path / "sub" / "results.json", {"a": 1})
    assert _mode(text) == 0o644 and _mode(data) == 0o644
    with atomic_directory(tmp_path / "model") as building:
        (building / "weights.bin").write_bytes(b"\0")
    assert _mode(tmp_path / "model") == 0o755
    assert (tmp_path / "model" / "weights.bin").read_bytes() == b"\0"


def test_checkpoints_get_the_umask_mode_although_safetensors_writes_0600(tmp_path: Path, umask_022: None) -> None:
    """safetensors' save_file creates its file 0600 whatever mode the temp file had; the saved checkpoint
    (a model.safetensors in a run directory) must still be readable like any other output."""
    import torch

    from distac.checkpoints import save_safetensors, save_state_dict

    single = save_safetensors({"w": torch.zeros(2)}, tmp_path / "single.safetensors")
    folder = save_state_dict({"w": torch.zeros(2)}, tmp_path / "model")
    assert _mode(single) == 0o644
    weights = [f for f in Path(folder).iterdir() if f.suffix == ".safetensors"]
    assert weights and all(_mode(f) == 0o644 for f in weights)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "out.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"not serialisable": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_an_interrupted_swap_is_undone_by_the_next_write(tmp_path) -> None:  # noqa: ANN001
    """A crash between the two renames leaves the old output aside as .<name>.old; the next write of
    the same target restores it first, so the old output is never lost."""
    from distac.atomic import OUTPUT_MARKER, atomic_directory

    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "model.txt").write_text("old")
    target.rename(tmp_path / ".out.old")  # the state right after the first rename of a swap
    with pytest.raises(RuntimeError), atomic_directory(target):
        raise RuntimeError("interrupted again")
    assert (target / "model.txt").read_text() == "old" and (target / OUTPUT_MARKER).is_file()
    assert not (tmp_path / ".out.old").exists()


def test_json_is_strict_undefined_numbers_become_null(tmp_path: Path) -> None:
    """Python's json writes bare NaN / Infinity, which jq and JavaScript reject: distac writes null."""
    path = tmp_path / "r.json"
    atomic_write_json(path, {"normalized": float("nan"), "rows": [1.5, float("inf"), -float("inf")], "n": 3})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"normalized": None, "rows": [1.5, None, None], "n": 3}


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    """A SIGKILL between writing and renaming leaves ``.<name>.<host>.<pid>-*.tmp``; the next write of the
    same target deletes it when that process is gone, and keeps those of live processes and other hosts."""
    import subprocess
    import sys

    from distac.atomic import _HOST, visible

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "results.json"
    stale_file = tmp_path / f".results.json.{_HOST}.{dead_pid}-abc.tmp"
    stale_file.write_text("half")
    stale_dir = tmp_path / f".results.json.{_HOST}.{dead_pid}-def.tmp"
    (stale_dir / "inner").mkdir(parents=True)
    live = tmp_path / f".results.json.{_HOST}.{os.getpid()}-ghi.tmp"
    live.write_text("being written")
    elsewhere = tmp_path / f".results.json.otherhost.{dead_pid}-jkl.tmp"
    elsewhere.write_text("another machine's")
    atomic_write_json(target, {"ok": True})
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and elsewhere.exists() and json.loads(target.read_text()) == {"ok": True}
    # globs over a run dir skip such hidden leftovers (a stage counted twice, a duplicate plot curve)
    (tmp_path / "conditioned" / ".x.tmp").mkdir(parents=True)
    (tmp_path / "conditioned" / "x").mkdir()
    assert visible(tmp_path.glob("conditioned/*"), tmp_path) == [tmp_path / "conditioned" / "x"]
