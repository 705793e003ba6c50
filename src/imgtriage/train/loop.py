"""fit(): one plain, readable training loop with a validation pass per epoch.

Setup (device, DDP, data sources, sampler, loss, optimiser, schedule, EMA) happens once in
:func:`_setup`; :func:`fit` then runs epochs and fires callbacks at named events
(``on_fit_start``, ``on_epoch_start``, ``on_epoch_end``, ``on_fit_end``, see
:mod:`imgtriage.train.callbacks`). Extensions never rewrite the batch behind the loop's back.
A recipe that does not train logits against labels (few-shot episodes and a metric loss)
plugs in an :class:`~imgtriage.train.objective.Objective`: its sampler, loss and validation
replace the classification ones, and everything else is this loop.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from imgtriage.data.augment import AugmentPolicy
from imgtriage.data.samplers import TrainSampler
from imgtriage.errors import ConfigError
from imgtriage.io import Defect
from imgtriage.train.callbacks import (
    Callback,
    Checkpointer,
    EarlyStopping,
    EpochCallback,
    EpochFunction,
    FreezeBackbone,
    FreezeEarlyStages,
    LoopState,
    MetricsLog,
    restore,
)
from imgtriage.train.config import MODALITIES, TrainConfig, settled
from imgtriage.train.distributed import DistInfo, all_reduce_sum, current_dist
from imgtriage.train.ema import ModelEma
from imgtriage.train.losses import TrainLoss, decided, plan_loss
from imgtriage.train.mix import Mixer
from imgtriage.train.objective import Objective
from imgtriage.train.optim import build_optimizer, scaled_lr, set_backbone_norm_eval
from imgtriage.train.pipeline import ArraySource
from imgtriage.train.schedules import LRSchedule

if TYPE_CHECKING:
    from imgtriage.train.semisup import SemiSupervised

__all__ = ["EpochCallback", "FitResult", "fit", "predict_logits"]


@dataclass
class FitResult:
    """Best weights (by ``select_metric``), the epoch they came from, and every epoch's metrics.

    ``loss_plan`` says which class weights / focal alphas were used, ``stopped_early`` whether
    early stopping ended the run, ``defects`` the files a streaming source could not decode.
    """

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    loss_plan: dict[str, Any] | None = None
    stopped_early: bool = False
    defects: list[Defect] = field(default_factory=list)

    @property
    def best_metrics(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1] if self.history else {}


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 256,
                   features: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """Logits of ``model`` (eval mode) on a stacked input array, batch by batch;
    ``features`` (one standardised row per input) for image + feature (fusion) models."""
    model.eval()
    xt = torch.as_tensor(x)
    ft = None if features is None else torch.as_tensor(features).float()
    dev = next(model.parameters()).device
    outs = [_forward(model, xt[i:i + batch_size].to(dev),
                     None if ft is None else ft[i:i + batch_size].to(dev)).float().cpu()
            for i in range(0, len(xt), batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def _forward(net: nn.Module, xb: torch.Tensor, fb: torch.Tensor | None) -> torch.Tensor:
    """``net(x)``, or ``net(x, features)`` when the batch carries features (fusion)."""
    return net(xb) if fb is None else net(xb, fb)


def _unpack(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor,
                                                     torch.Tensor | None]:
    """A source's batch -> (x, y, features or None)."""
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None)


@dataclass
class _Run:
    """What the epoch functions need besides the LoopState."""

    dist: DistInfo
    device: torch.device
    train: Any
    val: Any
    val_order: list[int]
    criterion: TrainLoss | None  # None: the objective's loss
    augment: AugmentPolicy
    mixer: Mixer
    autocast: Callable[[], Any]
    scaler: Any
    channels_last: bool
    num_classes: int
    loss_plan: dict[str, Any] | None
    semi: SemiSupervised | None = None
    objective: Objective | None = None  # None: classification
    offsets: tuple[float, ...] | None = None  # the prior correction validation decides with


def _source(data: Any) -> Any:
    """A source from ``(x, y)`` / ``(x, y, features)`` arrays, or the source itself."""
    if data is None:
        return None
    src = ArraySource(*data) if isinstance(data, tuple) else data
    return src if len(src) else None


def _precision(cfg: TrainConfig, device: torch.device) -> tuple[Callable[[], Any], Any]:
    on = cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda")
    fp16 = on and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    if not on:
        return contextlib.nullcontext, scaler
    dtype = torch.float16 if fp16 else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype), scaler


def _policies(cfg: TrainConfig, conservative: Sequence[int]) -> tuple[AugmentPolicy, Mixer]:
    cfg = settled(cfg)  # augment "auto" not chosen by --model auto: none
    aug = AugmentPolicy(cfg.augment, cfg.aug_strength, cfg.aug_ops, MODALITIES[cfg.modality],
                        tuple(conservative))
    mixer = Mixer(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_off_epoch,
                  tuple(conservative))
    return aug, mixer


def _setup(model: nn.Module, train_data: Any, val_data: Any, cfg: TrainConfig,
           num_classes: int | None, conservative: Sequence[int],
           semi: SemiSupervised | None = None, objective: Objective | None = None
           ) -> tuple[LoopState, _Run]:
    dist = current_dist(cfg.device)
    device = torch.device(dist.device)
    torch.manual_seed(cfg.seed + dist.rank)
    train, val = _source(train_data), _source(val_data)
    k = num_classes or int(max(train.labels.max(), val.labels.max() if val else 0)) + 1
    # channels_last: 1.2-1.4x faster training on CUDA and on CPU (oneDNN) for every CNN we
    # ship (bench/bench_channels_last.py); other devices keep their default layout
    last = cfg.channels_last == "on" or (cfg.channels_last == "auto"
                                         and device.type in ("cuda", "cpu"))
    model.to(device, memory_format=torch.channels_last if last else torch.preserve_format)
    plan = plan_loss(cfg, train.labels, k) if objective is None else None
    sampler = (objective.sampler(train.labels, cfg.seed, dist) if objective is not None else
               TrainSampler(train.labels, seed=cfg.seed, balanced=cfg.balanced_sampling,
                            max_repeat=cfg.max_repeat, num_replicas=dist.world_size,
                            rank=dist.rank))
    opt = build_optimizer(model, cfg, scaled_lr(cfg, dist.world_size))
    steps_per_epoch = max(1, math.ceil(len(sampler) / cfg.batch_size))
    schedule = LRSchedule.from_config(opt, cfg, steps_per_epoch)
    if semi is not None:
        semi.bind(steps_per_epoch * cfg.epochs)
    ema = ModelEma(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    state = LoopState(cfg, model, opt, schedule, sampler, ema, is_main=dist.is_main, semi=semi,
                      objective=objective, frozen_norm=cfg.backbone_norm == "frozen")
    autocast, scaler = _precision(cfg, device)
    aug, mixer = _policies(cfg, conservative)
    n_val = len(val) if val else 0
    run = _Run(dist, device, train, val, list(range(dist.rank, n_val, dist.world_size)),
               None if plan is None else TrainLoss.from_plan(plan, k).to(device), aug, mixer,
               autocast, scaler, last, k, None if plan is None else plan.to_dict(), semi,
               objective, None if plan is None else plan.prior_offsets)
    return state, run


def _net(state: LoopState, run: _Run) -> nn.Module:
    """The module the loop calls: DDP-wrapped under torchrun (rebuilt after freezing)."""
    if state.net is None:
        state.net = state.model
        if run.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [run.device.index] if run.device.type == "cuda" else None
            state.net = DistributedDataParallel(state.model, device_ids=ids)
    return state.net


def _step(state: LoopState, run: _Run, net: nn.Module, xb: torch.Tensor, ya: torch.Tensor,
          yb: torch.Tensor, lam: float, fb: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, clip, optimiser and schedule step on one batch: (loss, hits), hits
    being the correct answers (classification) or the objective's ``stat`` x batch size.

    Rows of ``xb`` beyond the labels are the semi-supervised extension's unlabelled views:
    they share the forward pass (and batch norm) and add its loss."""
    guard = (run.semi.bn_guard(state.model, len(ya)) if run.semi is not None
             else contextlib.nullcontext())
    with run.autocast(), guard:
        out = _forward(net, xb, fb)
        if run.objective is not None:
            loss, stat = run.objective.loss(out, ya)
            hits = torch.tensor(stat * len(ya))
        else:
            logits = out[:len(ya)]
            loss = run.criterion(logits, ya)
            if lam < 1.0:
                loss = lam * loss + (1 - lam) * run.criterion(logits, yb)
            if run.semi is not None and len(out) > len(ya):
                loss = loss + run.semi.loss(out[len(ya):])
            hits = (logits.detach().argmax(1) == ya).sum()
    state.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if state.cfg.grad_clip > 0:
        run.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), state.cfg.grad_clip)
    run.scaler.step(state.optimizer)
    run.scaler.update()
    state.schedule.step_batch()
    if state.ema is not None:
        state.ema.update(state.model)
    return loss.detach(), hits


def _train_epoch(state: LoopState, run: _Run, advance: Callable[[int], None]
                 ) -> dict[str, float]:
    cfg, epoch = state.cfg, state.epoch
    net = _net(state, run)
    net.train()
    if state.frozen_norm:
        set_backbone_norm_eval(state.model)
    state.sampler.set_epoch(epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + run.dist.rank)
    mixing = run.mixer.active(epoch)
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in run.train.batches(state.sampler, cfg.batch_size):
        xb, yb, fb = _unpack(batch)
        if len(yb) < 2 and not run.dist.distributed:
            continue  # BatchNorm cannot train on a batch of one
        xb = run.augment(xb, yb, g)
        ya, yb2, lam = yb, yb, 1.0
        if mixing:
            xb, ya, yb2, lam, fb = run.mixer.mix(xb, yb, g, fb)
        if run.semi is not None:  # the extension's own unlabelled batch rides along
            xb = torch.cat([xb, run.semi.draw(cfg.batch_size, g, state.eval_model())])
        xb = xb.to(run.device, non_blocking=True,
                   memory_format=torch.channels_last if run.channels_last else
                   torch.preserve_format)
        ya, yb2 = ya.to(run.device, non_blocking=True), yb2.to(run.device, non_blocking=True)
        fb = None if fb is None else fb.to(run.device, non_blocking=True)
        loss, hits = _step(state, run, net, xb, ya, yb2, lam, fb)
        n = len(ya)
        sums += torch.stack([loss.double().cpu() * n, hits.double().cpu(),
                             torch.tensor(float(n), dtype=torch.float64)])
        advance(n)
    loss_sum, hits, total = all_reduce_sum(sums, run.dist).tolist()
    stat = run.objective.stat if run.objective is not None else "train_accuracy"
    out = {"train_loss": loss_sum / max(total, 1), stat: hits / max(total, 1)}
    if run.semi is not None:
        out.update(run.semi.epoch_metrics(int(total)))
    return out


def _confusion_metrics(conf: np.ndarray, loss_sum: float) -> dict[str, float]:
    total = conf.sum()
    support, predicted, hits = conf.sum(1), conf.sum(0), np.diag(conf)
    present = support > 0
    recall = np.divide(hits, support, out=np.zeros(len(hits)), where=present)
    precision = np.divide(hits, predicted, out=np.zeros(len(hits)), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(len(hits)), where=denom > 0)
    labelled = present | (predicted > 0)
    return {"val_loss": float(loss_sum / max(total, 1)),
            "val_accuracy": float(hits.sum() / max(total, 1)),
            "val_balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
            "val_macro_f1": float(f1[labelled].mean()) if labelled.any() else 0.0}


@torch.no_grad()
def _validate(state: LoopState, run: _Run) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy and macro F1 on the validation split (all ranks)."""
    if run.val is None:
        return {}
    if run.objective is not None:
        return run.objective.validate(state.eval_model(), run.train, run.val)
    model, k = state.eval_model(), run.num_classes
    model.eval()
    conf = torch.zeros(k * k, dtype=torch.float64)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    for batch in run.val.batches(run.val_order, state.cfg.batch_size * 2):
        xb, yb, fb = _unpack(batch)
        xb = xb.to(run.device, memory_format=torch.channels_last if run.channels_last else
                   torch.preserve_format)
        fb = None if fb is None else fb.to(run.device)
        with run.autocast():
            logits = _forward(model, xb, fb).float().cpu()
        loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
        conf += torch.bincount(yb * k + decided(logits, run.offsets), minlength=k * k).double()
    stats = all_reduce_sum(torch.cat([conf, loss_sum]), run.dist)
    return _confusion_metrics(stats[:-1].view(k, k).numpy(), float(stats[-1]))


def _record(state: LoopState, metrics: dict[str, float], has_val: bool) -> None:
    """Append the epoch's metrics; keep the weights when they are the best so far."""
    state.metrics = metrics
    state.history.append(metrics)
    key = state.cfg.select_metric
    value = metrics[key] if has_val else float(state.epoch)
    best, delta = state.best_value, state.cfg.min_delta if has_val else 0.0
    lower = has_val and key == "val_loss"
    if best is None or (value < best - delta if lower else value > best + delta):
        state.best_value, state.best_epoch = value, state.epoch
        state.best_state = copy.deepcopy(state.eval_model().state_dict())


def _callbacks(cfg: TrainConfig, log_path: str | Path | None, checkpoint_dir: str | Path | None,
               extra: Sequence[Callback | EpochCallback]) -> list[Callback]:
    cbs: list[Callback] = []
    if cfg.freeze_epochs or cfg.freeze_backbone:
        cbs.append(FreezeBackbone(cfg.freeze_epochs, permanent=cfg.freeze_backbone))
    if cfg.freeze_stages and not cfg.freeze_backbone:
        cbs.append(FreezeEarlyStages(cfg.freeze_stages))
    cbs += [MetricsLog(log_path)] if log_path else []
    cbs += [EarlyStopping(cfg.patience)] if cfg.patience else []
    cbs += [c if isinstance(c, Callback) else EpochFunction(c) for c in extra]
    if checkpoint_dir and cfg.checkpoint_every:
        cbs.append(Checkpointer(checkpoint_dir, cfg.checkpoint_every))  # last: saves it all
    return cbs


def _fire(cbs: Sequence[Callback], event: str, state: LoopState) -> None:
    for cb in cbs:
        getattr(cb, event)(state)


class PlainProgress:
    """The progress of :func:`fit` when stderr is not a terminal (a log file, CI, a pipe):
    one plain line per finished epoch instead of a live bar that a log never shows.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with PlainProgress(out) as bar:
        ...     t = bar.add_task("train", total=10, epoch=1, epochs=2, msg="")
        ...     bar.advance(t, 10)
        ...     bar.update(t, msg="train_loss=0.5")
        >>> out.getvalue().splitlines()
        ['epoch 1/2: 10 img train_loss=0.5']
    """

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.fields: dict[str, Any] = {}
        self.completed = 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def add_task(self, _name: str, total: int, **fields: Any) -> int:
        self.reset(0, total=total, **fields)
        return 0

    def reset(self, _task: int, total: int, **fields: Any) -> None:
        self.fields, self.completed = dict(fields), 0

    def advance(self, _task: int, n: int) -> None:
        self.completed += n

    def update(self, _task: int, msg: str = "") -> None:
        import sys

        f = self.fields
        print(f"epoch {f.get('epoch')}/{f.get('epochs')}: {self.completed} img {msg}".rstrip(),
              file=self.stream or sys.stderr, flush=True)


def _progress(enabled: bool) -> Any:
    import sys

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if enabled and not sys.stderr.isatty():
        return PlainProgress()
    return Progress(TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
                    BarColumn(), TextColumn("{task.completed}/{task.total} img"),
                    TextColumn("{task.fields[msg]}"), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


def fit(model: nn.Module, train_xy: tuple[np.ndarray, np.ndarray] | Any,
        val_xy: tuple[np.ndarray, np.ndarray] | Any | None, cfg: TrainConfig, *,
        log_path: str | Path | None = None, show_progress: bool = True,
        callbacks: Sequence[Callback | EpochCallback] = (),
        checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None,
        num_classes: int | None = None, conservative: Sequence[int] = (),
        unlabeled: SemiSupervised | None = None, objective: Objective | None = None
        ) -> FitResult:
    """Train ``model`` per ``cfg``; keep the best epoch by ``cfg.select_metric``.

    ``train_xy``/``val_xy`` are ``(x, y)`` arrays or a source from
    :mod:`imgtriage.train.pipeline` (e.g. a streaming :class:`FileSource`). Each epoch ends
    with a validation pass and one JSON line in ``log_path``; ``checkpoint_dir`` receives
    resumable checkpoints and ``resume_from`` continues one exactly. ``conservative`` are
    class ids that only get geometric augmentation. ``unlabeled`` adds a semi-supervised
    loss on unlabelled images to every step (:mod:`imgtriage.train.semisup`).
    ``objective`` replaces classification's sampler, loss and validation (few-shot episodes
    and a metric loss, :mod:`imgtriage.train.objective`). Under torchrun the model is
    wrapped in DDP and every process must call fit.

    Example:
        >>> res = fit(model, (x_tr, y_tr), (x_va, y_va), TrainConfig(epochs=3))  # doctest: +SKIP
        >>> res.best_epoch, res.best_metrics["val_accuracy"]  # doctest: +SKIP
    """
    state, run = _setup(model, train_xy, val_xy, cfg, num_classes, conservative, unlabeled,
                        objective)
    if objective is not None and (unlabeled is not None or run.mixer.enabled):
        raise ConfigError("mixing (--mixup-alpha/--cutmix-alpha) and --unlabeled train "
                          "logits against labels; drop them for a few-shot/metric objective")
    cbs = _callbacks(cfg, log_path, checkpoint_dir, callbacks)
    if resume_from is not None:
        restore(state, resume_from)
    _fire(cbs, "on_fit_start", state)
    with _progress(show_progress and state.is_main) as bar:
        task = bar.add_task("train", total=len(state.sampler), epoch=1, epochs=cfg.epochs, msg="")
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            if state.stop:
                break
            state.epoch = epoch
            bar.reset(task, total=len(state.sampler), epoch=epoch, epochs=cfg.epochs, msg="")
            _fire(cbs, "on_epoch_start", state)
            t0 = time.perf_counter()
            metrics = _train_epoch(state, run, lambda n: bar.advance(task, n))
            metrics.update(_validate(state, run))
            state.schedule.step_epoch(metrics.get(cfg.select_metric))
            metrics.update(epoch=epoch, lr=state.optimizer.param_groups[-1]["lr"],
                           seconds=round(time.perf_counter() - t0, 3))
            _record(state, metrics, run.val is not None)
            bar.update(task, msg=" ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                          if k.endswith(("loss", "accuracy", "img_per_s"))))
            _fire(cbs, "on_epoch_end", state)
    _fire(cbs, "on_fit_end", state)
    model.load_state_dict(state.best_state)
    return FitResult(state.best_state, state.best_epoch, state.history, run.loss_plan,
                     state.stopped_early, [*getattr(run.train, "defects", []),
                                           *getattr(run.val, "defects", [])])
