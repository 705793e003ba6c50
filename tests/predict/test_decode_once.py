"""Every input file is decoded exactly once, for every predictor kind, on every path that
classifies files: ``predict_paths``, ``imgtriage predict`` and the HTTP service.

Reads are counted where every decoder reads: ``read_image`` as the preprocessing module calls
it. (A cascade used to read each file a second time on the ``imgtriage predict`` path.)
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

import imgtriage.data.preprocess as preprocess
from imgtriage.cli.main import app
from imgtriage.predict import Predictor

KINDS = ("classifier", "gallery", "cascade")


@pytest.fixture(scope="module")
def bundles(tiny_bundle, digits_folder, tmp_path_factory) -> dict[str, Path]:
    """One bundle of each kind over the digits: the trained classifier, a gallery of an
    untrained siamese encoder enrolled from three digit classes, and a cascade on it."""
    import torch

    from imgtriage.bundle import new_manifest, save_bundle
    from imgtriage.evaluate.decision import DecisionPolicy
    from imgtriage.models import create_model
    from imgtriage.predict.cascade import CascadeConfig, build_cascade
    from imgtriage.predict.gallery_edit import create_gallery

    root = tmp_path_factory.mktemp("kinds")
    spec = Predictor.load(tiny_bundle).spec
    cascade = build_cascade(tiny_bundle, digits_folder, root / "cascade",
                            CascadeConfig(route_share=0.5))
    torch.manual_seed(0)
    encoder = create_model("siamese", num_classes=3, in_chans=1, embed_dim=8, widths=(8, 16))
    manifest = new_manifest(model_name="siamese", model_kwargs={"embed_dim": 8,
                                                                "widths": [8, 16]},
                            in_chans=1, preprocess=spec.to_dict(), classes=["a", "b", "c"],
                            decision=DecisionPolicy().to_dict())
    clf = save_bundle(root / "siamese", manifest, encoder.state_dict())
    enrol = root / "enrol"
    for d in sorted(digits_folder.iterdir())[:3]:
        (enrol / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:3]:
            (enrol / d.name / f.name).write_bytes(f.read_bytes())
    gallery = create_gallery(clf, enrol, root / "gallery")
    return {"classifier": tiny_bundle, "gallery": Path(gallery.path),
            "cascade": Path(cascade.bundle_path)}


@pytest.fixture(scope="module")
def inbox(digits_folder, tmp_path_factory) -> Path:
    """Ten real digits in two folders and one broken file."""
    root = tmp_path_factory.mktemp("inbox")
    for d in sorted(digits_folder.iterdir())[:5]:
        (root / d.name).mkdir()
        for f in sorted(d.iterdir())[:2]:
            (root / d.name / f.name).write_bytes(f.read_bytes())
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


class Reads:
    """``read_image`` wrapped to count calls per input (thread-safe: decoding is threaded)."""

    def __init__(self, monkeypatch) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        real = preprocess.read_image

        def counted(source, *args, name=None, **kw):
            with self._lock:
                self.counts[name or str(source)] += 1
            return real(source, *args, name=name, **kw)

        monkeypatch.setattr(preprocess, "read_image", counted)


def _files(inbox: Path) -> list[str]:
    return sorted(str(f) for f in inbox.rglob("*") if f.is_file())


@pytest.mark.parametrize("kind", KINDS)
def test_predict_paths_decodes_each_file_once(bundles, inbox, kind, monkeypatch):
    p = Predictor.load(bundles[kind])
    reads = Reads(monkeypatch)
    report = p.predict_paths([inbox], batch_size=4)
    assert len(report["results"]) == 10 and len(report["defects"]) == 1
    assert dict(reads.counts) == dict.fromkeys(_files(inbox), 1)
    if kind == "cascade":  # both stages answered, so both paths were taken
        assert {r["stage"] for r in report["results"]} == {1, 2}


@pytest.mark.parametrize("kind", KINDS)
def test_cli_predict_decodes_each_file_once(bundles, inbox, kind, monkeypatch, tmp_path):
    out = tmp_path / "r.jsonl"
    reads = Reads(monkeypatch)
    res = CliRunner().invoke(app, ["predict", str(bundles[kind]), str(inbox), "--output",
                                   str(out), "--batch-size", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    kinds = Counter(json.loads(line)["kind"] for line in out.read_text().splitlines())
    assert kinds == {"meta": 1, "result": 10, "defect": 1}
    assert dict(reads.counts) == dict.fromkeys(_files(inbox), 1)


@pytest.mark.parametrize("kind", KINDS)
def test_service_decodes_each_upload_once(bundles, inbox, kind, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imgtriage.serve import ServeConfig, create_app

    p = Predictor.load(bundles[kind], num_threads=1)
    files = _files(inbox)
    names = [Path(f).relative_to(inbox).as_posix().replace("/", "_") for f in files]
    with TestClient(create_app(ServeConfig(bundle=str(bundles[kind]), threads=1),
                               predictor=p)) as client:
        for _ in range(600):  # the warm-up decodes its own image before counting starts
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        reads = Reads(monkeypatch)
        body = client.post("/v1/classify", files=[
            ("files", (n, Path(f).read_bytes(), "image/png"))
            for n, f in zip(names, files, strict=True)]).json()
    assert [r["path"] for r in body["results"]] == names  # one entry per upload, in order
    assert sum("issue" in r for r in body["results"]) == 1
    assert dict(reads.counts) == dict.fromkeys(names, 1)
