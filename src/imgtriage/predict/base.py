"""The one predictor contract: decode -> predict decoded -> rows -> report, with the defect path.

Every kind of bundle (classifier and image + feature fusion in :mod:`~imgtriage.predict.predictor`,
gallery in :mod:`~imgtriage.predict.gallery`, cascade in :mod:`~imgtriage.predict.cascade`) is a
:class:`BasePredictor` and implements only what differs:

- ``decoder``: a small, picklable :class:`Decoder` that turns one file, upload or array into a
  :class:`Decoded` input (run on decode threads, decode processes or Ray workers; each file is
  read exactly once, by the kind's own decoder);
- ``rows``: a batch of :class:`Decoded` inputs -> one result row (or a defect dict) each;
- ``policy_for``, ``describe`` and ``report_extra``.

Everything else is written here once: the defect path (a file that cannot be read becomes a
defect dict, never an exception), ``predict_arrays`` / ``predict_bytes`` / ``predict_paths`` /
``predict_decoded``, the report, and the read-policy limit a service applies. The batch runner
(:mod:`~imgtriage.predict.batch`), the HTTP service, Ray and Celery take a :class:`BasePredictor`.

Example:
    >>> from imgtriage.predict import Predictor
    >>> p = Predictor.load("runs/digits/bundle")  # doctest: +SKIP
    >>> entries = p.decode_bytes([open("a.png", "rb").read()], ["a.png"])  # doctest: +SKIP
    >>> p.predict_decoded(entries)[0]["class"]  # doctest: +SKIP
    '3'
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgtriage.bundle import Bundle
from imgtriage.data.preprocess import PreprocessSpec, load_record
from imgtriage.errors import ImageReadError, PredictionError
from imgtriage.evaluate.decision import DecisionPolicy, Decisions
from imgtriage.io import Defect, ImageRecord, read_array
from imgtriage.predict.report import meta_flags, report_meta, result_row

if TYPE_CHECKING:
    from imgtriage.predict.backends import RuntimeChoice

Source = str | os.PathLike[str] | bytes


def _opt(default: Any, help: str) -> Any:
    """A per-call option with its ``imgtriage predict`` help (``cli/_options.py``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PredictOptions:
    """Per-call options; None means "what the bundle says". ``imgtriage predict`` has one
    option per field (``thresholds`` is parsed there against the class count)."""

    include_probs: bool = _opt(False, "Add every class probability to each result.")
    topk: int | None = _opt(None, "Add the top-k classes with scores to each result.")
    tta: bool = _opt(False, "Test-time augmentation with the bundle's flip/rotation policy.")
    temperature: float | None = _opt(None, "Override the bundle's temperature.")
    thresholds: tuple[float, ...] | None = None
    abstain: bool | None = _opt(None, "Override whether low scores are answered 'unknown'.")
    profile: str | None = _opt(None, "A decision profile saved in the bundle (e.g. precision, "
                                     "recall).")


@dataclass(frozen=True)
class Decoded:
    """One input read and prepared by its kind's :class:`Decoder`, ready to join a batch.

    ``x`` is what the kind's ``rows`` needs: the preprocessed array for a classifier, the
    decoded record and its first-stage input for a cascade. ``meta`` is the record's metadata.
    """

    name: str
    x: Any
    meta: dict[str, Any]


Entry = Decoded | dict[str, Any]
"""A decoded input, or a defect dict ``{path, issue, message}``."""


@dataclass(frozen=True)
class Decoder(ABC):
    """Turns one file, upload or in-memory array into a :class:`Decoded` input.

    Small and picklable (it holds specs, never a model), so it runs on decode threads,
    in decode processes and in Ray workers. Raises :class:`~imgtriage.errors.ImageReadError`
    for an unreadable input; :func:`decode_entry` turns that into a defect dict.
    """

    spec: PreprocessSpec

    @abstractmethod
    def from_record(self, record: ImageRecord, name: str) -> Decoded:
        """What this kind makes of a decoded image."""

    def __call__(self, source: Source, name: str | None = None) -> Decoded:
        shown = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
        return self.from_record(load_record(source, self.spec, name=name), shown)

    def from_array(self, array: Any, name: str) -> Decoded:
        return self.from_record(read_array(array, policy=self.spec.read, name=name), name)


def decode_entry(decoder: Decoder, source: Source, name: str | None = None,
                 *, array: bool = False) -> Entry:
    """The defect path, written once: a :class:`Decoded` input, or the defect dict saying why
    not. Nothing an input does raises out of here (a decoder bug is one bad input too)."""
    shown = name if name is not None else (
        os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        return decoder.from_array(source, shown) if array else decoder(source, name)
    except ImageReadError as exc:
        return exc.defect.to_dict()
    except Exception as exc:  # a decoder bug must not stop a run of millions of files
        return Defect(shown, "decode_error", f"{type(exc).__name__}: {exc}").to_dict()


def is_defect(entry: dict[str, Any] | Decoded) -> bool:
    """A defect dict (``issue`` and no ``class``), as opposed to a result row or an input."""
    return isinstance(entry, dict) and "issue" in entry and "class" not in entry


def decision_rows(names: Sequence[str], classes: Sequence[str], d: Decisions,
                  policy: DecisionPolicy, opts: PredictOptions,
                  metas: Sequence[dict[str, Any]] | None = None, *,
                  abstained: np.ndarray | None = None,
                  extras: Sequence[dict[str, Any]] | None = None,
                  topk_extra: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Result rows from a policy's decisions, built in this one place for every kind.

    ``abstained`` overrides the policy's abstentions (a gallery adds its similarity rule);
    ``extras`` adds keys per row (``stage``, ``similarity``); ``topk_extra`` adds a value per
    class to each top-k entry (``similarity``). ``probs``, ``score`` and the top-k scores are
    the reported probabilities (:meth:`DecisionPolicy.probabilities`); the top-k classes come
    in the order the rule ranks them (:meth:`DecisionPolicy.decision_probabilities`), so the
    first is the rule's argmax also under a prior correction.
    """
    abst = d.abstained if abstained is None else abstained
    ranking = d.probs if d.decision_probs is None else d.decision_probs
    rows = []
    for i, name in enumerate(names):
        cid = int(d.class_id[i])
        probs = ({c: round(float(p), 6) for c, p in zip(classes, d.probs[i], strict=True)}
                 if opts.include_probs else None)
        topk = None
        if opts.topk:
            topk = [{"class": classes[j], "class_id": int(j),
                     "score": round(float(d.probs[i, j]), 6),
                     **{k: round(float(v[i, j]), 6) for k, v in (topk_extra or {}).items()}}
                    for j in np.argsort(-ranking[i])[: opts.topk]]
        pred_set = [classes[j] for j in d.sets[i]] if d.sets is not None else None
        flags = meta_flags(metas[i]) if metas else None
        rows.append(result_row(name, policy.unknown_label if abst[i] else classes[cid], cid,
                               d.score[i], bool(abst[i]), probs=probs, topk=topk,
                               pred_set=pred_set, flags=flags,
                               extra=extras[i] if extras is not None else None,
                               best_class=classes[cid],
                               reason=d.reason[i] if d.reason else None))
    return rows


class BasePredictor(ABC):
    """The contract every predictor kind implements; see the module docstring.

    Attributes every kind sets: ``bundle``, ``classes`` (output order), ``spec`` (the
    preprocessing its decoder reads with), ``policy`` (the bundle's decision rule),
    ``backend`` (``name``, ``batch_size``) and ``runtime`` (what runs, and why).
    """

    bundle: Bundle
    classes: list[str]
    spec: PreprocessSpec
    policy: DecisionPolicy
    backend: Any
    runtime: RuntimeChoice
    options_type: type[PredictOptions] = PredictOptions

    # -- what each kind implements --------------------------------------------------------
    @property
    @abstractmethod
    def decoder(self) -> Decoder:
        """This kind's decoder, for the current ``spec`` (read policy included)."""

    @abstractmethod
    def rows(self, batch: Sequence[Decoded], opts: PredictOptions) -> list[dict[str, Any]]:
        """One result row (or defect dict) per decoded input, in order."""

    @abstractmethod
    def policy_for(self, opts: PredictOptions) -> DecisionPolicy:
        """The decision rule for these options (profile and overrides applied)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What a client needs to know about the model (the service's GET /v1/model)."""

    def report_extra(self, results: list[dict[str, Any]], opts: PredictOptions
                     ) -> dict[str, Any]:
        """Keys this kind adds to the report's ``meta``: what runs (backend, precision,
        threads, why) and the kind's own blocks."""
        return self.runtime.to_dict()

    # -- written once ---------------------------------------------------------------------
    @property
    def bundle_sha256(self) -> str:
        return self.bundle.sha256

    @property
    def batch_size(self) -> int:
        """The backend's preferred batch (ONNX 16 for big CNNs, 64 for small; torch 32)."""
        return int(getattr(self.backend, "batch_size", 32) or 32)

    def options(self, opts: PredictOptions | dict[str, Any] | None = None, **given: Any
                ) -> PredictOptions:
        """Per-call options of this kind, from keywords (or passed through)."""
        if isinstance(opts, PredictOptions):
            return opts
        return self.options_type(**{**(opts or {}), **given})

    def with_read_policy(self, **changes: Any) -> BasePredictor:
        """A shallow copy (sharing the loaded model) whose decoder reads with a changed read
        policy, e.g. ``max_pixels`` (the service's limit)."""
        out = copy.copy(self)
        out.spec = dataclasses.replace(self.spec,
                                       read=dataclasses.replace(self.spec.read, **changes))
        return out

    def decode_bytes(self, items: Sequence[bytes],
                     names: Sequence[str] | None = None) -> list[Entry]:
        """Read and prepare each encoded item (uploads): one :class:`Decoded` or defect dict
        per item, in order. A service runs this on decode threads as uploads arrive, while the
        model runs the previous batch; :meth:`predict_decoded` then classifies."""
        if isinstance(items, bytes | bytearray | memoryview):  # one file's bytes, not a list
            items = [bytes(items)]
        names = _names(items, names, "upload")
        decoder = self.decoder
        return [decode_entry(decoder, b, n) for b, n in zip(items, names, strict=True)]

    def decode_arrays(self, arrays: Sequence[Any],
                      names: Sequence[str] | None = None) -> list[Entry]:
        """In-memory images (any numeric dtype, (H, W) or (H, W, C)) through the same last
        step as a file read; an array of unusable shape becomes a ``bad_shape`` defect."""
        names = _names(arrays, names, "array")
        decoder = self.decoder
        return [decode_entry(decoder, a, n, array=True)
                for a, n in zip(arrays, names, strict=True)]

    def predict_entries(self, entries: Sequence[Entry], opts: PredictOptions
                        ) -> list[dict[str, Any]]:
        """Rows for decoded entries; defect dicts pass through in place."""
        out: list[Any] = list(entries)
        idx = [i for i, e in enumerate(entries) if isinstance(e, Decoded)]
        if idx:
            for i, row in zip(idx, self.rows([out[i] for i in idx], opts), strict=True):
                out[i] = row
        return out

    def predict_decoded(self, entries: Sequence[Entry], **options: Any) -> list[dict[str, Any]]:
        """The second half of :meth:`predict_bytes`: one batch through the model.

        ``entries`` come from :meth:`decode_bytes` (possibly of several calls, concatenated);
        defect dicts pass through in place, each :class:`Decoded` becomes a result row.
        """
        return self.predict_entries(entries, self.options(**options))

    def predict_bytes(self, items: Sequence[bytes], names: Sequence[str] | None = None,
                      **options: Any) -> list[dict[str, Any]]:
        """Encoded files in memory (uploads) -> one entry per item, in order: a result row,
        or a defect dict ``{path, issue, message}``; never raises for one bad item."""
        return self.predict_entries(self.decode_bytes(items, names), self.options(**options))

    def predict_arrays(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None,
                       **options: Any) -> list[dict[str, Any]]:
        """Decoded images -> one entry per array, in order: a result row, or a defect dict
        (with ``issue``) for an array of unusable shape. Arrays carry no header: header
        features count as missing (imputed and flagged)."""
        return self.predict_entries(self.decode_arrays(arrays, names), self.options(**options))

    def predict_paths(self, paths: Iterable[str | os.PathLike[str]], *,
                      batch_size: int | None = None, workers: int | None = None,
                      progress: bool = False, **options: Any) -> dict[str, Any]:
        """Files and folders (walked recursively) -> the report dict (meta, results, defects).

        Every file appears exactly once, in ``results`` or in ``defects``, and is decoded once,
        in worker threads while the previous batch runs. ``batch_size`` None uses the
        backend's preferred batch. The report is built in memory: for runs over millions of
        files use :func:`imgtriage.predict.runner.run_batch` (a store and a streamed output).

        Example:
            >>> p.predict_paths(["inbox/"], temperature=1.5, abstain=True)  # doctest: +SKIP
        """
        from imgtriage.predict.batch import iter_predictions

        opts = self.options(**options)
        batch_size = batch_size or self.batch_size
        t0 = time.perf_counter()
        results, defects = [], []
        seen: set[str] = set()

        def again(path: str) -> bool:  # one file named twice (dir and /abs/dir): once
            key = os.path.abspath(path)
            if key in seen:
                return True
            seen.add(key)
            return False

        for kind, item in iter_predictions(self, paths, batch_size=batch_size, opts=opts,
                                           workers=workers, progress=progress, skip=again):
            (results if kind == "result" else defects).append(item)
        return self.make_report(results, defects, time.perf_counter() - t0, batch_size, opts)

    def make_report(self, results: list[dict[str, Any]], defects: list[dict[str, Any]],
                    elapsed: float, batch_size: int, opts: PredictOptions | dict[str, Any]
                    ) -> dict[str, Any]:
        """The report dict: ``meta`` (which model and rule produced it), results, defects."""
        opts = self.options(opts)
        policy = self.policy_for(opts)
        meta = report_meta(bundle_path=str(Path(self.bundle.path)),
                           bundle_sha256=self.bundle_sha256, decision=policy.to_dict(),
                           classes=self.classes, batch_size=batch_size,
                           num_files=len(results) + len(defects), n_results=len(results),
                           n_abstained=sum(r["abstained"] for r in results),
                           elapsed_sec=elapsed, tta=opts.tta,
                           extra=self.report_extra(results, opts))
        return {"meta": meta, "results": results, "defects": defects}


def _names(items: Sequence[Any], names: Sequence[str] | None, kind: str) -> list[str]:
    """One name per item: the given ones (as many as the items) or ``kind[i]``."""
    if names is None:
        return [f"{kind}[{i}]" for i in range(len(items))]
    names = [names] if isinstance(names, str) else list(names)
    if len(names) != len(items):
        raise PredictionError(f"{len(items)} item(s) but {len(names)} name(s); give one name "
                              "per item (names=[...]) or none")
    return names
