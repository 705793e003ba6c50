"""Shared fixtures: real tiny image folders and a really trained tiny bundle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("IMGTRIAGE_OFFLINE", "1")  # never touch the network from tests

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path of ../shared/datasets/<name>, or skip the test cleanly when it is absent."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} not present (tests that need ../shared skip without it)")
    return path


def write_digits_folder(root: Path, per_class: int = 30, size: int = 32, seed: int = 0,
                        classes: tuple[int, ...] = tuple(range(10))) -> Path:
    """scikit-learn digits as class folders of real grayscale PNGs at ``size`` pixels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for c in classes:
        idx = rng.permutation(np.flatnonzero(d.target == c))[:per_class]
        out = root / f"d{c}"
        out.mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = (d.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(img).resize((size, size), Image.BILINEAR).save(out / f"{i:05d}.png")
    return root


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """10 classes x 30 real digit PNGs (32x32 grayscale)."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def tiny_run(digits_folder, tmp_path_factory):
    """A crop_cnn really trained for 3 epochs on ``digits_folder`` (a few seconds)."""
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    cfg = TrainConfig(model="crop_cnn", img_size=32, epochs=3, batch_size=32, lr=3e-3,
                      num_threads=1)
    return train(digits_folder, tmp_path_factory.mktemp("run"), cfg, quiet=True)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run) -> Path:
    """Path of the bundle directory of ``tiny_run`` (treat as read-only; copy to modify)."""
    return tiny_run.bundle_path
