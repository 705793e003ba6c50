"""Hostile clients: absurd JSON, bombs under every limit, slow files, trickled bodies, spoofed
credentials and keys in URLs. Each gets a 4xx problem (never a 500 or a reset) and the
service keeps answering."""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import Gate, assert_problem, still_serving, wait_ready

from hostile_files import peak_rss_delta, png_bomb
from imgtriage.serve.process import start_service

KEY = "k3y-for-the-hostile-tests"


@pytest.mark.parametrize("body", [
    b"[" * 2000,
    b'{"images": ' + b"[" * 900 + b"]" * 900 + b"}",
    b'{"images": ' + b"[" * 50 + b'"aGk="' + b"]" * 50 + b"}",
    b'{"images": [], "names": ' + b"1" * 5000 + b"}",
    b'{"images": [' + b"1" * 5000 + b"]}",
    b'{"images": [1.' + b"5" * 5000 + b"]}",
    b"{" * 100_000,
])
def test_absurd_json_is_a_400_never_a_500(client, digit_pngs, body):
    r = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert_problem(r, 400, "bad-json")
    still_serving(client, digit_pngs[0][1])


def test_absurd_json_on_the_legacy_route_too(make_client, predictor, digit_pngs):
    c = make_client(predictor=predictor, legacy_classify=True)
    r = c.post("/classify", content=b"[" * 3000, headers={"content-type": "application/json"})
    assert_problem(r, 400, "bad-json")
    still_serving(c, digit_pngs[0][1])


def test_a_png_bomb_under_the_pixel_limit_costs_no_memory(client, digit_pngs):
    data = png_bomb(6000, 6000, bit_depth=16, color_type=6)  # 36 M pixels, 288 MB decoded
    r, delta = peak_rss_delta(lambda: client.post(
        "/v1/classify", files=[("files", ("bomb.png", data, "image/png"))]))
    body = assert_problem(r, 422, "unusable-images")
    assert body["defects"][0]["issue"] == "too_large"
    assert delta < 2**30 / 4, f"{delta / 2**20:.0f} MiB"
    still_serving(client, digit_pngs[0][1])


def test_a_slow_file_is_a_422_timeout(make_client, predictor, digit_pngs):
    c = make_client(predictor=predictor, decode_timeout_s=1e-6)
    body = assert_problem(c.post("/v1/classify", files=[("files", ("a.png", digit_pngs[0][1],
                                                                   "image/png"))]),
                          422, "unusable-images")
    assert body["defects"][0]["issue"] == "decode_timeout"
    assert "--decode-timeout" in body["defects"][0]["message"]


def test_stuck_decoders_make_the_service_unready_until_they_finish(make_client, profiled_bundle,
                                                                   digit_pngs):
    from imgtriage.predict import Predictor

    p = Predictor.load(profiled_bundle, num_threads=1)
    gate = Gate()
    p.decode_bytes = gate.wrap(p.decode_bytes)
    c = make_client(predictor=p, decode_timeout_s=0.3)
    gate.armed = True
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(c.post, "/v1/classify",
                               files=[("files", ("slow.png", digit_pngs[0][1], "image/png"))])
            gate.wait_entered()
            time.sleep(0.5)
            assert_problem(c.get("/readyz"), 503, "decoder-saturated")
            r = c.post("/v1/classify", files=[("files", ("b.png", digit_pngs[1][1],
                                                         "image/png"))])
            assert_problem(r, 503, "decoder-saturated")
            assert r.headers["retry-after"]
            body = assert_problem(slow.result(30), 422, "unusable-images")
            assert body["defects"][0]["issue"] == "decode_timeout"
    finally:
        gate.armed = False
        gate.event.set()
    wait_ready(c, timeout=10)
    still_serving(c, digit_pngs[0][1])


@pytest.mark.parametrize("first,second", [("Bearer " + KEY, "Bearer  " + KEY),
                                          ("Bearer " + KEY, "bearer " + KEY),
                                          ("Bearer " + KEY, "BEARER\t" + KEY + " ")])
def test_one_key_spelled_two_ways_is_one_client(make_client, gated_predictor, digit_pngs,
                                                tmp_path, first, second):
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    p, gate = gated_predictor
    c = make_client(predictor=p, max_client_inflight=1, api_key_file=str(keys))
    gate.armed = True
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(c.post, "/v1/classify", headers={"Authorization": first},
                           files=[("files", ("a.png", digit_pngs[0][1], "image/png"))])
        gate.wait_entered()
        r = c.post("/v1/classify", headers={"Authorization": second},
                   files=[("files", ("b.png", digit_pngs[1][1], "image/png"))])
        assert_problem(r, 429, "too-many-requests")
        gate.event.set()
        assert held.result(30).status_code == 200


@pytest.mark.parametrize("query", ["api_key=" + KEY, "token=x", "Key=abc&topk=2",
                                   "access_token=" + KEY])
def test_a_credential_in_the_query_string_is_refused(client, query):
    body = assert_problem(client.get("/v1/model?" + query), 400, "credential-in-url")
    assert KEY not in body["detail"] and "Authorization" in body["detail"]
    assert client.get("/v1/model?x=1").status_code == 200


def test_model_reports_the_bundle_hash_and_the_decode_budget(client):
    from imgtriage.bundle import load_bundle

    info = client.get("/v1/model").json()
    assert info["bundle_sha256"] == load_bundle(client.app.state.config.bundle).sha256
    limits = info["limits"]
    assert limits["max_decoded_bytes"] == 64 * 2**20 and limits["decode_timeout_s"] == 5.0
    assert limits["body_deadline_s"] == 60.0


def test_a_pinned_service_refuses_another_bundle(make_client):
    c = make_client(wait=False, expect_sha256="0" * 64)
    deadline = time.monotonic() + 60
    while c.app.state.runtime.state == "loading" and time.monotonic() < deadline:
        time.sleep(0.05)
    body = assert_problem(c.get("/readyz"), 503, "model-failed")
    assert "not the pinned bundle" in body["detail"]


@pytest.fixture(scope="module")
def logged_server(profiled_bundle, tmp_path_factory):
    """A real server with its access log on, API keys, and short body limits."""
    tmp = tmp_path_factory.mktemp("hostile-live")
    keys = tmp / "keys.txt"
    keys.write_text(KEY + "\n")
    with start_service(profiled_bundle, log=tmp / "serve.log", timeout=90, args=[
            "--threads", "1", "--body-timeout", "5", "--body-deadline", "2",
            "--api-key-file", str(keys)]) as server:
        yield server


def _rest_of_answer(sock: socket.socket, got: bytes) -> bytes:
    """The bytes still to come of an HTTP answer that starts with ``got``: read until its
    Content-Length is complete (or the server closes)."""
    data = got
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return data[len(got):]
        try:
            sock.settimeout(5)
            chunk = sock.recv(65536)
        except OSError:
            return data[len(got):]
        if not chunk:
            return data[len(got):]
        data += chunk


def test_a_trickled_body_gets_408_at_the_deadline(logged_server, digit_pngs):
    host, port = logged_server.url.removeprefix("http://").split(":")
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n").encode()
    answer = b""
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        s.settimeout(0.4)
        for _ in range(40):  # one byte every 0.4 s: inside --body-timeout, never done
            try:
                s.sendall(b" ")
                answer += s.recv(65536)
                if answer:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        answer += _rest_of_answer(s, answer)  # the body may come in a later packet
    elapsed = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body-deadline" in answer
    assert elapsed < 10
    r = httpx.post(logged_server.url + "/v1/classify", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"},
                   files=[("files", ("ok.png", digit_pngs[0][1], "image/png"))])
    assert r.status_code == 200


def test_secrets_never_reach_the_log(logged_server, digit_pngs):
    with httpx.Client(base_url=logged_server.url, timeout=30) as http:
        assert http.get(f"/v1/model?api_key={KEY}").status_code == 400
        assert http.get(f"/readyz?token={KEY}").status_code == 400
        ok = http.post("/v1/classify", headers={"Authorization": f"Bearer {KEY}"},
                       files=[("files", ("a.png", digit_pngs[0][1], "image/png"))])
        assert ok.status_code == 200
        bad = http.post("/v1/classify", headers={"Authorization": f"Bearer {KEY}x"},
                        files=[("files", ("a.png", digit_pngs[0][1], "image/png"))])
        assert bad.status_code == 401
        body = base64.b64encode(digit_pngs[0][1]).decode()
        http.post("/v1/classify", headers={"Authorization": f"Bearer {KEY}"},
                  json={"images": [body]})
    time.sleep(0.5)  # let the access log lines land
    log = logged_server.log.read_text(errors="replace")
    assert "GET /v1/model" in log  # the access log is on
    assert KEY not in log


def test_threads_are_not_left_behind(client):
    names = [t.name for t in threading.enumerate()]
    assert sum(n.startswith("imgtriage-decode") for n in names) <= 4


@pytest.mark.parametrize("a,b", [("::ffff:10.0.0.1", "10.0.0.1"),
                                 ("2001:db8:0:0:0:0:0:1", "2001:db8::1")])
def test_one_address_spelled_two_ways_is_one_client(a, b):
    from types import SimpleNamespace

    from imgtriage.serve.limits import ClientLimiter

    def req(host):
        return SimpleNamespace(headers={}, client=SimpleNamespace(host=host))

    assert ClientLimiter.client_id(req(a), keyed=False) == \
        ClientLimiter.client_id(req(b), keyed=False)
