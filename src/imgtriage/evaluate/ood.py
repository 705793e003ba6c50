"""Out-of-distribution scores: is this input like anything the model was trained on?

Softmax confidence cannot answer that: networks give 95-100% to white noise and to classes
they never saw. :class:`KnnOOD` (Sun et al., "Out-of-distribution detection with deep nearest
neighbors", ICML 2022) keeps the L2-normalised penultimate features of (a sample of) the
training images; an input's score is the distance from its normalised feature to the k-th
nearest of them. No assumption about the feature distribution, no extra training.

The threshold is chosen on validation images (never trained on) as a conformal quantile at
the stated in-distribution acceptance: with ``accept=0.95`` a new in-distribution image is
accepted with probability >= 95% (exchangeability), whatever the model. Everything fitted is
arrays (``arrays()``, saved as safetensors) and a JSON rule (``rule()``): no pickle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgtriage.errors import ConfigError
from imgtriage.evaluate._validation import json_safe, not_fitted
from imgtriage.evaluate.conformal import conformal_quantile

OOD_FILE = "ood.safetensors"
METHOD = "knn"


def _normalise(feats: Any) -> np.ndarray:
    f = np.asarray(feats, dtype=np.float32)
    if f.ndim != 2:
        raise ConfigError(f"features must be (N, D), got shape {f.shape}")
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.maximum(norm, 1e-12)


class KnnOOD:
    """k-NN distance in the normalised penultimate space; higher = more unusual.

    Parameters:
        k: which neighbour's distance is the score.
        accept: share of in-distribution (validation) images the threshold accepts.
        max_bank: at most this many training features are kept (a seeded sample; Sun et al.
            find a 1% sample of ImageNet loses little).
        seed: the sample's seed.

    Fitted attributes: ``bank_`` (M, D) float32, ``val_scores_``, ``threshold_``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ood = KnnOOD(k=3).fit(rng.normal(size=(200, 8)) + 4, rng.normal(size=(60, 8)) + 4)
        >>> bool(ood.score(rng.normal(size=(1, 8)) - 4)[0] > ood.threshold_)
        True
    """

    def __init__(self, k: int = 10, accept: float = 0.95, max_bank: int = 10000,
                 seed: int = 0) -> None:
        self.k = k
        self.accept = accept
        self.max_bank = max_bank
        self.seed = seed

    def _check_params(self) -> None:
        if int(self.k) < 1:
            raise ConfigError(f"k must be >= 1, got {self.k} (--ood-k)")
        if not 0.0 < float(self.accept) < 1.0:
            raise ConfigError(f"OOD acceptance must be in (0, 1), got {self.accept} "
                              "(--ood-accept)")

    def fit(self, train_feats: Any, val_feats: Any) -> KnnOOD:
        """Keep the training features; choose the threshold on validation features."""
        self._check_params()
        bank = _normalise(train_feats)
        if len(bank) > int(self.max_bank):
            keep = np.random.default_rng(self.seed).choice(len(bank), int(self.max_bank),
                                                           replace=False)
            bank = bank[np.sort(keep)]
        if len(bank) < 1:
            raise ConfigError("no training features to fit the OOD scorer on")
        self.bank_ = np.ascontiguousarray(bank)
        self.val_scores_ = self.score(val_feats)
        self.threshold_ = threshold_from_scores(self.val_scores_, float(self.accept))
        return self

    def score(self, feats: Any) -> np.ndarray:
        """Distance to the k-th nearest training feature (in [0, 2]), one per row."""
        if not hasattr(self, "bank_"):
            raise not_fitted(self)
        f = _normalise(feats)
        if f.shape[1] != self.bank_.shape[1]:
            raise ConfigError(f"features have {f.shape[1]} dimensions but the OOD scorer was "
                              f"fitted on {self.bank_.shape[1]}; retrain the bundle")
        k = min(int(self.k), len(self.bank_))
        m = len(self.bank_)
        out = np.empty(len(f), dtype=np.float64)
        with _one_blas_thread():
            for i in range(0, len(f), 1024):  # bounded memory for big batches
                sims = f[i:i + 1024] @ self.bank_.T
                kth = np.partition(sims, m - k, axis=1)[:, m - k]  # k-th largest similarity
                out[i:i + 1024] = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * kth.astype(np.float64)))
        return out

    def rule(self) -> dict[str, Any]:
        """The JSON part the bundle's decision policy carries (arrays go to ``OOD_FILE``)."""
        if not hasattr(self, "bank_"):
            raise not_fitted(self)
        return json_safe({"method": METHOD, "k": int(self.k), "accept": float(self.accept),
                          "threshold": float(self.threshold_), "file": OOD_FILE,
                          "n_bank": len(self.bank_), "n_val": len(self.val_scores_),
                          "dim": int(self.bank_.shape[1]), "max_bank": int(self.max_bank),
                          "seed": int(self.seed)})

    def arrays(self) -> dict[str, np.ndarray]:
        return {"bank": self.bank_, "val_scores": self.val_scores_.astype(np.float64)}

    @classmethod
    def from_rule(cls, rule: dict[str, Any], arrays: dict[str, np.ndarray]) -> KnnOOD:
        """Rebuild a fitted scorer from :meth:`rule` and :meth:`arrays` (as stored)."""
        if rule.get("method") != METHOD or "bank" not in arrays:
            raise ConfigError(f"unknown OOD rule {rule.get('method')!r} or missing 'bank'; "
                              "retrain the bundle")
        ood = cls(k=int(rule["k"]), accept=float(rule["accept"]),
                  max_bank=int(rule.get("max_bank", 10000)), seed=int(rule.get("seed", 0)))
        ood._check_params()
        ood.bank_ = np.ascontiguousarray(arrays["bank"], dtype=np.float32)
        ood.val_scores_ = np.asarray(arrays.get("val_scores", np.zeros(0)), dtype=np.float64)
        ood.threshold_ = float(rule["threshold"])
        return ood


_BLAS: list[Any] = []


def _one_blas_thread() -> Any:
    """One BLAS thread for the scorer's matrix product: the model's runtime already uses the
    cores, and a multi-threaded product of a batch by the bank competing with it was 3-25x
    slower on 2 shared cores (64 rows x 2,500-10,000 x 128: 17-42 ms vs 0.7-6.6 ms)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - scikit-learn (a dependency) brings it
        from contextlib import nullcontext

        return nullcontext()
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=1, user_api="blas")


def threshold_from_scores(val_scores: Any, accept: float) -> float:
    """The conformal ``accept`` quantile of validation scores (the largest one when there are
    too few for the finite-sample guarantee).

    Example:
        >>> threshold_from_scores(np.arange(1, 101) / 100, 0.95)  # ceil(101 * 0.95) = 96th
        0.96
    """
    s = np.asarray(val_scores, dtype=np.float64)
    if len(s) == 0:
        raise ConfigError("no validation images to choose the OOD threshold on")
    q = conformal_quantile(s, 1.0 - float(accept))
    return float(s.max()) if not np.isfinite(q) else q


def auroc_fpr(id_scores: Any, ood_scores: Any, tpr: float = 0.95) -> dict[str, float]:
    """OOD detection quality: AUROC (OOD = positive, higher score = more OOD) and the share
    of OOD inputs accepted when ``tpr`` of in-distribution ones are (FPR at 95% TPR, with
    in-distribution as the positive class as in the OOD literature).

    Example:
        >>> auroc_fpr([0.1, 0.2, 0.3], [0.8, 0.9])["auroc"]
        1.0
    """
    a = np.asarray(id_scores, dtype=np.float64)
    b = np.asarray(ood_scores, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ConfigError("AUROC needs in-distribution and OOD scores")
    both = np.r_[a, b]
    from scipy.stats import rankdata

    ranks = rankdata(both)
    auroc = (ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b))
    cut = np.quantile(a, tpr, method="higher")  # accept score <= cut: >= tpr of ID
    fpr = float(np.mean(b <= cut))
    return {"auroc": float(auroc), "fpr_at_95tpr" if tpr == 0.95 else f"fpr_at_{tpr}": fpr,
            "n_id": len(a), "n_ood": len(b)}
