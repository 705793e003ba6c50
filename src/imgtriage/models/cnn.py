"""Small CNNs trained from scratch: the crop CNN for tiny grayscale crops and a deeper one."""

from __future__ import annotations

from torch import nn

from imgtriage.models.registry import register_model


def _block(cin: int, cout: int, convs: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class CropCNN(nn.Module):
    """Conv blocks with batch norm, global average pooling, dropout, linear head.

    ``widths`` sets the blocks; ``convs_per_block`` deepens each block. Works at any input
    size because of the global pooling. ``forward_features`` gives the pooled embedding.
    """

    def __init__(self, num_classes: int, in_chans: int = 1,
                 widths: tuple[int, ...] = (32, 64, 128), convs_per_block: int = 1,
                 drop_rate: float = 0.5) -> None:
        super().__init__()
        blocks, cin = [], in_chans
        for w in widths:
            blocks.append(_block(cin, w, convs_per_block))
            cin = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(cin, num_classes)
        self.num_features = cin

    def forward_features(self, x):
        return self.pool(self.features(x)).flatten(1)

    def get_classifier(self) -> nn.Module:
        """The classification head (what transfer learning trains first)."""
        return self.head

    def forward(self, x):
        return self.head(self.dropout(self.forward_features(x)))


@register_model("crop_cnn", family="cnn", default_size=(64, 64),
                description="3 conv blocks + BN + GAP + dropout 0.5; for 64x64 crops, "
                            "25-500 labels")
def crop_cnn(num_classes: int, in_chans: int = 1, drop_rate: float = 0.5,
             widths: tuple[int, ...] | list[int] = (32, 64, 128), convs_per_block: int = 1
             ) -> CropCNN:
    """``widths``/``convs_per_block`` widen or deepen it (e.g. ``--model-kwargs
    '{"widths": [48, 96, 192]}'``)."""
    return CropCNN(num_classes, in_chans, tuple(int(w) for w in widths), int(convs_per_block),
                   drop_rate)


@register_model("deep_cnn", family="cnn", default_size=(96, 96),
                description="4 double-conv blocks + BN + GAP + dropout; from scratch, "
                            "hundreds to thousands of labels")
def deep_cnn(num_classes: int, in_chans: int = 1, drop_rate: float = 0.5,
             widths: tuple[int, ...] | list[int] = (32, 64, 128, 256), convs_per_block: int = 2
             ) -> CropCNN:
    return CropCNN(num_classes, in_chans, tuple(int(w) for w in widths), int(convs_per_block),
                   drop_rate)
