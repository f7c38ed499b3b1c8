"""Users' own datasets, as a data audit found them: folders with hidden or empty class folders, TIFF and
16-bit PNG images, splits of different image sizes, channel-first or byte-named npz archives, Excel CSVs,
word labels under a GLUE task's name, and a model scored on data with other classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distac.data import load_task
from distac.errors import DataError


def _image_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (20, 20), suffix: str = ".png") -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, value in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = np.clip(value + rng.integers(0, 10, (*size[::-1], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}{suffix}")


def test_hidden_folders_are_no_class_and_an_empty_class_is_an_error(tmp_path: Path) -> None:
    _image_folder(tmp_path / "a", {"cat": 40, "dog": 200})
    (tmp_path / "a" / "train" / ".ipynb_checkpoints").mkdir()  # used to become class 0, shifting every label
    task = load_task(str(tmp_path / "a"))
    assert task.class_names == ["cat", "dog"]
    (tmp_path / "a" / "train" / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folder\(s\) \['bird'\] hold no images"):
        load_task(str(tmp_path / "a"))


def test_tiff_and_16_bit_images_load_with_their_content(tmp_path: Path) -> None:
    _image_folder(tmp_path / "tiff", {"dark": 20, "light": 220}, suffix=".tiff")  # used to be skipped silently
    assert len(load_task(str(tmp_path / "tiff")).train) + len(load_task(str(tmp_path / "tiff")).validation) == 8
    root = tmp_path / "deep"
    for split in ("train", "test"):
        for name, value in (("dark", 5_000), ("light", 60_000)):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(root / split / name / f"{i}.png")
    task = load_task(str(root))
    dark = task.test.inputs[task.test.labels == 0]
    light = task.test.inputs[task.test.labels == 1]
    assert dark.max() < 30 and light.min() > 220  # PIL's convert clipped both to 255


def test_splits_of_different_uniform_sizes_are_fitted_alike(tmp_path: Path) -> None:
    root = tmp_path / "sizes"
    _image_folder(root, {"a": 30, "b": 200}, size=(64, 32))
    for folder in (root / "test").iterdir():  # test photos of another (uniform) size
        for file in folder.iterdir():
            Image.open(file).resize((40, 40)).save(file)
    task = load_task(str(root))
    assert task.train.inputs.shape[1:] == task.test.inputs.shape[1:] == (224, 224, 3)


def test_npz_channel_first_bytes_names_validation_and_one_class(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (12, 3, 10, 10), dtype=np.uint8)  # (N, C, H, W), as torch keeps images
    y = np.arange(12) % 2
    np.savez(
        tmp_path / "chw.npz",
        x_train=x,
        y_train=y,
        x_test=x[:4],
        y_test=y[:4],
        x_validation=x[:2],
        y_validation=y[:2],
        classes=np.array([b"cat", b"dog"]),
    )
    task = load_task(str(tmp_path / "chw.npz"))
    assert task.train.inputs.shape == (12, 10, 10, 3) and task.class_names == ["cat", "dog"]
    assert len(task.validation) == 2 and len(task.train) == 12  # the archive's own validation split is used
    np.savez(tmp_path / "one.npz", x_train=x, y_train=np.zeros(12, int), x_test=x[:4], y_test=np.zeros(4, int))
    with pytest.raises(DataError, match="1 class .* needs at least 2"):
        load_task(str(tmp_path / "one.npz"))


def test_text_files_bom_word_labels_and_late_continuous_labels(tmp_path: Path) -> None:
    excel = tmp_path / "excel"
    excel.mkdir()
    for split in ("train", "test"):
        rows = "".join(f"sentence {i},{'pos' if i % 2 else 'neg'}\n" for i in range(12))
        (excel / f"{split}.csv").write_text("\ufefftext_a,label\n" + rows, encoding="utf-8")
    assert load_task(str(excel)).class_names == ["neg", "pos"]
    # a user's cola with word labels keeps its own names: the built-in ones follow the shared files' integers
    cola = tmp_path / "cola"
    cola.mkdir()
    for split in ("train", "test"):
        rows = "".join(f"sentence {i}\t{'acceptable' if i % 3 else 'unacceptable'}\n" for i in range(12))
        (cola / f"{split}.tsv").write_text("text_a\tlabel\n" + rows, encoding="utf-8")
    task = load_task(str(cola))
    assert task.class_names == ["acceptable", "unacceptable"]
    named = {text: task.class_names[label] for (text, _), label in zip(task.test.inputs, task.test.labels, strict=True)}
    assert named["sentence 1"] == "acceptable" and named["sentence 0"] == "unacceptable"
    late = tmp_path / "late"
    late.mkdir()
    rows = "".join(f"s {i}\t{i % 2 if i < 60 else 0.37}\n" for i in range(70))
    (late / "train.tsv").write_text("text_a\tlabel\n" + rows, encoding="utf-8")
    (late / "test.tsv").write_text("text_a\tlabel\ns\t0\ns\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match="continuous"):
        load_task(str(late))


def test_a_model_is_not_scored_on_data_with_other_classes(tiny_bert_dir: Path, data_root: Path) -> None:
    from distac.models import ModelSpec, build_model

    sst2 = load_task("sst2", data_root)
    spec = ModelSpec("hf-text", str(tiny_bert_dir), 2, task="sst2", class_names=list(reversed(sst2.class_names)))
    with pytest.raises(DataError, match="in another order"):
        build_model(spec).check_task(sst2)
    other = ModelSpec("hf-text", str(tiny_bert_dir), 2, task="sst2", class_names=["neg", "pos"])
    with pytest.raises(DataError, match="with other names"):
        build_model(other).check_task(sst2)


def test_hf_text_pairs_keep_glue_order_and_cola_is_scored_by_mcc(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
        }
    )
    rows = {"question": [f"q{i}" for i in range(20)], "sentence": [f"s{i}" for i in range(20)], "label": [0, 1] * 10}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "qnli"))
    assert load_task(str(tmp_path / "qnli")).test.inputs[0] == ("q0", "s0")  # was (sentence, question)
    single = {"sentence": [f"s{i}" for i in range(20)], "label": [0, 1] * 10}
    cola = datasets.Dataset.from_dict(single)
    datasets.DatasetDict({"train": cola, "test": cola}).save_to_disk(str(tmp_path / "cola"))
    assert load_task(str(tmp_path / "cola")).metric == "mcc"
