"""The demo: a real image folder from data that installs with the project, trained,
bundled, and used to classify an inbox that also holds what real inboxes collect: broken
files (defects), junk images (noise, a constant grey, a blank frame) and images of a class the
model was never trained on. The bundle's default rule answers what it knows and says
"unknown" to the rest; the summary counts how many were refused and why.

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` when installed, else
scikit-learn's digits (always there). Finishes in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "boot")


@dataclass(frozen=True)
class DemoConfig:
    """What ``imgtriage demo`` / :func:`run_demo` can be told (the same defaults)."""

    out: Path = field(default=Path("demo-output"), metadata={
        "help": "Where the demo writes its data, run, bundle and report.", "short": "-o"})
    dataset: str = field(default="auto", metadata={
        "help": "auto (Fashion-MNIST from Debian's dataset-fashion-mnist when installed, else "
                "scikit-learn digits), digits or fashion-mnist."})
    per_class: int = field(default=400, metadata={"help": "Training images per class."})
    epochs: int = field(default=6, metadata={"help": "Training epochs."})
    quiet: bool = field(default=False, metadata={"help": "No progress output.", "switch": True,
                                                 "short": "-q"})


@dataclass(frozen=True)
class DemoResult:
    data_dir: Path
    bundle_path: Path
    report_path: Path
    accuracy: float  # of the answered inbox images of trained classes
    n_results: int
    n_defects: int
    seconds: float
    summary: dict = None  # type: ignore[assignment]  # demo-summary.json


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        hits = sorted(FASHION_DIR.rglob(name)) if FASHION_DIR.exists() else []
        if hits:
            return hits[0]
    return None


def fashion_available() -> bool:
    return all(_find_idx(s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"))


def load_source(dataset: str) -> tuple[str, np.ndarray, np.ndarray, tuple[str, ...]]:
    """(name, images uint8 (N, H, W), labels, class names)."""
    if dataset == "auto":
        dataset = "fashion-mnist" if fashion_available() else "digits"
    if dataset == "fashion-mnist":
        x = _read_idx(_find_idx("train-images-idx3-ubyte"))
        y = _read_idx(_find_idx("train-labels-idx1-ubyte"))
        return dataset, x, y.astype(int), FASHION_CLASSES
    if dataset != "digits":
        from imgtriage.errors import ConfigError

        raise ConfigError(f"unknown demo dataset {dataset!r}; use auto, digits or "
                          "fashion-mnist (--dataset)")
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255).round().astype(np.uint8)
    imgs = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR))
                     for im in imgs])
    return dataset, imgs, d.target.astype(int), tuple(str(i) for i in range(10))


def _balanced_pick(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    return np.concatenate(idx)


def write_folders(root: Path, x: np.ndarray, y: np.ndarray, classes: tuple[str, ...],
                  per_class_train: int, per_class_inbox: int, seed: int = 0,
                  unseen: str | None = None) -> tuple[Path, Path, dict[str, str]]:
    """train/<class>/*.png plus an unlabelled inbox/ (with the truth kept aside); the class
    ``unseen`` gets no training folder: only its inbox images exist."""
    rng = np.random.default_rng(seed)
    pick = _balanced_pick(y, per_class_train + per_class_inbox, rng)
    truth: dict[str, str] = {}
    train_dir, inbox = root / "train", root / "inbox"
    seen: dict[int, int] = {}
    for i in pick:
        c = int(y[i])
        k = seen.get(c, 0)
        seen[c] = k + 1
        if classes[c] == unseen and k >= per_class_inbox:
            continue
        if k < per_class_train and classes[c] != unseen:
            dest = train_dir / classes[c] / f"{i:06d}.png"
        else:
            dest = inbox / ("nested" if k % 2 else "") / f"img_{i:06d}.png"
            truth[str(dest)] = classes[c]
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(dest)
    return train_dir, inbox, truth


def add_broken_files(inbox: Path) -> list[Path]:
    """The files a real inbox collects: empty, truncated, mislabelled, not an image."""
    good = next(inbox.glob("*.png")).read_bytes()
    broken = {
        "empty.png": b"",
        "truncated.png": good[: len(good) // 2],
        "notes.png": b"this is a text file with an image extension\n",
        "readme.txt": b"not an image at all\n",
        "photo.jpg": good,  # PNG bytes under a JPEG name
    }
    out = []
    for name, data in broken.items():
        (inbox / name).write_bytes(data)
        out.append(inbox / name)
    return out


JUNK = ("noise.png", "constant.png", "blank.png")


def add_junk_images(inbox: Path, size: int) -> list[Path]:
    """Valid images that are no photo of anything: white noise, a constant grey, all black."""
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 256, (size, size), dtype=np.uint8),
              np.full((size, size), 128, np.uint8), np.zeros((size, size), np.uint8)]
    out = []
    for name, a in zip(JUNK, arrays, strict=True):
        Image.fromarray(a).save(inbox / name)
        out.append(inbox / name)
    return out


def summarise(report: dict, truth: dict[str, str], unseen: str, dataset: str) -> dict:
    """What the demo prints: answers and their accuracy, refusals by reason and by kind."""
    rows = report["results"]
    kind = {r["path"]: ("junk" if Path(r["path"]).name in JUNK else
                        "unseen_class" if truth.get(r["path"]) == unseen else "known_class")
            for r in rows}
    known = [r for r in rows if kind[r["path"]] == "known_class"]
    answered = [r for r in known if not r["abstained"]]
    reasons: dict[str, int] = {}
    for r in rows:
        if r["abstained"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    refused = {k: f"{sum(r['abstained'] for r in rows if kind[r['path']] == k)} of "
                  f"{sum(kind[r['path']] == k for r in rows)}"
               for k in ("known_class", "unseen_class", "junk")}
    return {"dataset": dataset, "unseen_class": unseen, "results": len(rows),
            "defects": len(report["defects"]),
            "answered_known": len(answered),
            "accuracy_on_answered": (float(np.mean([truth[r["path"]] == r["class"]
                                                    for r in answered])) if answered else None),
            "accuracy_on_inbox": (float(np.mean([truth[r["path"]] == r.get("best_class",
                                                                           r["class"])
                                                 for r in known])) if known else 0.0),
            "refused": refused, "refused_by_reason": reasons}


def run_demo(out_dir: str | Path = "demo-output", *, dataset: str = "auto",
             per_class: int = 400, epochs: int = 6, quiet: bool = False) -> DemoResult:
    """Build data (one class held out of training), train, bundle, classify the inbox with
    broken files, junk images and the unseen class; return the numbers.

    Example:
        >>> res = run_demo("demo-output", dataset="digits", epochs=3)  # doctest: +SKIP
    """
    from imgtriage.predict import Predictor, write_report
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    t0 = time.perf_counter()
    out = Path(out_dir)
    name, x, y, classes = load_source(dataset)
    unseen = classes[-1]  # never trained on: the model must not claim to know it
    per_class_train = min(per_class, int(np.bincount(y).min()) - 20)
    train_dir, inbox, truth = write_folders(out / "data", x, y, classes, per_class_train, 20,
                                            unseen=unseen)
    add_broken_files(inbox)
    size = 32 if name == "digits" else 28
    add_junk_images(inbox, size)
    cfg = TrainConfig(model="crop_cnn", img_size=size, epochs=epochs, batch_size=64, lr=3e-3,
                      augment="shift" if name == "digits" else "flip", seed=0)
    res = train(train_dir, out / "run", cfg, quiet=quiet)
    report = Predictor.load(res.bundle_path).predict_paths([inbox], progress=not quiet)
    report_path = write_report(report, out / "report.json")
    summary = summarise(report, truth, unseen, name)
    summary["rule"] = res.rule
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    return DemoResult(out / "data", res.bundle_path, report_path,
                      summary["accuracy_on_answered"] or 0.0, len(report["results"]),
                      len(report["defects"]), time.perf_counter() - t0, summary)
