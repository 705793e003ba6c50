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

Both runs use one process, ``--threads`` compute threads and two decoding threads; the CNN
alone and the cascade are timed alternately (best of ``--repeats``) on the same files.

Usage (the CPU is shared: take the lock):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_cascade.py mstar
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_cascade.py modality
"""

from __future__ import annotations

import argparse
import json
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


def _run(predictor, files: list[str], labels: list[str], batch_size: int) -> dict:
    t0 = time.perf_counter()
    report = predictor.predict_paths(files, batch_size=batch_size, workers=2)
    elapsed = time.perf_counter() - t0
    truth = dict(zip(files, labels, strict=True))
    results = report["results"]
    acc = float(np.mean([r["class"] == truth[r["path"]] for r in results]))
    stage1 = sum(r.get("stage") == 1 for r in results) / max(len(results), 1)
    return {"seconds": elapsed, "files_per_s": len(files) / elapsed, "accuracy": acc,
            "stage1_share": stage1, "defects": len(report["defects"])}


def _compare(cnn, cascades: dict, files: list[str], labels: list[str], batch_size: int,
             repeats: int) -> dict[str, dict]:
    """Time each predictor ``repeats`` times, alternating; keep the fastest run of each."""
    contenders = {"cnn alone": cnn, **cascades}
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for name, p in contenders.items():
            r = _run(p, files, labels, batch_size)
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
    return best


def _print(title: str, best: dict[str, dict], validation: dict[str, dict]) -> None:
    base = best["cnn alone"]
    print(f"\n## {title}")
    print("| predictor | files/s | vs CNN | test accuracy | skipped the CNN | gate (val) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in best.items():
        v = validation.get(name)
        gate = "" if v is None else (
            f"{v['threshold']:.4f}, answers {v['accepted_share']:.1%} of val"
            if v["threshold"] is not None else "none (first stage never sure enough)")
        print(f"| {name} | {r['files_per_s']:.0f} | {r['files_per_s'] / base['files_per_s']:.2f}x"
              f" | {r['accuracy']:.4f} | {r['stage1_share']:.1%} | {gate} |")


def _cascades(stage2: Path, data: Path, work: Path, stages: list[str], target: float,
              ) -> tuple[dict, dict]:
    from imgtriage.predict import Predictor
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    out, validation = {}, {}
    for fs in stages:
        t0 = time.perf_counter()
        res = build_cascade(stage2, data, work / f"cascade-{fs}",
                            CascadeConfig(first_stage=fs, target_accuracy=target))
        v = res.validation
        print(f"built cascade ({fs}) in {time.perf_counter() - t0:.0f}s; validation: "
              f"first stage alone {v['first_stage_accuracy']:.3f}, answers "
              f"{v['accepted_share']:.1%} at {v['accepted_accuracy']}, cascade "
              f"{v['cascade_accuracy']:.4f} vs stage 2 {v['stage2_accuracy']:.4f}"
              f"{' (stage 2 trained on these)' if v['stage2_saw_validation'] else ''}")
        name = f"cascade {fs} @{target}"
        out[name] = Predictor.load(res.bundle_path, backend="torch")
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
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

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
    cascades, validation = _cascades(stage2, data, work, args.first_stage,
                                     args.target_accuracy)
    cnn = Predictor.load(stage2, backend="torch")
    best = _compare(cnn, cascades, files, labels, args.batch_size, args.repeats)
    _print(f"{args.scenario}: {len(files)} test files, stage 2 = {args.stage2_model}, "
           f"{args.threads} threads, batch {args.batch_size}", best, validation)
    (work / "results.json").write_text(json.dumps({"best": best, "validation": validation},
                                                  indent=2, default=str))


if __name__ == "__main__":
    main()
