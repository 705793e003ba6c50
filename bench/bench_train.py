"""Training images/second of ``fit()`` against a bare PyTorch loop, in the same run.

Same model (``crop_cnn``, same initial weights), same data, batch size, optimiser (AdamW, no
decay on biases/norms, constant LR), memory format (channels_last unless
``--channels-last off``), threads and number of epochs; every epoch ends with a
validation pass over the same validation images in both. Rates are train images per second
of wall time (validation included). Runs are interleaved; the figure is the median over
``--rounds`` of each row's ratio to the faster bare loop of the same round.

Rows:

- ``bare DataLoader``: ``DataLoader(TensorDataset(x, y), shuffle=True)`` and the textbook
  loop (zero_grad, forward, loss, backward, step), then ``model.eval()`` over the val set;
- ``bare slicing``: the same loop indexing a ``randperm`` of the in-memory tensors (the
  fastest a hand-written loop gets on in-memory data);
- ``fit()``: :func:`imgtriage.train.fit` on the same ``(x, y)`` arrays (progress bar off);
- ``fit() + log + ckpt``: as :func:`imgtriage.train.train` calls it, with the metrics log
  and a resumable checkpoint every epoch;
- with ``--files``: the same comparison on JPEG files decoded every epoch (MSTAR chips at
  64 px): a DataLoader with one worker process over PIL-decoded files against ``fit()`` on a
  streaming :class:`~imgtriage.train.pipeline.FileSource` with one worker.

The in-memory data are real Fashion-MNIST images (Debian ``dataset-fashion-mnist``), 28x28.

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_train.py --files
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import MSTAR, load_fashion_mnist
from imgtriage.models import create_model
from imgtriage.train.config import TrainConfig
from imgtriage.train.loop import fit
from imgtriage.train.optim import param_groups

# memory format of the bare loops' weights and batches: the one fit() uses (--channels-last)
FORMAT = {"fmt": torch.channels_last}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("crop_cnn", 10, 1).to(memory_format=FORMAT["fmt"])


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # the same groups fit() builds (no decay on biases/norms); a bare loop would do the same
    return torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor,
                yb: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(xb.contiguous(memory_format=FORMAT["fmt"])), yb)
    loss.backward()
    opt.step()


@torch.no_grad()
def _evaluate(model: nn.Module, batches) -> float:
    model.eval()
    hits = total = 0
    for xb, yb in batches:
        hits += int((model(xb.contiguous(memory_format=FORMAT["fmt"])).argmax(1) == yb).sum())
        total += len(yb)
    return hits / max(total, 1)


def bare_loader(train: tuple, val: tuple, cfg: TrainConfig) -> float:
    """Seconds of the textbook loop over a DataLoader of in-memory tensors."""
    model = _model()
    opt = _optimizer(model, cfg)
    tr = DataLoader(TensorDataset(*train), batch_size=cfg.batch_size, shuffle=True,
                    drop_last=False, generator=torch.Generator().manual_seed(0))
    va = DataLoader(TensorDataset(*val), batch_size=cfg.batch_size * 2)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        for xb, yb in tr:
            _train_step(model, opt, xb, yb)
        _evaluate(model, va)
    return time.perf_counter() - t0


def bare_slicing(train: tuple, val: tuple, cfg: TrainConfig) -> float:
    """Seconds of the same loop slicing a random permutation of the tensors."""
    model = _model()
    opt = _optimizer(model, cfg)
    (x, y), (xv, yv), bs = train, val, cfg.batch_size
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        for part in torch.randperm(len(y), generator=g).split(bs):
            _train_step(model, opt, x[part], y[part])
        _evaluate(model, ((xv[i:i + 2 * bs], yv[i:i + 2 * bs]) for i in range(0, len(yv), 2 * bs)))
    return time.perf_counter() - t0


def fit_plain(train: tuple, val: tuple, cfg: TrainConfig) -> float:
    model = _model()
    t0 = time.perf_counter()
    fit(model, train, val, cfg, show_progress=False)
    return time.perf_counter() - t0


def fit_with_files(train: tuple, val: tuple, cfg: TrainConfig) -> float:
    """fit() with the metrics log and per-epoch checkpoints, as train() runs it."""
    model = _model()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(model, train, val, cfg, show_progress=False, log_path=Path(tmp) / "m.jsonl",
            checkpoint_dir=Path(tmp) / "checkpoint")
        return time.perf_counter() - t0


# --- streaming from files ------------------------------------------------------------------

class _PilFiles(Dataset):
    """What a bare loop does with files: PIL open, resize, to a normalised tensor."""

    def __init__(self, samples: list, classes: list[str], size: int) -> None:
        self.samples, self.size = samples, size
        self.index = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        s = self.samples[i]
        with Image.open(s.path) as im:
            a = np.asarray(im.convert("L").resize((self.size, self.size), Image.BILINEAR),
                           np.float32)
        return torch.from_numpy((a / 255.0 - 0.5) / 0.5)[None], self.index[s.label]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def bare_files(samples: tuple, classes: list[str], cfg: TrainConfig, size: int) -> float:
    model = _model()
    opt = _optimizer(model, cfg)
    tr_s, va_s = samples
    kw = dict(num_workers=1, persistent_workers=True, worker_init_fn=_worker_init,
              prefetch_factor=4)
    tr = DataLoader(_PilFiles(tr_s, classes, size), batch_size=cfg.batch_size, shuffle=True,
                    generator=torch.Generator().manual_seed(0), **kw)
    va = DataLoader(_PilFiles(va_s, classes, size), batch_size=cfg.batch_size * 2, **kw)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        for xb, yb in tr:
            _train_step(model, opt, xb, yb)
        _evaluate(model, va)
    return time.perf_counter() - t0


def fit_files(samples: tuple, classes: list[str], cfg: TrainConfig, size: int) -> float:
    from imgtriage.data.preprocess import PreprocessSpec
    from imgtriage.train.pipeline import FileSource

    model = _model()
    spec = PreprocessSpec.default_for(1, (size, size))
    tr = FileSource(samples[0], classes, spec, workers=1)
    va = FileSource(samples[1], classes, spec, workers=1)
    t0 = time.perf_counter()
    fit(model, tr, va, cfg, show_progress=False, num_classes=len(classes))
    return time.perf_counter() - t0


def _mstar_samples(n_train: int, n_val: int) -> tuple[tuple[list, list], list[str]]:
    from imgtriage.data import discover

    ds = discover(MSTAR / "train")
    rng = np.random.default_rng(0)
    picks = rng.permutation(len(ds.samples))
    samples = [ds.samples[i] for i in picks]
    return (samples[:n_train], samples[n_train:n_train + n_val]), list(ds.classes)


def _race(rows: dict[str, Callable[[], float]], rounds: int, n_images: int
          ) -> list[dict[str, float]]:
    """Interleaved rounds: each row once per round; images/s per row and round. Round 0 is
    a warm-up, not returned (the first calls build oneDNN kernels and import lazily)."""
    out = []
    for r in range(rounds + 1):
        rates = {}
        for name, fn in rows.items():
            rates[name] = n_images / fn()
            tag = "warm-up" if r == 0 else f"round {r}"
            print(f"  {tag}: {name:<22} {rates[name]:8.0f} img/s", flush=True)
        if r:
            out.append(rates)
    return out


def _report(title: str, rounds: list[dict[str, float]], bare: list[str]) -> None:
    """Per row: best and median images/s, and the median over rounds of the ratio to the
    faster bare loop *of the same round* (this VM's speed drifts between rounds, so a ratio
    within a round is the fair one; best-of alone rewards whichever row got a lucky window)."""
    names = list(rounds[0])
    print(f"\n{title} (ratio = row / the faster bare loop of the same round; median of "
          f"{len(rounds)} rounds)")
    for name in names:
        rates = [r[name] for r in rounds]
        ratios = [r[name] / max(r[b] for b in bare) for r in rounds]
        print(f"  {name:<22} best {max(rates):6.0f} img/s, median {statistics.median(rates):6.0f}"
              f"   ratio {statistics.median(ratios):5.3f}  (rounds: "
              + ", ".join(f"{x:.2f}" for x in ratios) + ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--files", action="store_true", help="also the streaming-from-files rows")
    ap.add_argument("--files-train", type=int, default=1200)
    ap.add_argument("--files-size", type=int, default=64)
    ap.add_argument("--channels-last", choices=("on", "off"), default="on",
                    help="memory format of every row (fit()'s default on CPU and CUDA is on)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    FORMAT["fmt"] = torch.channels_last if args.channels_last == "on" else torch.contiguous_format
    cfg = TrainConfig(model="crop_cnn", epochs=args.epochs, batch_size=args.batch_size,
                      lr=1e-3, schedule="constant", checkpoint_every=1, seed=0,
                      channels_last=args.channels_last)
    (x, y), _ = load_fashion_mnist()
    x = torch.from_numpy((x[:args.n_train + args.n_val] / 255.0 - 0.5) / 0.5).float()[:, None]
    y = torch.from_numpy(y[:args.n_train + args.n_val]).long()
    train, val = (x[:args.n_train], y[:args.n_train]), (x[args.n_train:], y[args.n_train:])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; crop_cnn on "
          f"Fashion-MNIST 28x28, {args.n_train} train + {args.n_val} val, batch "
          f"{args.batch_size}, {args.epochs} epochs per timing, best of {args.rounds}, "
          f"channels_last {args.channels_last} in every row")
    rows = {"bare DataLoader": lambda: bare_loader(train, val, cfg),
            "bare slicing": lambda: bare_slicing(train, val, cfg),
            "fit()": lambda: fit_plain(train, val, cfg),
            "fit() + log + ckpt": lambda: fit_with_files(train, val, cfg)}
    rounds = _race(rows, args.rounds, args.n_train * args.epochs)
    _report("in-memory tensors", rounds, ["bare DataLoader", "bare slicing"])
    if args.files:
        samples, classes = _mstar_samples(args.files_train, args.files_train // 4)
        fcfg = TrainConfig(model="crop_cnn", epochs=1, batch_size=args.batch_size, lr=1e-3,
                           schedule="constant", seed=0, channels_last=args.channels_last)
        print(f"\nfiles: MSTAR JPEGs at {args.files_size} px, {len(samples[0])} train + "
              f"{len(samples[1])} val decoded every epoch by 1 worker process")
        frows = {"bare DataLoader files": lambda: bare_files(samples, classes, fcfg,
                                                             args.files_size),
                 "fit() FileSource": lambda: fit_files(samples, classes, fcfg,
                                                       args.files_size)}
        frounds = _race(frows, args.rounds, len(samples[0]) * fcfg.epochs)
        _report("streaming files", frounds, ["bare DataLoader files"])


if __name__ == "__main__":
    main()
