"""Datasets: real tasks with train / validation / test splits, from the shared data or standard formats."""

from pathlib import Path

from distac.data.formats import load_hf_dataset, load_image_folder, load_table_task, read_table
from distac.data.shared import available_tasks, canonical_task, default_data_root, load_shared_task
from distac.data.tasks import Split, TaskData, carve_validation
from distac.errors import DataError


def load_task(name_or_path: str, data_root: str | Path | None = None) -> TaskData:
    """One entry point: a task name from the shared data, or a path to a dataset in a known format
    (HF ``save_to_disk`` directory, image folder, directory with ``train.tsv``/``test.tsv``, ``.npz``).

    A bare name of a known task (``sst2``, ``mnist``...) always means that task, even when the working
    directory holds a folder of the same name (``distac finetune --task sst2 -o sst2`` makes one): a
    model's task would otherwise resolve to its own output folder. Write ``./sst2`` for such a folder."""
    path = Path(name_or_path)
    if _is_known_task_name(str(name_or_path)):
        return load_shared_task(str(name_or_path), data_root)
    if path.exists():
        if path.suffix == ".npz":
            from distac.data.shared import load_vision_npz

            return load_vision_npz(path, path.stem)
        if (path / "dataset_dict.json").is_file():
            return load_hf_dataset(path)
        if (path / "train.tsv").is_file():
            from distac.data.shared import load_text_task_dir

            return load_text_task_dir(path, path.name)
        if (path / "train.csv").is_file():
            return load_table_task(
                path.name,
                path / "train.csv",
                path / "test.csv",
                path / "validation.csv" if (path / "validation.csv").is_file() else None,
            )
        if path.is_dir():
            return load_image_folder(path)
        raise DataError(f"{path}: unknown dataset format")
    return load_shared_task(name_or_path, data_root)


def _is_known_task_name(name: str) -> bool:
    """A bare task name (no directory part) that the shared data defines."""
    from distac.data.shared import TEXT_TASKS, VISION_TASKS, canonical_task

    return Path(name).name == name and name not in (".", "..") and canonical_task(name) in {*TEXT_TASKS, *VISION_TASKS}


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
