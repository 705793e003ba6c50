"""Signal crops with few labels: 64x64 grayscale MSTAR crops at 25, 100 and 500 labels.

1. Cut the centre 64x64 crop (the target and most of its shadow) out of every 128x128 MSTAR
   chip in ``../shared/datasets/mstar-soc10`` (train at 17 deg depression, test at 15 deg).
   Nine classes are the lab's known targets; the tenth (``--new-class``, ZSU234) is kept back.
2. For each label budget (``--budgets``, default 25,100,500) draw that many labelled train
   crops of the nine known classes (spread evenly, nested: the 25 are among the 100, the 100
   among the 500) and train with ``--model auto``, every label training (``--val-frac 0``):
   auto picks the Siamese/prototype encoder under 300 labels, the shallow crop_cnn under 500,
   the deeper deep_cnn from 500 on, and says why.
3. Score every model on the MSTAR test crops of the nine known classes: accuracy, per-class
   recall, coverage, files/second.
4. Few-shot gallery from the smallest budget's Siamese encoder (``imgtriage gallery create``):
   the same labelled crops enrolled as prototypes; then ``imgtriage gallery add`` enrols the
   new class from ``--enrol-shots`` crops -- no retraining, the encoder weights keep their
   sha256 -- and the 10-class gallery is scored on the test crops of all ten classes. Each
   larger budget's labels are enrolled into a gallery over the same encoder too: what more
   labels buy without retraining.

5. With ``--unlabeled``: each budget is trained once more with the known classes' other train
   crops as unlabelled images (``imgtriage train --unlabeled``, semi-supervised FixMatch with
   an EMA teacher), the same small CNN with and without them, for ``--semi-steps`` steps.

Everything lands in ``--out`` (``results.json`` holds every number the README quotes).

Usage (2 CPU cores; the full size takes a few minutes):
    .venv/bin/python examples/signal-crops/run.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "datasets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mstar", type=Path, default=SHARED / "mstar-soc10")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "examples" / "signal-crops")
    ap.add_argument("--budgets", default="25,100,500", help="label counts, comma-separated")
    ap.add_argument("--new-class", default="ZSU234", help="class kept back, then enrolled")
    ap.add_argument("--enrol-shots", type=int, default=5, help="crops the new class enrols")
    ap.add_argument("--crop", type=int, default=64, help="side of the centre crop")
    ap.add_argument("--train-per-class", type=int, default=None,
                    help="crop only this many train chips per class (default: all)")
    ap.add_argument("--test-per-class", type=int, default=None,
                    help="score on this many test chips per class (default: all)")
    ap.add_argument("--steps", type=int, default=None,
                    help="image passes per run (default: 4000 + 8 x labels, so small "
                         "budgets get many epochs); --epochs overrides")
    ap.add_argument("--epochs", type=int, default=None, help="the same epochs for every run")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--scaling", default="percentile", choices=("dtype", "minmax", "percentile"),
                    help="per-crop percentile scaling evens out the 15-degree test chips, "
                         "darker than the 17-degree train chips (docs/benchmarks.md)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unlabeled", action="store_true",
                    help="also train every budget with the other train crops of the known "
                         "classes as unlabelled images, against the same model without them")
    ap.add_argument("--semi-steps", type=int, default=2400,
                    help="optimiser steps of each --unlabeled comparison run (the library's "
                         "--semi-steps default; the README's table used 1200)")
    ap.add_argument("--semi-method", default="fixmatch_ema")
    return ap.parse_args(argv)


# -- 1. crops ----------------------------------------------------------------------------------
def make_crops(mstar: Path, root: Path, crop: int, train_per_class: int | None,
               test_per_class: int | None, seed: int = 0) -> dict[str, dict[str, int]]:
    """``root/{train,test}/<class>/*.png``: centre crops, reused when already cut."""
    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {}
    for split, limit in (("train", train_per_class), ("test", test_per_class)):
        counts[split] = {}
        for cdir in sorted(p for p in (mstar / split).iterdir() if p.is_dir()):
            files = sorted(cdir.glob("*.jpeg"))
            if limit is not None and limit < len(files):
                files = [files[i] for i in sorted(rng.choice(len(files), limit, replace=False))]
            out = root / split / cdir.name
            out.mkdir(parents=True, exist_ok=True)
            want = {f"{f.stem}.png" for f in files}
            for old in out.glob("*.png"):
                if old.name not in want:
                    old.unlink()
            for f in files:
                dst = out / f"{f.stem}.png"
                if dst.exists():
                    continue
                with Image.open(f) as img:
                    w, h = img.size
                    left, top = (w - crop) // 2, (h - crop) // 2
                    img.convert("L").crop((left, top, left + crop, top + crop)).save(dst)
            counts[split][cdir.name] = len(files)
    return counts


def _files(root: Path, classes: list[str]) -> tuple[list[str], list[str]]:
    paths, labels = [], []
    for c in classes:
        for f in sorted((root / c).glob("*.png")):
            paths.append(str(f))
            labels.append(c)
    return paths, labels


def label_budget(train_root: Path, classes: list[str], n: int, seed: int
                 ) -> tuple[list[str], list[str]]:
    """``n`` labelled crops spread evenly over ``classes``; nested across budgets (each class's
    crops are taken in one fixed random order)."""
    per = {c: n // len(classes) + (i < n % len(classes)) for i, c in enumerate(classes)}
    paths, labels = [], []
    for c in classes:
        files = sorted((train_root / c).glob("*.png"))
        if per[c] > len(files):
            raise SystemExit(f"{train_root / c} has {len(files)} crops; a budget of {n} needs "
                             f"{per[c]} (raise --train-per-class)")
        order = np.random.default_rng([seed, classes.index(c)]).permutation(len(files))
        paths += [str(files[i]) for i in order[:per[c]]]
        labels += [c] * per[c]
    return paths, labels


# -- 2. training -------------------------------------------------------------------------------
def train_budget(manifest: Path, run: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    epochs = args.epochs or max(2, round((args.steps or 4000 + 8 * n) / n))
    cfg = TrainConfig(model="auto", epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                      val_frac=0.0, augment="shift", scaling=args.scaling, seed=args.seed,
                      num_threads=args.threads, checkpoint_every=0)
    res = train(manifest, run, cfg, quiet=True)
    chosen = json.loads((run / "config.json").read_text())
    why = json.loads((run / "run.json").read_text())["model_choice"]
    print(f"{n} labels -> {chosen['model']} at {chosen['img_size']} px, {epochs} epochs, "
          f"{res.seconds:.0f}s ({why})", flush=True)
    return {"labels": n, "model": chosen["model"], "img_size": chosen["img_size"],
            "epochs": epochs, "model_choice": why, "train_seconds": round(res.seconds, 1),
            "bundle": str(res.bundle_path)}


# -- 2b. semi-supervised: the same small CNN with and without the unlabelled crops -----------
SEMI_MODEL = {"model": "crop_cnn", "model_kwargs": {"widths": [16, 32, 64, 128]},
              "drop_rate": 0.2, "ema_decay": 0.99, "augment": "weak"}


def unlabeled_folder(train_root: Path, classes: list[str], labelled: list[str], out: Path
                     ) -> Path:
    """``out``: links to every train crop of ``classes`` that is not labelled, named by
    index only (the class folder, i.e. the label, is not carried over)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    taken = {str(Path(p).resolve()) for p in labelled}
    rest = [f for c in classes for f in sorted((train_root / c).glob("*.png"))
            if str(f.resolve()) not in taken]
    for i, f in enumerate(rest):
        (out / f"{i:05d}.png").symlink_to(f.resolve())
    return out


def train_pair(manifest: Path, box: Path, out: Path, n: int, args: argparse.Namespace
               ) -> dict[str, Any]:
    """The same recipe without and with ``--unlabeled box``; returns both runs."""
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    epochs = max(1, -(-args.semi_steps // -(-n // args.batch_size)))
    pair = {}
    for arm, folder in (("labels", ""), ("semi", str(box))):
        cfg = TrainConfig(**SEMI_MODEL, epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                          val_frac=0.0, scaling=args.scaling, seed=args.seed,
                          num_threads=args.threads, checkpoint_every=0, unlabeled=folder,
                          semi_method=args.semi_method, semi_steps=0, pseudo_threshold=0.9)
        res = train(manifest, out / f"run-{n}-{arm}", cfg, quiet=True)
        pair[arm] = {"bundle": str(res.bundle_path), "train_seconds": round(res.seconds, 1),
                     "epochs": epochs}
    pair["unlabeled"] = sum(1 for _ in box.iterdir())
    return pair


# -- 3. scoring --------------------------------------------------------------------------------
def score(predictor: Any, files: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy (abstentions count as wrong), per-class recall, coverage, files/second (after
    a warm-up batch, so one-time start-up costs are not counted); checks that the report
    holds every file exactly once."""
    predictor.predict_paths(files[:64], batch_size=64, workers=2)
    t0 = time.perf_counter()
    report = predictor.predict_paths(files, batch_size=64, workers=2)
    sec = time.perf_counter() - t0
    truth = dict(zip(files, labels, strict=True))
    seen = [r["path"] for r in report["results"]] + [d["path"] for d in report["defects"]]
    if sorted(seen) != sorted(files):
        raise RuntimeError("the report does not hold every test file exactly once")
    hit: dict[str, list[bool]] = {c: [] for c in dict.fromkeys(labels)}
    for r in report["results"]:
        hit[truth[r["path"]]].append(r["class"] == truth[r["path"]])
    n = max(len(files), 1)
    return {"files": len(files), "defects": len(report["defects"]),
            "accuracy": sum(sum(h) for h in hit.values()) / n,
            "recall": {c: float(np.mean(h)) if h else None for c, h in hit.items()},
            "coverage": sum(not r["abstained"] for r in report["results"]) / n,
            "seconds": round(sec, 2), "files_per_s": len(files) / sec}


# -- 4. the gallery ----------------------------------------------------------------------------
def gallery_steps(encoder_bundle: Path, manifest: Path, out: Path, new_class: str,
                  shots: list[str], tests: dict[str, tuple[list[str], list[str]]]
                  ) -> dict[str, Any]:
    """Create a gallery from ``encoder_bundle``'s encoder and the labelled crops, score it,
    enrol ``shots`` as ``new_class``, score again on all classes."""
    from imgtriage.bundle import load_bundle
    from imgtriage.predict import Predictor
    from imgtriage.predict.gallery_edit import create_gallery, describe_gallery, enrol_images

    before = create_gallery(encoder_bundle, manifest, out / "gallery")
    after = enrol_images(out / "gallery", new_class, shots, out=out / "gallery-enrolled")
    w0 = load_bundle(before.path).manifest["files"]["weights.safetensors"]
    w1 = load_bundle(after.path).manifest["files"]["weights.safetensors"]
    known = score(Predictor.load(before.path), *tests["known"])
    enrolled = Predictor.load(after.path)
    everything = score(enrolled, *tests["all"])
    new_only = score(enrolled, *tests["new"])
    info = describe_gallery(after.path)
    print(f"gallery ({len(before.classes)} classes): accuracy {known['accuracy']:.4f}; after "
          f"enrolling {new_class} from {len(shots)} crops: {everything['accuracy']:.4f} on all "
          f"{len(info['classes'])} classes, {new_class} recall "
          f"{everything['recall'][new_class]:.4f}", flush=True)
    return {"bundle": str(before.path), "enrolled_bundle": str(after.path),
            "new_class": new_class, "enrol_shots": shots,
            "encoder_unchanged": w0 == w1, "encoder_sha256": w1,
            "rule": info["rule"], "classes": info["classes"],
            "known_classes_before": known, "all_classes_after": everything,
            "new_class_only_after": new_only}


def galleries_by_budget(encoder_bundle: Path, runs: list[dict], out: Path,
                        known: tuple[list[str], list[str]]) -> dict[str, dict[str, Any]]:
    """What more labels buy without retraining: each budget's labelled crops enrolled into a
    gallery over the same (smallest-budget) Siamese encoder, scored on the known classes."""
    from imgtriage.predict import Predictor
    from imgtriage.predict.gallery_edit import create_gallery

    scores = {}
    for r in runs:
        path = create_gallery(encoder_bundle, r["manifest"], out / f"gallery-{r['labels']}").path
        scores[str(r["labels"])] = {"bundle": str(path), **score(Predictor.load(path), *known)}
        print(f"  gallery of {r['labels']} labels over the same encoder: accuracy "
              f"{scores[str(r['labels'])]['accuracy']:.4f}", flush=True)
    return scores


# -- the recipe --------------------------------------------------------------------------------
def _table(runs: list[dict], gallery: dict | None, classes: list[str]) -> str:
    head = ("| labels | model (auto) | test accuracy | " + " | ".join(classes)
            + " | coverage | files/s | train s |")
    lines = [head, "|---:|---|---:|" + "---:|" * len(classes) + "---:|---:|---:|"]
    rows = [(str(r["labels"]), r["model"], r["test"], r["train_seconds"]) for r in runs]
    for n, t in (gallery or {}).get("by_budget", {}).items():
        rows.append((n, "gallery over the siamese encoder", t, 0.0))
    for n, model, t, sec in rows:
        lines.append(f"| {n} | {model} | {t['accuracy']:.4f} | " + " | ".join(
            f"{t['recall'][c]:.2f}" for c in classes) + f" | {t['coverage']:.0%} | "
            f"{t['files_per_s']:.0f} | {sec:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the whole recipe; returns (and writes to ``OUT/results.json``) every number."""
    args = parse_args(argv)
    import torch

    from imgtriage.data import write_manifest
    from imgtriage.predict import Predictor

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    counts = make_crops(args.mstar, out / "crops", args.crop, args.train_per_class,
                        args.test_per_class, args.seed)
    classes = [c for c in counts["train"] if c != args.new_class]
    if args.new_class not in counts["train"]:
        raise SystemExit(f"--new-class {args.new_class} is not an MSTAR class: "
                         f"{sorted(counts['train'])}")
    print(f"crops {out / 'crops'}: {sum(counts['train'].values())} train, "
          f"{sum(counts['test'].values())} test, {args.crop}x{args.crop}; known classes "
          f"{classes}, new class {args.new_class}", flush=True)
    tests = {"known": _files(out / "crops" / "test", classes),
             "new": _files(out / "crops" / "test", [args.new_class]),
             "all": _files(out / "crops" / "test", [*classes, args.new_class])}
    runs = []
    for n in sorted(int(b) for b in args.budgets.split(",")):
        paths, labels = label_budget(out / "crops" / "train", classes, n, args.seed)
        manifest = write_manifest(out / f"labels-{n}.csv", paths, labels)
        run = train_budget(manifest, out / f"run-{n}", n, args)
        run["manifest"] = str(manifest)
        run["test"] = score(Predictor.load(run["bundle"]), *tests["known"])
        print(f"  test accuracy {run['test']['accuracy']:.4f} on {run['test']['files']} crops",
              flush=True)
        if args.unlabeled:
            box = unlabeled_folder(out / "crops" / "train", classes, paths,
                                   out / f"unlabeled-{n}")
            run["semi"] = train_pair(manifest, box, out, n, args)
            for arm in ("labels", "semi"):
                run["semi"][arm]["test"] = score(Predictor.load(run["semi"][arm]["bundle"]),
                                                 *tests["known"])
            print(f"  small CNN, {args.semi_steps} steps: test accuracy "
                  f"{run['semi']['labels']['test']['accuracy']:.4f} from the labels only, "
                  f"{run['semi']['semi']['test']['accuracy']:.4f} with "
                  f"{run['semi']['unlabeled']} unlabelled crops", flush=True)
        runs.append(run)
    gallery = None
    siamese = next((r for r in runs if r["model"] == "siamese"), None)
    if siamese is not None:
        new_train = sorted((out / "crops" / "train" / args.new_class).glob("*.png"))
        pick = np.random.default_rng(args.seed).permutation(len(new_train))[:args.enrol_shots]
        gallery = gallery_steps(Path(siamese["bundle"]), Path(siamese["manifest"]), out,
                                args.new_class, [str(new_train[i]) for i in sorted(pick)],
                                tests)
        gallery["by_budget"] = galleries_by_budget(Path(siamese["bundle"]), runs, out,
                                                   tests["known"])
    print(_table(runs, gallery, classes), flush=True)
    results = {"command": "examples/signal-crops/run.py " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "crops": {"root": str(out / "crops"), "size": args.crop, "counts": counts},
               "known_classes": classes, "runs": runs, "gallery": gallery,
               "wall_seconds": round(time.perf_counter() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wall time {results['wall_seconds']:.0f}s -> {out / 'results.json'}", flush=True)
    return results


if __name__ == "__main__":
    main()
