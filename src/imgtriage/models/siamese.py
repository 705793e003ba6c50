"""Siamese / prototype encoder for small crops: an embedding net with L2-normalised output.

Two ways to use it:

* as a plain classifier (``create_model("siamese", ...)``): a cosine head on top of the
  embedding gives ``scale * cos(embedding, class_weight)`` logits, so the ordinary training
  loop and classifier bundles work with it unchanged;
* as the encoder of a gallery (``imgtriage.models.gallery``; the bundle kind is
  ``imgtriage.predict.gallery``): only the embedding net is kept,
  and classes are the prototypes / nearest items of a gallery of enrolled embeddings, so new
  classes can be added without retraining (see ``imgtriage.train.fewshot``).

Example:
    >>> import torch
    >>> from imgtriage.models import create_model
    >>> m = create_model("siamese", num_classes=4, in_chans=1, embed_dim=32).eval()
    >>> e = m.embed(torch.zeros(2, 1, 64, 64))
    >>> tuple(e.shape), round(float(e.norm(dim=1)[0]), 4)
    ((2, 32), 1.0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from imgtriage.errors import ModelError
from imgtriage.models.cnn import _block
from imgtriage.models.registry import register_model

# Keyword arguments that shape the encoder (the ones a gallery bundle records).
ENCODER_KWARGS = ("embed_dim", "widths", "convs_per_block")


class EmbeddingNet(nn.Module):
    """Conv blocks + BN, global average pooling, linear projection, L2 normalisation.

    Works at any input size (global pooling); ``num_features`` is ``embed_dim``.
    """

    def __init__(self, in_chans: int = 1, embed_dim: int = 128,
                 widths: tuple[int, ...] = (32, 64, 128), convs_per_block: int = 1) -> None:
        super().__init__()
        if embed_dim < 2:
            raise ModelError(f"embed_dim must be >= 2, got {embed_dim} (--embed-dim)")
        if not widths or min(widths) < 1:
            raise ModelError(f"widths must be positive channel counts, got {widths}")
        blocks, cin = [], in_chans
        for w in widths:
            blocks.append(_block(cin, int(w), convs_per_block))
            cin = int(w)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Linear(cin, embed_dim)
        self.num_features = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.proj(self.pool(self.features(x)).flatten(1))
        return F.normalize(z, dim=1)


class CosineHead(nn.Module):
    """``scale * cos(embedding, w_k)`` for each class k: a classifier over prototypes."""

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        if not scale > 0:
            raise ModelError(f"scale must be positive, got {scale} (--scale)")
        self.weight = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.01)
        self.scale = float(scale)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * emb @ F.normalize(self.weight, dim=1).T


class SiameseNet(nn.Module):
    """An :class:`EmbeddingNet` (``encoder``) with a :class:`CosineHead` (``head``).

    ``forward`` gives logits (so the plain training loop can train it), ``embed`` and
    ``forward_features`` the L2-normalised embedding.
    """

    def __init__(self, num_classes: int, in_chans: int = 1, embed_dim: int = 128,
                 widths: tuple[int, ...] = (32, 64, 128), convs_per_block: int = 1,
                 scale: float = 10.0) -> None:
        super().__init__()
        self.encoder = EmbeddingNet(in_chans, embed_dim, tuple(widths), convs_per_block)
        self.head = CosineHead(embed_dim, num_classes, scale)
        self.num_features = embed_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def encoder_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of model kwargs that shapes the encoder (JSON-friendly: tuples as lists)."""
    out = {k: kwargs[k] for k in ENCODER_KWARGS if k in kwargs}
    if "widths" in out:
        out["widths"] = [int(w) for w in out["widths"]]
    return out


def build_encoder(in_chans: int, **kwargs: Any) -> EmbeddingNet:
    """The embedding net alone, as a gallery bundle stores it.

    Example:
        >>> build_encoder(1, embed_dim=16).num_features
        16
    """
    kw = encoder_kwargs(kwargs)
    if "widths" in kw:
        kw["widths"] = tuple(kw["widths"])
    try:
        return EmbeddingNet(in_chans, **kw)
    except TypeError as exc:  # pragma: no cover - encoder_kwargs filters the keys
        raise ModelError(f"bad arguments for the siamese encoder: {exc}") from exc


@register_model("siamese", family="siamese", default_size=(64, 64),
                description="embedding CNN (L2-normalised) + cosine head; few-shot galleries "
                            "via `imgtriage train-fewshot`; 64x64 crops, < 300 labels")
def siamese(num_classes: int, in_chans: int = 1, embed_dim: int = 128,
            widths: tuple[int, ...] = (32, 64, 128), convs_per_block: int = 1,
            scale: float = 10.0, **kw: Any) -> SiameseNet:
    if kw:
        raise ModelError(f"siamese takes embed_dim, widths, convs_per_block, scale; got "
                         f"unexpected {sorted(kw)}")
    return SiameseNet(num_classes, in_chans, embed_dim, tuple(widths), convs_per_block, scale)
