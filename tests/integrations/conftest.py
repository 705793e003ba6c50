"""Fixtures for the distributed engines: a folder with bad files, one Ray cluster, a real
Redis server and a real Celery worker (each skipped cleanly when its package is absent)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mixed_folder(digits_folder, tmp_path_factory) -> Path:
    """The digits folder plus an empty file, text named .png and a truncated PNG."""
    root = tmp_path_factory.mktemp("mixed") / "inbox"
    shutil.copytree(digits_folder, root)
    (root / "d0" / "empty.png").write_bytes(b"")
    (root / "d1" / "text.png").write_text("hello, not an image\n")
    good = sorted((root / "d2").glob("*.png"))[0]
    (root / "d2" / "truncated.png").write_bytes(good.read_bytes()[:120])
    return root


@pytest.fixture(scope="session")
def mixed_inputs(mixed_folder) -> list[str]:
    """What a user passes: the folder and a path that does not exist."""
    return [str(mixed_folder), str(mixed_folder.parent / "missing.png")]


def comparable_meta(meta: dict) -> dict:
    """Meta without what legitimately differs between engines and runs."""
    drop = {"timestamp", "elapsed_sec", "engine", "ray", "worker", "threads"}
    return {k: v for k, v in meta.items() if k not in drop}


def _assert_same_report(got: dict, want: dict, tol: float = 2e-6) -> None:
    """Same files in the same order, same classes, scores within ``tol``, same defects.

    Scores are rounded to 6 decimals and batches may differ between engines, so two
    engines can land one rounding step apart: ``tol`` allows that step plus float error.
    """
    assert [r["path"] for r in got["results"]] == [r["path"] for r in want["results"]]
    for g, w in zip(got["results"], want["results"], strict=True):
        assert set(g) == set(w), g["path"]
        assert (g["class"], g["class_id"], g["abstained"]) == \
            (w["class"], w["class_id"], w["abstained"]), g["path"]
        assert abs(g["score"] - w["score"]) <= tol, g["path"]
        for c, p in (w.get("probs") or {}).items():
            assert abs(g["probs"][c] - p) <= tol, (g["path"], c)
        if "topk" in w:
            assert [t["class"] for t in g["topk"]] == [t["class"] for t in w["topk"]]
    assert got["defects"] == want["defects"]
    assert comparable_meta(got["meta"]) == comparable_meta(want["meta"])


@pytest.fixture(scope="session")
def same_report():
    """``same_report(got, want)`` asserts two reports say the same about the same files."""
    return _assert_same_report


# -- Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for every Ray test of a module, shut down at the end."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


# -- Redis and Celery --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A private redis-server on a free loopback port, in a tmp dir, stopped at the end."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (`make system-deps` installs it)")
    redis = pytest.importorskip("redis")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.fail(f"redis-server exited with {proc.returncode}")
                time.sleep(0.05)
        else:
            pytest.fail("redis-server did not answer within 5 s")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def celery_worker(redis_url, tiny_bundle, tmp_path_factory):
    """A real worker (prefork, one child) on the test Redis; yields a client app."""
    pytest.importorskip("celery")
    from imgtriage.integrations.celery_app import CelerySettings, make_app

    log = tmp_path_factory.mktemp("celery") / "worker.log"
    env = {**os.environ, "IMGTRIAGE_CELERY_BROKER": redis_url,
           "IMGTRIAGE_BUNDLE": str(tiny_bundle), "IMGTRIAGE_THREADS": "1",
           "IMGTRIAGE_CELERY_TIME_LIMIT": "300"}
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A",
                                 "imgtriage.integrations.celery_app", "worker", "--pool",
                                 "prefork", "-c", "1", "--loglevel", "INFO",
                                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT)
    app = make_app(CelerySettings(broker_url=redis_url, time_limit=300))
    try:
        _wait_for_worker(app, proc, log)
        yield app
    finally:
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        app.close()


def _wait_for_worker(app, proc, log: Path, timeout: float = 90) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            pytest.fail(f"celery worker exited with {proc.returncode}:\n{log.read_text()}")
        if app.control.ping(timeout=0.5):
            return
    pytest.fail(f"celery worker did not answer within {timeout} s:\n{log.read_text()}")
