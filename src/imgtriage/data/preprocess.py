"""The one function that turns a file (or a decoded array) into a model input.

Training, evaluation, prediction and serving all call :func:`load_input` / :func:`to_input`
with the :class:`PreprocessSpec` stored in the bundle, so preprocessing can never drift.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from imgtriage.data._geometry import PIL_INTERP, geometry, place, resize_plane
from imgtriage.data.features import FeatureSpec, raw_features
from imgtriage.errors import ConfigError, ImageReadError
from imgtriage.io import Defect, ImageRecord, ReadPolicy, read_image

RAW_FEATURES = "raw_features"  # meta key: the image's RawFeatures when the spec has features

Scaling = Literal["dtype", "minmax", "percentile"]
Stretch = Literal["linear", "asinh", "log"]
Resize = Literal["squash", "shorter_crop", "pad"]
Interp = Literal["nearest", "bilinear", "bicubic", "area"]
ChannelOrder = Literal["rgb", "bgr"]

# Named preprocessing of models made elsewhere (``imgtriage import --preprocess NAME``): the
# PreprocessSpec fields each sets. Values run 0..1 after scaling; ``value_range`` multiplies
# them first (255 = the model was trained on 0..255 pixels), ``channel_order`` reorders RGB,
# then ``(x - mean) / std`` per channel, in the model's channel order.
PREPROCESS_PRESETS: dict[str, dict[str, Any]] = {
    # Keras/keras.applications preprocess_input(mode="caffe") (ResNet50, VGG16, ...):
    # RGB -> BGR, ImageNet mean subtracted on 0..255, no scaling.
    "keras-caffe": {"channel_order": "bgr", "value_range": 255.0,
                    "mean": (103.939, 116.779, 123.68), "std": (1.0, 1.0, 1.0)},
    # preprocess_input(mode="tf") (MobileNet, Inception, Xception, ...): x / 127.5 - 1.
    "keras-tf": {"channel_order": "rgb", "value_range": 1.0,
                 "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    # torchvision / timm ImageNet models (and Keras mode="torch"): x / 255, ImageNet mean/std.
    "torch-imagenet": {"channel_order": "rgb", "value_range": 1.0,
                       "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}

MAX_SIDE = 8_192  # a model input side; larger ones cost gigabytes per image
MAX_CHANNELS = 1_024
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class PreprocessSpec:
    """Every parameter of file -> tensor; saved verbatim in the bundle manifest.

    Attributes:
        in_chans: channels the model takes (1 = grayscale, 3 = RGB, N = multi-band).
        size: (height, width) of the model input.
        scaling: ``dtype`` divides integers by their dtype's maximum (floats fall back to
            min/max), ``minmax`` maps each image's min..max to 0..1, ``percentile`` maps the
            ``percentiles`` (lo, hi) to 0..1 and clips; the latter two suit scientific data.
        stretch: ``linear``; ``asinh`` (``asinh(a*x)/asinh(a)``) or ``log`` for high dynamic range.
        resize: ``squash`` to size, ``shorter_crop`` (shorter side to size/crop_pct, centre
            crop), or ``pad`` (keep aspect, pad with zeros).
        alpha_background: 0..1 grey level transparent pixels are composited onto.
        jpeg_draft: let JPEGs decode at a reduced scale that stays >= 2x the input size
            (PIL draft mode: several times faster on large photos, same answer everywhere
            because training and serving share this flag).
        mean, std: per-channel normalisation after scaling (length in_chans), in the
            model's channel order and in units of ``value_range``.
        channel_order: ``rgb`` or ``bgr`` (3-channel models trained on BGR, e.g. Keras
            "caffe" models): the colour channels are reversed before mean/std.
        value_range: the 0..1 values are multiplied by this before mean/std (255 for models
            trained on 0..255 pixel values).
        read: the :class:`ReadPolicy` used to decode files.
        features: for image + feature (fusion) models, the
            :class:`~imgtriage.data.features.FeatureSpec` whose raw values :func:`load_input`
            adds to the metadata (``meta["raw_features"]``), computed from the same decoded
            record as the pixels; None for image-only models.

    Example:
        >>> spec = PreprocessSpec(in_chans=1, size=(64, 64), mean=(0.5,), std=(0.25,))
        >>> to_input(np.zeros((100, 80), np.uint8), spec).shape
        (1, 64, 64)
    """

    in_chans: int = 3
    size: tuple[int, int] = (224, 224)
    scaling: Scaling = "dtype"
    percentiles: tuple[float, float] = (0.5, 99.5)
    stretch: Stretch = "linear"
    asinh_a: float = 10.0
    resize: Resize = "squash"
    crop_pct: float = 0.875
    interpolation: Interp = "bilinear"
    alpha_background: float = 1.0
    jpeg_draft: bool = True
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channel_order: ChannelOrder = "rgb"
    value_range: float = 1.0
    read: ReadPolicy = field(default_factory=ReadPolicy)
    features: FeatureSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.features, dict):
            object.__setattr__(self, "features", FeatureSpec.from_dict(self.features))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if self.in_chans < 1:
            raise ConfigError("in_chans must be >= 1 (--in-chans)")
        if len(self.size) != 2 or min(self.size) < 1 or max(self.size) > MAX_SIDE:
            raise ConfigError(f"size must be two integers in 1..{MAX_SIDE} (--img-size)")
        if self.in_chans > MAX_CHANNELS:
            raise ConfigError(f"in_chans must be <= {MAX_CHANNELS} (--in-chans)")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError(f"mean/std need {self.in_chans} values, one per input channel "
                              "(--mean/--std)")
        if any(s <= 0 for s in self.std):
            raise ConfigError("std values must be positive (--std)")
        if self.scaling not in ("dtype", "minmax", "percentile"):
            raise ConfigError("scaling must be dtype|minmax|percentile (--scaling)")
        if self.stretch not in ("linear", "asinh", "log"):
            raise ConfigError("stretch must be linear|asinh|log (--stretch)")
        if self.resize not in ("squash", "shorter_crop", "pad"):
            raise ConfigError("resize must be squash|shorter_crop|pad (--resize)")
        if self.interpolation not in PIL_INTERP:
            raise ConfigError("interpolation must be nearest|bilinear|bicubic|area")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError("percentiles must satisfy 0 <= lo < hi <= 100 (--percentiles)")
        if not 0 < self.crop_pct <= 1:
            raise ConfigError("crop_pct must be in (0, 1] (--crop-pct)")
        if self.channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"channel order must be rgb or bgr, got {self.channel_order!r} "
                              "(--channel-order)")
        if self.channel_order == "bgr" and self.in_chans != 3:
            raise ConfigError("channel order bgr needs a 3-channel model (--channel-order)")
        object.__setattr__(self, "value_range", float(self.value_range))
        if not (self.value_range > 0 and np.isfinite(self.value_range)):
            raise ConfigError(f"value range must be a positive number, got {self.value_range} "
                              "(--value-range)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.features is None:  # image-only bundles keep their manifest unchanged
            del d["features"]
        else:
            d["features"] = self.features.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        d = dict(d)
        read = d.pop("read", None) or {}
        if read.get("jpeg_draft_size") is not None:
            read["jpeg_draft_size"] = tuple(read["jpeg_draft_size"])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown preprocessing keys {sorted(unknown)}")
        return cls(**d, read=ReadPolicy(**read))

    @classmethod
    def from_preset(cls, name: str, *, size: tuple[int, int], in_chans: int = 3,
                    **overrides: Any) -> PreprocessSpec:
        """The spec of a named preprocessing (:data:`PREPROCESS_PRESETS`); ``overrides`` (None
        values ignored) replace any field, e.g. ``interpolation="nearest"``.

        Example:
            >>> s = PreprocessSpec.from_preset("keras-caffe", size=(224, 224))
            >>> s.channel_order, s.value_range, s.mean[0]
            ('bgr', 255.0, 103.939)
        """
        if name not in PREPROCESS_PRESETS:
            raise ConfigError(f"unknown preprocessing {name!r}; use one of "
                              f"{', '.join(PREPROCESS_PRESETS)} or 'custom' with --mean, --std,"
                              " --channel-order and --value-range (--preprocess)")
        chosen = {**PREPROCESS_PRESETS[name],
                  **{k: v for k, v in overrides.items() if v is not None}}
        if in_chans != 3 and overrides.get("mean") is None:
            raise ConfigError(f"preprocessing {name!r} is for 3-channel models; give --mean and "
                              f"--std for {in_chans} channels (--preprocess custom)")
        return cls(in_chans=in_chans, size=tuple(size), **chosen)

    @classmethod
    def default_for(cls, in_chans: int, size: tuple[int, int], **kw: Any) -> PreprocessSpec:
        """ImageNet statistics for 3 channels, 0.5/0.25 for any other channel count."""
        if in_chans == 3:
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        else:
            mean, std = (0.5,) * in_chans, (0.25,) * in_chans
        return cls(in_chans=in_chans, size=size, mean=kw.pop("mean", mean),
                   std=kw.pop("std", std), **kw)


def _range(array: np.ndarray, spec: PreprocessSpec) -> tuple[Any, Any] | None:
    """The (lo, hi) that map to 0..1 over the whole image, or None for dtype scaling.

    Taken over every channel at once, as the float32 image would give them: min/max of the
    native array cast to float32 (the cast is monotonic), percentiles of the float32 copy.
    """
    if array.dtype == np.bool_ or (spec.scaling == "dtype"
                                   and np.issubdtype(array.dtype, np.integer)):
        return None
    if spec.scaling == "percentile":
        lo, hi = np.percentile(array.astype(np.float32), spec.percentiles)
        return lo, hi
    return float(np.float32(array.min())), float(np.float32(array.max()))


def _scale_channel(ch: np.ndarray, spec: PreprocessSpec, span: tuple[Any, Any] | None
                   ) -> np.ndarray:
    """One native channel -> float32 in [0, 1] (per spec.scaling), then the stretch.

    Elementwise, so working channel by channel gives exactly the whole image's values while
    holding one channel of floats at a time (a large image never exists whole as floats).
    """
    out = ch.astype(np.float32)
    if span is None and ch.dtype != np.bool_:
        info = np.iinfo(ch.dtype)
        if info.min:
            out -= info.min
        out /= float(info.max - info.min)
    elif span is not None:
        lo, hi = span
        width = float(hi - lo)
        if not width > 0:
            out[...] = 0.0
        elif spec.scaling != "percentile":  # Python floats keep float32 arithmetic: in place
            out -= lo
            out /= width
            np.clip(out, 0.0, 1.0, out=out)
        else:  # NumPy float64 percentiles: the arithmetic runs in float64, as it always has
            out = np.clip((out - lo) / width, 0.0, 1.0)
    if spec.stretch == "asinh":
        out = np.arcsinh(spec.asinh_a * out) / np.arcsinh(spec.asinh_a)
    elif spec.stretch == "log":
        out = np.log1p(1000.0 * out) / np.log1p(1000.0)
    return out.astype(np.float32, copy=False)


def _channel_plan(c: int, in_chans: int, path: str, alpha: bool | None = None
                  ) -> tuple[bool, str]:
    """How c channels become in_chans: (composite alpha?, then "same"|"repeat"|"luma").

    LA/RGBA are composited onto the background first; one channel is repeated, RGB becomes
    luma; anything else is a defect. ``alpha`` says whether the last channel is transparency
    (the record's ``meta["alpha"]``: a 4-band TIFF is not RGBA); None: 2 or 4 channels are.
    """
    last_is_alpha = c in (2, 4) if alpha is None else alpha
    alpha = last_is_alpha and in_chans in (1, 3) and c - 1 in (1, 3)
    colours = c - 1 if alpha else c
    if colours == in_chans:
        return alpha, "same"
    if colours == 1 and in_chans > 1:
        return alpha, "repeat"
    if colours == 3 and in_chans == 1:
        return alpha, "luma"
    raise ImageReadError(Defect(path, "bad_shape",
                                f"image has {c} channels but the model takes "
                                f"{in_chans}; convert the file or retrain with --in-chans {c}"))


def _model_planes(array: np.ndarray, spec: PreprocessSpec, path: str,
                  alpha: bool | None = None) -> list[np.ndarray]:
    """The (h, w) float32 planes of the model input, before mean/std, one channel at a time."""
    x = array if array.ndim == 3 else array[..., None]
    alpha, rule = _channel_plan(x.shape[2], spec.in_chans, path, alpha)
    span = _range(array, spec)
    bg = spec.alpha_background
    a = _scale_channel(x[..., -1], spec, span) if alpha else None
    backdrop = None if a is None else bg * (1.0 - a)  # shared by every colour channel
    colours = x.shape[2] - 1 if alpha else x.shape[2]

    def colour(k: int) -> np.ndarray:
        ch = _scale_channel(x[..., k], spec, span)
        if a is not None:  # ch * a + bg * (1 - a), in place (same float32 operations)
            ch *= a
            ch += backdrop
        return ch

    if rule == "luma":
        grey = (np.stack([colour(k) for k in range(3)], axis=2) @ _LUMA)
        return [geometry(grey, spec)]
    planes = [geometry(colour(k), spec) for k in range(colours)]
    return planes * spec.in_chans if rule == "repeat" else planes


def _opaque_colours(array: np.ndarray, in_chans: int, alpha: bool | None = None
                    ) -> np.ndarray | None:
    """The colour channels of an (H, W, C) 8-bit image: all of them, or, for LA/RGBA going to
    a 1- or 3-channel model (which composites alpha) whose alpha is 255 everywhere
    (compositing then multiplies by exactly 1 and adds exactly 0), the colours without it;
    None for an alpha that is not opaque. ``alpha`` as in :func:`_channel_plan`."""
    if array.shape[2] not in (2, 4) or in_chans not in (1, 3) or alpha is False:
        return array
    return array[..., :-1] if bool((array[..., -1] == 255).all()) else None


def _fast_8bit(array: np.ndarray, spec: PreprocessSpec, alpha: bool | None = None
               ) -> np.ndarray | None:
    """The model input of an 8-bit grey or RGB image, or None where this path does not apply.

    Pillow splits the channels and turns each into floats of its raw levels in C, resamples
    only the window the model keeps, and the scaling and mean/std run once on the small
    result: no float copy of the full-size image, one pass per output channel. Linear scaling
    commutes with resampling (the filter weights sum to one), so the values equal
    :func:`float_input`'s up to float rounding (~1e-6). LA/RGBA images with an opaque alpha
    take it too (compositing onto the background changes nothing there); percentile scaling
    and non-linear stretches (which do not commute with resizing), a real alpha and luma
    conversions keep the float planes.
    """
    if array.dtype != np.uint8 or spec.stretch != "linear" or spec.scaling == "percentile":
        return None
    span = _range(array, spec)  # over every channel, alpha included, as float_input takes it
    colours = array if array.ndim == 2 else _opaque_colours(array, spec.in_chans, alpha)
    if colours is None:
        return None
    grey = colours.ndim == 2 or colours.shape[2] == 1
    if not grey and not (colours.shape[2] == 3 and spec.in_chans == 3):
        return None
    lo, hi = (0.0, 255.0) if span is None else (float(span[0]), float(span[1]))
    image = Image.fromarray(colours.reshape(colours.shape[:2]) if grey else colours)
    sources = [image] if grey else list(image.split())
    del image  # (Pillow holds RGB as 4 bytes a pixel: free it before the float planes)
    if spec.channel_order == "bgr":
        sources = sources[::-1]
    planes = []
    for src in sources:
        levels = resize_plane(src.convert("F"), spec)  # Pillow's array: read-only
        if hi > lo:  # (minmax clips nothing: lo and hi are the image's own min and max)
            plane = (levels - np.float32(lo)) / np.float32(hi - lo)
        else:  # a constant image under minmax scaling: zeros, as float_input gives
            plane = np.zeros_like(levels)
        planes.append(place(plane, spec, None))
    out = np.empty((spec.in_chans, *spec.size), np.float32)
    scale = np.float32(spec.value_range)
    for k in range(spec.in_chans):
        np.multiply(planes[0 if grey else k], scale, out=out[k])
        out[k] -= np.float32(spec.mean[k])
        out[k] /= np.float32(spec.std[k])
    return out


def to_input(array: np.ndarray, spec: PreprocessSpec, *, path: str = "<array>",
             alpha: bool | None = None) -> np.ndarray:
    """A decoded image (any dtype, (H, W) or (H, W, C)) -> float32 (in_chans, h, w), normalised.

    8-bit grey and RGB images resample each channel's levels as floats in Pillow and scale
    the small result (:func:`_fast_8bit`); every other image works one float channel at a time
    (:func:`float_input`), so a large image costs one channel of floats, not the whole image
    four times over. Raises ImageReadError(Defect(..., "bad_shape")) when the
    channels cannot be matched. ``alpha``: whether the last channel is transparency (a
    record's ``meta["alpha"]``, see :func:`record_pixels`); None: 2 or 4 channels are.
    """
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise ImageReadError(Defect(path, "bad_shape",
                                    f"expected a 2-D image or (H, W, C), got shape "
                                    f"{tuple(array.shape)}"))
    fast = _fast_8bit(array, spec, alpha)
    return fast if fast is not None else float_input(array, spec, path=path, alpha=alpha)


def float_input(array: np.ndarray, spec: PreprocessSpec, *, path: str = "<array>",
                alpha: bool | None = None) -> np.ndarray:
    """:func:`to_input` through float32 planes, for every image: scale, stretch, composite
    and resize each channel in float precision. 16-bit, float, multi-band and alpha images
    always take this path; 8-bit grey and RGB images take it only where :func:`_fast_8bit`
    does not apply (tests hold the two equal up to float rounding).
    """
    planes = _model_planes(array, spec, path, alpha)
    if spec.channel_order == "bgr":
        planes = planes[::-1]
    x = np.stack(planes, axis=2)
    if spec.value_range != 1.0:
        x *= np.float32(spec.value_range)
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load_record(source: str | os.PathLike[str] | bytes, spec: PreprocessSpec,
                name: str | None = None) -> ImageRecord:
    """Decode a file or bytes with the spec's read policy (JPEG draft sized for the input)."""
    policy = spec.read
    if spec.jpeg_draft and policy.jpeg_draft_size is None:
        from dataclasses import replace

        th, tw = spec.size
        pad = 1.0 / spec.crop_pct if spec.resize == "shorter_crop" else 1.0
        policy = replace(policy, jpeg_draft_size=(int(th * pad * 2), int(tw * pad * 2)))
    return read_image(source, policy=policy, name=name)


def load_input(source: str | os.PathLike[str] | bytes, spec: PreprocessSpec,
               name: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """File or bytes -> (model input (C, h, w) float32, metadata). Raises ImageReadError.

    Example:
        >>> x, meta = load_input("cat.png", spec)  # doctest: +SKIP
    """
    record = load_record(source, spec, name=name)
    shown = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    return record_input(record, spec, path=shown)


def record_pixels(record: ImageRecord, spec: PreprocessSpec, *, path: str = "<array>"
                  ) -> np.ndarray:
    """A decoded record -> model input, its last channel taken as alpha only where the file
    says so (``meta["alpha"]``: the near-infrared band of a 4-band TIFF stays a band)."""
    return to_input(record.array, spec, path=path, alpha=record.meta.get("alpha"))


def record_input(record: ImageRecord, spec: PreprocessSpec, *, path: str = "<array>"
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """A decoded record -> (model input, metadata); with ``spec.features`` the metadata also
    holds the record's raw features under ``"raw_features"`` (header cards, statistics),
    so pixels and features always come from one decode, in training and in prediction."""
    x = record_pixels(record, spec, path=path)
    if spec.features is None:
        return x, record.meta
    meta = dict(record.meta)
    meta[RAW_FEATURES] = raw_features(record, spec.features, path=path)
    return x, meta
