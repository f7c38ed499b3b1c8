"""Datasets: real tasks with train / validation / test splits, from the shared data or standard formats."""

from pathlib import Path
from typing import Any, NamedTuple

from distac.data.formats import load_hf_dataset, load_image_folder, load_table_task, read_table
from distac.data.shared import available_tasks, canonical_task, default_data_root, load_shared_task
from distac.data.tasks import Split, TaskData, carve_validation
from distac.errors import DataError


def load_task(
    name_or_path: str, data_root: str | Path | None = None, recorded_path: str | Path | None = None
) -> TaskData:
    """One entry point: a task name, or a path to a dataset in a known format (HF ``save_to_disk``
    directory, image folder, directory with ``train.tsv``/``test.tsv`` or ``train.csv``, ``.npz``).

    A bare name is looked up in the data root (``data_root``, ``$DISTAC_DATA`` or ``../shared/data``):
    first in the shared data's layout (``text/<name>/``, ``vision/<file>.npz``), then as a dataset of
    its own, ``<root>/<name>`` or ``<root>/<name>.npz`` in any known format. The second is how a
    user's datasets are named after the tasks of an experiment config (``clip-vit-b32``'s ``sun397``,
    ``mnist``...). A bare name of a task the shared data defines always means that task, even when
    the working directory holds a folder of the same name (``distac finetune --task sst2 -o sst2``
    makes one): a model's task would otherwise resolve to its own output folder. Write ``./sst2``
    for such a folder.

    ``recorded_path`` is where a model's task data was when it was fine-tuned on a dataset of its own
    (``ModelSpec.task_source``; see :func:`load_model_task`): a bare name the data root does not hold
    is read from there, so such a model is scored next to models of the shared tasks without a
    ``--data-root`` that would hide the shared data. The data root still comes first."""
    where = _locate(name_or_path, data_root, recorded_path)
    if where.own is not None:
        return _load_path(where.own, where.name)
    try:
        return load_shared_task(where.name, where.root)  # its error names the missing shared file or the known tasks
    except DataError as error:
        if where.shared:
            raise
        root, name = where.root, where.name
        gone = f"; the model's own dataset {recorded_path} is gone too" if recorded_path else ""
        raise DataError(
            f"{error} (nor is there a dataset {root / name} or {root / name}.npz{gone}). Give --data-root DIR "
            f"holding {name}/ or {name}.npz, or the dataset's path (--task PATH where the command takes one); "
            "a model fine-tuned on a dataset path records it and finds it there while it exists"
        ) from None


def task_dataset_path(name_or_path: str, data_root: str | Path | None = None) -> Path | None:
    """The dataset of the user's own (absolute path) that :func:`load_task` reads ``name_or_path`` from:
    the path itself, or for a bare name ``<root>/<name>[.npz]`` of the data root; None for a task in the
    shared data's layout (sst2, mnist...). ``distac finetune`` records this path with the model
    (``ModelSpec.task_source``) so later commands find the data without that ``--data-root``. A path
    that does not exist and has a directory part is a DataError, as in :func:`load_task`."""
    own = _locate(name_or_path, data_root).own
    return own.resolve() if own is not None else None


def load_model_task(spec: Any, data_root: str | Path | None = None, default: str | None = None) -> TaskData:
    """The task a model was trained on, for the commands that score, diagnose, condition or merge it:
    ``spec.task`` (else ``default``, e.g. the model's folder name) looked up as :func:`load_task` does,
    falling back to the dataset path recorded at fine-tuning (``spec.task_source``) when the data root
    has no such task. ``spec`` is a :class:`~distac.models.ModelSpec`."""
    name = getattr(spec, "task", None) or default
    if not name:
        raise DataError("the model names no task (its distac_model.json has no 'task'): give the task")
    return load_task(name, data_root, recorded_path=getattr(spec, "task_source", None))


class _Location(NamedTuple):
    """Where :func:`load_task` reads a task: a dataset of the user's own at ``own``, else the shared data's
    layout under ``root`` (``shared``: its files are there; if not, loading it raises the error that
    names what is missing)."""

    name: str
    own: Path | None
    root: Path | None
    shared: bool


def _locate(
    name_or_path: str | Path, data_root: str | Path | None, recorded_path: str | Path | None = None
) -> _Location:
    """The one resolver behind :func:`load_task` and :func:`task_dataset_path`. A path that exists is the
    dataset (unless it is the bare name of a shared task); a bare name is the shared data's task if its
    files are in the data root, else ``<root>/<name>[.npz]``, else the model's ``recorded_path`` (its
    dataset when it was fine-tuned) while that exists."""
    from distac.data.shared import shared_task_present

    name = str(name_or_path)
    path = Path(name)
    bare = path.name == name and name not in (".", "..")
    if not (bare and _is_known_task_name(name)) and path.exists():
        return _Location(path.stem if path.suffix == ".npz" else path.name, path, None, False)
    if not bare:
        raise DataError(f"{path}: no such dataset file or directory")
    recorded = Path(recorded_path) if recorded_path else None
    recorded = recorded if recorded is not None and recorded.exists() else None
    try:
        root = Path(data_root) if data_root else default_data_root()
    except DataError:  # no shared data at all: a model's own dataset needs none
        if recorded is not None:
            return _Location(name, recorded, None, False)
        raise
    if shared_task_present(name, root):
        return _Location(name, None, root, True)
    return _Location(name, _own_dataset(name, root) or recorded, root, False)


def _own_dataset(name: str, root: Path) -> Path | None:
    """A user's dataset named after task ``name`` in the data root: ``<root>/<name>[.npz]``."""
    for candidate in (root / name, root / f"{name}.npz", root / canonical_task(name)):
        if candidate.exists():
            return candidate
    return None


def _load_path(path: Path, name: str) -> TaskData:
    """A dataset at ``path`` in whichever known format it is, named ``name``."""
    if path.suffix == ".npz":
        from distac.data.shared import load_vision_npz

        return load_vision_npz(path, name)
    if (path / "dataset_dict.json").is_file():
        return load_hf_dataset(path, name)
    if (path / "train.tsv").is_file():
        from distac.data.shared import load_text_task_dir

        return load_text_task_dir(path, name)
    if (path / "train.csv").is_file():
        validation = next((path / f for f in ("validation.csv", "dev.csv", "val.csv") if (path / f).is_file()), None)
        return load_table_task(name, path / "train.csv", path / "test.csv", validation)
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        raise DataError(
            f"{path}: a single Hugging Face Dataset (save_to_disk of one split); distac needs a DatasetDict with "
            "train and test splits (DatasetDict({'train': ..., 'test': ...}).save_to_disk(...))"
        )
    if any(path.glob("train.json*")):
        raise DataError(f"{path}: JSON/JSONL files are not a supported format; use train.tsv / train.csv + test.*")
    if path.is_dir():
        return load_image_folder(path, name)
    raise DataError(f"{path}: unknown dataset format")


def _is_known_task_name(name: str) -> bool:
    """A bare task name (no directory part) that the shared data defines."""
    from distac.data.shared import TEXT_TASKS, VISION_TASKS

    return canonical_task(name) in {*TEXT_TASKS, *VISION_TASKS}


__all__ = [
    "DataError",
    "Split",
    "TaskData",
    "available_tasks",
    "canonical_task",
    "carve_validation",
    "default_data_root",
    "load_hf_dataset",
    "load_image_folder",
    "load_model_task",
    "load_shared_task",
    "load_table_task",
    "load_task",
    "read_table",
    "task_dataset_path",
]
