"""Tasks as train / validation / test splits of raw inputs and integer labels.

Raw inputs stay raw (text pairs, uint8 image arrays): the model adapter encodes them, so one
dataset serves every backbone. ``unlabeled`` gives the training inputs without labels, which is
all DisTaC's conditioning step is allowed to see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distac.errors import DataError

TextPair = tuple[str, str | None]


@dataclass
class Split:
    """Raw inputs (a list of text pairs or an (N,H,W[,C]) uint8 array) and int64 labels."""

    inputs: list[TextPair] | np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.inputs) != len(self.labels):
            raise DataError(f"{len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: Sequence[int] | np.ndarray) -> Split:
        index = np.asarray(index, dtype=np.int64)
        if isinstance(self.inputs, np.ndarray):
            return Split(self.inputs[index], self.labels[index])
        return Split([self.inputs[i] for i in index], self.labels[index])

    def subsample(self, n: int | None, seed: int = 0, stratified: bool = True) -> Split:
        """A fixed random subset of at most ``n`` examples (stratified by label by default).

        Stratified, each class gets the floor of its share of ``n`` (at least one), so the subset can be a
        few examples short of ``n`` (``diagnose --examples 100`` on a 3-class task scores 99). This is kept
        as it is: every committed result under ``results/`` was made on exactly these subsets, and a
        top-up would change them."""
        if n is not None and n < 1:
            raise DataError(f"a subset needs at least 1 example, got {n}")
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        if not stratified:
            return self.take(np.sort(rng.permutation(len(self))[:n]))
        classes, counts = np.unique(self.labels, return_counts=True)
        quota = np.maximum(1, np.floor(counts / counts.sum() * n).astype(int))
        picked = []
        for cls, q in zip(classes, quota, strict=True):
            members = np.flatnonzero(self.labels == cls)
            picked.append(rng.permutation(members)[:q])
        index = np.concatenate(picked)
        if len(index) > n:
            index = rng.permutation(index)[:n]
        return self.take(np.sort(index))


@dataclass
class TaskData:
    """A classification task: name, class names, its primary metric and three splits."""

    name: str
    kind: str  # "text" | "image"
    class_names: list[str]
    train: Split
    validation: Split
    test: Split
    metric: str = "accuracy"  # or "mcc" (CoLA)
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_classes < 2:  # trains to a constant (loss 0), scores 1.0, and breaks entropy ratios
            raise DataError(
                f"{self.source or self.name}: {self.num_classes} class {self.class_names}; a classification task "
                "needs at least 2"
            )
        if len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"{self.source or self.name}: duplicate class names {self.class_names}")
        for split_name in ("train", "validation", "test"):
            split: Split = getattr(self, split_name)
            if len(split) == 0:
                raise DataError(f"{self.source or self.name}: the {split_name} split is empty")
            low, high = int(split.labels.min()), int(split.labels.max())
            if low < 0 or high >= self.num_classes:
                raise DataError(
                    f"{self.source or self.name}: {split_name} labels range over [{low}, {high}] but the task "
                    f"has {self.num_classes} classes {self.class_names}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        aliases = {"val": "validation", "valid": "validation", "dev": "validation"}
        name = aliases.get(name, name)
        if name not in {"train", "validation", "test"}:
            raise DataError(f"unknown split {name!r} (train, validation, test)")
        return getattr(self, name)

    def unlabeled(self, n: int | None = None, seed: int = 0) -> list[TextPair] | np.ndarray:
        """Training inputs without labels: what DisTaC conditioning may use."""
        return self.train.subsample(n, seed=seed, stratified=False).inputs

    def limit(
        self, train: int | None = None, validation: int | None = None, test: int | None = None, seed: int = 0
    ) -> TaskData:
        """A smaller copy with fixed random subsets (for CPU-sized runs)."""
        return TaskData(
            name=self.name,
            kind=self.kind,
            class_names=self.class_names,
            train=self.train.subsample(train, seed),
            validation=self.validation.subsample(validation, seed + 1),
            test=self.test.subsample(test, seed + 2),
            metric=self.metric,
            source=self.source,
            info={**self.info, "limits": {"train": train, "validation": validation, "test": test, "seed": seed}},
        )

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "classes": self.num_classes,
            "metric": self.metric,
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "source": self.source,
        }


def carve_validation(split: Split, fraction: float, seed: int, groups: np.ndarray | None = None) -> tuple[Split, Split]:
    """Hold out ``fraction`` of ``split`` as validation with a fixed seed.

    With ``groups`` (e.g. GTSRB's tracks of 30 frames of the same sign) whole groups go to one
    side, so near-duplicate frames never leak from train into validation.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    n = len(split)
    if groups is None:
        order = rng.permutation(n)
        n_val = max(1, int(round(n * fraction)))
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    else:
        unique = rng.permutation(np.unique(groups))
        n_val = max(1, int(round(len(unique) * fraction)))
        val_groups = set(unique[:n_val].tolist())
        mask = np.array([g in val_groups for g in groups])
        val_idx, train_idx = np.flatnonzero(mask), np.flatnonzero(~mask)
    return split.take(train_idx), split.take(val_idx)
