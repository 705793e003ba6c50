"""Feature-branch importance of image + feature (fusion) models: gradient x input.

For each image the logit of its predicted class is differentiated with respect to the
standardised feature vector; ``|gradient x feature|`` says how much each feature moved that
logit away from a feature value of 0 (the training mean, after standardisation). Averaged
over a dataset it ranks the header cards, statistics and manifest columns the model uses.

Example:
    >>> import numpy as np, torch
    >>> from imgtriage.models import create_model
    >>> m = create_model("fusion:crop_cnn", num_classes=2, in_chans=1, num_features=3)
    >>> acc = FeatureAttribution(["a", "b", "c"])
    >>> acc.add(m, np.zeros((4, 1, 16, 16), np.float32), np.ones((4, 3), np.float32))
    >>> sorted(acc.result()) == ["a", "b", "c"]
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def gradient_x_input(model: nn.Module, x: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(N, F) gradient x input of each row's predicted-class logit w.r.t. its features."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        ft = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
        ft.requires_grad_(True)
        with torch.enable_grad():
            logits = model(xt, ft)
            chosen = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
            (grad,) = torch.autograd.grad(chosen, ft)
        return (grad * ft).detach().cpu().numpy()
    finally:
        model.train(was_training)


class FeatureAttribution:
    """Running mean of ``|gradient x input|`` per feature over the batches it is given."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self._sum = np.zeros(len(self.names), np.float64)
        self._n = 0

    def add(self, model: nn.Module, x: np.ndarray, features: np.ndarray) -> None:
        gx = gradient_x_input(model, x, features)
        if gx.shape[1] != len(self.names):
            raise ValueError(f"{gx.shape[1]} features but {len(self.names)} names")
        self._sum += np.abs(gx).sum(axis=0)
        self._n += len(gx)

    def result(self) -> dict[str, float]:
        """Feature name -> mean |gradient x input|, largest first (empty before any batch)."""
        if self._n == 0:
            return {}
        mean = self._sum / self._n
        order = np.argsort(-mean, kind="stable")
        return {self.names[i]: float(mean[i]) for i in order}
