"""A strict registry of architectures: name -> builder, with what each one is for.

Example:
    >>> from imgtriage.models import create_model, list_models
    >>> "crop_cnn" in list_models()
    True
    >>> m = create_model("crop_cnn", num_classes=10, in_chans=1)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from imgtriage.errors import ModelError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture: how to build it and what inputs it is meant for."""

    name: str
    builder: Builder
    family: str  # "cnn", "timm", "siamese", "fusion", ...
    default_size: tuple[int, int]
    description: str
    pretrainable: bool = False


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, family: str, default_size: tuple[int, int], description: str,
                   pretrainable: bool = False) -> Callable[[Builder], Builder]:
    """Decorator adding a builder ``fn(num_classes, in_chans, **kw) -> nn.Module``."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ModelError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, fn, family, default_size, description, pretrainable)
        return fn

    return deco


def _ensure_builtins() -> None:
    # Importing the modules registers their builders.
    from imgtriage.models import cnn, fusion, siamese, timm_backbones  # noqa: F401


def list_models(family: str | None = None) -> list[str]:
    _ensure_builtins()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def get_entry(name: str) -> ModelEntry:
    _ensure_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown model {name!r}.{hint} Known models: "
                         f"{', '.join(sorted(_REGISTRY))} (see `imgtriage models`)")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered architecture (or any timm one as ``timm:<name>``, a torchvision
    one as ``torchvision:<name>``, an image + feature model as ``fusion:<backbone>``).

    Unknown names and bad arguments raise ModelError naming the known models.
    ``view_average=["hflip"]`` (what a bundle records when flip TTA is folded into it) makes
    the model average the views before its head (:mod:`imgtriage.models.views`).
    """
    views = kwargs.pop("view_average", None)
    model = _create(name, num_classes, in_chans, **kwargs)
    if views:
        from imgtriage.models.views import average_views

        average_views(model, views)
    return model


def _create(name: str, num_classes: int, in_chans: int, **kwargs: Any) -> nn.Module:
    if num_classes < 2:
        raise ModelError(f"num_classes must be >= 2, got {num_classes}")
    if in_chans < 1:
        raise ModelError(f"in_chans must be >= 1, got {in_chans}")
    if name.startswith("timm:"):
        from imgtriage.models.timm_backbones import create_timm

        return create_timm(name[5:], num_classes, in_chans, **kwargs)
    if name.startswith("torchvision:"):
        from imgtriage.models.torchvision_models import create_torchvision

        return create_torchvision(name[12:], num_classes, in_chans, **kwargs)
    if name.startswith("fusion:"):
        kwargs = {**kwargs, "backbone": name[7:]}
        name = "fusion"
    entry = get_entry(name)
    try:
        return entry.builder(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise ModelError(f"bad arguments for model {name!r}: {exc}") from exc
