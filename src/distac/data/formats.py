"""Standard public formats a user already has: CSV/TSV files, HF ``datasets`` saved to disk,
and image folders (``root/<split>/<class>/*.png``, torchvision ``ImageFolder`` layout).

Images are kept as one uint8 array per split. Real datasets (SUN397, Stanford Cars, DTD...) mix
image sizes; those are brought to one square size the way evaluation transforms do it (shorter side
resized, then a centre crop), at ``size`` or, when none is given, :data:`MIXED_SIZE_DEFAULT`: the
input size of CLIP and ImageNet models, which resize to their own size again anyway.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distac.data.tasks import Split, TaskData, TextPair, carve_validation
from distac.errors import DataError

if TYPE_CHECKING:
    from PIL import Image

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
MIXED_SIZE_DEFAULT = 224
log = logging.getLogger("distac.data")


def stack_images(images: Iterable[object], size: int | None, source: object) -> np.ndarray:
    """RGB uint8 array (N, H, W, 3) of PIL images or arrays, read one at a time. Same-sized images are
    stacked as they are unless ``size`` asks otherwise; mixed sizes go to ``size`` (default
    :data:`MIXED_SIZE_DEFAULT`) by a shorter-side resize and a centre crop, so that no image is
    squashed out of its aspect ratio. Each image is fitted as it arrives (those before the first
    odd-sized one when it does), so full-size photos are never all in memory at once."""
    from PIL import Image

    target, first_size, arrays = size, None, []
    for image in images:
        picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        picture = _to_rgb(picture)
        first_size = first_size or picture.size
        if target is None and picture.size != first_size:
            target = MIXED_SIZE_DEFAULT
            log.info("%s: images of different sizes; fitting them to %d x %d", source, target, target)
            arrays = [np.asarray(_fit_square(Image.fromarray(array), target)) for array in arrays]
        if target is not None:
            picture = _fit_square(picture, target)
        arrays.append(np.asarray(picture, dtype=np.uint8))
    if not arrays:
        raise DataError(f"{source}: no images found")
    return np.stack(arrays)


def _to_rgb(picture: Image.Image) -> Image.Image:
    """8-bit RGB. 16/32-bit grayscale (mode I;16, I) is scaled down to 8 bits first: PIL's own convert
    clips every value above 255 to white, which erased 16-bit PNGs."""
    from PIL import Image

    if picture.mode.startswith("I") or picture.mode == "F":
        values = np.asarray(picture, dtype=np.float64)
        if values.max(initial=0) > 255:
            values = values / 257.0 if values.max() <= 65535 else values / values.max() * 255.0
        picture = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return picture.convert("RGB")  # a loaded copy even when already RGB: the file may be closed next


def _fit_square(picture: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then the centre ``size`` x ``size`` crop."""
    from PIL import Image

    width, height = picture.size
    if (width, height) == (size, size):
        return picture
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    picture = picture.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return picture.crop((left, top, left + size, top + size))


def read_table(
    file: str | Path,
    *,
    text_columns: Sequence[str] = ("text_a", "text_b"),
    label_column: str = "label",
    delimiter: str | None = None,
) -> tuple[list[TextPair], list[str]]:
    """Read text pairs and raw label strings; the second text column is optional."""
    file = Path(file)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    delimiter = delimiter or ("\t" if file.suffix in {".tsv", ".txt"} else ",")
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:  # -sig: a BOM (Excel's CSVs) is no column
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting, strict=True)
            columns = reader.fieldnames or []
            first, *rest = text_columns
            for needed in (first, label_column):
                if needed not in columns:
                    raise DataError(f"{file}: missing column {needed!r} (found columns {columns})")
            if len(set(columns)) != len(columns):
                raise DataError(f"{file}: duplicate column names {columns}")
            second = rest[0] if rest and rest[0] in columns else None
            inputs: list[TextPair] = []
            labels: list[str] = []
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise DataError(f"{file}:{line}: more fields than the {len(columns)} columns {columns}")
                label = (row.get(label_column) or "").strip()
                if label == "":
                    raise DataError(f"{file}:{line}: empty label")
                if _is_negative_integer(label):
                    raise DataError(
                        f"{file}:{line}: label {label!r} is negative (unlabeled examples, e.g. a GLUE test split?)"
                    )
                inputs.append((row[first] or "", (row.get(second) or None) if second else None))
                labels.append(label)
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not a UTF-8 text file: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"{file}: malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{file}: cannot read: {exc}") from exc
    if not inputs:
        raise DataError(f"{file}: no examples")
    return inputs, labels


def _is_negative_integer(label: str) -> bool:
    try:
        return int(label) < 0
    except ValueError:
        return False


def encode_labels(labels: Sequence[str], index: dict[str, int], file: object, classes: Sequence[str]) -> np.ndarray:
    """Class indices of raw label strings; a label outside ``classes`` is an error naming the file."""
    unknown = sorted({v for v in labels if v not in index})
    if unknown:
        raise DataError(
            f"{file}: labels {unknown[:5]} are not among the {len(classes)} classes {list(classes)[:20]} "
            "(classes come from the training split)"
        )
    return np.array([index[v] for v in labels], dtype=np.int64)


def load_table_task(
    name: str,
    train: str | Path,
    test: str | Path,
    validation: str | Path | None = None,
    *,
    text_columns: Sequence[str] = ("text_a", "text_b"),
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> TaskData:
    """A text task from CSV/TSV files; labels may be integers or class names."""
    tr_in, tr_lab = read_table(train, text_columns=text_columns, label_column=label_column)
    te_in, te_lab = read_table(test, text_columns=text_columns, label_column=label_column)
    if class_names is None:
        unique = sorted(set(tr_lab))
        try:
            unique = [str(u) for u in sorted(unique, key=int)]
        except ValueError:
            pass
        class_names = unique
    index = _label_index(class_names, tr_lab, train)
    tr = Split(tr_in, encode_labels(tr_lab, index, train, class_names))
    te = Split(te_in, encode_labels(te_lab, index, test, class_names))
    if validation is not None:
        va_in, va_lab = read_table(validation, text_columns=text_columns, label_column=label_column)
        va = Split(va_in, encode_labels(va_lab, index, validation, class_names))
    else:
        tr, va = carve_validation(tr, 0.1, seed)
    return TaskData(
        name=name, kind="text", class_names=list(class_names), train=tr, validation=va, test=te, source=str(train)
    )


def _label_index(class_names: Sequence[str], labels: Sequence[str], source: object) -> dict[str, int]:
    index = {str(c): i for i, c in enumerate(class_names)}
    if all(v in index for v in labels):
        return index
    try:  # integer labels
        numeric = {str(i): i for i in range(len(class_names))}
        bad = sorted({v for v in labels if v not in numeric})
    except ValueError:
        bad = []
    if bad:
        raise DataError(f"{source}: labels {bad[:5]} are not among the {len(class_names)} classes {list(class_names)}")
    return numeric


def load_hf_dataset(
    path: str | Path,
    name: str | None = None,
    *,
    text_columns: Sequence[str] | None = None,
    image_column: str | None = None,
    label_column: str = "label",
    size: int | None = None,
    seed: int = 0,
) -> TaskData:
    """A ``datasets.DatasetDict`` saved with ``save_to_disk`` (splits train / validation / test);
    images of mixed sizes are fitted to one (:func:`stack_images`)."""
    try:
        from datasets import load_from_disk
    except ImportError as exc:  # pragma: no cover
        raise DataError("reading HF datasets needs the 'datasets' package (pip install distac[data])") from exc
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset directory")
    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a dataset saved with save_to_disk: {exc}") from exc
    if not hasattr(dataset, "keys"):
        raise DataError(f"{path}: expected a DatasetDict with splits, found a single Dataset")
    splits = {k: dataset[k] for k in dataset}
    split_names = {"validation": ("validation", "valid", "dev", "val"), "test": ("test",), "train": ("train",)}
    found = {role: next((splits[s] for s in names if s in splits), None) for role, names in split_names.items()}
    if found["train"] is None or found["test"] is None:
        raise DataError(f"{path}: needs 'train' and 'test' splits, found {sorted(splits)}")
    features = found["train"].features
    if label_column not in features:
        raise DataError(f"{path}: missing label column {label_column!r} (columns {list(features)})")
    label_feature = features[label_column]
    class_names = list(getattr(label_feature, "names", []) or [])
    if image_column is None and text_columns is None:
        image_column = next((c for c in ("image", "img", "pixel_values") if c in features), None)
        if image_column is None:
            # GLUE's pair orders (QNLI is question, sentence; QQP question1, question2), then single texts
            layouts = (
                ("sentence1", "sentence2"),
                ("question", "sentence"),
                ("question1", "question2"),
                ("premise", "hypothesis"),
                ("sentence",),
                ("text",),
                ("question",),
            )
            text_columns = next((list(cols) for cols in layouts if all(c in features for c in cols)), None)
            if not text_columns:
                raise DataError(f"{path}: cannot tell the input columns; pass text_columns or image_column")

    def convert(ds: object) -> Split:
        try:
            labels = np.asarray(ds[label_column], dtype=np.int64)  # type: ignore[index]
        except (TypeError, ValueError, OverflowError) as exc:
            raise DataError(f"{path}: column {label_column!r} must hold integer class labels: {exc}") from exc
        if image_column is not None:
            return Split(stack_images(ds[image_column], size, f"{path} [{image_column}]"), labels)  # type: ignore[index]
        cols = [ds[c] for c in text_columns]  # type: ignore[index,union-attr]
        pairs = (
            [(a, b) for a, b in zip(cols[0], cols[1], strict=True)] if len(cols) > 1 else [(a, None) for a in cols[0]]
        )
        return Split(pairs, labels)

    train, test = convert(found["train"]), convert(found["test"])
    validation = convert(found["validation"]) if found["validation"] is not None else None
    if validation is None:
        train, validation = carve_validation(train, 0.1, seed)
    if not class_names:
        class_names = [str(i) for i in range(int(max(train.labels.max(), test.labels.max())) + 1)]
    return TaskData(
        name=name or path.name,
        kind="image" if image_column else "text",
        class_names=class_names,
        train=train,
        validation=validation,
        test=test,
        metric="mcc" if (name or path.name) == "cola" else "accuracy",  # as the TSV loader: GLUE scores CoLA by MCC
        source=str(path),
    )


def load_image_folder(root: str | Path, name: str | None = None, *, size: int | None = None, seed: int = 0) -> TaskData:
    """``root/train/<class>/*.png`` and ``root/test/<class>/...`` (optional ``val``), or a flat
    ``root/<class>/...`` that is split 70/10/20 with a fixed seed. Images of mixed sizes are fitted
    to one (:func:`stack_images`); pass ``size`` to choose it, or to shrink large photos as they load."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")

    def read_split(directory: Path, classes: list[str] | None, size: int | None) -> tuple[Split, list[str]]:
        # hidden folders (.ipynb_checkpoints, .DS_Store's kin) are no class: they shifted every label by one
        class_dirs = sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))
        names = classes or [d.name for d in class_dirs]
        unknown = [d.name for d in class_dirs if d.name not in names]
        if unknown:
            raise DataError(f"{directory}: class folders {unknown} do not appear in the training split")
        per_class = {d: [f for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES] for d in class_dirs}
        empty = [d.name for d, found in per_class.items() if not found]
        if empty and classes is None:  # a class of the training split without images is no class
            raise DataError(
                f"{directory}: class folder(s) {empty} hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        files = [(file, names.index(d.name)) for d, found in per_class.items() for file in found]

        def read(file: Path) -> Image.Image:
            try:
                with Image.open(file) as opened:
                    return _to_rgb(opened)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"{file}: not a readable image: {exc}") from exc

        images = stack_images((read(file) for file, _ in files), size, directory)
        return Split(images, np.array([label for _, label in files], dtype=np.int64)), names

    def read_all(size: int | None) -> tuple[Split, Split, Split, list[str]]:
        if (root / "train").is_dir():
            train, classes = read_split(root / "train", None, size)
            if not (root / "test").is_dir():
                raise DataError(f"{root}: has train/ but no test/ folder")
            test, _ = read_split(root / "test", classes, size)
            val_dir = next((root / v for v in ("val", "validation", "valid") if (root / v).is_dir()), None)
            if val_dir is not None:
                validation, _ = read_split(val_dir, classes, size)
            else:
                train, validation = carve_validation(train, 0.1, seed)
        else:
            everything, classes = read_split(root, None, size)
            rest, test = carve_validation(everything, 0.2, seed)
            train, validation = carve_validation(rest, 0.125, seed + 1)
        return train, validation, test, classes

    train, validation, test, classes = read_all(size)
    shapes = {split.inputs.shape[1:3] for split in (train, validation, test)}
    if size is None and len(shapes) > 1:  # each split uniform, but not alike: preprocess all splits the same way
        log.info(
            "%s: splits of different image sizes %s; fitting them all to %d", root, sorted(shapes), MIXED_SIZE_DEFAULT
        )
        train, validation, test, classes = read_all(MIXED_SIZE_DEFAULT)
    return TaskData(
        name=name or root.name,
        kind="image",
        class_names=classes,
        train=train,
        validation=validation,
        test=test,
        source=str(root),
    )
