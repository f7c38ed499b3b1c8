"""Datasets: real tasks with train / validation / test splits, from the shared data or standard formats."""

from pathlib import Path

from distac.data.formats import load_hf_dataset, load_image_folder, load_table_task, read_table
from distac.data.shared import available_tasks, canonical_task, default_data_root, load_shared_task
from distac.data.tasks import Split, TaskData, carve_validation
from distac.errors import DataError


def load_task(name_or_path: str, data_root: str | Path | None = None) -> TaskData:
    """One entry point: a task name, or a path to a dataset in a known format (HF ``save_to_disk``
    directory, image folder, directory with ``train.tsv``/``test.tsv`` or ``train.csv``, ``.npz``).

    A bare name is looked up in the data root (``data_root``, ``$DISTAC_DATA`` or ``../shared/data``):
    first in the shared data's layout (``text/<name>/``, ``vision/<file>.npz``), then as a dataset of
    its own, ``<root>/<name>`` or ``<root>/<name>.npz`` in any known format. The second is how a
    user's datasets are named after the tasks of an experiment config (``clip-vit-b32``'s ``sun397``,
    ``mnist``...). A bare name of a task the shared data defines always means that task, even when
    the working directory holds a folder of the same name (``distac finetune --task sst2 -o sst2``
    makes one): a model's task would otherwise resolve to its own output folder. Write ``./sst2``
    for such a folder."""
    name = str(name_or_path)
    path = Path(name)
    bare = path.name == name and name not in (".", "..")
    if bare and _is_known_task_name(name):
        return _load_named(name, data_root)
    if path.exists():
        return _load_path(path, path.stem if path.suffix == ".npz" else path.name)
    if bare:
        return _load_named(name, data_root)
    raise DataError(f"{path}: no such dataset file or directory")


def _load_named(name: str, data_root: str | Path | None) -> TaskData:
    """The shared data's task ``name`` if its files are there, else ``<root>/<name>[.npz]``."""
    from distac.data.shared import shared_task_present

    root = Path(data_root) if data_root else default_data_root()
    if shared_task_present(name, root):
        return load_shared_task(name, root)
    for candidate in (root / name, root / f"{name}.npz", root / canonical_task(name)):
        if candidate.exists():
            return _load_path(candidate, name)
    try:
        return load_shared_task(name, root)  # its error names the missing shared file or the known tasks
    except DataError as error:
        raise DataError(f"{error} (nor is there a dataset {root / name} or {root / name}.npz)") from None


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
    "load_shared_task",
    "load_table_task",
    "load_task",
    "read_table",
]
