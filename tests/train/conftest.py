"""Tiny real image folders for the training tests (kept small: 2 CPU cores, < 3 min total)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMBALANCED_COUNTS = {"d0": 24, "d1": 10, "d2": 4}


def write_imbalanced_folder(root: Path, counts: dict[str, int] = IMBALANCED_COUNTS,
                            size: int = 16, rgb: bool = False, seed: int = 0) -> Path:
    """Class folders of real scikit-learn digits with deliberately unequal counts."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        digit = int(name[1:])
        idx = rng.permutation(np.flatnonzero(d.target == digit))[:n]
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = Image.fromarray((d.images[i] / 16 * 255).astype(np.uint8))
            img = img.resize((size, size), Image.BILINEAR)
            if rgb:
                img = img.convert("RGB")
            img.save(out / f"{i:05d}.png")
    return root


@pytest.fixture(scope="session")
def imbalanced_folder(tmp_path_factory) -> Path:
    """3 digit classes with 24 / 10 / 4 grayscale 16x16 PNGs."""
    return write_imbalanced_folder(tmp_path_factory.mktemp("imbalanced"))


@pytest.fixture(scope="session")
def rgb_folder(tmp_path_factory) -> Path:
    """The same 3 classes as 32x32 RGB PNGs (for the timm/transfer tests)."""
    return write_imbalanced_folder(tmp_path_factory.mktemp("rgb"), {"d0": 12, "d1": 12,
                                                                    "d2": 12}, 32, rgb=True)


def tiny_cfg(**kw):
    """A fast config for the tiny folders (1 thread, 16 px, 2 epochs); a keyword None leaves
    that field out (at its default and not given: --model auto's to choose)."""
    from imgtriage.train.config import TrainConfig

    base = {"model": "crop_cnn", "img_size": 16, "epochs": 2, "batch_size": 8, "lr": 3e-3,
            "num_threads": 1, "val_frac": 0.25, "model_kwargs": {"widths": [8, 16, 32]}}
    base.update(kw)
    return TrainConfig(**{k: v for k, v in base.items() if v is not None})


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core to the rest)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_default_rule(bundle_path: Path) -> dict:
    """The end every training route shares: the temperature fitted on validation (kept only
    when it lowers NLL, else the bundle says why it kept T = 1; raised to the confidence cap
    when validation has no error), the default abstain rule, an
    OOD scorer, and an ONNX graph that outputs the features the scorer reads. Returns the
    manifest."""
    from imgtriage.bundle import load_bundle

    m = load_bundle(bundle_path).manifest
    d, cal = m["decision"], m["calibration"]["default"]
    t = cal["temperature"]
    assert t["n"] == m["metrics"]["val_count"] > 0
    if t["kept"] and "confidence_cap" in t:  # no validation error: T raised to the cap
        assert d["temperature"] == t["temperature"] > t["nll_temperature"]
        assert "no error" in t["note"] and t["confidence_cap"] < 1
    elif t["kept"]:
        assert d["temperature"] != 1.0 and t["nll_after"] < t["nll_before"]
    else:
        assert d["temperature"] == 1.0 and "kept T = 1" in t["note"]
    assert d["abstain"] is True and cal["thresholds"]["strategy"] == "target_accuracy"
    # the earlier stages are read where the network has them (not an image + feature model)
    assert d["ood"]["file"] in m["files"] and (d["ood"]["method"] == "knn+rmd+stages" or (
        d["ood"]["method"] == "knn+rmd" and "no stages" in cal["ood"]["note"]))
    assert m["profiles"]["default"] == d
    assert m["onnx"]["outputs"] == ["logits", "features", "ood_score"], m["onnx"]
    return m
