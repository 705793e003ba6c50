"""What training an image + feature (fusion) model adds to a run: the feature spec from the
``--feature-*`` options, extra manifest columns, and the standardizer fitted on the training
split only.

The pixels and the raw features of each file come from one decode
(:func:`~imgtriage.data.preprocess.load_input` with ``PreprocessSpec.features``); the
standardizer learns its vocabulary, medians, mean and std from the training rows and is
saved in the bundle (``manifest["features"]``), so prediction scales exactly as training did.

Example:
    >>> from imgtriage.train.config import TrainConfig
    >>> spec = feature_spec(TrainConfig(model="fusion:crop_cnn", feature_cards="EXPTIME,"
    ...                                 "IMAGETYP", feature_stats="moments"), in_chans=1)
    >>> [(f.name, f.kind) for f in spec.header_cards]
    [('EXPTIME', 'number'), ('IMAGETYP', 'category')]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.data.features import (
    DEFAULT_HEADER_CARDS,
    STAT_GROUPS,
    FeatureSpec,
    FeatureStandardizer,
    FieldSpec,
    RawFeatures,
    read_extra_columns,
    with_extra_columns,
)
from imgtriage.data.loaders import LoadedSplit
from imgtriage.errors import ConfigError, DataError
from imgtriage.train.config import TrainConfig, flag

_DEFAULTS = {f.name: f for f in DEFAULT_HEADER_CARDS}


def _fields(text: str, option: str, defaults: dict[str, FieldSpec]) -> tuple[FieldSpec, ...]:
    """``"EXPTIME,IMAGETYP:category"`` -> FieldSpecs (known cards keep their aliases)."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, kind = item.partition(":")
        name, kind = name.strip(), kind.strip()
        if kind and kind not in ("number", "category"):
            raise ConfigError(f"{item!r}: the kind after ':' must be number or category "
                              f"({flag(option)})")
        base = defaults.get(name)
        if base is not None and not kind:
            out.append(base)
        else:
            out.append(FieldSpec(name, base.keys if base else (name,), kind or "number"))
    return tuple(out)


def feature_spec(cfg: TrainConfig, in_chans: int) -> FeatureSpec:
    """The :class:`FeatureSpec` of the ``--feature-cards/--feature-stats/--feature-columns``
    options; per-channel statistics on 3 channels for RGB inputs, else on one."""
    cards_text = cfg.feature_cards.strip()
    if cards_text.lower() == "default":
        cards: tuple[FieldSpec, ...] = DEFAULT_HEADER_CARDS
    elif cards_text.lower() in ("", "none"):
        cards = ()
    else:
        cards = _fields(cards_text, "feature_cards", _DEFAULTS)
    stats_text = cfg.feature_stats.strip().lower()
    if stats_text == "all":
        stats: tuple[str, ...] = STAT_GROUPS
    elif stats_text in ("", "none"):
        stats = ()
    else:
        stats = tuple(s.strip() for s in stats_text.split(",") if s.strip())
        unknown = sorted(set(stats) - set(STAT_GROUPS))
        if unknown:
            raise ConfigError(f"unknown statistic groups {unknown}; choose from "
                              f"{', '.join(STAT_GROUPS)}, all or none ({flag('feature_stats')})")
    columns = _fields(cfg.feature_columns, "feature_columns", {})
    if not cards and not stats and not columns:
        raise ConfigError("a fusion model needs at least one feature: give --feature-cards, "
                          "--feature-stats or --feature-columns")
    return FeatureSpec(stats=stats, channels=3 if in_chans == 3 else 1, header_cards=cards,
                       extra_columns=columns)


def manifest_extras(data: str | os.PathLike[str], spec: FeatureSpec
                    ) -> dict[str, dict[str, str]]:
    """Extra-column values by resolved file path, read from the manifest given as DATA."""
    if not spec.extra_columns:
        return {}
    path = Path(data)
    if not (path.is_file() and path.suffix.lower() in (".csv", ".jsonl")):
        raise ConfigError(f"--feature-columns reads columns of a CSV/JSONL manifest, but DATA "
                          f"{path} is not one; train from a manifest or drop the option")
    keys = sorted({k for f in spec.extra_columns for k in f.keys})
    return read_extra_columns(path, keys)


def _rows(split: LoadedSplit, spec: FeatureSpec, extras: dict[str, dict[str, str]]
          ) -> list[RawFeatures]:
    if len(split.raw) != len(split.samples):
        raise DataError("decoded split carries no raw features; decode with a PreprocessSpec "
                        "whose features are set")
    if not spec.extra_columns:
        return list(split.raw)
    return [with_extra_columns(r, spec, extras.get(str(Path(s.path))) or extras.get(s.path))
            for r, s in zip(split.raw, split.samples, strict=True)]


def fit_features(spec: FeatureSpec, train: LoadedSplit, others: Sequence[LoadedSplit],
                 extras: dict[str, dict[str, str]] | None = None
                 ) -> tuple[FeatureStandardizer, list[np.ndarray]]:
    """Fit the standardizer on ``train`` only; return it with the scaled float32 feature
    matrices of ``train`` and each of ``others`` (in that order)."""
    extras = extras or {}
    fx = FeatureStandardizer(spec).fit(_rows(train, spec, extras))
    mats = [fx.transform(_rows(s, spec, extras)).astype(np.float32)
            if len(s.samples) else np.zeros((0, len(fx.feature_names_)), np.float32)
            for s in (train, *others)]
    return fx, mats


def fit_streamed_features(spec: FeatureSpec, samples: Sequence[Any], pre: Any,
                          extras: dict[str, dict[str, str]] | None = None,
                          workers: int | None = None) -> FeatureStandardizer:
    """Fit the standardizer on the training files' raw features without keeping any pixels
    (streamed fusion training): one decode per file, unreadable files left to the streaming
    source (which records them as defects)."""
    from concurrent.futures import ThreadPoolExecutor

    from imgtriage.data.features import raw_features
    from imgtriage.data.preprocess import load_record
    from imgtriage.errors import ImageReadError

    extras = extras or {}

    def one(s: Any) -> RawFeatures | None:
        try:
            raw = raw_features(load_record(s.path, pre), spec, path=s.path)
        except ImageReadError:
            return None
        if spec.extra_columns:
            raw = with_extra_columns(raw, spec, extras.get(str(Path(s.path)))
                                     or extras.get(s.path))
        return raw

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        rows = [r for r in pool.map(one, samples) if r is not None]
    if not rows:
        raise DataError("no training file could be read to fit the feature scaler")
    return FeatureStandardizer(spec).fit(rows)


def summary(fx: FeatureStandardizer) -> dict[str, Any]:
    """What the run log says about the features: how many, and how many cards were missing."""
    return {"num_features": len(fx.feature_names_),
            "cards": [f.name for f in fx._spec().header_cards],
            "extra_columns": [f.name for f in fx._spec().extra_columns]}
