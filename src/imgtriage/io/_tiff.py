"""TIFF through tifffile: 8/16/32-bit integer and float pages with any number of samples.

Shapes are read from the IFDs before any strip is decoded, so a huge or truncated TIFF is
refused without allocating its pixels. Pages come out ``(H, W)`` or ``(H, W, C)`` whatever
the planar configuration on disk.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from imgtriage.io._budget import check_bytes, check_pages, check_time
from imgtriage.io._source import ReadFailure, Source
from imgtriage.io._types import ReadPolicy

# TIFF photometric interpretation codes (tifffile.PHOTOMETRIC values).
_MINISWHITE, _PALETTE, _SEPARATED = 0, 3, 5
_PLANAR_SEPARATE = 2


def read_tiff(src: Source, policy: ReadPolicy) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the first page, or every page stacked as channels; raise ``ReadFailure``.

    Only the IFDs of the pages kept are parsed (the page count comes from the IFD chain), so
    a file of thousands of tiny pages costs no more than its first page.
    """
    import tifffile

    meta: dict[str, Any] = {"format": "tiff", "conversions": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with src.open() as fh, tifffile.TiffFile(fh) as tif:
                count = len(tif.pages)
                if not count:
                    raise ReadFailure("no_image_data", f"'{src.display}' holds no TIFF page")
                if policy.multipage == "channels":
                    check_pages(src, count, "pages stacked as channels", policy)
                chosen = _chosen_pages(src, tif, count, policy)
                _describe(tif, chosen[0], count, meta)
                meta["alpha"] = len(chosen) == 1 and _alpha_sample(chosen[0])
                arrays = []
                for page in chosen:
                    arrays.append(_page_array(src, page, meta["conversions"]))
                    check_time(src, policy, f"after page {len(arrays)} of {len(chosen)}")
        except ReadFailure:
            raise
        except Exception as exc:
            if "imagecodecs" not in str(exc) or "pages" not in meta:
                raise _decoder_failure(src, exc) from None
            # LZW, JPEG and CCITT need imagecodecs in tifffile; Pillow's libtiff has them.
            arrays = _pillow_pages(src, policy, meta, exc)
    if meta["pages"] > 1 and policy.multipage == "first":
        meta["conversions"].append(f"first_page_of_{meta['pages']}")
    return _stack_pages(src, arrays, meta), meta


def _chosen_pages(src: Source, tif: Any, count: int, policy: ReadPolicy) -> list[Any]:
    """The pages to decode, each checked from its IFD; their bytes together within budget."""
    indices = range(count) if policy.multipage == "channels" else range(1)
    chosen, total = [], 0
    for index in indices:
        page = tif.pages[index]
        check_time(src, policy, f"reading the header of page {index}")
        total += _check_page(src, page, policy)
        if total > policy.max_decoded_bytes:
            check_bytes(src, f"{index + 1} pages", (total,), 1, policy)
        chosen.append(page)
    return chosen


def _pillow_pages(
    src: Source, policy: ReadPolicy, meta: dict[str, Any], first_error: Exception
) -> list[np.ndarray]:
    """Decode the pages tifffile could not (sizes were already checked from the IFDs)."""
    from PIL import Image, ImageSequence

    from imgtriage.io._raster import mode_to_array

    meta["conversions"].append(f"pillow_decoder({meta['compression']})")
    arrays = []
    try:
        with src.open() as fh, Image.open(fh, formats=["TIFF"]) as img:
            for frame in ImageSequence.Iterator(img):
                arrays.append(mode_to_array(frame, meta["conversions"]))
                if policy.multipage == "first":
                    break
    except Exception as exc:
        raise ReadFailure(
            "decode_error",
            f"'{src.display}' could not be decoded as TIFF: tifffile: {first_error}; Pillow: {exc}",
        ) from None
    return arrays


# tifffile's series walk every page (quadratic in the page count): only asked for small files.
_SERIES_PAGE_LIMIT = 64


def _describe(tif: Any, first: Any, count: int, meta: dict[str, Any]) -> None:
    """What the container says about itself: page count, axes, photometric, description."""
    import tifffile

    meta["pages"] = count
    if count == 1:
        meta["axes"] = str(first.axes)
    elif count <= _SERIES_PAGE_LIMIT and tif.series:
        meta["axes"] = str(tif.series[0].axes)
    else:
        meta["axes"] = "I" + str(first.axes)
    meta["page_axes"] = str(first.axes)
    meta["photometric"] = _enum_name(tifffile.PHOTOMETRIC, first.photometric)
    meta["planarconfig"] = _enum_name(tifffile.PLANARCONFIG, first.planarconfig)
    meta["compression"] = _enum_name(tifffile.COMPRESSION, first.compression)
    meta["bitspersample"] = int(first.bitspersample)
    if first.description:
        meta["description"] = str(first.description)


# ExtraSamples values that mean transparency (associated and unassociated alpha); 0 is
# "unspecified": another band (near infrared, a mask, ...) that a model must see as such.
_ALPHA_SAMPLES = {1, 2}


def _alpha_sample(page: Any) -> bool:
    """True when the page's last sample is alpha by its ExtraSamples tag."""
    extra = tuple(page.extrasamples or ())
    return (bool(extra) and int(extra[-1]) in _ALPHA_SAMPLES
            and int(page.samplesperpixel) in (2, 4))  # grey or RGB + alpha


def _enum_name(enum: Any, value: Any) -> str:
    """``"minisblack"`` for photometric 1 and so on; the number itself when unknown."""
    try:
        return str(enum(int(value)).name).lower()
    except (ValueError, TypeError):
        return str(value).lower()


def _check_page(src: Source, page: Any, policy: ReadPolicy) -> int:
    """Refuse huge or truncated pages from their IFD alone, before decoding a byte.

    Returns the page's decoded bytes.
    """
    height, width = int(page.imagelength), int(page.imagewidth)
    if height * width > policy.max_pixels:
        raise ReadFailure(
            "too_many_pixels",
            f"'{src.display}' has a {width}x{height} page ({width * height} pixels; the limit "
            "is ReadPolicy.max_pixels); downscale it or raise the limit (--max-pixels)",
        )
    samples = max(1, int(page.samplesperpixel))
    itemsize = page.dtype.itemsize if page.dtype is not None else -(-int(page.bitspersample) // 8)
    if int(page.photometric) == _PALETTE:
        samples, itemsize = 3, 2  # the palette expands each index to 16-bit RGB
    nbytes = check_bytes(src, f"a {width}x{height}x{samples} page", (width, height, samples),
                         max(1, itemsize), policy, plane_pixels=width * height)
    ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts, strict=False)]
    if ends and max(ends) > src.size:
        raise ReadFailure(
            "truncated",
            f"'{src.display}' ends at byte {src.size} but its image data runs to byte "
            f"{max(ends)}; the file was cut short, re-download or re-copy it",
        )
    return nbytes


def _page_array(src: Source, page: Any, conversions: list[str]) -> np.ndarray:
    """One page as (H, W) or (H, W, S), photometric quirks resolved."""
    array = page.asarray()
    axes = str(page.axes)
    if array.ndim == 3 and axes.startswith("S"):
        array = np.moveaxis(array, 0, -1)
        _note(conversions, "planar->interleaved")
    elif array.ndim != 2 and not (array.ndim == 3 and axes.endswith("S")):
        array = np.squeeze(array)
        if array.ndim not in (2, 3):
            raise ReadFailure(
                "bad_shape",
                f"'{src.display}' has a page of shape {tuple(page.shape)} (axes {axes}); "
                "only 2-D pages with optional samples are read",
            )
    photometric = int(page.photometric)
    if photometric == _MINISWHITE and array.dtype.kind in "ub":
        array = ~array  # max - value for unsigned integers, logical not for bilevel
        _note(conversions, "miniswhite->minisblack")
    elif photometric == _PALETTE and page.colormap is not None and array.ndim == 2:
        array = np.moveaxis(np.asarray(page.colormap)[:, array], 0, -1)
        _note(conversions, "palette->RGB")
    elif photometric == _SEPARATED and array.ndim == 3 and array.shape[-1] == 4:
        array = _cmyk_to_rgb(array)
        _note(conversions, "cmyk->rgb")
    return array


def _note(conversions: list[str], what: str) -> None:
    if what not in conversions:
        conversions.append(what)


def _cmyk_to_rgb(array: np.ndarray) -> np.ndarray:
    top = float(np.iinfo(array.dtype).max) if array.dtype.kind == "u" else 1.0
    cmy, k = array[..., :3].astype(np.float64) / top, array[..., 3:].astype(np.float64) / top
    return ((1.0 - cmy) * (1.0 - k) * top).round().astype(array.dtype)


def _stack_pages(src: Source, arrays: list[np.ndarray], meta: dict[str, Any]) -> np.ndarray:
    """Stack pages as channels; they must share shape and dtype."""
    if len(arrays) == 1:
        return arrays[0]
    first = arrays[0]
    for index, other in enumerate(arrays[1:], start=1):
        if other.shape[:2] != first.shape[:2] or other.dtype != first.dtype:
            raise ReadFailure(
                "bad_shape",
                f"'{src.display}': page {index} is {other.shape} {other.dtype} but page 0 is "
                f"{first.shape} {first.dtype}; pages can only be stacked as channels when they "
                "share one shape and dtype (use --multipage first to read page 0 only)",
            )
    meta["conversions"].append(f"{len(arrays)}_pages->channels")
    planes = [a if a.ndim == 3 else a[..., np.newaxis] for a in arrays]
    return np.concatenate(planes, axis=-1)


def _decoder_failure(src: Source, exc: Exception) -> ReadFailure:
    text = str(exc) or type(exc).__name__
    if "imagecodecs" in text:
        text += " (install it with `pip install imagecodecs`)"
    lowered = text.lower()
    if "failed to read" in lowered or "truncated" in lowered or isinstance(exc, EOFError):
        return ReadFailure(
            "truncated", f"'{src.display}' ends before its TIFF data does ({text}); re-copy it"
        )
    return ReadFailure("decode_error", f"'{src.display}' could not be decoded as TIFF: {text}")
