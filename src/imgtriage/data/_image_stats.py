"""Cheap image statistics on a strided copy: moments, percentiles, entropy, texture, geometry.

Everything here is NumPy only and works on any dtype the readers return. Integer images are
scaled by their dtype's range (so a uint8 and a uint16 frame of the same scene agree), float
images keep their physical units. Used by :mod:`imgtriage.data.features`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from imgtriage.errors import ImageReadError
from imgtriage.io import Defect

STAT_GROUPS = ("moments", "percentiles", "shape", "saturation", "entropy", "texture",
               "geometry")
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_PER_CHANNEL = {
    "moments": ("mean", "std"),
    "percentiles": tuple(f"p{q}" for q in PERCENTILES),
    "shape": ("skew", "kurtosis"),
    "saturation": ("saturated",),
    "entropy": ("entropy",),
}
_WHOLE_IMAGE = {
    "texture": ("cv", "local_var_ratio", "grad_mean", "grad_ratio", "glcm_contrast",
                "glcm_homogeneity"),
    "geometry": ("log2_height", "log2_width", "log_aspect", "bit_depth", "is_float",
                 "channels", "chroma"),
}
_GLCM_LEVELS = 16
_HIST_BINS = 256


def stat_names(groups: tuple[str, ...], channels: int) -> list[str]:
    """Column names of :func:`image_stats` for these groups, in output order.

    Example:
        >>> stat_names(("moments",), 2)
        ['c0_mean', 'c0_std', 'c1_mean', 'c1_std']
    """
    names = [f"c{c}_{n}" for c in range(channels) for g in STAT_GROUPS if g in groups
             for n in _PER_CHANNEL.get(g, ())]
    return names + [n for g in STAT_GROUPS if g in groups for n in _WHOLE_IMAGE.get(g, ())]


def strided(array: np.ndarray, max_side: int) -> np.ndarray:
    """Every s-th pixel so the longer side is at most ``max_side`` (no interpolation: the
    pixel distribution, saturation and speckle survive; a view, no copy)."""
    step = max(1, math.ceil(max(array.shape[:2]) / max_side))
    return array[::step, ::step]


def _color_channels(a: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """(h, w, C) without a trailing alpha channel (LA, RGBA; by the reader's ``meta["alpha"]``
    where it says, so the 4th band of a multispectral TIFF stays)."""
    return a[..., :-1] if meta.get("alpha", a.shape[2] in (2, 4)) else a


def _to_float(a: np.ndarray) -> np.ndarray:
    """Integers scaled by their dtype range to [0, 1] (float32 is exact enough for 16-bit);
    floats keep their units, in float64 so large physical values cannot overflow."""
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        dtype = np.float32 if a.dtype.itemsize <= 2 else np.float64
        return ((a.astype(dtype) - dtype(info.min)) / dtype(info.max - info.min))
    return a.astype(np.float64)


def _match(x: np.ndarray, channels: int, path: str) -> np.ndarray:
    c = x.shape[2]
    if c == channels:
        return x
    if c == 1:
        return np.repeat(x, channels, axis=2)
    if channels == 1:
        return _plane_mean(x)[..., None]
    raise ImageReadError(Defect(path, "bad_shape",
                                f"image has {c} channels but the feature spec takes {channels}; "
                                f"set FeatureSpec(channels={c}) or 1 (channel mean)"))


def _saturated(a: np.ndarray) -> np.ndarray:
    """Per channel: share of pixels at the dtype maximum (integers) or the image maximum."""
    flat = a.reshape(-1, a.shape[2])
    top = np.iinfo(a.dtype).max if np.issubdtype(a.dtype, np.integer) else flat.max(axis=0)
    return (flat == top).mean(axis=0)


def _entropy(x: np.ndarray, fixed_range: bool) -> np.ndarray:
    """Shannon entropy (bits) of a 256-bin histogram per channel; [0, 1] for scaled integers,
    each channel's own min..max for floats."""
    flat = x.reshape(-1, x.shape[2])
    lo = np.zeros(flat.shape[1]) if fixed_range else flat.min(axis=0)
    hi = np.ones(flat.shape[1]) if fixed_range else flat.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    idx = np.clip(((flat - lo) / span * _HIST_BINS).astype(np.int64), 0, _HIST_BINS - 1)
    idx += np.arange(flat.shape[1]) * _HIST_BINS
    counts = np.bincount(idx.ravel(), minlength=_HIST_BINS * flat.shape[1])
    out = np.zeros(flat.shape[1])
    for c, row in enumerate(counts.reshape(flat.shape[1], _HIST_BINS)):
        p = row[row > 0] / len(flat)
        out[c] = -float(p @ np.log2(p))
    return out


def _per_channel(x: np.ndarray, saturated: np.ndarray, groups: tuple[str, ...],
                 fixed_range: bool) -> np.ndarray:
    """(C, k) per-channel statistics in the order of ``stat_names``."""
    flat = x.reshape(-1, x.shape[2])
    mean = flat.mean(axis=0, dtype=np.float64)
    d = flat - mean.astype(flat.dtype)
    d2 = d * d
    var = d2.mean(axis=0, dtype=np.float64)
    std = np.sqrt(var)
    cols: list[np.ndarray] = []
    if "moments" in groups:
        cols += [mean, std]
    if "percentiles" in groups:
        cols += list(_percentiles(flat))
    if "shape" in groups:
        safe = np.where(var > 0, var, 1.0)
        skew = (d2 * d).mean(axis=0, dtype=np.float64) / safe ** 1.5
        kurt = (d2 * d2).mean(axis=0, dtype=np.float64) / safe ** 2 - 3.0 * (var > 0)
        cols += [skew, kurt]
    if "saturation" in groups:
        cols.append(saturated)
    if "entropy" in groups:
        cols.append(_entropy(x, fixed_range))
    return np.stack(cols, axis=1) if cols else np.zeros((x.shape[2], 0))


def _per_channel_u8(raw: np.ndarray, groups: tuple[str, ...]) -> np.ndarray:
    """:func:`_per_channel` of an 8-bit image from one 256-bin histogram per channel (a
    fraction of the cost on small images): the moments, percentiles, saturation and entropy
    of uint8 values are exact functions of their counts (the fixed-range entropy bins *are*
    the 256 values)."""
    c = raw.shape[2]
    flat = raw.reshape(-1, c)
    n = len(flat)
    idx = flat.astype(np.intp) + np.arange(c, dtype=np.intp) * _HIST_BINS
    counts = np.bincount(idx.ravel(), minlength=_HIST_BINS * c).reshape(c, _HIST_BINS)
    p = counts / n
    v = np.arange(_HIST_BINS, dtype=np.float64) / 255.0
    mean = p @ v
    d = v[None, :] - mean[:, None]
    d2 = d * d
    var = (p * d2).sum(axis=1)
    cols: list[np.ndarray] = []
    if "moments" in groups:
        cols += [mean, np.sqrt(var)]
    if "percentiles" in groups:
        cols += list(_percentiles_from_counts(counts, n))
    if "shape" in groups:
        safe = np.where(var > 0, var, 1.0)
        cols += [(p * d2 * d).sum(axis=1) / safe ** 1.5,
                 (p * d2 * d2).sum(axis=1) / safe ** 2 - 3.0 * (var > 0)]
    if "saturation" in groups:
        cols.append(p[:, -1])
    if "entropy" in groups:
        with np.errstate(divide="ignore", invalid="ignore"):
            cols.append(-np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1))
    return np.stack(cols, axis=1) if cols else np.zeros((c, 0))


def _percentiles_from_counts(counts: np.ndarray, n: int) -> np.ndarray:
    """:func:`_percentiles` of uint8 channels from their histograms: the k-th smallest value
    is the first bin whose running count exceeds k."""
    pos = np.asarray(PERCENTILES, np.float64) / 100.0 * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo)[:, None]
    cum = np.cumsum(counts, axis=1)
    s_lo = np.stack([np.searchsorted(row, lo, side="right") for row in cum], axis=1)
    s_hi = np.stack([np.searchsorted(row, hi, side="right") for row in cum], axis=1)
    return (s_lo * (1.0 - frac) + s_hi * frac) / 255.0


def _percentiles(flat: np.ndarray) -> np.ndarray:
    """(len(PERCENTILES), C) by linear interpolation, as ``np.percentile`` (one sort)."""
    s = np.sort(flat, axis=0)
    pos = np.asarray(PERCENTILES, np.float64) / 100.0 * (len(s) - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(s) - 1)
    frac = (pos - lo)[:, None]
    return s[lo].astype(np.float64) * (1.0 - frac) + s[hi].astype(np.float64) * frac


def _box3(g: np.ndarray) -> np.ndarray:
    """3x3 box mean over the interior (separable: three row shifts, three column shifts)."""
    rows = g[:-2] + g[1:-1] + g[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _texture(g: np.ndarray) -> list[float]:
    """Speckle and texture of a gray image: coefficient of variation, local/global variance,
    gradient magnitude (raw and per unit std), GLCM-like contrast and homogeneity."""
    mean, var = float(g.mean(dtype=np.float64)), float(g.var(dtype=np.float64))
    std = math.sqrt(var)
    cv = min(std / (abs(mean) + 1e-12), 100.0)
    if var > 0 and min(g.shape) >= 3:
        box = _box3(g)
        local_var = np.maximum(_box3(g * g) - box * box, 0.0)
        lvr = float(local_var.mean(dtype=np.float64)) / var
    else:
        lvr = 0.0
    if min(g.shape) > 1:
        dx, dy = np.diff(g, axis=1)[:-1], np.diff(g, axis=0)[:, :-1]
        grad = float(np.sqrt(dx * dx + dy * dy).mean(dtype=np.float64))
    else:
        grad = 0.0
    lo, hi = float(g.min()), float(g.max())
    q = np.zeros(g.shape, np.int64) if hi <= lo else np.clip(
        ((g - lo) / (hi - lo) * _GLCM_LEVELS).astype(np.int64), 0, _GLCM_LEVELS - 1)
    counts = (np.bincount(np.abs(np.diff(q, axis=1)).ravel(), minlength=_GLCM_LEVELS)
              + np.bincount(np.abs(np.diff(q, axis=0)).ravel(), minlength=_GLCM_LEVELS))
    share = counts / max(int(counts.sum()), 1)
    levels = np.arange(_GLCM_LEVELS, dtype=np.float64)
    contrast = float(share @ levels ** 2) / (_GLCM_LEVELS - 1) ** 2
    homogeneity = float(share @ (1.0 / (1.0 + levels))) if counts.sum() else 1.0
    return [cv, lvr, grad, grad / std if std > 0 else 0.0, contrast, homogeneity]


def _plane_mean(x: np.ndarray) -> np.ndarray:
    """The channel mean of (h, w, C) as a sum of planes (a reduction over a short last axis
    is several times slower)."""
    total = x[..., 0]
    for c in range(1, x.shape[2]):
        total = total + x[..., c]
    return total / x.shape[2] if x.shape[2] > 1 else total


def _geometry(array: np.ndarray, color: np.ndarray, meta: dict[str, Any]) -> list[float]:
    """Size and aspect of the original image (undoing JPEG draft scaling), bit depth, dtype
    kind, channel count and chroma (mean per-pixel max - min over the colour channels)."""
    scale = float(meta.get("jpeg_draft_scale") or 1)
    h, w = array.shape[0] * scale, array.shape[1] * scale
    bits = float(meta.get("bitspersample") or array.dtype.itemsize * 8)
    chroma = 0.0
    if color.shape[2] >= 3:  # elementwise over the three planes (a reduction over 3 is slow)
        r, g, b = color[..., 0], color[..., 1], color[..., 2]
        chroma = float((np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b))
                       .mean())
    return [math.log2(h), math.log2(w), math.log(w / h), bits,
            float(array.dtype.kind == "f"), float(array.shape[2] if array.ndim == 3 else 1),
            chroma]


def image_stats(array: np.ndarray, meta: dict[str, Any], groups: tuple[str, ...],
                channels: int, max_side: int, path: str = "<array>") -> np.ndarray:
    """The statistics named by :func:`stat_names`, float64, computed on a strided copy.

    Example:
        >>> img = np.arange(64, dtype=np.uint8).reshape(8, 8)
        >>> image_stats(img, {}, ("moments",), 1, 8).round(3).tolist()
        [0.124, 0.072]
    """
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise ImageReadError(Defect(path, "bad_shape", f"expected a 2-D image or (H, W, C), "
                                                       f"got shape {tuple(array.shape)}"))
    full = array if array.ndim == 3 else array[..., None]
    raw = _color_channels(strided(full, max_side), meta)
    x = _to_float(raw)
    mapped = _match(x, channels, path)
    fixed = bool(np.issubdtype(array.dtype, np.integer))
    with np.errstate(over="ignore", invalid="ignore"):
        if raw.dtype == np.uint8 and raw.shape[2] == channels:
            per = _per_channel_u8(raw, groups)
        else:
            sat = _match(_saturated(raw)[None, None, :], channels, path).ravel()
            per = _per_channel(mapped, sat, groups, fixed)
        out = [per.ravel()]
        if "texture" in groups:
            out.append(np.asarray(_texture(_plane_mean(mapped))))
        if "geometry" in groups:
            out.append(np.asarray(_geometry(array, x, meta)))
    return np.concatenate(out).astype(np.float64)
