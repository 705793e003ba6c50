"""fit(): one plain, readable training loop with a validation pass per epoch.

Extensions hook in through callbacks at named events (``on_epoch_end``); they never rewrite
the batch behind the loop's back.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgtriage.data.augment import augment_batch
from imgtriage.train.config import TrainConfig

EpochCallback = Callable[[int, dict[str, float], nn.Module], None]


@dataclass
class FitResult:
    """Best weights (by ``select_metric``), the epoch they came from, and every epoch's metrics."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def best_metrics(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1] if self.history else {}


def _batches(n: int, batch_size: int, g: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 256
                   ) -> np.ndarray:
    """Logits of ``model`` (eval mode) on a stacked input array, batch by batch."""
    model.eval()
    xt = torch.as_tensor(x)
    outs = [model(xt[i:i + batch_size]).float() for i in range(0, len(xt), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int) -> dict[str, float]:
    logits = torch.as_tensor(predict_logits(model, x, bs))
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return {"val_loss": loss, "val_accuracy": acc}


def _is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "val_loss" else value > best


def _train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 opt: torch.optim.Optimizer, sched: Any, g: torch.Generator,
                 advance: Callable[[int], None]) -> dict[str, float]:
    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    for idx in _batches(len(x), cfg.batch_size, g):
        if len(idx) < 2 and len(x) > 1:
            continue  # BatchNorm cannot train on a batch of one
        xb = augment_batch(x[idx], cfg.augment, g)
        yb = y[idx]
        logits = model(xb)
        loss = nn.functional.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += len(idx)
        correct += (logits.argmax(1) == yb).sum().item()
        loss_sum += loss.item() * len(idx)
        advance(len(idx))
    return {"train_loss": loss_sum / max(total, 1), "train_accuracy": correct / max(total, 1)}


def fit(model: nn.Module, train_xy: tuple[np.ndarray, np.ndarray],
        val_xy: tuple[np.ndarray, np.ndarray] | None, cfg: TrainConfig, *,
        log_path: str | Path | None = None, show_progress: bool = True,
        callbacks: Sequence[EpochCallback] = ()) -> FitResult:
    """Train ``model`` with AdamW + cross entropy + a cosine schedule; keep the best epoch.

    Each epoch ends with a validation pass (when ``val_xy`` is given) and one JSON line in
    ``log_path``. Returns the best weights by ``cfg.select_metric`` (the last epoch without
    validation data).

    Example:
        >>> res = fit(model, (x_tr, y_tr), (x_va, y_va), TrainConfig(epochs=3))  # doctest: +SKIP
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.as_tensor(train_xy[0]), torch.as_tensor(train_xy[1])
    val = (torch.as_tensor(val_xy[0]), torch.as_tensor(val_xy[1])) if val_xy and len(
        val_xy[0]) else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, math.ceil(len(x) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps + 1,
                                                pct_start=0.15)
    result, best = FitResult({}, 0), None
    with Progress(TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                  BarColumn(), TextColumn("{task.completed}/{task.total} img"),
                  TextColumn("{task.fields[msg]}"), TimeRemainingColumn(),
                  disable=not show_progress, transient=False) as progress:
        task = progress.add_task("train", total=len(x), epoch=1, epochs=cfg.epochs, msg="")
        for epoch in range(1, cfg.epochs + 1):
            progress.reset(task, total=len(x), epoch=epoch, epochs=cfg.epochs, msg="")
            t0 = time.perf_counter()
            metrics = _train_epoch(model, x, y, cfg, opt, sched, g,
                                   lambda n: progress.advance(task, n))
            if val is not None:
                metrics.update(_evaluate(model, val[0], val[1], cfg.batch_size * 2))
            metrics.update(epoch=epoch, lr=opt.param_groups[0]["lr"],
                           seconds=round(time.perf_counter() - t0, 3))
            result.history.append(metrics)
            key = cfg.select_metric if val is not None else "epoch"
            value = metrics[key] if val is not None else float(epoch)
            if _is_better(key, value, best):
                best, result.best_epoch = value, epoch
                result.best_state = copy.deepcopy(model.state_dict())
            progress.update(task, msg=" ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                               if k.endswith(("loss", "accuracy"))))
            if log_path:
                with Path(log_path).open("a") as log:
                    log.write(json.dumps(metrics) + "\n")
            for cb in callbacks:
                cb(epoch, metrics, model)
    model.load_state_dict(result.best_state)
    return result
