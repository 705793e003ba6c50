"""Run a bundle over labelled data and hand the logits to ``evaluate``: the glue behind
``imgtriage evaluate`` and ``imgtriage calibrate``.

``evaluate`` itself only sees arrays; this module owns the model side (decode with the
bundle's own preprocessing, logits with the bundle's backend) and writes the fitted decision
rule back into the bundle as a new version, so ``predict`` and the service apply exactly
what was validated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle import Bundle, load_bundle, update_bundle
from imgtriage.data import discover
from imgtriage.data.discovery import SPLIT_ALIASES, Sample
from imgtriage.errors import ConfigError, DataError
from imgtriage.predict.assess_config import CalibrateConfig, EvaluateConfig
from imgtriage.predict.base import Decoded, decode_entry
from imgtriage.predict.predictor import Predictor


@dataclass(frozen=True)
class LabelledLogits:
    """Logits of the usable samples, their labels in the bundle's class order, and defects."""

    logits: np.ndarray
    labels: np.ndarray
    paths: list[str]
    defects: list[dict[str, str]]
    feature_importance: dict[str, float] | None = None  # fusion bundles: mean |grad x input|
    ood_scores: np.ndarray | None = None  # with an OOD policy: one score per row (higher=odder)


def labelled_samples(data: str | os.PathLike[str], classes: list[str],
                     split: str | None = None, *, min_classes: int = 1) -> list[Sample]:
    """Samples of a folder or manifest (optionally one split) whose labels the bundle knows.
    To evaluate, one class is enough (the recall of 'unsafe' on a folder of unsafe images);
    calibrating asks for ``min_classes=2`` (a temperature fitted on one class only grows
    confident)."""
    return labelled_data(data, classes, split, min_classes=min_classes)[0]


def labelled_data(data: str | os.PathLike[str], classes: list[str],
                  split: str | None = None, *, min_classes: int = 1
                  ) -> tuple[list[Sample], list[dict[str, str]]]:
    """:func:`labelled_samples` and the defects of the files in the class folders whose
    bytes are not images (as ``predict`` reports them), so none is dropped silently."""
    ds = discover(data, min_classes=min_classes)
    if split is not None:  # 'validation' names the rows a manifest's 'validation' became
        split = SPLIT_ALIASES.get(split.lower(), split)
    samples = [s for s in ds.samples if split is None or s.split == split]
    if not samples:
        found = sorted({s.split or "none" for s in ds.samples})
        raise DataError(f"no samples with split {split!r} in {data} (splits found: {found}); "
                        "pass --split with one of those, or omit it")
    unknown = sorted({s.label for s in samples} - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} in {data} are not classes of the bundle {classes}; "
                        "evaluate on data with the bundle's classes (images of a class the "
                        "bundle never saw go to --ood)")
    return samples, [d.to_dict() for d in ds.defects]


def _logit_predictor(bundle: str | os.PathLike[str] | Bundle, backend: str) -> Predictor:
    """A loaded bundle whose kind has logits to evaluate and calibrate (classifier, gallery)."""
    predictor = Predictor.load(bundle, backend=backend)
    if not isinstance(predictor, Predictor):
        kind = predictor.bundle.info.kind
        raise ConfigError(f"{predictor.bundle.path} is a {kind} bundle, which has no single "
                          "model's logits; evaluate or calibrate the bundle it was built from "
                          "(e.g. a cascade's stage 2)")
    return predictor


def collect_logits(predictor: Predictor, samples: list[Sample], *, tta: bool = False,
                   batch_size: int = 64, workers: int | None = None,
                   attribute: bool = False, ood_policy: Any = None) -> LabelledLogits:
    """Raw logits for every usable sample, decoded with the bundle's own preprocessing
    (bad files become defects, never dropped silently). With ``attribute``, image + feature
    bundles also get each feature's mean |gradient x input| (``feature_importance``); with
    ``ood_policy`` (a policy holding an OOD rule), each row's OOD score too."""
    from concurrent.futures import ThreadPoolExecutor

    decoder = predictor.decoder

    def decode(s: Sample) -> Decoded | dict[str, Any]:
        return decode_entry(decoder, s.path)

    index = {c: i for i, c in enumerate(predictor.classes)}
    logits, labels, paths, defects, scores = [], [], [], [], []
    with_ood = ood_policy is not None and ood_policy.ood is not None
    attribution = _attribution(predictor) if attribute else None
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            xs, metas = [], []
            for s, out in zip(chunk, pool.map(decode, chunk), strict=True):
                if isinstance(out, dict):
                    defects.append(out)
                else:
                    xs.append(out.x)
                    metas.append(out.meta)
                    labels.append(index[s.label])
                    paths.append(s.path)
            if xs:
                x, f = np.stack(xs), _features(predictor, metas, paths[len(paths) - len(xs):])
                if with_ood:
                    lo, sc = predictor.forward(x, replace(ood_policy, abstain=True), tta, f,
                                               metas)
                    logits.append(lo)
                    scores.append(sc)
                else:
                    logits.append(predictor.logits(x, tta) if f is None
                                  else predictor.logits(x, tta, f))
                if attribution is not None:
                    attribution.add(predictor.backend.model, x, f)
    if not logits:
        raise DataError("none of the files could be read; see the defects")
    return LabelledLogits(np.concatenate(logits).astype(np.float64), np.asarray(labels),
                          paths, defects,
                          attribution.result() if attribution is not None else None,
                          np.concatenate(scores) if scores else None)


def _attribution(predictor: Predictor) -> Any:
    """A gradient x input accumulator for image + feature bundles on the torch backend."""
    import torch

    features = predictor.features
    model = getattr(predictor.backend, "model", None)  # the torch backend's network
    if features is None or not isinstance(model, torch.nn.Module):
        return None
    from imgtriage.predict.attribution import FeatureAttribution

    return FeatureAttribution(features.feature_names_)


def _features(predictor: Predictor, metas: list, names: list) -> np.ndarray | None:
    """Scaled features of image + feature bundles (from the decode's metadata), else None."""
    if predictor.features is None:
        return None
    return predictor.feature_matrix(metas, names)


def evaluate_bundle(bundle: str | os.PathLike[str], data: str | os.PathLike[str],
                    out_dir: str | os.PathLike[str], config: EvaluateConfig | None = None, *,
                    backend: str = "auto") -> dict[str, Any]:
    """Metrics, calibration, abstain, conformal sets and the failure gallery as
    ``out_dir/report.json`` + ``out_dir/report.html``; returns the report dict.

    ``config`` (``EvaluateConfig``, what ``imgtriage evaluate`` builds from its options): the
    split, TTA, decision profile and batch size. The rule's out-of-distribution part (when the
    bundle has one) applies to the labelled data like in ``predict``. ``config.ood``: a folder
    of images that are *not* of the bundle's classes; the report's ``ood`` section then scores
    how well the bundle's OOD score and the max-softmax baseline separate them from the
    labelled data (AUROC, FPR at 95% TPR) and how many of them the rule refuses.
    (``config.reference`` is for :func:`drift_against`; it is not used here.)

    Example:
        >>> evaluate_bundle("runs/a/bundle", "data/test", "runs/a/eval",
        ...                 EvaluateConfig(split="test"))  # doctest: +SKIP
    """
    from imgtriage.evaluate import write_report
    from imgtriage.predict.predictor import PredictOptions

    cfg = config or EvaluateConfig()
    split, tta, profile, batch_size, ood = (cfg.split, cfg.tta, cfg.profile, cfg.batch_size,
                                            cfg.ood)
    predictor = _logit_predictor(bundle, backend)
    if backend == "auto" and predictor.features is not None and predictor.backend.name != "torch":
        predictor = _logit_predictor(bundle, "torch")  # feature importance needs gradients
    samples, not_images = labelled_data(data, predictor.classes, split)
    seen = seen_in_training(predictor.bundle.info.training, data, samples, split)
    copies = copies_of_training(predictor.bundle, samples, cfg.split)
    policy = predictor.policy_for(PredictOptions(profile=profile))
    got = collect_logits(predictor, samples, tta=tta, batch_size=batch_size, attribute=True,
                         ood_policy=policy)
    ood_block = None
    if ood is not None:
        from imgtriage.predict.ood_eval import ood_section

        ood_block = ood_section(predictor, policy, got, ood, tta=tta, batch_size=batch_size)
    report = write_report(out_dir, logits=got.logits, labels=got.labels,
                          class_names=predictor.classes, paths=got.paths, decision=policy,
                          ood_scores=got.ood_scores, ood=ood_block,
                          feature_importance=got.feature_importance,
                          title=f"imgtriage evaluation: {Path(bundle).name} on {data}",
                          extra={"bundle": str(bundle), "bundle_sha256": predictor.bundle_sha256,
                                 "data": str(data), "split": split, "tta": tta,
                                 "defects": [*not_images, *got.defects],
                                 "warnings": [w for w in (seen, copies) if w],
                                 "prior_correction": _prior_said(predictor.bundle.info)})
    _save_reference(Path(out_dir), got.logits, policy, got.ood_scores)
    return report


def _prior_said(info: Any) -> str | None:
    """What training decided about the prior correction and why (the line of the bundle's
    default calibration record; None for bundles from before the record)."""
    record = ((info.block("calibration") or {}).get("default") or {}).get("prior_correction")
    return record.get("line") if isinstance(record, dict) else None


def seen_in_training(training: dict[str, Any], data: str | os.PathLike[str],
                     samples: list[Sample], split: str | None) -> str | None:
    """A warning when the labelled data is what the bundle was trained on (its training data
    folder or manifest with no --split, or rows marked split=train): its metrics would then
    be those of images the model has seen, not of new ones."""
    if split is not None and split != "train":
        return None
    trained = [s for s in samples if s.split == "train"]
    given = training.get("data")
    same = given is not None and os.path.realpath(given) == os.path.realpath(data)
    if not trained and not same:
        return None
    what = (f"{len(trained)} of the {len(samples)} images are split=train rows"
            if trained else f"{data} is the data this bundle was trained on")
    return (f"{what}: these metrics are of images the model has seen, not of new ones; "
            "evaluate on held-out images (a test/ folder, or RUN/splits.csv with --split "
            "test, or --split val)")


def copies_of_training(bundle: Any, samples: list[Sample], split: str | None) -> str | None:
    """A warning when images being scored have the bytes of a training image of the bundle
    (the digests ``train`` stored in it): their metrics are of images the model has seen.
    Rows marked split=train are left to :func:`seen_in_training`."""
    from imgtriage.data.duplicates import TRAIN_DIGESTS, content_digests, unpack_digests

    if not bundle.has_file(TRAIN_DIGESTS):
        return None  # a bundle from before the check, or imported
    trained = unpack_digests(bundle.read_bytes(TRAIN_DIGESTS))
    held = [s.path for s in samples if s.split != "train" or split is not None]
    digests = content_digests(held)
    seen = [p for p in held if digests.get(p) in trained]
    if not seen:
        return None
    names = ", ".join(seen[:3]) + (f" and {len(seen) - 3} more" if len(seen) > 3 else "")
    return (f"{len(seen)} of the {len(samples)} images are byte copies of images this bundle "
            f"was trained on ({names}): their metrics overstate accuracy on new images; "
            "remove them from the evaluation data")


def _save_reference(out_dir: Path, logits: np.ndarray, policy: Any,
                    ood_scores: np.ndarray | None = None) -> None:
    from imgtriage.evaluate import reference_summary

    d = policy.decide(logits, ood_scores)
    ref = reference_summary(d.probs, d.abstained)
    (out_dir / "reference.json").write_text(json.dumps(ref))


def load_reference(ref: str | os.PathLike[str]) -> dict[str, Any]:
    """A drift reference from an evaluation directory (reference.json), a reference file, or
    a bundle whose calibration stored one."""
    path = Path(ref)
    candidates = [path / "reference.json", path / "eval" / "reference.json", path]
    for c in candidates:
        if c.is_file() and c.suffix == ".json":
            return json.loads(c.read_text())
    if (path / "manifest.json").is_file():  # a calibrated bundle: its typed manifest's block
        stored = load_bundle(path, verify=False).info.block("drift_reference")
        if stored:
            return dict(stored)
    raise ConfigError(f"no drift reference at {ref}: pass an evaluation directory (with "
                      "reference.json) or a calibrated bundle (--reference)")


def drift_against(bundle: str | os.PathLike[str], paths: list[str | os.PathLike[str]],
                  reference: str | os.PathLike[str], *, alpha: float = 0.01,
                  batch_size: int = 64) -> dict[str, Any]:
    """Compare score/class/abstain distributions of new (unlabelled) files with a reference.

    The rows' reported probabilities are compared; against a reference written before a
    prior-corrected policy reported them at the training prior (no ``"probabilities"`` key),
    they are first moved to the equal-prior scores that reference holds (``p * exp(offsets)``,
    renormalised: exact), and the result's ``note`` says so."""
    from imgtriage.evaluate import drift_check

    predictor = Predictor.load(bundle)
    report = predictor.predict_paths(paths, batch_size=batch_size, include_probs=True)
    if not report["results"]:
        raise DataError("no readable files to compare; see the defects")
    probs = np.array([[r["probs"][c] for c in predictor.classes] for r in report["results"]])
    abstained = np.array([r["abstained"] for r in report["results"]])
    ref = load_reference(reference)
    offsets = predictor.policy.prior_correction
    note = None
    if offsets is not None and "probabilities" not in ref:
        probs = probs * np.exp(np.asarray(offsets) - max(offsets))
        probs /= probs.sum(axis=1, keepdims=True)
        note = ("the reference predates reported probabilities at the training prior: it "
                "holds equal-prior scores, so those were compared; recalibrate the bundle "
                "(imgtriage calibrate) for a reference of what it reports now")
    out = drift_check(ref, probs, class_names=predictor.classes, abstained=abstained,
                      alpha=alpha)
    if note is not None:
        out["note"] = note
    out["num_files"] = report["meta"]["num_files"]
    out["defects"] = report["defects"]
    return out


def calibrate_bundle(bundle: str | os.PathLike[str], data: str | os.PathLike[str],
                     config: CalibrateConfig | None = None, *,
                     out: str | os.PathLike[str] | None = None, batch_size: int = 64,
                     **options: Any) -> dict[str, Any]:
    """Fit temperature / thresholds / abstain / conformal sets on a calibration split and write
    them into a new version of the bundle (the old manifest stays in its history). The
    bundle's prior correction (set by ``train``: see ``DecisionPolicy``) is kept.

    ``config`` (``CalibrateConfig``, what ``imgtriage calibrate`` builds from its options)
    holds the rule to fit, or pass its fields as keywords; other keywords (``seed``,
    ``k_reg``, ...) go to :func:`imgtriage.evaluate.fit_decision_policy` as they are.
    ``config.profile`` names the rule (e.g. "precision", "recall"); profiles are kept side by
    side and picked with ``--profile``. The "default" profile (or ``make_default=True``)
    becomes the rule ``predict`` and the service apply with no flags. Returns the summary,
    with NLL and ECE before and after temperature scaling.

    Example:
        >>> cfg = CalibrateConfig(split="val", threshold_strategy="target_precision",
        ...                       target=0.95, abstain=True, conformal_method="aps")
        >>> calibrate_bundle("runs/a/bundle", "runs/a/splits.csv", cfg)  # doctest: +SKIP
    """
    from imgtriage.evaluate import fit_decision_policy

    names = {f.name for f in fields(CalibrateConfig)}
    if config is not None and names & set(options):
        raise ConfigError("calibrate_bundle takes a CalibrateConfig or its fields as keywords, "
                          f"not both (got config and {sorted(names & set(options))})")
    cfg = config or CalibrateConfig(**{k: v for k, v in options.items() if k in names})
    extra = {k: v for k, v in options.items() if k not in names}
    split, profile, make_default = cfg.split, cfg.profile, cfg.make_default
    b = load_bundle(bundle)
    # fp32 torch where the bundle has weights; an imported ONNX graph (fp32) has only itself
    predictor = _logit_predictor(b, "onnx" if b.info.model.name == "onnx"
                                 else "torch")
    fit_kwargs = {**cfg.fit_options(predictor.classes), **extra}
    samples = labelled_samples(data, predictor.classes, split, min_classes=2)
    keep_ood = fit_kwargs.pop("ood", True) and predictor.policy.ood is not None
    if cfg.ood_accept is not None and predictor.policy.ood is None:
        raise ConfigError(f"{bundle} has no out-of-distribution rule for --ood-accept to "
                          "re-threshold; train it with the default --ood")
    got = collect_logits(predictor, samples, batch_size=batch_size,
                         ood_policy=predictor.policy if keep_ood else None)
    if keep_ood:  # the bundle's OOD scorer stays; its threshold is re-chosen on this data
        fit_kwargs["ood"] = _rethreshold(predictor.policy.ood, got, data, cfg.ood_accept)
    # the bundle's prior correction stays: it belongs to how the model was trained (its class
    # prior), not to the calibration data; new thresholds are fitted on corrected probabilities
    fit_kwargs.setdefault("prior_correction", predictor.policy.prior_correction)
    policy, summary = fit_decision_policy(got.logits, got.labels,
                                          class_names=predictor.classes, **fit_kwargs)
    info = predictor.bundle.info
    profiles = dict(info.profiles)
    profiles[profile] = policy.to_dict()
    calibration = dict(info.block("calibration") or {})
    summary.update(data=str(data), split=split, n_samples=len(got.labels),
                   defects=got.defects)
    calibration[profile] = {k: v for k, v in summary.items() if k != "drift_reference"}
    changes = {"profiles": profiles, "calibration": calibration}
    if make_default or (make_default is None and profile == "default"):
        changes["decision"] = policy.to_dict()
        changes["drift_reference"] = summary["drift_reference"]
    update_bundle(bundle, changes, note=f"calibrate profile {profile!r} on {data}", out=out)
    return summary


def _rethreshold(rule: dict[str, Any], got: LabelledLogits, data: Any,
                 accept: float | None = None) -> dict[str, Any]:
    """The OOD rule with its threshold chosen on the calibration data, at ``accept`` (None:
    the rule's own acceptance)."""
    from imgtriage.evaluate.ood import threshold_from_scores

    finite = got.ood_scores[np.isfinite(got.ood_scores)]
    share = float(rule["accept"] if accept is None else accept)
    return {**rule, "accept": share, "threshold": threshold_from_scores(finite, share),
            "n_val": len(finite), "threshold_from": f"imgtriage calibrate on {data}"}
