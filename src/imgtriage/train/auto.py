"""``--model auto``: choose the architecture from the labels per class and the image size.

The labels counted are the training split's (with ``--val-frac 0`` every label given trains,
so "500 labels" means 500). The rules, in order (each choice comes with the sentence that
explains it):

1. RGB images, or grey images of 96 px or more (the channel replicated to RGB), and
   pretrained weights for ``--auto-backbone`` (installed by ``imgtriage[pretrained]``, or a
   file given to ``--pretrained``) -> that backbone at the size its weights were trained at
   (transfer learning beats training from scratch on photos and surfaces; smaller grey crops
   such as the signal lab's keep the small CNNs below); when fine-tuning fits the time
   budget, :mod:`imgtriage.train.auto_recipe` then picks the training side (at most 4x
   the images' median side, e.g. 128 px for 32-px photos). For grey images, and whenever
   no fine-tuning epoch fits, :mod:`imgtriage.train.auto_route` measures this route's head
   against a short from-scratch run on validation before committing to either;
2. fewer than 300 labels in total, or fewer than 30 per class (median) -> the Siamese /
   prototype encoder ``siamese`` (falls back to ``crop_cnn`` when it is not installed). The
   boundary was 100 / 10 until ``bench/bench_auto_switch.py`` (issue 19) found the Siamese
   model ahead of ``crop_cnn`` on the same label draws of the signal-crops recipe at every
   budget it measured (100 and 200 labels, 3 seeds each; docs/benchmarks.md);
3. fewer than 500 labels, or fewer than 50 per class -> the shallow ``crop_cnn``;
4. 500 labels or more -> the deeper ``deep_cnn``, unless the images are smaller than 48 px (its
   four pooling stages would leave nothing), where ``crop_cnn`` stays.

With M unlabelled images (``--unlabeled``), semi-supervised training pseudo-labels them, so
the rules are applied as if the M were labelled too (spread evenly over the classes), and
the sentence says so.

The input size defaults to the median image side, clamped to the chosen model's range.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from imgtriage.data.discovery import Sample
from imgtriage.io import Defect

FEW_SHOT_TOTAL, FEW_SHOT_PER_CLASS = 300, 30  # measured: bench/bench_auto_switch.py (issue 19)
FEW_SHOT_EVIDENCE = ("the Siamese model beat crop_cnn on MSTAR crops at 100 and "
                     "200 labels, by a median 5 and 13 points over 3 seeds: "
                     "bench/bench_auto_switch.py")
SHALLOW_TOTAL, SHALLOW_PER_CLASS = 500, 50
DEEP_MIN_SIDE = 48
GREY_PRETRAINED_MIN_SIDE = 96  # smaller grey crops (signal lab, digits) keep the small CNNs


@dataclass(frozen=True)
class ImageProbe:
    """Channels and median size of a sample of the training images."""

    in_chans: int
    median_hw: tuple[int, int]
    probed: int
    eight_bit: bool = True  # every probed image stored as 8-bit integers (PNG/JPEG photos)
    read_s: float = 0.0     # mean seconds to read one of them (plans the decoding time)


@dataclass(frozen=True)
class ModelChoice:
    """The architecture, input size and why; ``in_chans`` 3 when grey images are replicated
    to RGB for a pretrained backbone (None: as the data has them)."""

    model: str
    img_size: int
    reason: str
    in_chans: int | None = None
    pretrained: bool = False  # the pretrained-backbone route (rule 1)


def probe_images(samples: Sequence[Sample], limit: int = 32) -> ImageProbe:
    """Read up to ``limit`` evenly spaced samples; unreadable ones are skipped here (the
    decode step reports them as defects)."""
    from imgtriage.data.loaders import model_channels
    from imgtriage.io import try_read_image

    chans, hs, ws, dtypes = set(), [], [], set()
    step = max(1, len(samples) // limit)
    started, tried = time.perf_counter(), 0
    for s in list(samples)[::step][:limit]:
        tried += 1
        rec = try_read_image(s.path)
        if isinstance(rec, Defect):
            continue
        a = rec.array
        dtypes.add(a.dtype.str.lstrip("<>|="))
        chans.add(model_channels(rec))
        hs.append(a.shape[0])
        ws.append(a.shape[1])
    c = 1 if chans == {1} else (chans.pop() if len(chans) == 1 else 3)
    hw = (int(np.median(hs)), int(np.median(ws))) if hs else (64, 64)
    return ImageProbe(c, hw, len(hs), eight_bit=dtypes <= {"u1"},
                      read_s=(time.perf_counter() - started) / max(tried, 1))


def _registered(name: str) -> bool:
    from imgtriage.errors import ModelError
    from imgtriage.models import get_entry

    try:
        get_entry(name)
        return True
    except ModelError:
        return False


def _backbone_size(name: str) -> int:
    """The side the backbone's registered weights were trained at (else its default)."""
    from imgtriage.models import get_entry
    from imgtriage.models.pretrained import get_weights

    entry = get_weights(name)
    if entry is not None:
        return entry.input_size
    return int(get_entry(name).default_size[0]) if _registered(name) else 224


def _size(side: int, lo: int, hi: int) -> int:
    return int(max(lo, min(hi, side)) // 4 * 4)


def choose_model(counts: dict[str, int], probe: ImageProbe, *, pretrained: str | bool = False,
                 backbone: str = "efficientnet_lite0", img_size: int | None = None,
                 unlabeled: int = 0) -> ModelChoice:
    """Pick a model for these training label counts and images; say why.

    Example:
        >>> probe = ImageProbe(1, (64, 64), 32)
        >>> choose_model({"a": 150, "b": 200}, probe).model
        'crop_cnn'
        >>> choose_model({"a": 3000, "b": 2000}, probe).model
        'deep_cnn'
        >>> [choose_model(dict.fromkeys("abcde", n), probe).model for n in (20, 60, 100)]
        ['siamese', 'crop_cnn', 'deep_cnn']
        >>> choose_model(dict.fromkeys("abcde", 5), probe, unlabeled=2000).model
        'deep_cnn'
    """
    if unlabeled > 0:
        return _with_unlabeled(counts, probe, unlabeled, pretrained=pretrained,
                               backbone=backbone, img_size=img_size)
    n = np.asarray(list(counts.values()), dtype=np.int64)
    total, per = int(n.sum()), float(np.median(n)) if len(n) else 0.0
    side = min(probe.median_hw)
    facts = (f"{total} training labels, median {per:g} per class, {probe.in_chans}-channel "
             f"images of median size {probe.median_hw[0]}x{probe.median_hw[1]}")
    if pretrained and probe.in_chans == 3:
        return ModelChoice(backbone, img_size or _backbone_size(backbone),
                           f"{facts}: RGB photos with pretrained weights installed -> "
                           f"transfer learning with {backbone}", pretrained=True)
    if pretrained and probe.in_chans == 1 and side >= GREY_PRETRAINED_MIN_SIDE:
        return ModelChoice(backbone, img_size or _backbone_size(backbone),
                           f"{facts}: grey images of {GREY_PRETRAINED_MIN_SIDE} px or more "
                           f"with pretrained weights installed -> transfer learning with "
                           f"{backbone}, the grey channel replicated to RGB", in_chans=3,
                           pretrained=True)
    note = (" (pretrained weights are used automatically for RGB photos and grey images of "
            f"{GREY_PRETRAINED_MIN_SIDE} px or more; pass --model {backbone} to use them "
            "anyway)") if pretrained else ""
    if total < FEW_SHOT_TOTAL or per < FEW_SHOT_PER_CLASS:
        why = f"{facts}: fewer than {FEW_SHOT_TOTAL} labels or {FEW_SHOT_PER_CLASS} per class"
        if _registered("siamese"):
            return ModelChoice("siamese", img_size or _size(side, 32, 64),
                               f"{why} -> the Siamese/prototype encoder ({FEW_SHOT_EVIDENCE})"
                               f"{note}")
        return ModelChoice("crop_cnn", img_size or _size(side, 16, 64),
                           f"{why} -> would use the Siamese/prototype encoder, which is not "
                           f"installed; falling back to the shallow crop_cnn{note}")
    if total < SHALLOW_TOTAL or per < SHALLOW_PER_CLASS:
        return ModelChoice("crop_cnn", img_size or _size(side, 16, 64),
                           f"{facts}: fewer than {SHALLOW_TOTAL} labels or "
                           f"under {SHALLOW_PER_CLASS} per class -> the shallow crop_cnn{note}")
    if side < DEEP_MIN_SIDE and img_size is None:
        return ModelChoice("crop_cnn", _size(side, 16, 64),
                           f"{facts}: enough labels for deep_cnn, but images under "
                           f"{DEEP_MIN_SIDE} px are too small for its 4 pooling stages -> "
                           f"crop_cnn{note}")
    return ModelChoice("deep_cnn", img_size or _size(side, DEEP_MIN_SIDE, 96),
                       f"{facts}: {SHALLOW_TOTAL} labels or more -> the deeper deep_cnn{note}")


def _with_unlabeled(counts: dict[str, int], probe: ImageProbe, unlabeled: int,
                    **kw: object) -> ModelChoice:
    """Choose as if the ``unlabeled`` images were labelled (pseudo-labels), and say so."""
    share = unlabeled // max(1, len(counts))
    grown = {c: n + share for c, n in counts.items()}
    choice = choose_model(grown, probe, **kw)  # type: ignore[arg-type]
    n = sum(counts.values())
    return replace(choice, reason=(
        f"{n} labels and {unlabeled} unlabelled images: semi-supervised training "
        f"(--semi-method) pseudo-labels the unlabelled ones, so the model is chosen as for "
        f"up to {sum(grown.values())} labels. {choice.reason}"))
