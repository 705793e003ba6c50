"""The cascade's first stage as plain JSON numbers, and the gate that decides who answers.

scikit-learn fits the models; what the bundle stores is their parameters (a linear model's
``coef_``/``intercept_``, a gradient-boosted ensemble's trees as node arrays), evaluated here
with NumPy. Loading a bundle therefore never unpickles anything and never needs scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from imgtriage.errors import BundleSchemaError, ConfigError, DataError

FIRST_STAGE_FILE = "first_stage.json"
_ABSENT_LOGIT = -50.0  # a class with no training example: never predicted


@dataclass(frozen=True)
class LinearStage:
    """Multinomial logistic regression: ``logits = Z @ coef.T + intercept``.

    Example:
        >>> s = LinearStage(np.array([[1.0], [-1.0]]), np.zeros(2))
        >>> s.logits(np.array([[2.0]])).tolist()
        [[2.0, -2.0]]
    """

    coef: np.ndarray  # (K, D)
    intercept: np.ndarray  # (K,)
    kind = "logreg"

    def logits(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, np.float64) @ self.coef.T + self.intercept

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "coef": self.coef.tolist(),
                "intercept": self.intercept.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearStage:
        coef = np.asarray(d["coef"], np.float64)
        intercept = np.asarray(d["intercept"], np.float64)
        if coef.ndim != 2 or intercept.shape != (coef.shape[0],):
            raise BundleSchemaError("first_stage.json: coef must be (K, D) and intercept (K,)")
        return cls(coef, intercept)


@dataclass(frozen=True)
class TreeStage:
    """Gradient-boosted regression trees, all evaluated at once (one gather per depth level).

    Arrays are ``(T, max_nodes)``: split feature, threshold, left/right child (a leaf points
    at itself) and leaf value; ``tree_class[t]`` is the logit tree ``t`` adds to. Inputs are
    compared in float32, as scikit-learn's trees do.
    """

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray
    tree_class: np.ndarray
    init: np.ndarray  # (K,) raw score before any tree
    learning_rate: float
    depth: int
    kind = "gbt"

    def logits(self, z: np.ndarray) -> np.ndarray:
        x = np.asarray(z, np.float32)
        n, t = len(x), len(self.feature)
        nodes = np.zeros((t, n), np.int64)
        rows = np.arange(t)[:, None]
        cols = np.arange(n)[None, :]
        for _ in range(self.depth):
            f = self.feature[rows, nodes]
            go_left = x[cols, f] <= self.threshold[rows, nodes]
            nodes = np.where(go_left, self.left[rows, nodes], self.right[rows, nodes])
        contrib = self.value[rows, nodes]  # (T, N)
        out = np.zeros((n, len(self.init)))
        np.add.at(out.T, self.tree_class, contrib)
        return self.init + self.learning_rate * out

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "learning_rate": self.learning_rate, "depth": self.depth,
                "init": self.init.tolist(), "tree_class": self.tree_class.tolist(),
                **{k: getattr(self, k).tolist()
                   for k in ("feature", "threshold", "left", "right", "value")}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TreeStage:
        arrays = {k: np.asarray(d[k], np.float64 if k in ("threshold", "value") else np.int64)
                  for k in ("feature", "threshold", "left", "right", "value")}
        shapes = {a.shape for a in arrays.values()}
        tree_class = np.asarray(d["tree_class"], np.int64)
        init = np.asarray(d["init"], np.float64)
        if len(shapes) != 1 or len(tree_class) != len(arrays["feature"]) or (
                len(tree_class) and tree_class.max() >= len(init)):
            raise BundleSchemaError("first_stage.json: tree arrays have inconsistent shapes")
        return cls(**arrays, tree_class=tree_class, init=init,
                   learning_rate=float(d["learning_rate"]), depth=int(d["depth"]))


def stage_from_dict(d: dict[str, Any]) -> LinearStage | TreeStage:
    """Rebuild a stored first stage; says which types this release reads."""
    kinds = {"logreg": LinearStage, "gbt": TreeStage}
    if d.get("type") not in kinds:
        raise BundleSchemaError(f"first_stage.json: unknown first-stage type {d.get('type')!r}"
                                f" (this release reads {sorted(kinds)})")
    return kinds[d["type"]].from_dict(d)


def _full_columns(values: np.ndarray, present: np.ndarray, n_classes: int,
                  fill: float) -> np.ndarray:
    """Spread columns fitted for the classes seen in training over all ``n_classes``."""
    out = np.full((*values.shape[:-1], n_classes), fill, dtype=np.float64)
    out[..., present] = values
    return out


def fit_logreg(z: np.ndarray, y: np.ndarray, n_classes: int, *, c: float = 1.0,
               seed: int = 0) -> LinearStage:
    """Multinomial logistic regression on standardised features (L2, ``C = c``)."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(y)
    if len(present) < 2:
        raise DataError("the first stage needs training images of at least two classes")
    est = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(z, y)
    coef, intercept = est.coef_, est.intercept_
    if len(present) == 2:  # scikit-learn keeps one row for two classes: logits [0, w.z + b]
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    return LinearStage(_full_columns(coef.T, present, n_classes, 0.0).T,
                       _full_columns(intercept, present, n_classes, _ABSENT_LOGIT))


def _pack_trees(trees: list[Any]) -> dict[str, np.ndarray]:
    width = max(t.tree_.node_count for t in trees)
    packed = {k: np.zeros((len(trees), width), np.int64) for k in ("feature", "left", "right")}
    packed["threshold"] = np.zeros((len(trees), width))
    packed["value"] = np.zeros((len(trees), width))
    for i, t in enumerate(trees):
        tr, n = t.tree_, t.tree_.node_count
        leaf = tr.children_left[:n] < 0
        own = np.arange(n)
        packed["feature"][i, :n] = np.where(leaf, 0, tr.feature[:n])
        packed["threshold"][i, :n] = np.where(leaf, 0.0, tr.threshold[:n])
        packed["left"][i, :n] = np.where(leaf, own, tr.children_left[:n])
        packed["right"][i, :n] = np.where(leaf, own, tr.children_right[:n])
        packed["value"][i, :n] = tr.value[:n, 0, 0]
    return packed


def fit_gbt(z: np.ndarray, y: np.ndarray, n_classes: int, *, n_estimators: int = 100,
            max_depth: int = 3, learning_rate: float = 0.1, seed: int = 0) -> TreeStage:
    """Gradient boosting (scikit-learn), exported as node arrays; checked against
    scikit-learn's own ``decision_function`` on the training rows before it is returned."""
    from sklearn.ensemble import GradientBoostingClassifier

    present = np.unique(y)
    if len(present) < 2:
        raise DataError("the first stage needs training images of at least two classes")
    est = GradientBoostingClassifier(n_estimators=n_estimators, max_depth=max_depth,
                                     learning_rate=learning_rate, random_state=seed).fit(z, y)
    grid = est.estimators_  # (n_estimators, K or 1) regression trees
    trees = [grid[i, k] for i in range(grid.shape[0]) for k in range(grid.shape[1])]
    if grid.shape[1] == 1:  # binary: one log-odds tree per stage -> logit of present[1]
        owner = np.full(len(trees), present[1])
    else:
        owner = np.tile(present, grid.shape[0])
    stage = TreeStage(**_pack_trees(trees), tree_class=owner.astype(np.int64),
                      init=np.zeros(n_classes), learning_rate=float(learning_rate),
                      depth=max(t.tree_.max_depth for t in trees))
    reference = _sklearn_logits(est, z, present, n_classes)
    init = reference[0] - stage.logits(z[:1])[0]
    init[np.setdiff1d(np.arange(n_classes), present)] = _ABSENT_LOGIT
    stage = replace(stage, init=init)
    mine = stage.logits(z)
    if not np.allclose(mine[:, present], reference[:, present], atol=1e-6):
        raise DataError("exported trees disagree with scikit-learn's (max |diff| "
                        f"{np.abs(mine - reference)[:, present].max():.2e}); report this bug")
    return stage


def _sklearn_logits(est: Any, z: np.ndarray, present: np.ndarray, n_classes: int
                    ) -> np.ndarray:
    raw = est.decision_function(z)
    if raw.ndim == 1:
        raw = np.stack([np.zeros_like(raw), raw], axis=1)
    return _full_columns(raw, present, n_classes, _ABSENT_LOGIT)


@dataclass(frozen=True)
class GateChoice:
    """A first-stage answer is kept when its calibrated score is >= ``threshold``
    (None: the first stage never answers). The other fields describe the validation split."""

    threshold: float | None
    accepted_share: float
    accepted_accuracy: float | None
    n_accepted: int
    n: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _describe(scores: np.ndarray, correct: np.ndarray, threshold: float | None,
              eligible: np.ndarray | None = None) -> GateChoice:
    accepted = scores >= threshold if threshold is not None else np.zeros(len(scores), bool)
    if eligible is not None:
        accepted &= eligible
    k = int(accepted.sum())
    acc = float(correct[accepted].mean()) if k else None
    return GateChoice(threshold, k / len(scores) if len(scores) else 0.0, acc, k, len(scores))


def accuracy_lower_bound(correct: Any, n: Any, confidence: float) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound on an accuracy seen as ``correct`` of ``n``:
    with probability ``confidence`` the true accuracy is at least this (0 where n is 0).
    ``confidence`` 0 gives the point estimate ``correct / n``.

    Example:
        >>> round(float(accuracy_lower_bound(12, 12, 0.95)), 3)  # 12 of 12 right
        0.779
    """
    from scipy.special import betaincinv

    k = np.asarray(correct, np.float64)
    m = np.asarray(n, np.float64)
    if confidence == 0:
        return np.divide(k, m, out=np.zeros(np.broadcast(k, m).shape), where=m > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        lb = betaincinv(np.maximum(k, 1e-300), m - k + 1, 1.0 - confidence)
    return np.where((k > 0) & (m > 0), lb, 0.0)


def min_validation(target_accuracy: float, confidence: float) -> int:
    """The fewest validation images (all accepted, all right) that can show
    ``target_accuracy`` at ``confidence``: ``ceil(ln(1 - confidence) / ln(target))``.

    Example:
        >>> min_validation(0.99, 0.95), min_validation(0.9, 0.95)
        (299, 29)
    """
    if confidence == 0:
        return 1
    if target_accuracy >= 1:
        raise ConfigError("a target accuracy of 1 can never be shown from a finite "
                          "validation set; lower --target-accuracy or set --gate-confidence 0")
    return math.ceil(math.log(1 - confidence) / math.log(target_accuracy) - 1e-9)


def choose_gate(scores: np.ndarray, correct: np.ndarray, target_accuracy: float,
                confidence: float = 0.0, eligible: np.ndarray | None = None) -> GateChoice:
    """The lowest score threshold whose accepted validation images (score >= threshold) are
    at least ``target_accuracy`` correct *and* whose mean calibrated score is at least the
    target too: the largest accepted share meeting both. The second condition keeps a lucky
    run of right answers at low confidence (e.g. a coin flip between two classes the
    features cannot tell apart) from dragging the gate down. Tied scores are accepted or
    refused together.

    With ``confidence`` > 0 "at least the target correct" means the Clopper–Pearson lower
    bound (:func:`accuracy_lower_bound`), not the observed share: a handful of right answers
    cannot open the gate, it widens (accepts fewer, or nothing) until the bound holds.
    Images outside ``eligible`` (routed to stage 2 by class) are never accepted.

    Example:
        >>> s = np.array([0.999, 0.995, 0.99, 0.6, 0.5])
        >>> choose_gate(s, np.array([1, 1, 1, 1, 0], bool), 0.99).threshold
        0.99
        >>> choose_gate(s, np.array([1, 1, 1, 1, 0], bool), 0.99, confidence=0.95).threshold
    """
    if not 0 < target_accuracy <= 1:
        raise ConfigError("target accuracy must be in (0, 1] (--target-accuracy)")
    scores = np.asarray(scores, np.float64)
    correct = np.asarray(correct, bool)
    if len(scores) == 0:
        raise DataError("no validation images to choose the gate on; add a val split or raise "
                        "--val-frac")
    keep = np.ones(len(scores), bool) if eligible is None else np.asarray(eligible, bool)
    order = np.argsort(-scores, kind="stable")
    order = order[keep[order]]
    if len(order) == 0:
        return _describe(scores, correct, None, keep)
    s, c = scores[order], correct[order]
    k = np.arange(1, len(s) + 1)
    boundary = np.append(s[1:] < s[:-1], True)  # prefix ends where the score drops
    tol = 1e-9
    right = np.cumsum(c)
    shown = (right >= target_accuracy * k - tol) if confidence == 0 else \
        (accuracy_lower_bound(right, k, confidence) >= target_accuracy - tol)
    ok = boundary & shown & (np.cumsum(s) >= target_accuracy * k - tol)
    if not ok.any():
        return _describe(scores, correct, None, keep)
    return _describe(scores, correct, float(s[np.flatnonzero(ok).max()]), keep)


def gate_for_share(scores: np.ndarray, correct: np.ndarray, route_share: float,
                   eligible: np.ndarray | None = None) -> GateChoice:
    """The threshold that sends the ``route_share`` lowest-scoring validation images to the
    second stage (a compute budget instead of an accuracy target). Images outside
    ``eligible`` go to stage 2 anyway and count toward the share. The threshold lies halfway
    between the last image routed and the first accepted, so the same images rescored by
    another backend (float rounding) fall on the same sides.

    Example:
        >>> gate_for_share(np.array([0.9, 0.8, 0.7, 0.6]), np.ones(4, bool), 0.5).threshold
        0.75
    """
    if not 0 <= route_share <= 1:
        raise ConfigError("route share must be in [0, 1] (--route-share)")
    scores = np.asarray(scores, np.float64)
    keep = np.ones(len(scores), bool) if eligible is None else np.asarray(eligible, bool)
    s = np.sort(scores[keep])
    k = max(0, math.floor(route_share * len(scores) + 0.5) - int((~keep).sum()))
    threshold = None if k >= len(s) else float(s[k])
    if threshold is not None and k > 0 and s[k - 1] < s[k]:
        threshold = float(0.5 * (s[k - 1] + s[k]))
    return _describe(scores, np.asarray(correct, bool), threshold, keep)
