"""Every refusal of the real app: a problem+json body with the right status, and the server
answers the next request normally."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from PIL import Image
from serve_helpers import Gate, assert_problem, still_serving, wait_ready


@pytest.mark.parametrize("body, ctype, slug", [
    (b'{"images": [', "application/json", "bad-json"),
    (b"\xff\xfe\x00", "application/json", "bad-json"),
    (b'{"images": ["not base64!"]}', "application/json", "bad-base64"),
    (b'{"images": ["data:image/png,AAAA"]}', "application/json", "bad-base64"),
    (b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\nabc",
     "multipart/form-data; boundary=xyz", "bad-multipart"),
    (b"whatever", "multipart/form-data", "bad-request"),
])
def test_400_malformed_bodies(client, digit_pngs, body, ctype, slug):
    assert_problem(client.post("/v1/classify", content=body, headers={"content-type": ctype}),
                   400, slug)
    still_serving(client, digit_pngs[0][1])


def test_413_declared_length_over_limit(make_client, predictor, digit_pngs):
    c = make_client(predictor=predictor, max_request_bytes=1000)
    body = assert_problem(c.post("/v1/classify", files=[("files", ("a.png", b"x" * 5000))]),
                          413, "request-too-large")
    assert "--max-request-bytes" in body["detail"]
    still_serving(c, digit_pngs[0][1])


def test_413_streamed_body_counted_while_it_arrives(make_client, predictor):
    c = make_client(predictor=predictor, max_request_bytes=1000)
    sent = []

    def chunks():  # no Content-Length: the server must count as the body streams in
        for _ in range(50):
            sent.append(1)
            yield b"x" * 100

    r = c.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "request-too-large")


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_413_too_many_images(make_client, predictor, digit_pngs, encoding):
    c = make_client(predictor=predictor, max_images=3, max_queue=8)
    data = digit_pngs[0][1]
    if encoding == "multipart":
        r = c.post("/v1/classify", files=[("files", (f"{i}.png", data)) for i in range(4)])
    else:
        r = c.post("/v1/classify", json={"images": [base64.b64encode(data).decode()] * 4})
    body = assert_problem(r, 413, "request-too-large")
    assert "--max-images" in body["detail"]


def test_415_unsupported_media_type(client):
    assert_problem(client.post("/v1/classify", content=b"raw", headers={"content-type":
                                                                        "text/plain"}),
                   415, "unsupported-media-type")
    assert_problem(client.post("/v1/classify", content=b"raw"), 415)


def test_415_when_every_image_has_an_unreadable_format(client):
    files = [("files", ("a.txt", b"plain text")), ("files", ("b.bin", b"\x00\x01\x02\x03"))]
    body = assert_problem(client.post("/v1/classify", files=files), 415,
                          "unsupported-image-format")
    assert [d["issue"] for d in body["defects"]] == ["unsupported_format"] * 2
    assert [d["path"] for d in body["defects"]] == ["a.txt", "b.bin"]


def test_415_format_not_allowed_by_this_server(make_client, predictor):
    c = make_client(predictor=predictor, allowed_formats=("png",))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, "BMP")
    body = assert_problem(c.post("/v1/classify", files=[("files", ("a.bmp", buf.getvalue()))]),
                          415)
    assert "--allowed-formats" in body["defects"][0]["message"]


def test_422_when_no_image_is_usable(client, digit_pngs):
    data = digit_pngs[0][1]
    files = [("files", ("cut.png", data[:60])), ("files", ("empty.png", b""))]
    body = assert_problem(client.post("/v1/classify", files=files), 422, "unusable-images")
    assert [d["issue"] for d in body["defects"]] == ["truncated", "empty_file"]
    still_serving(client, data)


def test_422_too_many_pixels_uses_the_io_defect(make_client, predictor, digit_pngs):
    c = make_client(predictor=predictor, max_pixels=1000)  # 32x32 = 1024 pixels
    assert c.get("/v1/model").json()["limits"]["max_pixels"] == 1000
    small = io.BytesIO()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(small, "PNG")
    files = [("files", ("big.png", digit_pngs[0][1])), ("files", ("small.png",
                                                                   small.getvalue()))]
    r = c.post("/v1/classify", files=files)
    assert r.status_code == 200
    assert r.json()["results"][0]["issue"] == "too_many_pixels"
    body = assert_problem(c.post("/v1/classify", files=files[:1]), 422)
    assert body["defects"][0]["issue"] == "too_many_pixels"


@pytest.mark.parametrize("query, where", [
    ("topk=0", "topk"), ("topk=abc", "topk"), ("topk=11", "10 classes"),
    ("profile=nope", "nope"), ("profile=../x", "profile"), ("temperature=-1", "temperature"),
    ("include_probs=maybe", "include_probs"),
])
def test_422_invalid_options(client, digit_pngs, query, where):
    r = client.post(f"/v1/classify?{query}", files=[("files", ("a.png", digit_pngs[0][1]))])
    body = assert_problem(r, 422, "invalid-parameters")
    assert where in body["detail"]


@pytest.mark.parametrize("doc", [[], {"imgs": []}, {"images": "abc"}, {"images": [1]},
                                 {"images": ["AAAA"], "names": ["a", "b"]},
                                 {"images": ["AAAA"], "path": "/etc/passwd"}])
def test_422_json_body_of_the_wrong_shape(client, doc):
    assert_problem(client.post("/v1/classify", json=doc), 422, "invalid-body")


def test_422_no_images(client):
    assert_problem(client.post("/v1/classify", json={"images": []}), 422, "no-images")
    assert_problem(client.post("/v1/classify", files={"note": (None, "x")}), 422, "no-images")


def test_401_api_keys(make_client, predictor, digit_pngs, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# clients\nalpha-key-123456\n\nbravo-key-654321\n")
    c = make_client(predictor=predictor, api_key_file=str(keys))
    files = [("files", ("a.png", digit_pngs[0][1]))]
    r = assert_problem(c.post("/v1/classify", files=files), 401, "unauthorized")
    assert "Authorization: Bearer" in r["detail"]
    wrong = c.post("/v1/classify", files=files, headers={"Authorization": "Bearer alpha-key"})
    assert_problem(wrong, 401)
    assert wrong.headers["www-authenticate"].startswith("Bearer")
    assert_problem(c.get("/v1/model", headers={"Authorization": "Basic YWxwaGE="}), 401)
    for key in ("alpha-key-123456", "bravo-key-654321"):
        ok = c.post("/v1/classify", files=files, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    assert c.get("/livez").status_code == 200 and c.get("/metrics").status_code == 200
    assert c.get("/v1/model", headers={"Authorization": "Bearer bravo-key-654321"}).json()[
        "auth"] is True


def test_404_and_405_are_problems(client):
    assert_problem(client.get("/v2/classify"), 404, "not-found")
    assert_problem(client.get("/v1/classify"), 405, "method-not-allowed")


def test_503_until_ready_then_serving(make_client, profiled_bundle, digit_pngs):
    from imgtriage.predict import Predictor

    p = Predictor.load(profiled_bundle, num_threads=1)
    gate = Gate(armed=True)
    p.predict_arrays = gate.wrap(p.predict_arrays)  # the warm-up waits on the gate
    c = make_client(predictor=p, wait=False)
    gate.wait_entered()
    assert c.get("/livez").status_code == 200
    body = assert_problem(c.get("/readyz"), 503, "not-ready")
    assert "loading" in body["detail"]
    r = c.post("/v1/classify", files=[("files", ("a.png", digit_pngs[0][1]))])
    assert_problem(r, 503, "not-ready")
    assert r.headers["retry-after"] == "2"
    gate.event.set()
    wait_ready(c)
    still_serving(c, digit_pngs[0][1])


def test_503_and_livez_fail_when_the_bundle_cannot_load(tmp_path):
    from fastapi.testclient import TestClient

    from imgtriage.serve import ServeConfig, create_app

    cfg = ServeConfig(bundle=str(tmp_path / "missing"))
    with TestClient(create_app(cfg)) as c:
        for _ in range(200):
            if c.get("/livez").status_code == 503:
                break
            threading.Event().wait(0.05)
        body = assert_problem(c.get("/livez"), 503, "model-failed")
        assert "missing" in body["detail"]
        assert_problem(c.get("/readyz"), 503, "model-failed")


def test_500_when_inference_crashes_and_the_server_recovers(make_client, profiled_bundle,
                                                            digit_pngs):
    from imgtriage.predict import Predictor

    p = Predictor.load(profiled_bundle, num_threads=1)
    real = p.predict_decoded
    crash = {"on": False}  # off for the warm-up

    def flaky(entries, **kw):
        if crash["on"]:
            raise RuntimeError("simulated backend failure")
        return real(entries, **kw)

    p.predict_decoded = flaky
    c = make_client(predictor=p)
    crash["on"] = True
    body = assert_problem(c.post("/v1/classify", files=[("files", ("a.png",
                                                                    digit_pngs[0][1]))]), 500)
    assert "keeps serving" in body["detail"]
    crash["on"] = False
    still_serving(c, digit_pngs[0][1])
