"""The paper's own set-up, ``distac experiment clip-vit-b32``, must run for a user who has CLIP weights
and the 8 vision datasets in the formats they come in. Stand-ins of the same formats: a tiny CLIP
saved with ``save_pretrained`` and, under a data root, one dataset per task named after it: image
folders (photos of mixed sizes, as SUN397 or Stanford Cars ship) and an HF ``save_to_disk``
dataset (as the hub's SVHN copies are), two of them with names the shared data also defines
(``mnist``, ``gtsrb``) but in the user's format. Only the scale is reduced (steps, data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from distac.cli import app
from distac.experiments.config import load_experiment

runner = CliRunner()
CLASSES = ["blue thing", "green thing", "red thing"]  # sorted, as image-folder classes are
CHANNEL = [2, 1, 0]  # the RGB channel that dominates each class's images


def _photo(rng: np.random.Generator, label: int, size: tuple[int, int]) -> Image.Image:
    """A noisy image whose dominant colour channel is its class, so the task is learnable."""
    pixels = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., CHANNEL[label]] += 160
    return Image.fromarray(pixels)


def _image_folder(root: Path, rng: np.random.Generator, mixed_sizes: bool) -> None:
    for split, per_class in (("train", 8), ("val", 3), ("test", 4)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                size = (40 + 7 * i, 30 + 5 * label) if mixed_sizes else (32, 32)
                suffix = "jpg" if mixed_sizes else "png"
                _photo(rng, label, size).save(root / split / name / f"{i}.{suffix}")


def _hf_dataset(root: Path, rng: np.random.Generator) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASSES)})
    splits = {}
    for split, per_class in (("train", 8), ("test", 4)):
        labels = [label for label in range(len(CLASSES)) for _ in range(per_class)]
        images = [_photo(rng, label, (32 + i % 3, 32)) for i, label in enumerate(labels)]
        splits[split] = Dataset.from_dict({"image": images, "label": labels}, features=features)
    DatasetDict(splits).save_to_disk(str(root))


@pytest.fixture(scope="module")
def user_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset per task of ``clip-vit-b32``, named after it, in the formats users have."""
    data = tmp_path_factory.mktemp("user_data")
    rng = np.random.default_rng(0)
    for task in load_experiment("clip-vit-b32").tasks:
        if task == "svhn":
            _hf_dataset(data / task, rng)
        else:
            _image_folder(data / task, rng, mixed_sizes=task in {"sun397", "stanford_cars", "dtd"})
    return data


def test_every_clip_vit_b32_task_loads_from_a_data_root_of_user_datasets(user_data_root: Path) -> None:
    from distac.data import load_task

    for task in load_experiment("clip-vit-b32").tasks:
        data = load_task(task, user_data_root)
        assert data.name == task and data.kind == "image" and data.class_names == CLASSES
        assert data.train.inputs.ndim == 4 and data.train.inputs.shape[-1] == 3
        assert (len(data.train), len(data.test)) == ((24, 12) if task != "svhn" else (len(data.train), 12))
        if task in {"sun397", "stanford_cars", "dtd"}:  # mixed sizes: shorter side to 224, centre crop
            assert data.train.inputs.shape[1:3] == (224, 224)
        # the colour that makes the class survives the resizing
        dominant = data.test.inputs.reshape(len(data.test), -1, 3).mean(1).argmax(1)
        assert (dominant == np.array(CHANNEL)[data.test.labels]).all()


@pytest.mark.slow
def test_clip_vit_b32_experiment_runs_on_user_datasets(
    tmp_path: Path, tiny_clip_dir: Path, user_data_root: Path
) -> None:
    """The bundled config end to end, every method and the three Table 1 columns, on three of its
    tasks (one per format: mixed-size image folder, HF dataset, a shared-data name in the user's
    format) to keep the test short."""
    config = load_experiment("clip-vit-b32")
    tasks = ["sun397", "svhn", "mnist"]
    run = tmp_path / "run"
    overrides = {
        "backbone": str(tiny_clip_dir),
        "tasks": f"[{', '.join(tasks)}]",
        "finetune.steps": 6,
        "finetune.lr": 1.0e-3,
        "finetune.batch_size": 8,
        "finetune.warmup_steps": 1,
        "condition.steps": 2,
        "condition.batch_size": 8,
        "evaluation.batch_size": 32,
        "scenarios.norm_mismatch.long_tasks": "[sun397]",
        "grid": "[0.3, 1.0]",
        "method_options": "{wudi: {iterations: 3}}",
    }
    arguments = ["experiment", "clip-vit-b32", "--run-dir", str(run), "--data-root", str(user_data_root)]
    arguments += ["--study", "none"]
    for scenario in ("original", "norm_mismatch", "low_confidence"):
        arguments += ["--scenario", scenario]
    for key, value in overrides.items():
        arguments += ["--set", f"{key}={value}"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output

    results = json.loads((run / "results.json").read_text())
    scenarios = results["scenarios"]
    assert set(scenarios) == {"original", "norm_mismatch", "low_confidence"}
    for scenario, variants in (("original", ["plain"]), ("low_confidence", ["plain", "distac"])):
        for variant in variants:
            for method in config.methods:  # all seven of the paper's methods
                entry = scenarios[scenario]["average"][variant][method]
                assert set(entry["test"]) == set(tasks), (scenario, variant, method)
                assert 0.0 <= entry["absolute"] <= 1.0
    long = scenarios["norm_mismatch"]["choices"]["sun397"]
    assert 0 < long["kappas"]["sun397"] < 1  # the 10x-lr source is shrunk
    assert set(long["distac"]["ties"]["test"]) == set(tasks)
    # the fine-tuned models learned their (easy) tasks: data, labels and zero-shot heads are wired right
    individual = scenarios["original"]["average"]["plain"]["individual"]["test"]
    assert min(individual[task]["score"] for task in tasks) > 0.5, individual
    assert "Task arithmetic + DisTaC" in (run / "table1.md").read_text()
