"""Fast transfer learning on CPUs: the head trained in seconds on cached embeddings.

With pretrained weights and a frozen backbone (``--freeze-backbone``, or the first
``--freeze-epochs`` of a fine-tuning run), the backbone's output for an image never changes,
so every image goes through it once (:mod:`imgtriage.train.embed_cache`, cached on disk) and
the classifier head is trained on the embeddings for ``--head-epochs`` (each a fraction of a
second). With ``--freeze-epochs`` the run then fine-tunes the whole network (``--layer-decay``
gives the early stages smaller learning rates) from that head. The result is an ordinary
model: the bundle does not know how it was trained.

Example:
    >>> import torch
    >>> from imgtriage.train.config import TrainConfig
    >>> from imgtriage.train.embed_cache import Embedded
    >>> from imgtriage.train.losses import plan_loss
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(60, 8, generator=g).numpy(); y = (x[:, 0] > 0).astype("int64")
    >>> cfg = TrainConfig(head_epochs=60)
    >>> res = fit_head(torch.nn.Linear(8, 2), Embedded(x, y), Embedded(x, y), cfg,
    ...                plan_loss(cfg, y, 2))
    >>> res.best_metrics["val_accuracy"] > 0.8
    True
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgtriage.data.preprocess import PreprocessSpec
from imgtriage.models.pretrained import WeightsPlan
from imgtriage.train.callbacks import Callback, LoopState
from imgtriage.train.config import TrainConfig
from imgtriage.train.embed_cache import (
    Embedded,
    Embedder,
    EmbeddingStore,
    cache_root,
    embed_samples,
)
from imgtriage.train.loop import FitResult, _confusion_metrics
from imgtriage.train.losses import LossPlan, TrainLoss, decided

HEAD_BATCH = 64
LR_CHECK_RATIO = 1.5  # first fine-tuning epoch's validation loss over the head's that trips
LR_CHECK_FACTOR = 0.1  # the rate of the retry, as a share of the rate that tripped
MIN_HEAD_STEPS = 1200  # small splits go over the embeddings several times per head epoch


def cached_head_applies(cfg: TrainConfig, plan: WeightsPlan, distributed: bool) -> bool:
    """Whether the head can be trained on cached embeddings for this run: pretrained weights,
    a timm backbone frozen for the head phase, no feature fusion, no unlabelled images."""
    return (plan.active and (cfg.freeze_backbone or cfg.freeze_epochs > 0)
            and not cfg.model.startswith("fusion")
            and not cfg.unlabeled and not distributed)


def _metrics(head: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int,
             offsets: tuple[float, ...] | None = None) -> dict[str, float]:
    with torch.no_grad():
        logits = head(x)
        conf = torch.bincount(y * k + decided(logits, offsets), minlength=k * k).double()
        nll = nn.functional.cross_entropy(logits, y, reduction="sum").item()
    return _confusion_metrics(conf.view(k, k).numpy(), nll)


def _better(value: float, best: float | None, key: str) -> bool:
    return best is None or (value < best if key == "val_loss" else value > best)


def _fold(head: nn.Linear, state: dict[str, torch.Tensor], mu: torch.Tensor,
          sigma: torch.Tensor) -> None:
    """Load a head trained on standardised embeddings as one on the raw embeddings:
    ``W (x - mu) / sigma + b == (W / sigma) x + (b - (W / sigma) mu)``."""
    w = state["weight"] / sigma
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(state["bias"] - w @ mu)


def fit_head(head: nn.Linear, tr: Embedded, va: Embedded | None, cfg: TrainConfig,
             lplan: LossPlan, *, log: Callable[[dict[str, float]], None] | None = None
             ) -> FitResult:
    """Train a linear head on embeddings; keep the best epoch by ``--select-metric`` on the
    validation embeddings, written into ``head`` (``best_state`` is the head's).

    The embeddings are standardised with the training split's mean/std while training
    (pretrained features differ in scale by orders of magnitude: without it, a few hundred
    steps leave the head far from converged), and the scaling is folded into the weights
    afterwards, so the head stays one plain Linear layer on the backbone's features.
    AdamW, batches of 64, cosine to 0 over ``--head-epochs``; at least 1,200 steps in all (a
    small split is gone over several times per epoch).
    """
    k = head.out_features
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = torch.from_numpy(tr.x), torch.from_numpy(tr.y)
    sigma = x.std(0)
    # floor at a tenth of the median scale: a nearly constant feature (grey tiles have some)
    # would otherwise get a weight / sigma in the thousands once folded, and the first
    # fine-tuning steps, which move that feature a little, blew the loss up to ~30
    mu, sigma = x.mean(0), sigma.clamp_min(max(1e-6, 0.1 * float(sigma.median())))
    x = (x - mu) / sigma
    use_val = va is not None and len(va.y) > 0
    xv = (torch.from_numpy(va.x) - mu) / sigma if use_val else None  # type: ignore[union-attr]
    yv = torch.from_numpy(va.y) if use_val else None  # type: ignore[union-attr]
    work = nn.Linear(head.in_features, k)  # from zero: a convex problem, no random offset
    nn.init.zeros_(work.weight)
    nn.init.zeros_(work.bias)
    loss_fn = TrainLoss.from_plan(lplan, k)
    opt = torch.optim.AdamW(work.parameters(), lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    per_pass = math.ceil(len(y) / HEAD_BATCH)
    passes = max(1, math.ceil(MIN_HEAD_STEPS / (cfg.head_epochs * per_pass)))
    steps = cfg.head_epochs * per_pass * passes
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    history: list[dict[str, float]] = []
    best, best_epoch, best_state = None, 0, copy.deepcopy(work.state_dict())
    for epoch in range(1, cfg.head_epochs + 1):
        work.train()
        total = 0.0
        order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(passes)])
        for idx in order.split(HEAD_BATCH):
            loss = loss_fn(work(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx) / passes
        work.eval()
        row = {"epoch": epoch, "phase": "head", "train_loss": total / max(len(y), 1),
               "lr": opt.param_groups[0]["lr"]}
        if use_val:
            row.update(_metrics(work, xv, yv, k, lplan.prior_offsets))  # type: ignore[arg-type]
        history.append(row)
        if log is not None:
            log(row)
        value = row[cfg.select_metric] if use_val else float(epoch)
        if _better(value, best, cfg.select_metric if use_val else "epoch"):
            best, best_epoch, best_state = value, epoch, copy.deepcopy(work.state_dict())
    _fold(head, best_state, mu, sigma)
    return FitResult(copy.deepcopy(head.state_dict()), best_epoch, history, lplan.to_dict())


def finetune_norm(cfg: TrainConfig, *, head: bool) -> str:
    """``--backbone-norm`` resolved: auto is frozen when fine-tuning starts from a head trained
    on cached embeddings. That head was fitted on features normalised by the pretrained
    running statistics; batch statistics of another domain change every feature before any
    weight moves (grey magnetic tiles: the head's validation loss went from 0.24 to 95 in
    one training-mode forward pass, and fine-tuning diverged; docs/benchmarks.md)."""
    if cfg.backbone_norm != "auto":
        return cfg.backbone_norm
    return "frozen" if head else "train"


class LrCheck(Callback):
    """Stops fine-tuning after its first epoch when that epoch undid the head it started
    from: validation loss above ``LR_CHECK_RATIO`` times the head's. The caller then
    restarts from the head at ``LR_CHECK_FACTOR`` times the rate (:func:`lr_check_applies`).

    A head trained on cached embeddings is often already good on a small set far from
    ImageNet; fine-tuning at a rate that suits 66 steps per epoch of natural photos then
    throws it away in the first steps and does not come back within the budget (grey
    magnetic tiles, 13 steps per epoch: docs/benchmarks.md). The check measures that on the
    run's own validation split instead of guessing it from the data set's size.

    Example:
        >>> from types import SimpleNamespace
        >>> check = LrCheck(head_loss=0.3)
        >>> state = SimpleNamespace(epoch=1, metrics={"val_loss": 0.9}, stop=False)
        >>> check.on_epoch_end(state); (check.tripped, state.stop)
        (True, True)
    """

    def __init__(self, head_loss: float | None) -> None:
        self.head_loss = head_loss
        self.tripped = False
        self.epoch_loss: float | None = None

    def on_epoch_end(self, state: LoopState) -> None:
        if state.epoch != 1 or self.head_loss is None or "val_loss" not in state.metrics:
            return
        self.epoch_loss = float(state.metrics["val_loss"])
        if self.epoch_loss > LR_CHECK_RATIO * self.head_loss:
            self.tripped = state.stop = True

    def line(self, lr: float) -> str:
        """What the check saw, in a sentence (for the train output and run.json)."""
        if self.tripped:
            return (f"lr check: the first fine-tuning epoch at lr {lr:g} raised the validation "
                    f"loss to {self.epoch_loss:.3g} (head {self.head_loss:.3g}, limit "
                    f"{LR_CHECK_RATIO:g}x): it undid the head, so fine-tuning restarts from the "
                    f"head at lr {lr * LR_CHECK_FACTOR:g}")
        if self.epoch_loss is None:
            return "lr check: not made (no validation split, or fewer than 1 epoch)"
        return (f"lr check: the first fine-tuning epoch at lr {lr:g} kept the validation loss "
                f"at {self.epoch_loss:.3g} (head {self.head_loss:.3g}, limit "
                f"{LR_CHECK_RATIO:g}x): lr {lr:g} kept")


class Deadline(Callback):
    """Stops fine-tuning after an epoch when one more epoch (as slow as the slowest so far)
    and the steps after training (``after_s``: calibration, OOD bank, ONNX export and checks)
    would end the run past ``deadline`` (a ``clock()`` time: ``--time-budget`` from the
    run's start). The plan fits the epochs to the speed measured before training; when
    other work slows the machine down afterwards, this keeps the run inside its budget (a
    CIFAR-small run planned at 58 s per epoch saw epochs of 89-108 s and ended 11 s past
    15 minutes; docs/benchmarks.md). The weight average and the best epoch are kept.

    Example:
        >>> from types import SimpleNamespace
        >>> now = [100.0]
        >>> d = Deadline(deadline=300.0, after_s=50.0, clock=lambda: now[0])
        >>> cfg = SimpleNamespace(epochs=5)
        >>> state = SimpleNamespace(epoch=1, cfg=cfg, metrics={"seconds": 60.0}, stop=False)
        >>> d.on_epoch_end(state); state.stop
        False
        >>> now[0] = 200.0; state.epoch = 2; d.on_epoch_end(state); (state.stop, d.stopped_after)
        (True, 2)
    """

    def __init__(self, deadline: float, after_s: float,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.deadline, self.after_s, self.clock = deadline, after_s, clock
        self.slowest = 0.0
        self.stopped_after: int | None = None

    def on_epoch_end(self, state: LoopState) -> None:
        self.slowest = max(self.slowest, float(state.metrics.get("seconds", 0.0)))
        if state.epoch >= state.cfg.epochs or state.stop:
            return
        if self.clock() + self.slowest + self.after_s > self.deadline:
            self.stopped_after = state.epoch
            state.stop = True

    def line(self, planned: int) -> str | None:
        """What it did, in a sentence (None when it let every planned epoch run)."""
        if self.stopped_after is None:
            return None
        return (f"time budget: fine-tuning stopped after epoch {self.stopped_after} of "
                f"{planned} (epochs ran slower than planned, up to {self.slowest:.0f}s; one "
                f"more would have ended the run past --time-budget)")


def lr_check_applies(cfg: TrainConfig, *, head: bool) -> bool:
    """``--lr-check`` resolved: auto checks when fine-tuning starts from a cached head and
    has an epoch to spare for a restart."""
    return cfg.lr_check == "auto" and head and cfg.epochs - cfg.freeze_epochs >= 2


def backbone_id(plan: WeightsPlan, in_chans: int, model_kwargs: dict[str, Any] | None = None
                ) -> str:
    """What identifies the frozen backbone in the cache key: arch, weights hash, channels and
    the model arguments (e.g. ``global_pool`` changes the embeddings)."""
    kwargs = json.dumps(model_kwargs or {}, sort_keys=True, default=str)
    return f"{plan.arch}|{plan.sha256 or plan.kind}|{in_chans}|{kwargs}"


def embed_splits(model: nn.Module, parts: dict[str, list], classes: Sequence[str],
                 spec: PreprocessSpec, cfg: TrainConfig, plan: WeightsPlan, *,
                 say: Callable[[str], None], progress: bool) -> tuple[Embedded, Embedded]:
    """Train and validation embeddings through the (frozen) backbone, from the cache."""
    store = EmbeddingStore(cache_root(cfg.embed_cache),
                           backbone_id(plan, spec.in_chans, cfg.model_kwargs), spec)
    t0 = time.perf_counter()
    workers = cfg.decode_workers or 2
    embedder = Embedder(model)
    out = [embed_samples(embedder, parts.get(split, []), classes, spec, store,
                         batch_size=min(cfg.batch_size, 64), workers=workers,
                         progress=progress, label=split) for split in ("train", "val")]
    hits, computed = sum(e.hits for e in out), sum(e.computed for e in out)
    where = store.dir if store.dir is not None else "not stored (--embed-cache off)"
    say(f"embeddings: {computed} computed ({embedder.backend}), {hits} from the cache "
        f"({where}) in {time.perf_counter() - t0:.1f}s")
    return out[0], out[1]


def train_head(model: nn.Module, tr: Embedded, va: Embedded, cfg: TrainConfig,
               lplan: LossPlan, log_path: Path | None, say: Callable[[str], None]
               ) -> FitResult:
    """Fit the model's classifier on embeddings; the model keeps the best head. The
    returned FitResult's ``best_state`` is the whole model's (for the bundle)."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}'s classifier is not one Linear layer")
    t0 = time.perf_counter()
    lines: list[str] = []
    res = fit_head(head, tr, va, cfg, lplan, log=lambda r: lines.append(json.dumps(r)))
    if log_path is not None:
        log_path.write_text("".join(line + "\n" for line in lines))
    best = res.best_metrics
    shown = {k: round(v, 4) for k, v in best.items() if k.startswith("val_")}
    say(f"head: {cfg.head_epochs} epochs on {len(tr.y)} embeddings in "
        f"{time.perf_counter() - t0:.1f}s; best epoch {res.best_epoch} {shown}")
    return FitResult(copy.deepcopy(model.state_dict()), res.best_epoch, res.history,
                     res.loss_plan)


def combine(head: FitResult, tuned: FitResult, select_metric: str = "val_accuracy"
            ) -> FitResult:
    """One history for a head phase followed by fine-tuning (epochs numbered on); the best
    epoch of both by ``select_metric`` (the head's when no fine-tuning epoch beats it)."""
    n = len(head.history)
    rows = [*head.history, *({**r, "epoch": r["epoch"] + n, "phase": "finetune"}
                             for r in tuned.history)]
    h, t = head.best_metrics.get(select_metric), tuned.best_metrics.get(select_metric)
    if h is not None and t is not None and _better(h, t, select_metric) and h != t:
        return FitResult(head.best_state, head.best_epoch, rows, tuned.loss_plan,
                         tuned.stopped_early, tuned.defects)
    return FitResult(tuned.best_state, tuned.best_epoch + n, rows, tuned.loss_plan,
                     tuned.stopped_early, tuned.defects)


class HeadOnEmbeddings(nn.Module):
    """The model from its cached embeddings on: its classifier alone.

    With the backbone frozen, an image's embedding is exactly what the classifier reads in
    the full model (its penultimate features), so the end of the run (temperature, the
    default rule, the OOD scorer's bank and validation scores) can run on the embeddings it
    already has, through the same :func:`~imgtriage.train.calibrate.calibrate_run` as every
    other route, without a second pass of the images through the backbone.

    Example:
        >>> import timm
        >>> net = timm.create_model("tf_efficientnet_lite0", num_classes=3).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> emb = net.forward_head(net.forward_features(x), pre_logits=True)
        >>> bool(torch.allclose(HeadOnEmbeddings(net)(emb), net(x), atol=1e-5))
        True
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.classifier = model.get_classifier()

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


def labels_of(parts: dict[str, list], classes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[s.label] for s in parts["train"]], np.int64)


__all__: list[Any] = ["Deadline", "HeadOnEmbeddings", "LrCheck", "backbone_id",
                      "cached_head_applies", "combine", "embed_splits", "finetune_norm",
                      "fit_head", "labels_of", "lr_check_applies", "train_head"]
