"""Two-stage cascade: a cheap first stage answers what it is sure of, the CNN the rest.

A cascade bundle (manifest ``kind: "cascade"``) holds the first stage (logistic regression or
gradient-boosted trees on image-statistics/header features stored as JSON numbers, or a
small CNN bundle under ``stage1/``), its temperature and gate, and the second-stage bundle
copied under ``stage2/``. Every file of both is listed with its sha256 in the outer manifest,
and the inner manifests are checked against the hashes recorded when the cascade was built.

:class:`CascadePredictor` is a :class:`~imgtriage.predict.base.BasePredictor`, so
``Predictor.load``, ``imgtriage predict``, the service, Ray and Celery accept a cascade bundle
like any other. Each file is decoded once, by :class:`CascadeDecoder`, which also prepares the
first stage's input on the decoding thread; the first stage scores it; when its calibrated
score is at least the gate (and, with abstain on, the class threshold) the answer is the first
stage's, else the image goes to the second stage, whose rows are exactly what the second-stage
bundle alone returns. Every row records ``"stage": 1`` or ``2``; the report's
``meta["cascade"]`` says how many files each stage answered.

Example:
    >>> from imgtriage.predict import Predictor
    >>> p = Predictor.load("runs/mstar/cascade")  # doctest: +SKIP
    >>> rep = p.predict_paths(["chips/"])  # doctest: +SKIP
    >>> rep["meta"]["cascade"]["stage1_share"]  # doctest: +SKIP
    0.62
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle import Bundle, load_bundle, validate_manifest
from imgtriage.bundle.checks import inside, parse_manifest
from imgtriage.bundle.manifest import MANIFEST_NAME
from imgtriage.data.features import FeatureSpec, FeatureStandardizer, raw_features
from imgtriage.data.preprocess import PreprocessSpec, record_pixels
from imgtriage.errors import BundleIntegrityError, BundleSchemaError, ImageReadError
from imgtriage.evaluate.decision import DecisionPolicy, Decisions, softmax
from imgtriage.evaluate.ood import MahalanobisOOD
from imgtriage.io import ImageRecord
from imgtriage.predict._cascade_build import (
    FIRST_STAGE_OOD_FILE,
    CascadeConfig,
    CascadeResult,
    CascadeRunOptions,
    build_cascade,
    routed_by_class,
)
from imgtriage.predict._first_stage import stage_from_dict
from imgtriage.predict.base import (
    BasePredictor,
    Decoded,
    Decoder,
    PredictOptions,
    decision_rows,
    is_defect,
)
from imgtriage.predict.predictor import Predictor
from imgtriage.predict.report import stage_counts


def sub_bundle(bundle: Bundle, name: str, expected_sha256: str | None = None) -> Bundle:
    """The bundle stored under ``name/`` inside ``bundle`` (directory or zip), verified."""
    prefix = f"{name}/"
    if bundle._zip is None:
        inner = load_bundle(inside(Path(bundle.path), name, str(bundle.path)))
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for fname in bundle.info.files:
                if fname.startswith(prefix):
                    zf.writestr(fname[len(prefix):], bundle.verified_bytes(fname))
        inner_manifest = validate_manifest(parse_manifest(
            bundle.verified_bytes(prefix + MANIFEST_NAME), f"{bundle.path}:{name}"),
            f"{bundle.path}:{name}")
        inner = Bundle(Path(bundle.path) / name, inner_manifest, buf.getvalue())
        for fname in inner_manifest["files"]:
            inner.verified_bytes(fname)
    if expected_sha256 is not None and inner.sha256 != expected_sha256:
        raise BundleIntegrityError(f"{bundle.path}: the {name}/ bundle's manifest hash is "
                                   f"{inner.sha256[:12]}… but the cascade was built with "
                                   f"{expected_sha256[:12]}…; rebuild the cascade with "
                                   "`imgtriage cascade`")
    return inner


@dataclass(frozen=True)
class CnnInput:
    """The first stage's input when it is a small CNN bundle: its own preprocessing."""

    spec: PreprocessSpec

    def __call__(self, record: ImageRecord, name: str) -> np.ndarray:
        return record_pixels(record, self.spec, path=name)


@dataclass(frozen=True)
class FeatureInput:
    """The first stage's input when it is a feature model: raw statistics and header values."""

    spec: FeatureSpec

    def __call__(self, record: ImageRecord, name: str) -> Any:
        return raw_features(record, self.spec, path=name)


@dataclass(frozen=True)
class CascadeDecoder(Decoder):
    """Decode once (with stage 2's read policy) and prepare the first stage's input, on the
    decoding thread. ``Decoded.x`` is ``(record, first-stage input or None)``; the second
    stage's input is made only for the images the first stage passes on."""

    first: CnnInput | FeatureInput

    def from_record(self, record: ImageRecord, name: str) -> Decoded:
        try:
            prepared = self.first(record, name)
        except ImageReadError:  # e.g. a band count the feature spec cannot map: stage 2
            prepared = None
        return Decoded(name, (record, prepared), record.meta)


class _CnnStage:
    """A small classifier bundle used as the first stage: its own preprocessing + backend,
    and (with the OOD gate) its own OOD rule, scored as Predictor scores it (in the ONNX
    graph or from the features output), so every backend routes alike."""

    kind = "bundle"

    def __init__(self, bundle: Bundle, backend: str, device: str, gate: bool) -> None:
        self.bundle = bundle
        self.input = CnnInput(PreprocessSpec.from_dict(dict(bundle.info.preprocess)))
        loaded = Predictor.load(bundle, backend=backend, device=device)
        assert isinstance(loaded, Predictor)  # _check_stage1_bundle: a plain classifier
        self.predictor = loaded
        self.backend = loaded.backend
        self.ood_policy = dataclasses.replace(loaded.policy, abstain=True) \
            if gate and loaded.policy.ood is not None else None

    def logits(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        return np.asarray(self.backend(np.stack(prepared)), np.float64)

    def scores(self, prepared: Sequence[np.ndarray], metas: Sequence[dict[str, Any]]
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and OOD scores (None without a gate; a constant image scores +inf)."""
        if self.ood_policy is None:
            return self.logits(prepared), None
        logits, ood = self.predictor.forward(np.stack(prepared), self.ood_policy,
                                             metas=list(metas))
        return np.asarray(logits, np.float64), np.asarray(ood, np.float64)

    def in_distribution(self, ood: np.ndarray) -> np.ndarray:
        assert self.ood_policy is not None
        return ~self.ood_policy.ood_mask(ood, len(ood)) & ~np.isnan(ood)


class _FeatureStage:
    """Logistic regression / boosted trees on standardised image and header features, and
    (with the OOD gate) the Mahalanobis scorer fitted on them when the cascade was built."""

    def __init__(self, model: Any, features: FeatureStandardizer,
                 ood: MahalanobisOOD | None = None) -> None:
        self.model = model
        self.kind = model.kind
        self.features = features
        self.input = FeatureInput(features.spec)
        self.ood = ood

    def logits(self, prepared: Sequence[Any]) -> np.ndarray:
        return self.model.logits(self.features.transform(prepared))

    def scores(self, prepared: Sequence[Any], metas: Sequence[dict[str, Any]]
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and OOD scores (None without a gate; a constant image scores +inf)."""
        z = self.features.transform(prepared)
        if self.ood is None:
            return self.model.logits(z), None
        ood = self.ood.score(z)
        ood[[bool(m.get("degenerate")) for m in metas]] = np.inf
        return self.model.logits(z), ood

    def in_distribution(self, ood: np.ndarray) -> np.ndarray:
        assert self.ood is not None
        return ood <= self.ood.threshold_


class _CascadeBackend:
    """Stands where Predictor has ``backend``: a name for reports and ``describe``."""

    def __init__(self, first: str, stage2: Predictor) -> None:
        self.name = f"cascade({first}+{stage2.runtime.backend})"
        self.precision = stage2.runtime.precision
        self.batch_size = stage2.batch_size


@dataclass(frozen=True)
class CascadeOptions(PredictOptions):
    """Predictor's options plus ``gate``: None uses the bundle's gate; 1.01 sends every
    image to the second stage, 0.0 none; and ``ood_gate``: None uses the bundle's OOD gate,
    False answers with the first stage whatever its input looks like (as cascades built
    before the gate did)."""

    gate: float | None = None
    ood_gate: bool | None = None


class CascadePredictor(BasePredictor):
    """A loaded cascade bundle: the first stage answers what it is sure of, stage 2 the rest.

    Per-call options are Predictor's; ``temperature``/``profile``/``tta``/``thresholds``
    apply to the second stage, and an extra ``gate=`` overrides the first stage's gate
    (``gate=1.01`` sends everything to the CNN). The first stage never abstains: an image
    below the gate or below its class threshold goes to the second stage instead, and so
    does one whose first-stage input the OOD gate finds unlike the training data (rows of
    those carry ``"stage1_ood": true``; ``ood_gate=False`` turns the gate off per call).

    Example:
        >>> p = CascadePredictor.load("runs/mstar/cascade")  # doctest: +SKIP
        >>> [r["stage"] for r in p.predict_arrays([chip_a, chip_b])]  # doctest: +SKIP
        [1, 2]
    """

    options_type = CascadeOptions

    def __init__(self, bundle: Bundle, first: _CnnStage | _FeatureStage, stage2: Predictor,
                 temperature: float, gate: float | None) -> None:
        self.bundle = bundle
        self.first = first
        self.stage2 = stage2
        self.temperature = float(temperature)
        self.gate = gate
        self.classes: list[str] = list(bundle.classes)
        self.spec: PreprocessSpec = stage2.spec
        self.policy: DecisionPolicy = stage2.policy
        self.backend = _CascadeBackend(first.kind, stage2)
        self.runtime = dataclasses.replace(stage2.runtime, backend=self.backend.name)

    @classmethod
    def load(cls, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto",
             device: str = "cpu", **kw: Any) -> CascadePredictor:
        """Load and verify a cascade bundle (both stages, every file's sha256)."""
        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        return load_cascade(b, backend=backend, device=device, **kw)

    @property
    def decoder(self) -> CascadeDecoder:
        return CascadeDecoder(self.spec, self.first.input)

    @property
    def ood_gate(self) -> dict[str, Any] | None:
        """The first stage's OOD gate as the manifest records it (None: no gate; cascades
        built before the gate, or with ``--no-ood-gate``)."""
        return self.bundle.info.block("cascade").get("ood_gate")

    def describe(self) -> dict[str, Any]:
        """Predictor.describe of the second stage, with the cascade's identity and gates."""
        out = dict(self.stage2.describe())
        c = self.bundle.info.block("cascade")
        out.update(kind="cascade", bundle_sha256=self.bundle_sha256, backend=self.backend.name,
                   bundle_version=self.bundle.info.bundle_version,
                   cascade={"first_stage": self.first.kind, "gate": self.gate,
                            "temperature": self.temperature,
                            "ood_gate": gate_summary(self.ood_gate),
                            "validation": c.get("validation", {}),
                            "stage2_sha256": self.stage2.bundle_sha256})
        return out

    def policy_for(self, opts: PredictOptions) -> DecisionPolicy:
        return self.stage2.policy_for(opts)

    def with_gate(self, gate: float | None) -> CascadePredictor:
        """A copy answering with another gate (None: everything goes to the second stage)."""
        return CascadePredictor(self.bundle, self.first, self.stage2, self.temperature, gate)

    # -- routing -------------------------------------------------------------------------
    def first_stage_probs(self, records: Sequence[ImageRecord], names: Sequence[str]
                          ) -> np.ndarray:
        """Calibrated first-stage probabilities (N, K) for decoded images."""
        if not records:
            return np.zeros((0, len(self.classes)))
        prepared = [self.first.input(r, n) for r, n in zip(records, names, strict=True)]
        return softmax(self.first.logits(prepared), self.temperature)

    def _accept(self, probs: np.ndarray, policy: DecisionPolicy, gate: float | None
                ) -> np.ndarray:
        if gate is None or len(probs) == 0:
            return np.zeros(len(probs), bool)
        cid = probs.argmax(axis=1)
        score = probs[np.arange(len(probs)), cid]
        ok = (score >= gate) & ~routed_by_class(
            probs, self.bundle.info.block("cascade").get("always_second_stage"))
        if policy.abstain and policy.thresholds is not None:
            ok &= score >= np.asarray(policy.thresholds)[cid]
        return ok

    def _route(self, prepared: Sequence[Any], metas: Sequence[dict[str, Any]],
               policy: DecisionPolicy, gate: float | None, ood_gate: bool = True
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probs, accepted, out of distribution) per item; items without a first-stage
        input go to stage 2, and so do those the OOD gate flags (when ``ood_gate``)."""
        probs = np.zeros((len(prepared), len(self.classes)))
        strange = np.zeros(len(prepared), bool)
        usable = [i for i, p in enumerate(prepared) if p is not None]
        if usable:
            logits, ood = self.first.scores([prepared[i] for i in usable],
                                            [metas[i] for i in usable])
            probs[usable] = softmax(logits, self.temperature)
            if ood is not None and ood_gate:
                strange[usable] = ~self.first.in_distribution(ood)
        accepted = self._accept(probs, policy, gate) & ~strange
        accepted[[i for i, p in enumerate(prepared) if p is None]] = False
        return probs, accepted, strange

    def _stage1_rows(self, names: Sequence[str], probs: np.ndarray, opts: PredictOptions,
                     policy: DecisionPolicy, metas: Sequence[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
        """First-stage answers: never abstained, a one-class set when stage 2 gives sets."""
        cid = probs.argmax(axis=1)
        d = Decisions(probs=probs, class_id=cid, score=probs[np.arange(len(probs)), cid],
                      abstained=np.zeros(len(probs), bool),
                      sets=[[int(c)] for c in cid] if policy.conformal is not None else None)
        return decision_rows(names, self.classes, d, policy, opts, metas,
                             extras=[{"stage": 1}] * len(names))

    def rows(self, batch: Sequence[Decoded], opts: PredictOptions) -> list[dict[str, Any]]:
        """Rows (or defect dicts) for decoded images, in order: stage 1 where it is sure,
        one stage-2 batch for the rest."""
        if not batch:
            return []
        gate = opts.gate if isinstance(opts, CascadeOptions) and opts.gate is not None \
            else self.gate
        ood_gate = not (isinstance(opts, CascadeOptions) and opts.ood_gate is False)
        policy = self.policy_for(opts)
        names = [d.name for d in batch]
        probs, accepted, strange = self._route([d.x[1] for d in batch],
                                               [d.meta for d in batch], policy, gate, ood_gate)
        out: list[dict[str, Any] | None] = [None] * len(batch)
        took = np.flatnonzero(accepted)
        for i, row in zip(took, self._stage1_rows([names[i] for i in took], probs[took], opts,
                                                  policy, [batch[i].meta for i in took]),
                          strict=True):
            out[i] = row
        routed, xs = [], []
        for i in np.flatnonzero(~accepted):
            try:
                xs.append(Decoded(names[i], record_pixels(batch[i].x[0], self.spec,
                                                          path=names[i]), batch[i].meta))
                routed.append(i)
            except ImageReadError as exc:
                out[i] = exc.defect.to_dict()
        for i, row in zip(routed, self.stage2.rows(xs, opts), strict=True):
            out[i] = row if is_defect(row) else {**row, "stage": 2,
                                                  **({"stage1_ood": True} if strange[i] else {})}
        return out  # type: ignore[return-value]

    def report_extra(self, results: list[dict[str, Any]], opts: PredictOptions
                     ) -> dict[str, Any]:
        """The cascade's identity and per-stage counts (none in a runner's preamble call)."""
        block: dict[str, Any] = {"first_stage": self.first.kind, "gate": self.gate,
                                 "temperature": self.temperature,
                                 "stage2_bundle_sha256": self.stage2.bundle_sha256}
        gated = self.ood_gate is not None and not (
            isinstance(opts, CascadeOptions) and opts.ood_gate is False)
        if gated:
            block["ood_gate"] = gate_summary(self.ood_gate)
        if results:
            block.update(stage_counts(
                sum(1 for r in results if r.get("stage") == 1),
                sum(1 for r in results if r.get("stage") == 2),
                sum(1 for r in results if r.get("stage1_ood")) if gated else None))
        return {**super().report_extra(results, opts), "cascade": block}


def gate_summary(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    """The OOD gate in a report's ``meta["cascade"]`` and ``describe()``: what scores it,
    its threshold and stated acceptance (None: no gate)."""
    if gate is None:
        return None
    return {k: gate.get(k) for k in ("source", "method", "threshold", "accept")}


def load_cascade(bundle: Bundle, *, backend: str = "auto", device: str = "cpu",
                 **kw: Any) -> CascadePredictor:
    """Loader for ``kind: "cascade"`` bundles (``Predictor.load`` calls it); other keyword
    arguments (thread counts, precision) go to the second stage's ``Predictor.load``."""
    c = bundle.info.block("cascade")
    if not isinstance(c, dict) or "stage2" not in c or "first_stage" not in c:
        raise BundleSchemaError(f"{bundle.path}: a cascade manifest needs a 'cascade' block "
                                "with first_stage and stage2; rebuild with `imgtriage cascade`")
    inner = sub_bundle(bundle, c["stage2"]["dir"], c["stage2"]["sha256"])
    if inner.classes != bundle.classes:
        raise BundleSchemaError(f"{bundle.path}: stage 2 classes {inner.classes} differ from "
                                f"the cascade's {bundle.classes}")
    stage2 = Predictor.load(inner, backend=backend, device=device, **kw)
    fs = c["first_stage"]
    ood_gate = c.get("ood_gate")  # absent in cascades built before the gate: none
    first: _CnnStage | _FeatureStage
    if fs["type"] == "bundle":
        first = _CnnStage(sub_bundle(bundle, fs["dir"], fs["sha256"]), backend, device,
                          gate=ood_gate is not None)
        if ood_gate is not None and first.ood_policy is None:
            raise BundleSchemaError(f"{bundle.path}: the manifest gates the first stage on its "
                                    "OOD rule but the stage-1 bundle has none; rebuild the "
                                    "cascade with `imgtriage cascade`")
    else:
        params = json.loads(bundle.verified_bytes(fs["file"]))  # sha256-checked
        ood = None
        if ood_gate is not None:
            ood = MahalanobisOOD.from_rule(ood_gate, bundle.tensors(ood_gate["file"], "numpy"))
        first = _FeatureStage(stage_from_dict(params),
                              FeatureStandardizer.from_dict(dict(bundle.info.features or {})),
                              ood)
    gate = c.get("gate")
    return CascadePredictor(bundle, first, stage2, float(c["temperature"]),
                            None if gate is None else float(gate))


__all__ = ["FIRST_STAGE_OOD_FILE", "CascadeConfig", "CascadeDecoder", "CascadeOptions",
           "CascadePredictor", "CascadeResult", "CascadeRunOptions", "build_cascade",
           "load_cascade", "sub_bundle"]
