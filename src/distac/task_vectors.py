"""Task vectors: tau_t = theta_t - theta_pre, and the algebra merging is built from.

Which parameters belong to a task vector is explicit (:class:`ParameterSelector`): by default
the shared backbone only. Task-specific classification heads and BatchNorm running statistics are
kept per task and never merged, because they are not updates of a shared parameter (a head for
SST-2 and one for CoLA do not even have to share a shape).
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from distac.checkpoints import StateDict, align_to_pretrained, load_state_dict, save_state_dict
from distac.errors import CheckpointError

#: Per-task heads under the names used by distac adapters, transformers and timm/torchvision.
DEFAULT_HEAD_PATTERNS: tuple[str, ...] = (
    "head.*",
    "heads.*",
    "classifier.*",
    "classifier",
    "pre_classifier.*",  # DistilBERT's per-task dense layer before the classifier
    "score.*",
    "fc.weight",
    "fc.bias",
    "_fc.*",
    "classification_head.*",
)
#: Statistics that are estimated, not trained; kept per task.
DEFAULT_STATISTIC_PATTERNS: tuple[str, ...] = ("*running_mean", "*running_var", "*num_batches_tracked")


@dataclass(frozen=True)
class ParameterSelector:
    """Decides which state-dict entries are part of a task vector.

    ``include`` (glob patterns; empty = everything) is applied first, then ``exclude``.
    Non floating-point tensors are never part of a task vector.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_HEAD_PATTERNS + DEFAULT_STATISTIC_PATTERNS

    def __call__(self, key: str, tensor: torch.Tensor | None = None) -> bool:
        if tensor is not None and not tensor.is_floating_point():
            return False
        if self.include and not any(fnmatch.fnmatchcase(key, p) for p in self.include):
            return False
        return not any(fnmatch.fnmatchcase(key, p) for p in self.exclude)

    @classmethod
    def from_patterns(cls, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> ParameterSelector | None:
        """The selector of the CLI's ``--include`` / ``--exclude``: ``include`` narrows the selection,
        ``exclude`` adds to the default exclusions (heads, BatchNorm statistics), which stay: a user
        excluding one more layer must not get merged classifier heads for it. None without patterns."""
        include, exclude = tuple(include), tuple(exclude)
        if not (include or exclude):
            return None
        return cls(include=include, exclude=DEFAULT_HEAD_PATTERNS + DEFAULT_STATISTIC_PATTERNS + exclude)

    @classmethod
    def backbone_only(cls, prefix: str = "backbone.") -> ParameterSelector:
        return cls(include=(f"{prefix}*",), exclude=DEFAULT_STATISTIC_PATTERNS)

    def select(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        return [k for k, v in state.items() if self(k, v)]


ALL_FLOAT = ParameterSelector(include=(), exclude=DEFAULT_STATISTIC_PATTERNS)


class TaskVector:
    """A named set of parameter deltas. Immutable-by-convention: operations return new vectors."""

    def __init__(self, deltas: Mapping[str, torch.Tensor], name: str | None = None) -> None:
        if not deltas:
            raise ValueError("a task vector needs at least one parameter")
        self.deltas: StateDict = dict(deltas)
        self.name = name

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_state_dicts(
        cls,
        pretrained: Mapping[str, torch.Tensor],
        finetuned: Mapping[str, torch.Tensor],
        selector: ParameterSelector | None = None,
        *,
        name: str | None = None,
        pretrained_source: object = "pretrained",
        finetuned_source: object = "fine-tuned",
    ) -> TaskVector:
        """tau = finetuned - pretrained over the selected keys, computed in float32."""
        selector = selector or ParameterSelector()
        keys = selector.select(pretrained)
        if not keys:
            raise CheckpointError(f"{pretrained_source}: no parameters selected for the task vector")
        finetuned = align_to_pretrained(dict(finetuned), keys, finetuned_source)
        check_compatible(pretrained, finetuned, keys, pretrained_source, finetuned_source)
        extra = [k for k in selector.select(finetuned) if k not in pretrained]
        if extra:
            raise CheckpointError(
                f"{finetuned_source}: has {len(extra)} parameters that {pretrained_source} lacks, e.g. {extra[:5]} "
                "(different architecture? exclude them with a ParameterSelector / --exclude if they are task heads)"
            )
        deltas = {k: finetuned[k].float() - pretrained[k].float() for k in keys}
        return cls(deltas, name=name)

    @classmethod
    def from_checkpoints(
        cls,
        pretrained: str | os.PathLike[str],
        finetuned: str | os.PathLike[str],
        selector: ParameterSelector | None = None,
        name: str | None = None,
    ) -> TaskVector:
        return cls.from_state_dicts(
            load_state_dict(pretrained),
            load_state_dict(finetuned),
            selector,
            name=name or Path(finetuned).name,
            pretrained_source=pretrained,
            finetuned_source=finetuned,
        )

    # ----------------------------------------------------------------------------- algebra
    def _zip(self, other: TaskVector) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        if set(self.deltas) != set(other.deltas):
            missing = sorted(set(self.deltas) ^ set(other.deltas))[:5]
            raise ValueError(f"task vectors cover different parameters, e.g. {missing}")
        for key, value in self.deltas.items():
            yield key, value, other.deltas[key]

    def __add__(self, other: TaskVector) -> TaskVector:
        return TaskVector({k: a + b for k, a, b in self._zip(other)})

    def __radd__(self, other: object) -> TaskVector:
        if other == 0:  # so that sum(vectors) works
            return self
        return NotImplemented  # type: ignore[return-value]

    def __sub__(self, other: TaskVector) -> TaskVector:
        return TaskVector({k: a - b for k, a, b in self._zip(other)})

    def __neg__(self) -> TaskVector:
        return self * -1.0

    def __mul__(self, scale: float) -> TaskVector:
        return TaskVector({k: v * float(scale) for k, v in self.deltas.items()}, name=self.name)

    __rmul__ = __mul__

    # ----------------------------------------------------------------------------- geometry
    def norm(self) -> float:
        """Global L2 norm over all selected parameters (the paper's ||tau||)."""
        return math.sqrt(sum(float(v.double().pow(2).sum()) for v in self.deltas.values()))

    def parameter_norms(self) -> dict[str, float]:
        return {k: float(v.double().norm()) for k, v in self.deltas.items()}

    def layer_norms(self, depth: int | None = None) -> dict[str, float]:
        """Norms grouped by layer: keys are grouped up to the first numeric component (e.g.
        ``backbone.encoder.layer.3``) or, with ``depth``, by their first ``depth`` dotted parts."""
        groups: dict[str, float] = {}
        for key, value in self.deltas.items():
            group = layer_group(key, depth)
            groups[group] = groups.get(group, 0.0) + float(value.double().pow(2).sum())
        return {g: math.sqrt(s) for g, s in groups.items()}

    def dot(self, other: TaskVector) -> float:
        return sum(float((a.double() * b.double()).sum()) for _, a, b in self._zip(other))

    def cosine(self, other: TaskVector) -> float:
        denom = self.norm() * other.norm()
        return self.dot(other) / denom if denom > 0 else 0.0

    def numel(self) -> int:
        return sum(v.numel() for v in self.deltas.values())

    def keys(self) -> list[str]:
        return list(self.deltas)

    def to(self, *args: object, **kwargs: object) -> TaskVector:
        return TaskVector({k: v.to(*args, **kwargs) for k, v in self.deltas.items()}, name=self.name)

    # ----------------------------------------------------------------------------- use
    def apply_to(self, pretrained: Mapping[str, torch.Tensor], coefficient: float = 1.0) -> StateDict:
        """theta = theta_pre + coefficient * tau, cast back to each parameter's dtype.
        Parameters outside the task vector are copied from ``pretrained`` unchanged."""
        missing = [k for k in self.deltas if k not in pretrained]
        if missing:
            raise CheckpointError(f"the pretrained state dict lacks task-vector parameters {missing[:5]}")
        out = dict(pretrained)
        for key, delta in self.deltas.items():
            base = pretrained[key]
            out[key] = (base.float() + coefficient * delta.to(base.device).float()).to(base.dtype)
        return out

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> Path:
        return save_state_dict(self.deltas, path, metadata={"distac": "task_vector", **dict(metadata or {})})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TaskVector:
        return cls(load_state_dict(path), name=Path(path).name)

    def __repr__(self) -> str:
        return (
            f"TaskVector(name={self.name!r}, params={len(self.deltas)}, numel={self.numel()}, norm={self.norm():.4g})"
        )


def layer_group(key: str, depth: int | None = None) -> str:
    parts = key.split(".")
    if depth is not None:
        return ".".join(parts[:depth])
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or key


def check_compatible(
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    keys: Iterable[str],
    reference_source: object,
    other_source: object,
) -> None:
    """Raise a :class:`CheckpointError` naming both files if ``other`` does not fit ``reference``."""
    keys = list(keys)
    missing = [k for k in keys if k not in other]
    if missing:
        raise CheckpointError(
            f"{other_source}: missing {len(missing)} parameters present in {reference_source}, e.g. {missing[:5]} "
            f"(different architecture?){_absent_module_hint(missing, keys)}"
        )
    for key in keys:
        a, b = reference[key], other[key]
        if tuple(a.shape) != tuple(b.shape):
            raise CheckpointError(
                f"{other_source}: parameter {key!r} has shape {tuple(b.shape)} but {reference_source} has "
                f"{tuple(a.shape)} (different architecture?)"
            )
        if a.is_floating_point() != b.is_floating_point():
            raise CheckpointError(f"{other_source}: parameter {key!r} has dtype {b.dtype}, expected {a.dtype}")


def _absent_module_hint(missing: Sequence[str], keys: Sequence[str]) -> str:
    """Advice when the missing parameters are a few whole modules, not another architecture: a model
    saved without a module its task never used (a BERT pooler under mean pooling, which distac's text
    models drop) against a base that has it. Excluding them is then right; a guess from the names,
    so it is advice, never applied silently."""
    modules = sorted({k.rsplit(".", 1)[0] for k in missing})
    if len(missing) > max(4, len(keys) // 20) or len(modules) > 3:
        return ""
    present = {k.rsplit(".", 1)[0] for k in keys if k not in set(missing)}
    if any(m == p or p.startswith(m + ".") for m in modules for p in present):
        return ""  # part of a module that is otherwise there: not a module simply left out
    globs = " ".join(f"--exclude '{m}.*'" for m in modules)
    return (
        f". If it was saved without {', '.join(modules)} (a module its task never used, such as a pooler), "
        f"leave {'it' if len(modules) == 1 else 'them'} out: {globs} (CLI) or ParameterSelector(exclude=...)"
    )


def cosine_matrix(vectors: Sequence[TaskVector]) -> list[list[float]]:
    return [[a.cosine(b) for b in vectors] for a in vectors]


def stack_norms(vectors: Sequence[TaskVector]) -> list[float]:
    return [v.norm() for v in vectors]
