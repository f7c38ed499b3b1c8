"""Compatibility shims for the environments distac runs in.

timm imports torchvision. PyPI ships torchvision only as a CUDA build whose compiled operators
cannot load next to a CPU-only torch; its Python import then fails while registering fake
kernels for ``torchvision::nms``/``qnms``. distac needs none of those detection operators, so when
they are missing we declare their schemas (no kernels) before importing torchvision. Models
and transforms, which is all timm uses, are pure Python and work normally.
"""

from __future__ import annotations

import importlib
import types

import torch

_SHIM_LIBRARY: torch.library.Library | None = None


def _torchvision_ops_loadable() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup is the probe
        return True
    except (AttributeError, RuntimeError):
        return False


def ensure_torchvision_importable() -> None:
    """Declare the two operator schemas torchvision needs at import time if its C library is absent."""
    global _SHIM_LIBRARY
    import sys

    if "torchvision" in sys.modules or _SHIM_LIBRARY is not None:
        return
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return
    try:
        importlib.import_module("torchvision.extension")
    except Exception:  # noqa: BLE001 - the C library failing to load is exactly the case handled here
        pass
    if _torchvision_ops_loadable():
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM_LIBRARY = library


def import_timm() -> types.ModuleType:
    ensure_torchvision_importable()
    return importlib.import_module("timm")


def import_torchvision() -> types.ModuleType:
    ensure_torchvision_importable()
    return importlib.import_module("torchvision")
