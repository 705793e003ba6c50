"""What the in-graph OOD head costs, and what a smaller one would lose.

For run directories of ``bench_ood.py`` (``OUT/TASK-sSEED``, each holding ``run/bundle``),
the bundle's fitted ``knn+rmd`` scorer is varied in its k-NN part only -- the bank subsampled
(seeded) to fewer rows, with k kept or scaled with the bank -- and each variant is
(1) scored on the task's ID test images and OOD sets (AUROC / FPR@95TPR of the fused score
and of its k-NN part; the standardisation of the k-NN part re-derived on the smaller bank
the way ``KnnRmdOOD.fit`` derives it) and (2) timed: the bundle's graph less its head
(baseline) and the same graph with each variant's head (``predict.ood_graph.add_ood_score``),
one ONNX Runtime session with one thread each, batches of 32 (the half batch each of the two
prediction sessions runs), ``--rounds`` interleaved rounds in rotating order, the median
(min-max) of within-round throughput ratios head / no head.

Usage (timing under the lock; ``--rounds 0`` for the AUROC part alone):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_ood_head.py \\
        /tmp/oodbench/fashion-s0 /tmp/oodbench/mstar6-s0 --rounds 15
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ood as B


def _sets(run: Path, task: str, p: Any) -> tuple[list[Path], dict[str, list[Path]]]:
    out = run.parent
    if task == "fashion":
        test = [f for f, _ in B._fashion(out / "fashion-data", 600)[1]]
        return test, {"digits": B._digits(out / "digits")}
    tf = B._files(B.MSTAR / "test")
    test = [f for c in p.classes for f in tf[c]]
    if task == "mstar6":
        return test, {"other4": [f for c in sorted(tf) if c not in p.classes for f in tf[c]]}
    return test, {"cifar10": sorted((B.SHARED / "cifar10-small" / "test").rglob("*.jpg")),
                  "sirst": sorted((B.SHARED / "sirst-infrared").glob("*.png")),
                  "noise": B._noise(out / "noise")}


def variant(scorer: Any, n_bank: int, k: int) -> Any:
    """The scorer with its bank subsampled to ``n_bank`` rows and k-NN at ``k``; the k-NN
    part's median/spread re-derived on the new bank (leave-one-out, as ``fit`` does)."""
    from imgtriage.evaluate.ood import _median_p95, knn_distance

    v = copy.copy(scorer)
    bank = scorer.bank_
    if n_bank < len(bank):
        keep = np.sort(np.random.default_rng(0).choice(len(bank), n_bank, replace=False))
        bank = np.ascontiguousarray(bank[keep])
    v.bank_, v.k = bank, k
    ref = bank[np.random.default_rng(v.seed).choice(len(bank), min(len(bank), 2000),
                                                    replace=False)]
    v.scale_ = {**scorer.scale_, "knn": _median_p95(knn_distance(ref, bank,
                                                                  min(k + 1, len(bank))))}
    return v


def _time(graphs: dict[str, bytes], x: np.ndarray, rounds: int) -> dict[str, Any]:
    import onnxruntime as ort

    from imgtriage.predict.ort_session import session_options

    sess = {n: ort.InferenceSession(g, session_options(1), providers=["CPUExecutionProvider"])
            for n, g in graphs.items()}
    inp = sess["none"].get_inputs()[0].name
    outs = {n: ["logits", *(["ood_score"] if n != "none" else [])] for n in sess}
    batches = [np.ascontiguousarray(x[i:i + 32]) for i in range(0, len(x), 32)]
    names = list(sess)
    for n in names:  # warm up
        sess[n].run(outs[n], {inp: batches[0]})
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        got = {}
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for b in batches:
                sess[n].run(outs[n], {inp: b})
            got[n] = len(x) / (time.perf_counter() - t0)
            rates[n].append(got[n])
        for n in ratios:
            ratios[n].append(got[n] / got["none"])
    return {"ratios": ratios, "img_s": {n: statistics.median(v) for n, v in rates.items()}}


def run_one(run: Path, variants: list[tuple[int, int]], rounds: int) -> dict[str, Any]:
    from imgtriage.evaluate.ood import auroc_fpr
    from imgtriage.predict import Predictor
    from imgtriage.predict.ood_graph import add_ood_score, without_ood_score
    from imgtriage.predict.ort_session import run_outputs

    task = run.name.rsplit("-s", 1)[0]
    p = Predictor.load(run / "run" / "bundle", num_threads=1)
    scorer = p.ood_scorer(p.policy.ood)
    plain = without_ood_score(p.bundle.verified_bytes(p.backend.file))
    test, ood = _sets(run, task, p)

    def feats(paths: list[Path]) -> np.ndarray:
        return run_outputs(plain, B._inputs(p, paths), ["features"], batch=256)[0]

    f_id, f_ood = feats(test), {k: feats(v) for k, v in ood.items()}
    row: dict[str, Any] = {"run": str(run), "task": task, "backend_file": p.backend.file,
                           "bank": len(scorer.bank_), "dim": int(scorer.bank_.shape[1]),
                           "variants": {}}
    graphs = {"none": plain}
    for n_bank, k in variants:
        v = variant(scorer, n_bank, k)
        name = f"bank{len(v.bank_)}-k{k}"
        s_id, c_id = v.score(f_id), v.components(f_id)["knn"]
        row["variants"][name] = {
            s: {"fused": auroc_fpr(s_id, v.score(f)),
                "knn": auroc_fpr(c_id, v.components(f)["knn"])} for s, f in f_ood.items()}
        graphs[name] = add_ood_score(plain, v)
    if rounds > 0:
        x = B._inputs(p, [test[i] for i in np.random.default_rng(0).permutation(len(test))[:512]])
        row["timing"] = _time(graphs, x, rounds)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--variants", default="2048:10,1024:10,1024:5,512:10,512:3")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    variants = [tuple(int(v) for v in s.split(":")) for s in args.variants.split(",")]
    for run in args.runs:
        row = run_one(run, variants, args.rounds)
        print(f"== {row['run']} ({row['task']}, {row['backend_file']}, bank {row['bank']} x "
              f"{row['dim']})")
        for name, sets in row["variants"].items():
            parts = [f"{s}: fused {m['fused']['auroc']:.4f}/{m['fused']['fpr_at_95tpr']:.3f} "
                     f"knn {m['knn']['auroc']:.4f}" for s, m in sets.items()]
            t = ""
            if "timing" in row:
                r = row["timing"]["ratios"][name]
                t = (f"  head/no head {statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})"
                     f" [{row['timing']['img_s'][name]:.0f} vs "
                     f"{row['timing']['img_s']['none']:.0f} img/s]")
            print(f"  {name:13s} " + "; ".join(parts) + t, flush=True)


if __name__ == "__main__":
    main()
