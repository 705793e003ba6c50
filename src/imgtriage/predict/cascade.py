"""Two-stage cascade: a cheap first stage answers what it is sure of, the CNN the rest.

A cascade bundle (manifest ``kind: "cascade"``) holds the first stage (logistic regression or
gradient-boosted trees on image-statistics/header features stored as JSON numbers, or a
small CNN bundle under ``stage1/``), its temperature and gate, and the second-stage bundle
copied under ``stage2/``. Every file of both is listed with its sha256 in the outer manifest,
and the inner manifests are checked against the hashes recorded when the cascade was built.

:class:`CascadePredictor` has the public methods of :class:`~imgtriage.predict.Predictor`, so
``Predictor.load``, ``imgtriage predict`` and the service accept a cascade bundle like any
other. Each file is decoded once; the first stage scores it; when its calibrated score is at
least the gate (and, with abstain on, the class threshold) the answer is the first stage's,
else the image goes to the second stage, whose rows are exactly what the second-stage
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
import time
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.bundle import Bundle, load_bundle, validate_manifest
from imgtriage.bundle.checks import inside, parse_manifest
from imgtriage.bundle.manifest import MANIFEST_NAME
from imgtriage.data.features import FeatureStandardizer, raw_features
from imgtriage.data.preprocess import PreprocessSpec, load_record, to_input
from imgtriage.errors import BundleIntegrityError, BundleSchemaError, ImageReadError
from imgtriage.evaluate.decision import DecisionPolicy, softmax
from imgtriage.io import Defect, ImageRecord, read_array
from imgtriage.predict._cascade_build import (
    CascadeConfig,
    CascadeResult,
    build_cascade,
    routed_by_class,
)
from imgtriage.predict._first_stage import stage_from_dict
from imgtriage.predict.predictor import Decoded, PredictOptions, Predictor
from imgtriage.predict.report import meta_flags, result_row

FIRST_STAGE_INPUT = "first_stage_input"  # meta key set by CascadePredictor.load_input


def sub_bundle(bundle: Bundle, name: str, expected_sha256: str | None = None) -> Bundle:
    """The bundle stored under ``name/`` inside ``bundle`` (directory or zip), verified."""
    prefix = f"{name}/"
    if bundle._zip is None:
        inner = load_bundle(inside(Path(bundle.path), name, str(bundle.path)))
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for fname in bundle.manifest["files"]:
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


class _CnnStage:
    """A small classifier bundle used as the first stage: its own preprocessing + backend."""

    kind = "bundle"

    def __init__(self, bundle: Bundle, backend: str, device: str) -> None:
        from imgtriage.predict.backends import make_backend

        self.bundle = bundle
        self.spec = PreprocessSpec.from_dict(bundle.manifest["preprocess"])
        self.backend = make_backend(bundle, backend, device)

    def prepare(self, record: ImageRecord, name: str) -> np.ndarray:
        """Per image, in decoding threads: the first stage's model input."""
        return to_input(record.array, self.spec, path=name)

    def logits(self, prepared: Sequence[np.ndarray]) -> np.ndarray:
        return np.asarray(self.backend(np.stack(prepared)), np.float64)


class _FeatureStage:
    """Logistic regression / boosted trees on standardised image and header features."""

    def __init__(self, model: Any, features: FeatureStandardizer) -> None:
        self.model = model
        self.kind = model.kind
        self.features = features

    def prepare(self, record: ImageRecord, name: str) -> Any:
        """Per image, in decoding threads: its raw statistics and header values."""
        return raw_features(record, self.features.spec, path=name)

    def logits(self, prepared: Sequence[Any]) -> np.ndarray:
        return self.model.logits(self.features.transform(prepared))


class _CascadeBackend:
    """Stands where Predictor has ``backend``: a name for reports and ``describe``."""

    def __init__(self, first: str, second: str) -> None:
        self.name = f"cascade({first}+{second})"


class CascadePredictor:
    """A loaded cascade bundle, duck-typed to :class:`~imgtriage.predict.Predictor`.

    Per-call options are Predictor's; ``temperature``/``profile``/``tta``/``thresholds``
    apply to the second stage, and an extra ``gate=`` overrides the first stage's gate
    (``gate=1.01`` sends everything to the CNN). The first stage never abstains: an image
    below the gate or below its class threshold goes to the second stage instead.

    Example:
        >>> p = CascadePredictor.load("runs/mstar/cascade")  # doctest: +SKIP
        >>> [r["stage"] for r in p.predict_arrays([chip_a, chip_b])]  # doctest: +SKIP
        [1, 2]
    """

    def __init__(self, bundle: Bundle, first: Any, stage2: Predictor,
                 temperature: float, gate: float | None) -> None:
        self.bundle = bundle
        self.first = first
        self.stage2 = stage2
        self.temperature = float(temperature)
        self.gate = gate
        self.classes: list[str] = list(bundle.classes)
        self.spec: PreprocessSpec = stage2.spec
        self.policy: DecisionPolicy = stage2.policy
        self.backend = _CascadeBackend(first.kind, getattr(stage2.backend, "name", "?"))
        self.runtime = dataclasses.replace(stage2.runtime, backend=self.backend.name)

    @classmethod
    def load(cls, bundle: str | os.PathLike[str] | Bundle, *, backend: str = "auto",
             device: str = "cpu", **kw: Any) -> CascadePredictor:
        """Load and verify a cascade bundle (both stages, every file's sha256)."""
        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        return load_cascade(b, backend=backend, device=device, **kw)

    # -- identity ------------------------------------------------------------------------
    @property
    def bundle_sha256(self) -> str:
        return self.bundle.sha256

    def describe(self) -> dict[str, Any]:
        """Predictor.describe of the second stage, with the cascade's identity and gate."""
        out = dict(self.stage2.describe())
        c = self.bundle.manifest["cascade"]
        out.update(kind="cascade", bundle_sha256=self.bundle_sha256, backend=self.backend.name,
                   bundle_version=self.bundle.manifest.get("bundle_version", 1),
                   cascade={"first_stage": self.first.kind, "gate": self.gate,
                            "temperature": self.temperature,
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
        prepared = [self.first.prepare(r, n) for r, n in zip(records, names, strict=True)]
        return softmax(self.first.logits(prepared), self.temperature)

    def _prepare(self, record: ImageRecord | None, name: str) -> Any:
        """The first stage's input for one image; None sends the image to stage 2."""
        if record is None:
            return None
        try:
            return self.first.prepare(record, name)
        except ImageReadError:  # e.g. a band count the feature spec cannot map
            return None

    def _load(self, source: str | bytes, name: str | None = None
              ) -> tuple[ImageRecord, Any] | Defect:
        """Decoding-thread work for one file or upload: decode once, prepare the first
        stage's input."""
        name = source if name is None else name
        rec = _decode(source, self.spec, name)
        return rec if isinstance(rec, Defect) else (rec, self._prepare(rec, name))

    def _accept(self, probs: np.ndarray, policy: DecisionPolicy, gate: float | None
                ) -> np.ndarray:
        if gate is None or len(probs) == 0:
            return np.zeros(len(probs), bool)
        cid = probs.argmax(axis=1)
        score = probs[np.arange(len(probs)), cid]
        ok = (score >= gate) & ~routed_by_class(
            probs, self.bundle.manifest["cascade"].get("always_second_stage"))
        if policy.abstain and policy.thresholds is not None:
            ok &= score >= np.asarray(policy.thresholds)[cid]
        return ok

    def _stage1_row(self, name: str, p: np.ndarray, opts: PredictOptions,
                    policy: DecisionPolicy, meta: dict[str, Any]) -> dict[str, Any]:
        cid = int(p.argmax())
        probs = ({c: round(float(v), 6) for c, v in zip(self.classes, p, strict=True)}
                 if opts.include_probs else None)
        topk = None
        if opts.topk:
            topk = [{"class": self.classes[j], "class_id": int(j), "score": round(float(p[j]), 6)}
                    for j in np.argsort(-p)[: opts.topk]]
        pred_set = [self.classes[cid]] if policy.conformal is not None else None
        flags = meta_flags(meta)
        return result_row(name, self.classes[cid], cid, float(p[cid]), False, probs=probs,
                          topk=topk, pred_set=pred_set, flags=flags, extra={"stage": 1})

    def _route(self, prepared: Sequence[Any], policy: DecisionPolicy, gate: float | None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(probs, accepted) per item; items without a first-stage input go to stage 2."""
        probs = np.zeros((len(prepared), len(self.classes)))
        usable = [i for i, p in enumerate(prepared) if p is not None]
        if usable:
            logits = self.first.logits([prepared[i] for i in usable])
            probs[usable] = softmax(logits, self.temperature)
        accepted = self._accept(probs, policy, gate)
        accepted[[i for i, p in enumerate(prepared) if p is None]] = False
        return probs, accepted

    def _rows_for_records(self, records: Sequence[ImageRecord], names: Sequence[str],
                          opts: PredictOptions, gate: float | None,
                          prepared: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Rows (or defect dicts) for decoded images, in order."""
        policy = self.policy_for(opts)
        if prepared is None:
            prepared = [self._prepare(r, n) for r, n in zip(records, names, strict=True)]
        probs, accepted = self._route(prepared, policy, gate)
        out: list[dict[str, Any] | None] = [None] * len(records)
        routed, xs = [], []
        for i, (rec, name) in enumerate(zip(records, names, strict=True)):
            if accepted[i]:
                out[i] = self._stage1_row(name, probs[i], opts, policy, rec.meta)
                continue
            try:
                xs.append(to_input(rec.array, self.spec, path=name))
                routed.append(i)
            except ImageReadError as exc:
                out[i] = exc.defect.to_dict()
        self._stage2_into(out, routed, xs, names, [records[i].meta for i in routed], opts)
        return out  # type: ignore[return-value]

    def _stage2_into(self, out: list, routed: list[int], xs: list[np.ndarray],
                     names: Sequence[str], metas: list[dict[str, Any]],
                     opts: PredictOptions) -> None:
        if not routed:
            return
        rows = self.stage2.rows_for_inputs(np.stack(xs), [names[i] for i in routed], opts,
                                           metas)
        for i, row in zip(routed, rows, strict=True):
            out[i] = {**row, "stage": 2}

    # -- Predictor's public entry points ---------------------------------------------------
    def load_input(self, source: str | os.PathLike[str] | bytes, name: str | None = None
                   ) -> tuple[np.ndarray, dict[str, Any]]:
        """Like :func:`~imgtriage.data.preprocess.load_input` with stage 2's spec, but the
        metadata also carries the first stage's input (``meta["first_stage_input"]``), so a
        batch runner that decodes through this method needs no second read of the file."""
        shown = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
        record = load_record(source, self.spec, name=name)
        meta = dict(record.meta)
        meta[FIRST_STAGE_INPUT] = self._prepare(record, shown)
        return to_input(record.array, self.spec, path=shown), meta

    def rows_for_inputs(self, x: np.ndarray, names: Sequence[str], opts: PredictOptions,
                        metas: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Rows for inputs already preprocessed for the second stage (the path
        ``batch.iter_predictions`` takes). The first stage needs the decoded image: it comes
        from ``meta["first_stage_input"]`` when the decoder used :meth:`load_input`, else
        each name is read again as a file (names that are not readable files go to stage 2).
        """
        if len(x) == 0:
            return []
        opts, gate = self._split_options(opts)
        metas = list(metas) if metas is not None else [{} for _ in names]
        prepared = [m[FIRST_STAGE_INPUT] if FIRST_STAGE_INPUT in m else self._reread(n)
                    for m, n in zip(metas, names, strict=True)]
        policy = self.policy_for(opts)
        probs, accepted = self._route(prepared, policy, gate)
        out: list[dict[str, Any] | None] = [None] * len(names)
        for i in np.flatnonzero(accepted):
            out[i] = self._stage1_row(names[i], probs[i], opts, policy, metas[i])
        routed = [i for i in range(len(names)) if not accepted[i]]
        self._stage2_into(out, routed, [x[i] for i in routed], names,
                          [{k: v for k, v in metas[i].items() if k != FIRST_STAGE_INPUT}
                           for i in routed], opts)
        return out  # type: ignore[return-value]

    def _reread(self, name: str) -> Any:
        if not os.path.isfile(name):
            return None
        try:
            return self._prepare(load_record(name, self.spec), name)
        except ImageReadError:
            return None

    def _split_options(self, opts: PredictOptions | dict[str, Any]
                       ) -> tuple[PredictOptions, float | None]:
        if isinstance(opts, PredictOptions):
            return opts, self.gate
        opts = dict(opts)
        gate = opts.pop("gate", self.gate)
        return PredictOptions(**opts), gate

    def predict_arrays(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None,
                       **options: Any) -> list[dict[str, Any]]:
        """Decoded images -> one row (or defect dict) per array, in order. Arrays carry no
        header, so header features count as missing (imputed and flagged)."""
        opts, gate = self._split_options(options)
        names = list(names) if names is not None else [f"array[{i}]" for i in range(len(arrays))]
        return self._merge([_array_record(a, n, self.spec) for a, n in zip(arrays, names,
                                                                             strict=True)],
                           names, opts, gate)

    def predict_bytes(self, items: Sequence[bytes], names: Sequence[str] | None = None,
                      **options: Any) -> list[dict[str, Any]]:
        """Encoded files in memory -> one row or defect dict per item; never raises for one."""
        return self.predict_decoded(self.decode_bytes(items, names), **options)

    def decode_bytes(self, items: Sequence[bytes],
                     names: Sequence[str] | None = None) -> list[Decoded | dict[str, Any]]:
        """Decode each item once and prepare its first-stage input (as
        :meth:`Predictor.decode_bytes`): a :class:`Decoded` or a defect dict per item."""
        names = list(names) if names is not None else [f"upload[{i}]" for i in range(len(items))]
        loaded = [(n, self._load(b, n)) for b, n in zip(items, names, strict=True)]
        return [d.to_dict() if isinstance(d, Defect) else Decoded(n, d, {}) for n, d in loaded]

    def predict_decoded(self, entries: Sequence[Decoded | dict[str, Any]],
                        **options: Any) -> list[dict[str, Any]]:
        """Rows for :meth:`decode_bytes` entries (of one or several calls); defect dicts pass
        through in place."""
        opts, gate = self._split_options(options)
        out: list[Any] = list(entries)
        idx = [i for i, e in enumerate(entries) if isinstance(e, Decoded)]
        if idx:
            rows = self._merge([out[i].x for i in idx], [out[i].name for i in idx], opts, gate)
            for i, row in zip(idx, rows, strict=True):
                out[i] = row
        return out

    def _merge(self, decoded: list[ImageRecord | tuple[ImageRecord, Any] | Defect],
               names: Sequence[str], opts: PredictOptions, gate: float | None
               ) -> list[dict[str, Any]]:
        """Rows for a batch of decode results (records, (record, prepared) pairs, defects)."""
        good = [i for i, d in enumerate(decoded) if not isinstance(d, Defect)]
        pairs = [d if isinstance(d, tuple) else (d, self._prepare(d, names[i]))
                 for i, d in ((i, decoded[i]) for i in good)]
        rows = self._rows_for_records([r for r, _ in pairs], [names[i] for i in good], opts,
                                      gate, [p for _, p in pairs])
        out = [d.to_dict() if isinstance(d, Defect) else None for d in decoded]
        for i, row in zip(good, rows, strict=True):
            out[i] = row
        return out  # type: ignore[return-value]

    def predict_paths(self, paths: Iterable[str | os.PathLike[str]], *,
                      batch_size: int | None = None, workers: int | None = None,
                      progress: bool = False, **options: Any) -> dict[str, Any]:
        """Files and folders -> the report dict; each file decoded once, in worker threads
        while the previous batch runs; every file appears once in results or defects."""
        from imgtriage.predict.batch import iter_files

        opts, gate = self._split_options(options)
        batch_size = batch_size or int(getattr(self.stage2.backend, "batch_size", 32) or 32)
        t0 = time.perf_counter()
        results, defects = [], []
        workers = workers or max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool, _Progress(progress) as bar:
            pending = None
            files = iter(iter_files(paths))
            while chunk := list(islice(files, batch_size)):
                futures = [pool.submit(self._load, f) for f in chunk]
                if pending is not None:
                    self._collect(*pending, opts, gate, results, defects, bar)
                pending = (chunk, futures)
            if pending is not None:
                self._collect(*pending, opts, gate, results, defects, bar)
        return self.make_report(results, defects, time.perf_counter() - t0, batch_size, opts)

    def _collect(self, chunk: list[str], futures: list, opts: PredictOptions,
                 gate: float | None, results: list, defects: list, bar: _Progress) -> None:
        for row in self._merge([f.result() for f in futures], chunk, opts, gate):
            (defects if "issue" in row else results).append(row)
        bar.advance(len(chunk))

    def make_report(self, results: list[dict[str, Any]], defects: list[dict[str, Any]],
                    elapsed: float, batch_size: int, opts: PredictOptions) -> dict[str, Any]:
        """The second stage's report format, with the cascade's identity and per-stage counts."""
        if not isinstance(opts, PredictOptions):
            opts = self._split_options(opts)[0]
        report = self.stage2.make_report(results, defects, elapsed, batch_size, opts)
        block: dict[str, Any] = {"first_stage": self.first.kind, "gate": self.gate,
                                 "temperature": self.temperature,
                                 "stage2_bundle_sha256": self.stage2.bundle_sha256}
        if results:  # a runner's preamble call has none yet: no counts rather than 0/0
            n1 = sum(1 for r in results if r.get("stage") == 1)
            n2 = sum(1 for r in results if r.get("stage") == 2)
            block.update(stage1=n1, stage2=n2, stage1_share=round(n1 / len(results), 6),
                         stage2_share=round(n2 / len(results), 6))
        report["meta"].update(bundle=str(self.bundle.path), bundle_sha256=self.bundle_sha256,
                              backend=self.backend.name, cascade=block)
        return report


def _array_record(array: Any, name: str, spec: PreprocessSpec) -> ImageRecord | Defect:
    """An in-memory image through the readers' last step, as ``Predictor.predict_arrays``."""
    try:
        return read_array(array, policy=spec.read, name=name)
    except ImageReadError as exc:
        return exc.defect


def _decode(source: str | bytes, spec: PreprocessSpec, name: str) -> ImageRecord | Defect:
    try:
        return load_record(source, spec, name=name)
    except ImageReadError as exc:
        return exc.defect
    except Exception as exc:  # a decoder bug must not stop a run of millions of files
        return Defect(name, "decode_error", f"{type(exc).__name__}: {exc}")


class _Progress:
    """A live "files, files/s" line (rich), or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import Progress, TextColumn, TimeElapsedColumn

            self.live = Progress(TextColumn("cascade classified {task.completed} files"),
                                 TextColumn("{task.speed} files/s"), TimeElapsedColumn())
            self.live.__enter__()
            self.task = self.live.add_task("classify", total=None)
        return self

    def advance(self, n: int) -> None:
        if self.enabled:
            self.live.advance(self.task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.live.__exit__(*exc)


def load_cascade(bundle: Bundle, *, backend: str = "auto", device: str = "cpu",
                 **kw: Any) -> CascadePredictor:
    """Loader for ``kind: "cascade"`` bundles (``Predictor.load`` calls it); other keyword
    arguments (thread counts, precision) go to the second stage's ``Predictor.load``."""
    c = bundle.manifest.get("cascade")
    if not isinstance(c, dict) or "stage2" not in c or "first_stage" not in c:
        raise BundleSchemaError(f"{bundle.path}: a cascade manifest needs a 'cascade' block "
                                "with first_stage and stage2; rebuild with `imgtriage cascade`")
    inner = sub_bundle(bundle, c["stage2"]["dir"], c["stage2"]["sha256"])
    if inner.classes != bundle.classes:
        raise BundleSchemaError(f"{bundle.path}: stage 2 classes {inner.classes} differ from "
                                f"the cascade's {bundle.classes}")
    stage2 = Predictor.load(inner, backend=backend, device=device, **kw)
    fs = c["first_stage"]
    if fs["type"] == "bundle":
        first: Any = _CnnStage(sub_bundle(bundle, fs["dir"], fs["sha256"]), backend, device)
    else:
        params = json.loads(bundle.verified_bytes(fs["file"]))  # sha256-checked
        first = _FeatureStage(stage_from_dict(params),
                              FeatureStandardizer.from_dict(bundle.manifest["features"]))
    gate = c.get("gate")
    return CascadePredictor(bundle, first, stage2, float(c["temperature"]),
                            None if gate is None else float(gate))


__all__ = ["CascadeConfig", "CascadePredictor", "CascadeResult", "build_cascade",
           "load_cascade", "sub_bundle"]
