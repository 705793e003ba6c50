"""POST /classify {"image": base64}: the old Flask backend's clients, on the real app."""

from __future__ import annotations

import base64


def test_legacy_route_answers_the_old_request_shape(make_client, predictor, digit_pngs):
    client = make_client(predictor=predictor, legacy_classify=True)
    for _, data in digit_pngs[:3]:
        r = client.post("/classify", json={"image": base64.b64encode(data).decode(),
                                           "user": "kept-for-old-clients"})
        assert r.status_code == 200, r.text
        (expected,) = predictor.predict_bytes([data], ["image"], include_probs=True)
        expected.pop("path")
        assert r.json() == expected
        assert set(r.json()) == {"class", "class_id", "score", "abstained", "reason", "probs"}
    url = "data:image/png;base64," + base64.b64encode(digit_pngs[0][1]).decode()
    assert client.post("/classify", json={"image": url}).status_code == 200
    metrics = client.get("/metrics").text
    assert 'route="/classify"' in metrics


def test_legacy_route_refusals_carry_error(make_client, predictor):
    client = make_client(predictor=predictor, legacy_classify=True)
    bad = client.post("/classify", json={"image": "%%%not base64"})
    assert bad.status_code == 400 and "not valid base64" in bad.json()["detail"]
    junk = client.post("/classify", json={"image": base64.b64encode(b"hello").decode()})
    assert junk.status_code == 422 and junk.json()["defects"][0]["issue"] == \
        "unsupported_format"
    assert "not an image format" in junk.json()["error"]
    shape = client.post("/classify", json={"images": ["x"]})
    assert shape.status_code == 422 and "error" in shape.json()


def test_legacy_route_is_off_by_default(client, digit_pngs):
    r = client.post("/classify", json={"image": base64.b64encode(digit_pngs[0][1]).decode()})
    assert r.status_code == 404
