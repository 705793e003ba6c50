"""Photos that need resizing (the 8-bit fast path of to_input) get the same answer through the
Python API, the `imgtriage predict` command and the HTTP service, and all three name the same
backend and precision (the bundle's default: its int8 graph, accepted by its held-out check)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from imgtriage.cli.main import app
from imgtriage.data.preprocess import float_input, load_input


def _photos(root, rng) -> list:
    """8-bit grey JPEGs and PNGs of odd sizes (never the bundle's 32x32)."""
    paths = []
    for i, (h, w) in enumerate([(45, 61), (90, 33), (128, 100), (37, 37), (64, 200)]):
        array = np.sort(rng.integers(0, 256, (h, w), dtype=np.uint8), axis=i % 2)
        path = root / f"p{i}.{'jpg' if i % 2 else 'png'}"
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "JPEG" if i % 2 else "PNG")
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def test_resized_photos_answer_the_same_via_api_cli_and_http(tmp_path, predictor, client,
                                                             profiled_bundle):
    paths = _photos(tmp_path, np.random.default_rng(16))
    spec = predictor.spec  # 8-bit grey into a bilinear, dtype-scaled 1-channel model
    assert (spec.in_chans, spec.interpolation, spec.scaling) == (1, "bilinear", "dtype")
    for p in paths:  # the fast path's values: the float planes' up to rounding
        x = load_input(p, spec)[0]
        np.testing.assert_allclose(x, float_input(np.asarray(Image.open(p)), spec), atol=1e-4)
    api_report = predictor.predict_paths([str(p) for p in paths], include_probs=True)
    api = api_report["results"]
    out = tmp_path / "cli.json"
    res = CliRunner().invoke(app, ["predict", str(profiled_bundle), *map(str, paths),
                                   "--output", str(out), "--include-probs", "--threads", "1",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    cli_report = json.loads(out.read_text())
    cli = cli_report["results"]
    files = [("files", (str(p), p.read_bytes(), "application/octet-stream")) for p in paths]
    http = client.post("/v1/classify?include_probs=true", files=files)
    assert http.status_code == 200, http.text
    runs = {"api": api_report["meta"], "cli": cli_report["meta"], "http": http.json()["model"]}
    for name, meta in runs.items():
        assert (meta["backend"], meta["precision"]) == ("onnx", "int8"), name
    assert res.output.startswith("predict: backend onnx, precision int8, 1 thread (int8 "
                                 "accepted: agreement")
    rows = {"api": api, "cli": cli, "http": http.json()["results"]}
    for name, got in rows.items():
        # the service keeps an upload's file name, not the client's folders
        assert [r["path"].rsplit("/", 1)[-1] for r in got] == [p.name for p in paths], name
        for r, want in zip(got, api, strict=True):
            assert r["class"] == want["class"] and r["abstained"] == want["abstained"], name
            assert abs(r["score"] - want["score"]) <= 1e-6, name
            assert np.allclose(list(r["probs"].values()), list(want["probs"].values()),
                               atol=1e-6), name
