"""Concurrency on the real app: batches merge, queues are bounded (503), clients are limited
(429), slow bodies (408) and slow inference (503) are cut off, and the server keeps serving."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from serve_helpers import assert_problem, metric_samples, still_serving


def post_one(client, name: str, data: bytes):
    return client.post("/v1/classify", files=[("files", (name, data, "image/png"))])


def wait_until(cond, what: str, timeout: float = 10.0) -> None:
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        ev.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_concurrent_requests_are_merged_into_one_batch(make_client, gated_predictor,
                                                        digit_pngs, predictor):
    p, gate = gated_predictor
    c = make_client(predictor=p, max_batch_size=8, max_wait_ms=20)
    gate.armed = True
    batcher = c.app.state.runtime.batcher
    with ThreadPoolExecutor(7) as pool:
        first = pool.submit(post_one, c, *digit_pngs[0])
        gate.wait_entered()  # the first request is being computed; the next six queue up
        rest = [pool.submit(post_one, c, *digit_pngs[i]) for i in range(1, 7)]
        wait_until(lambda: batcher.depth == 6, "six queued images")
        gate.event.set()
        answers = [first.result(30), *(f.result(30) for f in rest)]
    for i, r in enumerate(answers):  # each request gets its own rows back (a batch of 6 can
        assert r.status_code == 200  # differ from a batch of 1 in the 6th decimal)
        (got,) = r.json()["results"]
        (want,) = predictor.predict_bytes([digit_pngs[i][1]], [digit_pngs[i][0]])
        assert got["path"] == want["path"] and got["class"] == want["class"]
        assert abs(got["score"] - want["score"]) < 1e-4
    assert gate.calls == 2  # one call for the first request, one for the other six
    m = metric_samples(c)
    assert m[("imgtriage_batch_size_count", ())] == 2
    assert m[("imgtriage_batch_size_sum", ())] == 7
    assert m[("imgtriage_batch_size_bucket", (("le", "4.0"),))] == 1  # the batch of 1
    assert m[("imgtriage_batch_size_bucket", (("le", "8.0"),))] == 2  # ... and of 6


def test_429_when_one_client_has_too_many_open_requests(make_client, gated_predictor,
                                                         digit_pngs):
    p, gate = gated_predictor
    c = make_client(predictor=p, max_client_inflight=1)
    gate.armed = True
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post_one, c, *digit_pngs[0])
        gate.wait_entered()
        r = post_one(c, *digit_pngs[1])
        body = assert_problem(r, 429, "too-many-requests")
        assert r.headers["retry-after"] == "1" and "--max-client-inflight" in body["detail"]
        gate.event.set()
        assert first.result(30).status_code == 200
    still_serving(c, digit_pngs[0][1])


def test_made_up_authorization_headers_do_not_dodge_the_client_limit(make_client,
                                                                    gated_predictor,
                                                                    digit_pngs):
    """Without API keys a client is its address, whatever Authorization header it sends."""
    p, gate = gated_predictor
    c = make_client(predictor=p, max_client_inflight=1)
    gate.armed = True
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.post, "/v1/classify", headers={"Authorization": "Bearer a"},
                            files=[("files", (digit_pngs[0][0], digit_pngs[0][1], "image/png"))])
        gate.wait_entered()
        r = c.post("/v1/classify", headers={"Authorization": "Bearer b"},
                   files=[("files", (digit_pngs[1][0], digit_pngs[1][1], "image/png"))])
        assert_problem(r, 429, "too-many-requests")
        gate.event.set()
        assert first.result(30).status_code == 200


def test_503_with_retry_after_when_the_queue_is_full(make_client, gated_predictor, digit_pngs):
    p, gate = gated_predictor
    c = make_client(predictor=p, max_batch_size=1, max_images=2, max_queue=2)
    gate.armed = True
    batcher = c.app.state.runtime.batcher
    two = [("files", (n, b, "image/png")) for n, b in digit_pngs[:2]]
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post_one, c, *digit_pngs[0])
        gate.wait_entered()
        queued = pool.submit(c.post, "/v1/classify", files=two)
        wait_until(lambda: batcher.depth == 2, "a full queue")
        r = post_one(c, *digit_pngs[2])
        body = assert_problem(r, 503, "overloaded")
        assert int(r.headers["retry-after"]) >= 1 and "--max-queue" in body["detail"]
        gate.event.set()
        assert running.result(30).status_code == 200
        assert queued.result(30).json()["num_results"] == 2
    m = metric_samples(c)
    key = (("method", "POST"), ("route", "/v1/classify"), ("status", "503"))
    assert m[("imgtriage_http_requests_total", key)] == 1
    still_serving(c, digit_pngs[0][1])


def test_503_when_inference_takes_longer_than_the_request_timeout(make_client, gated_predictor,
                                                                   digit_pngs):
    p, gate = gated_predictor
    c = make_client(predictor=p, request_timeout_s=0.3)
    gate.armed = True
    r = post_one(c, *digit_pngs[0])
    body = assert_problem(r, 503, "inference-timeout")
    assert "--request-timeout" in body["detail"] and "retry-after" in r.headers
    gate.event.set()
    still_serving(c, digit_pngs[0][1])


def test_408_when_the_body_stalls(make_client, predictor, digit_pngs):
    c = make_client(predictor=predictor, body_timeout_s=0.2)
    sent: list[dict] = []

    async def call() -> None:
        chunks = [{"type": "http.request", "body": b'{"images": [', "more_body": True}]

        async def receive() -> dict:
            if chunks:
                return chunks.pop()
            await asyncio.sleep(30)  # the client never sends the rest
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/classify",
                 "raw_path": b"/v1/classify", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", b"5000")],
                 "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80)}
        await asyncio.wait_for(c.app(scope, receive, send), 10)

    asyncio.run(call())
    assert sent[0]["status"] == 408
    assert b"--body-timeout" in sent[1]["body"]
    still_serving(c, digit_pngs[0][1])


def test_metrics_count_what_was_sent(client, digit_pngs):
    good = [("files", (n, b, "image/png")) for n, b in digit_pngs[:3]]
    bad = [("files", ("x.txt", b"not an image")), ("files", ("cut.png", digit_pngs[0][1][:80]))]
    assert client.post("/v1/classify", files=good + bad).status_code == 200
    assert client.post("/v1/classify?profile=strict", files=good[:2]).status_code == 200
    assert client.post("/v1/classify", files=bad[:1]).status_code == 415
    assert client.post("/v1/classify?topk=0", files=good).status_code == 422
    assert client.get("/v1/model").status_code == 200
    m = metric_samples(client)

    def req(route: str, status: str, method: str = "POST") -> float:
        key = (("method", method), ("route", route), ("status", status))
        return m.get(("imgtriage_http_requests_total", key), 0)

    assert req("/v1/classify", "200") == 2 and req("/v1/classify", "415") == 1
    assert req("/v1/classify", "422") == 1 and req("/v1/model", "200", "GET") == 1
    assert req("/readyz", "200", "GET") >= 1
    assert m[("imgtriage_images_total", (("outcome", "result"),))] == 5
    assert m[("imgtriage_images_total", (("outcome", "defect"),))] == 3
    assert m[("imgtriage_defects_total", (("issue", "unsupported_format"),))] == 2
    assert m[("imgtriage_defects_total", (("issue", "truncated"),))] == 1
    assert m[("imgtriage_abstained_total", ())] == 2
    assert m[("imgtriage_abstain_ratio", ())] == 2 / 5
    # 3 and 2 images went to the model: the truncated upload stopped at decoding
    assert m[("imgtriage_batch_size_sum", ())] == 5
    assert m[("imgtriage_queue_depth", ())] == 0 and m[("imgtriage_ready", ())] == 1
    assert m[("imgtriage_http_request_duration_seconds_count",
              (("route", "/v1/classify"),))] == 4


def test_each_app_has_its_own_registry(make_client, predictor, digit_pngs):
    a = make_client(predictor=predictor)
    b = make_client(predictor=predictor)
    post_one(a, *digit_pngs[0])
    ma, mb = metric_samples(a), metric_samples(b)
    assert ma[("imgtriage_images_total", (("outcome", "result"),))] == 1
    assert mb[("imgtriage_images_total", (("outcome", "result"),))] == 0
