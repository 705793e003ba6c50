"""Decode samples into model inputs in parallel, turning bad files into defects (never skips
silently), and wrap them as torch datasets."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgtriage.data.discovery import Sample
from imgtriage.data.features import RawFeatures
from imgtriage.data.preprocess import RAW_FEATURES, PreprocessSpec, load_input
from imgtriage.errors import DataError, ImageReadError
from imgtriage.io import Defect, ImageRecord


def decoder_mp_context() -> Any:
    """The multiprocessing context for decoding worker processes (training and batch runs).

    Workers start from a clean forkserver, never by forking the caller: a fork copies
    whatever the host has running (threads mid-lock, a Celery/kombu connection pool whose
    after-fork hook blocks on Redis, Ray), and the child can hang for ever. The server
    imports torch and the decoder once, so each worker is then a cheap fork of it instead of
    a fresh ``import torch`` (seconds on 2 cores) per worker.
    """
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "imgtriage.data.preprocess"])
    return ctx


@dataclass(frozen=True)
class LoadedSplit:
    """Decoded inputs of one split: ``x`` (N, C, h, w) float32, ``y`` (N,) int64, and
    the samples kept (aligned with x) plus a defect per file that could not be used.
    ``raw`` holds each kept sample's raw features when the spec has a feature spec
    (fusion models), else it is empty."""

    x: np.ndarray
    y: np.ndarray
    samples: tuple[Sample, ...]
    defects: tuple[Defect, ...]
    raw: tuple[RawFeatures, ...] = ()


def _decode_one(sample: Sample, spec: PreprocessSpec
                ) -> tuple[np.ndarray, RawFeatures | None] | Defect:
    try:
        x, meta = load_input(sample.path, spec)
        return x, meta.get(RAW_FEATURES)
    except ImageReadError as exc:
        return exc.defect


def decode_samples(samples: Sequence[Sample], classes: Sequence[str], spec: PreprocessSpec,
                   *, workers: int | None = None,
                   progress: Callable[[int], None] | None = None) -> LoadedSplit:
    """Decode every sample with the bundle's preprocessing, ``workers`` threads in parallel.

    Files that fail become Defects in the result (and the caller reports them); labels not in
    ``classes`` are a DataError.
    """
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the model's classes {list(classes)}")
    workers = workers or min(4, os.cpu_count() or 1)
    xs, ys, kept, defects, raws = [], [], [], [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for sample, out in zip(samples, pool.map(lambda s: _decode_one(s, spec), samples),
                               strict=True):
            if isinstance(out, Defect):
                defects.append(out)
            else:
                xs.append(out[0])
                raws.append(out[1])
                ys.append(index[sample.label])
                kept.append(sample)
            if progress is not None:
                progress(1)
    c, (h, w) = spec.in_chans, spec.size
    x = np.stack(xs) if xs else np.zeros((0, c, h, w), np.float32)
    raw = tuple(raws) if spec.features is not None else ()
    return LoadedSplit(x, np.asarray(ys, np.int64), tuple(kept), tuple(defects), raw)


def model_channels(record: ImageRecord) -> int:
    """The channels a model sees of a decoded image: its own, less a trailing alpha channel
    (composited away); only what the file marks as alpha is (``meta["alpha"]``): the 4th band
    of a multispectral TIFF is a band."""
    c = 1 if record.array.ndim == 2 else record.array.shape[2]
    return c - 1 if record.meta.get("alpha") else c


def detect_in_chans(samples: Sequence[Sample], limit: int = 32) -> int:
    """1 when the first ``limit`` readable samples are all single-channel, else 3.

    Multi-band files (e.g. a 4-band RGB + near-infrared or a 5-band TIFF) give their own
    channel count when all agree; only a channel the file marks as alpha is not counted.
    """
    from imgtriage.io import try_read_image

    seen: set[int] = set()
    step = max(1, len(samples) // limit)
    for s in list(samples)[::step][:limit]:
        rec = try_read_image(s.path)
        if isinstance(rec, Defect):
            continue
        seen.add(model_channels(rec))
    if not seen or seen == {1}:
        return 1 if seen else 3
    if len(seen) == 1:
        return seen.pop()
    return 3


def check_trainable(y: Any, classes: tuple[str, ...], samples: Sequence[Sample],
                    defects: Sequence[Defect]) -> None:
    """The decoded training labels ``y`` must hold two images and every class: a class whose
    every training file is unreadable would be an output the model never learnt. The error
    says why the files were unreadable (defects.json is written only when training ends)."""
    have = {int(v) for v in y}
    lost = {c: sum(s.label == c for s in samples) for k, c in enumerate(classes)
            if k not in have}
    if len(y) < 2:
        raise DataError(f"fewer than 2 usable training images; {defects_line(defects)}")
    if lost:
        found = ", ".join(f"{c!r} ({n} file(s))" for c, n in lost.items())
        raise DataError(f"no readable training image of class(es) {found}; "
                        f"{defects_line(defects)} (or take the class out of the data)")


def defects_line(defects: Sequence[Defect]) -> str:
    """'5 unreadable (format_mismatch x5), e.g. <the first one's message>'."""
    if not defects:
        return "no file was unreadable"
    issues = Counter(d.issue for d in defects)
    kinds = ", ".join(f"{issue} x{n}" for issue, n in issues.most_common())
    return f"{len(defects)} unreadable ({kinds}), e.g. {defects[0].message}"
