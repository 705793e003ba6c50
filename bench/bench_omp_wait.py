"""PyTorch training step with OpenMP spinning vs passive waits (why the CLI sets PASSIVE).

Each round runs the same EfficientNet-Lite0 training step (128 px, batch 32, 2 threads,
channels_last, AdamW) once per arm (spinning, passive, or a bounded GOMP_SPINCOUNT), each
in its own process (OpenMP reads its environment when it starts), in alternating order;
it prints img/s and CPU seconds per run and the median (min-max) of the within-round ratio
to the first arm.

Usage::

    flock /tmp/imgtriage-bench.lock .venv/bin/python bench/bench_omp_wait.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

STEP = r"""
import json, time, torch, timm
torch.set_num_threads(2)
m = timm.create_model("tf_efficientnet_lite0", num_classes=10).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x = torch.randn(32, 3, 128, 128).to(memory_format=torch.channels_last)
y = torch.randint(0, 10, (32,))
def step():
    loss = torch.nn.functional.cross_entropy(m(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
step()
t, c = time.perf_counter(), time.process_time()
for _ in range(STEPS):
    step()
print(json.dumps({"img_s": 32 * STEPS / (time.perf_counter() - t),
                  "cpu_s": time.process_time() - c}))
"""


ARMS = {
    "spinning": {"OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin100k": {"GOMP_SPINCOUNT": "100000"},
}


def run_once(arm: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(ARMS[arm])
    out = subprocess.run([sys.executable, "-c", STEP.replace("STEPS", str(steps))],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--arms", default="spinning,passive",
                    help=f"comma list from {sorted(ARMS)}; the first is the baseline")
    args = ap.parse_args()
    arms = args.arms.split(",")
    ratios: dict[str, list[float]] = {a: [] for a in arms[1:]}
    for r in range(args.rounds):
        order = arms if r % 2 == 0 else arms[::-1]
        got = {a: run_once(a, args.steps) for a in order}
        print(f"round {r + 1} (load average {os.getloadavg()[0]:.1f}): " + "  ".join(
            f"{a} {got[a]['img_s']:.1f} img/s ({got[a]['cpu_s']:.1f} CPU s)" for a in arms),
            flush=True)
        for a in arms[1:]:
            ratios[a].append(got[a]["img_s"] / got[arms[0]]["img_s"])
    for a, rs in ratios.items():
        print(f"{a} / {arms[0]}: median {statistics.median(rs):.2f}x "
              f"({min(rs):.2f}-{max(rs):.2f}) over {len(rs)} rounds")


if __name__ == "__main__":
    main()
