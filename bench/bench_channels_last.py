"""channels_last against the default (NCHW) memory format, per model, in the same run.

Why ``fit()`` and the torch prediction backend use channels_last on CPU as well as CUDA:
for each model, training steps per second (AdamW, cross-entropy, random data of the model's
usual size) and inference images per second at batch 1 and batch 32, with the weights and
the batch in NCHW and in channels_last. Every round times both layouts (rotating which goes
first), one window of ``--seconds`` each; ratio = channels_last / NCHW of the same round
(above 1: faster), and the table gives the median (min-max) of those ratios over
``--rounds`` (>= 3) rounds, never a best-of. This compares torch layouts: what training and
``--backend torch`` run; the default prediction path (ONNX Runtime) does not use them.

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_channels_last.py --seconds 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from imgtriage.models import create_model

# (label, registry name, in_chans, size, train batch, model kwargs)
CASES = [
    ("crop_cnn 64px", "crop_cnn", 1, 64, 64, {}),
    ("crop_cnn MSTAR recipe 64px", "crop_cnn", 1, 64, 64,
     {"widths": [16, 32, 64, 128], "convs_per_block": 2}),
    ("crop_cnn Fashion recipe 28px", "crop_cnn", 1, 28, 128,
     {"widths": [32, 64, 128], "convs_per_block": 2}),
    ("deep_cnn 96px", "deep_cnn", 1, 96, 32, {}),
    ("resnet18 224px", "timm:resnet18", 3, 224, 16, {}),
    ("efficientnet_b0 224px", "timm:efficientnet_b0", 3, 224, 16, {}),
]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _rate(step: Callable[[], int], seconds: float) -> float:
    """Items per second of ``step`` (which returns how many items it did) over a window."""
    step()  # warm-up: oneDNN picks and caches its kernels on the first call
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        done += step()
    return done / elapsed


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor) -> Callable[[], int]:
    def step() -> int:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return len(x)
    return step


def _infer_step(model: nn.Module, x: torch.Tensor) -> Callable[[], int]:
    def step() -> int:
        with torch.inference_mode():
            model(x)
        return len(x)
    return step


def measure(name: str, in_chans: int, size: int, batch: int, kw: dict, layout: str,
            seconds: float) -> dict[str, float]:
    fmt = LAYOUTS[layout]
    torch.manual_seed(0)
    model = create_model(name, 10, in_chans, **kw).to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, in_chans, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    model.train()
    out = {"train": _rate(_train_step(model, opt, x, y), seconds)}
    model.eval()
    for bs in (1, 32):
        xb = torch.randn(bs, in_chans, size, size).contiguous(memory_format=fmt)
        out[f"infer_bs{bs}"] = _rate(_infer_step(model, xb), seconds)
    return out


def median_min_max(values: list[float]) -> str:
    """``median (min-max)`` of a list of within-round figures."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.rounds < 3:
        sys.exit("--rounds must be >= 3: the figures are medians of within-round ratios")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds "
          f"x {args.seconds:g} s windows, load average {os.getloadavg()[0]:.1f}; images/s "
          "median (min-max), ratio = channels_last / nchw within each round")
    print(f"{'model':<30} {'what':<10} {'nchw':>20} {'ch_last':>20} {'ratio':>18}")
    layouts = list(LAYOUTS)
    for label, name, chans, size, batch, kw in CASES:
        got: dict[str, dict[str, list[float]]] = {lay: {} for lay in LAYOUTS}
        for r in range(args.rounds):
            for lay in layouts[r % 2:] + layouts[:r % 2]:
                for k, v in measure(name, chans, size, batch, kw, lay, args.seconds).items():
                    got[lay].setdefault(k, []).append(v)
        for k, a in got["nchw"].items():
            b = got["channels_last"][k]
            ratio = [y / x for x, y in zip(a, b, strict=True)]
            print(f"{label:<30} {k:<10} {median_min_max(a):>20} {median_min_max(b):>20} "
                  f"{median_min_max(ratio):>18}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
