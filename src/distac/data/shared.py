"""Loaders for the real datasets in ``../shared/data`` (text TSVs and vision npz files).

Text: ``text/<task>/{train,test}.tsv`` with columns ``text_a``, ``text_b``, ``label``; the test
file is the official dev/test split, validation is carved from train (10 %, seed 0).
Vision: ``vision/<name>.npz`` with ``x_<split>``/``y_<split>`` (or MedMNIST-style
``<split>_images``/``<split>_labels``); GTSRB validation is split by track of 30 frames; Flowers
has no official split and is split 70/10/20 with a fixed seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distac.data.formats import encode_labels, read_table
from distac.data.tasks import Split, TaskData, carve_validation
from distac.errors import DataError

VALIDATION_FRACTION = 0.1
SPLIT_SEED = 0

TEXT_TASKS = (
    "sst2",
    "cola",
    "mrpc",
    "rte",
    "qnli_from_dev",
    "snli_small",
    "agnews_small",
    "trec",
    "sick_e",
    "subj",
    "mr",
    "cr",
    "mpqa",
    "sst5",
    "amazon_books",
    "amazon_dvd",
    "amazon_electronics",
    "amazon_kitchen",
    "amazon_airline",
)
VISION_TASKS = {
    "mnist": "mnist.npz",
    "cifar10": "cifar10_1k.npz",
    "gtsrb": "gtsrb32_300.npz",
    "flowers5": "flowers5_64.npz",
    "pneumoniamnist": "pneumoniamnist_v.npz",
}
#: Readable names used in tables and in CLIP prompts.
TASK_ALIASES = {
    "qnli": "qnli_from_dev",
    "snli": "snli_small",
    "agnews": "agnews_small",
    "ag_news": "agnews_small",
    "trec6": "trec",
    "flowers": "flowers5",
    "pneumonia": "pneumoniamnist",
}
TEXT_CLASS_NAMES = {
    "sst2": ["negative", "positive"],
    "cola": ["unacceptable", "acceptable"],
    "mrpc": ["not_equivalent", "equivalent"],
    "rte": ["entailment", "not_entailment"],
    "agnews_small": ["world", "sports", "business", "sci/tech"],
}
GTSRB_TRACK = 30


def default_data_root() -> Path:
    """``$DISTAC_DATA`` or ``../shared/data`` next to the working directory / the repository."""
    env = os.environ.get("DISTAC_DATA")
    if env:
        return Path(env)
    candidates = [
        Path.cwd() / "../shared/data",
        Path(__file__).resolve().parents[3] / "../shared/data",
        Path.cwd() / "shared/data",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise DataError("cannot find the shared data directory: set DISTAC_DATA or pass --data-root")


def canonical_task(name: str) -> str:
    return TASK_ALIASES.get(name, name)


def available_tasks(root: str | Path | None = None) -> dict[str, str]:
    """Task name -> where it lives: ``text`` / ``image`` for the shared data's tasks, ``dataset`` for a
    user's dataset named after its task (``<root>/<name>`` or ``<root>/<name>.npz``, see ``load_task``)."""
    root = Path(root) if root else default_data_root()
    out = {t: "text" for t in TEXT_TASKS if shared_task_present(t, root)}
    # other folders of the text layout (the shared data's stsb): listed so that ``distac tasks`` says why
    # one is unusable (STS-B's scores are continuous) instead of leaving it out without a word
    text_dir = root / "text"
    for entry in sorted(text_dir.iterdir()) if text_dir.is_dir() else []:
        if entry.is_dir() and not entry.name.startswith(".") and (entry / "train.tsv").is_file():
            out.setdefault(entry.name, "text")
    out.update({t: "image" for t in VISION_TASKS if shared_task_present(t, root)})
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        name = entry.stem if entry.suffix == ".npz" else entry.name
        own = entry.suffix == ".npz" or (entry.is_dir() and entry.name not in ("text", "vision"))
        if own and not name.startswith(".") and name not in out:
            out[name] = "dataset"
    return out


def shared_task_present(name: str, root: Path) -> bool:
    """Whether ``root`` holds task ``name`` in the shared data's own layout."""
    name = canonical_task(name)
    if name in VISION_TASKS:
        return (root / "vision" / VISION_TASKS[name]).is_file()
    return (root / "text" / name / "train.tsv").is_file()


def load_shared_task(name: str, root: str | Path | None = None) -> TaskData:
    name = canonical_task(name)
    root = Path(root) if root else default_data_root()
    if name in VISION_TASKS:
        return load_vision_npz(root / "vision" / VISION_TASKS[name], name)
    if name in TEXT_TASKS or (root / "text" / name).is_dir():
        return load_text_task_dir(root / "text" / name, name)
    raise DataError(f"unknown task {name!r}; known: {sorted(set(TEXT_TASKS) | set(VISION_TASKS))}")


def _label_order(values: list[str]) -> list[str]:
    unique = sorted(set(values))
    try:
        return [str(v) for v in sorted(unique, key=lambda v: int(v))]
    except ValueError:
        return unique


def load_text_task_dir(directory: Path, name: str) -> TaskData:
    """``train.tsv`` (+ optional ``validation.tsv``/``dev.tsv``) and ``test.tsv``."""
    train_file, test_file = directory / "train.tsv", directory / "test.tsv"
    for file in (train_file, test_file):
        if not file.is_file():
            raise DataError(f"{file}: missing (task {name!r})")
    train_in, train_lab = read_table(train_file, text_columns=("text_a", "text_b"), label_column="label")
    test_in, test_lab = read_table(test_file, text_columns=("text_a", "text_b"), label_column="label")
    if any(not _is_class_label(v) for v in train_lab):
        raise DataError(f"{train_file}: labels look continuous (regression task?); distac needs class labels")
    label_names = _label_order(list(train_lab))
    index = {v: i for i, v in enumerate(label_names)}
    train = Split(train_in, encode_labels(train_lab, index, train_file, label_names))
    test = Split(test_in, encode_labels(test_lab, index, test_file, label_names))
    val_file = next((directory / f for f in ("validation.tsv", "dev.tsv") if (directory / f).is_file()), None)
    if val_file is not None:
        val_in, val_lab = read_table(val_file, text_columns=("text_a", "text_b"), label_column="label")
        validation = Split(val_in, encode_labels(val_lab, index, val_file, label_names))
    else:
        if len(train) < 2:
            raise DataError(f"{train_file}: {len(train)} example(s); at least 2 are needed to carve a validation split")
        train, validation = carve_validation(train, VALIDATION_FRACTION, SPLIT_SEED)
    # the built-in names describe the integer labels of the shared files; a dataset whose labels are words
    # names its own classes (its "acceptable" need not be class 1)
    integer_labels = all(_is_integer(v) for v in label_names)
    known = TEXT_CLASS_NAMES.get(name, [])
    class_names = known if integer_labels and len(known) == len(label_names) else None
    return TaskData(
        name=name,
        kind="text",
        class_names=class_names or label_names,
        train=train,
        validation=validation,
        test=test,
        metric="mcc" if name == "cola" else "accuracy",
        source=str(directory),
    )


def _is_integer(value: str) -> bool:
    try:
        int(value)
    except ValueError:
        return False
    return True


def _is_class_label(value: str) -> bool:
    try:
        return float(value).is_integer()
    except ValueError:
        return True


def load_vision_npz(file: Path, name: str) -> TaskData:
    if not file.is_file():
        raise DataError(f"{file}: missing (task {name!r})")
    try:
        archive = np.load(file, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{file}: not an npz archive (a single .npy array?)")
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile/numpy raise many types on a corrupt archive
        raise DataError(f"{file}: not a readable npz archive: {type(exc).__name__}: {exc}") from exc

    def get(split: str) -> Split | None:
        for x_key, y_key in ((f"x_{split}", f"y_{split}"), (f"{split}_images", f"{split}_labels")):
            if x_key in arrays and y_key in arrays:
                x, y = arrays[x_key], arrays[y_key].reshape(-1)
                if x.dtype != np.uint8:
                    raise DataError(f"{file}: {x_key} must be uint8 images, found {x.dtype}")
                if x.ndim not in (3, 4):
                    raise DataError(f"{file}: {x_key} must be images (N, H, W[, C]), found shape {x.shape}")
                if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):  # channels first (torch)
                    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
                if len(x) != len(y):
                    raise DataError(f"{file}: {x_key} has {len(x)} images but {y_key} has {len(y)} labels")
                if len(y) == 0:
                    raise DataError(f"{file}: {x_key}/{y_key} are empty")
                if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
                    y = y.astype(np.int64)
                if y.dtype.kind not in "iu":
                    raise DataError(f"{file}: {y_key} must hold integer class labels, found dtype {y.dtype}")
                return Split(x, y.astype(np.int64))
        return None

    train, test = get("train"), get("test")
    validation = next((found for found in map(get, ("val", "validation", "valid")) if found is not None), None)
    info: dict[str, object] = {}
    if train is None and (everything := get("all")) is not None:
        if len(everything) < 10:
            raise DataError(f"{file}: only {len(everything)} examples in x_all; too few for a 70/10/20 split")
        rest, test = carve_validation(everything, 0.2, SPLIT_SEED)
        train, validation = carve_validation(rest, 0.125, SPLIT_SEED + 1)
        info["split"] = "seeded 70/10/20 split of x_all"
    if train is None or test is None:
        raise DataError(
            f"{file}: expected keys x_train/y_train and x_test/y_test (or x_all/y_all), found {sorted(arrays)}"
        )
    if validation is None:
        if len(train) < 2:
            raise DataError(f"{file}: {len(train)} training example(s); a validation split needs at least 2")
        groups = None
        if name == "gtsrb":
            groups = _gtsrb_tracks(train.labels)
            info["validation"] = "whole tracks of 30 frames held out"
        train, validation = carve_validation(train, VALIDATION_FRACTION, SPLIT_SEED, groups)
    n_classes = int(max(train.labels.max(), test.labels.max(), validation.labels.max())) + 1
    if "classes" in arrays:
        if arrays["classes"].ndim != 1 or len(arrays["classes"]) == 0:
            raise DataError(f"{file}: 'classes' must be a non-empty 1-D array of names")
        class_names = [c.decode() if isinstance(c, bytes) else str(c) for c in arrays["classes"].tolist()]
    else:
        class_names = {"pneumoniamnist": ["normal", "pneumonia"]}.get(name, [str(i) for i in range(n_classes)])
    if name == "gtsrb" and class_names[0] == "0":
        class_names = [f"traffic sign {c}" for c in class_names]
    return TaskData(
        name=name,
        kind="image",
        class_names=class_names,
        train=train,
        validation=validation,
        test=test,
        metric="accuracy",
        source=str(file),
        info=info,
    )


def _gtsrb_tracks(labels: np.ndarray) -> np.ndarray:
    """Frames of one physical sign are stored consecutively per class in runs of 30."""
    groups = np.zeros(len(labels), dtype=np.int64)
    position: dict[int, int] = {}
    for i, label in enumerate(labels.tolist()):
        k = position.get(label, 0)
        groups[i] = label * 10_000 + k // GTSRB_TRACK
        position[label] = k + 1
    return groups
