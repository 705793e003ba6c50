"""Predictor: the Python API, and the classifier kind (image-only and image + feature fusion).

Load a bundle once, classify arrays, bytes, files and folders. The bundle's temperature,
thresholds, abstain rule and conformal sets apply by default; each can be overridden per call.
One bad file never raises: it becomes a defect. What every kind shares (decoding with the
defect path, the entry points, the report) is :class:`~imgtriage.predict.base.BasePredictor`;
this module adds what a classifier does differently: its backend, TTA and fusion features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle import Bundle, check_pinned, load_bundle
from imgtriage.bundle.graph import graph_scores_rule
from imgtriage.data.features import (
    FeatureStandardizer,
    read_extra_columns,
    with_extra_columns,
)
from imgtriage.data.preprocess import RAW_FEATURES, PreprocessSpec, record_input
from imgtriage.errors import BundleSchemaError, ConfigError, PredictionError
from imgtriage.evaluate.decision import DecisionPolicy
from imgtriage.evaluate.ood import OOD_FILE, KnnOOD, scorer_from_rule
from imgtriage.io import ImageRecord
from imgtriage.predict.backends import RuntimeChoice
from imgtriage.predict.base import (
    BasePredictor,
    Decoded,
    Decoder,
    PredictOptions,
    decision_rows,
)

TTA_TRANSFORMS = {
    "hflip": lambda x: x[..., ::-1],
    "vflip": lambda x: x[..., ::-1, :],
    "rot90": lambda x: np.rot90(x, 1, axes=(-2, -1)),
    "rot180": lambda x: np.rot90(x, 2, axes=(-2, -1)),
    "rot270": lambda x: np.rot90(x, 3, axes=(-2, -1)),
}


@dataclass(frozen=True)
class ClassifierDecoder(Decoder):
    """File -> (model input, metadata with the raw features of a fusion bundle)."""

    def from_record(self, record: ImageRecord, name: str) -> Decoded:
        x, meta = record_input(record, self.spec, path=name)
        return Decoded(name, x, meta)


class Predictor(BasePredictor):
    """A loaded classifier bundle ready to classify (``load`` opens any kind of bundle).

    Example:
        >>> p = Predictor.load("runs/digits/bundle")  # doctest: +SKIP
        >>> report = p.predict_paths(["photos/"], batch_size=32)  # doctest: +SKIP
        >>> report["results"][0]["class"]  # doctest: +SKIP
        'cat'
    """

    def __init__(self, bundle: Bundle, backend: Any, runtime: RuntimeChoice | None = None
                 ) -> None:
        self.bundle = bundle
        self.backend = backend
        # what runs, and why: printed by predict/serve and written into every report's meta
        self.runtime = RuntimeChoice(backend.name, getattr(backend, "precision", "fp32"),
                                     getattr(backend, "threads", None),
                                     runtime.note if runtime is not None else "")
        self.spec = PreprocessSpec.from_dict(dict(bundle.info.preprocess))
        self.classes: list[str] = bundle.classes
        self.policy = DecisionPolicy.from_dict(dict(bundle.info.decision))
        # views the graph already averages (``view_average``, folded in at training) are
        # not run again: --tta on such a bundle adds only the views it does not have
        folded = set(bundle.info.model.kwargs.get("view_average") or ())
        self.tta_transforms: list[str] = [t for t in bundle.info.tta or ["hflip"]
                                          if t not in folded]
        self.features = _standardizer(bundle, self.spec)
        self.extras: dict[str, dict[str, Any]] = {}
        self._ood: dict[str, KnnOOD] = {}
        self._graph_scores: dict[str, bool] = {}
        if self.policy.ood is not None:  # a missing or altered scorer fails at load
            self.ood_scorer(self.policy.ood)

    @classmethod
    def load(cls, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto",
             device: str = "cpu", num_threads: int | None = None,
             precision: str | None = None, expect_sha256: str | None = None
             ) -> BasePredictor:
        """Load and verify a bundle.

        ``expect_sha256`` pins the bundle: any other (its manifest hash, what
        ``imgtriage inspect`` prints and ``/v1/model`` reports) is refused with
        :class:`~imgtriage.errors.BundleIntegrityError`.

        ``backend`` is auto (ONNX Runtime on CPU when the bundle holds ``model.onnx``, else
        torch), torch or onnx; ``precision`` fp32|int8 picks the ONNX graph (default: the one
        the export chose); ``num_threads`` caps the model's compute threads.
        """
        from imgtriage.predict.backends import build_backend, choose_runtime

        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle,
                                                                   expect_sha256=expect_sha256)
        if expect_sha256 is not None:
            check_pinned(b, expect_sha256)
        if b.info.kind != "classifier":
            from imgtriage.predict.kinds import load_special

            if num_threads:
                import torch

                torch.set_num_threads(num_threads)
            return load_special(b, backend=backend, device=device)
        choice = choose_runtime(b, backend, device, num_threads=num_threads,
                                precision=precision)
        return cls(b, build_backend(b, choice, device, num_threads), choice)

    @property
    def decoder(self) -> ClassifierDecoder:
        return ClassifierDecoder(self.spec)

    def describe(self) -> dict[str, Any]:
        """What a client needs to know about the model (the service's GET /v1/model)."""
        info = self.bundle.info
        return {"classes": self.classes, "input": dict(info.preprocess),
                "model": self.bundle.manifest["model"],  # as stored, every key kept
                "decision": self.policy.to_dict(), "profiles": sorted(info.profiles),
                "bundle_sha256": self.bundle_sha256, "bundle_version": info.bundle_version,
                "schema_version": info.schema_version, **self.runtime.to_dict(),
                "versions": dict(info.versions)}

    # -- core ----------------------------------------------------------------------------
    def policy_for(self, opts: PredictOptions) -> DecisionPolicy:
        policy = self.policy
        if opts.profile is not None:
            profiles = self.bundle.info.profiles
            if opts.profile not in profiles:
                raise PredictionError(f"unknown decision profile {opts.profile!r}; this bundle "
                                      f"has {sorted(profiles) or 'none'} (--profile)")
            policy = DecisionPolicy.from_dict(dict(profiles[opts.profile]))
        policy = policy.with_overrides(temperature=opts.temperature,
                                       thresholds=opts.thresholds, abstain=opts.abstain)
        if policy.thresholds is not None and len(policy.thresholds) != len(self.classes):
            raise ConfigError(f"{len(policy.thresholds)} thresholds for {len(self.classes)} "
                              f"classes ({', '.join(self.classes)}); give one per class in "
                              "that order (--thresholds)")
        return policy

    def logits(self, x: np.ndarray, tta: bool = False, features: np.ndarray | None = None
               ) -> np.ndarray:
        """Raw logits for stacked inputs (N, C, h, w); TTA averages over the bundle's views.
        Image + feature bundles also take ``features`` (:meth:`feature_matrix`)."""
        if self.features is not None and features is None:
            raise PredictionError("this bundle is an image + feature model: pass the scaled "
                                  "features (Predictor.feature_matrix of the inputs' metadata)")
        args = () if self.features is None else (features,)
        out = self.backend(x, *args)
        if tta:
            views = [self.backend(np.ascontiguousarray(TTA_TRANSFORMS[t](x)), *args)
                     for t in self.tta_transforms]
            out = np.mean([out, *views], axis=0)
        return out

    def ood_scorer(self, rule: dict[str, Any]) -> KnnOOD:
        """The bundle's fitted OOD scorer for a policy's rule (its arrays read once)."""
        name = rule.get("file", OOD_FILE)
        if name not in self._ood:
            self._ood[name] = scorer_from_rule(rule, self.bundle.tensors(name, "numpy"))
        return self._ood[name]

    def graph_scores(self, rule: dict[str, Any]) -> bool:
        """Whether the backend's graph computes ``rule``'s OOD score itself (bundles from
        training since the in-graph score, for the rule it was built from); else the
        ``features`` output is scored in NumPy (the torch backend, older bundles)."""
        key = json.dumps(rule, sort_keys=True, default=str)
        if key not in self._graph_scores:
            self._graph_scores[key] = bool(getattr(self.backend, "has_ood_score", False)) and \
                graph_scores_rule(self.bundle.info.block("onnx"), self.bundle.manifest["files"],
                                  rule)
        return self._graph_scores[key]

    def forward(self, x: np.ndarray, policy: DecisionPolicy, tta: bool = False,
                features: np.ndarray | None = None,
                metas: Sequence[dict[str, Any]] | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, when ``policy`` has an OOD rule, each input's OOD score (from the
        un-augmented view; a constant, degenerate image scores +inf)."""
        if policy.ood is None or not policy.abstain:
            return self.logits(x, tta, features), None
        args = () if self.features is None else (features,)
        if self.graph_scores(policy.ood):  # one graph run: logits and score
            logits, scores = self.backend.with_ood_score(x, *args)
        else:
            with_features = getattr(self.backend, "with_features", None)
            if with_features is None:
                raise PredictionError(f"backend {self.backend.name!r} cannot return the "
                                      "features this bundle's OOD rule needs; use --backend "
                                      "torch")
            logits, feats = with_features(x, *args)
            scores = self.ood_scorer(policy.ood).score(feats)
        if tta:
            views = [self.backend(np.ascontiguousarray(TTA_TRANSFORMS[t](x)), *args)
                     for t in self.tta_transforms]
            logits = np.mean([logits, *views], axis=0)
        if metas:
            scores[[bool(m.get("degenerate")) for m in metas]] = np.inf
        return logits, scores

    def set_extra_columns(self, rows: dict[str, dict[str, Any]]) -> None:
        """Extra-column values by file path (``read_extra_columns`` of a manifest) for bundles
        trained with ``--feature-columns``; files not listed get them imputed and flagged."""
        self.extras = {str(Path(k)): dict(v) for k, v in rows.items()}

    def use_feature_manifest(self, manifest: str | os.PathLike[str]) -> int:
        """Read the extra feature columns of the files to classify from a CSV/JSONL manifest
        (``path`` + the columns the bundle was trained with); returns the number of rows.

        Example:
            >>> p.use_feature_manifest("inbox/frames.csv")  # doctest: +SKIP
            120
        """
        spec = self.features.spec if self.features is not None else None
        if spec is None or not spec.extra_columns:
            raise ConfigError(f"{self.bundle.path} was not trained with --feature-columns; "
                              "drop --feature-manifest")
        keys = sorted({k for f in spec.extra_columns for k in f.keys})
        self.set_extra_columns(read_extra_columns(manifest, keys))
        return len(self.extras)

    def feature_matrix(self, metas: Sequence[dict[str, Any]] | None, names: Sequence[str]
                       ) -> np.ndarray | None:
        """Scaled features (N, F) float32 from each input's ``meta["raw_features"]`` with the
        bundle's standardizer (None for image-only bundles): the training transform exactly."""
        return self._scaled(self._raw_features(metas, names))

    def _scaled(self, raws: list[Any] | None) -> np.ndarray | None:
        return None if raws is None else self.features.transform(raws).astype(np.float32)

    def _raw_features(self, metas: Sequence[dict[str, Any]] | None, names: Sequence[str]
                      ) -> list[Any] | None:
        """Each input's raw features with its manifest columns (None: image-only bundle)."""
        if self.features is None:
            return None
        if metas is None or any(RAW_FEATURES not in m for m in metas):
            raise PredictionError("inputs of an image + feature bundle must be decoded with the "
                                  "bundle's PreprocessSpec (load_input), which adds their raw "
                                  "features to the metadata")
        spec = self.features.spec
        raws = [m[RAW_FEATURES] for m in metas]
        if spec is not None and spec.extra_columns:
            raws = [with_extra_columns(r, spec, self.extras.get(str(Path(n))))
                    for r, n in zip(raws, names, strict=True)]
        return raws

    def _flag_imputed(self, metas: Sequence[dict[str, Any]] | None, raws: list[Any] | None
                      ) -> Sequence[dict[str, Any]] | None:
        """``metas`` with ``features_imputed`` on the rows (``raws``: their raw features, see
        :meth:`_raw_features`) that lack a manifest column the bundle was trained with (not in
        --feature-manifest), or the whole header its cards come from (an array, a PNG): the
        model saw the training median there, and the row's ``flags`` say so, as the docs
        promise. (A card no training file had either is not flagged: every row would be.)"""
        if raws is None or metas is None:
            return metas
        spec = self.features.spec
        cards = len(spec.header_cards) if spec is not None else 0

        def imputed(meta: dict[str, Any], raw: Any) -> bool:
            return ((cards > 0 and "header" not in meta)
                    or any(v is None for v in raw.fields[cards:]))

        return [{**m, "features_imputed": True} if imputed(m, r) else m
                for m, r in zip(metas, raws, strict=True)]

    def rows_for_inputs(self, x: np.ndarray, names: Sequence[str], opts: PredictOptions,
                        metas: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Result rows for already-preprocessed inputs."""
        if len(x) == 0:
            return []
        policy = self.policy_for(opts)
        raws = self._raw_features(metas, names)  # once: the model's input and the flags
        d = policy.decide(*self.forward(x, policy, opts.tta, self._scaled(raws), metas))
        return decision_rows(names, self.classes, d, policy, opts,
                             self._flag_imputed(metas, raws))

    def rows(self, batch: Sequence[Decoded], opts: PredictOptions) -> list[dict[str, Any]]:
        if not batch:
            return []
        return self.rows_for_inputs(np.stack([d.x for d in batch]), [d.name for d in batch],
                                    opts, [d.meta for d in batch])


def _standardizer(bundle: Bundle, spec: PreprocessSpec) -> FeatureStandardizer | None:
    """The bundle's fitted feature scaler when its preprocessing computes features."""
    if spec.features is None:
        return None
    stored = bundle.info.features
    if not isinstance(stored, dict):
        raise BundleSchemaError(f"{bundle.path}: the preprocessing computes features but the "
                                "manifest holds no fitted 'features' scaler; retrain the bundle")
    fx = FeatureStandardizer.from_dict(dict(stored))
    if fx.spec != spec.features:
        raise BundleSchemaError(f"{bundle.path}: the feature spec of 'preprocess' differs from "
                                "the scaler's; the manifest was edited: restore the bundle")
    return fx
