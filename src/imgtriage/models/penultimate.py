"""The penultimate features of any classifier: what its classification head sees.

Out-of-distribution scores are computed in this space (k nearest neighbours of the
L2-normalised features, Sun et al. 2022). Every classifier here ends in one head module
(``get_classifier()`` for timm models, the crop CNNs and fusion nets; ``head`` for the
Siamese cosine head); its input is the feature vector. :class:`WithFeatures` returns it next
to the logits from the same forward pass, so the ONNX export can emit both from one graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from imgtriage.errors import ModelError


def head_of(model: nn.Module) -> nn.Module:
    """The module whose input is the penultimate feature vector."""
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else getattr(model, "head", None)
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        raise ModelError(f"{type(model).__name__} has no classification head to read features "
                         "from; out-of-distribution scores need one (train with --no-ood)")
    return head


class WithFeatures(nn.Module):
    """``model`` returning ``(logits, features)``; features = the head's (flattened) input.

    Example:
        >>> from imgtriage.models import create_model
        >>> net = WithFeatures(create_model("crop_cnn", 3, 1, widths=[4, 8])).eval()
        >>> logits, feats = net(torch.zeros(2, 1, 16, 16))
        >>> tuple(logits.shape), tuple(feats.shape)
        ((2, 3), (2, 8))
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._head = (head_of(model),)  # a tuple: not registered twice as a submodule

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []

        def keep(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            seen.append(inputs[0])

        handle = self._head[0].register_forward_pre_hook(keep)  # only for this pass
        try:
            logits = self.model(*args)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ModelError(f"the head of {type(self.model).__name__} ran {len(seen)} times in "
                             "one forward pass; cannot tell which input is the feature")
        return logits, seen[0].flatten(1)
