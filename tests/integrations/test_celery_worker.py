"""Celery for real: a redis-server on loopback, a prefork worker process, tasks sent through
the broker and their reports read back from the result backend."""

from __future__ import annotations

import shutil

import pytest

from imgtriage.predict import Predictor

pytestmark = pytest.mark.slow


def test_classify_paths_through_redis_equals_predictor(celery_worker, tiny_bundle,
                                                       mixed_inputs, same_report):
    want = Predictor.load(tiny_bundle).predict_paths(mixed_inputs, include_probs=True,
                                                     topk=2)
    res = celery_worker.send_task("imgtriage.classify_paths", args=[mixed_inputs],
                                  kwargs={"include_probs": True, "topk": 2})
    got = res.get(timeout=120)
    same_report(got, want)
    assert got["results"] == want["results"]  # same code, same numbers: exactly equal
    assert len(got["defects"]) == 4 and got["meta"]["engine"] == "celery"


def test_bundle_loads_once_per_worker_process(celery_worker, tiny_bundle, mixed_folder):
    pids = {celery_worker.send_task("imgtriage.classify_paths",
                                    args=[[str(mixed_folder / "d7")]]).get(timeout=120)
            ["meta"]["worker"]["pid"] for _ in range(3)}
    info = celery_worker.send_task("imgtriage.worker_info").get(timeout=60)
    assert pids == {info["pid"]}  # -c 1: one child served every task
    assert [(b["path"], b["loads"]) for b in info["bundles"]] == \
        [(str(tiny_bundle.resolve()), 1)]


def test_classify_new_files_through_redis(celery_worker, digits_folder, tmp_path):
    inbox = tmp_path / "inbox"
    shutil.copytree(digits_folder / "d8", inbox)
    store = str(tmp_path / "inbox.sqlite")
    first = celery_worker.send_task("imgtriage.classify_new_files",
                                    args=[[str(inbox)], store]).get(timeout=120)
    assert first["meta"]["num_files"] == 30
    (inbox / "late.png").write_bytes(next(inbox.glob("*.png")).read_bytes())
    second = celery_worker.send_task("imgtriage.classify_new_files",
                                     args=[[str(inbox)], store]).get(timeout=120)
    assert [r["path"] for r in second["results"]] == [str(inbox / "late.png")]
    assert second["meta"]["n_skipped"] == 30


def test_a_bad_request_fails_the_task_with_the_reason(celery_worker, mixed_folder):
    res = celery_worker.send_task("imgtriage.classify_paths", args=[[str(mixed_folder)]],
                                  kwargs={"profile": "no-such-profile"})
    with pytest.raises(Exception, match="no-such-profile"):
        res.get(timeout=120)
    assert res.state == "FAILURE"
