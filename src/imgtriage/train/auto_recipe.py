"""``--model auto`` chooses the whole recipe, not only the architecture.

After :func:`~imgtriage.train.auto.choose_model` picked the model, :func:`plan_recipe`
fills in what the user did not give (``TrainConfig.given``: a value given explicitly is kept,
even one equal to the default), each with the sentence that explains it:

- **classes imbalanced** (largest / smallest training class >= 1.5): inverse-frequency class
  weights and selection of the best epoch by balanced accuracy;
- **pretrained backbone**: the head is trained on cached embeddings first; then, when
  ``--time-budget`` leaves room, the network is fine-tuned (AdamW, warmup + cosine,
  earlier stages slower by ``--layer-decay``, the stem and first 2 stages frozen (3 and
  cached with the stage cache, below)
  (``--freeze-stages``: they would move little under layer decay, and no backward through
  them makes a step ~1.4x cheaper), label smoothing, the modality's flips + one light random
  op per image, batch-norm statistics kept as the pretrained ones the head was fitted on
  (``--backbone-norm auto``: training-mode batch norm on grey tiles made the head's loss
  ~95 before any weight moved), and a restart from the head at a tenth of the rate when
  the first fine-tuning epoch raises the validation loss above 1.5x the head's
  (``--lr-check auto``: at lr 1e-3 grey magnetic tiles went from 0.29 to 0.70 and never
  came back within the budget, 1e-4 stayed at 0.34; CIFAR photos keep 1e-3)) at a
  training resolution chosen by :func:`plan_finetune`: the
  largest side up to the weights' own that the source images justify (at most
  ``SOURCE_UPSCALE`` times their median side: 32-px photos train at 160 at most) at which
  at least ``MIN_FINETUNE_EPOCHS`` epochs fit; then as many epochs as fit (at most
  ``MAX_FINETUNE_EPOCHS``). An exponential moving average of the weights
  (``--ema-decay 0.99``; it warms up as ``(1 + n) / (10 + n)``, so a short run averages
  over its last ~50-100 steps) is validated, selected and kept instead of the raw weights
  (CIFAR-small at 96 px, one epoch into fine-tuning at lr 1e-3: validation accuracy 0.824
  averaged against 0.761 raw). When the flips are the mirror (photos, generic images) and
  the backbone has EfficientNet stages, the stem and first ``STAGE_CACHE_STAGES`` stages
  stay frozen *and cached* (``--stage-cache auto``, :mod:`imgtriage.train.stage_cache`):
  each image and its mirror go through them once, the epochs train the later stages on
  those activations (mirrored and shifted at random), so an epoch at a larger side costs a
  fraction of a full one; the probe then times that step and the one pass;
- **from scratch** (no pretrained backbone: grey crops under 96 px, scientific images, or no
  weights installed): per-image percentile scaling unless the images are 8-bit RGB photos
  (:func:`robust_scaling`: a network that keys on absolute intensity misreads data whose
  gain or exposure shifts, as MSTAR's 15 deg chips are darker than its 17 deg ones), the
  ``light`` augmentation with the modality's flips and no colour op, label smoothing 0.1,
  a 0.995 weight average, one-cycle at lr 2e-3 (the accuracy section's run G, made
  general); then the training side and, for ``deep_cnn``, its widths (its own or half)
  from the budget: the costliest variant at which ``SCRATCH_MIN_EPOCHS`` fit, and as many
  epochs there as fit (at most ``SCRATCH_MAX_EPOCHS``; :func:`plan_scratch`). Every option
  given on the command line is kept.

The per-image costs come from timing the chosen model on this machine (the median of
``PROBE_REPS`` batches of ``PROBE_BATCH`` in channels_last, as training runs, seconds)
and are printed before training starts, per epoch. A cost measured at one side is scaled
to others by the pixel count.

Example:
    >>> imbalance({"ok": 900, "bad": 300})
    3.0
    >>> finetune_sides(224, 32)
    [96, 128, 160]
    >>> finetune_sides(224, 300)
    [96, 128, 160, 192, 224]
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace

import torch

from imgtriage.train.config import MODALITIES, TrainConfig, training_flips

IMBALANCE_RATIO = 1.5
FINETUNE = {"lr": 1e-3, "layer_decay": 0.85, "schedule": "cosine", "warmup_epochs": 0.5,
            "label_smoothing": 0.1, "weight_decay": 0.02, "head_epochs": 10,
            "freeze_stages": 2, "ema_decay": 0.99}
FINETUNE_SIDES = (96, 128, 160, 192, 224, 256)
SOURCE_UPSCALE = 5      # a pretrained net sees objects at ImageNet scale; beyond 5x, pixels
MIN_FINETUNE_EPOCHS = 6  # of a small photo are only interpolated
MAX_FINETUNE_EPOCHS = 12
BUDGET_SHARE = 0.9       # of --time-budget planned; the rest is slack (and `evaluate`)
# The part of a run that does not grow with the epochs is estimated from what it is made of
# (:func:`fixed_plan`); a flat 90 s had planned ~90 s where small runs spent ~10 s:
START_S = 3.0            # discovery, split, building the model, saving and re-reading the bundle
EXPORT_S = 6.0           # ONNX export, int8 quantisation and its speed rounds: their fixed part
CHECK_IMAGES = 150       # ... and their images: parity, int8 calibration, beyond the judged ones
JUDGE_IMAGES = 1000      # held-out images the int8 verdict runs through both graphs (onnx_step)
OOD_SAMPLE = 10000       # training images the OOD statistics embed at most (calibrate.py)
DECODE_FACTOR = 1.5      # decoding + resizing an image, against reading it in the probe
EPOCH_OVERHEAD = 1.15    # data, augmentation, validation batches beyond the probe's steps
# (CIFAR at 96 px under load 9: 91 s per epoch against the probe's 80; the steps after the
# last epoch took 67 s: bench_transfer.py, docs/benchmarks.md)
PROBE_BATCH, PROBE_MAX_SIDE = 32, 160
PROBE_REPS = 5           # timed steps after a warm-up one; their median is the cost
BUSY_SHARE = 0.5         # a probe that got less of its threads' CPU time ran on a busy machine
STAGE_CACHE_STAGES = 3   # frozen and cached (--stage-cache): stem + stages 0-2 of
# EfficientNet-Lite0 are ~40% of a 96-px training step on 2 cores
# From scratch (no pretrained backbone): the accuracy section's run G recipe, made general
SCRATCH = {"lr": 2e-3, "label_smoothing": 0.1, "ema_decay": 0.995}
SCRATCH_MIN_EPOCHS = 24  # MSTAR: 20 epochs 96.7%, 40 with a weight average 98.1-98.4%
SCRATCH_MAX_EPOCHS = 40
SCRATCH_SIDES = (96, 80, 64, 48)
HALF_WIDTHS = (16, 32, 64, 128)  # deep_cnn at half width: run G's network


def imbalance(counts: dict[str, int]) -> float:
    """Largest class count over the smallest (inf when a class has no training image)."""
    values = list(counts.values())
    return max(values) / min(values) if values and min(values) > 0 else math.inf


@dataclass(frozen=True)
class Costs:
    """Seconds per image on this machine: inference (embedding) and a training step,
    measured at ``side`` pixels (None: at the run's own size, never rescaled). With the
    stage cache (``stem`` > 0) ``train`` is a step of the stages after the cached ones, on
    their activations, and ``stem`` the one pass of an image through the cached ones."""

    infer: float
    train: float
    side: int | None = None
    stem: float = 0.0
    share: float | None = None  # of its threads' time the probe got (None: not measured)
    probe_s: float = 0.0  # wall seconds the probe itself took (spent before the plan)
    decode: float = 0.0   # seconds to read and decode one source image (the data's, any side)

    def at(self, side: int) -> Costs:
        """The costs at another side, scaled by the pixel count (measured on
        EfficientNet-Lite0, 2 threads: within ~15% between 96 and 224 px); decoding a source
        image does not depend on the side it is resized to."""
        if self.side is None or side == self.side:
            return self
        f = (side / self.side) ** 2
        return Costs(self.infer * f, self.train * f, side, self.stem * f, self.share,
                     self.probe_s, self.decode)

    def busy_note(self) -> str:
        """A sentence when the probe ran on a busy machine (its process got under half of
        its threads' time), else ''."""
        if self.share is None or self.share >= BUSY_SHARE:
            return ""
        return (f" (the probe got {self.share:.0%} of its {torch.get_num_threads()} threads' "
                f"time: other processes were busy, so this plan is for a machine that busy)")


def measure_costs(cfg: TrainConfig, num_classes: int, side: int | None = None,
                  batch: int = PROBE_BATCH, reps: int = PROBE_REPS,
                  freeze_stages: int | None = None, stage_cache: bool = False) -> Costs:
    """Time the chosen model (random weights: the cost is the same) on random inputs, as
    training runs it: batches of ``batch`` (at most ``--batch-size``), channels_last unless
    ``--channels-last off``, the stem and first ``freeze_stages`` stages frozen (default
    ``--freeze-stages``); ``side`` defaults to the run's input size. With ``stage_cache``
    (and a model it applies to) the training step is that of the later stages on the
    frozen ones' activations, and the frozen stages' forward pass is timed too."""
    from imgtriage.models import create_model
    from imgtriage.train import stage_cache as sc
    from imgtriage.train.optim import set_backbone_norm_eval, set_early_frozen

    started = time.perf_counter()
    side = side or cfg.img_size or 224
    batch = max(2, min(batch, cfg.batch_size))
    fmt = torch.preserve_format if cfg.channels_last == "off" else torch.channels_last
    model = create_model(cfg.model, num_classes, cfg.in_chans or 3,
                         **dict(cfg.model_kwargs)).to(memory_format=fmt)
    set_early_frozen(model, cfg.freeze_stages if freeze_stages is None else freeze_stages)
    x = torch.randn(batch, cfg.in_chans or 3, side, side).to(memory_format=fmt)
    y = torch.zeros(batch, dtype=torch.long)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    wall, cpu = [0.0], [0.0]

    def timed(step) -> float:
        step()  # warm-up
        times = []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - t0)
            cpu[0] += time.process_time() - c0
        wall[0] += sum(times)
        return step_seconds(times) / batch

    def share() -> float:
        return cpu[0] / max(wall[0] * torch.get_num_threads(), 1e-9)

    def infer() -> None:
        with torch.no_grad():
            model(x)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    model.eval()
    t_infer = timed(infer)
    k = cfg.freeze_stages if freeze_stages is None else freeze_stages
    if not (stage_cache and k > 0 and sc.supports(model) and k < len(model.blocks)):
        model.train()
        t_train = timed(train_step)
        return Costs(t_infer, t_train, side, share=share(),
                     probe_s=time.perf_counter() - started)
    with torch.no_grad():
        h = sc.stem_forward(model, k, x).contiguous(memory_format=fmt)
    tail = sc.TailNet(model, k)

    def stem() -> None:
        with torch.no_grad():
            sc.stem_forward(model, k, x)

    def tail_step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(tail(h), y).backward()
        opt.step()

    t_stem = timed(stem)
    tail.train()
    set_backbone_norm_eval(tail)  # as fine-tuning from a cached head runs it
    t_tail = timed(tail_step)
    return Costs(t_infer, t_tail, side, t_stem, share(), time.perf_counter() - started)


@dataclass(frozen=True)
class FixedPlan:
    """The seconds of a run that do not grow with its epochs, by what they are made of:
    start-up, the speed probe (already spent when the plan is made), decoding the images,
    the inference passes after training (mirror choice, calibration, OOD features; a
    fine-tuning plan counts its end pass over train + val itself) and the ONNX step."""

    start: float
    probe: float
    decode: float
    after: float
    export: float

    @property
    def total(self) -> float:
        return self.start + self.probe + self.decode + self.after + self.export

    def to_dict(self) -> dict[str, float]:
        return {"start": round(self.start, 2), "probe": round(self.probe, 2),
                "decode": round(self.decode, 2), "after_training": round(self.after, 2),
                "onnx": round(self.export, 2), "total": round(self.total, 2)}

    def line(self) -> str:
        return (f"fixed part ~{self.total:.0f}s (start-up {self.start:.0f}, speed probe "
                f"{self.probe:.0f}, decoding {self.decode:.0f}, after training "
                f"{self.after:.0f}, ONNX {self.export:.0f})")


def fixed_plan(n_train: int, n_val: int, c: Costs, *, finetune: bool = False,
               probe_s: float | None = None) -> FixedPlan:
    """The fixed part of a run of ``n_train`` / ``n_val`` images at the costs ``c`` (at the
    training side): start-up (``START_S``), the probe (``probe_s``, else ``c.probe_s``),
    decoding every image (twice when fine-tuning: the embedding pass reads them, then the
    training side), after training the mirror choice (2 passes over val) and the pass over
    val (calibration) and train (OOD features, up to ``OOD_SAMPLE``) twice, as a model that
    averages the mirror runs both views (a fine-tuning plan counts one of those passes
    itself), all at the inference cost, and the ONNX step (``EXPORT_S`` and its images at
    the inference cost).

    Example:
        >>> f = fixed_plan(1000, 100, Costs(0.001, 0.004, 32, probe_s=2.0, decode=0.0005))
        >>> f.to_dict()["total"], f.to_dict()["after_training"]
        (14.3, 2.4)
    """
    n = n_train + n_val
    end_pass = min(n_train, OOD_SAMPLE) + n_val
    passes = 2 * n_val + (1 if finetune else 2) * end_pass
    return FixedPlan(START_S, c.probe_s if probe_s is None else probe_s,
                     (2 if finetune else 1) * n * c.decode, passes * c.infer,
                     EXPORT_S + (2 * min(n_val, JUDGE_IMAGES) + CHECK_IMAGES) * c.infer)


def step_seconds(times: list[float]) -> float:
    """The typical step of a probe: the median of its timed steps, so that one step slowed
    by another process (or by a one-off allocation) does not set the plan. The mean of 2
    steps did: CIFAR-small at 96 px under load ~13 planned 187 s per fine-tuning epoch and
    3 epochs, and the epochs then took 83-107 s (docs/benchmarks.md).

    Example:
        >>> step_seconds([0.5, 0.4, 3.0, 0.45, 0.5])
        0.5
    """
    return float(statistics.median(times))


def finetune_sides(native: int, source_side: int | None) -> list[int]:
    """Training sides worth trying, smallest first: up to the weights' own side and at
    most ``SOURCE_UPSCALE`` times the images' median side (never fewer than one)."""
    cap = native if not source_side else min(native, SOURCE_UPSCALE * source_side)
    sides = [s for s in FINETUNE_SIDES if s <= cap]
    return sides or [FINETUNE_SIDES[0]]


@dataclass(frozen=True)
class FinetunePlan:
    """A training side, the epochs that fit, and the estimates (seconds) behind them
    (``cache_s``: the stage cache's one pass over train with mirrors and val)."""

    side: int
    epochs: int
    embed_s: float
    epoch_s: float
    cache_s: float = 0.0
    fixed: FixedPlan | None = None  # None: none counted

    @property
    def total_s(self) -> float:
        return (self.fixed_s + 2 * self.embed_s + self.cache_s
                + self.epochs * self.epoch_s)

    @property
    def fixed_s(self) -> float:
        return self.fixed.total if self.fixed is not None else 0.0


def plan_finetune(n_train: int, n_val: int, costs: Costs, budget_s: float,
                  sides: list[int]) -> FinetunePlan:
    """The largest side at which ``MIN_FINETUNE_EPOCHS`` fit in ``budget_s`` (else the side
    with the most epochs), and as many epochs there as fit (capped). Time is: the fixed part
    (:func:`fixed_plan`), the embedding pass, the epochs (training + validation), and one
    more pass over train + val at the end (calibration, OOD features). ``epochs`` may be 0."""
    best: FinetunePlan | None = None
    for side in sorted(sides, reverse=True):
        c = costs.at(side)
        fixed = fixed_plan(n_train, n_val, c, finetune=True)
        usable = budget_s * BUDGET_SHARE - fixed.total
        embed_s = (n_train + n_val) * c.infer
        cache_s = (2 * n_train + n_val) * c.stem
        # validation runs the same part of the network as training: all of it, or the tail
        val_s = c.infer if c.stem <= 0 else max(c.infer - c.stem, 0.0)
        epoch_s = (n_train * c.train + n_val * val_s) * EPOCH_OVERHEAD
        fit = max(0, int((usable - 2 * embed_s - cache_s) // max(epoch_s, 1e-9)))
        plan = FinetunePlan(side, min(fit, MAX_FINETUNE_EPOCHS), embed_s, epoch_s, cache_s,
                            fixed)
        if fit >= MIN_FINETUNE_EPOCHS:
            return plan
        if best is None or plan.epochs > best.epochs:
            best = plan
    assert best is not None  # sides is never empty
    return best


def _default(cfg: TrainConfig, name: str) -> bool:
    """Whether the recipe may choose ``name``: not given by the user (a value given
    explicitly is kept even when it equals the default), or given as ``auto``."""
    return not cfg.is_given(name) or getattr(cfg, name) == "auto"


def stage_cache_planned(cfg: TrainConfig) -> bool:
    """Whether fine-tuning will run on cached activations (``--stage-cache auto``, and the
    flips training will use are the mirror or none; the recipe's own are the mirror)."""
    if cfg.stage_cache != "auto":
        return False
    if _default(cfg, "augment") and _default(cfg, "modality"):
        return True
    flips = training_flips(cfg)
    return flips in ("hflip", "none")


def _imbalance_rule(cfg: TrainConfig, counts: dict[str, int]) -> tuple[TrainConfig, list[str]]:
    ratio = imbalance(counts)
    if ratio < IMBALANCE_RATIO:
        return cfg, []
    changes = {}
    if _default(cfg, "loss_strategy"):
        changes["loss_strategy"] = "class_weights"
    if _default(cfg, "select_metric"):
        changes["select_metric"] = "val_balanced_accuracy"
    if not changes:
        return cfg, []
    return replace(cfg, **changes), [
        f"classes imbalanced {ratio:.1f}:1 -> class weights, best epoch by balanced accuracy"]


def _finetune_changes(cfg: TrainConfig, plan: FinetunePlan, size_given: bool,
                      rgb_photos: bool) -> dict[str, object]:
    changes: dict[str, object] = {"freeze_epochs": 1, "epochs": 1 + plan.epochs}
    if not size_given:
        changes["img_size"] = plan.side
    changes.update({k: v for k, v in FINETUNE.items() if _default(cfg, k)})
    if plan.cache_s > 0 and _default(cfg, "freeze_stages"):
        changes["freeze_stages"] = STAGE_CACHE_STAGES
    if _default(cfg, "augment") and _default(cfg, "modality"):
        changes.update(augment="light", modality="photo" if rgb_photos else "generic")
    return changes


def _pretrained_rule(cfg: TrainConfig, counts: dict[str, int], n_val: int, costs: Costs,
                     rgb_photos: bool, source_side: int | None, size_given: bool
                     ) -> tuple[TrainConfig, list[str], dict | None]:
    n_train = sum(counts.values())
    native = cfg.img_size or 224
    sides = [native] if size_given else finetune_sides(native, source_side)
    plan = plan_finetune(n_train, n_val, costs, cfg.time_budget * 60, sides)
    head_embed = (n_train + n_val) * costs.at(native).infer
    c = costs.at(plan.side)
    cached = (f", the stem + first {STAGE_CACHE_STAGES} stages once per image and mirror "
              f"~{plan.cache_s:.0f}s ({1 / c.stem:.0f} img/s)" if c.stem > 0 else "")
    lines = [f"estimate at {plan.side} px: embedding {n_train + n_val} images once "
             f"~{plan.embed_s:.0f}s ({1 / c.infer:.0f} img/s){cached}, each fine-tuning epoch "
             f"~{plan.epoch_s:.0f}s ({1 / c.train:.0f} img/s"
             f"{' on the cached activations' if c.stem > 0 else ''}, channels_last, batch "
             f"{min(PROBE_BATCH, cfg.batch_size)}){c.busy_note()}; --time-budget "
             f"{cfg.time_budget:g} min"]
    if not size_given and plan.side < native:
        why = (f"the images' median side {source_side} px x {SOURCE_UPSCALE}"
               if source_side and SOURCE_UPSCALE * source_side < native
               else "the budget")
        lines.append(f"training side {plan.side} px (not the weights' {native}: {why})")
    if not (_default(cfg, "freeze_backbone") and _default(cfg, "freeze_epochs")
            and _default(cfg, "epochs")):
        return cfg, [*lines, "freezing/epochs given: kept as set"], None
    if plan.epochs < 1:
        fixed = fixed_plan(n_train, n_val, costs.at(native), finetune=True)
        lines.append(f"-> the head on cached embeddings only at {native} px (~{head_embed:.0f}s "
                     f"to embed; no fine-tuning epoch fits; {fixed.line()})")
        return replace(cfg, freeze_backbone=True), lines, planned_record(
            fixed, 2 * head_embed, 0, 0.0)
    changes = _finetune_changes(cfg, plan, size_given, rgb_photos)
    lines.append(f"-> the head on cached embeddings, then {plan.epochs} fine-tuning epoch(s) "
                 f"(~{plan.total_s:.0f}s in all; lr {changes.get('lr', cfg.lr):g} (a tenth "
                 f"of it if the first epoch undoes the head: --lr-check), warmup + "
                 f"cosine, layer decay {changes.get('layer_decay', cfg.layer_decay):g}, label "
                 f"smoothing {changes.get('label_smoothing', cfg.label_smoothing):g}, stem + "
                 f"first {changes.get('freeze_stages', cfg.freeze_stages)} stages frozen"
                 f"{' and cached (--stage-cache)' if plan.cache_s > 0 else ''}, "
                 f"weight average {changes.get('ema_decay', cfg.ema_decay):g} validated and "
                 f"kept, "
                 f"augment {changes.get('augment', cfg.augment)}; {plan.fixed.line()})")
    return replace(cfg, **changes), lines, planned_record(
        plan.fixed, 2 * plan.embed_s + plan.cache_s, plan.epochs, plan.epoch_s)


WIDE_SCALING_WHY = (
    "images stored with more than 8 bits on pretrained weights -> --scaling percentile "
    "(each image's 0.5-99.5th percentiles to 0..1, then the weights' mean/std: x/65535 "
    "would put a 12-bit chip stored in 16-bit words below 0.0625, near black to a backbone "
    "trained on photos at x/255)")


def pretrained_scaling(cfg: TrainConfig, eight_bit: bool) -> tuple[TrainConfig, str | None]:
    """The scaling a pretrained backbone gets when ``--scaling`` was left to choose: ``dtype``
    (x / 255, as ImageNet saw its photos) for 8-bit images, ``percentile`` for wider ones
    (16-bit or float), whose values rarely fill their type's range. Returns the config and
    the line that says so (None when nothing was chosen or 8-bit ``dtype`` stays).

    Example:
        >>> pretrained_scaling(TrainConfig(), eight_bit=False)[0].scaling
        'percentile'
        >>> pretrained_scaling(TrainConfig(), eight_bit=True)[0].scaling
        'auto'
    """
    if eight_bit or not _default(cfg, "scaling"):
        return cfg, None
    return replace(cfg, scaling="percentile"), WIDE_SCALING_WHY


def robust_scaling(in_chans: int, eight_bit: bool) -> str | None:
    """Why per-image percentile scaling suits these images, or None when ``dtype`` scaling
    (x / 255) stays: 8-bit RGB photos, whose exposure is part of what they show.

    Example:
        >>> robust_scaling(3, True) is None
        True
        >>> robust_scaling(1, True)
        'single-channel images'
    """
    if in_chans == 3 and eight_bit:
        return None
    if not eight_bit:
        return "images stored with more than 8 bits (or as floats)"
    return "single-channel images" if in_chans == 1 else f"{in_chans}-channel images"


@dataclass(frozen=True)
class ScratchPlan:
    """A from-scratch training side, the model's widths (None: its own), the epochs that fit
    and the estimated seconds per epoch."""

    side: int
    widths: tuple[int, ...] | None
    epochs: int
    epoch_s: float
    fixed: FixedPlan | None = None  # None: none counted

    @property
    def total_s(self) -> float:
        return (self.fixed.total if self.fixed is not None else 0.0) + self.epochs * self.epoch_s


def scratch_sides(model: str, side: int) -> list[int]:
    """Training sides worth trying for a from-scratch model chosen at ``side``, largest first:
    ``deep_cnn`` may go down to 48 px (its four pooling stages need it) when the budget is
    short; the other models keep the side they were chosen at (the images' own)."""
    if model != "deep_cnn":
        return [side]
    return sorted({side, *(s for s in SCRATCH_SIDES if 48 <= s < side)}, reverse=True)


def plan_scratch(n_train: int, n_val: int,
                 variants: list[tuple[int, tuple[int, ...] | None, Costs]],
                 budget_s: float) -> ScratchPlan:
    """The costliest (side, widths) variant at which ``SCRATCH_MIN_EPOCHS`` fit in
    ``budget_s`` (else the one with the most epochs), with as many epochs there as fit,
    capped at ``SCRATCH_MAX_EPOCHS`` (never fewer than 1).

    Example:
        >>> c = Costs(0.001, 0.004, 64)
        >>> p = plan_scratch(2500, 250, [(96, None, c.at(96)), (64, None, c)], 900)
        >>> (p.side, p.epochs)
        (96, 29)
    """
    probed = {w: c.probe_s for _, w, c in variants}  # every width was timed once
    plans = []
    for side, widths, c in variants:
        fixed = fixed_plan(n_train, n_val, c, probe_s=sum(probed.values()))
        usable = budget_s * BUDGET_SHARE - fixed.total
        epoch_s = (n_train * c.train + n_val * c.infer) * EPOCH_OVERHEAD
        fit = max(0, int(usable // max(epoch_s, 1e-9)))
        plans.append((fit, ScratchPlan(side, widths, min(max(fit, 1), SCRATCH_MAX_EPOCHS),
                                       epoch_s, fixed)))
    plans.sort(key=lambda fp: -fp[1].epoch_s)  # costliest (largest side, widest) first
    for fit, plan in plans:
        if fit >= SCRATCH_MIN_EPOCHS:
            return plan
    return max(plans, key=lambda fp: fp[0])[1]


def _scratch_regularisation(cfg: TrainConfig) -> tuple[dict[str, object], list[str]]:
    changes: dict[str, object] = {}
    if _default(cfg, "augment"):
        changes["augment"] = "light"
    changes.update({k: v for k, v in SCRATCH.items() if _default(cfg, k)})
    if not changes:
        return {}, []
    got = {k: changes.get(k, getattr(cfg, k)) for k in ("augment", *SCRATCH)}
    flips = {"none": "no flips", "hflip": "horizontal flips", "d4": "flips + 90-degree turns"}
    aug = (f"augment {got['augment']} (the modality's {flips[MODALITIES[cfg.modality]]} "
           f"(--modality {cfg.modality}) + one random translation, rotation, scaling, "
           f"brightness, contrast or noise op per image; no colour op)"
           if "augment" in changes else f"--augment {cfg.augment} given: kept")
    return changes, [
        f"{aug}, label smoothing {got['label_smoothing']:g}, weight average "
        f"{got['ema_decay']:g} validated and kept, one-cycle lr {got['lr']:g}: the from-scratch "
        f"recipe that took MSTAR 15 deg chips from 88% to 98% (docs/benchmarks.md, accuracy "
        f"section)"]


def _scratch_rule(cfg: TrainConfig, counts: dict[str, int], n_val: int,
                  variants: list[tuple[int, tuple[int, ...] | None, Costs]],
                  scaling_why: str | None) -> tuple[TrainConfig, list[str], dict | None]:
    """Scaling, augmentation, regularisation, and side / widths / epochs from the budget
    (and the planned seconds: :func:`planned_record`)."""
    changes: dict[str, object] = {}
    lines = []
    if _default(cfg, "scaling") and scaling_why:
        changes["scaling"] = "percentile"
        lines.append(f"{scaling_why} -> --scaling percentile (each image's 0.5-99.5th "
                     f"percentiles to 0..1: a change of gain or exposure between training "
                     f"and new images changes nothing; dtype scaling cost MSTAR 9 points)")
    elif _default(cfg, "scaling"):
        changes["scaling"] = "dtype"
        lines.append("8-bit RGB photos -> --scaling dtype (x/255) kept")
    more, why = _scratch_regularisation(cfg)
    changes.update(more)
    lines += why
    n_train = sum(counts.values())
    plan = plan_scratch(n_train, n_val, variants, cfg.time_budget * 60)
    own = next(v for v in variants if v[0] == plan.side and v[1] == plan.widths)[2]
    line = (f"estimate at {plan.side} px"
            f"{f' (widths {list(plan.widths)})' if plan.widths else ''}: each epoch "
            f"~{plan.epoch_s:.0f}s ({1 / own.train:.0f} img/s){own.busy_note()}; --time-budget "
            f"{cfg.time_budget:g} min")
    if plan.side != cfg.img_size:
        changes["img_size"] = plan.side
    if plan.widths is not None:
        changes["model_kwargs"] = {**cfg.model_kwargs, "widths": list(plan.widths)}
    if len(variants) > 1 and (plan.side, plan.widths) != (variants[0][0], variants[0][1]):
        line += (f"; {cfg.model} at {variants[0][0]} px with its own widths fits fewer than "
                 f"{SCRATCH_MIN_EPOCHS} epochs")
    fixed_line = plan.fixed.line() if plan.fixed is not None else ""
    epochs = plan.epochs if _default(cfg, "epochs") else cfg.epochs
    planned = (planned_record(plan.fixed, 0.0, epochs, plan.epoch_s)
               if plan.fixed is not None else None)
    if _default(cfg, "epochs"):
        changes["epochs"] = plan.epochs
        changes["freeze_epochs"] = min(cfg.freeze_epochs, plan.epochs - 1)
        lines.append(f"{line} -> {plan.epochs} epochs (~{plan.total_s:.0f}s in all: "
                     f"{fixed_line}; at most {SCRATCH_MAX_EPOCHS})")
    else:
        fixed = plan.fixed.total if plan.fixed is not None else 0.0
        fits = max(1, int((cfg.time_budget * 60 * BUDGET_SHARE - fixed)
                          // max(plan.epoch_s, 1e-9)))
        lines.append(f"{line} -> --epochs {cfg.epochs} given: kept"
                     f"{f' (only ~{fits} fit the budget)' if fits < cfg.epochs else ''}")
    return replace(cfg, **changes), lines, planned


def scratch_variants(cfg: TrainConfig, num_classes: int, size_given: bool,
                     costs: Costs | dict | None = None
                     ) -> list[tuple[int, tuple[int, ...] | None, Costs]]:
    """(side, widths, costs) of each from-scratch variant worth planning: the sides of
    :func:`scratch_sides` (only the given one with ``--img-size``) and, for ``deep_cnn``
    without ``--model-kwargs`` widths, its half-width form (16-32-64-128: the MSTAR run G
    network). ``costs``: a Costs for every variant, or a dict widths -> Costs, or None to
    time each width once on this machine at the smallest side (then scaled by pixels)."""
    side = cfg.img_size or 64
    sides = [side] if size_given else scratch_sides(cfg.model, side)
    widths: list[tuple[int, ...] | None] = [None]
    if cfg.model == "deep_cnn" and "widths" not in cfg.model_kwargs:
        widths.append(HALF_WIDTHS)
    out = []
    for w in widths:
        if isinstance(costs, Costs):
            c = costs
        elif isinstance(costs, dict):
            c = costs[w]
        else:
            probe_cfg = cfg if w is None else replace(
                cfg, model_kwargs={**cfg.model_kwargs, "widths": list(w)})
            c = measure_costs(probe_cfg, num_classes, side=min(sides))
        out += [(s, w, c.at(s)) for s in sides]
    return out


def pretrained_costs(cfg: TrainConfig, num_classes: int, source_side: int | None,
                     size_given: bool) -> Costs:
    """Time the pretrained backbone as its fine-tuning would run: at the largest side
    planned (at most ``PROBE_MAX_SIDE``; the given one with ``--img-size``), with the
    stages the recipe freezes (and caches)."""
    native = cfg.img_size or 224
    probe = min(native, PROBE_MAX_SIDE, max(finetune_sides(native, source_side)))
    cache = stage_cache_planned(cfg)
    frozen = ((STAGE_CACHE_STAGES if cache else FINETUNE["freeze_stages"])
              if _default(cfg, "freeze_stages") else None)
    return measure_costs(cfg, num_classes, side=native if size_given else probe,
                         freeze_stages=frozen, stage_cache=cache)


def planned_record(fixed: FixedPlan, passes_s: float, epochs: int, epoch_s: float
                   ) -> dict[str, object]:
    """What a plan expects a run to take (``run.json`` -> ``time``: planned against actual):
    the fixed part, the embedding / caching passes, and the epochs."""
    total = fixed.total + passes_s + epochs * epoch_s
    return {"total_s": round(total, 1), "fixed": fixed.to_dict(),
            "passes_s": round(passes_s, 1), "epochs": epochs, "epoch_s": round(epoch_s, 2)}


def with_decode(costs: Costs | dict | None, decode_s: float) -> Costs | dict | None:
    """``costs`` (one, a dict by widths, or None: measured later) with the data's decoding
    cost per image; None stays None (:func:`measure_costs` then times the model and
    :func:`plan_recipe` adds the decoding)."""
    if isinstance(costs, Costs):
        return replace(costs, decode=decode_s) if decode_s else costs
    if isinstance(costs, dict):
        return {w: with_decode(c, decode_s) for w, c in costs.items()}
    return costs


def plan_recipe(cfg: TrainConfig, counts: dict[str, int], n_val: int, *, pretrained: bool,
                rgb_photos: bool, costs: Costs | dict | None = None,
                source_side: int | None = None, size_given: bool = False,
                in_chans: int | None = None, eight_bit: bool = True, decode_s: float = 0.0
                ) -> tuple[TrainConfig, str]:
    """The rest of the recipe for an auto-chosen model (see the module docstring).

    ``costs`` None measures them here; ``source_side`` is the training images' median
    (shorter) side, ``size_given`` whether ``--img-size`` was set (then it is kept);
    ``in_chans`` / ``eight_bit`` describe the images as stored (they choose the scaling of a
    from-scratch model); ``decode_s``: seconds to decode one of them (the image probe's).
    Returns the config and one line per decision (:func:`plan_recipe_timed` also returns
    the seconds planned).
    """
    cfg, line, _ = plan_recipe_timed(cfg, counts, n_val, pretrained=pretrained,
                                     rgb_photos=rgb_photos, costs=costs,
                                     source_side=source_side, size_given=size_given,
                                     in_chans=in_chans, eight_bit=eight_bit, decode_s=decode_s)
    return cfg, line


def plan_recipe_timed(cfg: TrainConfig, counts: dict[str, int], n_val: int, *,
                      pretrained: bool, rgb_photos: bool, costs: Costs | dict | None = None,
                      source_side: int | None = None, size_given: bool = False,
                      in_chans: int | None = None, eight_bit: bool = True,
                      decode_s: float = 0.0) -> tuple[TrainConfig, str, dict | None]:
    """:func:`plan_recipe` and the seconds it plans (:func:`planned_record`; None when the
    epochs were given and not planned)."""
    cfg, lines = _imbalance_rule(cfg, counts)
    if pretrained:
        costs = costs or pretrained_costs(cfg, len(counts), source_side, size_given)
        cfg, more, planned = _pretrained_rule(cfg, counts, n_val,
                                              with_decode(costs, decode_s),  # type: ignore
                                              rgb_photos, source_side, size_given)
        cfg, why = pretrained_scaling(cfg, eight_bit)
        more += [why] if why else []
    else:
        variants = scratch_variants(cfg, len(counts), size_given, costs)
        variants = [(s, w, with_decode(c, decode_s)) for s, w, c in variants]  # type: ignore
        cfg, more, planned = _scratch_rule(cfg, counts, n_val, variants,  # type: ignore
                                           robust_scaling(in_chans or cfg.in_chans or 1,
                                                          eight_bit))
    return cfg, "; ".join(lines + more), planned
