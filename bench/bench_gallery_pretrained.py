"""K-shot galleries on 10 CIFAR classes through the product path: the pretrained encoder
against the episodic one, from the same K photos per class (issue 14).

Each round draws K photos per class from ``../shared/datasets/cifar10-small/train`` (seeded by
the round) into a class-folder tree, as a user with K photos would have, and for each arm
runs what that user runs:

* ``pretrained``: ``train_fewshot(folder, run, FewShotConfig(encoder="pretrained"))``, i.e.
  ``imgtriage train-fewshot FOLDER --encoder pretrained`` (what ``--encoder auto`` picks for
  colour photos): every photo through the ImageNet EfficientNet-Lite0 at 224 px, no training,
  the similarity threshold fitted left-one-out on the enrolled photos;
* ``episodic``: the same with ``--encoder episodic`` (a Siamese encoder trained on those K
  photos per class, 64 px, the threshold fitted on the validation split it holds out) for
  ``--episodic-epochs`` x ``--episodic-episodes`` (default 4 x 40, the recipe of issue 18's
  bench: the command's default 10 x 100 took ~8 minutes per run on the loaded machine, and
  on 1-5 photos per class the training accuracy is 1.0 after the first epoch);

* ``episodic-seen`` (with ``--seen DIR``, e.g. other classes of the same modality): the
  Siamese encoder trained once per round on ``DIR`` (``train_fewshot``, the same recipe),
  then ``imgtriage gallery create ENCODER SUPPORT`` enrols the K photos per class through it
  -- the signal lab's flow (train on the classes you have, enrol new ones);

then ``Predictor.load(bundle).predict_paths([test/])`` answers all 1,000 test photos
(10-way). Reported per arm and K: accuracy of the best-matching class (closed set, as if no
threshold), the share answered under the bundle's threshold (coverage) and the accuracy of
those answers, the time to build the bundle and to answer the 1,000 photos, and (issue 15)
the calibration of the answers: test NLL and 15-bin ECE of ``softmax(scale * similarity)``
at the scale the bundle fitted on its held-out similarities against the old fixed scale 10
(same similarities: every class's, from the rows' top-k), with the held-out NLL/ECE the fit
itself reported, and (reference only) at the scale fitted on the test similarities
themselves. Arms are
interleaved within each round; the summary gives medians (min-max) over rounds, and the
within-round difference of the accuracies.

Usage (the CPU is shared: take the lock)::

    flock /tmp/imgtriage-bench.lock nice -n 10 .venv/bin/python \\
        bench/bench_gallery_pretrained.py --rounds 3 --shots 1,5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "cifar10-small"
ARMS = ("pretrained", "episodic")


def _draw(data: Path, shots: int, seed: int, dest: Path) -> Path:
    """K photos per class of ``data/train``, copied into ``dest/<class>/``."""
    rng = np.random.default_rng([seed, shots])
    for cls in sorted(p for p in (data / "train").iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        (dest / cls.name).mkdir(parents=True, exist_ok=True)
        for i in rng.choice(len(files), shots, replace=False):
            shutil.copy(files[i], dest / cls.name / files[i].name)
    return dest


def _score(report: dict, test: Path, classes: list[str] | None = None,
           scale: float | None = None) -> dict[str, float]:
    rows = report["results"]
    truth = [Path(r["path"]).relative_to(test).parts[0] for r in rows]
    best = [r.get("best_class", r["class"]) for r in rows]
    answered = np.array([not r["abstained"] for r in rows])
    right = np.array([b == t for b, t in zip(best, truth, strict=True)])
    out = {"accuracy": float(right.mean()), "coverage": float(answered.mean()),
           "answered_accuracy": float(right[answered].mean()) if answered.any() else None,
           "n_test": len(rows), "defects": len(report["defects"])}
    if classes and scale and all("similarity" in e for r in rows for e in r.get("topk", [])):
        out.update(_calibration(rows, truth, classes, scale))
    return out


def _calibration(rows: list[dict], truth: list[str], classes: list[str], scale: float
                 ) -> dict[str, float]:
    """Test NLL and 15-bin ECE of softmax(scale * similarity) at the bundle's scale and at the
    old fixed 10, from every class's similarity (the rows' top-k over all classes)."""
    from imgtriage.evaluate import (
        expected_calibration_error,
        fit_temperature,
        nll_at_temperature,
        softmax,
    )

    index = {c: i for i, c in enumerate(classes)}
    sims = np.full((len(rows), len(classes)), np.nan)
    for i, r in enumerate(rows):
        for e in r["topk"]:
            sims[i, index[e["class"]]] = e["similarity"]
    keep = np.isfinite(sims).all(axis=1) & np.array([t in index for t in truth])
    sims, y = sims[keep], np.array([index[t] for t, k in zip(truth, keep, strict=True) if k])
    # reference only: the scale fitted on these test similarities themselves (no bundle can
    # know it): how much of the remaining miscalibration a better scale could remove
    oracle = scale / fit_temperature(sims * scale, y)[0]
    out = {"scale": scale, "oracle_scale": oracle, "n_calibration": int(keep.sum())}
    for name, s in (("fitted", scale), ("fixed10", 10.0), ("oracle", oracle)):
        out[f"nll_{name}"] = nll_at_temperature(sims * s, y, 1.0)
        out[f"ece_{name}"] = expected_calibration_error(softmax(sims * s), y)
    return out


def _config(arm: str, seed: int, threads: int, episodic: tuple[int, int]) -> object:
    from dataclasses import replace

    from imgtriage.train.fewshot import FewShotConfig

    cfg = FewShotConfig(encoder=arm, seed=seed, num_threads=threads)
    if arm == "episodic":
        cfg = replace(cfg, epochs=episodic[0], episodes=episodic[1])
    return cfg


def train_seen(seen: Path, out: Path, seed: int, threads: int, episodic: tuple[int, int]
               ) -> tuple[Path, float]:
    """The episodic encoder trained on the ``--seen`` classes: (its bundle, seconds)."""
    from imgtriage.train.fewshot import train_fewshot

    t0 = time.perf_counter()
    res = train_fewshot(seen, out, _config("episodic", seed, threads, episodic), quiet=True)
    return res.bundle_path, time.perf_counter() - t0


def run_arm(arm: str, support: Path, test: Path, out: Path, seed: int, threads: int,
            episodic: tuple[int, int] = (4, 40), encoder: Path | None = None) -> dict:
    from imgtriage.predict import Predictor
    from imgtriage.predict.gallery_edit import create_gallery
    from imgtriage.train.fewshot import train_fewshot

    t0 = time.perf_counter()
    if arm == "episodic-seen":  # enrol the support through the encoder trained on --seen
        bundle = create_gallery(encoder, support, out / "bundle").path
        rule, enrolled = "no threshold (gallery create)", None
    else:
        res = train_fewshot(support, out, _config(arm, seed, threads, episodic), quiet=True)
        bundle, rule, enrolled = res.bundle_path, res.rule, res.metrics.get("train_count")
    t1 = time.perf_counter()
    p = Predictor.load(bundle, num_threads=threads)
    report = p.predict_paths([test], topk=len(p.classes))  # every class's similarity
    t2 = time.perf_counter()
    fit = p.bundle.info.block("scale_fit") or {}
    held_out = {f"held_out_{k}": fit[k] for k in ("nll_before", "nll_after", "ece_before",
                                                   "ece_after") if k in fit}
    return {**_score(report, test, list(p.classes), p.config.scale), **held_out,
            "build_s": t1 - t0, "predict_s": t2 - t1, "threshold": rule,
            "scale_fit": fit.get("line"), "enrolled": enrolled}


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(min(values)),
            "max": float(max(values)), "n": len(values)}


def summarise(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    keys = ("accuracy", "coverage", "answered_accuracy", "build_s", "predict_s", "scale",
            "oracle_scale", "ece_fitted", "ece_fixed10", "ece_oracle", "nll_fitted",
            "nll_fixed10", "nll_oracle", "held_out_nll_before",
            "held_out_nll_after", "held_out_ece_before", "held_out_ece_after")
    for k in sorted({r["shots"] for r in rows}):
        for arm in sorted({r["arm"] for r in rows}):
            mine = [r for r in rows if r["arm"] == arm and r["shots"] == k]
            out[f"{arm} {k}-shot"] = {key: _stats([r[key] for r in mine
                                                   if r.get(key) is not None])
                                      for key in keys if any(r.get(key) is not None
                                                             for r in mine)}
        pairs = {r["round"]: {} for r in rows if r["shots"] == k}
        for r in rows:
            if r["shots"] == k:
                pairs[r["round"]][r["arm"]] = r["accuracy"]
        for arm in sorted({r["arm"] for r in rows}):  # fitted scale - fixed 10, within round
            mine = [r for r in rows if r["arm"] == arm and r["shots"] == k and "ece_fitted" in r]
            for m in ("ece", "nll"):
                diff = [r[f"{m}_fitted"] - r[f"{m}_fixed10"] for r in mine]
                if diff:
                    out[f"{arm} {k}-shot {m} fitted - fixed 10"] = _stats(diff)
        for other in ("episodic", "episodic-seen"):
            diff = [p["pretrained"] - p[other] for p in pairs.values()
                    if "pretrained" in p and other in p]
            if diff:
                out[f"pretrained - {other} {k}-shot accuracy"] = _stats(diff)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--shots", default="1,5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--episodic-epochs", type=int, default=4)
    ap.add_argument("--episodic-episodes", type=int, default=40)
    ap.add_argument("--seen", type=Path, default=None,
                    help="class folders to train the episodic-seen arm's encoder on")
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-bench-gallery.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the imgtriage command sets it
    shots = [int(s) for s in args.shots.split(",")]
    arms = args.arms.split(",")
    test = args.data / "test"
    load0, rows = os.getloadavg()[0], []
    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as tmp:
        episodic = (args.episodic_epochs, args.episodic_episodes)
        for rnd in range(args.rounds):
            encoder, seen_s = None, None
            if "episodic-seen" in arms:
                if args.seen is None:
                    raise SystemExit("the episodic-seen arm needs --seen DIR")
                encoder, seen_s = train_seen(args.seen, Path(tmp) / f"r{rnd}-seen", rnd,
                                             args.threads, episodic)
            for k in shots:
                support = _draw(args.data, k, rnd, Path(tmp) / f"r{rnd}-k{k}" / "support")
                for arm in (arms if rnd % 2 == 0 else arms[::-1]):  # alternate the order
                    row = {"round": rnd, "shots": k, "arm": arm, "load_1min": os.getloadavg()[0],
                           **run_arm(arm, support, test, Path(tmp) / f"r{rnd}-k{k}" / arm,
                                     rnd, args.threads, episodic, encoder)}
                    if arm == "episodic-seen":
                        row["train_seen_s"] = seen_s
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {"data": str(args.data), "rounds": args.rounds, "shots": shots, "arms": arms,
              "threads": args.threads,
              "episodic": [args.episodic_epochs, args.episodic_episodes],
              "load_avg_1min_at_start": load0,
              "load_avg_1min_at_end": os.getloadavg()[0], "rows": rows,
              "summary": summarise(rows)}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))
    return result


if __name__ == "__main__":
    main()
