"""The loop's state and the callbacks that hook into it at named events.

Events, in order: ``on_fit_start`` (after setup and any resume), then per epoch
``on_epoch_start`` and ``on_epoch_end`` (after validation and best-weights tracking), and
``on_fit_end``. Callbacks read and change :class:`LoopState` (set ``stop``, freeze layers,
save files); they never touch a batch. A plain function ``fn(epoch, metrics, model)`` is also
accepted and runs at ``on_epoch_end``.

Example:
    >>> class PrintAccuracy(Callback):
    ...     def on_epoch_end(self, state):
    ...         print(state.epoch, state.metrics.get("val_accuracy"))
    >>> # fit(model, train, val, cfg, callbacks=[PrintAccuracy()])
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgtriage.train.config import TrainConfig

EpochCallback = Callable[[int, dict[str, float], nn.Module], None]


@dataclass
class LoopState:
    """Everything the loop owns; callbacks receive it at every event.

    ``model`` is the plain module (never the DDP wrapper); ``net`` is what the loop calls
    (the DDP wrapper under torchrun, rebuilt when ``net`` is set to None).
    """

    cfg: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    sampler: Any
    ema: Any = None
    net: nn.Module | None = None
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float | None = None
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    stop: bool = False
    stopped_early: bool = False
    is_main: bool = True
    frozen_norm: bool = False  # keep the backbone's batch-norm layers in eval mode
    # (--backbone-norm frozen, or a backbone frozen for the whole run)
    extras: dict[str, Any] = field(default_factory=dict)
    semi: Any = None  # the semi-supervised extension (train/semisup.py), saved with the state
    objective: Any = None  # what is trained when not classification (train/objective.py)

    def eval_model(self) -> nn.Module:
        """The weights that are validated and saved: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model


class Callback:
    """Base class: override the events you need."""

    def on_fit_start(self, state: LoopState) -> None:
        pass

    def on_epoch_start(self, state: LoopState) -> None:
        pass

    def on_epoch_end(self, state: LoopState) -> None:
        pass

    def on_fit_end(self, state: LoopState) -> None:
        pass


class EpochFunction(Callback):
    """Adapts ``fn(epoch, metrics, model)`` to ``on_epoch_end``."""

    def __init__(self, fn: EpochCallback) -> None:
        self.fn = fn

    def on_epoch_end(self, state: LoopState) -> None:
        self.fn(state.epoch, state.metrics, state.model)


class MetricsLog(Callback):
    """One JSON line per epoch (process 0 only); a resumed run rewrites the restored lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_start(self, state: LoopState) -> None:
        if state.is_main:
            self.path.write_text("".join(json.dumps(m) + "\n" for m in state.history))

    def on_epoch_end(self, state: LoopState) -> None:
        if state.is_main:
            with self.path.open("a") as fh:
                fh.write(json.dumps(state.metrics) + "\n")


class EarlyStopping(Callback):
    """Stop when the selection metric has not improved for ``patience`` epochs."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, state: LoopState) -> None:
        if self.patience and state.epoch - state.best_epoch >= self.patience:
            state.stop = state.stopped_early = True


class FreezeBackbone(Callback):
    """Train only the head for the first ``epochs`` epochs, then everything.

    ``permanent`` (``--freeze-backbone``) freezes it for the whole run, batch-norm running
    statistics included (the loop keeps those layers in eval mode).
    """

    def __init__(self, epochs: int, permanent: bool = False) -> None:
        self.epochs = epochs
        self.permanent = permanent
        self.frozen: bool | None = None

    def on_fit_start(self, state: LoopState) -> None:
        state.frozen_norm = self.permanent or state.frozen_norm

    def on_epoch_start(self, state: LoopState) -> None:
        from imgtriage.train.optim import set_backbone_frozen

        frozen = self.permanent or state.epoch <= self.epochs
        if frozen != self.frozen:
            set_backbone_frozen(state.model, frozen)
            state.net = None  # the DDP wrapper must see the new set of trainable parameters
            self.frozen = frozen


class FreezeEarlyStages(Callback):
    """``--freeze-stages N``: the stem and the first N stages stay frozen for the whole run
    (after :class:`FreezeBackbone` unfreezes the rest); their batch norm keeps training."""

    def __init__(self, stages: int) -> None:
        self.stages = stages

    def on_epoch_start(self, state: LoopState) -> None:
        from imgtriage.train.optim import early_names, set_early_frozen

        names = early_names(state.model, self.stages)
        if any(p.requires_grad for n, p in state.model.named_parameters() if n in names):
            set_early_frozen(state.model, self.stages)
            state.net = None  # the DDP wrapper must see the new set of trainable parameters


class Checkpointer(Callback):
    """Save a resumable checkpoint every ``every`` epochs, at the last epoch and on stop."""

    def __init__(self, directory: str | Path, every: int) -> None:
        self.directory, self.every = Path(directory), every

    def on_epoch_end(self, state: LoopState) -> None:
        last = state.epoch == state.cfg.epochs or state.stop
        if not self.every or not (last or state.epoch % self.every == 0):
            return
        if state.is_main:
            save(self.directory, state)
        from imgtriage.train.distributed import barrier, current_dist

        barrier(current_dist(state.cfg.device))


def save(directory: str | Path, state: LoopState) -> Path:
    """Write ``state`` as a checkpoint (see :mod:`imgtriage.train.checkpoint`)."""
    from imgtriage.train.checkpoint import save_checkpoint

    weights = {"model": state.model.state_dict(), "best": state.best_state,
               "ema": state.ema.state_dict() if state.ema is not None else {}}
    meta = {"epoch": state.epoch, "history": state.history, "best_epoch": state.best_epoch,
            "best_value": state.best_value, "stop": state.stop,
            "stopped_early": state.stopped_early, "schedule": state.schedule.state_dict(),
            "sampler": state.sampler.state_dict(),
            "ema_updates": state.ema.updates if state.ema is not None else 0,
            "config": state.cfg.to_dict(),
            "unlabeled": state.semi.state_dict() if state.semi is not None else None,
            "objective": (state.objective.settings() if state.objective is not None
                          else None)}
    return save_checkpoint(directory, weights=weights, optimizer=state.optimizer, state=meta)


def restore(state: LoopState, path: str | Path) -> None:
    """Put a checkpoint back into ``state`` (model, optimizer, schedule, sampler, EMA, RNG)."""
    from imgtriage.errors import ConfigError
    from imgtriage.train.checkpoint import load_checkpoint, restore_optimizer, set_rng_state

    ckpt = load_checkpoint(path)
    meta = ckpt.state
    saved, now = meta["config"], json.loads(json.dumps(state.cfg.to_dict()))
    ignore = {"num_threads", "decode_workers", "workers", "device", "cache", "cache_limit_gb",
              "given"}
    from imgtriage.train.config import field_default

    # a setting added after the checkpoint was made matches when it is at its default
    diff = sorted(k for k in now if k not in ignore
                  and saved.get(k, json.loads(json.dumps(field_default(k)))) != now[k])
    mine = (json.loads(json.dumps(state.objective.settings()))
            if state.objective is not None else None)
    theirs = meta.get("objective")
    if isinstance(mine, dict) and isinstance(theirs, dict):
        diff += sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    elif mine != theirs:
        diff.append("objective")
    if diff:
        raise ConfigError(f"the checkpoint was made with different settings for {diff}; "
                          "resume with the same settings (see its state.json) (--resume)")
    state.model.load_state_dict(ckpt.part("model"))
    state.best_state = ckpt.part("best")
    if state.ema is not None:
        state.ema.load_state_dict(ckpt.part("ema"), meta["ema_updates"])
    restore_optimizer(state.optimizer, ckpt)
    state.schedule.load_state_dict(meta["schedule"])
    state.sampler.load_state_dict(meta["sampler"])
    if state.semi is not None and meta.get("unlabeled") is not None:
        state.semi.load_state_dict(meta["unlabeled"])
    set_rng_state(ckpt.optim, meta["rng"])
    state.epoch, state.history = int(meta["epoch"]), list(meta["history"])
    state.best_epoch, state.best_value = int(meta["best_epoch"]), meta["best_value"]
    state.stop, state.stopped_early = bool(meta["stop"]), bool(meta["stopped_early"])
