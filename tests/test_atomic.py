"""Atomic outputs: complete or absent, never half-written, and readable like any other file."""

from __future__ import annotations

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


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "out.txt", "old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"not serialisable": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
