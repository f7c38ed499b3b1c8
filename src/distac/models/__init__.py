"""Model adapters: one interface (raw inputs -> logits) over text, CLIP and timm/torchvision models.

Use :func:`build_model` for a fresh model from a spec (pretrained backbone + new task head),
:func:`load_model` / :func:`save_model` for distac model directories.
"""

from distac.models.base import ClassifierModel, ModelSpec
from distac.models.registry import build_model, load_model, pretrained_model_for, save_model

__all__ = ["ClassifierModel", "ModelSpec", "build_model", "load_model", "pretrained_model_for", "save_model"]
