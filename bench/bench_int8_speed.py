"""int8 against fp32, the graphs alone: the ratio ``train --quantize auto`` now requires
(``predict.int8.measure_speed``, >= ``MIN_SPEEDUP``), beside the ratio of plain sessions.

For every training run given (a folder ``imgtriage train`` wrote: ``bundle/`` holding
``model.onnx`` and ``model.int8.onnx``, and ``splits.csv``), the bundle's two graphs run on up
to 256 of the run's validation inputs in ``--rounds`` interleaved rounds. Each round times four
arms, their order rotating from round to round:

- ``product fp32`` / ``product int8``: each graph as the default ONNX backend runs it
  (``onnx_backend.SessionPool`` with ``session_layout``: single-thread sessions side by side
  for small graphs, ``DISABLED_OPTIMIZERS`` off, the backend's batch size);
- ``plain fp32`` / ``plain int8``: one ``onnxruntime.InferenceSession`` with 2 intra-op
  threads, default graph optimisations (QDQ propagation on), batches of 64: how session 9
  timed it (``/tmp/lead9/int8speed.py``), which gave int8 0.70x on the Fashion model.

Each arm runs its inputs until ``--seconds`` have passed; images/s per arm, and per round the
ratios int8 / fp32 within each layout. Prints the median (min-max) over rounds. Timed: run it
under the bench lock at normal priority.

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_int8_speed.py RUN [RUN ...] \
        --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _inputs(run: Path, n: int) -> np.ndarray:
    from imgtriage.bundle import load_bundle
    from imgtriage.data import PreprocessSpec, Sample
    from imgtriage.train.onnx_step import sample_inputs

    b = load_bundle(run / "bundle")
    spec = PreprocessSpec.from_dict(dict(b.info.preprocess))
    rows = list(csv.DictReader((run / "splits.csv").open()))
    val = [Sample(r["path"], r["label"]) for r in rows if r["split"] == "val"]
    got = sample_inputs(None, val, spec, n, list(b.manifest["classes"]))
    if got is None:
        sys.exit(f"{run}: no readable validation images")
    return np.ascontiguousarray(got.x, dtype=np.float32)


def _arms(run: Path) -> dict[str, tuple[Any, int]]:
    """name -> (a callable running one batch, batch size)."""
    import onnxruntime as ort

    from imgtriage.bundle import load_bundle
    from imgtriage.predict.onnx_backend import SessionPool, session_layout
    from imgtriage.predict.ort_session import usable_cores

    b = load_bundle(run / "bundle")
    arms: dict[str, tuple[Any, int]] = {}
    for prec, name in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        graph = b.verified_bytes(name)
        layout = session_layout(len(graph), usable_cores())
        pool = SessionPool(graph, layout)
        out = pool.output_names[:1]
        arms[f"product {prec}"] = (lambda x, p=pool, o=out: p.run(x, o), layout.batch_size)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        iname = sess.get_inputs()[0].name
        arms[f"plain {prec}"] = (lambda x, s=sess, i=iname, o=out: s.run(o, {i: x}), 64)
    return arms


def _rate(run_batch: Any, batch: int, x: np.ndarray, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(x), batch):
            run_batch(x[i:i + batch])
            n += len(x[i:i + batch])
    return n / (time.perf_counter() - t0)


def bench_run(run: Path, rounds: int, seconds: float) -> dict[str, Any]:
    x = _inputs(run, 256)
    arms = _arms(run)
    names = list(arms)
    for f, batch in arms.values():  # warm-up
        f(x[:batch])
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        rates = {k: _rate(*arms[k], x, seconds) for k in order}
        per_round.append(rates)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {rates[k]:,.0f} img/s" for k in names)
              + f"; int8/fp32 product {rates['product int8'] / rates['product fp32']:.2f}x, "
              f"plain {rates['plain int8'] / rates['plain fp32']:.2f}x", flush=True)

    def med(values: list[float]) -> tuple[float, float, float]:
        return statistics.median(values), min(values), max(values)

    return {"images": len(x),
            "rates": {k: med([p[k] for p in per_round]) for k in names},
            "product ratio": med([p["product int8"] / p["product fp32"] for p in per_round]),
            "plain ratio": med([p["plain int8"] / p["plain fp32"] for p in per_round])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5, help="per arm per round")
    a = ap.parse_args()
    from imgtriage.predict.int8 import MIN_SPEEDUP

    for run in a.runs:
        print(f"{run}:", flush=True)
        got = bench_run(run, a.rounds, a.seconds)
        for k, (m, lo, hi) in got["rates"].items():
            print(f"  {k}: {m:,.0f} img/s ({lo:,.0f}-{hi:,.0f})")
        for k in ("product ratio", "plain ratio"):
            m, lo, hi = got[k]
            print(f"  int8 / fp32, {k.split()[0]} sessions: {m:.2f}x ({lo:.2f}-{hi:.2f}) over "
                  f"{a.rounds} rounds")
        m = got["product ratio"][0]
        print(f"  --quantize auto's speed condition (>= {MIN_SPEEDUP:.2f}x): "
              f"{'met' if m >= MIN_SPEEDUP else 'NOT met: fp32 stays the default'}")


if __name__ == "__main__":
    main()
