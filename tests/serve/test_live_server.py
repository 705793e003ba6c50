"""A real `imgtriage serve` process on a free loopback port: called over TCP like a client
would, abused with raw sockets, and still healthy afterwards."""

from __future__ import annotations

import base64
import socket

import httpx
import pytest
from serve_helpers import metric_samples
from typer.testing import CliRunner

from imgtriage.cli.main import app as cli_app
from imgtriage.errors import BundleError, ConfigError


def raw_exchange(url: str, payload: bytes, *, then_wait: float = 5.0) -> bytes:
    """Send raw bytes to the server and return whatever it answers before closing."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=then_wait) as s:
        s.sendall(payload)
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and b"}" in data:
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1") else -1


def test_real_server_answers_like_the_predictor(live_server, predictor, digit_pngs):
    names = [n for n, _ in digit_pngs[:5]]
    data = [b for _, b in digit_pngs[:5]]
    expected = predictor.predict_bytes(data, names, include_probs=True)
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        assert http.get("/livez").json() == {"status": "alive"}
        multi = http.post("/v1/classify", params={"include_probs": "true"},
                          files=[("files", (n, b, "image/png")) for n, b in zip(names, data,
                                                                                  strict=True)])
        js = http.post("/v1/classify?include_probs=true",
                       json={"images": [base64.b64encode(b).decode() for b in data],
                             "names": names})
        model = http.get("/v1/model").json()
        page = http.get("/")
    assert multi.status_code == 200 and js.status_code == 200
    assert multi.json()["results"] == expected == js.json()["results"]
    assert model["bundle_sha256"] == predictor.bundle_sha256
    assert model["limits"]["max_request_bytes"] == 200000
    assert "imgtriage" in page.text


def test_concurrent_clients_keep_sharing_batches(live_server, digit_pngs):
    """Four clients that each send their next image as soon as they are answered: on a real
    server their images keep going to the model together (about 3.9 images per call on a
    quiet machine, the first calls being smaller; the exact waiting rules are pinned in
    test_batching)."""
    from concurrent.futures import ThreadPoolExecutor

    def client(k: int) -> list[int]:
        with httpx.Client(base_url=live_server.url, timeout=30) as http:
            return [http.post("/v1/classify", files=[("files", (name, data, "image/png"))])
                    .status_code for name, data in (digit_pngs * 3)[k::4]]

    def batches() -> tuple[float, float]:
        with httpx.Client(base_url=live_server.url, timeout=30) as http:
            m = metric_samples(http)
        return m[("imgtriage_batch_size_sum", ())], m[("imgtriage_batch_size_count", ())]

    images0, calls0 = batches()
    with ThreadPoolExecutor(4) as pool:
        statuses = [s for got in pool.map(client, range(4)) for s in got]
    images1, calls1 = batches()
    assert statuses == [200] * len(digit_pngs) * 3
    assert images1 - images0 == len(digit_pngs) * 3
    # 4 when all are always back, ~3.9 on a quiet machine; a loaded machine (another job on
    # the 2 cores) delays some clients past the wait window and gave 2.9. Two images per call
    # on average still shows the batches are shared; the waiting rules are in test_batching.
    assert (images1 - images0) / (calls1 - calls0) >= 2.0


@pytest.mark.parametrize("name, payload, status", [
    ("garbage request line", b"\x16\x03\x01 not http at all\r\n\r\n", 400),
    ("declared too large", b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           b"application/json\r\nContent-Length: 999999999\r\n\r\n{", 413),
    ("stalled body", b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 5000\r\n\r\n{\"images\": [", 408),
    ("chunked too large", b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     + (b"10000\r\n" + b"A" * 0x10000 + b"\r\n") * 4 + b"0\r\n\r\n", 413),
])
def test_raw_abuse_gets_an_answer_and_the_server_survives(live_server, digit_pngs, name,
                                                          payload, status):
    assert status_of(raw_exchange(live_server.url, payload)) == status, name
    r = httpx.post(live_server.url + "/v1/classify", timeout=30,
                   files=[("files", ("ok.png", digit_pngs[0][1], "image/png"))])
    assert r.status_code == 200


def test_truncated_uploads_and_dropped_connections_do_not_hurt(live_server, digit_pngs):
    data = digit_pngs[0][1]
    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + data[:100])
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
            f"boundary=b\r\nContent-Length: {len(body) + 500}\r\n\r\n").encode()
    host, port = live_server.url.removeprefix("http://").split(":")
    for _ in range(5):  # the client hangs up mid-body
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(head + body)
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        r = http.post("/v1/classify", files=[("files", ("cut.png", data[:200], "image/png"))])
        assert r.status_code == 422 and r.json()["defects"][0]["issue"] == "truncated"
        assert http.get("/readyz").status_code == 200
        m = metric_samples(http)
    assert m[("imgtriage_defects_total", (("issue", "truncated"),))] >= 1


def test_cli_refuses_bad_settings_before_starting(tmp_path, tiny_bundle):
    runner = CliRunner()
    missing = runner.invoke(cli_app, ["serve", str(tmp_path / "nope")])
    assert isinstance(missing.exception, BundleError)
    bad = runner.invoke(cli_app, ["serve", str(tiny_bundle), "--max-batch-size", "0"])
    assert isinstance(bad.exception, ConfigError) and "--max-batch-size" in str(bad.exception)
    keys = runner.invoke(cli_app, ["serve", str(tiny_bundle), "--api-key-file",
                                   str(tmp_path / "none.txt")])
    assert isinstance(keys.exception, ConfigError) and "--api-key-file" in str(keys.exception)
    fmt = runner.invoke(cli_app, ["serve", str(tiny_bundle), "--allowed-formats", "png,svg"])
    assert isinstance(fmt.exception, ConfigError)


def test_cli_help_lists_the_options():
    out = CliRunner().invoke(cli_app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--host", "--port", "--workers", "--max-batch-size", "--max-wait-ms",
                 "--max-queue", "--max-request-bytes", "--max-images", "--max-pixels",
                 "--api-key-file", "--cors-origin", "--request-timeout", "--body-timeout"):
        assert flag in out
