"""Recipe: observatory frames (FITS + header cards) with an image + header-feature model.

Real FITS frames from ``../shared/datasets/fits-samples`` and Debian's ``eso-midas-testdata``
(``/usr/lib/eso-midas/*/test/prim/``), labelled by frame type in ``frames.csv`` (flat, arc,
spectrum, science; the ``evidence`` column says which header card or file tells). The recipe:

1. **Dataset.** The public data hold 2-3 frames of each calibration type, so each training
   frame is cut into crops at native resolution, each written as a FITS file carrying its
   frame's header cards. Crops come from three disjoint column bands of the frame (left 60%
   train, next 20% val, last 20% test), so no test pixel was ever seen in training; every
   class gets the same number of crops. A share of the crops (``--strip-frac``, 0.4) lose
   their frame-type cards (``IMAGETYP``/``OBSTYPE``, ``OBJECT``, ESO ``DPR *``), as frames do
   after a careless conversion or from cameras that never write them: the model has to read
   those from the pixels and the remaining cards, and the missing cards are imputed and
   flagged. ``data/frames.csv`` is the manifest (``path,label,group,split,header``; group =
   the source frame, header = full or stripped).
2. **Train** ``imgtriage train --model fusion:crop_cnn`` with header cards (``EXPTIME``,
   ``IMAGETYP``/``OBSTYPE``, ``FILTER``, binning, ``CCD-TEMP``, ``BITPIX`` and ESO's
   ``DPR CATG/TYPE/TECH``) and image statistics; the same run with the image branch alone
   (``--model crop_cnn``) is the baseline.
3. **Evaluate** both on the test crops (``imgtriage evaluate --split test``).
4. **Calibrate** two decision profiles on the validation crops, both abstaining: ``precision``
   (per-class thresholds for ``--precision-target``; the default rule) and ``recall``
   (thresholds for ``--recall-target``), and evaluate the test crops under each.
5. **Batch report** ``imgtriage predict`` over an inbox of whole frames never trained on,
   unlabelled frames and broken FITS (truncated, empty, garbage, table-only, undecodable):
   the JSON report and its defect log, every file exactly once.
6. **Celery**: the ``imgtriage.classify_new_files`` task, run eagerly in this process, then
   again after new files arrive: only the new ones are classified. A real deployment runs
   ``IMGTRIAGE_BUNDLE=... celery -A imgtriage.integrations.celery_app worker`` instead.

Everything lands in ``--out`` (default ``runs/examples/observatory``); ``summary.json`` holds
the numbers the README quotes. The test suite runs :func:`main` with small parameters.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FITS_SAMPLES = REPO.parent / "shared" / "datasets" / "fits-samples"
MIDAS_GLOB = "/usr/lib/eso-midas/*/test/prim"
CLASSES = ("arc", "flat", "science", "spectrum")
BANDS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
CARDS = ("EXPTIME,IMAGETYP,FILTER,XBINNING,YBINNING,CCD-TEMP,BITPIX,ESO DPR CATG:category,"
         "ESO DPR TYPE:category,ESO DPR TECH:category")
STATS = "moments,percentiles,shape,saturation,entropy,texture"
# Cards that describe the file's layout, not the frame: never copied onto a crop.
# Cards that name the frame type: removed from the "stripped" crops.
FRAME_TYPE_CARDS = ("IMAGETYP", "OBSTYPE", "FRAMETYP", "OBJECT", "ESO DPR CATG", "ESO DPR TYPE",
                    "ESO DPR TECH")
_STRUCTURAL = ("SIMPLE", "BITPIX", "EXTEND", "BSCALE", "BZERO", "BLANK", "XTENSION", "PCOUNT",
               "GCOUNT", "CHECKSUM", "DATASUM", "COMMENT", "HISTORY", "END", "TFIELDS",
               "EXTNAME", "INHERIT")


@dataclass(frozen=True)
class Frame:
    """One catalogue row: a real file, its frame type ("" = unlabelled) and its role."""

    path: Path
    label: str
    role: str
    evidence: str


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Observatory frames (issue 9, recipe 2).")
    ap.add_argument("--fits-samples", type=Path, default=FITS_SAMPLES)
    ap.add_argument("--midas", type=Path, default=None,
                    help=f"eso-midas-testdata folder (default: the first {MIDAS_GLOB})")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "examples" / "observatory")
    ap.add_argument("--crops-per-class", type=int, default=160,
                    help="training crops per class (val and test get a quarter each)")
    ap.add_argument("--max-crop", type=int, default=256, help="longest crop side, pixels")
    ap.add_argument("--strip-frac", type=float, default=0.4,
                    help="share of crops whose frame-type header cards are removed")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision-target", type=float, default=0.95)
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def midas_folder(given: Path | None) -> Path | None:
    """The eso-midas-testdata folder: ``--midas`` or the installed Debian package's."""
    if given is not None:
        return given if given.is_dir() else None
    found = sorted(glob.glob(MIDAS_GLOB))
    return Path(found[-1]) if found else None


def load_catalogue(fits_dir: Path, midas_dir: Path) -> list[Frame]:
    roots = {"fits": fits_dir, "midas": midas_dir}
    with (HERE / "frames.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    frames = [Frame(roots[r["source"]] / r["file"], r["label"], r["role"], r["evidence"])
              for r in rows]
    missing = [str(f.path) for f in frames if not f.path.is_file()]
    if missing:
        raise SystemExit(f"missing input files: {missing}; install eso-midas-testdata "
                         "(`make system-deps`) and check ../shared/datasets/fits-samples")
    return frames


def imgtriage(*args: Any) -> None:
    """Run one `imgtriage` command in this process (the same code as the shell command)."""
    from imgtriage.cli.main import app

    argv = [str(a) for a in args]
    print("$ imgtriage " + shlex.join(argv), flush=True)
    app(args=argv, standalone_mode=False)


# -- 1. the dataset ------------------------------------------------------------------------
def read_frame(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Pixels (2-D) and the frame's header cards (primary header, then the image HDU's)."""
    from imgtriage.io import read_image

    rec = read_image(path)
    cards = {**(rec.meta.get("primary_header") or {}), **(rec.meta.get("header") or {})}
    pixels = rec.array if rec.array.ndim == 2 else rec.array[..., 0]
    return pixels, cards


def write_fits(path: Path, pixels: np.ndarray, cards: dict[str, Any]) -> None:
    """A FITS file with ``pixels`` and every non-structural card astropy accepts."""
    from astropy.io import fits

    header = fits.Header()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HIERARCH cards and long strings: noise, not errors
        for key, value in cards.items():
            if (not key or key.startswith(_STRUCTURAL) or key.startswith("NAXIS")
                    or not isinstance(value, str | int | float | bool)):
                continue
            try:
                header[key] = value
            except (ValueError, KeyError, fits.VerifyError):
                continue
        fits.PrimaryHDU(np.ascontiguousarray(pixels), header=header).writeto(
            path, overwrite=True, output_verify="silentfix")


def crop_boxes(shape: tuple[int, int], band: tuple[float, float], n: int, cap: int,
               rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """``n`` random boxes (y0, y1, x0, x1) inside the column band, sides 35-100% of the
    band (at most ``cap``)."""
    h, w = shape
    x_lo, x_hi = int(w * band[0]), max(int(w * band[0]) + 1, int(w * band[1]))
    boxes = []
    for _ in range(n):
        ch = min(cap, max(1, round(h * rng.uniform(0.35, 1.0))))
        cw = min(cap, max(1, round((x_hi - x_lo) * rng.uniform(0.35, 1.0))))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(x_lo, x_hi - cw + 1))
        boxes.append((y0, y0 + ch, x0, x0 + cw))
    return boxes


def build_dataset(frames: list[Frame], out: Path, per_class: int, cap: int, seed: int,
                  strip_frac: float) -> dict[str, Any]:
    """Crops of every training frame into ``out/crops`` and the manifest ``out/frames.csv``
    (a ``strip_frac`` share of them without their frame-type cards)."""
    rng = np.random.default_rng(seed)
    strip_rng = np.random.default_rng(seed + 1)  # its own stream: crops do not depend on it
    train = [f for f in frames if f.role == "train"]
    wanted = {"train": per_class, "val": max(2, per_class // 4), "test": max(2, per_class // 4)}
    rows: list[dict[str, str]] = []
    for label in CLASSES:
        members = [f for f in train if f.label == label]
        for i, frame in enumerate(members):
            pixels, cards = read_frame(frame.path)
            for split, total in wanted.items():
                n = total // len(members) + (i < total % len(members))
                for k, (y0, y1, x0, x1) in enumerate(crop_boxes(pixels.shape, BANDS[split], n,
                                                                cap, rng)):
                    name = f"{frame.path.name.split('.fits')[0]}_{split}{k:03d}.fits"
                    target = out / "crops" / label / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    strip = bool(strip_rng.random() < strip_frac)
                    kept = {k: v for k, v in cards.items()
                            if not (strip and k in FRAME_TYPE_CARDS)}
                    write_fits(target, pixels[y0:y1, x0:x1], kept)
                    rows.append({"path": str(target.relative_to(out)), "label": label,
                                 "group": frame.path.name, "split": split,
                                 "header": "stripped" if strip else "full"})
    manifest = out / "frames.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "label", "group", "split", "header"])
        writer.writeheader()
        writer.writerows(rows)
    counts = {s: {c: sum(r["split"] == s and r["label"] == c for r in rows) for c in CLASSES}
              for s in wanted}
    return {"manifest": manifest, "counts": counts, "frames": len(train)}


# -- 5. the inbox ------------------------------------------------------------------------
def build_inbox(frames: list[Frame], inbox: Path) -> dict[str, str]:
    """Whole frames never trained on, unlabelled ones and broken FITS; returns
    ``{file name: expected label or "" }``."""
    inbox.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    for f in frames:
        if f.role == "inbox":
            shutil.copyfile(f.path, inbox / f.path.name)
            expected[f.path.name] = f.label
    good = next(f.path for f in frames if f.path.name == "hbo.fits")
    data = good.read_bytes()
    broken = {"truncated_hbo.fits": data[: len(data) // 3],  # header intact, pixels cut
              "empty.fits": b"",
              "garbage.fits": bytes(range(256)) * 12,
              "header_only.fits": data[:2880]}
    for name, content in broken.items():
        (inbox / name).write_bytes(content)
        expected[name] = ""
    # cut late: most rows are there, so it is read partially and its row flagged "partial"
    (inbox / "cut_late_hbo.fits").write_bytes(data[: len(data) * 9 // 10])
    expected["cut_late_hbo.fits"] = ""
    return expected


# -- the steps ---------------------------------------------------------------------------
def train_both(a: argparse.Namespace, manifest: Path) -> dict[str, Path]:
    common = ["--img-size", a.img_size, "--epochs", a.epochs, "--batch-size", a.batch_size,
              "--scaling", "percentile", "--stretch", "asinh", "--augment", "flip_rot90",
              "--select-metric", "val_loss", "--threads", a.threads, "--seed", a.seed,
              "--quiet"]
    runs = {"fusion": a.out / "run_fusion", "image_only": a.out / "run_image"}
    imgtriage("train", manifest, "--out", runs["fusion"], "--model", "fusion:crop_cnn",
              "--feature-cards", CARDS, "--feature-stats", STATS, *common)
    imgtriage("train", manifest, "--out", runs["image_only"], "--model", "crop_cnn", *common)
    return {k: v / "bundle" for k, v in runs.items()}


def evaluate(bundle: Path, manifest: Path, out: Path, profile: str | None = None
             ) -> dict[str, Any]:
    extra = ["--profile", profile] if profile else []
    imgtriage("evaluate", bundle, manifest, "--split", "test", "--out", out, *extra)
    rep = json.loads((out / "report.json").read_text())
    m = rep["metrics"]
    res = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
           "n": rep["meta"]["n_samples"],
           "recall": {r["class"]: r["recall"] for r in m["per_class"]},
           "precision": {r["class"]: r["precision"] for r in m["per_class"]}}
    if profile and rep.get("decision"):
        res["decision"] = _decision_summary(rep["decision"])
    return res


def accuracy_by_header(bundle: Path, manifest: Path) -> dict[str, Any]:
    """Top-class accuracy on the test crops with full and with stripped headers."""
    from imgtriage.predict import Predictor

    with manifest.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    truth = {str(manifest.parent / r["path"]): (r["label"], r["header"]) for r in rows}
    report = Predictor.load(bundle).predict_paths(list(truth), abstain=False)
    out: dict[str, Any] = {}
    for kind in ("full", "stripped"):
        hits = [r["class"] == truth[r["path"]][0] for r in report["results"]
                if truth[r["path"]][1] == kind]
        out[kind] = {"n": len(hits), "accuracy": float(np.mean(hits)) if hits else None}
    return out


def _decision_summary(d: dict[str, Any]) -> dict[str, Any]:
    keys = ("coverage", "accuracy_at_coverage", "selective_accuracy", "abstained", "n_abstained")
    out = {k: d[k] for k in keys if k in d}
    for k in ("abstain", "metrics"):
        if isinstance(d.get(k), dict):
            out.update({f"{k}.{kk}": v for kk, v in d[k].items()
                        if isinstance(v, int | float | type(None))})
    return out


def calibrate(a: argparse.Namespace, bundle: Path, manifest: Path) -> dict[str, Any]:
    imgtriage("calibrate", bundle, manifest, "--split", "val", "--threshold-strategy",
              "target_precision", "--target", a.precision_target, "--abstain", "--profile",
              "precision", "--make-default")
    imgtriage("calibrate", bundle, manifest, "--split", "val", "--threshold-strategy",
              "target_recall", "--target", a.recall_target, "--abstain", "--profile", "recall",
              "--keep-default")
    from imgtriage.bundle import load_bundle

    m = load_bundle(bundle).manifest
    return {p: {"thresholds": dict(zip(m["classes"], m["profiles"][p]["thresholds"],
                                       strict=True)),
                "temperature": m["profiles"][p]["temperature"]}
            for p in ("precision", "recall")}


def batch_report(bundle: Path, inbox: Path, out: Path, expected: dict[str, str]
                 ) -> dict[str, Any]:
    report_path, defects_path = out / "inbox_report.json", out / "inbox_defects.json"
    t0 = time.perf_counter()
    imgtriage("predict", bundle, inbox, "--output", report_path, "--defect-log", defects_path,
              "--backend", "torch", "--include-probs", "--no-progress")
    seconds = time.perf_counter() - t0
    rep = json.loads(report_path.read_text())
    rows = {Path(r["path"]).name: r for r in rep["results"]}
    labelled = [n for n, lab in expected.items() if lab and n in rows]
    return {"files": len(expected), "results": len(rep["results"]),
            "defects": len(rep["defects"]), "coverage": rep["meta"].get("coverage"),
            "defect_issues": {Path(d["path"]).name: d["issue"] for d in rep["defects"]},
            "answers": {n: r["class"] for n, r in sorted(rows.items())},
            "flagged": {n: r["flags"] for n, r in sorted(rows.items()) if r.get("flags")},
            "new_frames_correct": sum(rows[n]["class"] == expected[n] for n in labelled),
            "new_frames": len(labelled), "seconds": round(seconds, 2),
            "defect_log_rows": len(json.loads(defects_path.read_text()))}


def celery_step(bundle: Path, inbox: Path, out: Path, arrivals: list[Path]) -> dict[str, Any]:
    """The Celery task, eagerly: the inbox, then again after ``arrivals`` land in it."""
    from imgtriage.integrations.celery_tasks import classify_new_files

    store = out / "inbox_store.sqlite"
    store.unlink(missing_ok=True)
    first = classify_new_files.apply(args=[[str(inbox)], str(store)],
                                     kwargs={"bundle": str(bundle)}).get()
    for f in arrivals:
        shutil.copyfile(f, inbox / f"new_{f.name}")
    second = classify_new_files.apply(args=[[str(inbox)], str(store)],
                                      kwargs={"bundle": str(bundle)}).get()
    return {"first_run_files": first["meta"]["num_files"],
            "second_run_files": second["meta"]["num_files"],
            "second_run_skipped": second["meta"]["n_skipped"],
            "second_run_answers": {Path(r["path"]).name: r["class"]
                                   for r in second["results"]}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    t0 = time.perf_counter()
    midas = midas_folder(a.midas)
    if midas is None or not a.fits_samples.is_dir():
        raise SystemExit("needs ../shared/datasets/fits-samples and eso-midas-testdata "
                         f"({MIDAS_GLOB}; `make system-deps` installs it)")
    frames = load_catalogue(a.fits_samples, midas)
    if a.out.exists():
        shutil.rmtree(a.out)
    a.out.mkdir(parents=True)
    data = build_dataset(frames, a.out / "data", a.crops_per_class, a.max_crop, a.seed,
                         a.strip_frac)
    manifest = data["manifest"]
    bundles = train_both(a, manifest)
    summary: dict[str, Any] = {"counts": data["counts"], "training_frames": data["frames"]}
    summary["test_fusion"] = evaluate(bundles["fusion"], manifest, a.out / "eval_fusion")
    summary["test_image_only"] = evaluate(bundles["image_only"], manifest, a.out / "eval_image")
    summary["test_by_header"] = {k: accuracy_by_header(b, manifest) for k, b in bundles.items()}
    summary["profiles"] = calibrate(a, bundles["fusion"], manifest)
    for p in ("precision", "recall"):
        summary[f"test_{p}_profile"] = evaluate(bundles["fusion"], manifest,
                                                a.out / f"eval_{p}", p)
    inbox = a.out / "inbox"
    expected = build_inbox(frames, inbox)
    summary["inbox"] = batch_report(bundles["fusion"], inbox, a.out, expected)
    arrivals = sorted((a.out / "data" / "crops" / "flat").glob("*_test*.fits"))[:2]
    summary["celery"] = celery_step(bundles["fusion"], inbox, a.out, arrivals)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    given = sys.argv[1:] if argv is None else list(argv)
    summary["command"] = "python examples/observatory/run.py " + shlex.join(map(str, given))
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
