"""Latency of one batch of 64x64 grey crops through a crop_cnn: the Predictor API against bare
ONNX Runtime, torch, and the FLOP ceiling of this machine measured in the same rounds.

Every round runs each row once, in a rotating order, so all rows see the same load; a row's
figure is the median (min-max) over ``--rounds`` rounds (default 50). Each row's CPU time
(every thread of this process) is printed too: a batch cannot take less wall time on T cores
than its CPU time / T, whatever else runs on the machine. The FLOP ceiling of a
round is the model's FLOPs per batch divided by the GFLOP/s a 2-thread fp32 matrix product
reached in that round (numpy/OpenBLAS): the time the model would take at that round's peak.

Rows:
- ``torch eager``: the torch backend (channels_last, inference mode);
- ``ORT bare 1 session x T threads`` / ``2 sessions x 1 thread``: a tuned bare session on the
  ready tensor (spinning off, every graph optimisation), the model's own speed;
- ``Predictor rows``: ``Predictor.rows_for_inputs`` on the ready tensor: the backend the
  bundle picks plus the decision rule and result rows (what a caller gets);
- ``Predictor predict_bytes``: the same from 32 PNG files in memory (decode + preprocess too);
- the same for int8 when ``--int8`` (static, calibrated on training-like crops; speed only),
  plus a bare session of the former int8 recipe (every layer and the outputs quantised; the
  current one keeps the stem convolution, the classifier and the outputs in fp32).

The model is a freshly trained-looking crop_cnn with random weights: speed does not depend on
the values. Run it under the bench lock, and say the load:

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_crop.py --rounds 50
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def count_macs(model: Any, x: Any) -> int:
    """Multiply-accumulates of one forward pass per image (Conv2d and Linear layers)."""
    import torch

    macs = [0]

    def conv(m: Any, _inp: Any, out: Any) -> None:
        k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        macs[0] += out[0].numel() * k

    def linear(m: Any, _inp: Any, out: Any) -> None:
        macs[0] += out[0].numel() * m.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, torch.nn.Conv2d) else linear)
             for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.inference_mode():
        model(x[:1])
    for h in hooks:
        h.remove()
    return macs[0]


def make_bundle(out: Path, widths: list[int], convs: int, int8: bool) -> Path:
    """A crop_cnn bundle as ``train`` writes it (fp32 graph attached and checked)."""
    import torch

    from imgtriage.bundle import new_manifest, save_bundle
    from imgtriage.data.preprocess import PreprocessSpec
    from imgtriage.evaluate.decision import DecisionPolicy
    from imgtriage.models import create_model
    from imgtriage.train.onnx_step import GraphInputs, attach_graph

    torch.manual_seed(0)
    kwargs = {"widths": widths, "convs_per_block": convs}
    net = create_model("crop_cnn", 10, 1, **kwargs).eval()
    spec = PreprocessSpec.default_for(1, (64, 64))
    manifest = new_manifest(model_name="crop_cnn", model_kwargs=kwargs, in_chans=1,
                            preprocess=spec.to_dict(), classes=[f"c{i}" for i in range(10)],
                            decision=DecisionPolicy().to_dict())
    manifest, files = attach_graph(manifest, net.state_dict(), GraphInputs(None))
    b = save_bundle(out, manifest, net.state_dict(), files)
    if int8:
        from imgtriage.bundle import update_bundle
        from imgtriage.predict.int8 import LabelledInputs, quantize_checked

        calib = _calib()
        q, _ = quantize_checked(files["model.onnx"], "static", calib,
                                LabelledInputs(calib[:8], None))  # speed only: no verdict
        info = dict(manifest.block("onnx"), int8={"file": "model.int8.onnx",
                                                  "refused": "speed only"})
        update_bundle(b, {"onnx": info}, note="bench int8", extra_files={"model.int8.onnx": q})
    return b


def _calib() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((64, 1, 64, 64)).astype(np.float32)


def png_batch(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def rows(bundle: Path, x: np.ndarray, pngs: list[bytes], threads: int, int8: bool
         ) -> dict[str, Callable[[], Any]]:
    from imgtriage.bundle import load_bundle
    from imgtriage.predict import Predictor
    from imgtriage.predict.ort_session import open_session, session_options
    from imgtriage.predict.predictor import PredictOptions

    b = load_bundle(bundle)
    names, opts = [f"c{i}.png" for i in range(len(x))], PredictOptions()
    out: dict[str, Callable[[], Any]] = {}
    torch_p = Predictor.load(b, backend="torch", num_threads=threads)
    out["torch eager (Predictor rows)"] = lambda: torch_p.rows_for_inputs(x, names, opts)
    for prec in ("fp32", "int8") if int8 else ("fp32",):
        graph = b.verified_bytes("model.onnx" if prec == "fp32" else "model.int8.onnx")
        one = open_session(graph, session_options(threads))
        out[f"ORT bare {prec} 1 session x {threads} threads"] = (
            lambda s=one: s.run(["logits"], {"input": x}))
        if prec == "int8":  # the former recipe: every layer and the outputs quantised
            from imgtriage.predict.int8 import _quantize

            every = open_session(_quantize(b.verified_bytes("model.onnx"), "static", _calib(),
                                           keep_fp32=()), session_options(threads))
            out[f"ORT bare int8 every layer 1 session x {threads} threads"] = (
                lambda s=every: s.run(["logits"], {"input": x}))
        if threads > 1:
            two = [open_session(graph, session_options(1))
                   for _ in range(threads)]
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(threads)
            parts = np.array_split(x, threads)

            def split(ss=two, pool=pool, parts=parts) -> Any:
                futs = [pool.submit(s.run, ["logits"], {"input": np.ascontiguousarray(p)})
                        for s, p in zip(ss, parts, strict=True)]
                return [f.result() for f in futs]

            out[f"ORT bare {prec} {threads} sessions x 1 thread"] = split
        p = Predictor.load(b, precision=prec, num_threads=threads)
        out[f"Predictor rows {prec} ({p.backend.num_sessions} session(s))"] = (
            lambda p=p: p.rows_for_inputs(x, names, opts))
        out[f"Predictor predict_bytes {prec} (PNG decode too)"] = (
            lambda p=p: p.predict_bytes(pngs, names))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--widths", default="32,64,128")
    ap.add_argument("--convs", type=int, default=1)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    import torch

    from imgtriage.models import create_model

    widths = [int(w) for w in a.widths.split(",")]
    load0 = os.getloadavg()[0]
    x = np.random.default_rng(0).standard_normal((a.batch, 1, 64, 64)).astype(np.float32)
    macs = count_macs(create_model("crop_cnn", 10, 1, widths=widths, convs_per_block=a.convs),
                      torch.from_numpy(x))
    gflop = 2 * macs * a.batch / 1e9
    print(f"crop_cnn widths {widths} x{a.convs}: {macs / 1e6:.1f} MMAC per 64x64 crop, "
          f"{gflop:.2f} GFLOP per batch of {a.batch}; {a.threads} threads; load average "
          f"{load0:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-crop-") as d:
        bundle = make_bundle(Path(d) / "b", widths, a.convs, a.int8)
        fns = rows(bundle, x, png_batch(a.batch), a.threads, a.int8)
        n = 1024
        A = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        peak_gflop = 2 * n ** 3 / 1e9
        fns["matmul (FLOP ceiling probe)"] = lambda: A @ A
        for fn in fns.values():  # warm up
            fn()
            fn()
        times = interleaved(fns, a.rounds, time.perf_counter)
        cpu = cpu_pass(fns, A, min(a.rounds, 20))
    ceiling = [gflop / (peak_gflop / t) for t in times.pop("matmul (FLOP ceiling probe)")]
    cpu_ceiling = [gflop / (peak_gflop / t) for t in cpu.pop("matmul, 1 thread")]
    report = summarise(times, ceiling, gflop, peak_gflop)
    report["cpu"] = summarise_cpu(cpu, cpu_ceiling, a.threads)
    report.update(load_before=load0, load_after=os.getloadavg()[0], macs_per_crop=macs)
    print(f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


def _mmm(v: list[float]) -> str:
    return f"{statistics.median(v):7.2f} ({min(v):.2f}-{max(v):.2f})"


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, clock: Callable[[], float]
                ) -> dict[str, list[float]]:
    """Seconds of ``clock`` per call of each row, rows in a rotating order every round."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = clock()
            fns[k]()
            out[k].append(clock() - t0)
    return out


def cpu_pass(fns: dict[str, Callable[[], Any]], A: np.ndarray, rounds: int
             ) -> dict[str, list[float]]:
    """CPU seconds (every thread of this process) of the ONNX Runtime rows, whose threads do
    not spin, and of a one-thread matmul (the per-core FLOP rate): a separate pass, after
    torch's and OpenBLAS's spinning threads have gone idle, so their spin is not counted."""
    from threadpoolctl import threadpool_limits

    rows = {k: f for k, f in fns.items() if not k.startswith(("torch", "matmul"))}
    time.sleep(1.0)
    with threadpool_limits(1):
        rows["matmul, 1 thread"] = lambda: A @ A
        return interleaved(rows, rounds, time.process_time)


def summarise_cpu(cpu: dict[str, list[float]], ceiling: list[float], threads: int
                  ) -> dict[str, Any]:
    """CPU milliseconds per batch (every thread of this process): the work, which other jobs
    on a shared machine change far less than wall time. On ``threads`` cores a batch cannot
    take less wall time than its CPU time / threads; the matmul's CPU time gives the FLOP
    ceiling in the same unit."""
    ms_ceiling = [c * 1e3 for c in ceiling]
    print(f"  CPU time per batch, all threads (a batch takes at least CPU time / {threads} "
          f"of wall time on {threads} cores):")
    print(f"  {'FLOP ceiling in CPU ms (1-thread matmul rate)':52s} {_mmm(ms_ceiling)} ms")
    out: dict[str, Any] = {"ceiling_cpu_ms": statistics.median(ms_ceiling), "rows": {}}
    for k, v in cpu.items():
        ms = [t * 1e3 for t in v]
        x_ceiling = [t / c for t, c in zip(v, ceiling, strict=True)]
        print(f"  {k:52s} {_mmm(ms)} CPU ms  x ceiling {_mmm(x_ceiling)}  "
              f"-> >= {statistics.median(ms) / threads:.1f} ms wall on {threads} cores")
        out["rows"][k] = {"cpu_ms_median": statistics.median(ms),
                          "x_ceiling_median": statistics.median(x_ceiling)}
    return out


def summarise(times: dict[str, list[float]], ceiling: list[float], gflop: float,
              peak_gflop: float) -> dict[str, Any]:
    """Print medians (min-max) of ms and of within-round ratios to the FLOP ceiling."""
    ms_ceiling = [c * 1e3 for c in ceiling]
    print(f"  {'FLOP ceiling (matmul peak of the round)':52s} {_mmm(ms_ceiling)} ms  "
          f"(peak {statistics.median([gflop / c for c in ceiling]):.0f} GFLOP/s)")
    out: dict[str, Any] = {"ceiling_ms": statistics.median(ms_ceiling), "rows": {}}
    bare = next(k for k in times if k.startswith("ORT bare fp32 1 session"))
    for k, v in times.items():
        ms = [t * 1e3 for t in v]
        x_ceiling = [t / c for t, c in zip(v, ceiling, strict=True)]
        of_bare = [b / t for t, b in zip(v, times[bare], strict=True)]
        print(f"  {k:52s} {_mmm(ms)} ms  x ceiling {_mmm(x_ceiling)}  "
              f"bare/this {_mmm(of_bare)}")
        out["rows"][k] = {"ms_median": statistics.median(ms), "ms_min": min(ms),
                          "ms_max": max(ms), "x_ceiling_median": statistics.median(x_ceiling),
                          "bare_over_this_median": statistics.median(of_bare)}
    return out


if __name__ == "__main__":
    main()
