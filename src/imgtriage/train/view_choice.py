"""Fold flip test-time augmentation into the bundle when validation shows it helps.

At the end of training, before calibration, :func:`choose_views` scores the restored model
on the validation split twice: as it is, and averaging each image with its mirror before
the head (:func:`imgtriage.models.views.average_views`, the graph the bundle would export).
When the averaged model is better on the run's selection metric (``--select-metric``;
macro F1 falls back to accuracy) by at least half a point (``MIN_GAIN``; 1% less NLL under
``val_loss``) -- a tie or a smaller gain does not pay for a second pass per image -- the
hooks stay on: calibration, the OOD bank and the ONNX graph are then those of the averaged
model, and the bundle records ``view_average: ["hflip"]`` among the model's keywords, so
every backend and every caller (predict, serve, Ray, Celery) gets it without an option.
Only a mirror the modality allows is tried (``--modality``: photos and generic images flip
horizontally; SAR, astro, microscopy and aerial are symmetric under the mirror too;
documents are not), and it costs one more pass of the network per image at prediction
time. ``--view-average off`` keeps the plain model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from imgtriage.errors import ModelError
from imgtriage.evaluate.calibration import nll_at_temperature
from imgtriage.evaluate.decision import softmax
from imgtriage.evaluate.metrics import balanced_accuracy
from imgtriage.models.penultimate import head_of
from imgtriage.models.views import VIEWS, ViewHooks, average_views
from imgtriage.train.calibrate import embed
from imgtriage.train.config import MODALITIES, TrainConfig, training_flips


def candidate_views(cfg: TrainConfig) -> list[str]:
    """The mirror to try: the horizontal one when the flips the model trained with (the
    modality's, for a model trained without augmentation) include it."""
    flips = training_flips(cfg)
    if cfg.augment == "none":
        flips = MODALITIES[cfg.modality]
    return ["hflip"] if flips in ("hflip", "d4") else []


def _score(logits: np.ndarray, y: np.ndarray, metric: str,
           offsets: tuple[float, ...] | None = None) -> tuple[float, float]:
    """(the selection metric, NLL) of ``logits`` against ``y``; the metric at the decision
    the bundle will make (``offsets``: its prior correction), the NLL of the plain logits."""
    nll = nll_at_temperature(logits, y, 1.0)
    if metric == "val_loss":
        return -nll, nll
    probs = softmax(logits, 1.0, offsets)
    if metric == "val_balanced_accuracy":
        return balanced_accuracy(probs, y), nll
    return float((probs.argmax(1) == y).mean()), nll


MIN_GAIN = 0.005  # validation accuracy (or balanced accuracy) the mirror must add
MIN_NLL_GAIN = 0.01  # relative NLL decrease it must bring under --select-metric val_loss


def _worth_a_second_pass(p_val: float, a_val: float, p_nll: float, a_nll: float,
                         metric: str) -> bool:
    """Whether averaging with the mirror earns the second pass of the network it costs on
    every image at prediction: at least ``MIN_GAIN`` more of the selection metric (half a
    point of accuracy: 3 images of 500), or ``MIN_NLL_GAIN`` less NLL when the metric is the
    loss. A tie, or a gain within noise, keeps the plain (twice as fast) model; calibration
    takes care of the NLL either way.

    Example:
        >>> _worth_a_second_pass(0.880, 0.884, 0.40, 0.38, "val_accuracy")
        False
        >>> _worth_a_second_pass(0.880, 0.889, 0.40, 0.38, "val_accuracy")
        True
    """
    if metric == "val_loss":
        return a_nll <= p_nll * (1.0 - MIN_NLL_GAIN)
    return a_val - p_val >= MIN_GAIN - 1e-12


def _linear_head(model: nn.Module) -> bool:
    try:
        return isinstance(head_of(model), nn.Linear)
    except ModelError:
        return False


class _View:
    """A training source whose images come out as one view (the mirror)."""

    def __init__(self, source: Any, view: str) -> None:
        self.source, self.fn = source, VIEWS[view]

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, order: Any, batch_size: int) -> Any:
        for batch in self.source.batches(order, batch_size):
            yield (self.fn(batch[0]), *batch[1:])


def choose_views(model: nn.Module, val: Any, cfg: TrainConfig,
                 say: Callable[[str], None] | None = None,
                 offsets: tuple[float, ...] | None = None
                 ) -> tuple[ViewHooks | None, dict[str, Any]]:
    """Try the mirror on ``val``; keep it on ``model`` (the hooks returned) when it helps.
    The summary says what was compared and why, for ``run.json`` and the manifest.
    ``offsets``: the run's prior correction (accuracies are those of the decision it makes)."""
    views = candidate_views(cfg)
    if cfg.view_average == "off":
        return None, {"applied": False, "why": "--view-average off"}
    if not views:
        return None, {"applied": False, "why": f"the modality ({cfg.modality}) has no "
                                               "label-preserving mirror"}
    if val is None or len(val) == 0:
        return None, {"applied": False, "why": "no validation images to decide on"}
    if getattr(val, "features", None) is not None:
        return None, {"applied": False, "why": "an image + feature model takes two inputs"}
    metric = cfg.select_metric if cfg.select_metric in (
        "val_accuracy", "val_balanced_accuracy", "val_loss") else "val_accuracy"
    with torch.no_grad():
        plain, _, y = embed(model, val)
        if _linear_head(model):  # the mean of the views' logits is the averaged graph's
            averaged = np.mean([plain, *(embed(model, _View(val, v))[0] for v in views)], 0)
            hooks = average_views(model, views)
        else:
            hooks = average_views(model, views)
            averaged, _, _ = embed(model, val)
    (p_val, p_nll), (a_val, a_nll) = (_score(plain, y, metric, offsets),
                                      _score(averaged, y, metric, offsets))
    better = _worth_a_second_pass(p_val, a_val, p_nll, a_nll, metric)
    name = metric.removeprefix("val_").replace("_", " ").replace("loss", "-NLL")
    summary = {"applied": bool(better), "views": views, "metric": metric, "n_val": len(y),
               "plain": {metric: p_val, "val_nll": p_nll},
               "averaged": {metric: a_val, "val_nll": a_nll},
               "why": (f"validation {name} {p_val:.4f} -> {a_val:.4f} (NLL {p_nll:.3f} -> "
                       f"{a_nll:.3f}) averaging each image with its mirror: "
                       + ("kept in the bundle (one more pass per image at prediction)"
                          if better else "not kept"))}
    if not better:
        hooks.remove()
        hooks = None
    if say is not None:
        say(f"flip views: {summary['why']}")
    return hooks, summary
