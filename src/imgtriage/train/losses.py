"""Loss strategies for imbalanced data: class weights, focal loss, label smoothing.

Class weights are inverse class frequencies, power-smoothed (``w := w**beta``), capped at
``cap × median(w)`` and normalised so that the average weight per *training sample* is 1
(the loss keeps the scale of plain cross entropy). Focal loss uses the same numbers as its
per-class alpha. With balanced sampling the sampler already equalises the classes, so the
per-sample weights are switched off (nothing is counted twice); focal keeps its gamma.

The prior correction (``--prior-correction``, logit adjustment: Menon et al. 2021, "Long-tail
learning via logit adjustment") undoes what is left: a model fitted with per-class weights
``w_c`` on class frequencies ``pi_c`` learns posteriors for the prior ``pi_c * w_c`` (the
weighted loss is the plain loss on data with that prior), so adding ``-log(pi_c * w_c)`` to
its logits gives the posteriors, and the argmax, of equal priors: the decision balanced
accuracy asks for. Square-root weights (the default beta 0.5) undo only half of the prior.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imgtriage.train.config import TrainConfig


def class_weights(counts: np.ndarray | list[int], beta: float = 1.0, cap: float = 0.0
                  ) -> np.ndarray:
    """Inverse-frequency class weights: ``(1/n_c)**beta``, capped, normalised.

    ``cap`` > 0 limits every weight to ``cap × median`` (median over classes that have
    samples). Normalisation makes ``sum(n_c * w_c) == sum(n_c)``. Classes without samples get
    the largest weight (they never occur in the loss, but stay finite).

    Example:
        >>> class_weights([100, 20, 5]).round(3).tolist()
        [0.417, 2.083, 8.333]
        >>> class_weights([100, 20, 5], cap=2.0).round(3).tolist()
        [0.5, 2.5, 5.0]
    """
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    if not present.any():
        return np.ones_like(n)
    w = np.zeros_like(n)
    w[present] = (1.0 / n[present]) ** beta
    if cap > 0:
        w[present] = np.minimum(w[present], cap * np.median(w[present]))
    w[present] *= n.sum() / float((n * w).sum())
    w[~present] = w[present].max()
    return w


@dataclass(frozen=True)
class LossPlan:
    """What the loss will do, decided once from the config and the training labels."""

    strategy: str
    weights: tuple[float, ...] | None  # per-class weights (CE) or alphas (focal); None = off
    gamma: float
    label_smoothing: float
    note: str
    prior_offsets: tuple[float, ...] | None = None  # the decision's correction; None = off
    prior_note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"strategy": self.strategy, "weights": list(self.weights) if self.weights
                else None, "gamma": self.gamma, "label_smoothing": self.label_smoothing,
                "note": self.note, "prior_correction": list(self.prior_offsets)
                if self.prior_offsets is not None else None, "prior_note": self.prior_note}


def prior_offsets(counts: np.ndarray | list[int], weights: np.ndarray | list[float] | None
                  ) -> np.ndarray:
    """``-log`` of the class prior a loss with these per-class ``weights`` (None: plain)
    saw on training ``counts``, centred to mean 0 over the classes present (absent classes:
    0). Added to logits, it moves the argmax to the balanced decision.

    Example:
        >>> prior_offsets([300, 100], None).round(3).tolist()  # log 3 between the classes
        [-0.549, 0.549]
        >>> prior_offsets([300, 100], class_weights([300, 100], beta=1.0)).round(3).tolist()
        [0.0, 0.0]
    """
    n = np.asarray(counts, dtype=np.float64)
    w = np.ones_like(n) if weights is None else np.asarray(weights, dtype=np.float64)
    present = (n > 0) & (w > 0)
    out = np.zeros_like(n)
    if present.sum() < 2:
        return out
    out[present] = -np.log(n[present] * w[present])
    out[present] -= out[present].mean()
    return out


def decided(logits: torch.Tensor, offsets: tuple[float, ...] | None) -> torch.Tensor:
    """The class each row is answered with: ``argmax(logits + offsets)`` (plain argmax
    without a prior correction), as the bundle's rule will decide."""
    if offsets is None:
        return logits.argmax(1)
    return (logits.float() + torch.tensor(offsets, dtype=torch.float32,
                                          device=logits.device)).argmax(1)


def prior_correction_applies(cfg: TrainConfig) -> bool:
    """``--prior-correction``: on, or auto with balanced accuracy as the selection metric."""
    return cfg.prior_correction == "on" or (cfg.prior_correction == "auto"
                                            and cfg.select_metric == "val_balanced_accuracy")


def _with_prior(plan: LossPlan, cfg: TrainConfig, counts: np.ndarray) -> LossPlan:
    """The plan with the decision's prior correction (or the reason there is none)."""
    if not prior_correction_applies(cfg):
        why = ("off (--prior-correction off)" if cfg.prior_correction == "off" else
               f"off (selection by {cfg.select_metric}, not balanced accuracy)")
        return replace(plan, prior_note=f"prior correction {why}")
    if cfg.balanced_sampling:
        return replace(plan, prior_note="prior correction: none needed (--balanced-sampling "
                                        "draws the classes equally)")
    off = prior_offsets(counts, plan.weights)
    if float(np.ptp(off)) < 1e-6:
        return replace(plan, prior_note="prior correction: none needed (the loss saw equal "
                                        "class priors)")
    source = "the class counts" if plan.weights is None else "the class counts x weights"
    return replace(plan, prior_offsets=tuple(float(v) for v in off),
                   prior_note=f"prior correction: decide at equal class priors (logits + "
                              f"-log prior of {source}; {_kept_when(cfg)})")


def _kept_when(cfg: TrainConfig) -> str:
    """When the correction stays (train/calibrate.py checks it on validation)."""
    if cfg.prior_correction == "on":
        return "--prior-correction on: kept as asked"
    return ("auto: kept only if it does not lower validation balanced accuracy; "
            "--prior-correction off to keep the data's prior")


def plan_loss(cfg: TrainConfig, labels: np.ndarray, num_classes: int) -> LossPlan:
    """The weights/alphas the run will use, with a one-line explanation.

    Example:
        >>> plan = plan_loss(TrainConfig(loss_strategy="class_weights", class_weight_beta=1,
        ...                              class_weight_cap=0), np.array([0] * 9 + [1]), 2)
        >>> [round(w, 3) for w in plan.weights]
        [0.556, 5.0]
    """
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    return _with_prior(_plan(cfg, counts), cfg, counts)


def _plan(cfg: TrainConfig, counts: np.ndarray) -> LossPlan:
    gamma = cfg.focal_gamma if cfg.loss_strategy == "focal" else 0.0
    if cfg.loss_strategy == "none":
        return LossPlan("none", None, 0.0, cfg.label_smoothing, "plain cross entropy")
    if cfg.balanced_sampling:
        return LossPlan(cfg.loss_strategy, None, gamma, cfg.label_smoothing,
                        "per-class weights off: --balanced-sampling already equalises classes")
    w = class_weights(counts, cfg.class_weight_beta, cfg.class_weight_cap)
    kind = "focal alpha" if cfg.loss_strategy == "focal" else "class weights"
    note = (f"{kind} = (1/count)^{cfg.class_weight_beta:g}, cap {cfg.class_weight_cap:g}x "
            "median, mean 1 per sample")
    return LossPlan(cfg.loss_strategy, tuple(float(v) for v in w), gamma, cfg.label_smoothing,
                    note)


class TrainLoss(nn.Module):
    """Cross entropy or focal loss with optional per-class weights and label smoothing.

    Per sample ``i`` with true class ``y``: ``w_y * loss_i``, averaged over the batch, where
    ``loss_i`` is ``-sum_c t_c log p_c`` (cross entropy) or ``-sum_c t_c (1-p_c)^gamma log p_c``
    (focal) and ``t`` is the (smoothed) one-hot target.

    Example:
        >>> loss = TrainLoss(3, weights=[1.0, 2.0, 4.0], gamma=2.0)
        >>> float(loss(torch.zeros(2, 3), torch.tensor([0, 2]))) > 0
        True
    """

    def __init__(self, num_classes: int, weights: list[float] | tuple[float, ...] | None = None,
                 gamma: float = 0.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        w = torch.as_tensor(weights, dtype=torch.float32) if weights is not None else None
        self.register_buffer("weights", w, persistent=False)

    @classmethod
    def from_plan(cls, plan: LossPlan, num_classes: int) -> TrainLoss:
        return cls(num_classes, plan.weights, plan.gamma, plan.label_smoothing)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Unweighted loss of every sample, shape (N,)."""
        if self.gamma == 0:
            return F.cross_entropy(logits.float(), target, reduction="none",
                                   label_smoothing=self.label_smoothing)
        logp = F.log_softmax(logits.float(), dim=1)
        eps, k = self.label_smoothing, self.num_classes
        t = F.one_hot(target, k).float() * (1 - eps) + eps / k
        focus = (1 - logp.exp()).clamp_min(0).pow(self.gamma)
        return -(t * focus * logp).sum(1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.weights is None and self.gamma == 0:
            return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        loss = self.per_sample(logits, target)
        if self.weights is not None:
            loss = loss * self.weights.to(loss.device)[target]
        return loss.mean()
