"""Flip test-time augmentation inside the model: the image and its mirror, one answer.

:func:`average_views` makes a classifier run every input as itself and as each view (the
mirror, ``hflip``) in one batch and average the views' penultimate features before its head.
The head is linear, so the logits are the average of the views' logits, and the features
(what :class:`~imgtriage.models.penultimate.WithFeatures` and the OOD scorer read) are the
averaged ones the head saw. It is done with two forward pre-hooks, so the state dict keeps
the model's own names (a bundle's weights load the same with or without it) and the ONNX
export traces it: ``predict``, ``serve``, Ray and Celery get it from the graph, with no
option. A bundle records it as the model keyword ``view_average`` (``create_model`` installs
the hooks), so torch and ONNX backends build the same network.

Example:
    >>> import torch
    >>> from imgtriage.models import create_model
    >>> net = create_model("crop_cnn", 3, 1, widths=[4, 8], view_average=["hflip"]).eval()
    >>> x = torch.rand(2, 1, 16, 16)
    >>> bool(torch.allclose(net(x), net(x.flip(-1)), atol=1e-5))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from imgtriage.errors import ModelError
from imgtriage.models.penultimate import head_of

VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot180": lambda x: x.flip(-2, -1),
}


class ViewHooks:
    """The two hooks: inputs -> [inputs, view(inputs)...] on the model, and the views'
    features -> their mean on the head. ``remove()`` restores the plain model."""

    def __init__(self, model: nn.Module, views: Sequence[str]) -> None:
        unknown = [v for v in views if v not in VIEWS]
        if unknown or not views:
            raise ModelError(f"view_average takes a non-empty list among {sorted(VIEWS)}, "
                             f"got {list(views)!r}")
        self.views = tuple(views)
        k = len(self.views) + 1
        fns = [VIEWS[v] for v in self.views]

        def expand(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            if len(args) != 1:
                raise ModelError("view_average needs a model with one image input (an "
                                 "image + feature model cannot average views)")
            x = args[0]
            return (torch.cat([x, *(f(x) for f in fns)]),)

        def mean(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            f = args[0]
            return (f.reshape(k, -1, *f.shape[1:]).mean(0), *args[1:])

        self._handles = [model.register_forward_pre_hook(expand),
                         head_of(model).register_forward_pre_hook(mean)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def average_views(model: nn.Module, views: Sequence[str]) -> ViewHooks:
    """Make ``model`` average ``views`` (and the input itself) before its head; in place.
    Returns the hooks (``remove()`` undoes it). The head must be the last module to see
    the batch (true of every classifier here: timm's, the crop CNNs)."""
    return ViewHooks(model, views)
