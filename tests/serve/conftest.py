"""Fixtures for the HTTP service: apps around the really trained tiny bundle, PNG bytes, and
a real ``imgtriage serve`` process on a free loopback port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from serve_helpers import Gate, wait_ready

from imgtriage.serve import ServeConfig, create_app
from imgtriage.serve.process import ServiceProcess, start_service


@pytest.fixture(scope="session")
def digit_pngs(digits_folder) -> list[tuple[str, bytes]]:
    """(name, bytes) of real digit PNGs, three per class."""
    out = []
    for d in sorted(digits_folder.iterdir()):
        for p in sorted(d.glob("*.png"))[:3]:
            out.append((f"{d.name}_{p.name}", p.read_bytes()))
    return out


@pytest.fixture(scope="session")
def profiled_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle plus a 'strict' profile (abstain below 0.99, conformal sets)."""
    from imgtriage.bundle import update_bundle
    from imgtriage.evaluate.conformal import ConformalPredictor

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=200)
    conformal = ConformalPredictor(alpha=0.1).fit(probs, probs.argmax(1)).to_dict()
    strict = {"temperature": 1.0, "thresholds": [0.99] * 10, "abstain": True,
              "unknown_label": "unknown", "conformal": conformal, "profile": "strict"}
    out = tmp_path_factory.mktemp("profiled") / "bundle"
    update_bundle(tiny_bundle, {"profiles": {"strict": strict}}, note="strict profile for "
                  "serve tests", out=out)
    return out


@pytest.fixture(scope="session")
def predictor(profiled_bundle):
    """One loaded Predictor (read-only: tests that patch methods load their own)."""
    from imgtriage.predict import Predictor

    return Predictor.load(profiled_bundle, num_threads=1)


@pytest.fixture
def make_client(profiled_bundle) -> Iterator[Callable[..., object]]:
    """``make_client(predictor=None, wait=True, **config)`` -> a started TestClient."""
    from fastapi.testclient import TestClient

    opened = []

    def make(predictor=None, wait: bool = True, **overrides):
        cfg = ServeConfig(bundle=str(profiled_bundle), threads=1, **overrides)
        client = TestClient(create_app(cfg, predictor=predictor), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        if wait:
            wait_ready(client)
        return client

    yield make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client, predictor):
    return make_client(predictor=predictor)


@pytest.fixture
def gated_predictor(profiled_bundle):
    """A fresh Predictor whose model step (predict_decoded) waits on a Gate (overload tests)."""
    from imgtriage.predict import Predictor

    p = Predictor.load(profiled_bundle, num_threads=1)
    gate = Gate()
    p.predict_decoded = gate.wrap(p.predict_decoded)
    yield p, gate
    gate.event.set()


@pytest.fixture(scope="session")
def live_server(profiled_bundle, tmp_path_factory) -> Iterator[ServiceProcess]:
    """A real `imgtriage serve` process shared by the subprocess and browser tests."""
    tmp = tmp_path_factory.mktemp("live")
    with start_service(profiled_bundle, log=tmp / "serve.log", timeout=90, args=[
            "--threads", "1", "--body-timeout", "1", "--max-request-bytes", "200000",
            "--no-access-log"]) as server:
        yield server
