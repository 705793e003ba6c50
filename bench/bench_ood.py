"""Out-of-distribution detection of default bundles: the bundle's OOD score (``knn+rmd``:
the larger of the standardised k-NN distance and relative Mahalanobis distance on the
normalised penultimate features) against max-softmax probability (MSP, the baseline) and,
to pick the default by measurement, its two parts alone (plain k-NN with k = 10, the old
default, on the same bank; relative Mahalanobis) and the energy score (Liu et al. 2020), in
the same run, on the same images.

Tasks (each trained with ``imgtriage.train`` and its *default* calibration, per seed):

* ``mstar``: 10-class MSTAR SOC model; ID = the 15 deg test chips; far OOD = CIFAR-10 test
  photos, SIRST infrared frames and synthetic noise (uniform and Gaussian, 128 px).
* ``mstar6``: the first 6 MSTAR classes only; near OOD = the test chips of the other 4.
* ``fashion``: Fashion-MNIST model (a class-balanced subset of train); ID = the official
  10,000 test images (1,000 would put the 15-bin ECE of a perfectly calibrated model at
  ~2.6%, above the 2% goal); near OOD = scikit-learn digits (8x8 upscaled to 28 px, white on
  black like Fashion-MNIST).

Reported per task: AUROC and FPR at 95% TPR of both scores (OOD = positive for AUROC; FPR =
share of OOD accepted while 95% of ID test images are), ECE of the calibrated default bundle on
the ID test split (beside the ECE a perfectly calibrated model with the same confidences
would show on that many images, and the ECE at the temperature fitted on test itself),
the share of ID test images the OOD rule accepts (95% promised on exchangeable data),
accuracy and coverage of ID test images under the default rule with and without its OOD part,
and prediction throughput with the OOD scorer vs without (``rounds``
interleaved rounds, median of within-round ratios). Medians (min-max) over seeds.

Usage (the machine is shared: take the lock for the timed part, one seed per run):
    for s in 0 1 2; do flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_ood.py \\
        --seeds $s --out /tmp/oodbench-s$s; done
    .venv/bin/python bench/bench_ood.py --merge /tmp/oodbench-s*/rows.json
or train and score without the lock (``--rounds 0``: nothing timed) and time afterwards:
    .venv/bin/python bench/bench_ood.py --seeds 0 --rounds 0 --out /tmp/oodbench-s0
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_ood.py --throughput-only \\
        --out /tmp/oodbench-s0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "datasets" for p in (REPO.parent, REPO.parent.parent)
               if (p / "shared" / "datasets").is_dir()), REPO.parent / "shared" / "datasets")
MSTAR = SHARED / "mstar-soc10"
MSTAR_CFG = dict(model="crop_cnn", model_kwargs={"widths": [16, 32, 64, 128]}, img_size=64,
                 resize="shorter_crop", crop_pct=0.6875, scaling="percentile", augment="shift",
                 epochs=12, lr=2e-3, label_smoothing=0.1, val_frac=0.1)
# ``--mstar-recipe strong``: the accuracy section's run G (bench_accuracy.py's MSTAR recipe,
# 98.1-98.4% test accuracy, ~10 min per model alone on 2 cores), where the default above is
# the quick 12-epoch recipe (test accuracy 79-88%).
MSTAR_STRONG_CFG = dict(MSTAR_CFG, model_kwargs={"widths": [16, 32, 64, 128],
                                                 "convs_per_block": 2},
                        augment="light", modality="generic", epochs=40, schedule="onecycle",
                        ema_decay=0.995)
# ``--mstar-recipe default``: `imgtriage train` with no options at all (what a new user gets)
MSTAR_RECIPES = {"small": MSTAR_CFG, "strong": MSTAR_STRONG_CFG, "default": {}}
FASHION_CFG = dict(model="crop_cnn", img_size=28, epochs=6, lr=3e-3, augment="flip",
                   val_frac=0.1)


def _files(root: Path) -> dict[str, list[Path]]:
    return {c.name: sorted(c.iterdir()) for c in sorted(root.iterdir()) if c.is_dir()}


def _noise(out: Path, n: int = 100) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(123)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a = (rng.integers(0, 256, (128, 128)) if i % 2 else
             np.clip(rng.normal(128, 50, (128, 128)), 0, 255)).astype(np.uint8)
        paths.append(out / f"noise{i:03d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


def _digits(out: Path) -> list[Path]:
    from PIL import Image
    from sklearn.datasets import load_digits

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(load_digits().images):
        a = (im / 16 * 255).astype(np.uint8)
        paths.append(out / f"digit{i:04d}.png")
        Image.fromarray(a).resize((28, 28), Image.BILINEAR).save(paths[-1])
    return paths


def _fashion(out: Path, per_class_train: int) -> tuple[Path, list]:
    """A class-balanced training subset of Fashion-MNIST train; the official test set."""
    from PIL import Image

    from imgtriage.demo import FASHION_CLASSES, _find_idx, _read_idx

    x, y = _read_idx(_find_idx("train-images-idx3-ubyte")), _read_idx(
        _find_idx("train-labels-idx1-ubyte"))
    rng = np.random.default_rng(0)
    for c in range(10):
        for i in rng.permutation(np.flatnonzero(y == c))[:per_class_train]:
            p = out / "train" / FASHION_CLASSES[c] / f"{i:05d}.png"
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[i]).save(p)
    xt, yt = _read_idx(_find_idx("t10k-images-idx3-ubyte")), _read_idx(
        _find_idx("t10k-labels-idx1-ubyte"))
    test = []
    for i in range(len(xt)):
        p = out / "test" / f"{i:05d}.png"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(xt[i]).save(p)
        test.append((p, FASHION_CLASSES[int(yt[i])]))
    return out / "train", test


def _inputs(p: Any, paths: list[Path]) -> np.ndarray:
    from imgtriage.data.preprocess import load_input

    return np.stack([load_input(str(f), p.spec)[0] for f in paths])


METHODS = ("bundle", "knn", "rmd", "stages", "msp", "energy", "refit", "refit_stages")


def _parts(p: Any, feats: np.ndarray) -> dict[str, np.ndarray]:
    """The bundle scorer's two parts alone: plain k-NN (k = 10, the same bank; the default
    before knn+rmd) and the relative Mahalanobis distance."""
    scorer = p.ood_scorer(p.policy.ood)
    parts = getattr(scorer, "components", None)
    return parts(feats) if parts is not None else {"knn": scorer.score(feats)}


SCORE_CHUNK = 128  # images per forward pass: a 224-px backbone on 2,425 chips at once
# needed > 20 GB and was OOM-killed


def _forward(p: Any, x: np.ndarray, chunk: int = SCORE_CHUNK
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """The bundle's logits and OOD score, ``chunk`` images at a time."""
    got = [p.forward(x[i:i + chunk], p.policy) for i in range(0, len(x), chunk)]
    logits = np.concatenate([g[0] for g in got])
    bundle = None if got[0][1] is None else np.concatenate([g[1] for g in got])
    return logits, bundle


def _scores(p: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    from scipy.special import logsumexp

    from imgtriage.evaluate.decision import softmax

    logits, bundle = _forward(p, x)
    t = p.policy.temperature
    out = {"logits": logits, "bundle": bundle, "msp": -softmax(logits, t).max(1),
           "energy": -t * logsumexp(logits / t, axis=1)}  # Liu et al. 2020; higher = odder
    feats = np.concatenate([p.backend.with_features(x[i:i + SCORE_CHUNK])[1]
                            for i in range(0, len(x), SCORE_CHUNK)])
    out.update(_parts(p, feats))
    return out


def _refit(bundle: Path, threads: int) -> Any:
    """Scores of ``bundle``'s model under the default OOD scorer of this version of
    imgtriage (``knn+rmd+stages``), refitted as ``imgtriage train`` fits it: on the features
    (penultimate + stage statistics, torch) of up to 10,000 training images of the run's
    ``splits.csv`` (beside the bundle), threshold on its validation images. Returns
    ``score(x) -> {"refit": fused score, "refit_stages": the stage part}`` and the scorer."""
    import csv

    import torch

    from imgtriage.evaluate.ood import KnnRmdStagesOOD
    from imgtriage.models import WithFeatures
    from imgtriage.predict import Predictor

    t = Predictor.load(bundle, backend="torch", num_threads=threads)
    tap = WithFeatures(t.backend.model, stages=True).eval()

    def feats(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([tap(torch.from_numpy(x[i:i + SCORE_CHUNK]))[1].numpy()
                                   for i in range(0, len(x), SCORE_CHUNK)])

    rows = list(csv.DictReader((bundle.parent / "splits.csv").open()))
    train = [r for r in rows if r["split"] == "train"]
    if len(train) > 10000:
        keep = np.random.default_rng(0).choice(len(train), 10000, replace=False)
        train = [train[i] for i in sorted(keep)]
    val = [r["path"] for r in rows if r["split"] == "val"]
    rule = t.policy.ood or {}
    f_train = feats(_inputs(t, [r["path"] for r in train]))  # stage widths known from here
    scorer = KnnRmdStagesOOD(k=int(rule.get("k", 5)), accept=float(rule.get("accept", 0.95)),
                             max_bank=int(rule.get("max_bank", 1024)),
                             seed=int(rule.get("seed", 0)), stage_widths=tap.stage_widths)
    scorer.fit(f_train, feats(_inputs(t, val)),
               np.array([t.classes.index(r["label"]) for r in train]))

    def score(x: np.ndarray) -> dict[str, np.ndarray]:
        f = feats(x)
        return {"refit": scorer.score(f), "refit_stages": scorer.components(f)["stages"]}
    return score, scorer


def _throughput(p: Any, x: np.ndarray, rounds: int, numpy_p: Any = None) -> dict[str, Any]:
    """img/s of the default rule with the OOD scorer vs the same rule without it; with
    ``numpy_p`` (the same model's bundle from before in-graph scores) also the rule scored
    in NumPy, interleaved in the same rounds."""
    from dataclasses import replace

    plain = replace(p.policy, ood=None)
    runs = [("without", p, plain), ("with", p, p.policy)]
    if numpy_p is not None:
        runs.append(("with_numpy", numpy_p, numpy_p.policy))
    for _, q, pol in runs:  # warm up: first runs (and the head-free sessions) open
        pol.decide(*q.forward(x[:64], pol))
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in runs[1:]}
    rates: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for r in range(rounds):
        got = {}
        for name, q, pol in runs[r % len(runs):] + runs[:r % len(runs)]:  # rotating order
            t0 = time.perf_counter()
            for i in range(0, len(x), 64):
                pol.decide(*q.forward(x[i:i + 64], pol))
            got[name] = len(x) / (time.perf_counter() - t0)
            rates[name].append(got[name])
        for name in ratios:
            ratios[name].append(got[name] / got["without"])
    out = {"ratio_median": statistics.median(ratios["with"]), "ratios": ratios["with"],
           **{f"img_s_{k}": statistics.median(v) for k, v in rates.items()},
           "backend": p.backend.name, "score_in_graph": p.graph_scores(p.policy.ood)}
    if numpy_p is not None:
        out.update(numpy_ratio_median=statistics.median(ratios["with_numpy"]),
                   numpy_ratios=ratios["with_numpy"],
                   numpy_score_in_graph=numpy_p.graph_scores(numpy_p.policy.ood))
    return out


def _id_metrics(p: Any, s: dict[str, np.ndarray], y: np.ndarray) -> dict[str, Any]:
    from dataclasses import replace

    from imgtriage.evaluate import TemperatureScaler, expected_calibration_error
    from imgtriage.evaluate.decision import softmax

    probs = softmax(s["logits"], p.policy.temperature)
    t_test = TemperatureScaler().fit(s["logits"], y).temperature_
    out = {"accuracy": float((probs.argmax(1) == y).mean()),
           "ece_default": expected_calibration_error(probs, y),
           "ece_uncalibrated": expected_calibration_error(softmax(s["logits"]), y),
           "ece_floor": _ece_floor(probs),
           "ece_at_test_temperature": expected_calibration_error(softmax(s["logits"], t_test),
                                                                 y),
           "temperature": p.policy.temperature, "test_temperature": t_test,
           "n_test": len(y), "id_accepted_by_ood": float(np.mean(~p.policy.ood_mask(
               s["bundle"], len(y))))}
    for name, pol, ood in (("rule", p.policy, s["bundle"]),
                           ("rule_without_ood", replace(p.policy, ood=None), None)):
        d = pol.decide(s["logits"], ood)
        kept = ~d.abstained
        out[name] = {"coverage": float(kept.mean()),
                     "accuracy_answered": float((d.class_id[kept] == y[kept]).mean())
                     if kept.any() else None}
    return out


def _ece_floor(probs: np.ndarray, draws: int = 200) -> float:
    """Median 15-bin ECE of a *perfectly calibrated* model with these confidences on this
    many images (labels drawn right with probability = confidence): the estimator's own
    noise, below which no calibration can be shown on this test set."""
    from imgtriage.evaluate import expected_calibration_error

    rng = np.random.default_rng(0)
    top, conf = probs.argmax(1), probs.max(1)
    wrong = (top + 1) % probs.shape[1]
    return float(np.median([expected_calibration_error(
        probs, np.where(rng.random(len(conf)) < conf, top, wrong)) for _ in range(draws)]))


def run_task(task: str, seed: int, out: Path, rounds: int, mstar_recipe: str = "small",
             threads: int = 2, bundle: Path | None = None, refit: bool = False
             ) -> dict[str, Any]:
    """Train ``task``'s model for ``seed`` (or score ``bundle``, a bundle trained on the same
    training set elsewhere, e.g. by bench_defaults.py) and measure it; ``refit``: also score
    with the current default OOD scorer refitted on the bundle's model (:func:`_refit`)."""
    from imgtriage.data import write_manifest
    from imgtriage.evaluate.ood import auroc_fpr
    from imgtriage.predict import Predictor
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    work = out / f"{task}-s{seed}"
    if task == "fashion":
        data, test = _fashion(out / "fashion-data", 600)
        ood_sets = {"digits": _digits(out / "digits")}
        cfg = TrainConfig(**FASHION_CFG, seed=seed, num_threads=threads)
    else:
        train_files, test_files = _files(MSTAR / "train"), _files(MSTAR / "test")
        keep = sorted(train_files)[:6] if task == "mstar6" else sorted(train_files)
        paths = [str(f) for c in keep for f in train_files[c]]
        data = write_manifest(work / "train.csv", paths,
                              [c for c in keep for _ in train_files[c]])
        test = [(f, c) for c in keep for f in test_files[c]]
        if task == "mstar6":
            ood_sets = {"mstar_other4": [f for c in sorted(test_files)[6:]
                                         for f in test_files[c]]}
        else:
            ood_sets = {"cifar10": sorted((SHARED / "cifar10-small" / "test").rglob("*.jpg")),
                        "sirst": sorted((SHARED / "sirst-infrared").glob("*.png")),
                        "noise": _noise(out / "noise")}
        cfg = TrainConfig(**MSTAR_RECIPES[mstar_recipe], seed=seed, num_threads=threads)
    t0 = time.perf_counter()
    if bundle is None:
        res = train(data, work / "run", cfg, quiet=True)
        bundle, rule_line, train_s = res.bundle_path, res.rule, time.perf_counter() - t0
    else:
        rule_line, train_s, mstar_recipe = None, math.nan, f"bundle {bundle}"
    p = Predictor.load(bundle, num_threads=threads)
    y = np.array([p.classes.index(c) for _, c in test])
    x_id = _inputs(p, [f for f, _ in test])
    s_id = _scores(p, x_id)
    refitted = _refit(Path(bundle), threads) if refit else None
    if refitted is not None:
        s_id.update(refitted[0](x_id))
    seconds = round(train_s, 1) if math.isfinite(train_s) else None
    row: dict[str, Any] = {"task": task, "seed": seed, "train_seconds": seconds,
                           "recipe": "fashion" if task == "fashion" else mstar_recipe,
                           "rule_line": rule_line, "id": _id_metrics(p, s_id, y), "ood": {}}
    if refitted is not None:
        thr = refitted[1].threshold_
        row["refit"] = {"rule": refitted[1].rule(), "id_accepted": float(np.mean(
            s_id["refit"] <= thr))}
    for name, files in ood_sets.items():
        x = _inputs(p, files)
        s = _scores(p, x)
        if refitted is not None:
            s.update(refitted[0](x))
        row["ood"][name] = {m: auroc_fpr(s_id[m], s[m]) for m in METHODS if m in s}
        d = p.policy.decide(s["logits"], s["bundle"])
        row["ood"][name]["refused_by_rule"] = float(d.abstained.mean())
        if refitted is not None:
            row["ood"][name]["refused_by_refit_ood"] = float(np.mean(
                s["refit"] > refitted[1].threshold_))
    row["throughput"] = _throughput(p, x_id[:512], rounds) if rounds > 0 else None
    return row


def throughput_only(out: Path, rounds: int, numpy_dirs: list[Path] | None = None) -> None:
    """Measure throughput on the bundles a ``--rounds 0`` run left in ``out`` (its rows.json
    updated): the AUROC/ECE part needs no lock, this timed part does, and it is short.
    ``numpy_dirs``: earlier runs' folders holding the same models' bundles from before
    in-graph scores, timed in the same rounds (``--numpy-from``)."""
    from imgtriage.predict import Predictor

    rows = json.loads((out / "rows.json").read_text())
    for row in rows:
        name = f"{row['task']}-s{row['seed']}"
        p = Predictor.load(out / name / "run" / "bundle", num_threads=2)
        old = next((d / name / "run" / "bundle" for d in numpy_dirs or []
                    if (d / name / "run" / "bundle").is_dir()), None)
        numpy_p = Predictor.load(old, num_threads=2) if old is not None else None
        if row["task"] == "fashion":
            test = [f for f, _ in _fashion(out / "fashion-data", 600)[1][:512]]
        else:
            test = [f for c in p.classes for f in _files(MSTAR / "test")[c]]
            test = [test[i] for i in np.random.default_rng(0).permutation(len(test))[:512]]
        row["throughput"] = _throughput(p, _inputs(p, test), rounds, numpy_p)
        print(row["task"], row["seed"], row["throughput"], flush=True)
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


def _med(vals: list[float]) -> str:
    return f"{statistics.median(vals):.4f} ({min(vals):.4f}-{max(vals):.4f})"


def summarise(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        lines.append(f"== {task} (seeds {[r['seed'] for r in rs]})")
        ids = [r["id"] for r in rs]
        lines.append(f"  ID test accuracy {_med([i['accuracy'] for i in ids])} (n="
                     f"{ids[0].get('n_test')}), ECE default {_med([i['ece_default'] for i in ids])}"
                     f" (T=1: {_med([i['ece_uncalibrated'] for i in ids])}; T fitted on test: "
                     f"{_med([i['ece_at_test_temperature'] for i in ids])}; a perfectly "
                     f"calibrated model: {_med([i['ece_floor'] for i in ids])})")
        lines.append(f"  T bundle {_med([i['temperature'] for i in ids])}, T fitted on test "
                     f"{_med([i['test_temperature'] for i in ids])}; ID test accepted by the "
                     f"OOD rule {_med([i['id_accepted_by_ood'] for i in ids])}")
        for k in ("rule", "rule_without_ood"):
            lines.append(f"  {k}: coverage {_med([i[k]['coverage'] for i in ids])}, accuracy "
                         f"answered {_med([i[k]['accuracy_answered'] for i in ids])}")
        for name in rs[0]["ood"]:
            for m in (m for m in METHODS if m in rs[0]["ood"][name]):
                a = [r["ood"][name][m]["auroc"] for r in rs]
                f = [r["ood"][name][m]["fpr_at_95tpr"] for r in rs]
                lines.append(f"  {name:13s} {m}: AUROC {_med(a)}  FPR@95TPR {_med(f)}")
            lines.append(f"  {name:13s} refused by the default rule: "
                         f"{_med([r['ood'][name]['refused_by_rule'] for r in rs])}")
            if all("refused_by_refit_ood" in r["ood"][name] for r in rs):
                lines.append(f"  {name:13s} refused by the refitted OOD part: "
                             f"{_med([r['ood'][name]['refused_by_refit_ood'] for r in rs])}")
        if all("refit" in r for r in rs):
            lines.append("  ID test accepted by the refitted OOD part: "
                         f"{_med([r['refit']['id_accepted'] for r in rs])}")
        if any(r["throughput"] is None for r in rs):
            continue
        lines.append(f"  throughput with/without OOD scorer: "
                     f"{_med([r['throughput']['ratio_median'] for r in rs])} "
                     f"({rs[0]['throughput']['backend']}, score in graph: "
                     f"{rs[0]['throughput'].get('score_in_graph')}, "
                     f"{statistics.median([r['throughput']['img_s_without'] for r in rs]):.0f}"
                     " img/s without)")
        if all("numpy_ratio_median" in r["throughput"] for r in rs):
            lines.append("  the same rule scored in NumPy (bundles from before in-graph "
                         f"scores): {_med([r['throughput']['numpy_ratio_median'] for r in rs])}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="mstar,mstar6,fashion")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/oodbench"))
    ap.add_argument("--mstar-recipe", choices=sorted(MSTAR_RECIPES), default="small",
                    help="MSTAR training recipe: small (12 epochs, 79-88%% test accuracy), "
                         "strong (the accuracy section's 40-epoch run G, ~98%%) or default "
                         "(imgtriage train with no options)")
    ap.add_argument("--threads", type=int, default=2,
                    help="training and scoring threads (1 when seeds run side by side)")
    ap.add_argument("--throughput-only", action="store_true",
                    help="time the bundles a --rounds 0 run left in --out (under the lock)")
    ap.add_argument("--numpy-from", nargs="*", type=Path, default=None,
                    help="with --throughput-only: folders of earlier runs whose bundles (the "
                         "same models, from before in-graph OOD scores) are timed beside")
    ap.add_argument("--merge", nargs="*", type=Path, default=None,
                    help="only print the summary of these rows.json files (one run per seed, "
                         "so no run holds the bench lock for long)")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="score this bundle instead of training (one task, one seed: the "
                         "seed only names the row), e.g. a no-options bundle that "
                         "bench_defaults.py trained on the same training set")
    ap.add_argument("--refit-ood", action="store_true",
                    help="with --bundle: also score with this version's default OOD scorer "
                         "refitted on the bundle's model and its run's splits.csv (columns "
                         "refit, refit_stages), beside the bundle's own rule")
    args = ap.parse_args()
    if args.refit_ood and not args.bundle:
        ap.error("--refit-ood needs --bundle")
    if args.bundle and ("," in args.tasks or "," in args.seeds):
        ap.error("--bundle scores one bundle: give one --tasks and one --seeds")
    if args.merge:
        print("\n".join(summarise([r for f in args.merge for r in json.loads(f.read_text())])))
        return
    if args.throughput_only:
        throughput_only(args.out, args.rounds, args.numpy_from)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for task in args.tasks.split(","):
            rows.append(run_task(task, seed, args.out, args.rounds, args.mstar_recipe,
                                 args.threads, args.bundle, args.refit_ood))
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(summarise(rows)))


if __name__ == "__main__":
    main()
