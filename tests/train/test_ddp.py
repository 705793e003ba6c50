"""DDP under torchrun: 2 CPU processes with gloo finish and save exactly one bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from imgtriage.bundle import load_bundle


def test_two_process_gloo_run_saves_one_bundle(imbalanced_folder, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMGTRIAGE_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "imgtriage", "train", str(imbalanced_folder), "--out", str(run),
           "--model", "crop_cnn", "--img-size", "16", "--epochs", "2", "--batch-size", "8",
           "--threads", "1",
           "--model-kwargs", '{"widths": [8, 16, 32]}', "--balanced-sampling",
           "--loss-strategy", "focal", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("bundle: ") == 1  # only process 0 reports
    entries = sorted(p.name for p in run.iterdir())
    assert entries.count("bundle") == 1
    assert not [e for e in entries if e.startswith(".")]  # no half-written bundle/checkpoint
    bundle = load_bundle(run / "bundle")  # verifies every hash
    assert bundle.manifest["model"]["name"] == "crop_cnn"
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # process 0 alone logs, once per epoch
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["sampler"]["num_replicas"] == 2 and state["epoch"] == 2
