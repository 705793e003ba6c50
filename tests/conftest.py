"""Shared fixtures: real tiny image folders and a really trained tiny bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("IMGTRIAGE_OFFLINE", "1")  # never touch the network from tests
if "IMGTRIAGE_CACHE" not in os.environ:  # embedding caches stay out of the user's home
    import atexit
    import shutil
    import tempfile

    os.environ["IMGTRIAGE_CACHE"] = tempfile.mkdtemp(prefix="imgtriage-test-cache-")
    atexit.register(shutil.rmtree, os.environ["IMGTRIAGE_CACHE"], ignore_errors=True)

from shared_helpers import write_digits_folder


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """10 classes x 30 real digit PNGs (32x32 grayscale)."""
    return write_digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def tiny_run(digits_folder, tmp_path_factory):
    """A crop_cnn really trained for 3 epochs on ``digits_folder`` (a few seconds), with its
    int8 graph the default (where its held-out check accepts it)."""
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    # the raw model: T = 1, no rule. --quantize static: int8 is its default whenever the
    # exactness check accepts it, whatever int8's speed on the machine running the tests
    # (auto's speed condition is a timing, which no test may depend on)
    cfg = TrainConfig(model="crop_cnn", img_size=32, epochs=3, batch_size=32, lr=3e-3,
                      num_threads=1, calibrate=False, quantize="static")
    return train(digits_folder, tmp_path_factory.mktemp("run"), cfg, quiet=True)


@pytest.fixture(scope="session")
def calibrated_run(digits_folder, tmp_path_factory):
    """The same model trained with the default options: calibrated on validation, with the
    default abstain rule and the OOD scorer in its bundle."""
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    cfg = TrainConfig(model="crop_cnn", img_size=32, epochs=3, batch_size=32, lr=3e-3,
                      num_threads=1)
    return train(digits_folder, tmp_path_factory.mktemp("calibrated"), cfg, quiet=True)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run) -> Path:
    """Path of the bundle directory of ``tiny_run`` (treat as read-only; copy to modify)."""
    return tiny_run.bundle_path
