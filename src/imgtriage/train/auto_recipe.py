"""``--model auto`` chooses the whole recipe, not only the architecture.

After :func:`~imgtriage.train.auto.choose_model` picked the model, :func:`plan_recipe`
fills in what the user left at its default, each with the sentence that explains it:

- **classes imbalanced** (largest / smallest training class >= 1.5): inverse-frequency class
  weights and selection of the best epoch by balanced accuracy;
- **pretrained backbone**: the head is trained on cached embeddings first; then, when
  ``--time-budget`` leaves room, the whole network is fine-tuned for as many epochs as fit
  (at a fine-tuning learning rate, earlier stages slower by ``--layer-decay``, with the
  modality's augmentation: flips + one light random op per image for photos);
- **small CNNs**: as many of the default ``--epochs`` as fit in the budget (epochs given
  on the command line are kept).

The per-image costs come from timing the chosen model on this machine (a few batches,
seconds) and are printed before training starts, per epoch.

Example:
    >>> imbalance({"ok": 900, "bad": 300})
    3.0
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from imgtriage.train.config import TrainConfig, field_default

IMBALANCE_RATIO = 1.5
FINETUNE_LR = 5e-4
FINETUNE_LAYER_DECAY = 0.7
MAX_FINETUNE_EPOCHS = 8


def imbalance(counts: dict[str, int]) -> float:
    """Largest class count over the smallest (inf when a class has no training image)."""
    values = list(counts.values())
    return max(values) / min(values) if values and min(values) > 0 else math.inf


@dataclass(frozen=True)
class Costs:
    """Seconds per image on this machine: inference (embedding) and a training step."""

    infer: float
    train: float


def measure_costs(cfg: TrainConfig, num_classes: int, batch: int = 4, reps: int = 2) -> Costs:
    """Time the chosen model (random weights: the cost is the same) on random inputs."""
    from imgtriage.models import create_model

    size = cfg.img_size or 224
    model = create_model(cfg.model, num_classes, cfg.in_chans or 3,
                         **dict(cfg.model_kwargs))
    x = torch.randn(batch, cfg.in_chans or 3, size, size)
    y = torch.zeros(batch, dtype=torch.long)

    def timed(step) -> float:
        step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        return (time.perf_counter() - t0) / (reps * batch)

    def infer() -> None:
        with torch.no_grad():
            model(x)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    model.eval()
    t_infer = timed(infer)
    model.train()
    return Costs(t_infer, timed(train_step))


def _default(cfg: TrainConfig, name: str) -> bool:
    return getattr(cfg, name) == field_default(name)


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


def _pretrained_rule(cfg: TrainConfig, counts: dict[str, int], n_val: int, costs: Costs,
                     rgb_photos: bool) -> tuple[TrainConfig, list[str]]:
    n_train = sum(counts.values())
    budget = cfg.time_budget * 60
    embed_s = (n_train + n_val) * costs.infer
    epoch_s = n_train * costs.train + n_val * costs.infer
    left = budget * 0.9 - embed_s
    epochs = min(MAX_FINETUNE_EPOCHS, max(0, int(left // epoch_s)))
    lines = [f"estimate: embedding {n_train + n_val} images once ~{embed_s:.0f}s "
             f"({1 / costs.infer:.0f} img/s), each fine-tuning epoch ~{epoch_s:.0f}s "
             f"({1 / costs.train:.0f} img/s); --time-budget {cfg.time_budget:g} min"]
    if not (_default(cfg, "freeze_backbone") and _default(cfg, "freeze_epochs")
            and _default(cfg, "epochs")):
        return cfg, [*lines, "freezing/epochs given: kept as set"]
    if epochs < 1:
        lines.append("-> the head on cached embeddings only (no fine-tuning epoch fits)")
        return replace(cfg, freeze_backbone=True), lines
    changes: dict[str, object] = {"freeze_epochs": 1, "epochs": 1 + epochs}
    if _default(cfg, "lr"):
        changes["lr"] = FINETUNE_LR
    if _default(cfg, "layer_decay"):
        changes["layer_decay"] = FINETUNE_LAYER_DECAY
    if _default(cfg, "augment") and _default(cfg, "modality"):
        changes.update(augment="light", modality="photo" if rgb_photos else "generic")
    lines.append(f"-> the head on cached embeddings, then {epochs} fine-tuning epoch(s) "
                 f"(~{embed_s + epochs * epoch_s:.0f}s in all), augment "
                 f"{changes.get('augment', cfg.augment)}")
    return replace(cfg, **changes), lines


def _cnn_rule(cfg: TrainConfig, counts: dict[str, int], n_val: int, costs: Costs
              ) -> tuple[TrainConfig, list[str]]:
    n_train = sum(counts.values())
    epoch_s = n_train * costs.train + n_val * costs.infer
    fit = max(1, int(cfg.time_budget * 60 * 0.9 // max(epoch_s, 1e-9)))
    line = (f"estimate: each epoch ~{epoch_s:.0f}s ({1 / costs.train:.0f} img/s); "
            f"--time-budget {cfg.time_budget:g} min")
    if fit < cfg.epochs and _default(cfg, "epochs"):
        return replace(cfg, epochs=fit, freeze_epochs=min(cfg.freeze_epochs, fit - 1)), [
            f"{line} -> {fit} of the {cfg.epochs} epochs fit"]
    if fit < cfg.epochs:
        return cfg, [f"{line} -> only {fit} of --epochs {cfg.epochs} fit; kept as given"]
    return cfg, [f"{line} -> all {cfg.epochs} epochs fit (~{cfg.epochs * epoch_s:.0f}s)"]


def plan_recipe(cfg: TrainConfig, counts: dict[str, int], n_val: int, *, pretrained: bool,
                rgb_photos: bool, costs: Costs | None = None) -> tuple[TrainConfig, str]:
    """The rest of the recipe for an auto-chosen model (see the module docstring).

    ``costs`` None measures them here; returns the config and one line per decision.
    """
    cfg, lines = _imbalance_rule(cfg, counts)
    costs = costs or measure_costs(cfg, len(counts))
    if pretrained:
        cfg, more = _pretrained_rule(cfg, counts, n_val, costs, rgb_photos)
    else:
        cfg, more = _cnn_rule(cfg, counts, n_val, costs)
    return cfg, "; ".join(lines + more)
