"""The one model interface: a shared backbone plus a per-task head, producing logits.

Every adapter (Hugging Face text encoders, CLIP with zero-shot heads, timm / torchvision image
backbones) subclasses :class:`ClassifierModel`. Its state dict is split by prefix:

* ``backbone.*`` - shared across tasks; the task vector is taken over these parameters;
* ``head.*`` - per task (a linear layer, or CLIP's frozen zero-shot text embeddings).

BatchNorm running statistics live in the backbone but are estimated, not trained, so the task
vector selector leaves them out and they stay per task.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distac.errors import CheckpointError, ConfigError, DataError
from distac.task_vectors import DEFAULT_STATISTIC_PATTERNS, ParameterSelector

SPEC_FILE = "distac_model.json"
Inputs = dict[str, torch.Tensor]


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model's architecture (weights come from the state dict)."""

    family: str
    backbone: str
    num_labels: int
    task: str | None = None
    class_names: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: Where the task's data was when the model was trained on a dataset given as a path (absolute):
    #: later commands look ``task`` up in their data root and fall back to this path when the root has
    #: no such task, so a model fine-tuned on ``--task ./mine/mytask`` can be scored next to models of
    #: the shared tasks. None for a task named in the data root.
    task_source: str | None = None

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        if payload["task_source"] is None:
            # left out, not written as null: the spec of every model of a named task (and the resume
            # identity of its runs, which holds the spec) stays as it was before this field existed
            del payload["task_source"]
        return payload

    @classmethod
    def from_json(cls, payload: Mapping[str, Any], source: object = "spec") -> ModelSpec:
        if not isinstance(payload, Mapping):
            raise CheckpointError(f"{source}: invalid model spec: expected a JSON object, not {type(payload).__name__}")
        num_labels = payload.get("num_labels")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise CheckpointError(
                f"{source}: invalid model spec: num_labels must be a positive integer, got {num_labels!r}"
            )
        class_names = payload.get("class_names")
        if class_names and (
            not isinstance(class_names, list)
            or len(class_names) != num_labels
            or not all(isinstance(c, str) for c in class_names)
        ):
            raise CheckpointError(
                f"{source}: invalid model spec: class_names must be a list of {num_labels} names, got {class_names!r}"
            )
        for key in ("family", "backbone"):
            if not isinstance(payload.get(key), str) or not payload[key]:
                raise CheckpointError(f"{source}: invalid model spec: {key} must be a non-empty string")
        for key in ("task", "task_source"):
            if payload.get(key) is not None and not isinstance(payload[key], str):
                raise CheckpointError(f"{source}: invalid model spec: {key} must be a string, got {payload[key]!r}")
        try:
            return cls(
                family=str(payload["family"]),
                backbone=str(payload["backbone"]),
                num_labels=int(payload["num_labels"]),
                task=payload.get("task"),
                class_names=list(payload["class_names"]) if payload.get("class_names") else None,
                options=dict(payload.get("options") or {}),
                task_source=payload.get("task_source"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid model spec: {exc}") from exc

    @classmethod
    def read(cls, directory: str | Path) -> ModelSpec:
        file = Path(directory) / SPEC_FILE
        if not file.is_file():
            raise CheckpointError(f"{directory}: not a distac model directory (no {SPEC_FILE})")
        try:
            payload = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{file}: invalid JSON: {exc}") from exc
        return cls.from_json(payload, file)

    def with_task(
        self, task: str, num_labels: int, class_names: Sequence[str] | None, task_source: str | None = None
    ) -> ModelSpec:
        """The same architecture for another task (``task_source``: that task's dataset path, if any)."""
        return ModelSpec(
            family=self.family,
            backbone=self.backbone,
            num_labels=num_labels,
            task=task,
            class_names=list(class_names) if class_names else None,
            options=dict(self.options),
            task_source=task_source,
        )


@dataclass(frozen=True)
class ModelFamily:
    """One model family :func:`distac.models.build_model` knows (``ModelSpec.family``).

    ``inputs`` is the kind of task data it reads (``TaskData.kind``: ``text`` or ``image``): a text
    encoder fed images (or an image backbone fed sentence pairs) used to fail deep in a tokenizer or
    an image transform with an error naming neither the task nor the family. ``adapter`` names the
    :class:`ClassifierModel` subclass as ``module:Class``, imported only when a model is built."""

    name: str
    inputs: str
    summary: str
    adapter: str

    def model_class(self) -> type[ClassifierModel]:
        import importlib

        module, _, name = self.adapter.partition(":")
        return getattr(importlib.import_module(module), name)


#: The registry of model families: ``--family`` choices, their help and the task kind each reads.
MODEL_FAMILY_INFO: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            "hf-text",
            "text",
            "a Hugging Face text encoder (BERT, MiniLM, RoBERTa...) with a task head",
            "distac.models.text:TextClassifier",
        ),
        ModelFamily(
            "clip",
            "image",
            "a CLIP checkpoint's image encoder with zero-shot heads from the class names",
            "distac.models.clip:CLIPClassifier",
        ),
        ModelFamily(
            "timm",
            "image",
            "a timm / torchvision image backbone (efficientnet-lite0, a local timm model...) with a linear head",
            "distac.models.vision:VisionClassifier",
        ),
        ModelFamily("vision", "image", "another name for timm", "distac.models.vision:VisionClassifier"),
    )
}


def model_family(family: str) -> ModelFamily:
    """The registry entry of ``family``; an unknown family is a ConfigError listing the known ones."""
    if family not in MODEL_FAMILY_INFO:
        raise ConfigError(f"unknown model family {family!r}; known: {sorted(MODEL_FAMILY_INFO)}")
    return MODEL_FAMILY_INFO[family]


def model_family_help() -> str:
    """The families and what each is, for ``--family``'s help (built from the registry, so it cannot
    drift from what :func:`model_family` accepts)."""
    return "; ".join(f"{f.name}: {f.summary} ({f.inputs} tasks)" for f in MODEL_FAMILY_INFO.values())


def check_family_fits_task(family: str, task: Any, model_source: object = None) -> None:
    """Refuse to pair a model of ``family`` with a task of the other kind of data (text vs images).

    The one check every command that pairs a model with a task runs (finetune before it builds the
    model, the others through :meth:`ClassifierModel.check_task`), before any weights are loaded or
    examples encoded. ``task`` is a :class:`~distac.data.TaskData` (its ``name``, ``kind``, ``source``);
    a task without a ``kind``, or a family outside the registry (a subclass of a library user's own, which
    :func:`model_family` reports where a model is built), is not checked."""
    info = MODEL_FAMILY_INFO.get(family)
    kind = getattr(task, "kind", None)
    if info is None or kind is None or kind == info.inputs:
        return
    fitting = [f.name for f in MODEL_FAMILY_INFO.values() if f.inputs == kind]
    model = f"{model_source} (family {family!r})" if model_source is not None else f"model family {family!r}"
    raise DataError(
        f"{getattr(task, 'source', '') or task.name}: task {task.name!r} is {_a(kind)} {kind} task, but {model} reads "
        f"{info.inputs}: use {_a(kind)} {kind} model family ({', '.join(fitting)}) with a matching backbone for this "
        f"task, or {_a(info.inputs)} {info.inputs} task for this model"
    )


def _a(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


#: The ``options`` (experiment configs: ``model_options``) each family reads; anything else is a typo.
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "hf-text": ("max_length", "pooling", "head", "templates", "logit_scale", "head_seed"),
    "clip": ("templates", "image_size"),
    "timm": ("weights", "image_size", "head_seed"),
    "vision": ("weights", "image_size", "head_seed"),
}


def check_model_options(family: str, options: Mapping[str, Any], owner: str = "model_options") -> None:
    """Refuse unknown keys and bad values before a model is built (a typo such as ``max_len`` used to
    be ignored, a bad ``pooling`` to fail only when the first model was built)."""
    from distac.config import check_option

    known = MODEL_OPTIONS.get(family)
    if known is None:
        return  # an unknown family is reported by its own check
    unknown = sorted((key for key in options if key not in known), key=str)
    if unknown:
        raise ConfigError(f"{owner}: unknown option(s) {unknown} for family {family!r}; valid: {list(known)}")
    choices = {"pooling": ("mean", "cls"), "head": ("linear", "zero_shot")}
    for key, allowed in choices.items():
        if key in options and options[key] not in allowed:
            raise ConfigError(f"{owner}.{key}: must be one of {list(allowed)}, got {options[key]!r}")
    for key in ("max_length", "image_size"):
        if key in options:
            check_option(owner, key, options[key], low=1, integer=True)
    if "head_seed" in options:
        check_option(owner, "head_seed", options["head_seed"], low=0, integer=True)
    if "logit_scale" in options:
        check_option(owner, "logit_scale", options["logit_scale"], low=0.0, low_inclusive=False)
    templates = options.get("templates")
    if templates is not None and (
        not isinstance(templates, list | tuple)
        or not templates
        or any(not isinstance(t, str) or "{}" not in t for t in templates)
    ):
        raise ConfigError(f"{owner}.templates: a non-empty list of strings with a '{{}}' for the class name")
    if "weights" in options and not isinstance(options["weights"], str):
        raise ConfigError(f"{owner}.weights: a weights file path or 'hub', got {options['weights']!r}")


class ClassifierModel(nn.Module, ABC):
    """backbone + head -> logits. Subclasses define ``encode`` (raw inputs -> tensors),
    ``features`` (inputs -> pooled features) and keep ``self.backbone`` / ``self.head``."""

    family: ClassVar[str]
    backbone: nn.Module
    head: nn.Module

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        check_model_options(spec.family, spec.options, f"{spec.backbone} options")  # before any weights load
        self.spec = spec

    # -- the interface -------------------------------------------------------------------------
    @abstractmethod
    def encode(self, raw: Sequence[Any] | Any) -> Inputs:
        """Turn raw examples (text pairs or uint8 images) into model inputs on the CPU."""

    @abstractmethod
    def features(self, inputs: Inputs) -> torch.Tensor:
        """Pooled features the head classifies; mixup on text mixes these."""

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return self.classify(self.features(inputs))

    # -- what is shared and what is trained ----------------------------------------------------
    def task_vector_selector(self) -> ParameterSelector:
        return ParameterSelector.backbone_only("backbone.")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters fine-tuning updates (CLIP overrides this: its text head stays frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    def backbone_parameters(self) -> dict[str, nn.Parameter]:
        selector = self.task_vector_selector()
        return {n: p for n, p in self.named_parameters() if selector(n, p)}

    def check_labels(self, labels: torch.Tensor | Sequence[int], source: object) -> None:
        """A dataset whose labels do not fit this head is an error, not a silent wrong answer."""
        labels_t = torch.as_tensor(labels)
        if labels_t.numel() == 0:
            raise DataError(f"{source}: no examples")
        low, high = int(labels_t.min()), int(labels_t.max())
        if low < 0 or high >= self.spec.num_labels:
            raise DataError(
                f"{source}: labels range over [{low}, {high}] but the model head has {self.spec.num_labels} classes"
            )

    def check_task(self, task: Any, split: str | None = None, model_source: object = None) -> None:
        """A task with another number of classes than this model's head is an error (even when its labels
        happen to fit), and so are labels outside the head; ``split`` also checks that split's labels.
        ``model_source`` (the model's directory) is named in the error too. A task of the other kind of
        data (images for a text model, text for an image model) is refused first."""
        check_family_fits_task(self.spec.family, task, model_source)
        if task.num_classes != self.spec.num_labels:
            model = f"the model head of {model_source}" if model_source is not None else "the model head"
            raise DataError(
                f"{task.source or task.name}: task {task.name!r} has {task.num_classes} classes but {model} "
                f"(task {self.spec.task!r}) has {self.spec.num_labels}"
            )
        trained, given = list(self.spec.class_names or []), list(getattr(task, "class_names", None) or [])
        if trained and given and trained != given:
            # a model fine-tuned on a user's "sst2" scored on the shared SST-2, or the same data with its
            # classes in another order: the number of classes fits, the labels mean other things
            model = f"{model_source}" if model_source is not None else "the model"
            how = "in another order" if sorted(trained) == sorted(given) else "with other names"
            raise DataError(
                f"{task.source or task.name}: its classes {given[:10]} differ from those {model} was trained on "
                f"{trained[:10]} ({how}); evaluate it on the data it was trained on (--data-root / --task path)"
            )
        if split is not None:
            self.check_labels(task.split(split).labels, f"{task.source or task.name} ({split})")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class ZeroShotHead(nn.Module):
    """Frozen class embeddings [C, D] and a fixed logit scale: ``scale * cos(feature, class)``.

    CLIP's zero-shot head (text embeddings of prompts) and its analog for sentence encoders (the
    encoder's own embeddings of the class names). Buffers, not parameters: fine-tuning never moves
    them, so everything a source learns, its confidence included, lives in the merged backbone."""

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", F.normalize(class_embeddings.float(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @classmethod
    def placeholder(cls, num_classes: int, dim: int) -> ZeroShotHead:
        """A head of the right shape whose buffers a saved checkpoint overwrites (``load_model``):
        embedding the class names through a randomly initialised encoder would be wasted work."""
        return cls(torch.zeros(num_classes, dim), 1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features, dim=-1) @ self.weight.t().to(features.dtype)


def check_pretrained_load(model: nn.Module, loading_info: Mapping[str, Any], source: object) -> None:
    """A pretrained backbone must come from its checkpoint whole and finite.

    transformers fills weights a checkpoint lacks with a fresh random init and only logs it; for a
    pretrained model that is theta_pre, and a different random draw at every rebuild (merge, diagnose
    and condition rebuild it from the spec) makes those parts of every task vector noise. NaN weights
    would train to a NaN model that distac then refuses to load. Both are errors here, naming the
    checkpoint. ``loading_info`` is what ``from_pretrained(..., output_loading_info=True)`` returns."""
    from distac.checkpoints import check_state_finite

    missing = sorted(loading_info.get("missing_keys") or [])
    mismatched = [str(m[0] if isinstance(m, tuple | list) else m) for m in loading_info.get("mismatched_keys") or []]
    if missing or mismatched:
        detail = f"lacks {len(missing)} weight(s), e.g. {missing[:5]}" if missing else ""
        if mismatched:
            detail += ("; " if detail else "") + f"has other shapes for {mismatched[:5]}"
        raise CheckpointError(
            f"{source}: the pretrained checkpoint {detail}; they would be random (and different at every "
            "rebuild of theta_pre). Give the complete checkpoint of this architecture"
        )
    check_state_finite(model.state_dict(), source)


def statistic_patterns() -> tuple[str, ...]:
    return DEFAULT_STATISTIC_PATTERNS


def move_inputs(inputs: Inputs, device: torch.device | str) -> Inputs:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def slice_inputs(inputs: Inputs, index: slice | torch.Tensor) -> Inputs:
    return {k: v[index] for k, v in inputs.items()}


def num_examples(inputs: Inputs) -> int:
    return len(next(iter(inputs.values())))
