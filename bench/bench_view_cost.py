"""What folding the mirror into a bundle costs at prediction (issue 14 / issue 16's speed).

A bundle whose training kept ``view_average`` (flip TTA decided on validation) runs every
image and its mirror through the network. This times the bundle's own network as ONNX
Runtime graphs, with and without the averaging (the same weights; the logits + features
outputs the predict path runs), on random inputs of the bundle's size, in interleaved
rounds, and prints images per second and the median (min-max) of the within-round ratios.
Decoding and preprocessing are not included (they are paid once per image either way), so
the ratio is the cost's upper bound for ``predict``/``serve``::

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_view_cost.py RUN/bundle \\
        --rounds 5 --threads 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np


def _graph(bundle, views: list[str] | None) -> bytes:
    import torch

    from imgtriage.models import WithFeatures, create_model

    m = bundle.info.model
    kw = {k: v for k, v in dict(m.kwargs).items() if k != "view_average"}
    model = create_model(m.name, m.num_classes, m.in_chans, **kw,
                         **({"view_average": views} if views else {}))
    model.load_state_dict(bundle.state_dict(), strict=True)
    net = WithFeatures(model).eval()
    size = bundle.info.preprocess["size"]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, m.in_chans, *size),), buf, dynamo=False,
                          input_names=["x"], output_names=["logits", "features"],
                          dynamic_axes={n: {0: "b"} for n in ("x", "logits", "features")},
                          opset_version=17, do_constant_folding=True)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict:
    from imgtriage.bundle import load_bundle
    from imgtriage.predict.ort_session import open_session, session_options

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    b = load_bundle(args.bundle)
    views = list(b.info.model.kwargs.get("view_average") or ["hflip"])
    sessions = {name: open_session(_graph(b, v), session_options(args.threads))
                for name, v in (("plain", None), ("mirror_averaged", views))}
    size = b.info.preprocess["size"]
    x = np.random.default_rng(0).random((args.images, b.info.model.in_chans, *size),
                                        dtype=np.float32)
    for s in sessions.values():  # warm-up
        s.run(None, {"x": x[:args.batch]})
    rates: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for r in range(args.rounds):
        for name in order[r % 2:] + order[:r % 2]:  # rotate which goes first
            t0 = time.perf_counter()
            for i in range(0, len(x), args.batch):
                sessions[name].run(None, {"x": x[i:i + args.batch]})
            rates[name].append(len(x) / (time.perf_counter() - t0))
    ratio = [a / p for a, p in zip(rates["mirror_averaged"], rates["plain"], strict=True)]
    out = {"bundle": str(args.bundle), "model": b.info.model.name, "size": size,
           "views": views, "threads": args.threads, "rounds": args.rounds,
           "load_avg_1min": os.getloadavg()[0],
           "img_per_s": {k: {"median": float(np.median(v)), "min": float(min(v)),
                             "max": float(max(v))} for k, v in rates.items()},
           "throughput_ratio": {"median": float(np.median(ratio)), "min": float(min(ratio)),
                                "max": float(max(ratio))}}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
