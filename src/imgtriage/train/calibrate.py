"""The end of every training run: calibrate on validation and write the default rule.

``train()`` calls :func:`calibrate_run` after the best epoch is restored. On the validation
split (never trained on) it fits the temperature (kept only when it lowers NLL), a confidence
threshold at which answered images reach ``--target-accuracy``, and, from the model's own
penultimate features of the training images, an out-of-distribution scorer (k-NN distance
fused with the relative Mahalanobis distance, ``--ood-method``) whose threshold accepts
``--ood-accept`` of validation images. The result is the bundle's default decision rule, so
``predict`` and the service say "unknown" out of the box.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from imgtriage.errors import ModelError
from imgtriage.evaluate import DecisionPolicy, fit_decision_policy
from imgtriage.evaluate.metrics import balanced_accuracy
from imgtriage.evaluate.ood import (
    METHOD,
    METHOD_FUSED,
    METHOD_STAGES,
    OOD_FILE,
    SCORERS,
    KnnOOD,
)
from imgtriage.models.penultimate import WithFeatures
from imgtriage.train.config import TrainConfig
from imgtriage.train.losses import LossPlan


@dataclass(frozen=True)
class Calibration:
    """What calibration adds to the manifest (and files), and the one line to print."""

    decision: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    drift_reference: dict[str, Any] | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    line: str = ""

    def manifest_changes(self) -> dict[str, Any]:
        if self.decision is None:
            return {"calibration": {"default": self.summary}} if self.summary else {}
        return {"decision": self.decision, "profiles": {"default": self.decision},
                "calibration": {"default": self.summary},
                "drift_reference": self.drift_reference}


@torch.no_grad()
def embed(model: nn.Module, source: Any, order: list[int] | None = None,
          batch_size: int = 256, tap: WithFeatures | None = None
          ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Logits, penultimate features (None when the model has no head to read) and labels of
    a training source (:mod:`imgtriage.train.pipeline`), in eval mode, no augmentation.
    ``tap``: the features tap of ``model`` to read (e.g. ``WithFeatures(model, stages=True)``
    for the stage statistics too; its ``stage_widths`` are then known)."""
    model.eval()
    dev = next(model.parameters()).device
    try:
        net: nn.Module = tap if tap is not None else WithFeatures(model)
    except ModelError:
        net = model
    logits, feats, labels = [], [], []
    for batch in source.batches(order if order is not None else list(range(len(source))),
                                batch_size):
        args = [t.to(dev) for t in (batch[0], *batch[2:3])]
        out = net(*args)
        lo, fe = out if isinstance(out, tuple) else (out, None)
        logits.append(lo.float().cpu().numpy())
        if fe is not None:
            feats.append(fe.float().cpu().numpy())
        labels.append(batch[1].numpy())
    if not logits:
        return np.zeros((0, 0)), None, np.zeros(0, np.int64)
    return (np.concatenate(logits).astype(np.float64),
            np.concatenate(feats) if feats else None, np.concatenate(labels))


STATS_SAMPLE = 10000


def _stages_tap(model: nn.Module, cfg: TrainConfig) -> WithFeatures | None:
    """The features tap with the stage statistics, when the run fits ``knn+rmd+stages``."""
    if not cfg.ood or cfg.ood_method != METHOD_STAGES:
        return None
    try:
        return WithFeatures(model, stages=True)
    except ModelError:  # no head: embed() reads the logits alone
        return None


def _ood(model: nn.Module, train: Any, val_feats: np.ndarray | None, cfg: TrainConfig,
         method: str, tap: WithFeatures | None = None) -> tuple[KnnOOD | None, str | None]:
    if not cfg.ood:
        return None, "off (--no-ood)"
    if val_feats is None:
        return None, "the model has no classification head to read penultimate features from"
    n = len(train)
    order = list(range(n))
    # the k-NN bank keeps --ood-bank of them; the class (and stage) statistics use up to
    # STATS_SAMPLE (embedding costs one inference pass, far less than an epoch)
    want = cfg.ood_bank if method == METHOD else max(cfg.ood_bank, STATS_SAMPLE)
    if n > want:  # embed only the sample the scorer uses
        order = sorted(np.random.default_rng(cfg.seed).choice(n, want, replace=False).tolist())
    _, train_feats, train_y = embed(model, train, order, tap=tap)
    if train_feats is None or not len(train_feats):
        return None, "no training features"
    extra = {"stage_widths": tap.stage_widths} if method == METHOD_STAGES and tap else {}
    return SCORERS[method](k=cfg.ood_k, accept=cfg.ood_accept, max_bank=cfg.ood_bank,
                           seed=cfg.seed, **extra).fit(train_feats, val_feats, train_y), None


def calibrate_run(model: nn.Module, train: Any, val: Any, classes: list[str],
                  cfg: TrainConfig, prior: LossPlan | None = None) -> Calibration:
    """Fit the default decision rule on ``val`` (see the module docstring). ``prior``: the
    run's loss plan; its prior correction (``--prior-correction``) becomes part of the rule."""
    offsets = prior.prior_offsets if prior is not None else None
    if not cfg.calibrate:
        return _uncalibrated(model, val, classes, cfg, prior)
    if val is None or len(val) == 0:
        return Calibration(summary={"skipped": "no validation images"},
                           line="not calibrated: no validation images (raise --val-frac)")
    tap = _stages_tap(model, cfg)
    logits, feats, y = embed(model, val, tap=tap)
    method, method_note = cfg.ood_method, None
    if method == METHOD_STAGES and (tap is None or not tap.stage_widths):
        # the crop CNNs and timm backbones have stages; an image + feature model has none
        method, method_note = METHOD_FUSED, (f"{type(model).__name__} has no stages to read: "
                                             f"{METHOD_FUSED} on the penultimate features")
    ood, ood_note = _ood(model, train, feats, cfg, method, tap)

    def fitted(correction: tuple[float, ...] | None) -> tuple[DecisionPolicy, dict[str, Any]]:
        return fit_decision_policy(logits, y, class_names=classes,
                                   target_accuracy=cfg.target_accuracy,
                                   ood=ood.rule() if ood is not None else None,
                                   prior_correction=correction)

    policy, summary = fitted(offsets)
    said = prior_summary(logits, y, policy, classes, prior, cfg.prior_correction)
    if said is not None and said.get("dropped"):  # refit the rule on the plain scores
        policy, summary = fitted(None)
    summary["prior_correction"] = said
    d = policy.decide(logits, ood.val_scores_ if ood is not None else None)
    answered = ~d.abstained
    correct = d.class_id == y
    summary["default_rule"] = {
        "n": len(y), "coverage": float(answered.mean()),
        "accuracy_answered": float(correct[answered].mean()) if answered.any() else None,
        "abstained_low_confidence": int(sum(r == "low_confidence" for r in d.reason)),
        "abstained_ood": int(sum(r == "out_of_distribution" for r in d.reason))}
    summary["ood"] = ood.rule() if ood is not None else {"skipped": ood_note}
    if ood is not None and method_note:
        summary["ood"]["note"] = method_note
    files = {}
    if ood is not None:
        from safetensors.numpy import save

        files[OOD_FILE] = save(ood.arrays())
    line = rule_line(summary["default_rule"])
    if (said or {}).get("offsets"):  # applied, or tried and dropped: say which and why
        line = f"{said['line']}\n{line}"  # type: ignore[index]
    return Calibration(policy.to_dict(), {k: v for k, v in summary.items()
                                          if k != "drift_reference"},
                       summary["drift_reference"], files, line)


KEEP_RULE = ("kept when the corrected argmax's validation balanced accuracy is at least the "
             "plain argmax's (a tie keeps it)")


def _uncalibrated(model: nn.Module, val: Any, classes: list[str], cfg: TrainConfig,
                  prior: LossPlan | None) -> Calibration:
    """--no-calibrate: T = 1, never abstains; the prior correction (it belongs to how the
    model was trained) is checked on validation like a calibrated rule's, when there is one."""
    line = "not calibrated (--no-calibrate): T = 1, never abstains"
    if prior is None or prior.prior_offsets is None:
        return Calibration(summary={"skipped": "--no-calibrate"}, line=line)
    policy = DecisionPolicy(prior_correction=prior.prior_offsets)
    if val is not None and len(val):
        logits, _, y = embed(model, val)
        record = prior_summary(logits, y, policy, classes, prior, cfg.prior_correction)
    else:
        record = _prior_record(policy, classes, prior, f"{prior.prior_note}; "
                               f"{policy.describe_priors()} (no validation images to check "
                               "it on)")
    if record.get("dropped"):  # type: ignore[union-attr]
        policy = DecisionPolicy()
    return Calibration(policy.to_dict(), {"skipped": "--no-calibrate",
                                          "prior_correction": record},
                       None, {}, f"{line}; {record['line']}")  # type: ignore[index]


def prior_summary(logits: np.ndarray, y: np.ndarray, policy: DecisionPolicy,
                  classes: list[str], prior: LossPlan | None, requested: str = "on"
                  ) -> dict[str, Any] | None:
    """What the prior correction is and does on validation: accuracy and balanced accuracy
    of the rule's argmax with and without it (same temperature), whether it stays, what the
    bundle decides at and reports (``behaviour``, :meth:`DecisionPolicy.describe_priors`),
    and a line to print.

    ``requested`` is ``--prior-correction``: under ``auto`` the correction is kept only when
    it does not lower validation balanced accuracy (:data:`KEEP_RULE`); otherwise the record
    says ``dropped`` (the caller refits the rule without it) and why. ``on`` keeps it as asked,
    with a ``warning`` when it lowers validation balanced accuracy."""
    if prior is None:
        return None
    if policy.prior_correction is None:
        return {"applied": False, "behaviour": policy.describe_priors(), "why": prior.prior_note,
                "line": prior.prior_note}
    plain = replace(policy, prior_correction=None).decide(logits).class_id
    corrected = policy.decide(logits).class_id
    scores = {name: {"accuracy": float((c == y).mean()),
                     "balanced_accuracy": balanced_accuracy(np.eye(len(classes))[c], y)}
              for name, c in (("plain", plain), ("corrected", corrected))}
    shown = ", ".join(f"{c} {v:+.3f}"
                      for c, v in zip(classes, policy.prior_correction, strict=True))
    p, c = scores["plain"], scores["corrected"]
    lowers = c["balanced_accuracy"] < p["balanced_accuracy"]
    measured = (f"validation balanced accuracy {p['balanced_accuracy']:.3f} at the plain argmax "
                f"-> {c['balanced_accuracy']:.3f} (accuracy {p['accuracy']:.3f} -> "
                f"{c['accuracy']:.3f}, n={len(y)})")
    if lowers and requested == "auto":
        plain_rule = replace(policy, prior_correction=None).describe_priors()
        line = (f"prior correction dropped: offsets {shown} would lower {measured}; the bundle "
                f"{plain_rule} (--prior-correction on keeps it anyway)")
        return {**_prior_record(policy, classes, prior, line, scores), "applied": False,
                "dropped": True, "behaviour": plain_rule, "rule": KEEP_RULE,
                "why": "it lowered validation balanced accuracy"}
    verdict = (("kept: it does not lower validation balanced accuracy (a tie keeps it)",)
               if requested == "auto" else ())
    warning = ("it lowers validation balanced accuracy; kept because --prior-correction on "
               "asked for it (auto would drop it)") if lowers else None
    line = "; ".join((f"{prior.prior_note}: offsets {shown}; {measured}", *verdict,
                      *((f"warning: {warning}",) if warning else ()),
                      f"the bundle {policy.describe_priors()} (softmax(logits / T), T fitted "
                      "on validation)"))
    record = _prior_record(policy, classes, prior, line, scores)
    record["rule"] = KEEP_RULE if requested == "auto" else "--prior-correction on: kept as asked"
    if warning:
        record["warning"] = warning
    return record


def _prior_record(policy: DecisionPolicy, classes: list[str], prior: LossPlan, line: str,
                  scores: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``prior_correction`` record of a rule that applies one (with or without the
    validation scores of :func:`prior_summary`)."""
    offsets = dict(zip(classes, policy.prior_correction or (), strict=True))
    return {"applied": True, "dropped": False, "offsets": offsets,
            "behaviour": policy.describe_priors(), "why": prior.prior_note, **(scores or {}),
            "line": line}


def rule_line(r: dict[str, Any]) -> str:
    """"answers 93% of validation images at 99.1% accuracy; abstains on the rest (...)"."""
    acc = r["accuracy_answered"]
    acc_text = f"{100 * acc:.1f}% accuracy" if acc is not None else "no accuracy (none answered)"
    return (f"answers {100 * r['coverage']:.0f}% of validation images at {acc_text}; abstains "
            f"on the rest (validation n={r['n']}: {r['abstained_low_confidence']} low "
            f"confidence, {r['abstained_ood']} out of distribution)")
