"""The Ray engine's pieces without a cluster: decode stage, model stage, records, layout."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from imgtriage.errors import ConfigError, MissingDependencyError
from imgtriage.integrations import ray_engine
from imgtriage.integrations._ray_blocks import (
    BatchClassifier,
    decode_batch,
    defect_record,
    from_record,
    result_record,
    row_schema,
)
from imgtriage.integrations.ray_engine import RayConfig
from imgtriage.predict import Predictor
from imgtriage.predict.batch import iter_files


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor.load(tiny_bundle)


def _paths_batch(paths: list[str]) -> dict[str, np.ndarray]:
    return {"index": np.arange(len(paths)), "path": np.array(paths, dtype=object)}


def test_decode_batch_turns_bad_files_into_rows_not_errors(predictor, mixed_inputs):
    files = list(iter_files(mixed_inputs))
    out = decode_batch(_paths_batch(files), decoder=predictor.decoder, cwd="/")
    bad = {f.rsplit("/", 1)[-1]: str(i) for f, i, ok in
           zip(files, out["issue"], out["ok"], strict=True) if not ok}
    assert bad == {"empty.png": "empty_file", "text.png": "format_mismatch",
                   "truncated.png": "truncated", "missing.png": "not_found"}
    good = [pickle.loads(d) for d, ok in zip(out["decoded"], out["ok"], strict=True) if ok]
    assert [d.name for d in good] == [f for f, ok in zip(files, out["ok"], strict=True) if ok]
    assert all(d.x.shape == (predictor.spec.in_chans, *predictor.spec.size) for d in good)
    assert not any(out["decoded"][~out["ok"]])  # defects carry no input, never garbage


def test_decode_batch_names_relative_paths_as_given(predictor, mixed_folder):
    rel = "inbox/d0/empty.png"
    out = decode_batch(_paths_batch([rel, "inbox/d3/nope.png"]), decoder=predictor.decoder,
                       cwd=str(mixed_folder.parent))
    assert out["issue"].tolist() == ["empty_file", "not_found"]
    assert str(mixed_folder) not in out["message"][0] and rel in out["message"][0]
    assert out["path"].tolist() == [rel, "inbox/d3/nope.png"]


def test_classifier_rows_equal_predictor_rows(tiny_bundle, predictor, mixed_inputs):
    files = list(iter_files(mixed_inputs))
    opts = {"include_probs": True, "topk": 2}
    clf = BatchClassifier(str(tiny_bundle), opts, num_threads=1)
    table = clf(decode_batch(_paths_batch(files), decoder=predictor.decoder, cwd="/"))
    assert table.schema == row_schema()
    got = [from_record(r) for r in table.to_pylist()]
    want = predictor.predict_paths(mixed_inputs, include_probs=True, topk=2)
    assert [i for k, i in got if k == "defect"] == want["defects"]
    results = [i for k, i in got if k == "result"]
    assert [r["class"] for r in results] == [r["class"] for r in want["results"]]
    np.testing.assert_allclose([r["score"] for r in results],
                               [r["score"] for r in want["results"]], atol=2e-6)


def test_records_round_trip_every_optional_key():
    row = {"path": "a.png", "class": "cat", "class_id": 1, "score": 0.912345,
           "abstained": False, "probs": {"cat": 0.912345, "dog": 0.087655},
           "topk": [{"class": "cat", "class_id": 1, "score": 0.912345}],
           "set": ["cat"], "flags": ["degenerate"], "stage": 2}
    assert from_record(result_record(3, row)) == ("result", row)
    plain = {k: row[k] for k in ("path", "class", "class_id", "score", "abstained")}
    assert from_record(result_record(0, plain)) == ("result", plain)
    d = from_record(defect_record(7, "b.png", "truncated", "cut short"))
    assert d == ("defect", {"path": "b.png", "issue": "truncated", "message": "cut short"})


class _FakeRay:
    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


@pytest.mark.parametrize(("resources", "cfg", "actors"), [
    ({"CPU": 2.0}, RayConfig(), 1),
    ({"CPU": 64.0}, RayConfig(), 32),
    ({"CPU": 64.0, "GPU": 4.0}, RayConfig(), 4),
    ({"CPU": 8.0}, RayConfig(num_actors=3, actor_cpus=2), 3),
    ({"CPU": 8.0, "GPU": 2.0}, RayConfig(use_gpus=False), 4),
])
def test_plan_follows_cluster_resources(resources, cfg, actors):
    plan = ray_engine._plan(_FakeRay(**resources), cfg)
    assert plan.num_actors == actors
    assert plan.gpus == (0 if cfg.use_gpus is False else int(resources.get("GPU", 0)))


@pytest.mark.parametrize(("resources", "cfg", "match"), [
    ({"CPU": 2.0}, RayConfig(use_gpus=True), "has none"),
    ({"CPU": 2.0}, RayConfig(num_actors=2), "needs 3 CPUs"),
    ({"CPU": 16.0, "GPU": 1.0}, RayConfig(num_actors=2), "one GPU each"),
])
def test_plan_refuses_layouts_that_cannot_run(resources, cfg, match):
    with pytest.raises(ConfigError, match=match):
        ray_engine._plan(_FakeRay(**resources), cfg)


@pytest.mark.parametrize(("kw", "match"), [
    ({"batch_size": 0}, "--batch-size"), ({"num_actors": 0}, "num_actors"),
    ({"backend": "tensorrt"}, "--backend"), ({"files_per_block": 0}, "files_per_block"),
])
def test_config_validates_with_the_flag_to_change(kw, match):
    with pytest.raises(ConfigError, match=match):
        RayConfig(**kw)


def test_missing_ray_says_which_extra_to_install(monkeypatch, tiny_bundle, mixed_folder):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"imgtriage\[ray\]"):
        ray_engine.ray_predict(tiny_bundle, [mixed_folder])


def test_dataset_dir_must_be_new(tmp_path, tiny_bundle, mixed_folder):
    pytest.importorskip("ray")
    (tmp_path / "old.parquet").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not empty"):
        ray_engine.ray_predict(tiny_bundle, [mixed_folder], dataset_dir=tmp_path)


def test_unknown_profile_fails_before_any_cluster_starts(tiny_bundle, mixed_folder):
    ray = pytest.importorskip("ray")
    from imgtriage.errors import PredictionError

    with pytest.raises(PredictionError, match="profile"):
        ray_engine.predict_with_ray(tiny_bundle, [mixed_folder], RayConfig(),
                                    {"profile": "nope"})
    assert not ray.is_initialized()


def test_cascade_bundle_rows_keep_their_stage(tiny_bundle, digits_folder, mixed_folder,
                                              tmp_path, monkeypatch):
    """The cascade's own decoder runs in the decode tasks (each file read once, relative paths
    resolved against the driver's cwd), and the extra ``stage`` key survives the records."""
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    res = build_cascade(tiny_bundle, digits_folder, tmp_path / "cascade",
                        CascadeConfig(route_share=0.5))
    cascade = Predictor.load(res.bundle_path)
    monkeypatch.chdir(mixed_folder.parent)
    files = list(iter_files(["inbox/d3", "inbox/d0"]))
    want = cascade.predict_paths(["inbox/d3", "inbox/d0"])
    clf = BatchClassifier(str(res.bundle_path), {}, num_threads=1)
    monkeypatch.chdir(tmp_path)  # the actor's cwd is not the driver's
    table = clf(decode_batch(_paths_batch(files), decoder=cascade.decoder,
                             cwd=str(mixed_folder.parent)))
    got = [from_record(r) for r in table.to_pylist()]
    assert [i for k, i in got if k == "defect"] == want["defects"]
    results = [i for k, i in got if k == "result"]
    assert {r["stage"] for r in results} == {1, 2}
    assert [(r["path"], r["class"], r["stage"]) for r in results] == \
        [(r["path"], r["class"], r["stage"]) for r in want["results"]]
