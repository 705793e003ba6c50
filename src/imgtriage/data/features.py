"""Image-statistics and header features: cheap, fixed-length, and scaled exactly as in training.

Three steps, each reusable on its own (the cascade's first stage and the image + feature
fusion model both use them):

1. :func:`raw_features` reads one decoded :class:`~imgtriage.io.ImageRecord` (plus optional
   extra CSV values) into numbers and strings: per-channel moments, percentiles, skewness,
   kurtosis, saturation, entropy, speckle/texture statistics and geometry, computed on a
   strided copy (never more than ``max_side`` pixels a side), and the FITS header cards of
   the :class:`FeatureSpec` (``EXPTIME``, ``IMAGETYP``/``OBSTYPE``, ``FILTER``, binning,
   CCD temperature by default).
2. :func:`extract_features` / :func:`encode` turn those into a float64 vector and a
   ``missing`` mask: numeric cards as floats (NaN when absent), string cards one-hot over a
   small vocabulary plus an ``=__other__`` column.
3. :class:`FeatureStandardizer`, fitted on the training split only, learns that vocabulary,
   imputes every missing value with the training median, appends an explicit
   ``<name>__missing`` indicator per card (never a silent zero) and standardises. It
   serialises to JSON (``to_dict``/``from_dict``), so a bundle carries it without pickle.

Example:
    >>> import numpy as np
    >>> from imgtriage.io import ImageRecord
    >>> rec = ImageRecord(np.full((8, 8), 7, np.uint8), {"header": {"EXPTIME": 30.0}})
    >>> spec = FeatureSpec(stats=("moments",))
    >>> fx = FeatureStandardizer(spec).fit([raw_features(rec, spec)] * 3)
    >>> "EXPTIME__missing" in fx.feature_names_, fx.transform([raw_features(rec, spec)]).shape
    (True, (1, 15))
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imgtriage.data._image_stats import STAT_GROUPS, image_stats, stat_names
from imgtriage.errors import ConfigError, DataError
from imgtriage.io import ImageRecord

FieldKind = Literal["number", "category"]
OTHER = "__other__"
MISSING_SUFFIX = "__missing"
_NA_STRINGS = frozenset({"", "na", "n/a", "nan", "none", "null"})


@dataclass(frozen=True)
class FieldSpec:
    """One header card or extra column: its feature ``name``, the ``keys`` to look up (first
    present wins, e.g. ``("IMAGETYP", "OBSTYPE")``) and whether it is a number or a category.

    Example:
        >>> FieldSpec("CCD-TEMP", ("CCD-TEMP", "CCDTEMP")).kind
        'number'
    """

    name: str
    keys: tuple[str, ...] = ()
    kind: FieldKind = "number"

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys) or (self.name,))
        if self.kind not in ("number", "category"):
            raise ConfigError(f"field {self.name!r}: kind must be 'number' or 'category', "
                              f"got {self.kind!r}")
        if not self.name or MISSING_SUFFIX in self.name or "=" in self.name:
            raise ConfigError(f"field name {self.name!r} must be non-empty and contain neither "
                              f"'=' nor {MISSING_SUFFIX!r}")


DEFAULT_HEADER_CARDS = (
    FieldSpec("EXPTIME", ("EXPTIME", "EXPOSURE", "EXP_TIME")),
    FieldSpec("IMAGETYP", ("IMAGETYP", "OBSTYPE", "FRAMETYP"), "category"),
    FieldSpec("FILTER", ("FILTER", "FILTER1", "FILTNAME"), "category"),
    FieldSpec("XBINNING", ("XBINNING", "BINX", "CCDXBIN")),
    FieldSpec("YBINNING", ("YBINNING", "BINY", "CCDYBIN")),
    FieldSpec("CCD-TEMP", ("CCD-TEMP", "CCDTEMP", "CCD_TEMP")),
)


def _as_field(f: FieldSpec | str | Mapping[str, Any]) -> FieldSpec:
    if isinstance(f, FieldSpec):
        return f
    if isinstance(f, str):
        return FieldSpec(f)
    return FieldSpec(f["name"], tuple(f.get("keys") or ()), f.get("kind", "number"))


@dataclass(frozen=True)
class FeatureSpec:
    """Which features to compute. Saved in bundles; the layout follows from it.

    Attributes:
        stats: statistic groups, any of ``moments, percentiles, shape, saturation, entropy,
            texture, geometry`` (``()`` for header features only).
        channels: channels the per-channel statistics use: 1 (the channel mean of colour
            images), 3 (gray images repeated), or the data's own band count.
        max_side: statistics are computed on every s-th pixel so that no side exceeds this.
        header_cards: FITS header cards (:class:`FieldSpec`, or a card name for a number).
        extra_columns: extra manifest columns (same forms) passed as ``extra`` per image.
        max_categories: most frequent training values of a category kept as one-hot columns;
            the rest share ``<name>=__other__``.

    Example:
        >>> len(FeatureSpec(channels=3, header_cards=()).stat_names())
        52
    """

    stats: tuple[str, ...] = STAT_GROUPS
    channels: int = 1
    max_side: int = 64
    header_cards: tuple[FieldSpec, ...] = DEFAULT_HEADER_CARDS
    extra_columns: tuple[FieldSpec, ...] = ()
    max_categories: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "stats", tuple(self.stats))
        object.__setattr__(self, "header_cards", tuple(_as_field(f) for f in self.header_cards))
        object.__setattr__(self, "extra_columns",
                           tuple(_as_field(f) for f in self.extra_columns))
        unknown = sorted(set(self.stats) - set(STAT_GROUPS))
        if unknown:
            raise ConfigError(f"unknown statistic groups {unknown}; choose from {STAT_GROUPS} "
                              "(--stats)")
        if self.channels < 1:
            raise ConfigError("feature channels must be >= 1 (--feature-channels)")
        if self.max_side < 2:
            raise ConfigError("max_side must be >= 2 pixels (--feature-max-side)")
        if self.max_categories < 0:
            raise ConfigError("max_categories must be >= 0")
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ConfigError(f"header cards and extra columns need distinct names, got {names}")

    @property
    def fields(self) -> tuple[FieldSpec, ...]:
        return self.header_cards + self.extra_columns

    def stat_names(self) -> list[str]:
        return stat_names(self.stats, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureSpec:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown feature-spec keys {sorted(unknown)}")
        return cls(**dict(d))


@dataclass(frozen=True)
class RawFeatures:
    """One image's statistics (float64) and field values (float, str or None = missing)."""

    stats: np.ndarray
    fields: tuple[float | str | None, ...]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and value.strip().lower() not in _NA_STRINGS:
        try:
            out = float(value.strip())
        except ValueError:
            return None
        return out if math.isfinite(out) else None
    return None


def _category(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in _NA_STRINGS else text


def _lookup(sources: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> Any:
    for src in sources:
        for key in keys:
            if key in src and src[key] is not None:
                return src[key]
    return None


def raw_features(record: ImageRecord, spec: FeatureSpec,
                 extra: Mapping[str, Any] | None = None, *, path: str = "<array>"
                 ) -> RawFeatures:
    """Statistics and field values of one decoded image, before encoding and scaling.

    Header cards are looked up in ``meta["header"]`` then ``meta["primary_header"]`` (FITS
    extensions); extra columns in ``extra``. Raises ImageReadError (``bad_shape``) when the
    image's channels cannot map onto ``spec.channels``.

    Example:
        >>> rec = ImageRecord(np.zeros((4, 4), np.uint8), {"header": {"FILTER": " V "}})
        >>> raw_features(rec, FeatureSpec(stats=())).fields
        (None, None, 'V', None, None, None)
    """
    stats = image_stats(record.array, record.meta, spec.stats, spec.channels, spec.max_side,
                        path) if spec.stats else np.zeros(0)
    meta = record.meta or {}
    header = [meta.get("header") or {}, meta.get("primary_header") or {}]
    values: list[float | str | None] = []
    for f in spec.header_cards:
        raw = _lookup(header, f.keys)
        values.append(_number(raw) if f.kind == "number" else _category(raw))
    for f in spec.extra_columns:
        raw = _lookup([extra or {}], f.keys)
        values.append(_number(raw) if f.kind == "number" else _category(raw))
    return RawFeatures(np.asarray(stats, np.float64), tuple(values))


def with_extra_columns(raw: RawFeatures, spec: FeatureSpec, extra: Mapping[str, Any] | None
                       ) -> RawFeatures:
    """``raw`` with its extra-column values read from ``extra`` (a manifest row); header
    cards and statistics stay as they are. Columns absent from ``extra`` stay missing.

    Example:
        >>> spec = FeatureSpec(stats=(), header_cards=(), extra_columns=("airmass",))
        >>> with_extra_columns(RawFeatures(np.zeros(0), (None,)), spec, {"airmass": "1.2"}).fields
        (1.2,)
    """
    n = len(spec.header_cards)
    values = list(raw.fields[:n])
    for f in spec.extra_columns:
        value = _lookup([extra or {}], f.keys)
        values.append(_number(value) if f.kind == "number" else _category(value))
    return RawFeatures(raw.stats, tuple(values))


def column_groups(spec: FeatureSpec, vocabulary: Mapping[str, Sequence[str]] | None = None
                  ) -> list[tuple[str, list[str]]]:
    """``[(source, column names)]``: ``"stats"`` first, then one group per field."""
    vocab = vocabulary or {}
    groups = [("stats", spec.stat_names())]
    for f in spec.fields:
        if f.kind == "number":
            groups.append((f.name, [f.name]))
        else:
            groups.append((f.name, [f"{f.name}={v}" for v in vocab.get(f.name, ())]
                           + [f"{f.name}={OTHER}"]))
    return groups


def encode(raw: RawFeatures, spec: FeatureSpec,
           vocabulary: Mapping[str, Sequence[str]] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """``(values, missing)`` aligned with :func:`column_groups`; missing values are NaN."""
    vocab = vocabulary or {}
    stats = np.asarray(raw.stats, np.float64)
    parts, masks = [stats], [~np.isfinite(stats)]
    for f, value in zip(spec.fields, raw.fields, strict=True):
        if f.kind == "number":
            parts.append(np.array([np.nan if value is None else float(value)]))
            masks.append(np.array([value is None]))
            continue
        words = list(vocab.get(f.name, ()))
        onehot = np.zeros(len(words) + 1)
        if value is not None:
            onehot[words.index(value) if value in words else len(words)] = 1.0
        else:
            onehot[:] = np.nan
        parts.append(onehot)
        masks.append(np.full(len(onehot), value is None))
    values = np.concatenate(parts)
    missing = np.concatenate(masks)
    values[missing] = np.nan
    return values, missing


def extract_features(record: ImageRecord, spec: FeatureSpec,
                     extra: Mapping[str, Any] | None = None, *,
                     vocabulary: Mapping[str, Sequence[str]] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One image -> ``(values float64, missing bool)``, unscaled; pass a fitted
    standardizer's ``vocabulary_`` to get its one-hot layout.

    Example:
        >>> rec = ImageRecord(np.zeros((4, 4), np.uint8), {})
        >>> v, m = extract_features(rec, FeatureSpec(stats=("moments",), header_cards=("GAIN",)))
        >>> v.tolist()[:2], m.tolist()
        ([0.0, 0.0], [False, False, True])
    """
    return encode(raw_features(record, spec, extra), spec, vocabulary)


def _learn_vocabulary(spec: FeatureSpec, raws: Sequence[RawFeatures]) -> dict[str, list[str]]:
    vocab = {}
    for i, f in enumerate(spec.fields):
        if f.kind == "category":
            counts = Counter(r.fields[i] for r in raws if r.fields[i] is not None)
            ranked = sorted(counts, key=lambda v: (-counts[v], v))
            vocab[f.name] = ranked[: spec.max_categories]
    return vocab


class FeatureStandardizer:
    """Vocabulary, median imputation, ``__missing`` indicators and standardisation, fitted on
    the training split only and stored as JSON.

    Output columns are ``feature_names_``: the encoded columns of :func:`column_groups`
    (missing values replaced by the training median), then one ``<field>__missing`` column
    per header card / extra column and ``stats__missing`` (a statistic that was not finite),
    all standardised with the training mean and std (std 1 for constant columns).

    Example:
        >>> spec = FeatureSpec(stats=(), header_cards=("EXPTIME",))
        >>> raws = [RawFeatures(np.zeros(0), (t,)) for t in (10.0, 20.0, None)]
        >>> fx = FeatureStandardizer(spec).fit(raws)
        >>> fx.feature_names_, fx.medians_.tolist()
        (['EXPTIME', 'EXPTIME__missing', 'stats__missing'], [15.0])
    """

    def __init__(self, spec: FeatureSpec | None = None) -> None:
        self.spec = spec

    def _spec(self) -> FeatureSpec:
        return self.spec if self.spec is not None else FeatureSpec()

    def fit(self, raws: Sequence[RawFeatures]) -> FeatureStandardizer:
        """Learn everything from the training rows ``raws`` (never from validation/test)."""
        if not raws:
            raise DataError("cannot fit features on zero training images")
        spec = self._spec()
        self.vocabulary_ = _learn_vocabulary(spec, raws)
        values, missing = self._encode_many(raws)
        self.medians_ = np.array([float(np.median(values[~missing[:, j], j]))
                                  if (~missing[:, j]).any() else 0.0
                                  for j in range(values.shape[1])])
        full = self._complete(values, missing)
        self.mean_ = full.mean(axis=0)
        std = full.std(axis=0)
        self.std_ = np.where(std > 1e-12, std, 1.0)
        self.feature_names_ = [n for _, names in column_groups(spec, self.vocabulary_)
                               for n in names] + self._indicator_names()
        return self

    def _indicator_names(self) -> list[str]:
        return [f"{f.name}{MISSING_SUFFIX}" for f in self._spec().fields] + ["stats__missing"]

    def _encode_many(self, raws: Sequence[RawFeatures]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [encode(r, self._spec(), self.vocabulary_) for r in raws]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def _complete(self, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Impute with training medians and append the per-source missing indicators."""
        filled = np.where(missing, self.medians_, values)
        groups = column_groups(self._spec(), self.vocabulary_)
        starts = np.cumsum([0] + [len(names) for _, names in groups])
        flags = [missing[:, starts[i]:starts[i + 1]].any(axis=1) for i in range(len(groups))]
        indicators = np.stack(flags[1:] + flags[:1], axis=1).astype(np.float64)
        return np.concatenate([filled, indicators], axis=1)

    def transform_arrays(self, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Scale ``(values, missing)`` rows from :func:`encode` with this fit's vocabulary."""
        if not hasattr(self, "mean_"):
            raise ConfigError("FeatureStandardizer is not fitted; call fit() on training rows")
        values = np.atleast_2d(np.asarray(values, np.float64))
        missing = np.atleast_2d(np.asarray(missing, bool))
        if values.shape[1] != len(self.medians_):
            raise ConfigError(f"{values.shape[1]} feature columns, but this standardizer was "
                              f"fitted on {len(self.medians_)}; encode with its vocabulary_")
        return (self._complete(values, missing) - self.mean_) / self.std_

    def transform(self, raws: Sequence[RawFeatures]) -> np.ndarray:
        """Standardised feature matrix (N, len(feature_names_)) for raw rows."""
        if not hasattr(self, "mean_"):
            raise ConfigError("FeatureStandardizer is not fitted; call fit() on training rows")
        if not raws:
            return np.zeros((0, len(self.mean_)))
        return self.transform_arrays(*self._encode_many(raws))

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "mean_"):
            raise ConfigError("FeatureStandardizer is not fitted; nothing to save")
        return {"spec": self._spec().to_dict(), "vocabulary": self.vocabulary_,
                "medians": self.medians_.tolist(), "mean": self.mean_.tolist(),
                "std": self.std_.tolist(), "feature_names": list(self.feature_names_)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureStandardizer:
        """Rebuild a fitted standardizer from :meth:`to_dict` output (checks the lengths)."""
        fx = cls(FeatureSpec.from_dict(d["spec"]))
        fx.vocabulary_ = {k: list(v) for k, v in d["vocabulary"].items()}
        fx.medians_ = np.asarray(d["medians"], np.float64)
        fx.mean_ = np.asarray(d["mean"], np.float64)
        fx.std_ = np.asarray(d["std"], np.float64)
        fx.feature_names_ = list(d["feature_names"])
        n_cols = sum(len(n) for _, n in column_groups(fx._spec(), fx.vocabulary_))
        n_out = n_cols + len(fx._indicator_names())
        if (len(fx.medians_), len(fx.mean_), len(fx.std_), len(fx.feature_names_)) != (
                n_cols, n_out, n_out, n_out):
            raise ConfigError("stored feature standardizer is inconsistent with its spec "
                              "(column counts differ); the bundle is damaged")
        return fx


def read_extra_columns(manifest: str | os.PathLike[str], columns: Sequence[str]
                       ) -> dict[str, dict[str, str]]:
    """``{resolved path: {column: value}}`` from a CSV/JSONL manifest, for ``extra=``.

    Paths resolve like :func:`imgtriage.data.discover` resolves them (relative to the
    manifest's folder). Raises DataError when a column is absent from the manifest.

    Example:
        >>> extras = read_extra_columns("data/frames.csv", ["airmass"])  # doctest: +SKIP
    """
    from imgtriage.data.discovery import manifest_rows

    path = Path(manifest)
    out: dict[str, dict[str, str]] = {}
    for i, row in manifest_rows(path):  # read as discover reads it (BOM, ';', 'Path')
        absent = [c for c in columns if c not in row]
        if absent or "path" not in row:
            raise DataError(f"{path}:{i}: the row lacks columns {absent or ['path']}; add "
                            "them or drop them from the feature spec's extra_columns")
        p = Path(row["path"])
        out[str(p if p.is_absolute() else path.parent / p)] = {c: row[c] for c in columns}
    return out


__all__ = [
    "DEFAULT_HEADER_CARDS",
    "STAT_GROUPS",
    "FeatureSpec",
    "FeatureStandardizer",
    "FieldSpec",
    "RawFeatures",
    "column_groups",
    "encode",
    "extract_features",
    "raw_features",
    "read_extra_columns",
    "with_extra_columns",
]
