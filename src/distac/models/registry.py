"""Building, saving and loading distac models.

A distac model directory holds ``model.safetensors`` (the whole state dict: ``backbone.*`` and
``head.*``), ``distac_model.json`` (the :class:`ModelSpec`) and, for Hugging Face backbones, the
backbone's config and tokenizer under ``architecture/`` so the directory is self-contained.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from distac.atomic import atomic_directory, atomic_write_json
from distac.checkpoints import load_state_dict, write_weights
from distac.errors import CheckpointError, ConfigError
from distac.models.base import MODEL_FAMILY_INFO, SPEC_FILE, ClassifierModel, ModelSpec, model_family
from distac.task_vectors import check_compatible

ARCHITECTURE_DIR = "architecture"
#: Model families :func:`build_model` knows (``ModelSpec.family``), from the registry in ``base``.
MODEL_FAMILIES = tuple(MODEL_FAMILY_INFO)


def _quiet_transformers() -> None:
    """Per-tensor loading bars of transformers drown distac's own progress output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _model_class(family: str) -> type[ClassifierModel]:
    """The adapter class of ``family`` (the registry ``MODEL_FAMILY_INFO``; ConfigError if unknown)."""
    info = model_family(family)
    _quiet_transformers()
    return info.model_class()


def resolve_backbone(backbone: str) -> str:
    """A backbone given as a local path, made absolute; a hub or timm name unchanged.

    The spec is saved with the model and read back by later commands (``merge`` without
    ``--pretrained``, ``diagnose``, ``condition`` rebuild theta_pre from it), which may run from another
    directory: a relative path would then name another folder, or none."""
    path = Path(backbone).expanduser()
    return str(path.resolve()) if path.exists() else backbone


def _looks_like_a_path(backbone: str) -> bool:
    """A filesystem path, not a hub id (``name`` or ``namespace/name``) or a timm / torchvision name."""
    return backbone.startswith(("/", "./", "../", "~", ".\\")) or backbone.count("/") > 1


def build_model(spec: ModelSpec, *, pretrained: bool = True, local_dir: Path | None = None) -> ClassifierModel:
    """A model for ``spec``: pretrained backbone (unless ``pretrained=False``) and a fresh head."""
    cls = _model_class(spec.family)
    if pretrained and local_dir is None and _looks_like_a_path(spec.backbone) and not Path(spec.backbone).exists():
        raise CheckpointError(f"backbone {spec.backbone!r}: no such file or directory")
    try:
        model = cls(spec, pretrained=pretrained, local_dir=local_dir)  # type: ignore[call-arg]
    except OSError as error:  # transformers/hub: neither a local directory nor a reachable hub name
        where = "its architecture/ folder" if local_dir is not None and not pretrained else "the backbone"
        raise CheckpointError(
            f"backbone {spec.backbone!r} ({spec.family}): cannot load {where}: {error}. Give a local directory "
            "(an absolute path, or one relative to the directory you run from) or a model name that is cached"
        ) from error
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
    try:
        model = build_model(spec, pretrained=False, local_dir=directory / ARCHITECTURE_DIR)
    except ConfigError as error:  # e.g. an unknown family: name the file that says so
        raise CheckpointError(f"{directory / SPEC_FILE}: {error}") from error
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


def backbone_state(model: ClassifierModel) -> dict[str, torch.Tensor]:
    """The tensors a task vector covers (the shared backbone), by name."""
    selector = model.task_vector_selector()
    return {k: v for k, v in model.state_dict().items() if selector(k, v)}


def check_same_backbone(models: Mapping[str, ClassifierModel]) -> None:
    """Sources to be merged or compared must be fine-tuned from one pretrained model: the same family,
    the same backbone, and the same backbone tensors (names and shapes). The error names the source
    that differs from the first and how, before any tensor arithmetic fails on it."""
    items = list(models.items())
    if not items:
        return
    first_name, first = items[0]
    reference = backbone_state(first)
    for name, model in items[1:]:
        if model.spec.family != first.spec.family or resolve_backbone(model.spec.backbone) != resolve_backbone(
            first.spec.backbone
        ):
            raise CheckpointError(
                f"{name}: fine-tuned from {model.spec.family} backbone {model.spec.backbone!r}, but {first_name} from "
                f"{first.spec.family} backbone {first.spec.backbone!r}: task vectors of different pretrained models "
                "cannot be merged or compared"
            )
        state = backbone_state(model)
        extra = [k for k in state if k not in reference]
        if extra:
            raise CheckpointError(
                f"{name}: has {len(extra)} backbone tensors that {first_name} lacks, e.g. {extra[:3]} "
                "(different architecture?)"
            )
        check_compatible(reference, state, reference, first_name, name)


def check_pretrained_fits(pretrained: Mapping[str, torch.Tensor], model: ClassifierModel, source: object) -> None:
    """theta_pre given as a checkpoint must hold every backbone tensor of the sources, in their shapes
    (its other tensors, e.g. a head, are ignored)."""
    reference = backbone_state(model)
    missing = [k for k in reference if k not in pretrained]
    if missing:
        hint = ""
        if any(k.split(".", 1)[-1] in pretrained for k in missing):
            hint = (
                f"; its keys lack the '{missing[0].split('.', 1)[0]}.' prefix of distac model directories: give the "
                "pretrained model as a distac model directory, or omit --pretrained to rebuild it from the "
                "sources' spec"
            )
        raise CheckpointError(
            f"{source} (--pretrained): lacks {len(missing)} of the sources' {len(reference)} backbone tensors "
            f"(e.g. {missing[:3]}){hint}"
        )
    check_compatible(reference, pretrained, reference, "the sources", f"{source} (--pretrained)")
