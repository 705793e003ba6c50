"""Where the pixels of an image go on the model input: resize, centre crop or pad.

One plan (:func:`geometry_plan`) serves both ways of running it: :func:`geometry` on one
scaled float32 plane (16-bit, float, multi-band and alpha images) and :func:`resize_plane`
on an 8-bit channel's raw levels as floats, scaled afterwards (the 8-bit fast path of
:func:`~imgtriage.data.preprocess.to_input`), so both put every pixel in the same place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from imgtriage.data.preprocess import PreprocessSpec

PIL_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


def geometry_plan(h: int, w: int, spec: PreprocessSpec
                  ) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """Where an (h, w) image goes: ``((width, height) to resize to, (top, left) of the
    spec.size crop or None)``; ``pad`` centres the resized image on a zero canvas."""
    th, tw = spec.size
    if spec.resize == "squash":
        return (tw, th), None
    if spec.resize == "shorter_crop":
        scale = max(th, tw) / spec.crop_pct / min(h, w)
        rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
        return (rw, rh), ((rh - th) // 2, (rw - tw) // 2)
    scale = min(th / h, tw / w)  # pad
    return (max(1, round(w * scale)), max(1, round(h * scale))), None


def place(out: np.ndarray, spec: PreprocessSpec, crop: tuple[int, int] | None) -> np.ndarray:
    """The resized (h, w[, c]) image cropped (``shorter_crop``) or zero-padded (``pad``) to
    spec.size; ``squash`` passes through."""
    if crop is not None:
        return _crop(out, spec, crop)
    if spec.resize == "pad":
        th, tw = spec.size
        canvas = np.zeros((th, tw, *out.shape[2:]), out.dtype)
        oh, ow = out.shape[:2]
        top, left = (th - oh) // 2, (tw - ow) // 2
        canvas[top:top + oh, left:left + ow] = out
        return canvas
    return out


def geometry(ch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(H, W) float plane -> (h, w) by spec.resize, in float precision."""
    h, w = ch.shape[:2]
    target, crop = geometry_plan(h, w, spec)
    if (w, h) != target:
        img = Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32), mode="F")
        ch = np.asarray(img.resize(target, PIL_INTERP[spec.interpolation]), dtype=np.float32)
    return place(ch, spec, crop)


def resize_plane(plane: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One Pillow plane (an 8-bit channel as mode "F": its levels as floats) -> the float32
    (h, w) plane spec.resize resamples, centre-cropped but not yet padded (:func:`place`).

    A bilinear or bicubic centre crop resamples only the kept window: Pillow's ``box`` with
    the same scale puts every filter at the same source position as resizing the whole
    plane and cropping (equal up to rounding in the last bits). The box and nearest filters
    are discontinuous, so a last-bit difference there could pick another source pixel: they
    resize the whole plane and crop.
    """
    w, h = plane.size
    target, crop = geometry_plan(h, w, spec)
    interp = PIL_INTERP[spec.interpolation]
    if crop is None or spec.interpolation not in ("bilinear", "bicubic") or (w, h) == target:
        out = plane if (w, h) == target else plane.resize(target, interp)
        return _crop(np.asarray(out, dtype=np.float32), spec, crop)
    (top, left), (th, tw) = crop, spec.size
    sx, sy = w / target[0], h / target[1]
    # (a crop as wide as the resized image ends at w * (1 + 1 ulp): clamp to the image)
    box = (left * sx, top * sy, min(w, (left + tw) * sx), min(h, (top + th) * sy))
    return np.asarray(plane.resize((tw, th), interp, box=box), dtype=np.float32)


def _crop(out: np.ndarray, spec: PreprocessSpec, crop: tuple[int, int] | None) -> np.ndarray:
    if crop is None:
        return out
    (top, left), (th, tw) = crop, spec.size
    return out[top:top + th, left:left + tw]
