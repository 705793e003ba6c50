"""Which parts of a trained model int8 must leave in fp32: top-1 agreement with fp32 on the
run's held-out validation images for each recipe (nothing timed, no lock needed).

For every training run given (a folder ``imgtriage train`` wrote: ``bundle/`` and
``splits.csv``), the fp32 graph of its bundle (without the OOD head) is quantised the way
``train --quantize auto`` does (static QDQ, U8 activations x S8 per-channel 7-bit weights,
MinMax, calibrated on 64 images of the training split), leaving in fp32 each combination of
``predict.int8.FP32_PARTS``: ``stem`` (the first convolution with its activation and pool),
``classifier`` (the layer the logits come from), ``outputs`` (no Quantize/Dequantize pair on
the graph outputs). Each is judged like the training step judges (``predict.int8.judge``) on
every validation image of the run: agreement, accuracy, the mean absolute logit error in
units of the fp32 logits' standard deviation, the share of images the bundle's default rule
(temperature, confidence threshold, OOD scorer on the ``features`` output) decides alike, and
the verdict. ``features`` (the OOD branch: stage statistics) is the fourth part.

    nice -n 19 .venv/bin/python bench/bench_int8.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

RECIPES = {
    "every layer quantised (former)": (),
    "fp32 outputs": ("outputs",),
    "fp32 classifier + outputs": ("classifier", "outputs"),
    "fp32 stem": ("stem",),
    "fp32 stem + outputs": ("stem", "outputs"),
    "fp32 stem + classifier + outputs (sessions 4-8)": ("stem", "classifier", "outputs"),
    "fp32 stem + classifier + features branch + outputs (current)": ("stem", "classifier",
                                                                      "features", "outputs"),
}


def judge_run(run: Path, n_calib: int = 64) -> dict[str, dict[str, float]]:
    from imgtriage.bundle import load_bundle
    from imgtriage.data import PreprocessSpec, Sample
    from imgtriage.predict.int8 import _quantize, judge
    from imgtriage.predict.ood_graph import without_ood_score
    from imgtriage.predict.ort_session import run_outputs
    from imgtriage.train.onnx_step import decision_rule, sample_inputs

    b = load_bundle(run / "bundle")
    spec = PreprocessSpec.from_dict(dict(b.info.preprocess))
    classes = list(b.manifest["classes"])
    rows = list(csv.DictReader((run / "splits.csv").open()))
    split = {s: [Sample(r["path"], r["label"]) for r in rows if r["split"] == s]
             for s in ("train", "val")}
    calib = sample_inputs(None, split["train"], spec, n_calib, classes)
    check = sample_inputs(None, split["val"], spec, len(split["val"]), classes)
    if calib is None or check is None:
        sys.exit(f"{run}: no readable training/validation images")
    fp32 = without_ood_score(b.verified_bytes("model.onnx"))
    rule = decision_rule(b.info, {n: b.verified_bytes(n) for n in b.info.files})
    names = ("logits", "features") if rule.needs_features else ("logits",)
    out32 = run_outputs(fp32, check.x, names)
    z32 = out32[0]
    top32 = z32.argmax(1)
    acc32 = float((top32 == check.labels).mean())
    print(f"{run}: {b.manifest['model']['name']}, {len(calib.x)} calibration / "
          f"{len(check.x)} held-out images, fp32 accuracy {acc32:.1%}", flush=True)
    out = {}
    for name, keep in RECIPES.items():
        out8 = run_outputs(_quantize(fp32, "static", calib.x, keep), check.x, names)
        z8 = out8[0]
        top8 = z8.argmax(1)
        agree, acc8 = float((top8 == top32).mean()), float((top8 == check.labels).mean())
        err = float(np.abs(z8 - z32).mean() / (z32.std() + 1e-12))
        same = float((rule.outcomes(*out32) == rule.outcomes(*out8)).mean())
        ok, why = judge(agree, acc32, acc8, len(check.x), same)
        print(f"  {name:44s} agreement {agree:7.2%} ({int((top8 != top32).sum()):3d} differ)  "
              f"accuracy {acc8:6.1%}  logit error {err:.4f}  same decision {same:7.2%}  "
              f"{'accepted' if ok else 'refused: ' + why}", flush=True)
        out[name] = {"agreement": agree, "accuracy_int8": acc8, "accuracy_fp32": acc32,
                     "logit_error": err, "same_decision": same, "accepted": ok}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--calib", type=int, default=64)
    a = ap.parse_args()
    for run in a.runs:
        judge_run(run, a.calib)


if __name__ == "__main__":
    main()
