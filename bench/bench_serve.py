"""The HTTP service under load, against the same bundle called directly, in the same run.

A ResNet-18 bundle with *random-init* weights (10 classes, 3x224x224, ImageNet normalisation;
built with ``bundle.new_manifest``/``save_bundle`` and ``models.create_model("resnet18")``;
the weights do not change the speed) is served by a real ``imgtriage serve`` process on a
free loopback port. The inputs are 320x240 JPEG photos-like images, one per request, sent as
multipart uploads over keep-alive connections.

1. Direct: ``Predictor.predict_bytes([jpeg])`` in this process (same bundle, same threads),
   one call at a time: latency p50/p95/p99 and throughput; then batches of 8.
2. Served: 1, 8 and 32 concurrent clients (threads with one keep-alive connection each), each
   sending its next request when the previous is answered: throughput, latency percentiles,
   the mean batch size the server formed (from its /metrics).
   Goals: 8 clients >= 1.5x the throughput of 1 client; p50 at 1 client <= 1.3x direct.
   Steps 1 and 2 repeat for ``--rounds`` rounds (the server idles while the direct calls
   run): each goal ratio is taken within a round, so the slow drift of a shared machine's
   speed cancels, and the median over the rounds is the figure.
   With ``--open-loop F``, each round also sends independent requests (random arrival times,
   F times the round's 1-client rate) and compares their p50 with the 1-client p50: the batcher
   must not make independent users wait for clients that are not coming back.
3. Soak: valid clients and abusive ones (garbage bytes, bad JSON/base64, oversized declared
   and chunked bodies, truncated images, uploads cut off mid-body, non-HTTP bytes) for
   ``--soak`` seconds; the server's RSS is sampled throughout. Pass: every valid request
   answered 200, the server ready at the end, RSS flat (end within 10% + 50 MiB of start).

Traffic goes to 127.0.0.1 only; every loop is bounded in time.

Usage (the CPU is shared: take the lock):
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_serve.py
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_serve.py --duration 10 --soak 60
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from imgtriage.serve.process import ServiceProcess, start_service

BOUNDARY = "benchboundary7d1a"
MAX_BODY = 4_000_000


def build_bundle(root: Path, graph: str = "fp32") -> Path:
    """ResNet-18, random init, 10 classes, 224x224 RGB. ``graph`` "fp32": with the fp32 ONNX
    graph the training step attaches (what a bundle from ``imgtriage train`` predicts with
    by default; int8 is not tried: random weights cannot be judged on held-out decisions);
    "none": weights only (the torch backend)."""
    from imgtriage.bundle import new_manifest, save_bundle
    from imgtriage.data.preprocess import PreprocessSpec
    from imgtriage.evaluate.decision import DecisionPolicy
    from imgtriage.models import create_model

    model = create_model("resnet18", 10, 3, pretrained=False)
    spec = PreprocessSpec.default_for(3, (224, 224))
    classes = [f"c{i}" for i in range(10)]
    manifest = new_manifest(model_name="resnet18", model_kwargs={}, in_chans=3,
                            preprocess=spec.to_dict(), classes=classes,
                            decision=DecisionPolicy().to_dict())
    state = model.state_dict()
    if graph == "none":
        return save_bundle(root / "resnet18-bundle", manifest, state)
    from imgtriage.data import Sample
    from imgtriage.train.onnx_step import attach_graph, graph_inputs

    folder = root / "parity"
    folder.mkdir()
    samples = []
    for i, data in enumerate(make_jpegs()):
        (folder / f"{i}.jpg").write_bytes(data)
        samples.append(Sample(str(folder / f"{i}.jpg"), classes[i % len(classes)]))
    inputs = graph_inputs((None, samples), (None, samples), spec, classes, "none")
    manifest, files = attach_graph(manifest, state, inputs, "none")
    return save_bundle(root / "resnet18-bundle", manifest, state, files)


def make_jpegs(n: int = 16, size: tuple[int, int] = (320, 240)) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    parts = []
    for name, data in files:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; '
                     f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                     .encode() + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), \
        f"multipart/form-data; boundary={BOUNDARY}"


def percentiles(lat_s: list[float]) -> dict[str, float]:
    if not lat_s:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    a = np.asarray(lat_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)}


def direct_baseline(p, jpegs: list[bytes], duration: float) -> dict:
    """Predictor.predict_bytes on one image at a time, as the server's batch-of-1 would,
    then batches of 8 (the most batching can give on this machine)."""
    for j in jpegs[:4]:
        p.predict_bytes([j])
    lat, t_end, i = [], time.monotonic() + duration, 0
    t0 = time.perf_counter()
    while time.monotonic() < t_end:
        t = time.perf_counter()
        p.predict_bytes([jpegs[i % len(jpegs)]], [f"{i}.jpg"])
        lat.append(time.perf_counter() - t)
        i += 1
    out = {"requests": i, "rps": round(i / (time.perf_counter() - t0), 2), **percentiles(lat)}
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < duration / 2:
        p.predict_bytes(jpegs[:8])
        n += 8
    out["batch8_img_per_s"] = round(n / (time.perf_counter() - t0), 2)
    return out


# -- the server process ------------------------------------------------------------------
def start_server(bundle: Path, args: argparse.Namespace, log: Path) -> ServiceProcess:
    wait = [] if args.max_wait_ms is None else ["--max-wait-ms", str(args.max_wait_ms)]
    return start_service(bundle, log=log, timeout=180, args=[
        "--threads", str(args.threads), "--no-access-log", "--log-level", "warning",
        "--max-batch-size", str(args.max_batch), *wait,
        "--max-request-bytes", str(MAX_BODY), "--max-queue", "512",
        "--max-client-inflight", "64"])


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batch_stats(port: int) -> tuple[float, float, float]:
    """Images, inference calls and seconds of inference so far, from the server's /metrics."""
    text = get(port, "/metrics")[1].decode()
    vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
            if ln.startswith(("imgtriage_batch_size_", "imgtriage_inference_duration_seconds_"))}
    return (vals.get("imgtriage_batch_size_sum", 0.0), vals.get("imgtriage_batch_size_count", 0.0),
            vals.get("imgtriage_inference_duration_seconds_sum", 0.0))


# -- load ----------------------------------------------------------------------------------
def connect(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=60)


def timed_post(conn: http.client.HTTPConnection, body: bytes, ctype: str,
               errors: list[str]) -> tuple[int, float] | None:
    """One classify request on a keep-alive connection: (status, seconds), or None after a
    transport error (recorded in ``errors``; the connection is closed: replace it)."""
    t = time.perf_counter()
    try:
        conn.request("POST", "/v1/classify", body, {"Content-Type": ctype})
        r = conn.getresponse()
        r.read()
    except (OSError, http.client.HTTPException) as exc:
        errors.append(type(exc).__name__)
        conn.close()
        return None
    return r.status, time.perf_counter() - t


def record(answer: tuple[int, float], lat: list[float], errors: list[str]) -> None:
    status, secs = answer
    lat.append(secs) if status == 200 else errors.append(str(status))


def client_loop(port: int, bodies: list[tuple[bytes, str]], stop_at: float, record_from: float,
                lat: list[float], errors: list[str]) -> None:
    conn = connect(port)
    i = random.randrange(len(bodies))
    while time.monotonic() < stop_at:
        body, ctype = bodies[i % len(bodies)]
        i += 1
        answer = timed_post(conn, body, ctype, errors)
        if answer is None:
            conn = connect(port)
        elif record_from <= time.monotonic() < stop_at:  # completions inside the window
            record(answer, lat, errors)
    conn.close()


def load_level(port: int, bodies, clients: int, duration: float, warmup: float) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    start = time.monotonic()
    record_from, stop_at = start + warmup, start + warmup + duration
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(port, bodies, stop_at, record_from, lat, errors))
               for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, record_from - time.monotonic()))
    s0, t_rec = batch_stats(port), time.monotonic()
    for t in threads:
        t.join(duration + warmup + 120)
    s1 = batch_stats(port)
    batches = s1[1] - s0[1]
    return {"clients": clients, "requests": len(lat), "errors": len(errors),
            "rps": round(len(lat) / duration, 2), **percentiles(lat),
            "mean_batch": round((s1[0] - s0[0]) / batches, 2) if batches else None,
            # the model's own rate while it ran, and the share of the time it was running
            "model_img_per_s": round((s1[0] - s0[0]) / (s1[2] - s0[2]), 1) if batches else None,
            "model_busy": round((s1[2] - s0[2]) / (time.monotonic() - t_rec), 2)}


def open_loop_level(port: int, bodies, rate: float, duration: float, warmup: float) -> dict:
    """Independent users: requests at random (Poisson) times, ``rate`` per second on average,
    each sent when its time comes whatever the earlier ones are doing (a pool of keep-alive
    connections). Latency of the requests sent inside the window."""
    from concurrent.futures import ThreadPoolExecutor

    lat: list[float] = []
    errors: list[str] = []
    local = threading.local()

    def send(body: bytes, ctype: str, recording: bool) -> None:
        local.conn = getattr(local, "conn", None) or connect(port)
        answer = timed_post(local.conn, body, ctype, errors)
        if answer is None:
            local.conn = None
        elif recording:
            record(answer, lat, errors)

    rng = random.Random(1)
    start = time.monotonic()
    record_from, stop_at = start + warmup, start + warmup + duration
    s0 = None
    with ThreadPoolExecutor(32) as pool:
        due = start
        while True:
            due += rng.expovariate(rate)
            if due >= stop_at:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            recording = time.monotonic() >= record_from
            if recording and s0 is None:
                s0 = batch_stats(port)
            pool.submit(send, *bodies[rng.randrange(len(bodies))], recording)
    s1 = batch_stats(port)
    s0 = s0 or s1
    batches = s1[1] - s0[1]
    return {"rate": round(rate, 2), "requests": len(lat), "errors": len(errors),
            **percentiles(lat),
            "mean_batch": round((s1[0] - s0[0]) / batches, 2) if batches else None}


# -- soak ------------------------------------------------------------------------------------
def raw_send(port: int, payload: bytes, *, close_early: bool = False) -> int:
    """Send raw bytes; the status line's code, or -1 when the server closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        try:
            s.sendall(payload)
            if close_early:
                return 0
            data = s.recv(4096)
        except OSError:
            return -1
    try:
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else -1
    except (IndexError, ValueError):
        return -1


def request(port: int, body: bytes, ctype: str, headers: dict | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/classify", body, {"Content-Type": ctype, **(headers or {})})
        r = conn.getresponse()
        r.read()
        return r.status
    except (OSError, http.client.HTTPException):
        return -1  # the server may close an oversized upload before reading it all
    finally:
        conn.close()


def abuse_kinds(jpegs: list[bytes]) -> dict:
    rng = random.Random(0)
    junk = bytes(rng.randrange(256) for _ in range(5000))
    cut = jpegs[0][: len(jpegs[0]) // 3]
    big = b"x" * (MAX_BODY + 1)
    body, ctype = multipart([("half.jpg", jpegs[1])])
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    chunked = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               + (b"100000\r\n" + b"A" * 0x100000 + b"\r\n") * 5 + b"0\r\n\r\n")
    return {
        "garbage_file": lambda port: request(port, *multipart([("x.jpg", junk)])),
        "bad_json": lambda port: request(port, b'{"images": [', "application/json"),
        "bad_base64": lambda port: request(port, b'{"images": ["%%%"]}', "application/json"),
        "oversized_declared": lambda port: request(port, big, "application/json"),
        "oversized_chunked": lambda port: raw_send(port, chunked),
        "truncated_image": lambda port: request(port, *multipart([("cut.jpg", cut)])),
        "cut_off_upload": lambda port: raw_send(port, head + body[: len(body) // 2],
                                                close_early=True),
        "not_http": lambda port: raw_send(port, junk[:200] + b"\r\n\r\n"),
    }


def soak(port: int, pid: int, bodies, jpegs: list[bytes], seconds: float,
         valid_clients: int) -> dict:
    kinds = abuse_kinds(jpegs)
    outcomes: dict[str, dict[str, int]] = {k: {} for k in kinds}
    valid = {"sent": 0, "ok": 0, "other": []}
    rss = [rss_mib(pid)]
    stop_at = time.monotonic() + seconds
    lock = threading.Lock()

    def valid_loop() -> None:
        while time.monotonic() < stop_at:
            body, ctype = random.choice(bodies)
            status = request(port, body, ctype)
            with lock:
                valid["sent"] += 1
                valid["ok"] += status == 200
                if status != 200:
                    valid["other"].append(status)

    def abuse_loop(seed: int) -> None:
        rnd = random.Random(seed)
        names = sorted(kinds)
        while time.monotonic() < stop_at:
            kind = rnd.choice(names)
            status = kinds[kind](port)
            with lock:
                outcomes[kind][str(status)] = outcomes[kind].get(str(status), 0) + 1

    threads = [threading.Thread(target=valid_loop, daemon=True) for _ in range(valid_clients)]
    threads += [threading.Thread(target=abuse_loop, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    while time.monotonic() < stop_at:
        time.sleep(min(10.0, max(0.0, stop_at - time.monotonic())))
        rss.append(rss_mib(pid))
    for t in threads:
        t.join(120)
    ready = get(port, "/readyz")[0]
    final = request(port, *bodies[0])
    rss.append(rss_mib(pid))
    flat = rss[-1] <= rss[0] * 1.10 + 50
    return {"seconds": seconds, "valid_sent": valid["sent"], "valid_ok": valid["ok"],
            "valid_not_ok": valid["other"][:20], "abuse": outcomes,
            "rss_start_mib": round(rss[0], 1), "rss_end_mib": round(rss[-1], 1),
            "rss_max_mib": round(max(rss), 1), "rss_samples_mib": [round(r) for r in rss],
            "ready_at_end": ready == 200, "valid_after": final == 200,
            "passed": valid["ok"] == valid["sent"] and ready == 200 and final == 200 and flat}


# -- report ----------------------------------------------------------------------------------
def round_goals(direct: dict, levels: list[dict]) -> dict:
    """The two goal ratios from one round's own direct and served measurements."""
    by = {lv["clients"]: lv for lv in levels}
    one, eight = by.get(1), by.get(8)
    return {"scaling_8_vs_1": round(eight["rps"] / one["rps"], 2) if one and eight else None,
            "latency_ratio": round(one["p50_ms"] / direct["p50_ms"], 2) if one else None}


def summarise(rounds: list[dict]) -> dict:
    """Median over rounds of each within-round ratio (drift between rounds cancels)."""
    out = {}
    for k in ("scaling_8_vs_1", "latency_ratio"):
        vals = [r["goals"][k] for r in rounds if r["goals"][k] is not None]
        out[k] = round(statistics.median(vals), 2) if vals else None
    out["scaling_met"] = bool(out["scaling_8_vs_1"] and out["scaling_8_vs_1"] >= 1.5)
    out["latency_met"] = bool(out["latency_ratio"] and out["latency_ratio"] <= 1.3)
    return out


def ratio(x: float | None) -> str:
    return "n/a (level not run)" if x is None else f"{x}x"


def report(res: dict) -> None:
    print(f"\nload average at start {res['loadavg'][0]}, at end {res['loadavg'][1]}")
    for n, rd in enumerate(res["rounds"], 1):
        d = rd["direct"]
        print(f"\nround {n}: direct Predictor (batch 1): {d['rps']} req/s, p50 {d['p50_ms']} ms, "
              f"p95 {d['p95_ms']} ms, p99 {d['p99_ms']} ms; batch 8: {d['batch8_img_per_s']} "
              "img/s")
        print("| clients | req/s | p50 ms | p95 ms | p99 ms | mean batch | model img/s | "
              "model busy | errors |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for lv in rd["levels"]:
            print(f"| {lv['clients']} | {lv['rps']} | {lv['p50_ms']} | {lv['p95_ms']} | "
                  f"{lv['p99_ms']} | {lv['mean_batch']} | {lv['model_img_per_s']} | "
                  f"{lv['model_busy']:.0%} | {lv['errors']} |")
        ol = rd.get("open_loop")
        if ol:
            print(f"open loop (independent users) at {ol['rate']} req/s: p50 {ol['p50_ms']} ms, "
                  f"p95 {ol['p95_ms']} ms, mean batch {ol['mean_batch']}, {ol['errors']} "
                  f"errors; p50 / 1 client's p50 = {ol['p50_vs_1_client']}x")
        print(f"round {n}: 8 clients / 1 client {ratio(rd['goals']['scaling_8_vs_1'])}, "
              f"p50 1 client / direct {ratio(rd['goals']['latency_ratio'])}")
    g = res["goals"]
    print(f"\nmedian over {len(res['rounds'])} rounds:")
    print(f"throughput 8 clients / 1 client = {ratio(g['scaling_8_vs_1'])} (goal >= 1.5): "
          f"{'met' if g['scaling_met'] else 'MISSED'}")
    print(f"p50 1 client / direct = {ratio(g['latency_ratio'])} (goal <= 1.3): "
          f"{'met' if g['latency_met'] else 'MISSED'}")
    s = res.get("soak")
    if s:
        print(f"\nsoak {s['seconds']:.0f} s: valid {s['valid_ok']}/{s['valid_sent']} answered "
              f"200; RSS start {s['rss_start_mib']} MiB, end {s['rss_end_mib']} MiB, max "
              f"{s['rss_max_mib']} MiB; ready at end {s['ready_at_end']}; "
              f"{'PASSED' if s['passed'] else 'FAILED'}")
        for kind, outs in sorted(s["abuse"].items()):
            print(f"  {kind:20s} {outs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per load level")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before recording")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--soak", type=float, default=180.0, help="soak seconds (0 = skip)")
    ap.add_argument("--threads", type=int, default=2, help="compute threads (both sides)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=None,
                    help="the server's --max-wait-ms (default: the server's own default)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (direct, then each client level), interleaved; the goal "
                         "ratios are taken within each round and their median reported")
    ap.add_argument("--open-loop", type=float, default=0.0,
                    help="also send independent requests (Poisson arrivals) at this fraction "
                         "of the round's 1-client rate and compare their p50 with 1 client's "
                         "(0 = skip)")
    ap.add_argument("--graph", choices=("fp32", "none"), default="fp32",
                    help="fp32: the bundle carries the fp32 ONNX graph a trained bundle has by "
                         "default (ONNX Runtime serves it); none: weights only (torch backend)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    from imgtriage.predict import Predictor

    jpegs = make_jpegs()
    bodies = [multipart([(f"img{i}.jpg", j)]) for i, j in enumerate(jpegs)]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        bundle = build_bundle(Path(tmp), args.graph)
        res: dict = {"loadavg": [os.getloadavg()[0], None], "config": vars(args) | {
            "out": str(args.out)}, "rounds": []}
        direct = Predictor.load(bundle, num_threads=args.threads)
        res["runtime"] = direct.runtime.line()
        print(f"bundle: {res['runtime']}", flush=True)
        with start_server(bundle, args, Path(tmp) / "server.log") as svc:
            port, pid = svc.port, svc.proc.pid
            res["rss_after_warmup_mib"] = round(rss_mib(pid), 1)
            for _ in range(args.rounds):
                rd = {"direct": direct_baseline(direct, jpegs, args.duration),
                      "levels": [load_level(port, bodies, int(c), args.duration, args.warmup)
                                 for c in args.clients.split(",")]}
                rd["goals"] = round_goals(rd["direct"], rd["levels"])
                one = next((lv for lv in rd["levels"] if lv["clients"] == 1), None)
                if args.open_loop > 0 and one:
                    rd["open_loop"] = open_loop_level(port, bodies, args.open_loop * one["rps"],
                                                      args.duration, args.warmup)
                    rd["open_loop"]["p50_vs_1_client"] = round(
                        rd["open_loop"]["p50_ms"] / one["p50_ms"], 2)
                res["rounds"].append(rd)
            if args.soak > 0:
                res["soak"] = soak(port, pid, bodies, jpegs, args.soak, valid_clients=4)
    res["loadavg"][1] = os.getloadavg()[0]
    res["goals"] = summarise(res["rounds"])
    report(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
