"""The resolved training configuration: a frozen dataclass saved with every run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from imgtriage.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Errors name the CLI flag that sets the value.

    ``in_chans`` / ``img_size`` None mean "decide from the data / the model's default".

    Example:
        >>> TrainConfig(model="crop_cnn", epochs=5, img_size=64).batch_size
        64
    """

    model: str = "crop_cnn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | bool = False
    img_size: int | None = None
    in_chans: int | None = None
    scaling: str = "dtype"
    stretch: str = "linear"
    resize: str = "squash"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_frac: float = 0.15
    test_frac: float = 0.0
    select_metric: str = "val_accuracy"
    augment: str = "none"
    seed: int = 0
    num_threads: int | None = None
    decode_workers: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("epochs must be >= 1 (--epochs)")
        if self.batch_size < 1:
            raise ConfigError("batch size must be >= 1 (--batch-size)")
        if not self.lr > 0:
            raise ConfigError("learning rate must be positive (--lr)")
        if self.weight_decay < 0:
            raise ConfigError("weight decay must be >= 0 (--weight-decay)")
        if self.img_size is not None and self.img_size < 8:
            raise ConfigError("image size must be >= 8 pixels (--img-size)")
        if self.in_chans is not None and self.in_chans < 1:
            raise ConfigError("in_chans must be >= 1 (--in-chans)")
        if self.select_metric not in ("val_accuracy", "val_loss"):
            raise ConfigError("select metric must be val_accuracy or val_loss (--select-metric)")
        if self.augment not in AUGMENT_POLICIES:
            raise ConfigError(f"augment must be one of {sorted(AUGMENT_POLICIES)} (--augment)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Name -> what it does, for --help. Geometric-only policies are safe for scientific data.
AUGMENT_POLICIES = {
    "none": "no augmentation",
    "flip": "random horizontal flips",
    "flip_rot90": "random flips and 90-degree rotations (SAR, astronomy, microscopy)",
    "shift": "random flips and small translations (photos)",
}
