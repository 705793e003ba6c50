"""``imgtriage evaluate --ood FOLDER``: how well a bundle tells its own kind of images from
others, measured on a folder of images that belong to none of its classes.

Two scores are compared on the same images: the bundle's OOD score (k-NN distance of the
penultimate features, when the bundle has an OOD rule) and the max-softmax-probability
baseline (MSP, the calibrated top-class probability; lower = stranger). Each gets AUROC (OOD
as the positive class) and the FPR at 95% TPR (the share of OOD images accepted while 95% of
the labelled, in-distribution images are). The section also says how many of the folder's
images the bundle's rule refuses, and why.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np

from imgtriage.errors import DataError
from imgtriage.evaluate.decision import DecisionPolicy, softmax
from imgtriage.evaluate.ood import auroc_fpr
from imgtriage.predict.base import Decoded, decode_entry
from imgtriage.predict.batch import iter_files
from imgtriage.predict.predictor import Predictor


def _score_folder(predictor: Predictor, policy: DecisionPolicy, folder: Any, tta: bool,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray | None, list[dict]]:
    """Logits and OOD scores of every readable file under ``folder``; defects beside."""
    files = list(iter_files([folder]))
    tapped = replace(policy, abstain=True) if policy.ood is not None else None
    logits, scores, defects = [], [], []
    for start in range(0, len(files), batch_size):
        got = [decode_entry(predictor.decoder, f) for f in files[start:start + batch_size]]
        defects += [g for g in got if not isinstance(g, Decoded)]
        ok = [g for g in got if isinstance(g, Decoded)]
        if not ok:
            continue
        x = np.stack([g.x for g in ok])
        feats = predictor.feature_matrix([g.meta for g in ok], [g.name for g in ok])
        if tapped is not None:
            lo, sc = predictor.forward(x, tapped, tta, feats, [g.meta for g in ok])
            scores.append(sc)
        else:
            lo = predictor.logits(x, tta, feats)
        logits.append(lo)
    if not logits:
        raise DataError(f"no readable images under {os.fspath(folder)} (--ood)")
    return (np.concatenate(logits), np.concatenate(scores) if scores else None, defects)


def ood_section(predictor: Predictor, policy: DecisionPolicy, id_data: Any, folder: Any, *,
                tta: bool = False, batch_size: int = 64) -> dict[str, Any]:
    """The report's ``ood`` block: ``id_data`` holds the labelled (in-distribution) logits
    and OOD scores (``collect_logits`` with ``ood_policy``)."""
    logits, scores, defects = _score_folder(predictor, policy, folder, tta, batch_size)
    t = policy.temperature
    methods = {"msp": auroc_fpr(-softmax(id_data.logits, t).max(1), -softmax(logits, t).max(1))}
    if scores is not None and id_data.ood_scores is not None:
        # keyed by the bundle's OOD method (knn+rmd, knn), the score its rule thresholds
        methods = {str(policy.ood.get("method", "knn")): auroc_fpr(id_data.ood_scores, scores),
                   **methods}
    d = policy.decide(logits, scores)
    reasons: dict[str, int] = {}
    for r in d.reason:
        if r is not None:
            reasons[r] = reasons.get(r, 0) + 1
    return {"folder": os.fspath(folder), "n": len(logits), "defects": defects,
            "methods": methods, "refused": float(d.abstained.mean()),
            "refused_by_reason": reasons,
            "note": "AUROC: OOD images as positives; FPR at 95% TPR: share of OOD images "
                    "accepted while 95% of the labelled images are"}
