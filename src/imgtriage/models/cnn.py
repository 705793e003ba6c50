"""Small CNNs trained from scratch: the crop CNN for tiny grayscale crops and a deeper one."""

from __future__ import annotations

import torch
from torch import nn

from imgtriage.errors import ConfigError
from imgtriage.models.registry import register_model

GLOBAL_POOLS = ("avg", "max", "avgmax")


def _block(cin: int, cout: int, convs: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class GlobalPool(nn.Module):
    """Global pooling to one vector per image: ``avg``, ``max`` or ``avgmax`` (both, joined).

    Average pooling suits whole-image content; max pooling keeps a small local finding (a
    blowhole, a hairline crack) from being averaged away over a clean surface.
    """

    def __init__(self, kind: str = "avg") -> None:
        super().__init__()
        if kind not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool must be one of {list(GLOBAL_POOLS)}, got {kind!r} "
                              "(--model-kwargs '{\"global_pool\": \"max\"}')")
        self.kind = kind

    def forward(self, x):
        if self.kind == "avg":
            return x.mean(dim=(2, 3))
        if self.kind == "max":
            return x.amax(dim=(2, 3))
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)

    @property
    def multiplier(self) -> int:
        return 2 if self.kind == "avgmax" else 1


class CropCNN(nn.Module):
    """Conv blocks with batch norm, global pooling, dropout, linear head.

    ``widths`` sets the blocks; ``convs_per_block`` deepens each block; ``global_pool``
    (avg, max, avgmax) how the last feature map becomes one vector. Works at any input size
    because of the global pooling. ``forward_features`` gives the pooled embedding.
    """

    def __init__(self, num_classes: int, in_chans: int = 1,
                 widths: tuple[int, ...] = (32, 64, 128), convs_per_block: int = 1,
                 drop_rate: float = 0.5, global_pool: str = "avg") -> None:
        super().__init__()
        blocks, cin = [], in_chans
        for w in widths:
            blocks.append(_block(cin, w, convs_per_block))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.pool = GlobalPool(global_pool)
        self.dropout = nn.Dropout(drop_rate)
        self.num_features = cin * self.pool.multiplier
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x):
        return self.pool(self.features(x))

    def get_classifier(self) -> nn.Module:
        """The classification head (what transfer learning trains first)."""
        return self.head

    def stages(self) -> list[nn.Module]:
        """The conv blocks, shallow to deep (their maps feed the OOD scorer's statistics)."""
        return list(self.features)

    def forward(self, x):
        return self.head(self.dropout(self.forward_features(x)))


@register_model("crop_cnn", family="cnn", default_size=(64, 64),
                description="3 conv blocks + BN + GAP + dropout 0.5; for 64x64 crops, "
                            "25-500 labels")
def crop_cnn(num_classes: int, in_chans: int = 1, drop_rate: float = 0.5,
             widths: tuple[int, ...] | list[int] = (32, 64, 128), convs_per_block: int = 1,
             global_pool: str = "avg") -> CropCNN:
    """``widths``/``convs_per_block`` widen or deepen it (e.g. ``--model-kwargs
    '{"widths": [48, 96, 192]}'``); ``global_pool`` max for small local defects."""
    return CropCNN(num_classes, in_chans, tuple(int(w) for w in widths), int(convs_per_block),
                   drop_rate, global_pool)


@register_model("deep_cnn", family="cnn", default_size=(96, 96),
                description="4 double-conv blocks + BN + GAP + dropout; from scratch, "
                            "hundreds to thousands of labels")
def deep_cnn(num_classes: int, in_chans: int = 1, drop_rate: float = 0.5,
             widths: tuple[int, ...] | list[int] = (32, 64, 128, 256), convs_per_block: int = 2,
             global_pool: str = "avg") -> CropCNN:
    return CropCNN(num_classes, in_chans, tuple(int(w) for w in widths), int(convs_per_block),
                   drop_rate, global_pool)
