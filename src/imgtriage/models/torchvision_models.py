"""torchvision architectures by name (``torchvision:<name>``), for models trained elsewhere.

``imgtriage import`` wraps a torchvision ``state_dict`` into a bundle: the bundle names the
architecture ``torchvision:resnet50`` and this builder makes it again, with fresh weights that
the bundle's verified weights then replace. Nothing is downloaded (``weights=None``).

Example:
    >>> m = create_torchvision("resnet18", num_classes=3)
    >>> m.fc.out_features
    3
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from imgtriage.errors import ModelError


def create_torchvision(name: str, num_classes: int, in_chans: int = 3, **kw: Any) -> nn.Module:
    """Build torchvision model ``name`` with ``num_classes`` outputs and untrained weights."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"torchvision has no classification model {name!r}.{hint} See "
                         "torchvision.models.list_models() (--arch torchvision:<name>)")
    if in_chans != 3:
        raise ModelError(f"torchvision:{name} takes 3-channel input, not {in_chans}; use a "
                         "timm architecture for other channel counts (--arch)")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"bad arguments for torchvision:{name}: {exc}") from exc
