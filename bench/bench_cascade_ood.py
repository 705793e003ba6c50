"""What the cascade's first-stage OOD gate costs and what it stops (issue 15), in one run.

For each stage-2 bundle given (``--stage2``, several: one cascade each, e.g. three seeds), a
cascade is built on ``--data`` (``--first-stage`` logreg, ``--target-accuracy`` 0.99 or a
``--route-share``), then every file of ``--test`` (in distribution; else the test split of
``--data`` as stage 2 made it) and of each ``--ood NAME=FOLDER`` set, plus synthetic odd
images (uniform and Gaussian noise, RGB noise, constant images), is predicted twice by the
same loaded cascade: with its OOD gate (the default) and with ``ood_gate=False`` (what the
cascade did before the gate; the same numbers as a cascade built before it). Printed per
set: the share of files the first stage answers, the share refused as out of distribution,
and on the in-distribution test the accuracy of the first stage's answers and of the
cascade's (abstentions counted as wrong). The table gives the median (min-max) over the
cascades. No timing: run it at nice 19.

``--digits WORK`` prepares a second, self-contained scenario: scikit-learn's 1,797 digits as
32 px PNGs (20% test), a default-options crop_cnn as stage 2 (calibrated, with its OOD rule)
and, with ``--cnn-first-stage``, a 16 px crop_cnn as a CNN first stage; ``--digits-known K``
trains on digits 0..K-1 and adds the others as a near-OOD set (classes never trained on).

Usage:
    nice -n 19 .venv/bin/python bench/bench_cascade_ood.py --stage2 runs/mstar-s0/bundle \\
        --stage2 runs/mstar-s1/bundle --data ../shared/datasets/mstar-soc10/train \\
        --test ../shared/datasets/mstar-soc10/test \\
        --ood cifar=../shared/datasets/cifar10-small/test \\
        --ood sirst=../shared/datasets/sirst-infrared --work /tmp/cascade-ood
    nice -n 19 .venv/bin/python bench/bench_cascade_ood.py --digits /tmp/cascade-ood-digits \\
        --seeds 0 1 2 --cnn-first-stage
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

OOD = "out_of_distribution"


def _odd_folder(root: Path, n: int, size: int) -> Path:
    """``n`` uniform-noise, ``n`` Gaussian-noise, ``n // 2`` RGB-noise and 16 constant PNGs."""
    if root.is_dir():
        return root
    root.mkdir(parents=True)
    rng = np.random.default_rng(12345)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(
            root / f"uniform_{i:03d}.png")
        g = np.clip(rng.normal(rng.uniform(60, 190), rng.uniform(10, 60), (size, size)), 0, 255)
        Image.fromarray(g.astype(np.uint8)).save(root / f"gauss_{i:03d}.png")
    for i in range(n // 2):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / f"rgbnoise_{i:03d}.png")
    for i, v in enumerate(np.linspace(0, 255, 16).astype(np.uint8)):
        Image.fromarray(np.full((size, size), v, np.uint8)).save(root / f"constant_{i:02d}.png")
    return root


def _files(folder: Path) -> list[str]:
    from imgtriage.data.discovery import iter_image_files

    return sorted(str(p) for p in iter_image_files(folder))


def _measure(p, files: list[str], labels: list[str] | None, gate: bool) -> dict[str, float]:
    rows = [r for r in p.predict_paths(files, ood_gate=None if gate else False)["results"]
            if "class" in r]
    n = len(rows)
    s1 = [r for r in rows if r["stage"] == 1]
    out = {"n": n, "stage1_share": len(s1) / n, "refused_ood": sum(r.get("reason") == OOD
                                                                   for r in rows) / n,
           "answered": sum(not r["abstained"] for r in rows) / n,
           "stage1_ood": sum(bool(r.get("stage1_ood")) for r in rows) / n}
    if labels is not None:
        truth = {f: lab for f, lab in zip(files, labels, strict=True)}
        out["stage1_accuracy"] = (sum(r["class"] == truth[r["path"]] for r in s1) / len(s1)
                                  if s1 else float("nan"))
        out["accuracy"] = sum(not r["abstained"] and r["class"] == truth[r["path"]]
                              for r in rows) / n
    return out


def _cascade(stage2: Path, data: Path, out: Path, first_stage: str, gate: dict) -> Path:
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    if (out / "manifest.json").is_file():
        return out
    res = build_cascade(stage2, data, out, CascadeConfig(first_stage=first_stage, **gate))
    v = res.validation
    print(f"built {out}: gate {v['threshold']}, stage 1 answers {v['accepted_share']:.3f} of "
          f"{v['n']} validation images; OOD gate {json.dumps(v.get('ood_gate'))}", flush=True)
    return out


def _digits(work: Path, seed: int, cnn_first: bool, known: int = 10
            ) -> tuple[Path, Path, Path, str]:
    """(data with train/test folders, stage-2 bundle, test folder, first stage); digits
    ``known`` and above go to ``unseen/`` (near OOD: classes never trained on)."""
    from sklearn.datasets import load_digits

    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    data = work / "digits"
    if not data.is_dir():
        d = load_digits()
        order = np.random.default_rng(0).permutation(len(d.target))
        for rank, i in enumerate(order):
            split = "test" if rank < len(order) // 5 else "train"
            out = data / split / f"d{d.target[i]}" if d.target[i] < known else \
                data / "unseen" / f"d{d.target[i]}"
            out.mkdir(parents=True, exist_ok=True)
            img = (d.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(img).resize((32, 32), Image.BILINEAR).save(out / f"{i:05d}.png")
    bundles = {}
    for name, size in (("stage2", 32), *((("stage1", 16),) if cnn_first else ())):
        run = work / f"{name}-s{seed}"
        if not (run / "bundle" / "manifest.json").is_file():
            cfg = TrainConfig(model="crop_cnn", img_size=size, epochs=6, batch_size=64,
                              num_threads=2, seed=seed)
            train(data / "train", run, cfg, quiet=True)
        bundles[name] = run / "bundle"
    first = str(bundles["stage1"]) if cnn_first else "logreg"
    return data / "train", bundles["stage2"], data / "test", first


def _test_split(stage2: Path, data: Path) -> list:
    """The test split of ``data`` as the stage-2 run made it (no ``--test`` folder)."""
    from imgtriage.bundle import load_bundle
    from imgtriage.data import discover, split_dataset

    c = load_bundle(stage2).info.training.get("config") or {}
    ds = split_dataset(discover(data), val_frac=float(c.get("val_frac", 0.15)),
                       test_frac=float(c.get("test_frac", 0)), seed=int(c.get("seed", 0)))
    test = [s for s in ds.samples if s.split == "test"]
    if not test:
        raise SystemExit(f"{data} has no test split under {stage2}'s split; give --test")
    return test


def _mmm(values: list[float]) -> str:
    v = [x for x in values if x == x]
    if not v:
        return "n/a"
    return f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})" if len(v) > 1 \
        else f"{v[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage2", action="append", type=Path, default=[])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--test", type=Path)
    ap.add_argument("--ood", action="append", default=[], help="NAME=FOLDER")
    ap.add_argument("--first-stage", default="logreg")
    ap.add_argument("--target-accuracy", type=float, default=0.99)
    ap.add_argument("--route-share", type=float, help="instead of a target accuracy")
    ap.add_argument("--always-second-stage", default="", help="comma-separated classes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-cascade-ood"))
    ap.add_argument("--noise", type=int, default=100, help="noise images of each kind")
    ap.add_argument("--noise-size", type=int, default=128)
    ap.add_argument("--digits", type=Path, help="prepare and run the digits scenario here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cnn-first-stage", action="store_true")
    ap.add_argument("--digits-known", type=int, default=10,
                    help="train on digits below this; the others are an OOD set (unseen)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from imgtriage.data import discover
    from imgtriage.predict import Predictor

    jobs = []  # (stage2, data, test, first stage, cascade dir)
    if args.digits is not None:
        args.work = args.digits
        for seed in args.seeds:
            data, s2, test, first = _digits(args.digits, seed, args.cnn_first_stage,
                                            args.digits_known)
            jobs.append((s2, data, test, first, args.digits / f"cascade-s{seed}"))
    else:
        jobs = [(s2, args.data, args.test, args.first_stage, args.work / f"cascade-{i}")
                for i, s2 in enumerate(args.stage2)]
    sets = {"odd (noise, constant)": _odd_folder(args.work / "odd", args.noise,
                                                 args.noise_size)}
    sets.update({n: Path(f) for n, f in (o.split("=", 1) for o in args.ood)})
    if args.digits is not None and args.digits_known < 10:
        sets[f"unseen digits ({args.digits_known}-9)"] = args.digits / "digits" / "unseen"
    results: dict[str, dict[str, list[dict]]] = {}
    for s2, data, test, first, out in jobs:
        gate = {"target_accuracy": args.target_accuracy, "route_share": args.route_share,
                "always_second_stage": tuple(c for c in args.always_second_stage.split(",")
                                             if c)}
        p = Predictor.load(_cascade(s2, data, out, first, gate), num_threads=2)
        samples = discover(test).samples if test is not None else _test_split(s2, data)
        files, labels = [s.path for s in samples], [s.label for s in samples]
        for gate in (False, True):
            key = "with gate" if gate else "without gate"
            r = _measure(p, files, labels, gate)
            results.setdefault("in-distribution test", {}).setdefault(key, []).append(r)
            print(f"{out.name} test {key}: {json.dumps(r)}", flush=True)
            for name, folder in sets.items():
                r = _measure(p, _files(folder), None, gate)
                results.setdefault(name, {}).setdefault(key, []).append(r)
                print(f"{out.name} {name} {key}: {json.dumps(r)}", flush=True)
    print(f"\n{len(jobs)} cascade(s); median (min-max) over them")
    print("| set | OOD gate | files | stage 1 answers | stage-1 accuracy | cascade accuracy "
          "| refused as OOD | flagged by the gate |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, by in results.items():
        for key, rs in by.items():
            print(f"| {name} | {key} | {rs[0]['n']} | {_mmm([r['stage1_share'] for r in rs])} | "
                  f"{_mmm([r.get('stage1_accuracy', float('nan')) for r in rs])} | "
                  f"{_mmm([r.get('accuracy', float('nan')) for r in rs])} | "
                  f"{_mmm([r['refused_ood'] for r in rs])} | "
                  f"{_mmm([r['stage1_ood'] for r in rs])} |")


if __name__ == "__main__":
    main()
