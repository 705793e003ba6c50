"""The encoder of a few-shot gallery: a trained Siamese embedding net, or a pretrained backbone.

A gallery bundle records its encoder as a model name and keyword arguments (the manifest's
``model`` block); :func:`build_gallery_encoder` turns them back into the network:

* ``siamese``: the episodically trained :class:`~imgtriage.models.siamese.EmbeddingNet`;
* a timm backbone with registered ImageNet weights (``efficientnet_lite0/1/2``, see
  :mod:`imgtriage.models.pretrained`): :class:`PooledEncoder`, the backbone's pooled features
  (what its classifier reads), L2-normalised. No training: photos of a new class are
  enrolled as they are. (A square-root power transform of the features and averaging the
  embedding over a horizontal flip were measured on CIFAR-10 and gained under 1 point at
  5-shot, the flip for twice the compute: docs/benchmarks.md, issue 14.)

Both return unit-length rows, so the gallery math of :mod:`imgtriage.models.gallery` and the
gallery kind of :mod:`imgtriage.predict.gallery` treat them alike.

Example:
    >>> import torch
    >>> enc = build_gallery_encoder("siamese", 1, {"embed_dim": 8, "widths": [4]})
    >>> tuple(enc(torch.zeros(2, 1, 16, 16)).shape)
    (2, 8)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from imgtriage.errors import ModelError


class PooledEncoder(nn.Module):
    """A classifier backbone as a gallery encoder: its global-pooled features, L2-normalised.

    ``backbone`` is a timm model built with ``num_classes=0`` (its forward pass returns the
    pooled features); ``num_features`` is their length.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_features = int(getattr(backbone, "num_features", 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)


def is_pretrained_encoder(name: str) -> bool:
    """Whether ``name`` is a backbone with registered pretrained weights (not ``siamese``)."""
    from imgtriage.models.pretrained import get_weights

    return name != "siamese" and get_weights(name) is not None


def build_gallery_encoder(name: str, in_chans: int, kwargs: Mapping[str, Any],
                          pretrained: Any = "none") -> nn.Module:
    """The encoder a gallery bundle names, in eval mode.

    ``pretrained`` (a backbone only): a :class:`~imgtriage.models.pretrained.WeightsPlan` or a
    ``--pretrained`` value; ``none`` builds the architecture for a bundle's own weights.

    Example:
        >>> enc = build_gallery_encoder("efficientnet_lite0", 3, {})
        >>> type(enc).__name__, enc.num_features
        ('PooledEncoder', 1280)
    """
    if name == "siamese":
        from imgtriage.models.siamese import build_encoder

        return build_encoder(in_chans, **dict(kwargs)).eval()
    if not is_pretrained_encoder(name):
        raise ModelError(f"a gallery encoder is 'siamese' (trained with `imgtriage "
                         f"train-fewshot --encoder episodic`) or a backbone with registered "
                         f"pretrained weights (efficientnet_lite0/1/2), not {name!r}")
    from imgtriage.models.timm_backbones import create_timm

    if kwargs:
        raise ModelError(f"a pretrained gallery encoder takes no arguments, got "
                         f"{sorted(kwargs)}; the bundle was written by another version")
    backbone = create_timm(name, num_classes=0, in_chans=in_chans, pretrained=pretrained)
    return PooledEncoder(backbone).eval()
