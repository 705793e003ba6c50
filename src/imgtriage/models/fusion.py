"""Image + feature fusion: any registered backbone and an MLP on standardised features,
concatenated into one classification head.

The image branch is a registered architecture without its head (its pooled embedding), the
feature branch an MLP on the vector a fitted
:class:`~imgtriage.data.features.FeatureStandardizer` produces (header cards, image
statistics, extra manifest columns, ``__missing`` indicators). Both are concatenated and a
dropout + linear head gives the logits. Select it as ``--model fusion:<backbone>``; the
bundle records ``num_features`` so the same layout is rebuilt at load time.

Example:
    >>> import torch
    >>> from imgtriage.models import create_model
    >>> m = create_model("fusion:crop_cnn", num_classes=3, in_chans=1, num_features=5)
    >>> m(torch.zeros(2, 1, 32, 32), torch.zeros(2, 5)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from imgtriage.errors import ModelError
from imgtriage.models.registry import create_model, get_entry, register_model

PREFIX = "fusion:"


def is_fusion(name: str) -> bool:
    """Whether a model name selects the fusion architecture (``fusion:<backbone>``)."""
    return name == "fusion" or name.startswith(PREFIX)


def backbone_of(name: str) -> str:
    """``fusion:crop_cnn`` -> ``crop_cnn`` (plain ``fusion`` means the crop CNN)."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else "crop_cnn"


class _Embedder(nn.Module):
    """A classifier without its head: the pooled embedding and its width."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if hasattr(model, "reset_classifier"):  # timm models: head -> identity
            model.reset_classifier(0)
            self.pooled = False
        elif hasattr(model, "forward_features") and hasattr(model, "num_features"):
            self.pooled = True  # imgtriage CNNs: forward_features is already pooled
        else:
            raise ModelError(f"{type(model).__name__} exposes no embedding (reset_classifier or "
                             "forward_features + num_features); pick another --model backbone")
        self.model = model
        self.width = int(model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x) if self.pooled else self.model(x)


class FusionNet(nn.Module):
    """Image embedding ++ feature MLP -> dropout -> linear head.

    ``forward(x, features)`` takes the image batch (N, C, h, w) and the standardised feature
    matrix (N, num_features); calling it without features is an error, never a silent zero.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_features: int,
                 feature_hidden: int = 64, drop_rate: float = 0.2) -> None:
        super().__init__()
        if num_features < 1:
            raise ModelError("a fusion model needs num_features >= 1 (set by training from the "
                             "fitted feature spec; check --feature-cards/--feature-stats)")
        self.image = _Embedder(backbone)
        self.features = nn.Sequential(
            nn.Linear(num_features, feature_hidden), nn.ReLU(inplace=True),
            nn.Linear(feature_hidden, feature_hidden), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.image.width + feature_hidden, num_classes)
        self.num_features = num_features

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        if features is None:
            raise ModelError("this fusion model takes (images, features); compute the features "
                             "with the bundle's FeatureStandardizer (Predictor does this)")
        f = self.features(features.to(dtype=x.dtype))
        return self.head(self.dropout(torch.cat([self.image(x), f], dim=1)))


@register_model("fusion", family="fusion", default_size=(64, 64),
                description="image backbone (--model fusion:<backbone>, default crop_cnn) + MLP "
                            "on FITS header cards, image statistics and manifest columns")
def fusion(num_classes: int, in_chans: int = 1, num_features: int = 0,
           backbone: str = "crop_cnn", feature_hidden: int = 64, drop_rate: float = 0.2,
           backbone_kwargs: dict[str, Any] | None = None, pretrained: bool | str = False
           ) -> FusionNet:
    """``backbone`` is any registered name or ``timm:<name>``; ``backbone_kwargs`` go to it."""
    if is_fusion(backbone):
        raise ModelError("a fusion backbone cannot itself be a fusion model")
    extra = dict(backbone_kwargs or {})
    if pretrained:
        extra["pretrained"] = pretrained
    net = create_model(backbone, num_classes, in_chans, **extra)
    return FusionNet(net, num_classes, int(num_features), int(feature_hidden), drop_rate)


def default_size(name: str) -> tuple[int, int]:
    """Input size of a fusion model: its backbone's default (224 for ``timm:`` names)."""
    bb = backbone_of(name)
    return (224, 224) if bb.startswith("timm:") else get_entry(bb).default_size
