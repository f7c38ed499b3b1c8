"""Real data loaders over ../shared/data, standard formats, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distac.data import load_hf_dataset, load_image_folder, load_table_task, load_task
from distac.errors import DataError


@pytest.mark.parametrize("task", ["sst2", "cola", "mrpc", "rte", "qnli_from_dev", "snli_small", "agnews_small", "trec"])
def test_text_tasks_match_the_shared_summary(task: str, data_root: Path) -> None:
    summary = json.loads((data_root / "text" / "SUMMARY.json").read_text())[task]
    data = load_task(task, data_root)
    assert len(data.train) + len(data.validation) == summary["train"]
    assert len(data.test) == summary["test"]
    assert data.num_classes == summary["n_labels"]
    assert data.metric == ("mcc" if task == "cola" else "accuracy")
    # validation is carved from train: disjoint and deterministic
    again = load_task(task, data_root)
    assert again.validation.inputs[:5] == data.validation.inputs[:5]
    assert all(isinstance(a, str) and a for a, _ in data.train.inputs[:50])


def test_sentence_pairs_have_second_text(data_root: Path) -> None:
    rte = load_task("rte", data_root)
    assert all(b for _, b in rte.train.inputs[:20])
    sst2 = load_task("sst2", data_root)
    assert all(b is None for _, b in sst2.train.inputs[:20])


@pytest.mark.parametrize(
    "task,classes,shape",
    [
        ("mnist", 10, (28, 28)),
        ("cifar10", 10, (32, 32, 3)),
        ("gtsrb", 43, (32, 32, 3)),
        ("flowers5", 5, (64, 64, 3)),
        ("pneumoniamnist", 2, (28, 28)),
    ],
)
def test_vision_tasks(task: str, classes: int, shape: tuple[int, ...], data_root: Path) -> None:
    data = load_task(task, data_root)
    assert data.num_classes == classes
    assert data.train.inputs.dtype == np.uint8 and data.train.inputs.shape[1:] == shape
    assert len(np.unique(data.test.labels)) == classes


def test_gtsrb_validation_holds_out_whole_tracks(data_root: Path) -> None:
    data = load_task("gtsrb", data_root)
    train = {x.tobytes() for x in data.train.inputs[:3000]}
    # frames of one track are near duplicates; whole tracks moved means no exact image is shared
    assert not any(x.tobytes() in train for x in data.validation.inputs[:300])
    assert 0.05 < len(data.validation) / (len(data.train) + len(data.validation)) < 0.15


def test_limit_and_unlabeled_view(data_root: Path) -> None:
    data = load_task("trec", data_root).limit(train=120, validation=60, test=50, seed=3)
    assert 114 <= len(data.train) <= 120 and 54 <= len(data.validation) <= 60 and 45 <= len(data.test) <= 50
    assert len(np.unique(data.train.labels)) == 6  # stratified keeps rare classes
    unlabeled = data.unlabeled(40)
    assert len(unlabeled) == 40 and isinstance(unlabeled[0], tuple)


def test_csv_task_and_errors(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("sentence,label\n" + "".join(f"good {i},pos\nbad {i},neg\n" for i in range(20)))
    (tmp_path / "test.csv").write_text("sentence,label\ngreat,pos\nawful,neg\n")
    data = load_table_task("toy", tmp_path / "train.csv", tmp_path / "test.csv", text_columns=("sentence",))
    assert data.class_names == ["neg", "pos"] and len(data.test) == 2
    with pytest.raises(DataError, match="missing column 'text'"):
        load_table_task("toy", tmp_path / "train.csv", tmp_path / "test.csv", text_columns=("text",))
    (tmp_path / "bad.csv").write_text("sentence,label\nok,pos\nweird,maybe\n")
    with pytest.raises(DataError, match="maybe"):
        load_table_task(
            "toy", tmp_path / "train.csv", tmp_path / "bad.csv", text_columns=("sentence",), class_names=["neg", "pos"]
        )
    (tmp_path / "empty.csv").write_text("sentence,label\n")
    with pytest.raises(DataError, match="no examples"):
        load_table_task("toy", tmp_path / "empty.csv", tmp_path / "test.csv", text_columns=("sentence",))
    with pytest.raises(DataError, match="unknown task"):
        load_task("no_such_task")


def test_hf_datasets_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    rows = {"sentence": [f"text {i}" for i in range(30)], "label": [i % 2 for i in range(30)]}
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows, features=features),
            "test": datasets.Dataset.from_dict(rows, features=features),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    data = load_task(str(tmp_path / "ds"))
    assert data.class_names == ["negative", "positive"]
    assert len(data.train) + len(data.validation) == 30 and data.kind == "text"
    with pytest.raises(DataError, match="label column"):
        load_hf_dataset(tmp_path / "ds", label_column="target")


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    data = load_image_folder(tmp_path)
    assert data.class_names == ["cat", "dog"] and data.train.inputs.shape[1:] == (16, 16, 3)
    assert len(data.test) == 8
    (tmp_path / "test" / "bird").mkdir()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "test" / "bird" / "0.png")
    with pytest.raises(DataError, match="bird"):
        load_image_folder(tmp_path)


def test_image_folder_of_mixed_sizes_is_fitted_by_shorter_side_and_centre_crop(tmp_path: Path) -> None:
    """Real photo datasets mix sizes; they used to be refused. A wide image must be centre-cropped, not
    squashed: its blue side bands (a third of the width each) are mostly cropped away."""
    from PIL import Image

    wide = np.zeros((30, 90, 3), dtype=np.uint8)
    wide[:, :30, 2] = wide[:, 60:, 2] = 255  # blue | red | blue
    wide[:, 30:60, 0] = 255
    square = np.full((50, 50, 3), 128, dtype=np.uint8)
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "b").mkdir(parents=True)
        Image.fromarray(wide).save(tmp_path / split / "a" / "wide.png")
        Image.fromarray(square).save(tmp_path / split / "a" / "square.png")
        Image.fromarray(square).save(tmp_path / split / "b" / "square.png")
    data = load_image_folder(tmp_path)
    assert data.test.inputs.shape == (3, 224, 224, 3)  # the default size for mixed sizes
    fitted = data.test.inputs[list(data.test.inputs.reshape(3, -1).std(1) > 0).index(True)]
    red_columns = (fitted[112, :, 0] > 200).mean()
    assert red_columns > 0.9  # a squashed image would show 1/3 red
    assert load_image_folder(tmp_path, size=20).test.inputs.shape == (3, 20, 20, 3)
    for name in ("a", "b"):
        (tmp_path / "uniform" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(square).save(tmp_path / "uniform" / name / f"{i}.png")
    assert load_image_folder(tmp_path / "uniform").train.inputs.shape[1:] == (50, 50, 3)  # one size: untouched


def test_hf_image_dataset_of_mixed_sizes_loads(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": ClassLabel(names=["x", "y"])})
    images = [PILImage.new("L" if i % 2 else "RGB", (20 + i, 24)) for i in range(6)]
    split = Dataset.from_dict({"image": images, "label": [0, 1] * 3}, features=features)
    DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "ds"))
    data = load_task(str(tmp_path / "ds"))
    assert data.kind == "image" and data.test.inputs.shape == (6, 224, 224, 3)


def test_bare_task_names_find_user_datasets_in_the_data_root(tmp_path: Path, data_root: Path) -> None:
    """A config's task name resolves in the data root: the shared layout first, then a dataset of the
    user's own named after the task; the error for neither names both places."""
    from PIL import Image

    for split in ("train", "test"):
        for label in ("0", "1"):
            (tmp_path / "mnist" / split / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(
                    tmp_path / "mnist" / split / label / f"{i}.png"
                )
    (tmp_path / "my_texts").mkdir()
    for split in ("train", "test"):
        (tmp_path / "my_texts" / f"{split}.csv").write_text("text_a,label\n" + "good,pos\nbad,neg\n" * 5)
    from distac.data import available_tasks

    assert available_tasks(tmp_path) == {"mnist": "dataset", "my_texts": "dataset"}
    mnist = load_task("mnist", tmp_path)  # a shared-data name, in the user's image-folder format
    assert mnist.name == "mnist" and mnist.train.inputs.shape[1:] == (8, 8, 3) and len(mnist.test) == 6
    assert load_task("my_texts", tmp_path).class_names == ["neg", "pos"]
    assert len(load_task("mnist", data_root).train) > 1000  # the shared data's own file wins where it exists
    with pytest.raises(DataError, match=r"unknown task 'sun397'.*nor is there a dataset .*sun397"):
        load_task("sun397", tmp_path)
    with pytest.raises(DataError, match="no such dataset file or directory"):
        load_task(str(tmp_path / "missing" / "sun397"), tmp_path)


def test_tasks_command_lists_a_roots_own_datasets_and_names_unusable_folders(tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from distac.cli import app

    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "pets" / split / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), 30 * i, dtype=np.uint8)).save(
                    tmp_path / "pets" / split / label / f"{i}.png"
                )
    (tmp_path / "junk").mkdir()
    # a folder of the text layout that is not a classification task (the shared data's stsb) is named too
    (tmp_path / "text" / "scores").mkdir(parents=True)
    for split in ("train", "test"):
        rows = "".join(f"s{i}\t{i / 7:.3f}\n" for i in range(9))
        (tmp_path / "text" / "scores" / f"{split}.tsv").write_text("text_a\tlabel\n" + rows)
    result = CliRunner().invoke(app, ["tasks", "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "pets" in result.output and "not a usable dataset: junk" in result.output
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "not a usable dataset: scores" in flat and "regression task?" in flat
    missing = CliRunner().invoke(app, ["tasks", "--data-root", str(tmp_path / "nowhere")])
    assert isinstance(missing.exception, DataError) and "no such data directory" in str(missing.exception)
