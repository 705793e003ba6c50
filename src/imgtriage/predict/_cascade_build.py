"""Build a cascade bundle: fit the first stage, calibrate it, pick the gate, pack both stages.

The data is split exactly as the second stage's training run split it (same seed and
fractions, read from its manifest), so the validation images that choose the gate were seen
by neither stage. When the data has fixed train/test folders and no validation split, a
validation share is carved out of train for the first stage; the second stage may have
trained on it, which the manifest records (``stage2_saw_validation``).
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle import Bundle, load_bundle, new_manifest, save_bundle
from imgtriage.bundle.store import bundle_files
from imgtriage.data import Dataset, PreprocessSpec, discover, split_dataset
from imgtriage.data.features import FeatureSpec, FeatureStandardizer, raw_features
from imgtriage.data.preprocess import load_record, record_pixels
from imgtriage.errors import ConfigError, DataError, ImageReadError
from imgtriage.evaluate.decision import softmax
from imgtriage.evaluate.ood import MahalanobisOOD
from imgtriage.predict._first_stage import (
    FIRST_STAGE_FILE,
    choose_gate,
    fit_gbt,
    fit_logreg,
    gate_for_share,
    min_validation,
)

FEATURE_STAGES = ("logreg", "gbt")
FIRST_STAGE_OOD_FILE = "first_stage_ood.safetensors"


def _f(default: Any, help: str) -> Any:
    """A field with its ``imgtriage cascade`` option (``cli/_options.py``)."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CascadeConfig:
    """How ``imgtriage cascade`` builds a cascade; errors name the CLI flag.

    Attributes:
        first_stage: ``logreg`` or ``gbt`` on image/header features, or the path of a small
            classifier bundle with the same classes.
        target_accuracy: the gate is the lowest calibrated score at which the first stage's
            accepted validation answers are at least this accurate.
        route_share: instead of a target, send this share of validation images to stage 2.
        gate_confidence: the gate opens only where the first stage's accuracy on what it
            accepts is at least ``target_accuracy`` with this one-sided confidence
            (Clopper–Pearson), and a validation set too small to ever show that is refused
            (:func:`min_validation`); 0 trusts the observed accuracy (over-trusts small sets).
        always_second_stage: class names the first stage never answers: an image goes to
            stage 2 when the first stage gives these classes at least the smallest probability
            it gave any validation image of them (at most 0.5), so every validation image of
            them is routed, and any image the first stage thinks is probably one of them.
        features: the :class:`FeatureSpec` (default: all statistics, default FITS cards, one
            feature channel, or three when stage 2 takes RGB).
        val_frac, test_frac, seed: the split; None = what the stage-2 run used.
        c: inverse L2 strength of the logistic regression.
        gbt_estimators, gbt_depth, gbt_learning_rate: the boosted trees.
        workers: decoding threads.
        ood_gate: the first stage answers only images whose input looks like its training
            data; the rest go to stage 2 (which answers them or refuses them with its own
            OOD rule). A feature stage gets a Mahalanobis scorer on its standardised features
            (fitted here, its threshold the conformal ``ood_accept`` quantile of validation
            scores); a CNN first stage uses its own bundle's OOD rule.
        ood_accept: share of in-distribution images the feature stage's OOD gate lets through
            (conformal, >= this on exchangeable data). High, because a refusal only costs a
            stage-2 pass: the answer is then stage 2's, never a wrong stage-1 one.

    Example:
        >>> CascadeConfig(first_stage="gbt", target_accuracy=0.98).first_stage
        'gbt'
    """

    first_stage: str = _f("logreg", "logreg or gbt on image-statistics and header features, "
                                    "or a small classifier bundle's path.")
    target_accuracy: float = _f(0.99, "Accuracy the first stage must reach on the validation "
                                      "images it answers.")
    route_share: float | None = _f(None, "Instead of a target accuracy: send this share of "
                                         "validation images to stage 2.")
    gate_confidence: float = _f(0.95, "Confidence (one-sided Clopper-Pearson) that the first "
                                      "stage's answers reach --target-accuracy; too small a "
                                      "validation set is refused. 0 trusts the observed "
                                      "accuracy.")
    always_second_stage: tuple[str, ...] = _f((), "Comma-separated classes the first stage "
                                                  "never answers (e.g. sar): images it thinks "
                                                  "may be one go to stage 2.")
    features: FeatureSpec | None = None
    val_frac: float | None = _f(None, "Validation share (default: stage 2's).")
    test_frac: float | None = _f(None, "Test share (default: stage 2's).")
    seed: int | None = _f(None, "Split seed (default: stage 2's).")
    c: float = _f(1.0, "Inverse L2 strength of the logistic regression.")
    gbt_estimators: int = _f(100, "Boosted trees: number of trees.")
    gbt_depth: int = _f(3, "Boosted trees: depth of each tree.")
    gbt_learning_rate: float = _f(0.1, "Boosted trees: learning rate.")
    workers: int | None = _f(None, "Decoding threads.")
    ood_gate: bool = _f(True, "Send images whose first-stage input looks unlike the training "
                              "data to stage 2 (the first stage never answers them).")
    ood_accept: float = _f(0.99, "Share of in-distribution validation images the feature "
                                 "stage's OOD gate lets through (a CNN first stage uses its "
                                 "own bundle's OOD rule).")

    def __post_init__(self) -> None:
        if self.first_stage not in FEATURE_STAGES and not Path(self.first_stage).exists():
            raise ConfigError(f"first stage must be logreg, gbt or an existing bundle path, got "
                              f"{self.first_stage!r} (--first-stage)")
        if not 0 < self.target_accuracy <= 1:
            raise ConfigError("target accuracy must be in (0, 1] (--target-accuracy)")
        if self.route_share is not None and not 0 <= self.route_share <= 1:
            raise ConfigError("route share must be in [0, 1] (--route-share)")
        if not 0 < self.ood_accept < 1:
            raise ConfigError("OOD acceptance must be in (0, 1) (--ood-accept)")
        if not 0 <= self.gate_confidence < 1:
            raise ConfigError("gate confidence must be in [0, 1) (--gate-confidence)")
        object.__setattr__(self, "always_second_stage", tuple(self.always_second_stage))
        if self.c <= 0:
            raise ConfigError("C must be positive (--c)")
        if self.gbt_estimators < 1 or self.gbt_depth < 1 or self.gbt_learning_rate <= 0:
            raise ConfigError("boosted trees need >= 1 estimator, depth >= 1 and a positive "
                              "learning rate (--gbt-estimators/--gbt-depth)")
        if self.features is not None and self.features.extra_columns:
            raise ConfigError("a cascade reads only what each file holds; extra CSV columns are "
                              "not available at prediction time, drop extra_columns")

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["features"] = self.features.to_dict() if self.features is not None else None
        return d


@dataclass(frozen=True)
class CascadeRunOptions:
    """What ``imgtriage cascade`` takes besides the :class:`CascadeConfig`: where the bundle
    goes, the first stage's statistics (made into the config's ``features``) and the compute
    threads."""

    out: Path = field(metadata={"help": "Cascade bundle to write (a directory, or a .zip).",
                                "short": "-o"})
    feature_channels: int | None = _f(None, "Channels of the per-channel statistics (default 3 "
                                            "for an RGB stage 2, else 1).")
    feature_max_side: int = _f(64, "Statistics use every s-th pixel so no side exceeds this.")
    threads: int | None = _f(None, "Compute threads.")

    def feature_spec(self, stage2: str | os.PathLike[str]) -> FeatureSpec | None:
        """The config's ``features`` for the ``stage2`` bundle (None: the default
        statistics; the bundle is read only when its channel count decides)."""
        if self.feature_channels is None and self.feature_max_side == 64:
            return None
        channels = self.feature_channels or (
            3 if load_bundle(stage2).info.model.in_chans == 3 else 1)
        return FeatureSpec(channels=channels, max_side=self.feature_max_side)


@dataclass(frozen=True)
class CascadeResult:
    bundle_path: Path
    validation: dict[str, Any]
    seconds: float


@dataclass
class _Split:
    """Decoded images of one split: labels, raw features, first/second-stage inputs."""

    paths: list[str]
    y: np.ndarray
    raws: list[Any]
    x1: np.ndarray | None
    x2: np.ndarray | None
    defects: list[dict[str, str]]


def _splits(b2: Bundle, data: str | os.PathLike[str], cfg: CascadeConfig
            ) -> tuple[list, list, dict[str, Any]]:
    """Train and validation samples split as the stage-2 run split them."""
    tcfg = b2.info.training.get("config") or {}
    seed = cfg.seed if cfg.seed is not None else int(tcfg.get("seed", 0))
    val_frac = cfg.val_frac if cfg.val_frac is not None else float(tcfg.get("val_frac", 0.15))
    test_frac = cfg.test_frac if cfg.test_frac is not None else float(tcfg.get("test_frac", 0))
    ds = split_dataset(discover(data), val_frac=val_frac, test_frac=test_frac, seed=seed)
    if list(ds.classes) != b2.classes:
        raise DataError(f"{data} has classes {list(ds.classes)} but the stage-2 bundle has "
                        f"{b2.classes}; build the cascade on the data stage 2 was trained on")
    train = [s for s in ds.samples if s.split == "train"]
    val = [s for s in ds.samples if s.split == "val"]
    carved = not val
    if carved:  # fixed train/test folders: carve validation out of train for the first stage
        sub = split_dataset(Dataset(tuple(replace(s, split=None) for s in train), ds.classes),
                            val_frac=val_frac or 0.15, seed=seed)
        train = [s for s in sub.samples if s.split == "train"]
        val = [s for s in sub.samples if s.split == "val"]
    if not val:
        raise DataError("no validation images to choose the gate on; raise --val-frac")
    info = {"data": str(data), "seed": seed, "val_frac": val_frac, "test_frac": test_frac,
            "n_train": len(train), "n_val": len(val), "stage2_saw_validation": carved}
    return train, val, info


def _decode_one(sample: Any, spec2: PreprocessSpec, fspec: FeatureSpec | None,
                spec1: PreprocessSpec | None, want_x2: bool) -> tuple | dict[str, str]:
    try:
        rec = load_record(sample.path, spec2)
        raw = raw_features(rec, fspec, path=sample.path) if fspec is not None else None
        x1 = record_pixels(rec, spec1, path=sample.path) if spec1 is not None else None
        x2 = record_pixels(rec, spec2, path=sample.path) if want_x2 else None
    except ImageReadError as exc:
        return exc.defect.to_dict()
    return raw, x1, x2


def _decode(samples: list, classes: list[str], spec2: PreprocessSpec,
            fspec: FeatureSpec | None, spec1: PreprocessSpec | None, want_x2: bool,
            workers: int | None) -> _Split:
    index = {c: i for i, c in enumerate(classes)}
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        outs = list(pool.map(lambda s: _decode_one(s, spec2, fspec, spec1, want_x2), samples))
    good = [(s, o) for s, o in zip(samples, outs, strict=True) if isinstance(o, tuple)]

    def stack(k: int) -> np.ndarray | None:
        return np.stack([o[k] for _, o in good]) if good and good[0][1][k] is not None else None

    return _Split([s.path for s, _ in good], np.array([index[s.label] for s, _ in good]),
                  [o[0] for _, o in good], stack(1), stack(2),
                  [o for o in outs if isinstance(o, dict)])


def _logits(backend: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([np.asarray(backend(x[i:i + batch]), np.float64)
                           for i in range(0, len(x), batch)])


def _fit_feature_stage(cfg: CascadeConfig, tr: _Split, va: _Split, n_classes: int,
                       fspec: FeatureSpec, seed: int
                       ) -> tuple[dict, dict, np.ndarray, MahalanobisOOD | None]:
    """(first-stage params, standardizer dict, validation logits, OOD gate or None); scaler
    and gate fitted on train, the gate's threshold on validation."""
    fx = FeatureStandardizer(fspec).fit(tr.raws)
    z_tr, z_va = fx.transform(tr.raws), fx.transform(va.raws)
    if cfg.first_stage == "gbt":
        model: Any = fit_gbt(z_tr, tr.y, n_classes, n_estimators=cfg.gbt_estimators,
                             max_depth=cfg.gbt_depth, learning_rate=cfg.gbt_learning_rate,
                             seed=seed)
    else:
        model = fit_logreg(z_tr, tr.y, n_classes, c=cfg.c, seed=seed)
    ood = MahalanobisOOD(cfg.ood_accept).fit(z_tr, z_va) if cfg.ood_gate else None
    return model.to_dict(), fx.to_dict(), model.logits(z_va), ood


def _cnn_stage(b1: Bundle, x1: np.ndarray, want_ood: bool, batch: int = 64
               ) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """A CNN first stage on validation: (logits, its own OOD rule's scores or None, why there
    is no gate or None), from its reference backend, as Predictor scores them."""
    from imgtriage.predict.backends import reference_backend
    from imgtriage.predict.predictor import Predictor

    p = Predictor.load(b1, backend=reference_backend(b1))
    if not want_ood:
        return _logits(p.backend, x1), None, "--no-ood-gate"
    if p.policy.ood is None:
        return _logits(p.backend, x1), None, (
            "the first-stage bundle has no OOD rule (trained with --no-ood or --no-calibrate, "
            "or before OOD rules): retrain it with default options to gate the first stage")
    policy = replace(p.policy, abstain=True)
    parts = [p.forward(x1[i:i + batch], policy) for i in range(0, len(x1), batch)]
    return (np.concatenate([np.asarray(lg, np.float64) for lg, _ in parts]),
            np.concatenate([np.asarray(sc, np.float64) for _, sc in parts]), None)

def _check_stage1_bundle(path: str, classes: list[str]) -> Bundle:
    b1 = load_bundle(path)
    if b1.info.kind != "classifier":
        raise ConfigError(f"{path}: a first-stage bundle must be a plain classifier "
                          "(--first-stage)")
    if b1.classes != classes:
        raise ConfigError(f"{path}: first-stage classes {b1.classes} differ from stage 2's "
                          f"{classes}; train it on the same data (--first-stage)")
    return b1


def _check_validation_size(cfg: CascadeConfig, n: int) -> int:
    """The smallest validation set the gate rule can work with; refuse a smaller one."""
    if cfg.route_share is not None:
        return 1  # a compute budget claims no accuracy
    need = min_validation(cfg.target_accuracy, cfg.gate_confidence)
    if n < need:
        raise DataError(
            f"the gate would be chosen on {n} validation images, but showing "
            f"{cfg.target_accuracy:.1%} accuracy for the first stage's answers at "
            f"{cfg.gate_confidence:.0%} confidence needs at least {need} (all accepted and "
            "right). Add validation images (--val-frac), lower --target-accuracy, use "
            "--route-share, or --gate-confidence 0 to trust the observed accuracy")
    return need


def conformal_level(accept: float, n: int) -> float:
    """The in-distribution acceptance a threshold at the conformal ``accept`` quantile of
    ``n`` validation scores guarantees on exchangeable data: ``k / (n + 1)`` with
    ``k = ceil((n + 1) accept)``, or ``n / (n + 1)`` when ``k > n`` (the threshold is then the
    largest validation score). 0 when ``n`` is unknown.

    Example:
        >>> conformal_level(0.99, 45), conformal_level(0.99, 500)
        (0.9782608695652174, 0.9900199600798403)
    """
    if n < 1:
        return 0.0
    k = math.ceil((n + 1) * accept - 1e-9)
    return min(k, n) / (n + 1)


def _routing(cfg: CascadeConfig, classes: list[str], probs: np.ndarray, y: np.ndarray
             ) -> dict[str, Any] | None:
    """The per-class routing rule (see CascadeConfig.always_second_stage), or None."""
    if not cfg.always_second_stage:
        return None
    unknown = sorted(set(cfg.always_second_stage) - set(classes))
    if unknown:
        raise ConfigError(f"--always-second-stage names {unknown}, not among the classes "
                          f"{classes}")
    idx = [classes.index(c) for c in cfg.always_second_stage]
    mass = probs[:, idx].sum(axis=1)
    theirs = np.isin(y, idx)
    floor = min(0.5, float(mass[theirs].min())) if theirs.any() else 0.5
    return {"classes": list(cfg.always_second_stage), "class_ids": idx,
            "min_probability": floor}


def routed_by_class(probs: np.ndarray, rule: dict[str, Any] | None) -> np.ndarray:
    """True where the routing rule sends an image to stage 2 whatever its score."""
    if not rule:
        return np.zeros(len(probs), bool)
    return probs[:, rule["class_ids"]].sum(axis=1) >= rule["min_probability"]


def _gate(cfg: CascadeConfig, logits: np.ndarray, y: np.ndarray, classes: list[str],
          in_dist: np.ndarray) -> tuple[float, Any, Any, dict[str, Any] | None]:
    from imgtriage.evaluate.calibration import TemperatureScaler

    temperature = TemperatureScaler().fit(logits, y).temperature_
    probs = softmax(logits, temperature)
    scores, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    rule = _routing(cfg, classes, probs, y)
    eligible = ~routed_by_class(probs, rule) & in_dist  # the OOD gate routes like a class
    if cfg.route_share is not None:
        choice = gate_for_share(scores, correct, cfg.route_share, eligible)
    else:
        choice = choose_gate(scores, correct, cfg.target_accuracy, cfg.gate_confidence,
                             eligible)
    return temperature, choice, correct, rule


def _validation(choice: Any, scores_ok: np.ndarray, correct1: np.ndarray,
                correct2: np.ndarray, info: dict[str, Any], temperature: float
                ) -> dict[str, Any]:
    accepted = scores_ok
    cascade = np.where(accepted, correct1, correct2)
    return {**choice.to_dict(), "temperature": temperature,
            "first_stage_accuracy": float(correct1.mean()),
            "stage2_accuracy": float(correct2.mean()),
            "cascade_accuracy": float(cascade.mean()),
            "stage2_saw_validation": info["stage2_saw_validation"]}


def build_cascade(stage2: str | os.PathLike[str], data: str | os.PathLike[str],
                  out: str | os.PathLike[str], cfg: CascadeConfig = CascadeConfig()
                  ) -> CascadeResult:
    """Fit a first stage on ``data``'s train split, gate it on validation, write a cascade.

    Example:
        >>> res = build_cascade("runs/mstar/bundle", "data/mstar", "runs/mstar/cascade",
        ...                     CascadeConfig(target_accuracy=0.99))  # doctest: +SKIP
        >>> res.validation["accepted_share"], res.validation["cascade_accuracy"]  # doctest: +SKIP
        (0.41, 0.987)
    """
    from imgtriage.predict.backends import make_backend, reference_backend

    t0 = time.perf_counter()
    b2 = load_bundle(stage2)
    if b2.info.kind != "classifier":
        raise ConfigError(f"{stage2}: the second stage must be a plain classifier bundle")
    classes, spec2 = b2.classes, PreprocessSpec.from_dict(dict(b2.info.preprocess))
    train, val, info = _splits(b2, data, cfg)
    b1 = None if cfg.first_stage in FEATURE_STAGES else _check_stage1_bundle(cfg.first_stage,
                                                                             classes)
    fspec = cfg.features or FeatureSpec(channels=3 if spec2.in_chans == 3 else 1)
    spec1 = PreprocessSpec.from_dict(dict(b1.info.preprocess)) if b1 is not None else None
    va = _decode(val, classes, spec2, fspec if b1 is None else None, spec1, True, cfg.workers)
    if len(va.y) == 0:
        raise DataError("every validation image was unreadable; see the defects")
    params = features = None
    if b1 is None:
        tr = _decode(train, classes, spec2, fspec, None, False, cfg.workers)
        params, features, logits1, ood = _fit_feature_stage(cfg, tr, va, len(classes), fspec,
                                                            info["seed"])
        info["defects"] = tr.defects + va.defects
        ood_scores = ood.val_scores_ if ood is not None else None
        ood_gate = {"source": "cascade", **ood.rule(FIRST_STAGE_OOD_FILE)} \
            if ood is not None else None
        no_gate = None if ood is not None else "--no-ood-gate"
    else:
        ood = None
        logits1, ood_scores, no_gate = _cnn_stage(b1, va.x1, cfg.ood_gate)
        rule1 = b1.info.decision.get("ood") or {}
        ood_gate = None if ood_scores is None else {
            "source": "stage1", **{k: rule1[k] for k in ("method", "threshold", "accept")}}
        info["defects"] = va.defects
    info["min_validation"] = _check_validation_size(cfg, len(va.y))
    in_dist = np.ones(len(va.y), bool) if ood_gate is None else \
        ood_scores <= float(ood_gate["threshold"])
    temperature, choice, correct1, rule = _gate(cfg, logits1, va.y, classes, in_dist)
    correct2 = _logits(make_backend(b2, reference_backend(b2)), va.x2).argmax(axis=1) == va.y
    probs1 = softmax(logits1, temperature)
    routed = routed_by_class(probs1, rule)
    accepted = (probs1.max(axis=1) >= choice.threshold) & ~routed & in_dist \
        if choice.threshold is not None else np.zeros(len(probs1), bool)
    validation = _validation(choice, accepted, correct1, correct2, info, temperature)
    validation.update(gate_confidence=cfg.gate_confidence,
                      min_validation=info["min_validation"],
                      routed_by_class=int(routed.sum()),
                      ood_gate=None if ood_gate is None else {
                          "in_distribution_share": float(in_dist.mean()),
                          "stage1_ood": int((~in_dist).sum()),
                          "guaranteed_acceptance": conformal_level(
                              float(ood_gate["accept"]),
                              int((b1.info.decision.get("ood") or {}).get("n_val", 0))
                              if b1 is not None else len(va.y))},
                      **({} if no_gate is None else {"no_ood_gate": no_gate}))
    path = _write(Path(out), b2, b1, cfg, params, features, temperature, choice, validation,
                  info, rule, ood_gate, ood)
    return CascadeResult(path, validation, time.perf_counter() - t0)


def _write(out: Path, b2: Bundle, b1: Bundle | None, cfg: CascadeConfig,
           params: dict | None, features: dict | None, temperature: float, choice: Any,
           validation: dict[str, Any], info: dict[str, Any],
           rule: dict[str, Any] | None, ood_gate: dict[str, Any] | None,
           ood: MahalanobisOOD | None) -> Path:
    files = {f"stage2/{n}": d for n, d in bundle_files(b2).items()}
    files["stage2/manifest.json"] = b2.read_bytes("manifest.json")
    if b1 is not None:
        files.update({f"stage1/{n}": d for n, d in bundle_files(b1).items()})
        files["stage1/manifest.json"] = b1.read_bytes("manifest.json")
        first = {"type": "bundle", "dir": "stage1", "sha256": b1.sha256}
    else:
        files[FIRST_STAGE_FILE] = json.dumps(params).encode()
        if ood is not None:
            from safetensors.numpy import save

            files[FIRST_STAGE_OOD_FILE] = save(ood.arrays())
        first = {"type": cfg.first_stage, "file": FIRST_STAGE_FILE}
    info2 = b2.info
    manifest = new_manifest(
        model_name="cascade", model_kwargs={"first_stage": first["type"]},
        in_chans=info2.model.in_chans, preprocess=dict(info2.preprocess), classes=b2.classes,
        decision=dict(info2.decision), features=features, kind="cascade", metrics=validation,
        training={"config": cfg.to_dict(), "split": {k: v for k, v in info.items()
                                                     if k != "defects"},
                  "defects": info["defects"], "data": info["data"]})
    manifest = manifest.with_changes(profiles=info2.profiles, cascade={
        "first_stage": first, "temperature": temperature, "gate": choice.threshold,
        "gate_rule": {"target_accuracy": cfg.target_accuracy, "route_share": cfg.route_share,
                      "confidence": cfg.gate_confidence},
        "always_second_stage": rule, "ood_gate": ood_gate,
        "stage2": {"dir": "stage2", "sha256": b2.sha256}, "validation": validation})
    return save_bundle(out, manifest, None, files)


__all__ = ["FIRST_STAGE_OOD_FILE", "CascadeConfig", "CascadeResult", "CascadeRunOptions",
           "build_cascade"]
