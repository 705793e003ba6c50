"""End-to-end files/s of `imgtriage predict` against a plain PyTorch loop, the tuned ONNX
Runtime ceiling, CLI start-up, and peak memory.

What it measures, on one folder of real JPEGs (CIFAR-10 photos from ../shared/datasets,
upscaled to 256-500 px and re-encoded; the models see 224x224 after resize 256 + centre crop),
rows interleaved in every round (rotating order), ``--rounds`` rounds (>= 3):

- naive: a plain loop that opens each file with PIL, applies torchvision transforms
  (Resize 256, CenterCrop 224, ToTensor, Normalize) and calls the eager PyTorch model batch
  by batch (torch threads = all cores, inference mode);
- default bundle: a bundle exactly as ``imgtriage train`` writes it with its defaults: the
  training step (``train.onnx_step.attach_graph``, ``--quantize auto``) attaches the
  parity-checked fp32 graph and a static int8 graph calibrated on half the photos (the
  "training split") and judged against fp32 on the other half (the held-out "validation
  split", labelled by their CIFAR class folders); int8 is the bundle's default only where that
  check accepts it. Run by ``runner.run_batch`` (the call behind ``imgtriage predict``) with no
  options: what a user gets without any export step. Its precision is printed;
- fp32 / int8: the same bundle with ``precision="fp32"`` / ``precision="int8"`` (int8 is
  forced where the check refused it: speed only; with random weights, near-ties between
  logits make the check refuse some models);
- torch backend: the same bundle with ``backend="torch"``;
- process decoders: the default bundle with decoding in worker processes
  (``executor="process"``, ``imgtriage predict --executor process``) instead of threads;
- CLI end to end: ``imgtriage predict`` in a child process (start-up included), the
  bundle's default precision;
- ceiling: a tuned bare ONNX Runtime session (same threads, spinning off, every graph
  optimisation) on the ready, preprocessed tensors, batch 16: the model's own rate;
- start-up: seconds of ``imgtriage predict BUNDLE one.jpg`` (child process, wall time).

Each round's figures are divided by the same round's naive (or fp32 / ceiling) figure, and
the medians (min-max) of those ratios are printed; never best-of. Every in-process row also
records files per CPU-second (all threads of this process, over the timed span) and the goal
ratios are printed in that unit too ("per CPU-s"): the work a file costs, which other jobs on
a shared machine change far less than wall time (it misses pipeline bubbles and idle cores,
so on a quiet machine the wall ratios are the goal). Memory: peak RSS of
``imgtriage predict --store ... --output x.jsonl`` over 1,000 and 10,000 small PNGs.

The models of ``--trained`` (default: both) get trained weights: ``imgtriage.train`` on 3,000
cifar10-small training photos at 64 px (``trained_weights``, cached after the first run),
run here at 224 on test photos only. Speed does not depend on the values, but the int8
check does: random weights give near-tied logits (a median top-2 margin of ~0.007 for
ResNet-18), which no 8-bit graph reproduces, so the default bundle of a random-weight model
is not what ``train`` gives a user. ``--trained ""`` gives every model random weights.

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_predict.py --files 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "datasets" / "cifar10-small"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(out: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` CIFAR-10 test photos (never trained on) upscaled to random 256-500 px sides, as
    quality-90 JPEGs."""
    src = sorted((CIFAR / "test").rglob("*.jpg"))
    if not src:
        sys.exit(f"{CIFAR} is missing: this benchmark needs ../shared/datasets/cifar10-small")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(src), size=n, replace=n > len(src))
    files = []
    for i, k in enumerate(picks):
        w, h = (int(v) for v in rng.integers(256, 501, size=2))
        dest = out / src[k].parent.name / f"{i:05d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(src[k]).convert("RGB").resize((w, h), Image.BICUBIC).save(dest, quality=90)
        files.append(dest)
    return sorted(files)


TRAIN_SIDE, TRAIN_EPOCHS, TRAIN_PER_CLASS = 64, 3, 300
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgtriage-bench"


def trained_weights(model: str, epochs: int = TRAIN_EPOCHS) -> Path:
    """The state of ``model`` trained from scratch by ``imgtriage.train`` on the first 300
    cifar10-small training photos of each class (shorter side to 73 px, centre crop 64,
    ImageNet mean/std, flips, seed 0, 10% held out, one thread), cached under ``CACHE`` so
    later runs skip the training.
    Trained at 64 px because 224 px training does not fit a benchmark on 2 cores; the network
    is fully convolutional, so the bench runs these weights at 224 (and reports their
    accuracy there): what matters here is that they are trained weights, with the logit
    margins training gives, not random ones whose logits are near ties."""
    from imgtriage.bundle import load_bundle
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    dest = CACHE / (f"{model}-cifar10small{TRAIN_PER_CLASS}-{TRAIN_SIDE}px-{epochs}ep-seed0"
                    ".safetensors")
    if dest.exists():
        return dest
    cfg = TrainConfig(model=model, pretrained="none", img_size=TRAIN_SIDE,
                      resize="shorter_crop", crop_pct=0.875, epochs=epochs, batch_size=64,
                      lr=2e-3, augment="flip", val_frac=0.1, seed=0, quantize="none",
                      num_threads=1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as d:
        data = Path(d) / "data"
        for cls in sorted(p for p in (CIFAR / "train").iterdir() if p.is_dir()):
            (data / cls.name).mkdir(parents=True)
            for f in sorted(cls.glob("*.jpg"))[:TRAIN_PER_CLASS]:
                (data / cls.name / f.name).symlink_to(f)
        res = train(data, Path(d) / "run", cfg)
        from safetensors.torch import save_file

        dest.parent.mkdir(parents=True, exist_ok=True)
        save_file(load_bundle(res.bundle_path).state_dict(), str(dest))
    print(f"  trained {model} on {TRAIN_PER_CLASS} x 10 photos of {CIFAR / 'train'} at "
          f"{TRAIN_SIDE} px for {epochs} epochs in {time.perf_counter() - t0:.0f}s (cached: "
          f"{dest})", flush=True)
    return dest


def make_bundle(model: str, out: Path, classes: list[str], size: int = 224,
                in_chans: int = 3, weights: Path | None = None) -> Path:
    """A bundle with the usual ImageNet preprocessing and random-init weights, or the
    trained ones of ``weights`` (a safetensors state dict)."""
    from imgtriage.bundle import new_manifest, save_bundle
    from imgtriage.data.preprocess import PreprocessSpec
    from imgtriage.evaluate.decision import DecisionPolicy
    from imgtriage.models import create_model

    torch.manual_seed(0)
    net = create_model(model, len(classes), in_chans)
    if weights is not None:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(weights)), strict=True)
    spec = (PreprocessSpec(in_chans=3, size=(size, size), resize="shorter_crop",
                           crop_pct=size / 256, mean=MEAN, std=STD)
            if in_chans == 3 else PreprocessSpec.default_for(in_chans, (size, size)))
    manifest = new_manifest(model_name=model, model_kwargs={}, in_chans=in_chans,
                            preprocess=spec.to_dict(), classes=classes,
                            decision=DecisionPolicy().to_dict())
    return save_bundle(out, manifest, net.state_dict())


_LAST_CPU: list[float] = []  # files per CPU-second of the last in-process row


def _cpu(n: int, c0: float) -> None:
    """Record files per CPU-second (every thread of this process) since ``c0``: the work a
    row costs, which other jobs on the machine change far less than its wall time."""
    _LAST_CPU[:] = [n / max(time.process_time() - c0, 1e-9)]


def baseline(bundle: Path, files: list[Path], batch: int = 16) -> float:
    """Files/s of the plain loop: PIL + torchvision transforms + eager PyTorch."""
    import torchvision.transforms as T

    from imgtriage.bundle import load_bundle
    from imgtriage.predict.backends import build_model

    model = build_model(load_bundle(bundle))
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(files), batch):
            x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files[i:i + batch]])
            model(x).argmax(1)
    _cpu(len(files), c0)
    return len(files) / (time.perf_counter() - t0)


def ours(bundle: Path, folder: Path, tmp: Path, *, backend: str = "auto",
         precision: str | None = None, executor: str = "thread") -> float:
    """Files/s of run_batch (what `imgtriage predict` calls), writing a JSONL report; the
    bundle is loaded before the clock starts, as the naive loop builds its model before."""
    from imgtriage.predict import Predictor
    from imgtriage.predict.runner import run_batch

    p = Predictor.load(bundle, backend=backend, precision=precision)
    t0, c0 = time.perf_counter(), time.process_time()
    run = run_batch(p, [folder], output=tmp / "out.jsonl", executor=executor)
    dt = time.perf_counter() - t0
    if executor == "thread":  # process_time misses the CPU of decode processes
        _cpu(run.n_new, c0)
    if run.n_results != sum(1 for _ in folder.rglob("*.jpg")):
        raise SystemExit(f"expected every file as a result, got {run}")
    return run.n_new / dt


def cli(bundle: Path, paths: list[Path], tmp: Path) -> float:
    """Wall seconds of `imgtriage predict` in a child process (start-up included)."""
    args = [sys.executable, "-m", "imgtriage", "predict", str(bundle), *map(str, paths),
            "--output", str(tmp / "cli.jsonl"), "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def ceiling(bundle: Path, files: list[Path], precision: str = "fp32", batch: int = 16
            ) -> Callable[[], float]:
    """Files/s of a tuned bare ONNX Runtime session on ready tensors (decoded once here)."""

    from imgtriage.bundle import load_bundle
    from imgtriage.data.preprocess import PreprocessSpec, load_input
    from imgtriage.predict.ort_session import open_session, session_options, usable_cores

    b = load_bundle(bundle)
    spec = PreprocessSpec.from_dict(b.manifest["preprocess"])
    x = np.stack([load_input(f, spec)[0] for f in files])
    name = "model.onnx" if precision == "fp32" else "model.int8.onnx"
    sess = open_session(b.verified_bytes(name), session_options(usable_cores()))

    def run() -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(x), batch):
            sess.run(["logits"], {"input": np.ascontiguousarray(x[i:i + batch])})
        _cpu(len(x), c0)
        return len(x) / (time.perf_counter() - t0)

    return run


def trained_bundle(model: str, out: Path, classes: list[str], files: list[Path],
                   weights: Path | None = None) -> Path:
    """A bundle as `imgtriage train` writes it by default: the training step's fp32 graph and
    its int8 graph, calibrated on the even-numbered photos and judged on the odd ones;
    ``weights``: trained weights (None: random)."""
    from imgtriage.bundle import load_bundle, save_bundle
    from imgtriage.data import PreprocessSpec, Sample
    from imgtriage.train.onnx_step import attach_graph, graph_inputs

    plain = make_bundle(model, out.with_name(out.name + "-plain"), classes, weights=weights)
    b = load_bundle(plain)
    state = b.state_dict()
    samples = [Sample(str(f), f.parent.name) for f in files]
    train, val = samples[::2], samples[1::2]
    inputs = graph_inputs((train, train), (val, val),
                          PreprocessSpec.from_dict(dict(b.info.preprocess)), classes, "auto")
    manifest, graph = attach_graph(b.info, state, inputs, "auto", say=print)
    return save_bundle(out, manifest, state, graph)


DEFAULT, FP32, INT8 = ("default bundle from train", "fp32 ONNX (precision fp32)",
                       "int8 ONNX (precision int8)")
NAIVE = "naive (PIL + torchvision + eager torch)"
PROCESS = "default bundle, process decoders"


def keep_rows(names: list[str], only: str) -> list[str]:
    """The row names to run: all for an empty ``only``, else the naive baseline and every
    row whose name contains one of ``only``'s comma-separated parts."""
    parts = [s for s in only.split(",") if s]
    return [n for n in names if not parts or n == NAIVE or any(s in n for s in parts)]


def bench_model(model: str, files: list[Path], folder: Path, tmp: Path, rounds: int,
                variants: bool, weights: str = "trained", only: str = ""
                ) -> dict[str, list[float]]:
    from imgtriage.bundle import load_bundle

    classes = sorted({f.parent.name for f in files})
    if classes != sorted(p.name for p in (CIFAR / "train").iterdir() if p.is_dir()):
        sys.exit("every CIFAR class needs a photo here: raise --files")
    state = trained_weights(model) if weights == "trained" else None
    t0 = time.perf_counter()
    b = trained_bundle(model, tmp / model, classes, files, state)
    default = load_bundle(b).manifest["onnx"]["precision"]
    print(f"  training step (fp32 graph + int8 check): {time.perf_counter() - t0:.0f}s; the "
          f"default bundle ({weights} weights) predicts in {default}", flush=True)
    runs: dict[str, Callable[[], float]] = {
        NAIVE: lambda: baseline(b, files),
        f"{DEFAULT} ({default})": lambda: ours(b, folder, tmp),
        FP32: lambda: ours(b, folder, tmp, precision="fp32"),
        INT8: lambda: ours(b, folder, tmp, precision="int8"),
        f"CLI end to end {default} (start-up included)": lambda: len(files) / cli(
            b, [folder], tmp),
        "ceiling: tuned bare ORT fp32 on tensors": ceiling(b, files),
        "ceiling: tuned bare ORT int8 on tensors": ceiling(b, files, "int8"),
        "CLI start-up, 1 file (s)": lambda: cli(b, files[:1], tmp),
    }
    if variants:
        runs["torch backend"] = lambda: ours(b, folder, tmp, backend="torch")
        runs[PROCESS] = lambda: ours(b, folder, tmp, executor="process")
    keys = keep_rows(list(runs), only)
    got: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for name in keys[r % len(keys):] + keys[:r % len(keys)]:
            _LAST_CPU.clear()
            v = runs[name]()
            got[name].append(v)
            cpu = f"  ({_LAST_CPU[0]:.2f} per CPU-s)" if _LAST_CPU else ""
            if _LAST_CPU:
                got.setdefault(f"{name} per CPU-s", []).append(_LAST_CPU[0])
            print(f"  round {r + 1} {name:42s} {v:7.2f}{cpu}", flush=True)
    return got


def ratios(got: dict[str, list[float]]) -> dict[str, list[float]]:
    """Within-round ratios: every row / naive, and the goal ratios."""
    naive = got[NAIVE]
    out = {f"{k} / naive": [v / n for v, n in zip(vs, naive, strict=True)]
           for k, vs in got.items() if "start-up" not in k and not k.startswith("naive")
           and "per CPU-s" not in k}
    pairs = {"int8 / fp32 (end to end)": (INT8, FP32),
             "fp32 end to end / fp32 ceiling": (FP32, "ceiling: tuned bare ORT fp32 on tensors"),
             "int8 end to end / int8 ceiling": (INT8, "ceiling: tuned bare ORT int8 on tensors"),
             "int8 ceiling / fp32 ceiling": ("ceiling: tuned bare ORT int8 on tensors",
                                             "ceiling: tuned bare ORT fp32 on tensors"),
             "process decoders / thread decoders (default bundle)": (PROCESS, None)}
    default = next((k for k in got if k.startswith(DEFAULT) and "per CPU-s" not in k), None)
    for name, (a, b) in pairs.items():
        b = b or default
        if a not in got or b not in got:
            continue
        out[name] = [x / y for x, y in zip(got[a], got[b], strict=True)]
        if f"{a} per CPU-s" in got and f"{b} per CPU-s" in got:  # the same, in work
            out[f"{name}, per CPU-s"] = [x / y for x, y in zip(
                got[f"{a} per CPU-s"], got[f"{b} per CPU-s"], strict=True)]
    return out


def _mmm(v: list[float]) -> str:
    return f"{float(np.median(v)):7.2f} ({min(v):.2f}-{max(v):.2f})"


_RSS_CHILD = """
import resource, sys
from imgtriage.cli.main import app
sys.argv = ["imgtriage", "predict", *sys.argv[1:]]
try:
    app()
except SystemExit as e:
    if e.code:
        raise
# VmHWM, not ru_maxrss: on Linux ru_maxrss starts from the parent's peak across (v)fork+exec,
# so it would report the benchmark process's own peak instead of this run's
hwm = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
print("PEAK_RSS_KB", hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss(bundle: Path, folder: Path, tmp: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `imgtriage predict --store` over ``folder``, in a child."""
    args = [str(bundle), str(folder), "--store", str(tmp / f"{folder.name}.sqlite"),
            "--output", str(tmp / f"{folder.name}.jsonl"), "--no-progress"]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, *args], capture_output=True,
                         text=True, check=True).stdout
    kb = int(out.split("PEAK_RSS_KB")[-1].split()[0])
    return kb / 1024, time.perf_counter() - t0


def memory_bench(tmp: Path, counts: tuple[int, ...] = (1_000, 10_000)) -> dict[int, float]:
    """Peak RSS for folders of 1,000 and 10,000 files (hard links to 100 real PNGs)."""
    from imgtriage.predict.export import export_onnx

    src = tmp / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    bases = []
    for i in range(100):
        p = src / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(p)
        bases.append(p)
    b = make_bundle("crop_cnn", tmp / "small", [f"c{i}" for i in range(10)], 32, 1)
    export_onnx(b)
    out = {}
    for n in counts:
        folder = tmp / f"files{n}"
        for i in range(n):
            d = folder / f"{i // 500:03d}"
            d.mkdir(parents=True, exist_ok=True)
            os.link(bases[i % 100], d / f"{i:06d}.png")
        mib, secs = peak_rss(b, folder, tmp)
        out[n] = mib
        print(f"  {n:6d} files: peak RSS {mib:6.1f} MiB ({n / secs:.0f} files/s incl. "
              "start-up)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="resnet50,resnet18")
    ap.add_argument("--no-variants", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--rows", default="",
                    help="comma-separated parts of row names: run only the naive baseline and "
                    "the rows whose names contain one (default: every row)")
    ap.add_argument("--trained", default="resnet50,resnet18",
                    help="models given trained weights (trained on cifar10-small training "
                    "photos, cached after the first run); the others get random weights")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.rounds < 3:
        sys.exit("--rounds must be >= 3: the figures are medians of within-round ratios")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    load0 = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores, load average "
          f"{load0:.1f}", flush=True)
    results: dict[str, object] = {"load_before": load0}
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as d:
        tmp = Path(d)
        folder = tmp / "jpegs"
        files = make_jpegs(folder, a.files)
        print(f"{len(files)} JPEGs, 256-500 px, in {folder}", flush=True)
        for model in filter(None, a.models.split(",")):  # --models "" measures memory only
            print(f"{model} @224:", flush=True)
            weights = "trained" if model in a.trained.split(",") else "random"
            got = bench_model(model, files, folder, tmp, a.rounds, not a.no_variants, weights,
                              a.rows)
            for name, v in got.items():
                print(f"  {name:52s} {_mmm(v)}", flush=True)
            for name, v in ratios(got).items():
                print(f"  ratio {name:46s} {_mmm(v)}", flush=True)
            results[model] = {"raw": got, "ratios": ratios(got)}
        if not a.no_memory:
            print("memory (crop_cnn, 32 px PNGs, --store, JSONL output):", flush=True)
            results["peak_rss_mib"] = memory_bench(tmp)
    results["load_after"] = os.getloadavg()[0]
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
