"""The two-stage cascade against the CNN alone, in the same run: files/s, accuracy, and the
share of files that skipped the CNN.

Two scenarios:

- ``mstar``: MSTAR SOC-10 (128x128 SAR chips, 10 vehicle classes). Stage 2 is a crop_cnn at
  64 px trained on the train folder (or ``--stage2`` to reuse one); the cascade's first stage
  is fitted on train (validation carved out of train) and everything is measured on the
  2,425 test chips.
- ``modality``: a modality-triage mix of MSTAR SAR chips, CIFAR-10 photos and SIRST infrared
  frames, all resized to 64x64 PNG so that image size tells nothing; stage 2 is a 3-channel
  crop_cnn (``--stage2-model deep_cnn`` for a heavier one); measured on a 30% test split.

Both runs use one process, ``--threads`` compute threads and two decoding threads. For each
backend of ``--backends`` (``auto``: the default path, ONNX Runtime for a bundle from
``train``; ``torch``: ``--backend torch``) the CNN alone and each cascade run once per round
over the test files (``--passes`` times over them), rows in a rotating order, ``--rounds``
(>= 3) rounds; each round's files/s are divided by the same round's CNN alone of the first
backend (and of its own backend), and the table gives the median (min-max) of those ratios,
never best-of. Trained stage 2 and built cascades are reused from ``--work`` when there, so
a first untimed run (outside the lock, ``--rounds 3 --passes 1``) can prepare them.

Usage (the CPU is shared: take the lock):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_cascade.py mstar
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_cascade.py modality \\
        --stage2-model resnet18 --epochs 4 --first-stage logreg --target-accuracy 0.97 \\
        --always-second-stage sar --passes 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def _train_stage2(data: Path, run: Path, model: str, size: int, epochs: int, test_frac: float,
                  in_chans: int | None) -> Path:
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    bundle = run / "bundle"
    if (bundle / "manifest.json").is_file():
        print(f"reusing stage 2 {bundle}")
        return bundle
    cfg = TrainConfig(model=model, img_size=size, epochs=epochs, batch_size=64, lr=3e-3,
                      test_frac=test_frac, in_chans=in_chans, seed=0, num_threads=2)
    t0 = time.perf_counter()
    res = train(data, run, cfg, quiet=True)
    print(f"trained stage 2 ({model} {size}px, {epochs} epochs) in "
          f"{time.perf_counter() - t0:.0f}s: {res.metrics}")
    return res.bundle_path


def _test_files(data: Path, bundle: Path) -> tuple[list[str], list[str]]:
    """The test split exactly as the stage-2 run made it."""
    from imgtriage.bundle import load_bundle
    from imgtriage.data import discover, split_dataset

    tcfg = load_bundle(bundle).manifest["training"]["config"]
    ds = split_dataset(discover(data), val_frac=tcfg["val_frac"], test_frac=tcfg["test_frac"],
                       seed=tcfg["seed"])
    test = [s for s in ds.samples if s.split == "test"]
    return [s.path for s in test], [s.label for s in test]


def _run(predictor, files: list[str], labels: list[str], batch_size: int, passes: int) -> dict:
    t0 = time.perf_counter()
    for _ in range(passes):
        report = predictor.predict_paths(files, batch_size=batch_size, workers=2)
    elapsed = time.perf_counter() - t0
    truth = dict(zip(files, labels, strict=True))
    results = report["results"]
    acc = float(np.mean([r["class"] == truth[r["path"]] for r in results]))
    stage1 = sum(r.get("stage") == 1 for r in results) / max(len(results), 1)
    return {"seconds": elapsed, "files_per_s": passes * len(files) / elapsed, "accuracy": acc,
            "stage1_share": stage1, "defects": len(report["defects"])}


def _compare(contenders: dict, files: list[str], labels: list[str], batch_size: int,
             rounds: int, passes: int) -> dict[str, list[dict]]:
    """Every predictor once per round, in a rotating order; each one's runs, round by round."""
    got: dict[str, list[dict]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            got[name].append(_run(contenders[name], files, labels, batch_size, passes))
            print(f"  round {r + 1} {name:<34} {got[name][-1]['files_per_s']:7.1f} files/s",
                  flush=True)
    return got


def _mmm(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _print(title: str, got: dict[str, list[dict]], validation: dict[str, dict],
           backends: list[str]) -> None:
    base = [r["files_per_s"] for r in got[f"cnn alone {backends[0]}"]]
    print(f"\n## {title}")
    print(f"| predictor | files/s | vs CNN alone {backends[0]} | vs CNN alone, same backend | "
          "test accuracy | skipped the CNN | gate (val) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, runs in got.items():
        rate = [r["files_per_s"] for r in runs]
        own = [r["files_per_s"] for r in got[f"cnn alone {name.split()[-1]}"]]
        v = validation.get(name.rsplit(" ", 1)[0])
        gate = "" if v is None else (
            f"{v['threshold']:.4f}, answers {v['accepted_share']:.1%} of val"
            if v["threshold"] is not None else "none (first stage never sure enough)")
        vs_base = _mmm([x / y for x, y in zip(rate, base, strict=True)])
        vs_own = _mmm([x / y for x, y in zip(rate, own, strict=True)])
        print(f"| {name} | {_mmm(rate)} | {vs_base}x | {vs_own}x | {runs[0]['accuracy']:.4f} | "
              f"{runs[0]['stage1_share']:.1%} | {gate} |")


def _cascades(stage2: Path, data: Path, work: Path, stages: list[str], cfg: dict,
              backends: list[str]) -> tuple[dict, dict]:
    from imgtriage.bundle import load_bundle
    from imgtriage.predict import Predictor
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    out, validation = {}, {}
    target = cfg["target_accuracy"]
    tag = f"{Path(stage2).parent.name}-{target}-{cfg['gate_confidence']}-" + "+".join(
        cfg["always_second_stage"])
    for fs in stages:
        t0 = time.perf_counter()
        dest = work / f"cascade-{fs}-{tag}"
        if (dest / "manifest.json").is_file():
            v = load_bundle(dest).info.block("cascade")["validation"]
            print(f"reusing cascade {dest}")
        else:
            v = build_cascade(stage2, data, dest,
                              CascadeConfig(first_stage=fs, **cfg)).validation
        print(f"built cascade ({fs}) in {time.perf_counter() - t0:.0f}s; validation: "
              f"first stage alone {v['first_stage_accuracy']:.3f}, answers "
              f"{v['accepted_share']:.1%} at {v['accepted_accuracy']}, cascade "
              f"{v['cascade_accuracy']:.4f} vs stage 2 {v['stage2_accuracy']:.4f}"
              f"{' (stage 2 trained on these)' if v['stage2_saw_validation'] else ''}")
        name = f"cascade {fs} @{target}"
        for be in backends:
            out[f"{name} {be}"] = Predictor.load(dest, backend=be)
        validation[name] = v
    return out, validation


def _modality_folder(work: Path, per_class: int, size: int) -> Path:
    """sar / rgb / infrared class folders of PNGs resized to one size, modes kept."""
    root = work / "modality-data"
    if root.exists():
        return root
    rng = np.random.default_rng(0)
    sources = {
        "sar": sorted((SHARED / "mstar-soc10").rglob("*.jpeg")),
        "rgb": sorted((SHARED / "cifar10-small").rglob("*.jpg")),
        "infrared": sorted((SHARED / "sirst-infrared").glob("*.png")),
    }
    for label, files in sources.items():
        (root / label).mkdir(parents=True)
        pick = rng.permutation(len(files))[:per_class]
        for i in pick:
            img = Image.open(files[i])
            img.load()
            img.resize((size, size), Image.Resampling.BILINEAR).save(
                root / label / f"{label}_{i:05d}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=("mstar", "modality"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/imgtriage-bench-cascade"))
    ap.add_argument("--stage2", type=Path, help="reuse this stage-2 bundle")
    ap.add_argument("--stage2-model", default="crop_cnn")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--first-stage", nargs="+", default=["logreg", "gbt"])
    ap.add_argument("--target-accuracy", type=float, default=0.99)
    ap.add_argument("--gate-confidence", type=float, default=0.95)
    ap.add_argument("--always-second-stage", default="",
                    help="comma-separated classes the first stage never answers")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="auto,torch",
                    help="comma-separated; the first one's CNN alone is the baseline")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=1, help="passes over the test files per run")
    args = ap.parse_args()
    if args.rounds < 3:
        sys.exit("--rounds must be >= 3: the figures are medians of within-round ratios")
    backends = args.backends.split(",")

    import torch

    from imgtriage.predict import Predictor

    torch.set_num_threads(args.threads)
    work = args.work / args.scenario
    work.mkdir(parents=True, exist_ok=True)
    if args.scenario == "mstar":
        data = SHARED / "mstar-soc10"
        stage2 = args.stage2 or _train_stage2(data, work / "run", args.stage2_model, 64,
                                              args.epochs, 0.0, 1)
    else:
        data = _modality_folder(work, 420, 64)
        stage2 = args.stage2 or _train_stage2(data, work / f"run-{args.stage2_model}",
                                              args.stage2_model, 64, args.epochs, 0.3, 3)
    files, labels = _test_files(data, stage2)
    cfg = {"target_accuracy": args.target_accuracy, "gate_confidence": args.gate_confidence,
           "always_second_stage": tuple(filter(None, args.always_second_stage.split(",")))}
    cascades, validation = _cascades(stage2, data, work, args.first_stage, cfg, backends)
    contenders = {f"cnn alone {be}": Predictor.load(stage2, backend=be) for be in backends}
    contenders.update(cascades)
    for name, p in contenders.items():
        print(f"{name}: {p.runtime.to_dict()}")
    load0 = os.getloadavg()[0]
    got = _compare(contenders, files, labels, args.batch_size, args.rounds, args.passes)
    _print(f"{args.scenario}: {len(files)} test files x {args.passes} passes, stage 2 = "
           f"{args.stage2_model}, {args.threads} threads, batch {args.batch_size}, "
           f"{args.rounds} rounds, load average {load0:.1f} before, "
           f"{os.getloadavg()[0]:.1f} after; files/s median (min-max) of rounds, ratios "
           "median (min-max) of within-round ratios", got, validation, backends)
    (work / "results.json").write_text(json.dumps({"runs": got, "validation": validation},
                                                  indent=2, default=str))


if __name__ == "__main__":
    main()
