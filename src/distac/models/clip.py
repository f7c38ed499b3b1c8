"""CLIP image encoders with zero-shot classification heads, as in the task-arithmetic benchmark.

Only the image tower (``vision_model`` + ``visual_projection``) is fine-tuned and merged. The
head of a task is fixed: the normalised text embeddings of prompts built from its class names,
averaged over templates, through CLIP's frozen text encoder (Ilharco et al. 2023). Logits are
``logit_scale * normalize(image_embedding) @ head.T``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distac.errors import CheckpointError, DataError
from distac.models.base import ClassifierModel, Inputs, ModelSpec, ZeroShotHead, check_pretrained_load

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: A compact version of the CLIP prompt ensemble; users can pass their own per task.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
)


class CLIPVisionBackbone(nn.Module):
    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)


@torch.no_grad()
def build_zeroshot_embeddings(
    clip_model: nn.Module, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """Average of normalised prompt embeddings per class, re-normalised (CLIP's recipe)."""
    clip_model.eval()
    rows = []
    for name in class_names:
        prompts = [t.format(name) for t in templates]
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        emb = clip_model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        if not isinstance(emb, torch.Tensor):  # newer transformers may return a model output
            emb = emb.pooler_output if getattr(emb, "pooler_output", None) is not None else emb[0]
        emb = F.normalize(emb, dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


def _require_full_clip(source: str) -> None:
    """CLIP's zero-shot heads are its text tower's embeddings of the class names: a checkpoint of the
    image tower alone (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``) cannot make them, and
    ``CLIPModel.from_pretrained`` would build a default-size random CLIP from it without a word."""
    config_file = Path(source) / "config.json"
    if not config_file.is_file():
        return  # a hub name: transformers resolves and checks it
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{config_file}: unreadable config ({error})") from error
    if model_type != "clip":
        raise CheckpointError(
            f"{source}: model_type {model_type!r}, not a full CLIP checkpoint ('clip'). --family clip builds "
            "zero-shot heads from CLIP's text tower, so it needs the CLIPModel checkpoint (image and text towers, "
            "e.g. openai/clip-vit-base-patch32 saved with save_pretrained)"
        )


class CLIPClassifier(ClassifierModel):
    family: ClassVar[str] = "clip"

    def __init__(self, spec: ModelSpec, *, pretrained: bool = True, local_dir: Path | None = None) -> None:
        super().__init__(spec)
        from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

        source = str(local_dir) if local_dir is not None and (local_dir / "config.json").is_file() else spec.backbone
        self.source_path = source
        _require_full_clip(source)
        if pretrained:
            clip, loading = CLIPModel.from_pretrained(source, output_loading_info=True)
            check_pretrained_load(clip, loading, source)
        else:
            clip = CLIPModel(CLIPConfig.from_pretrained(source))
        clip = clip.float()  # float32 whatever the checkpoint's dtype (see TextClassifier)
        self.processor = CLIPImageProcessor.from_pretrained(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if not spec.class_names or len(spec.class_names) != spec.num_labels:
            raise DataError(
                f"CLIP zero-shot head for task {spec.task!r} needs {spec.num_labels} class names, "
                f"got {len(spec.class_names or [])}"
            )
        self.backbone = CLIPVisionBackbone(clip.vision_model, clip.visual_projection)
        if pretrained:
            templates = spec.options.get("templates") or DEFAULT_TEMPLATES
            embeddings = build_zeroshot_embeddings(clip, self.tokenizer, spec.class_names, templates)
            self.head = ZeroShotHead(embeddings, float(clip.logit_scale.detach().exp()))
        else:  # load_model: the saved head buffers replace it; a random text tower would be wasted work
            self.head = ZeroShotHead.placeholder(spec.num_labels, int(clip.config.projection_dim))
        self.clip_config = clip.config
        del clip  # the text tower is only needed to build the head
        image_size = self.processor.crop_size or {"height": 224}
        self.image_size = int(spec.options.get("image_size", image_size.get("height", 224)))
        self.mean = torch.tensor(self.processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(self.processor.image_std).view(1, 3, 1, 1)

    def encode(self, raw: np.ndarray | Sequence[np.ndarray]) -> Inputs:
        from distac.models.vision import images_to_tensor

        return {"pixel_values": images_to_tensor(raw, self.image_size, self.mean, self.std)}

    def features(self, inputs: Inputs) -> torch.Tensor:
        return self.backbone(inputs["pixel_values"])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def save_architecture(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.clip_config.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
