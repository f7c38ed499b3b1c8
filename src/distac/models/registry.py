"""Building, saving and loading distac models.

A distac model directory holds ``model.safetensors`` (the whole state dict: ``backbone.*`` and
``head.*``), ``distac_model.json`` (the :class:`ModelSpec`) and, for Hugging Face backbones, the
backbone's config and tokenizer under ``architecture/`` so the directory is self-contained.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from distac.atomic import atomic_directory, atomic_write_json
from distac.checkpoints import load_state_dict, write_weights
from distac.errors import CheckpointError, ConfigError
from distac.models.base import SPEC_FILE, ClassifierModel, ModelSpec

ARCHITECTURE_DIR = "architecture"
#: Model families :func:`build_model` knows (``ModelSpec.family``).
MODEL_FAMILIES = ("hf-text", "clip", "timm", "vision")


def _quiet_transformers() -> None:
    """Per-tensor loading bars of transformers drown distac's own progress output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _model_class(family: str) -> type[ClassifierModel]:
    _quiet_transformers()
    from distac.models.clip import CLIPClassifier
    from distac.models.text import TextClassifier
    from distac.models.vision import VisionClassifier

    classes: dict[str, type[ClassifierModel]] = {
        "hf-text": TextClassifier,
        "clip": CLIPClassifier,
        "timm": VisionClassifier,
        "vision": VisionClassifier,
    }
    if family not in classes:
        raise ConfigError(f"unknown model family {family!r}; known: {sorted(classes)}")
    return classes[family]


def build_model(spec: ModelSpec, *, pretrained: bool = True, local_dir: Path | None = None) -> ClassifierModel:
    """A model for ``spec``: pretrained backbone (unless ``pretrained=False``) and a fresh head."""
    cls = _model_class(spec.family)
    model = cls(spec, pretrained=pretrained, local_dir=local_dir)  # type: ignore[call-arg]
    return model.eval()  # training code switches to train mode explicitly


def pretrained_model_for(spec: ModelSpec) -> ClassifierModel:
    return build_model(spec, pretrained=True)


def save_model(model: ClassifierModel, directory: str | os.PathLike[str], extra: dict | None = None) -> Path:
    """Write a self-contained model directory atomically (temp dir + rename)."""
    directory = Path(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_directory(directory) as tmp:
        write_weights(state, tmp, metadata={"distac_family": model.spec.family})
        model.save_architecture(tmp / ARCHITECTURE_DIR)  # type: ignore[attr-defined]
        atomic_write_json(tmp / SPEC_FILE, model.spec.to_json())
        for name, payload in (extra or {}).items():
            atomic_write_json(tmp / name, payload)
    return directory


def load_model(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> ClassifierModel:
    """Rebuild the architecture from the spec and load the saved weights (strictly)."""
    directory = Path(directory)
    spec = ModelSpec.read(directory)
    model = build_model(spec, pretrained=False, local_dir=directory / ARCHITECTURE_DIR)
    state = load_state_dict(directory)
    load_weights_strict(model, state, directory)
    return model.to(device)


def load_weights_strict(model: ClassifierModel, state: dict[str, torch.Tensor], source: object) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise CheckpointError(
            f"{source}: weights do not match a {model.spec.family} model of {model.spec.backbone}: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state, strict=True)
