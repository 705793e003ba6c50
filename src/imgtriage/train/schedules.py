"""Learning-rate schedules as pure functions of the step, so resuming is exact.

Each optimizer group's LR is ``group["base_lr"] * multiplier``: one-cycle (cosine up over the
first 15% of steps from 1/25, then cosine down to 1/250000), warmup + cosine (to
``min_lr_ratio``), plateau (warmup, then ×``factor`` whenever the selection metric stalls
for ``patience`` epochs) and constant (after warmup). The state is two or three numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from imgtriage.train.config import TrainConfig


def _cos(a: float, b: float, frac: float) -> float:
    return b + (a - b) * (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0))) / 2


class LRSchedule:
    """Sets every group's LR before each optimisation step.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([{"params": [p], "lr": 0.1, "base_lr": 0.1}], lr=0.1)
        >>> s = LRSchedule(opt, "cosine", total_steps=10, warmup_steps=0)
        >>> round(s.multiplier(5), 3)
        0.5
    """

    def __init__(self, opt: torch.optim.Optimizer, kind: str, total_steps: int,
                 warmup_steps: int = 0, min_lr_ratio: float = 0.0, patience: int = 2,
                 factor: float = 0.3, maximize: bool = True, pct_start: float = 0.15) -> None:
        self.opt, self.kind = opt, kind
        self.total, self.warmup = max(1, total_steps), max(0, warmup_steps)
        self.min_ratio, self.patience, self.factor = min_lr_ratio, patience, factor
        self.maximize, self.pct_start = maximize, pct_start
        self.step_count, self.cuts, self.bad_epochs = 0, 0, 0
        self.best: float | None = None
        self._apply()

    @classmethod
    def from_config(cls, opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                    ) -> LRSchedule:
        return cls(opt, cfg.schedule, cfg.epochs * steps_per_epoch,
                   round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr_ratio,
                   cfg.plateau_patience, cfg.plateau_factor,
                   maximize=cfg.select_metric != "val_loss")

    def multiplier(self, step: int) -> float:
        if self.kind == "onecycle":
            up = max(1, int(self.pct_start * self.total))
            if step < up:
                return _cos(1 / 25, 1.0, step / up)
            return _cos(1.0, 1 / 25 / 1e4, (step - up) / max(1, self.total - up))
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "cosine":
            frac = (step - self.warmup) / max(1, self.total - self.warmup)
            return _cos(1.0, self.min_ratio, frac)
        if self.kind == "plateau":
            return self.factor ** self.cuts
        return 1.0

    def _apply(self) -> None:
        m = self.multiplier(self.step_count)
        for g in self.opt.param_groups:
            g["lr"] = g.get("base_lr", g["lr"]) * m

    def step_batch(self) -> None:
        """Call after every optimiser step."""
        self.step_count += 1
        self._apply()

    def step_epoch(self, value: float | None) -> None:
        """Call after validation; only plateau uses the metric."""
        if self.kind != "plateau" or value is None:
            return
        better = self.best is None or (value > self.best if self.maximize else value < self.best)
        if better:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.cuts, self.bad_epochs = self.cuts + 1, 0
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "step": self.step_count, "cuts": self.cuts,
                "bad_epochs": self.bad_epochs, "best": self.best, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.cuts = int(state["step"]), int(state["cuts"])
        self.bad_epochs, self.best = int(state["bad_epochs"]), state["best"]
        self._apply()
