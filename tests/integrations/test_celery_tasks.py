"""Celery settings and tasks run in this process (no broker): config, cache, stores."""

from __future__ import annotations

import json
import shutil

import pytest

from imgtriage.errors import ConfigError
from imgtriage.predict import Predictor

pytest.importorskip("celery")

from imgtriage.integrations import celery_tasks
from imgtriage.integrations.celery_app import CelerySettings, make_app


def test_settings_are_safe_for_long_tasks():
    conf = CelerySettings(time_limit=600).to_celery()
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_soft_time_limit"] == 540 < conf["task_time_limit"] == 600
    assert conf["broker_transport_options"]["visibility_timeout"] == 1200
    assert conf["result_backend"] == conf["broker_url"]
    assert make_app(CelerySettings(max_tasks_per_child=7)).conf.worker_max_tasks_per_child == 7


@pytest.mark.parametrize(("kw", "match"), [
    ({"time_limit": 100, "soft_time_limit": 100}, "SOFT_TIME_LIMIT"),
    ({"time_limit": 100, "visibility_timeout": 50}, "second worker"),
    ({"max_tasks_per_child": 0}, "MAX_TASKS_PER_CHILD"),
])
def test_settings_refuse_unsafe_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        CelerySettings(**kw)


def test_settings_from_env():
    s = CelerySettings.from_env({"IMGTRIAGE_CELERY_BROKER": "redis://h:1/2",
                                 "IMGTRIAGE_CELERY_TIME_LIMIT": "90"})
    assert (s.broker_url, s.time_limit, s.result_backend) == ("redis://h:1/2", 90, None)
    with pytest.raises(ConfigError, match="IMGTRIAGE_CELERY_TIME_LIMIT"):
        CelerySettings.from_env({"IMGTRIAGE_CELERY_TIME_LIMIT": "1h"})


def test_predictor_cache_loads_once_and_reloads_a_replaced_bundle(tiny_bundle, tmp_path,
                                                                  caplog):
    from imgtriage.bundle.store import update_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    with caplog.at_level("INFO", logger="imgtriage.celery"):
        first = celery_tasks.get_predictor(str(bundle))
    # the worker says what runs: the int8 graph that passed the tiny bundle's held-out check
    assert "backend onnx, precision int8" in caplog.text
    assert celery_tasks.get_predictor(bundle) is first  # str or Path, same key
    update_bundle(bundle, {"tta": ["vflip"]}, note="retuned in place")
    second = celery_tasks.get_predictor(bundle)
    assert second is not first and second.tta_transforms == ["vflip"]
    info = celery_tasks.worker_info()
    mine = [b for b in info["bundles"] if b["path"] == str(bundle.resolve())]
    assert [b["loads"] for b in mine] == [1]  # only the new version stays loaded
    assert len(info["bundles"]) <= 2


def test_no_bundle_is_a_config_error(monkeypatch):
    monkeypatch.delenv("IMGTRIAGE_BUNDLE", raising=False)
    with pytest.raises(ConfigError, match="IMGTRIAGE_BUNDLE"):
        celery_tasks.get_predictor(None)


def test_classify_paths_in_process_equals_predictor(tiny_bundle, mixed_inputs, tmp_path,
                                                    same_report):
    want = Predictor.load(tiny_bundle).predict_paths(mixed_inputs, include_probs=True)
    got = celery_tasks.classify_paths(mixed_inputs, bundle=str(tiny_bundle),
                                      include_probs=True)
    same_report(got, want)
    assert got["meta"]["engine"] == "celery"
    out = tmp_path / "r.jsonl"
    small = celery_tasks.classify_paths(mixed_inputs, bundle=str(tiny_bundle),
                                        output=str(out))
    assert set(small) == {"meta", "output"} and small["meta"]["num_files"] == 304
    assert len(out.read_text().splitlines()) == 1 + 304


def test_classify_new_files_reports_each_file_once(tiny_bundle, digits_folder, tmp_path):
    inbox = tmp_path / "inbox"
    shutil.copytree(digits_folder / "d4", inbox / "d4")
    store = str(tmp_path / "inbox.sqlite")
    first = celery_tasks.classify_new_files([str(inbox)], store, bundle=str(tiny_bundle))
    assert first["meta"]["num_files"] == 30 and first["meta"]["n_skipped"] == 0
    again = celery_tasks.classify_new_files([str(inbox)], store, bundle=str(tiny_bundle))
    assert again["results"] == [] and again["meta"]["n_skipped"] == 30
    shutil.copy(next((digits_folder / "d5").glob("*.png")), inbox / "new.png")
    (inbox / "broken.png").write_bytes(b"")
    third = celery_tasks.classify_new_files([str(inbox)], store, bundle=str(tiny_bundle))
    assert [r["path"] for r in third["results"]] == [str(inbox / "new.png")]
    assert [d["issue"] for d in third["defects"]] == ["empty_file"]
    assert third["meta"]["n_skipped"] == 30
    out = tmp_path / "new.json"
    (inbox / "newer.png").write_bytes((inbox / "new.png").read_bytes())
    small = celery_tasks.classify_new_files([str(inbox)], store, bundle=str(tiny_bundle),
                                            output=str(out))
    assert small["meta"]["num_files"] == 1
    assert [r["path"] for r in json.loads(out.read_text())["results"]] == \
        [str(inbox / "newer.png")]
