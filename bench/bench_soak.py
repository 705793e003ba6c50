"""Soak: a real ``imgtriage serve`` under valid requests mixed with every hostile kind of issue 17.

A ResNet-18 bundle with random-init weights (``bench_serve.build_bundle``: the weights do not
change the cost) is served by a real process on a free loopback port. Valid clients (closed
loop, keep-alive, one 320x240 JPEG per request) run throughout. Each round has two phases:

1. *alone*: only the valid clients, ``--alone`` seconds: their p99 latency;
2. *hostile*: the same valid clients plus hostile senders for ``--duration / --rounds``
   seconds: decompression bombs under the pixel limit (16-bit RGBA PNG, TIFF of 8,000 1x1
   pages, a ``.fits.gz`` cube), absurd JSON (``[`` x 2000, deeply nested ``images``, a
   5000-digit number), bodies trickled a byte at a time (slowloris), credentials in the query
   string, spoofed Authorization headers, garbage bytes, bad base64, oversized declared and
   chunked bodies, truncated images, uploads cut off mid-body and non-HTTP bytes.

Pass (each must hold): every valid request answered 200; p99 of valid requests under attack
<= 3x their p99 alone (the ratio is taken within each round; the median over rounds is the
figure, min-max shown); the server's RSS flat (the end within 10% of the first warm sample);
no answer with status 500 to anything; /readyz 200 at the end.

Traffic goes to 127.0.0.1 only; every loop is bounded in time. The CPU is shared: take the lock.
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_soak.py --duration 300
    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_soak.py --duration 60 --alone 15
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_serve import (
    abuse_kinds,
    build_bundle,
    connect,
    get,
    make_jpegs,
    multipart,
    percentiles,
    request,
    rss_mib,
    timed_post,
)
from hostile_files import fits_gz_cube, png_bomb, tiff_of_pages
from imgtriage.serve.process import start_service


def hostile_kinds(jpegs: list[bytes]) -> dict:
    """name -> callable(port) -> HTTP status (-1: closed without an answer)."""
    bomb = multipart([("bomb.png", png_bomb(6000, 6000, bit_depth=16, color_type=6))])
    pages = multipart([("pages.tif", tiff_of_pages(8000))])
    cube = multipart([("cube.fits.gz", fits_gz_cube(1000, 1000, 300))])
    deep = b'{"images": ' + b"[" * 900 + b"]" * 900 + b"}"
    number = b'{"images": [' + b"1" * 5000 + b"]}"
    one = base64.b64encode(jpegs[0]).decode()
    kinds = dict(abuse_kinds(jpegs))
    kinds.update({
        "png_bomb_16bit_rgba": lambda port: request(port, *bomb),
        "tiff_8000_pages": lambda port: request(port, *pages),
        "fits_gz_cube": lambda port: request(port, *cube),
        "json_brackets": lambda port: request(port, b"[" * 2000, "application/json"),
        "json_deep_images": lambda port: request(port, deep, "application/json"),
        "json_5000_digits": lambda port: request(port, number, "application/json"),
        "key_in_query": lambda port: query_key(port),
        "spoofed_bearer": lambda port: request(
            port, json.dumps({"images": [one]}).encode(), "application/json",
            {"Authorization": random.choice(["Bearer  x", "bearer x", "Basic eA=="])}),
    })
    return kinds


def query_key(port: int) -> int:
    status, _ = get(port, "/v1/model?api_key=not-a-real-key")
    return status


def trickle(port: int, gap: float, limit: float) -> int:
    """Slowloris: declare a body, send one byte every ``gap`` s; the status the server gives."""
    head = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n")
    end = time.monotonic() + limit
    with socket.create_connection(("127.0.0.1", port), timeout=gap) as s:
        try:
            s.sendall(head)
            while time.monotonic() < end:
                s.sendall(b" ")
                try:
                    data = s.recv(4096)
                except TimeoutError:
                    continue
                return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else -1
        except OSError:
            return -1
    return 0  # never answered within the limit


def valid_clients(port: int, bodies, n: int, stop_at: float, out: dict, lock) -> list:
    def loop() -> None:
        conn = connect(port)
        while time.monotonic() < stop_at:
            body, ctype = random.choice(bodies)
            errors: list[str] = []
            answer = timed_post(conn, body, ctype, errors)
            with lock:
                out["sent"] += 1
                if answer is None:
                    out["errors"].append(errors[-1] if errors else "?")
                    conn = connect(port)
                elif answer[0] == 200:
                    out["lat"].append(answer[1])
                else:
                    out["errors"].append(str(answer[0]))
        conn.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def phase(port: int, pid: int, bodies, kinds: dict | None, seconds: float, clients: int,
          rss: list) -> dict:
    """Valid clients for ``seconds`` (plus hostile senders when ``kinds`` is given)."""
    lock = threading.Lock()
    valid = {"sent": 0, "lat": [], "errors": []}
    outcomes: dict[str, dict[str, int]] = {k: {} for k in (kinds or {})}
    stop_at = time.monotonic() + seconds
    threads = valid_clients(port, bodies, clients, stop_at, valid, lock)
    if kinds:
        def hostile(seed: int) -> None:
            rnd = random.Random(seed)
            names = sorted(kinds)
            while time.monotonic() < stop_at:
                kind = rnd.choice(names)
                status = kinds[kind](port)
                with lock:
                    outcomes[kind][str(status)] = outcomes[kind].get(str(status), 0) + 1

        def slow() -> None:
            while time.monotonic() < stop_at:
                status = trickle(port, 0.5, 30.0)
                with lock:
                    outcomes.setdefault("slowloris", {})
                    outcomes["slowloris"][str(status)] = \
                        outcomes["slowloris"].get(str(status), 0) + 1

        extra = [threading.Thread(target=hostile, args=(i,), daemon=True) for i in range(2)]
        extra.append(threading.Thread(target=slow, daemon=True))
        for t in extra:
            t.start()
        threads += extra
    while time.monotonic() < stop_at:
        time.sleep(min(5.0, max(0.0, stop_at - time.monotonic())))
        rss.append(rss_mib(pid))
    for t in threads:
        t.join(60)
    return {"seconds": seconds, "valid_sent": valid["sent"], "valid_ok": len(valid["lat"]),
            "valid_errors": valid["errors"][:20], **percentiles(valid["lat"]),
            "hostile": outcomes}


def run(args: argparse.Namespace, tmp: Path) -> dict:
    jpegs = make_jpegs()
    bodies = [multipart([(f"img{i}.jpg", j)]) for i, j in enumerate(jpegs)]
    kinds = hostile_kinds(jpegs)
    bundle = build_bundle(tmp)
    res: dict = {"loadavg_start": os.getloadavg()[0], "config": vars(args), "rounds": []}
    with start_service(bundle, log=tmp / "server.log", timeout=180, args=[
            "--threads", str(args.threads), "--log-level", "warning", "--no-access-log",
            "--max-request-bytes", "4000000", "--body-timeout", "5", "--body-deadline",
            str(args.body_deadline), "--max-client-inflight", "64"]) as svc:
        port, pid = svc.port, svc.proc.pid
        rss: list[float] = []
        phase(port, pid, bodies, None, args.warmup, args.clients, [])  # warm the caches
        rss.append(rss_mib(pid))
        per_round = args.duration / args.rounds
        for _ in range(args.rounds):
            alone = phase(port, pid, bodies, None, args.alone, args.clients, rss)
            attacked = phase(port, pid, bodies, kinds, per_round, args.clients, rss)
            ratio = attacked["p99_ms"] / alone["p99_ms"] if alone["p99_ms"] else float("nan")
            res["rounds"].append({"alone": alone, "hostile": attacked,
                                  "p99_ratio": round(ratio, 2)})
        res["ready_at_end"] = get(port, "/readyz")[0] == 200
        res["rss_mib"] = {"first": round(rss[0], 1), "end": round(rss[-1], 1),
                          "max": round(max(rss), 1), "samples": [round(r) for r in rss]}
    res["loadavg_end"] = os.getloadavg()[0]
    return res


def verdict(res: dict) -> dict:
    ratios = [r["p99_ratio"] for r in res["rounds"]]
    statuses = [s for r in res["rounds"] for kind in r["hostile"]["hostile"].values()
                for s in kind]
    statuses += [s for r in res["rounds"] for s in r["hostile"]["valid_errors"]]
    sent = sum(r[p]["valid_sent"] for r in res["rounds"] for p in ("alone", "hostile"))
    ok = sum(r[p]["valid_ok"] for r in res["rounds"] for p in ("alone", "hostile"))
    rss = res["rss_mib"]
    goals = {
        "every_valid_answered": ok == sent,
        "p99_ratio_median": statistics.median(ratios), "p99_ratio_min": min(ratios),
        "p99_ratio_max": max(ratios), "p99_within_3x": statistics.median(ratios) <= 3.0,
        "rss_flat_10pct": rss["end"] <= rss["first"] * 1.10,
        "no_500": "500" not in statuses, "ready_at_end": res["ready_at_end"],
        "valid_sent": sent, "valid_ok": ok,
    }
    goals["passed"] = all(goals[k] for k in ("every_valid_answered", "p99_within_3x",
                                             "rss_flat_10pct", "no_500", "ready_at_end"))
    return goals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=300.0,
                    help="seconds under attack in all (split over the rounds)")
    ap.add_argument("--alone", type=float, default=30.0, help="seconds alone per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=2, help="valid closed-loop clients")
    ap.add_argument("--threads", type=int, default=2, help="the server's compute threads")
    ap.add_argument("--body-deadline", type=float, default=10.0,
                    help="the server's --body-deadline (the slowloris must end by then)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        res = run(args, Path(tmp))
    res["goals"] = verdict(res)
    for i, rd in enumerate(res["rounds"]):
        a, h = rd["alone"], rd["hostile"]
        print(f"round {i}: alone p99 {a['p99_ms']} ms ({a['valid_ok']}/{a['valid_sent']} ok) | "
              f"hostile p99 {h['p99_ms']} ms ({h['valid_ok']}/{h['valid_sent']} ok) | "
              f"ratio {rd['p99_ratio']}")
        print("   hostile outcomes: " + json.dumps(h["hostile"], sort_keys=True))
    print("rss MiB: " + json.dumps(res["rss_mib"]))
    print(f"loadavg {res['loadavg_start']:.2f} -> {res['loadavg_end']:.2f}")
    print("goals: " + json.dumps(res["goals"]))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2, default=str))
    sys.exit(0 if res["goals"]["passed"] else 1)


if __name__ == "__main__":
    main()
