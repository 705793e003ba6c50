"""Every route of the real app, and answers identical to Predictor.predict_bytes."""

from __future__ import annotations

import base64

import pytest
from serve_helpers import png_bytes


def test_health_routes_and_page(client):
    assert client.get("/livez").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "static/app.js" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_model_route_describes_bundle_and_limits(client, predictor):
    body = client.get("/v1/model").json()
    described = predictor.describe()
    for key in ("classes", "bundle_sha256", "bundle_version", "schema_version", "input",
                "decision", "backend"):
        assert body[key] == described[key]
    assert body["profiles"] == ["strict"]
    assert body["limits"]["max_images"] == 32 and body["auth"] is False
    assert body["limits"]["max_pixels"] == 40_000_000


def test_multipart_and_base64_match_predict_bytes(client, predictor, digit_pngs):
    names = [n for n, _ in digit_pngs[:12]]
    data = [b for _, b in digit_pngs[:12]]
    expected = predictor.predict_bytes(data, names, include_probs=True, topk=3)
    files = [("files", (n, b, "image/png")) for n, b in zip(names, data, strict=True)]
    multi = client.post("/v1/classify?include_probs=true&topk=3", files=files)
    assert multi.status_code == 200, multi.text
    doc = {"images": [base64.b64encode(b).decode() for b in data], "names": names}
    js = client.post("/v1/classify?include_probs=true&topk=3", json=doc)
    assert js.status_code == 200, js.text
    assert multi.json()["results"] == expected == js.json()["results"]
    body = multi.json()
    assert body["model"]["bundle_sha256"] == predictor.bundle_sha256
    assert body["num_results"] == 12 and body["num_defects"] == 0
    row = body["results"][0]
    assert set(row) >= {"path", "class", "class_id", "score", "abstained", "probs", "topk"}
    assert abs(sum(row["probs"].values()) - 1) < 1e-4 and len(row["topk"]) == 3


def test_base64_without_names_and_data_url(client, predictor, digit_pngs):
    data = digit_pngs[0][1]
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    r = client.post("/v1/classify", json={"images": [url, base64.b64encode(data).decode()]})
    assert r.status_code == 200, r.text
    rows = r.json()["results"]
    assert [x["path"] for x in rows] == ["image[0]", "image[1]"]
    expected = predictor.predict_bytes([data, data], ["image[0]", "image[1]"])
    assert rows == expected


def test_profile_abstains_with_conformal_sets(client, digit_pngs):
    files = [("files", (n, b, "image/png")) for n, b in digit_pngs[:4]]
    rows = client.post("/v1/classify?profile=strict", files=files).json()["results"]
    assert all(r["abstained"] and r["class"] == "unknown" for r in rows)
    assert all(r["class_id"] == -1 and r["best_class"].startswith("d") for r in rows)
    assert all(isinstance(r["set"], list) for r in rows)
    default = client.post("/v1/classify", files=files).json()["results"]
    assert not any(r["abstained"] for r in default) and "set" not in default[0]


def test_tta_and_temperature_options_reach_the_predictor(client, predictor, digit_pngs):
    name, data = digit_pngs[5]
    for query, opts in (("tta=true", {"tta": True}), ("temperature=3.5", {"temperature": 3.5})):
        r = client.post(f"/v1/classify?include_probs=true&{query}",
                        files=[("files", (name, data, "image/png"))])
        assert r.json()["results"] == predictor.predict_bytes([data], [name],
                                                              include_probs=True, **opts)
    plain = client.post("/v1/classify?include_probs=true",
                        files=[("files", (name, data, "image/png"))]).json()["results"][0]
    hot = client.post("/v1/classify?include_probs=true&temperature=50",
                      files=[("files", (name, data, "image/png"))]).json()["results"][0]
    assert max(hot["probs"].values()) < max(plain["probs"].values())


def test_mixed_good_and_bad_images_answer_200_with_inline_defects(client, digit_pngs):
    good = digit_pngs[0][1]
    files = [("files", ("a.png", good, "image/png")),
             ("files", ("notes.txt", b"hello, not an image", "text/plain")),
             ("files", ("cut.png", good[: len(good) // 2], "image/png")),
             ("files", ("liar.jpg", good, "image/jpeg")),
             ("files", ("empty.png", b"", "image/png"))]
    r = client.post("/v1/classify", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["num_results"] == 1 and body["num_defects"] == 4
    res = body["results"]
    assert res[0]["path"] == "a.png" and "class" in res[0]
    assert [e.get("issue") for e in res[1:]] == ["unsupported_format", "truncated",
                                                "format_mismatch", "empty_file"]
    assert all(e["message"] for e in res[1:])


def test_client_file_names_are_labels_never_paths(client, digit_pngs):
    data = digit_pngs[0][1]
    r = client.post("/v1/classify", files=[("files", ("../../etc/x.png", data, "image/png")),
                                           ("files", ("C:\\temp\\y.png", data, "image/png"))])
    assert [e["path"] for e in r.json()["results"]] == ["x.png", "y.png"]


def test_rgb_png_is_converted_like_predict_bytes(client, predictor):
    data = png_bytes(48, seed=3, mode="RGB")
    r = client.post("/v1/classify", files=[("files", ("rgb.png", data, "image/png"))])
    assert r.json()["results"] == predictor.predict_bytes([data], ["rgb.png"])


def test_openapi_documents_both_encodings_and_problems(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/classify"]["post"]
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    params = {p["name"] for p in op["parameters"]}
    assert params == {"include_probs", "topk", "tta", "profile", "temperature"}
    for code in ("400", "401", "413", "415", "422", "429", "503"):
        assert "application/problem+json" in op["responses"][code]["content"]
    assert {"/v1/model", "/livez", "/readyz", "/metrics"} <= set(spec["paths"])


@pytest.mark.parametrize("origin_allowed", [False, True])
def test_cors_is_off_unless_an_origin_is_given(make_client, predictor, origin_allowed):
    origin = "https://app.example.org"
    c = make_client(predictor=predictor, cors_origins=(origin,) if origin_allowed else ())
    pre = c.options("/v1/classify", headers={"Origin": origin,
                                             "Access-Control-Request-Method": "POST"})
    got = c.get("/v1/model", headers={"Origin": origin})
    if origin_allowed:
        assert pre.headers["access-control-allow-origin"] == origin
        assert got.headers["access-control-allow-origin"] == origin
    else:
        assert "access-control-allow-origin" not in pre.headers
        assert "access-control-allow-origin" not in got.headers


def test_metrics_label_routes_behind_a_root_path(profiled_bundle, predictor, digit_pngs):
    """Behind a proxy prefix (--root-path) requests are still counted under their route."""
    from fastapi.testclient import TestClient
    from serve_helpers import metric_samples, wait_ready

    from imgtriage.serve import ServeConfig, create_app

    cfg = ServeConfig(bundle=str(profiled_bundle), threads=1, root_path="/triage")
    with TestClient(create_app(cfg, predictor=predictor), root_path="/triage") as prefixed:
        wait_ready(prefixed)
        r = prefixed.post("/triage/v1/classify",
                          files=[("files", (digit_pngs[0][0], digit_pngs[0][1], "image/png"))])
        assert r.status_code == 200, r.text
        m = metric_samples(prefixed)
    key = ("imgtriage_http_requests_total",
           (("method", "POST"), ("route", "/v1/classify"), ("status", "200")))
    assert m[key] == 1
    assert not any(name == "imgtriage_http_requests_total" and ("route", "other") in labels
                   for name, labels in m)


def test_a_cascade_refuses_noise_over_http_as_its_api_does(make_client, calibrated_run,
                                                          digits_folder, digit_pngs, tmp_path):
    """Issue 15: noise the cascade's first stage would answer goes to stage 2 (its OOD gate),
    which refuses it; the HTTP answer is the API's for the same bytes."""
    import io

    import numpy as np
    from PIL import Image

    from imgtriage.predict import Predictor
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    cascade = build_cascade(calibrated_run.bundle_path, digits_folder, tmp_path / "cascade",
                            CascadeConfig(route_share=0.3)).bundle_path
    p = Predictor.load(cascade, num_threads=1)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8)).save(
        buf, format="PNG")
    files = [("noise.png", buf.getvalue()), digit_pngs[0]]
    assert p.predict_bytes([files[0][1]], ["noise.png"], ood_gate=False)[0]["stage"] == 1
    r = make_client(predictor=p).post(
        "/v1/classify", files=[("files", (n, b, "image/png")) for n, b in files])
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    want = p.predict_bytes([b for _, b in files], [n for n, _ in files])
    assert (got[0]["stage"], got[0]["stage1_ood"], got[0]["reason"], got[0]["abstained"]) == \
        (2, True, "out_of_distribution", True)
    for g, w in zip(got, want, strict=True):
        assert (g["class"], g["stage"], g.get("stage1_ood"), g["reason"]) == \
            (w["class"], w["stage"], w.get("stage1_ood"), w["reason"])


def test_a_cascade_bundle_is_served_like_predict_bytes(make_client, tiny_bundle, digits_folder,
                                                      digit_pngs, tmp_path):
    """Another predictor kind through the service's decode-then-batch path."""
    from imgtriage.predict import Predictor
    from imgtriage.predict.cascade import CascadeConfig, build_cascade

    cascade = build_cascade(tiny_bundle, digits_folder, tmp_path / "cascade",
                            CascadeConfig(route_share=0.5)).bundle_path
    p = Predictor.load(cascade, num_threads=1)
    c = make_client(predictor=p)
    files = [*digit_pngs, ("junk.png", b"not an image")]
    r = c.post("/v1/classify?include_probs=true",
               files=[("files", (n, b, "image/png")) for n, b in files])
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    want = p.predict_bytes([b for _, b in files], [n for n, _ in files], include_probs=True)
    assert [g["path"] for g in got] == [n for n, _ in files]
    assert got[-1]["issue"] and want[-1]["issue"]  # a defect in its place
    assert {g["stage"] for g in got[:-1]} == {1, 2}  # both stages answered some
    for g, w in zip(got[:-1], want[:-1], strict=True):
        assert (g["class"], g["stage"]) == (w["class"], w["stage"])
        assert abs(g["score"] - w["score"]) < 1e-5
