"""Semi-supervised training: learn from a folder of unlabelled images of the same domain.

``imgtriage train DATA --unlabeled FOLDER`` adds, to every labelled batch of the one training
loop (:func:`imgtriage.train.loop.fit`), a batch of ``--unlabeled-ratio`` x batch-size
unlabelled images and a consistency loss on it (FixMatch, Sohn et al. 2020):

1. each unlabelled image gets a *weak* view (the modality's label-preserving flips and a
   small shift) and a *strong* view (RandAugment-style ops at full strength, incl. erasing);
2. the model's prediction on the weak view, optionally *distribution-aligned* (ReMixMatch:
   multiplied by the labelled class distribution over the running mean of the predictions,
   so no class swallows the pseudo-labels: the class-balancing step), becomes a hard
   pseudo-label when its confidence is at least ``--pseudo-threshold``;
3. the strong view is trained towards that pseudo-label with weight ``--unlabeled-weight``.

``--semi-method fixmatch`` labels the weak view in the training forward pass itself; the
default, ``fixmatch_ema``, labels it with the weight average (``--ema-decay``; the current
weights without it) in eval mode and without gradients, so only labelled and strong images are
trained: about 1.4x cheaper per step, and the average's pseudo-labels are steadier (Mean
Teacher, Tarvainen & Valpola 2017). The rows share one forward pass, but batch norm
normalises the strong views apart and keeps them out of its running statistics
(:func:`clean_bn_stats`, ``--semi-bn-stats clean``): those statistics are what the teacher
and the evaluated model use on clean images.
``--semi-method self_training`` is the cheap offline variant (curriculum pseudo-labelling,
Cascante-Bonilla et al. 2021): the run is cut into ``CURRICULUM_STAGES`` stages; the first
trains on the labels only, and at the start of each later stage the teacher (the weight
average, else the current weights, in eval mode) labels the whole unlabelled pool once and the
most confident 25%, 50%, 75%, then 100% of it -- per predicted class, in the labelled class
proportions (the class-balancing step) -- are trained on like labels (weak views), with no
second view and no gradient through the teacher.
``--semi-method noisy_student`` is the same with the student noised (Xie et al. 2020): the
pseudo-labelled images are trained as *strong* views (and through dropout), so the student
has to learn more than it is told instead of copying its teacher.
``--semi-method pseudo_label`` trains the weak view on its own pseudo-label
(classic self-training, no strong view): the cheaper baseline FixMatch is measured against.

The unlabelled images are decoded once into memory with the run's preprocessing; files that
cannot be read become defects of the run (``defects.json``), and files whose *content*
(sha256) equals a validation or test file are left out, so a pseudo-label is never drawn from
the data that judges the model. The unlabelled stream (an endless sequence of seeded
permutations) and the alignment statistics are part of the checkpoint: a resumed run ends
with the same weights as an uninterrupted one.

Example:
    >>> from imgtriage.train.config import TrainConfig
    >>> cfg = TrainConfig(unlabeled="inbox/", epochs=30)  # doctest: +SKIP
    >>> # imgtriage.train.run.train("labelled/", "runs/semi", cfg)
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imgtriage.data import PreprocessSpec, iter_image_files, load_input
from imgtriage.data.augment import AugmentPolicy
from imgtriage.errors import ConfigError, DataError, ImageReadError
from imgtriage.io import Defect, sha256_file
from imgtriage.train.config import MODALITIES, TrainConfig

STRONG_STRENGTH, STRONG_OPS = 1.0, 3
CURRICULUM_STAGES = 5
OFFLINE_METHODS = ("self_training", "noisy_student")  # the teacher labels the pool per stage
STRONG_METHODS = ("fixmatch", "fixmatch_ema", "noisy_student")  # train strong views


def content_hashes(paths: Iterable[str], workers: int = 2) -> dict[str, str]:
    """path -> sha256 of the file's bytes (unreadable files are left out: they cannot match)."""
    def one(p: str) -> tuple[str, str | None]:
        try:
            return p, sha256_file(p)
        except OSError:
            return p, None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return {p: h for p, h in pool.map(one, list(paths)) if h is not None}


@dataclass(frozen=True)
class UnlabeledPool:
    """Decoded unlabelled inputs (N, C, H, W), their paths, the files that could not be read
    and the files left out because their content equals a validation/test file."""

    x: torch.Tensor
    paths: tuple[str, ...]
    defects: tuple[Defect, ...]
    excluded: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self) -> dict[str, Any]:
        return {"images": len(self), "unreadable": len(self.defects),
                "excluded_same_content_as_val_test": list(self.excluded)}


def load_unlabeled(folder: str | os.PathLike[str], spec: PreprocessSpec, *,
                   exclude_hashes: Iterable[str] = (), workers: int | None = None
                   ) -> UnlabeledPool:
    """Decode every file below ``folder`` with ``spec``; unreadable ones become defects, ones
    whose sha256 is in ``exclude_hashes`` (validation/test content) are left out.

    Example:
        >>> pool = load_unlabeled("inbox/", spec, exclude_hashes=val_hashes)  # doctest: +SKIP
        >>> len(pool), pool.defects  # doctest: +SKIP
    """
    root = Path(folder)
    if not root.exists():
        raise ConfigError(f"unlabelled folder {root} does not exist; give a folder of images "
                          "(--unlabeled)")
    paths = [str(p) for p in iter_image_files(root)]
    banned = set(exclude_hashes)
    hashes = content_hashes(paths, workers or 2) if banned else {}
    excluded = tuple(p for p in paths if hashes.get(p) in banned)
    keep = [p for p in paths if p not in set(excluded)]

    def one(p: str) -> np.ndarray | Defect:
        try:
            return load_input(p, spec)[0]
        except ImageReadError as exc:
            return exc.defect

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        outs = list(pool.map(one, keep))
    good = [(p, x) for p, x in zip(keep, outs, strict=True) if not isinstance(x, Defect)]
    defects = tuple(x for x in outs if isinstance(x, Defect))
    c, (h, w) = spec.in_chans, spec.size
    x = (torch.from_numpy(np.stack([a for _, a in good])) if good
         else torch.zeros((0, c, h, w), dtype=torch.float32))
    return UnlabeledPool(x, tuple(p for p, _ in good), defects, excluded)


class UnlabeledStream:
    """An endless stream of indices: one seeded permutation after another. Its whole state is
    the number of indices drawn so far, so a checkpoint restores it exactly."""

    def __init__(self, n: int, seed: int, rank: int = 0) -> None:
        self.n, self.seed, self.rank, self.drawn = n, seed, rank, 0
        self._cycle, self._perm = -1, torch.zeros(0, dtype=torch.long)

    def _permutation(self, cycle: int) -> torch.Tensor:
        if cycle != self._cycle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle * 7919
                                              + self.rank * 104_729 + 17)
            self._cycle, self._perm = cycle, torch.randperm(self.n, generator=g)
        return self._perm

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            cycle, pos = divmod(self.drawn, self.n)
            part = self._permutation(cycle)[pos:pos + k]
            out.append(part)
            self.drawn += len(part)
            k -= len(part)
        return torch.cat(out)

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn, "n": self.n}

    def load_state_dict(self, d: dict[str, int]) -> None:
        if int(d["n"]) != self.n:
            raise ConfigError(f"the checkpoint was made with {d['n']} unlabelled images, now "
                              f"there are {self.n}; resume with the same --unlabeled folder")
        self.drawn = int(d["drawn"])


class SemiSupervised:
    """The unlabelled half of every training step (the loop calls :meth:`draw` and
    :meth:`loss`); learned state: the stream position and the running class distribution.

    ``prior`` is the labelled class distribution the pseudo-labels are aligned to.
    """

    def __init__(self, pool: UnlabeledPool, cfg: TrainConfig, prior: Sequence[float],
                 rank: int = 0) -> None:
        if len(pool) == 0:
            raise DataError("no usable unlabelled images (see defects.json) (--unlabeled)")
        self.pool, self.cfg = pool, cfg
        flips = MODALITIES[cfg.modality]
        self.weak = AugmentPolicy("weak", flips=flips)
        self.strong = AugmentPolicy("randaug", STRONG_STRENGTH, STRONG_OPS, flips)
        self.stream = UnlabeledStream(len(pool), cfg.seed, rank)
        p = torch.as_tensor(prior, dtype=torch.float32)
        self.prior = p / p.sum()
        self.running = self.prior.clone()  # running mean of the weak-view predictions
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rank, self.total_steps, self.steps, self.stage = rank, 0, 0, 0
        self.selected = torch.zeros(0, dtype=torch.long)  # self_training: chosen pool rows
        self.targets = torch.zeros(0, dtype=torch.long)  # ... and their pseudo-labels
        # flex thresholds: per pool image, the class it was last confidently predicted as
        self.learned = torch.full((len(pool),), -1, dtype=torch.long)
        self._idx = torch.zeros(0, dtype=torch.long)  # pool rows of the current step
        self._reset_stats()

    def bind(self, total_steps: int) -> None:
        """The loop tells the extension how many steps the run has (self_training stages)."""
        self.total_steps = max(1, int(total_steps))

    def _reset_stats(self) -> None:
        self._seen, self._confident, self._loss_sum, self._t0 = 0, 0, 0.0, time.perf_counter()

    def clean_rows(self, n_labelled: int) -> int | None:
        """How many leading rows of a training batch are clean (labels, then weak views): the
        rows batch norm's running statistics may learn from; None = every row is clean."""
        if self.cfg.semi_bn_stats == "all" or self.cfg.semi_method not in STRONG_METHODS:
            return None
        weak = self.cfg.unlabeled_ratio * self.cfg.batch_size
        return n_labelled + (weak if self.cfg.semi_method == "fixmatch" else 0)

    def bn_guard(self, model: nn.Module, n_labelled: int) -> contextlib.AbstractContextManager:
        """Context for the training forward pass: see :func:`clean_bn_stats`."""
        rows = self.clean_rows(n_labelled)
        return contextlib.nullcontext() if rows is None else clean_bn_stats(model, rows)

    @property
    def views(self) -> int:
        """Unlabelled views per image in the trained forward pass: weak + strong (fixmatch),
        strong only (fixmatch_ema: the weak view went through the teacher) or weak only."""
        return 2 if self.cfg.semi_method == "fixmatch" else 1

    def draw(self, batch_size: int, g: torch.Generator, teacher: nn.Module | None = None
             ) -> torch.Tensor:
        """The unlabelled inputs of one step (weak views, then strong views); for
        fixmatch_ema the weak views are labelled by ``teacher`` here and only the strong
        views are returned."""
        if self.cfg.semi_method in OFFLINE_METHODS:
            return self._draw_curriculum(batch_size, g, teacher)
        idx = self.stream.take(self.cfg.unlabeled_ratio * batch_size)
        self._idx, x = idx, self.pool.x[idx]
        weak = self.weak(x, None, g)
        if self.cfg.semi_method == "pseudo_label":
            return weak
        strong = self.strong(x, None, g)
        if self.cfg.semi_method == "fixmatch":
            return torch.cat([weak, strong])
        if teacher is None:
            raise ConfigError("--semi-method fixmatch_ema needs the loop's model")
        self._pending = self._pseudo(_teacher_logits(teacher, weak))
        return strong

    def _draw_curriculum(self, batch_size: int, g: torch.Generator,
                         teacher: nn.Module | None) -> torch.Tensor:
        stage = min(CURRICULUM_STAGES - 1, self.steps * CURRICULUM_STAGES // max(
            self.total_steps, 1))
        self.steps += 1
        if stage != self.stage:
            if teacher is None:
                raise ConfigError(f"--semi-method {self.cfg.semi_method} needs the loop's model")
            self._relabel(stage, teacher)
        if len(self.selected) == 0:
            return self.pool.x[:0]
        pick = self.stream.take(self.cfg.unlabeled_ratio * batch_size)
        self._pending = (self.targets[pick], torch.ones(len(pick)))
        view = self.strong if self.cfg.semi_method == "noisy_student" else self.weak
        return view(self.pool.x[self.selected[pick]], None, g)

    def _relabel(self, stage: int, teacher: nn.Module) -> None:
        """Label the pool with ``teacher``; keep the most confident share of each predicted
        class, in the labelled class proportions."""
        logits = torch.cat([_teacher_logits(teacher, self.pool.x[i:i + 512]).float().cpu()
                            for i in range(0, len(self.pool), 512)])
        conf, pred = logits.softmax(1).max(1)
        share = stage / (CURRICULUM_STAGES - 1)
        keep = []
        for c, p in enumerate(self.prior.tolist()):
            rows = torch.nonzero(pred == c).flatten()
            quota = min(len(rows), round(share * len(self.pool) * p))
            keep.append(rows[conf[rows].argsort(descending=True)[:quota]])
        self.selected = torch.cat(keep).sort().values
        self.targets = pred[self.selected]
        self.stage = stage
        self.stream = UnlabeledStream(max(1, len(self.selected)), self.cfg.seed + 7 * stage,
                                      self.rank)

    def _pseudo(self, logits_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = logits_w.detach().float().softmax(1)
        if self.cfg.distribution_alignment:
            self.running = 0.999 * self.running + 0.001 * probs.mean(0).cpu()
            probs = probs * (self.prior / self.running.clamp_min(1e-6)).to(probs.device)
            probs = probs / probs.sum(1, keepdim=True)
        conf, target = probs.max(1)
        conf, target = conf.cpu(), target.cpu()
        tau = torch.full((len(conf),), self.cfg.pseudo_threshold)
        if self.cfg.pseudo_threshold_mode == "flex" and len(self._idx) == len(conf):
            tau = tau * self.class_thresholds()[target]
            sure = conf >= self.cfg.pseudo_threshold
            self.learned[self._idx[sure]] = target[sure]
        return target, (conf >= tau).float()

    def class_thresholds(self) -> torch.Tensor:
        """FlexMatch (Zhang et al. 2021) per-class threshold factors in [0, 1]: a class's
        learning status is how many pool images were last predicted as it with confidence
        >= --pseudo-threshold, over the most of any class (or of the images not yet learnt,
        while that is more: the warm-up); the factor maps it convexly (x / (2 - x)), so
        classes the model is still unsure of accept less confident pseudo-labels."""
        k = len(self.prior)
        counts = torch.bincount(self.learned[self.learned >= 0], minlength=k)[:k].float()
        unused = float((self.learned < 0).sum())
        beta = counts / max(float(counts.max()), unused, 1.0)
        return beta / (2 - beta)

    def loss(self, logits_u: torch.Tensor) -> torch.Tensor:
        """Weighted consistency loss from the unlabelled logits (weak[, strong])."""
        parts = logits_u.chunk(self.views)
        if self._pending is not None:
            (target, mask), self._pending = self._pending, None
        else:
            target, mask = self._pseudo(parts[0])
        target, mask = target.to(logits_u.device), mask.to(logits_u.device)
        per = F.cross_entropy(parts[-1].float(), target, reduction="none")
        loss = (per * mask).mean()
        self._seen += len(target)
        self._confident += int(mask.sum().item())
        self._loss_sum += float(loss.detach()) * len(target)
        return self.cfg.unlabeled_weight * loss

    def epoch_metrics(self, labeled: int) -> dict[str, float]:
        """Throughput of both streams and the share of confident pseudo-labels; resets."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        rate = (len(self.selected) / len(self.pool) if self.cfg.semi_method in OFFLINE_METHODS
                else self._confident / max(self._seen, 1))
        out = {"unlabeled_loss": self._loss_sum / max(self._seen, 1),
               "pseudo_label_rate": rate,
               "labeled_img_per_s": labeled / dt, "unlabeled_img_per_s": self._seen / dt}
        self._reset_stats()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "running": self.running.tolist(),
                "steps": self.steps, "stage": self.stage, "selected": self.selected.tolist(),
                "targets": self.targets.tolist(), "learned": self.learned.tolist()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.steps, self.stage = int(d.get("steps", 0)), int(d.get("stage", 0))
        self.selected = torch.tensor(d.get("selected", []), dtype=torch.long)
        self.targets = torch.tensor(d.get("targets", []), dtype=torch.long)
        if self.stage > 0:
            self.stream = UnlabeledStream(max(1, len(self.selected)),
                                          self.cfg.seed + 7 * self.stage, self.rank)
        self.stream.load_state_dict(d["stream"])
        self.running = torch.tensor(d["running"], dtype=torch.float32)
        if "learned" in d:
            self.learned = torch.tensor(d["learned"], dtype=torch.long)


@contextlib.contextmanager
def clean_bn_stats(model: nn.Module, rows: int) -> Iterator[None]:
    """During one training forward pass, every batch-norm layer normalises the first ``rows``
    rows (labels and weak views) with their own batch statistics and the rest (strongly
    augmented views) with theirs, and only the first rows update the running statistics (what
    eval mode, the weight average and the teacher use). So the clean rows go through the
    network exactly as they would alone, and the strong views' intensity statistics, which
    clean test images do not share, never reach the evaluated model.

    Example:
        >>> with clean_bn_stats(model, len(y)):  # doctest: +SKIP
        ...     out = model(torch.cat([x_labelled, x_strong]))
    """
    saved: dict[nn.Module, float | None] = {}

    def split(m: nn.modules.batchnorm._BatchNorm, args: tuple[torch.Tensor, ...],
              out: torch.Tensor) -> torch.Tensor | None:
        x, mom = args[0], saved[m]
        f = 1.0 / float(m.num_batches_tracked) if mom is None else mom  # type: ignore[arg-type]
        if len(x) <= rows:  # no strong views in this batch: an ordinary batch-norm step
            return _after_norm(m, F.batch_norm(x, m.running_mean, m.running_var, m.weight,
                                               m.bias, True, f, m.eps))
        if rows < 2 or len(x) - rows < 2:
            return None  # too few rows to split: whole-batch output, running stats unchanged
        clean = F.batch_norm(x[:rows], m.running_mean, m.running_var, m.weight, m.bias,
                             True, f, m.eps)
        strong = F.batch_norm(x[rows:], None, None, m.weight, m.bias, True, 0.0, m.eps)
        return _after_norm(m, torch.cat([clean, strong]))

    hooks = []
    for m in model.modules():
        if (isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                and m.track_running_stats and m.running_mean is not None):
            saved[m] = m.momentum
            m.momentum = 0.0  # the layer's own whole-batch pass leaves the running stats alone
            hooks.append(m.register_forward_hook(split))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, mom in saved.items():
            m.momentum = mom  # type: ignore[assignment]


def _after_norm(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """What a batch-norm layer does after normalising: nothing for torch's, dropout then the
    activation for timm's fused ``BatchNormAct2d`` (EfficientNet, ...), whose output the hook
    replaces as a whole."""
    for name in ("drop", "act"):
        op = getattr(m, name, None)
        if isinstance(op, nn.Module):
            y = op(y)
    return y


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits in eval mode (no dropout, batch-norm running statistics)."""
    was = teacher.training
    teacher.eval()
    try:
        return teacher(x.to(next(teacher.parameters()).device))
    finally:
        teacher.train(was)


def build_semi(cfg: TrainConfig, spec: PreprocessSpec, holdout: Sequence[str],
               labels: np.ndarray, num_classes: int, *, rank: int = 0
               ) -> SemiSupervised:
    """The extension for ``cfg.unlabeled``: decode the folder (leaving out every file whose
    content equals one of the ``holdout`` validation/test files) and align pseudo-labels to
    the labelled class distribution (add-one smoothed).

    Example:
        >>> semi = build_semi(cfg, spec, val_paths, y_train, 10)  # doctest: +SKIP
        >>> fit(model, train, val, cfg, unlabeled=semi)  # doctest: +SKIP
    """
    n, (h, w) = count_files(cfg.unlabeled), spec.size
    gb = n * spec.in_chans * h * w * 4 / 2**30
    if gb > cfg.cache_limit_gb:
        raise ConfigError(f"the {n} unlabelled images take {gb:.1f} GB decoded, more than "
                          f"--cache-limit-gb {cfg.cache_limit_gb:g} (they are kept in memory); "
                          "raise --cache-limit-gb or give a smaller --unlabeled folder")
    banned = set(content_hashes(holdout, cfg.decode_workers or 2).values())
    pool = load_unlabeled(cfg.unlabeled, spec, exclude_hashes=banned,
                          workers=cfg.decode_workers)
    prior = np.bincount(np.asarray(labels, np.int64), minlength=num_classes) + 1.0
    return SemiSupervised(pool, cfg, prior.tolist(), rank)


def semi_budget(cfg: TrainConfig, n_train: int, world_size: int = 1
                ) -> tuple[TrainConfig, str]:
    """With ``--unlabeled`` and ``--epochs`` not given: the epochs that make at least
    ``--semi-steps`` optimiser steps (an epoch is one pass over this process's share of the
    labelled training images; never fewer epochs than the default, so a large labelled set
    does not train less for having unlabelled images too), and a line saying so; else
    ``cfg`` unchanged and "".

    Example:
        >>> from imgtriage.train.config import TrainConfig
        >>> semi_budget(TrainConfig(unlabeled="inbox/", batch_size=32), 100)[0].epochs
        600
        >>> semi_budget(TrainConfig(unlabeled="inbox/", epochs=50), 100)[0].epochs
        50
        >>> semi_budget(TrainConfig(unlabeled="inbox/", epochs=10), 100)[0].epochs  # given
        10
        >>> semi_budget(TrainConfig(unlabeled="inbox/", batch_size=32), 50_000)[0].epochs
        10
    """
    if not cfg.unlabeled or cfg.semi_steps == 0 or cfg.is_given("epochs"):
        return cfg, ""
    per_epoch = max(1, math.ceil(math.ceil(n_train / max(1, world_size)) / cfg.batch_size))
    epochs = max(cfg.epochs, math.ceil(cfg.semi_steps / per_epoch))
    if epochs == cfg.epochs:
        return cfg, ""
    return replace(cfg, epochs=epochs), (
        f"--unlabeled: {epochs} epochs of {per_epoch} step(s), {epochs * per_epoch} "
        f"optimiser steps (--semi-steps {cfg.semi_steps}; the unlabelled images only help "
        f"with enough steps; --epochs overrides)")


SEMI_EMA_DECAY = 0.99  # the weight average every issue-20 measurement used (docs/benchmarks.md)
TEACHER_METHODS = ("fixmatch_ema", "self_training", "noisy_student")


def semi_teacher(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """With ``--unlabeled``, a method whose pseudo-labels come from a teacher, and
    ``--ema-decay`` not given (off): a weight average of ``SEMI_EMA_DECAY`` as the
    teacher (the measured recipe; without it the teacher is the current weights, whose
    pseudo-labels swing from step to step), and a line saying so; else ``cfg`` and "".

    Example:
        >>> from imgtriage.train.config import TrainConfig
        >>> semi_teacher(TrainConfig(unlabeled="inbox/"))[0].ema_decay
        0.99
        >>> semi_teacher(TrainConfig(unlabeled="inbox/", ema_decay=0.9))[0].ema_decay
        0.9
        >>> semi_teacher(TrainConfig(unlabeled="inbox/", semi_method="fixmatch"))[0].ema_decay
        0.0
    """
    if (not cfg.unlabeled or cfg.semi_method not in TEACHER_METHODS
            or cfg.is_given("ema_decay")):
        return cfg, ""
    return replace(cfg, ema_decay=SEMI_EMA_DECAY), (
        f"--unlabeled: the teacher is a weight average (--ema-decay {SEMI_EMA_DECAY:g}; "
        "give --ema-decay to choose another)")


def count_files(folder: str | os.PathLike[str]) -> int:
    """How many files the unlabelled folder holds (for ``--model auto``'s sentence)."""
    root = Path(folder)
    return sum(1 for _ in iter_image_files(root)) if root.exists() else 0
