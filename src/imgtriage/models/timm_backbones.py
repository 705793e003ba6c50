"""timm backbones by name, with pretrained weights from the hub or from a local file.

Any timm architecture works as ``timm:<name>``; the common ones are registered by name.
Pretrained weights: ``pretrained=True`` fetches the timm/hub weights (online only),
``pretrained="path/to/weights.safetensors|.pth|.bin"`` loads a local file; offline without a
local file raises WeightsUnavailableError at once instead of hanging on the network.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from torch import nn

from imgtriage.errors import ModelError, WeightsUnavailableError
from imgtriage.models.registry import register_model

BACKBONES = {
    "resnet18": (224, "ResNet-18: fast transfer backbone"),
    "resnet50": (224, "ResNet-50: accurate transfer backbone"),
    "efficientnet_b0": (224, "EfficientNet-B0: small and accurate"),
    "mobilenetv3_large_100": (224, "MobileNetV3-Large: for CPUs and phones"),
    "mobilenetv3_small_100": (224, "MobileNetV3-Small: the cheapest backbone"),
    "convnext_tiny": (224, "ConvNeXt-Tiny: modern, accurate, heavier"),
}
HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the weights hub can be reached (False at once when offline flags are set)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("IMGTRIAGE_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _pretrained_kwargs(name: str, pretrained: bool | str | os.PathLike[str]) -> dict[str, Any]:
    if pretrained is False or pretrained is None:
        return {"pretrained": False}
    if pretrained is True:
        if not hub_reachable():
            raise WeightsUnavailableError(
                f"pretrained weights for {name!r} come from the timm hub, which cannot be "
                "reached from this machine. Download them elsewhere and pass the file with "
                "--pretrained PATH (a .safetensors/.pth file), or train with --no-pretrained")
        return {"pretrained": True}
    path = Path(pretrained)
    if not path.is_file():
        raise WeightsUnavailableError(f"pretrained weights file {path} does not exist; pass an "
                                      "existing .safetensors/.pth file to --pretrained")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}


def create_timm(name: str, num_classes: int, in_chans: int = 3,
                pretrained: bool | str = False, drop_rate: float = 0.0, **kw: Any) -> nn.Module:
    """Build timm model ``name``; a pretrained first conv is adapted to ``in_chans`` by timm."""
    import timm

    if not timm.is_model(name):
        raise ModelError(f"timm has no model {name!r}; see timm.list_models() for names")
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_chans,
                                 drop_rate=drop_rate, **_pretrained_kwargs(name, pretrained),
                                 **kw)
    except (RuntimeError, OSError, ValueError) as exc:
        if pretrained not in (False, None):
            raise WeightsUnavailableError(f"could not load pretrained weights for {name!r}: "
                                          f"{exc}") from exc
        raise


def _register(name: str, size: int, desc: str) -> None:
    def build(num_classes: int, in_chans: int = 3, **kw: Any) -> nn.Module:
        return create_timm(name, num_classes, in_chans, **kw)

    register_model(name, family="timm", default_size=(size, size), description=desc,
                   pretrainable=True)(build)


for _name, (_size, _desc) in BACKBONES.items():
    _register(_name, _size, _desc)
