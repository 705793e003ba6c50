"""What a bundle may contain: confined file names, bounded numbers, real safetensors, sane zips.

A bundle comes from elsewhere (a colleague, a model registry, an attacker). Loading one must not
read or write outside it, allocate without bound, or call a file "verified" that is not what
the manifest says it is. Each check raises a :class:`~imgtriage.errors.BundleError` subclass
with a one-line message saying what is wrong and how to fix it.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from imgtriage.errors import BundleIntegrityError, BundleSchemaError

MAX_MANIFEST_BYTES = 16 * 2**20
MAX_FILES = 1_000
MAX_NAME_CHARS = 255
MAX_CLASSES = 100_000
MAX_CLASS_NAME_CHARS = 512
MAX_CHANNELS = 1_024
MAX_SIDE = 8_192
MAX_INPUT_ELEMENTS = 2**26  # channels x height x width of one model input (256 MiB float32)
MAX_TEMPERATURE = 1e4
MAX_PRIOR_OFFSET = 50.0  # the bound DecisionPolicy puts on a class's log-prior offset
# Zips: total size once extracted, and how much bigger than stored a member may be.
MAX_UNZIPPED_BYTES = 4 * 2**30
MAX_ZIP_BYTES = 2 * 2**30  # a zipped bundle is read into memory; larger ones: unzip them
MAX_RATIO = 20  # weights barely compress; bundles are zipped stored (ratio 1)
RATIO_FLOOR_BYTES = 2**20  # members smaller than this may compress as well as they like
MAX_SAFETENSORS_HEADER = 100 * 2**20
TTA_NAMES = frozenset({"hflip", "vflip", "rot90", "rot180", "rot270"})  # predict's views
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PICKLE_STARTS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def check_file_name(name: Any, where: str) -> str:
    """A manifest file name must be a plain relative name inside the bundle.

    Refused: absolute paths, ``..`` or ``.`` parts, backslashes, NUL and control characters,
    empty parts, over-long names. ``history/manifest.v1.json`` is fine.
    """
    bad = None
    if not isinstance(name, str) or not name:
        bad = "it is not a non-empty string"
    elif len(name) > MAX_NAME_CHARS:
        bad = f"it is longer than {MAX_NAME_CHARS} characters"
    elif any(ord(c) < 32 or c in "\\:" for c in name):
        bad = "it holds a backslash, colon or control character"
    elif name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
        bad = "it is absolute or has an empty, '.' or '..' part"
    if bad is not None:
        raise BundleSchemaError(
            f"{where}: the manifest names a file {name!r} that is not a plain relative name "
            f"inside the bundle ({bad}); the bundle is malformed or tampered with: use the "
            "original bundle")
    return name


def inside(root: Path, name: str, where: str) -> Path:
    """``root / name`` after checking the name and that no symlink leads out of ``root``."""
    check_file_name(name, where)
    path = root / PurePosixPath(name)
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise BundleSchemaError(
            f"{where}: {name} leads outside the bundle (a symbolic link?); copy the bundle "
            "with its files, not links to them")
    return path


def _finite(value: Any, path: str, where: str) -> None:
    """Every number under ``value`` must be finite (JSON allows NaN and Infinity here)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise BundleSchemaError(f"{where}: manifest {path} holds {value!r}; numbers that "
                                "decide an answer must be finite")
    if isinstance(value, int) and abs(value) > 2**53:
        raise BundleSchemaError(f"{where}: manifest {path} holds an integer too large to be "
                                "meaningful ({len(str(abs(value)))} digits)")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{path}.{k}", where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite(v, f"{path}[{i}]", where)


def _int_in(value: Any, lo: int, hi: int, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BundleSchemaError(f"{where}: manifest {what} must be an integer in {lo}..{hi}, "
                                f"got {value!r}; the bundle is malformed: retrain or re-export")
    return value


def check_bounds(m: dict[str, Any], where: str) -> None:
    """Schema bounds on every part of the manifest that decides an answer or a size."""
    files = m.get("files")
    if not isinstance(files, dict) or len(files) > MAX_FILES:
        raise BundleSchemaError(f"{where}: manifest 'files' must map at most {MAX_FILES} "
                                "file names to sha256 hex digests")
    for name, digest in files.items():
        check_file_name(name, where)
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise BundleSchemaError(f"{where}: manifest gives {name} the hash {digest!r}, not "
                                    "a sha256 hex digest (64 lower-case hex characters)")
    classes = m.get("classes")
    if not isinstance(classes, list) or len(classes) > MAX_CLASSES or not all(
            isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME_CHARS for c in classes):
        raise BundleSchemaError(f"{where}: manifest 'classes' must list at most {MAX_CLASSES} "
                                f"non-empty class names (strings of at most "
                                f"{MAX_CLASS_NAME_CHARS} characters)")
    if len(set(classes)) != len(classes):
        raise BundleSchemaError(f"{where}: manifest 'classes' names a class twice")
    model = m.get("model")
    if not isinstance(model, dict):
        raise BundleSchemaError(f"{where}: manifest 'model' must be an object")
    _int_in(model.get("num_classes"), 0, MAX_CLASSES, "model.num_classes", where)
    _int_in(model.get("in_chans"), 1, MAX_CHANNELS, "model.in_chans", where)
    _check_preprocess(m.get("preprocess"), where)
    for section in ("model", "preprocess", "decision", "profiles", "features", "onnx"):
        _finite(m.get(section), section, where)
    _check_decision(m.get("decision"), "decision", len(classes), where)
    _int_in(m.get("bundle_version", 1), 1, 1_000_000, "bundle_version", where)
    tta = m.get("tta")
    if tta is not None and (not isinstance(tta, list) or len(tta) > len(TTA_NAMES) or not all(
            t in TTA_NAMES for t in tta)):
        raise BundleSchemaError(f"{where}: manifest 'tta' must list views among "
                                f"{sorted(TTA_NAMES)}, got {tta!r}")
    for name, profile in (m.get("profiles") or {}).items():
        _check_decision(profile, f"profiles.{name}", len(classes), where)


def _check_preprocess(pre: Any, where: str) -> None:
    if not isinstance(pre, dict):
        raise BundleSchemaError(f"{where}: manifest 'preprocess' must be an object")
    chans = _int_in(pre.get("in_chans"), 1, MAX_CHANNELS, "preprocess.in_chans", where)
    size = pre.get("size")
    if not isinstance(size, list | tuple) or len(size) != 2:
        raise BundleSchemaError(f"{where}: manifest preprocess.size must be [height, width]")
    h = _int_in(size[0], 1, MAX_SIDE, "preprocess.size[0] (--img-size)", where)
    w = _int_in(size[1], 1, MAX_SIDE, "preprocess.size[1] (--img-size)", where)
    if chans * h * w > MAX_INPUT_ELEMENTS:
        raise BundleSchemaError(f"{where}: a model input of {chans}x{h}x{w} is over the "
                                f"{MAX_INPUT_ELEMENTS} values one input may have; retrain with "
                                "a smaller --img-size")
    from imgtriage.data.preprocess import PreprocessSpec  # its own bounds, read policy too
    from imgtriage.errors import ConfigError

    try:
        PreprocessSpec.from_dict(pre)
    except (ConfigError, TypeError, ValueError) as exc:
        raise BundleSchemaError(f"{where}: manifest 'preprocess' is out of bounds: "
                                f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None


def _check_decision(dec: Any, what: str, n_classes: int, where: str) -> None:
    if dec is None:
        return
    if not isinstance(dec, dict):
        raise BundleSchemaError(f"{where}: manifest {what} must be an object")
    t = dec.get("temperature", 1.0)
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= MAX_TEMPERATURE:
        raise BundleSchemaError(f"{where}: manifest {what}.temperature must be in "
                                f"(0, {MAX_TEMPERATURE:g}], got {t!r}")
    thresholds = dec.get("thresholds")
    if thresholds is not None:
        values = list(thresholds.values()) if isinstance(thresholds, dict) else thresholds
        if not isinstance(values, list) or len(values) > n_classes or not all(
                not isinstance(v, bool) and isinstance(v, int | float) and 0 <= v <= 1
                for v in values):
            raise BundleSchemaError(f"{where}: manifest {what}.thresholds must be at most "
                                    f"{n_classes} probabilities in [0, 1]")
    positive = dec.get("positive_class")
    if positive is not None:
        _int_in(positive, 0, n_classes - 1, f"{what}.positive_class", where)
    offsets = dec.get("prior_correction")
    if offsets is not None and (not isinstance(offsets, list) or len(offsets) != n_classes
                                or not all(not isinstance(v, bool) and isinstance(v, int | float)
                                           and math.isfinite(v) and abs(v) <= MAX_PRIOR_OFFSET
                                           for v in offsets)):
        raise BundleSchemaError(f"{where}: manifest {what}.prior_correction must be {n_classes} "
                                f"finite numbers within +-{MAX_PRIOR_OFFSET:g}")


def parse_manifest(raw: bytes, where: str) -> Any:
    """``json.loads`` with a size cap and no traceback for absurd nesting."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleSchemaError(f"{where}: manifest.json is {len(raw)} bytes, over the "
                                f"{MAX_MANIFEST_BYTES} a manifest may have")
    try:
        return json.loads(raw)
    except RecursionError:
        raise BundleSchemaError(f"{where}: manifest.json is nested too deeply to be a "
                                "manifest") from None
    except ValueError as exc:  # bad JSON or UTF-8, or a number of thousands of digits
        raise BundleSchemaError(f"{where}: manifest.json is not valid JSON "
                                f"({str(exc)[:200]})") from None


def check_zip(zf: zipfile.ZipFile, where: str) -> None:
    """Refuse a zipped bundle whose members would unpack to far more than it stores."""
    infos = zf.infolist()
    if len(infos) > MAX_FILES + 1:
        raise BundleSchemaError(f"{where}: the zip holds {len(infos)} members; a bundle has "
                                f"at most {MAX_FILES}")
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_RATIO * max(
                info.compress_size, 1):
            raise BundleSchemaError(
                f"{where}: zip member {info.filename!r} would unpack from "
                f"{info.compress_size} to {info.file_size} bytes (a zip bomb?); bundles are "
                "zipped without compression: re-zip the original bundle directory")
    if total > MAX_UNZIPPED_BYTES:
        raise BundleSchemaError(f"{where}: the zip would unpack to {total} bytes, over the "
                                f"{MAX_UNZIPPED_BYTES} a bundle may hold")


def check_safetensors(data: bytes, name: str, where: str) -> None:
    """The file must be a safetensors file: 8-byte header length, JSON header, data after it.

    Pickles, ``torch.save`` zips and absurd header lengths are refused in one line.
    """
    check_safetensors_file(io.BytesIO(data), len(data), name, where)


def check_safetensors_file(fh: BinaryIO, size: int, name: str, where: str) -> None:
    """:func:`check_safetensors` reading only the header from ``fh`` (``size`` bytes long)."""
    head = fh.read(9)
    # a safetensors header is JSON right after its 8-byte length; that length's low byte may
    # be anything (0x80 for a 128-byte header), so look for the JSON before calling it a pickle
    looks_safetensors = head[8:9] == b"{"
    if looks_safetensors:
        kind = None
    elif head[:2] in _PICKLE_STARTS or head[:1] == b"\x80":
        kind = "a Python pickle"
    elif head[:4] == b"PK\x03\x04":
        kind = "a zip (torch.save output)"
    else:
        kind = None
    if kind is not None:
        raise BundleIntegrityError(
            f"{where}: {name} is {kind}, not safetensors; pickles can run code and are never "
            "loaded: convert the weights with safetensors.torch.save_file, or retrain")
    if size < 8:
        raise BundleIntegrityError(f"{where}: {name} is {size} bytes, too short to be "
                                   "a safetensors file; restore it from the original bundle")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise BundleIntegrityError(
            f"{where}: {name} declares a {header_len}-byte header in a {size}-byte file; "
            "it is not a valid safetensors file: restore it from the original bundle")
    try:
        header = json.loads(head[8:] + fh.read(header_len - 1) if header_len else b"")
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise BundleIntegrityError(f"{where}: {name} has no valid safetensors header (JSON "
                                   "object); restore it from the original bundle")
    body = size - 8 - header_len
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and 0 <= o <= body for o in offsets)
                or offsets[0] > offsets[1]):
            raise BundleIntegrityError(f"{where}: {name}: tensor {key!r} points outside the "
                                       "file; restore it from the original bundle")
