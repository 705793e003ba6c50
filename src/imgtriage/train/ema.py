"""Exponential moving average of the weights (validated and saved instead of the raw weights).

The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates so that
the average is not dominated by the random initialisation; buffers (BatchNorm statistics)
are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """Shadow copy of a model updated after every optimiser step.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> ema = ModelEma(net, decay=0.9)
        >>> ema.update(net)
        >>> ema.updates
        1
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0
        self._averaged = {n for n, p in self.module.named_parameters()
                          if p.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            target = ema_state[name]
            if name in self._averaged:
                target.mul_(d).add_(value.detach(), alpha=1 - d)
            else:
                target.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = int(updates)
