"""Atomic output: write to a temporary sibling, fsync, then ``os.replace``.

An interrupted run therefore never leaves a half-written checkpoint or report behind:
either the old file is still there or the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except RuntimeError as error:  # torch.save on a full disk: "unexpected pos ..." says nothing useful
            if _nearly_full(target.parent):
                raise OSError(errno.ENOSPC, "no space left on the device", str(target)) from error
            raise
        # mkstemp makes 0600, and some writers (safetensors' save_file) recreate the file 0600 themselves:
        # set the mode a plain open() would give after the writer is done.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(target: str | os.PathLike[str], text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def json_text(payload: Any, indent: int | None = 2) -> str:
    """Strict JSON for ``payload``: NaN and infinities (an undefined normalized score, the spread of one
    seed) become ``null``. Python's json would write bare ``NaN``, which jq, JavaScript and most other
    readers reject."""
    return json.dumps(_finite(payload), indent=indent, sort_keys=False, allow_nan=False)


def _finite(value: Any) -> Any:
    """``value`` as plain JSON types (through :func:`_json_default`), non-finite floats as None."""
    if value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return _finite(_json_default(value))


def atomic_write_json(target: str | os.PathLike[str], payload: Any) -> Path:
    return atomic_write_text(target, json_text(payload) + "\n")


def atomic_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Copy ``source`` onto ``target`` atomically: a full disk leaves the old file, never a cut-off one."""
    return atomic_write_with(target, lambda tmp: shutil.copyfile(source, tmp))


def atomic_write_with(target: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result onto ``target``."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


#: Written into every directory :func:`atomic_directory` builds: the sign that distac may replace it.
OUTPUT_MARKER = ".distac_output"
#: Files that mark a directory written by distac before the marker existed (model spec, merge record).
_LEGACY_OUTPUT_FILES = ("distac_model.json", "merge.json", "diagnosis.json", "evaluation.json")


def is_replaceable_output(directory: Path) -> bool:
    """Whether an existing directory may be swapped for a new output: it is empty, or distac wrote it
    (its marker, or a model spec, merge record or report of a version before the marker, at the top or one
    level down, for per-task merges)."""
    entries = list(directory.iterdir())
    if not entries or (directory / OUTPUT_MARKER).is_file():
        return True
    tops = [directory, *(entry for entry in entries if entry.is_dir())]
    return any((top / name).is_file() for top in tops for name in _LEGACY_OUTPUT_FILES)


def replacement_problem(target: Path) -> str | None:
    """Why ``target`` must not be replaced by an output directory, or None if it may be."""
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "is the working directory or contains it"
    if not target.exists():
        return None
    if not target.is_dir():
        return "exists and is not a directory"
    if not is_replaceable_output(target):
        names = sorted(entry.name for entry in target.iterdir())
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return f"exists and holds files distac did not write ({shown})"
    return None


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a whole output directory in a temporary sibling, then swap it into place.

    If ``target`` exists it is replaced only after the new directory is complete, and only if it is
    empty or an earlier distac output: a user's own directory is never deleted (FileExistsError).
    Replacing takes two renames (old aside to ``.<name>.old``, new into place); a crash between them
    leaves the old output aside, and the next call for the same target puts it back first.
    """
    target = Path(target)
    backup = target.with_name(f".{target.name}.old")
    if backup.is_dir() and not target.exists():  # an earlier swap was interrupted: restore the old output
        os.replace(backup, target)
    problem = replacement_problem(target)
    if problem:
        raise FileExistsError(f"{target}: {problem}; refusing to replace it. Choose another output")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; as os.mkdir would
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by distac; it may replace this directory\n", encoding="utf-8")
        if target.exists():
            if backup.exists():
                shutil.rmtree(backup)
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _temporary_prefix(target: Path) -> str:
    """``.<name>.<host>.<pid>-``: a temporary a killed process leaves behind can be told from a live one."""
    return f".{target.name}.{_HOST}.{os.getpid()}-"


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the temporaries of ``target`` (files or directories) whose writer on this machine is gone:
    a SIGKILL between writing and renaming leaves them, and a killed conditioning run left 87 MB each
    time. Temporaries of live processes, of other machines and of older distac versions are kept."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.{_HOST}\.(\d+)-.*\.tmp$")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True


@contextlib.contextmanager
def exclusive(target: str | os.PathLike[str], waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an inter-process lock on ``target`` while making it.

    Two runs on one run directory (``--scenario mixup`` and ``--scenario focal`` in two terminals) share
    stages such as the normal sources: without a lock both make them, and the later one overwrites the
    other's. The caller checks its cache again once it holds the lock, so the second run waits and then
    reuses what the first made. The lock is a hidden ``.<name>.lock`` file beside ``target`` (``visible``
    leaves it out); the kernel releases it when its process dies, so a killed run never leaves it held.
    ``waiting`` is told (once) when another process holds it.
    """
    import filelock

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        if waiting is not None:
            waiting(f"waiting for another run that is making {target}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _nearly_full(directory: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def _umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def visible(paths: Iterable[Path], root: Path) -> list[Path]:
    """``paths`` minus those under a hidden name below ``root``: a glob's ``*`` matches the temporaries
    (``.<name>.*.tmp``) and set-aside outputs (``.<name>.old``) of interrupted writes, which are no stage."""
    return [p for p in paths if not any(part.startswith(".") for part in p.relative_to(root).parts)]
