"""What reading the earlier stages costs at prediction time: throughput of one model's ONNX
graph with the ``knn+rmd+stages`` score (stage statistics in its ``features`` output, the
stage head in the graph) against the same model with the ``knn+rmd`` score and with no OOD
score at all (logits only: the baseline), in interleaved rounds on the same images.

The two scorers share their penultimate part (the stages scorer is refitted on the bundle's
training split as ``imgtriage train`` fits it, see ``bench_ood._refit``; the knn+rmd scorer
is the same fit less its stages), so the difference is the statistics and their head.

Usage (timed: under the bench lock):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_ood_stages_cost.py \\
        RUN/bundle --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _graphs(bundle: Path) -> tuple[dict[str, bytes], np.ndarray]:
    import csv

    import bench_ood as b
    from imgtriage.bundle import load_bundle
    from imgtriage.evaluate.ood import KnnRmdOOD
    from imgtriage.models import WithFeatures
    from imgtriage.predict import Predictor
    from imgtriage.predict.backends import build_model
    from imgtriage.predict.graph import export_graph
    from imgtriage.predict.ood_graph import add_ood_score

    _, staged = b._refit(bundle, 2)
    plain = KnnRmdOOD.from_rule({**staged.rule(), "method": "knn+rmd"}, staged.arrays())
    info = load_bundle(bundle).info
    model = build_model(load_bundle(bundle))
    p = Predictor.load(bundle, backend="torch")
    rows = list(csv.DictReader((bundle.parent / "splits.csv").open()))
    x = b._inputs(p, [r["path"] for r in rows if r["split"] == "val"][:256])
    out = {"logits only": export_graph(model, info, x[:16]).data}
    for name, tap, scorer in (("knn+rmd", WithFeatures(model), plain),
                              ("knn+rmd+stages", WithFeatures(model, stages=True), staged)):
        g = export_graph(tap.eval(), info, x[:16], outputs=("logits", "features")).data
        out[name] = add_ood_score(g, scorer)
    return out, x


def _rate(session: Any, names: list[str], x: np.ndarray, batch: int, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(x), batch):
            session.run(names, {"input": x[i:i + batch]})
            n += len(x[i:i + batch])
    return n / (time.perf_counter() - t0)


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0, help="per graph per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    graphs, x = _graphs(args.bundle)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = {k: ort.InferenceSession(g, opts, providers=["CPUExecutionProvider"])
                for k, g in graphs.items()}
    wants = {"logits only": ["logits"], "knn+rmd": ["logits", "ood_score"],
             "knn+rmd+stages": ["logits", "ood_score"]}
    names = list(graphs)
    ratios: dict[str, list[float]] = {"knn+rmd": [], "knn+rmd+stages": [], "stages/knn+rmd": []}
    for r in range(args.rounds):
        order = names[r % 3:] + names[:r % 3]  # rotate who goes first
        rate = {k: _rate(sessions[k], wants[k], x, args.batch, args.seconds) for k in order}
        ratios["knn+rmd"].append(rate["knn+rmd"] / rate["logits only"])
        ratios["knn+rmd+stages"].append(rate["knn+rmd+stages"] / rate["logits only"])
        ratios["stages/knn+rmd"].append(rate["knn+rmd+stages"] / rate["knn+rmd"])
        print(f"round {r}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in rate.items()),
              flush=True)
    for k, v in ratios.items():
        label = k if "/" in k else f"{k} / logits only"
        print(f"{label}: median {statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f}) "
              f"over {len(v)} rounds")


if __name__ == "__main__":
    main()
