"""Recipe: user photos behind a web backend.

A multi-class photo model (animals and vehicles from CIFAR-10) goes from labelled photos to an
HTTP service whose preprocessing can never drift from training:

1. a manifest of the photos (train pool + the official test images), no copying;
2. ``imgtriage train`` (validation carved from the train pool, seeded);
3. ``imgtriage calibrate`` on the validation split: temperature, per-class thresholds for a
   target precision, abstain ("not sure" instead of a wrong label);
4. (no export step: the bundle from ``train`` already carries its verified ONNX graph, so the
   service runs ONNX Runtime);
5. ``imgtriage evaluate`` on the test split (report.json + report.html);
6. a real ``imgtriage serve`` on loopback, called by ``photo_client.py`` with base64 JSON and
   with multipart (what the web page at ``/`` sends) for every test photo;
7. the parity check: the service's answer equals ``Predictor.predict_bytes`` on the same bytes.

Everything lands in ``--out`` (default ``runs/examples/web-photos``); ``summary.json`` holds the
numbers the README quotes. The test suite runs :func:`main` with small parameters.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shlex
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "cifar10-small"
DEFAULT_CLASSES = "airplane,automobile,truck,bird,cat,dog"


def _client() -> Any:
    """photo_client.py next to this file (loaded by path: examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("web_photos_client", HERE / "photo_client.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="User photos behind a web backend (issue 9, "
                                             "recipe 3).")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="cifar10-small: train/<class>/*.jpg and test/<class>/*.jpg")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "examples" / "web-photos")
    ap.add_argument("--classes", default=DEFAULT_CLASSES, help="comma-separated classes")
    ap.add_argument("--per-class", type=int, default=500, help="train-pool photos per class")
    ap.add_argument("--test-per-class", type=int, default=100, help="test photos per class")
    ap.add_argument("--model", default="efficientnet_lite0",
                    help="efficientnet_lite0/1/2: the installed ImageNet weights, backbone "
                         "frozen, head trained on cached embeddings (falls back to deep_cnn "
                         "from scratch with a note when imgtriage[pretrained] is missing); "
                         "deep_cnn: from scratch (the numbers before issue 14)")
    ap.add_argument("--img-size", type=int, default=None,
                    help="default: the weights' own size (224) for pretrained, 32 for scratch")
    ap.add_argument("--epochs", type=int, default=15, help="epochs of a from-scratch model")
    ap.add_argument("--target-precision", type=float, default=0.9,
                    help="per-class precision the abstain thresholds aim for")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--request-size", type=int, default=16, help="photos per HTTP request")
    ap.add_argument("--latency-requests", type=int, default=50,
                    help="single-photo requests timed for latency")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def model_flags(args: argparse.Namespace) -> tuple[list[Any], str]:
    """Training flags for the chosen model, and the sentence saying how it learns."""
    from imgtriage.models.pretrained import get_weights, resolve_weights

    model = args.model
    if get_weights(model) is not None:
        plan = resolve_weights(model, "auto")
        if plan.active:
            size = ["--img-size", args.img_size] if args.img_size else []
            return (["--model", model, "--freeze-backbone", *size],
                    f"transfer learning: {plan.note}; backbone frozen, head on cached "
                    "embeddings")
        print(f"NOTE: {plan.note}; training deep_cnn from scratch instead", flush=True)
        model = "deep_cnn"
    return (["--model", model, "--img-size", args.img_size or 32, "--epochs", args.epochs,
             "--augment", "shift", "--modality", "photo", "--lr", 3e-3],
            f"{model} from scratch")


def imgtriage(*args: Any) -> None:
    """Run one `imgtriage` command in this process (the same code as the shell command)."""
    from imgtriage.cli.main import app

    argv = [str(a) for a in args]
    print("$ imgtriage " + shlex.join(argv), flush=True)
    app(args=argv, standalone_mode=False)


def write_manifest(data: Path, classes: list[str], per_class: int, test_per_class: int,
                   path: Path) -> dict[str, int]:
    """path,label,split rows: the train pool (split left empty: train/val are carved from it,
    seeded) and the test photos (split=test). Files stay where they are."""
    counts = {"pool": 0, "test": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for c in classes:
            for sub, n, split in (("train", per_class, ""), ("test", test_per_class, "test")):
                files = sorted((data / sub / c).glob("*.jpg"))[:n]
                if not files:
                    raise SystemExit(f"no photos in {data / sub / c}: check --data/--classes")
                w.writerows([str(f.resolve()), c, split] for f in files)
                counts["pool" if split == "" else "test"] += len(files)
    return counts


def split_photos(run: Path) -> list[tuple[str, str]]:
    """(path, label) of the test split, in splits.csv order."""
    with (run / "splits.csv").open(newline="") as fh:
        return [(r["path"], r["label"]) for r in csv.DictReader(fh) if r["split"] == "test"]


def chunks(n: int, size: int) -> list[slice]:
    return [slice(i, i + size) for i in range(0, n, size)]


def call_service(url: str, photos: list[tuple[str, str]], request_size: int
                 ) -> dict[str, Any]:
    """Every test photo through the service, as base64 JSON and as multipart; timed."""
    client = _client()
    data = [Path(p).read_bytes() for p, _ in photos]
    names = [Path(p).parent.name + "-" + Path(p).name for p, _ in photos]  # no "/": the
    # service keeps only the last component of a client name
    out: dict[str, Any] = {"bytes": data, "names": names}
    for kind, send in (("json", client.classify_json), ("multipart", client.classify_multipart)):
        rows, t0 = [], time.perf_counter()
        for sl in chunks(len(data), request_size):
            answer = send(url, data[sl], names[sl], include_probs=True)
            rows += answer["results"]
        out[kind] = {"rows": rows, "seconds": time.perf_counter() - t0}
    return out


def single_photo_latency(url: str, data: list[bytes], names: list[str], n: int
                         ) -> dict[str, float] | None:
    """Median and 95th-percentile latency of one-photo JSON requests (one at a time)."""
    if n <= 0 or not data:
        return None
    client = _client()
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        client.classify_json(url, [data[i % len(data)]], [names[i % len(data)]])
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"requests": n, "median_ms": 1000 * times[len(times) // 2],
            "p95_ms": 1000 * times[min(len(times) - 1, int(0.95 * len(times)))]}


def parity(bundle: Path, served: dict[str, Any], request_size: int) -> dict[str, Any]:
    """The service's rows must equal Predictor.predict_bytes on the same bytes, call by call
    (same backend the service chose, same request chunks); the torch backend is compared too."""
    from imgtriage.predict import Predictor

    data, names = served["bytes"], served["names"]
    out: dict[str, Any] = {}
    for backend in ("auto", "torch"):
        p = Predictor.load(bundle, backend=backend)
        t0 = time.perf_counter()
        rows = []
        for sl in chunks(len(data), request_size):
            rows += json.loads(json.dumps(p.predict_bytes(data[sl], names[sl],
                                                          include_probs=True)))
        secs = time.perf_counter() - t0
        diffs = [abs(a["probs"][c] - b["probs"][c]) for a, b in zip(rows, served["json"]["rows"],
                                                                    strict=True)
                 for c in a["probs"]]
        out[backend] = {
            "backend": p.backend.name,
            "identical_to_json": rows == served["json"]["rows"],
            "identical_to_multipart": rows == served["multipart"]["rows"],
            "same_class": sum(a["class_id"] == b["class_id"] for a, b in
                              zip(rows, served["json"]["rows"], strict=True)),
            "max_abs_prob_diff": max(diffs) if diffs else 0.0,
            "files_per_second": len(data) / secs if secs > 0 else None,
        }
    out["rows"] = len(data)
    return out


def service_metrics(rows: list[dict[str, Any]], photos: list[tuple[str, str]],
                    classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class recall, coverage and accuracy at coverage of the served answers.

    ``classes`` in the bundle's output order (class_id indexes it), not the --classes order.
    """
    truth = [classes.index(label) for _, label in photos]

    def best(r: dict[str, Any]) -> int | None:
        """The most likely class of a result row (an abstained row's class_id is -1)."""
        if "class_id" not in r:
            return None
        return classes.index(r["best_class"]) if r["abstained"] else r["class_id"]

    ok = [r for r in rows if "class_id" in r]
    answered = [(r, t) for r, t in zip(rows, truth, strict=True)
                if "class_id" in r and not r["abstained"]]
    per_class = {}
    for k, c in enumerate(classes):
        mine = [r for r, t in zip(rows, truth, strict=True) if t == k and "class_id" in r]
        per_class[c] = {"support": len(mine),
                        "recall": sum(best(r) == k for r in mine) / len(mine)
                        if mine else None,
                        "abstained": sum(r["abstained"] for r in mine)}
    return {
        "n": len(rows), "results": len(ok), "defects": len(rows) - len(ok),
        "accuracy": sum(best(r) == t for r, t in zip(rows, truth, strict=True))
        / len(rows),
        "coverage": len(answered) / len(rows),
        "accuracy_at_coverage": (sum(r["class_id"] == t for r, t in answered) / len(answered)
                                 if answered else None),
        "per_class": per_class,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = args.out.resolve()
    run, classes = out / "run", [c.strip() for c in args.classes.split(",") if c.strip()]
    counts = write_manifest(args.data, classes, args.per_class, args.test_per_class,
                            out / "photos.csv")
    print(f"{len(classes)} classes: {counts['pool']} train-pool photos, {counts['test']} test")

    t0 = time.perf_counter()
    flags, how = model_flags(args)
    print(how, flush=True)
    imgtriage("train", out / "photos.csv", "--out", run, *flags, "--val-frac", 0.15,
              "--threads", args.threads, "--seed", args.seed, "--checkpoint-every", 0,
              "--quiet")
    train_s = time.perf_counter() - t0
    bundle = run / "bundle"
    imgtriage("calibrate", bundle, run / "splits.csv", "--split", "val",
              "--threshold-strategy", "target_precision", "--target", args.target_precision,
              "--abstain")
    imgtriage("evaluate", bundle, run / "splits.csv", "--split", "test", "--out", out / "eval")

    photos = split_photos(run)
    from imgtriage.serve.process import start_service

    serve_args = ["--threads", str(args.threads), "--no-access-log"]
    print(f"$ imgtriage serve {bundle} " + shlex.join(serve_args) + " &", flush=True)
    with start_service(bundle, args=serve_args, log=out / "serve.log") as svc:
        url = svc.url
        served = call_service(url, photos, args.request_size)
        latency = single_photo_latency(url, served["bytes"], served["names"],
                                       args.latency_requests)
        with urllib.request.urlopen(url + "/v1/model", timeout=10) as r:
            model = json.loads(r.read())
        with urllib.request.urlopen(url + "/", timeout=10) as r:  # the page users open
            page = {"status": r.status, "type": r.headers.get("content-type"),
                    "has_drop_zone": b'id="drop"' in r.read()}
    check = parity(bundle, served, args.request_size)
    evaluation = json.loads((out / "eval" / "report.json").read_text())
    n = len(photos)
    summary = {
        "command": "python examples/web-photos/run.py " + shlex.join(
            list(argv) if argv is not None else sys.argv[1:]),
        "classes": model["classes"], "counts": counts, "how": how,
        "model": json.loads((run / "config.json").read_text())["model"],
        "img_size": json.loads((bundle / "manifest.json").read_text())["preprocess"]["size"][0],
        "epochs": args.epochs, "threads": args.threads,
        "train_seconds": train_s,
        "val": json.loads((bundle / "manifest.json").read_text())["metrics"],
        "served_backend": model["backend"], "bundle_sha256": model["bundle_sha256"],
        "web_page": page,
        "service": service_metrics(served["json"]["rows"], photos, model["classes"]),
        "files_per_second": {
            "service_json": n / served["json"]["seconds"],
            "service_multipart": n / served["multipart"]["seconds"],
            "predictor_same_backend": check["auto"]["files_per_second"],
            "request_size": args.request_size},
        "single_photo_latency": latency,
        "parity": check,
        "evaluate": {"accuracy": evaluation["metrics"]["accuracy"],
                     "coverage": (evaluation["abstain"] or {}).get("coverage"),
                     "accuracy_at_coverage":
                         (evaluation["abstain"] or {}).get("accuracy_at_coverage"),
                     "report": str(out / "eval" / "report.html")},
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print(summary)
    return summary


def _print(s: dict[str, Any]) -> None:
    sv, fps, par = s["service"], s["files_per_second"], s["parity"]
    print(f"\nservice ({s['served_backend']}): accuracy {sv['accuracy']:.4f}, coverage "
          f"{sv['coverage']:.4f}, accuracy at coverage {sv['accuracy_at_coverage']}")
    print("recall: " + ", ".join(f"{c} {v['recall']:.3f}" for c, v in sv["per_class"].items()))
    print(f"files/s: JSON {fps['service_json']:.1f}, multipart {fps['service_multipart']:.1f}, "
          f"Predictor {fps['predictor_same_backend']:.1f} ({fps['request_size']} per request)")
    if s["single_photo_latency"]:
        lat = s["single_photo_latency"]
        print(f"one-photo requests: median {lat['median_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms")
    a, t = par["auto"], par["torch"]
    print(f"parity: service == Predictor ({a['backend']}): JSON {a['identical_to_json']}, "
          f"multipart {a['identical_to_multipart']}; torch backend: same class "
          f"{t['same_class']}/{par['rows']}, max |dp| {t['max_abs_prob_diff']:.2e}")
    print(f"wall time {s['wall_seconds']:.1f}s (training {s['train_seconds']:.1f}s)")


if __name__ == "__main__":
    main()
