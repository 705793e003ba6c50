"""What the OOD rule's stated acceptance trades: for a trained bundle, the default scorer
(``knn+rmd+stages``, refitted as ``imgtriage train`` fits it: ``bench_ood._refit``) with its
threshold at several validation acceptance levels (``--ood-accept``; each the conformal
quantile of the same validation scores), and at each level the share of the task's
in-distribution test images it accepts and the share of each OOD set it refuses.

Tasks as in ``bench_ood.py``: ``mstar`` (MSTAR-10 test chips at 15 deg against the first 500
CIFAR-10-small test photos, the SIRST infrared frames and synthetic noise), ``mstar6`` (a model
of the first 6 MSTAR classes; the other 4 as OOD) and ``fashion`` (Fashion-MNIST test against
sklearn's digits). Nothing is timed.

Usage:
    nice -n 19 .venv/bin/python bench/bench_ood_accept.py mstar RUN/bundle --out /tmp/oodacc
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LEVELS = (0.95, 0.975, 0.99, 0.995)


def _sets(task: str, out: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    import bench_ood as b

    if task == "fashion":
        _, test = b._fashion(out / "fashion-data", 600)
        return [f for f, _ in test], {"digits": b._digits(out / "digits")}
    tf = b._files(b.MSTAR / "test")
    keep = sorted(tf)[:6] if task == "mstar6" else sorted(tf)
    test = [f for c in keep for f in tf[c]]
    if task == "mstar6":
        return test, {"other 4 classes": [f for c in sorted(tf)[6:] for f in tf[c]]}
    return test, {"cifar": sorted((b.SHARED / "cifar10-small" / "test").rglob("*.jpg"))[:500],
                  "sirst": sorted((b.SHARED / "sirst-infrared").glob("*.png")),
                  "noise": b._noise(out / "noise")}


def main() -> None:
    import bench_ood as b
    from imgtriage.evaluate.ood import threshold_from_scores
    from imgtriage.predict import Predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=("mstar", "mstar6", "fashion"))
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/imgtriage-ood-accept"))
    args = ap.parse_args()
    score, scorer = b._refit(args.bundle, 2)
    p = Predictor.load(args.bundle, backend="torch")
    test, ood = _sets(args.task, args.out)
    s_id = score(b._inputs(p, test))["refit"]
    s_ood = {k: score(b._inputs(p, v))["refit"] for k, v in ood.items()}
    val = scorer.val_scores_
    rows = []
    for a in LEVELS:
        t = threshold_from_scores(val, a)
        rows.append({"accept": a, "id_test_accepted": float((s_id <= t).mean()),
                     **{f"{k} refused": float((s > t).mean()) for k, s in s_ood.items()}})
    print(json.dumps({"task": args.task, "bundle": str(args.bundle), "n_val": len(val),
                      "rows": rows}), file=sys.stderr)
    print(f"{args.task} {args.bundle} ({len(val)} validation images)")
    for r in rows:
        print(f"  accept {r['accept']:.3f}: ID test accepted {100 * r['id_test_accepted']:.1f}%"
              + "".join(f", {k} {100 * v:.1f}%" for k, v in r.items() if k.endswith("refused")))


if __name__ == "__main__":
    main()
