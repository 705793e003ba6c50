"""Resumable checkpoints: tensors in safetensors, everything else in JSON (no pickle).

A checkpoint directory holds::

    weights.safetensors    model.*  best.*  ema.*   (current, best-so-far and EMA weights)
    optimizer.safetensors  opt.<param>.<key>  rng.torch  rng.cuda.<i>
    state.json             epoch, history, best epoch/value, optimizer groups and scalars,
                           schedule, sampler, EMA update count, numpy/python RNG, config

It is written to a temporary directory and swapped in, so an interruption never leaves a
half-written checkpoint. Restoring it gives the loop exactly the state it had after the
saved epoch: a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgtriage.errors import ConfigError

STATE_NAME = "state.json"


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensor groups plus the JSON state."""

    weights: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    state: dict[str, Any]

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.weights.items() if k.startswith(prefix + ".")}


def _split_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every global RNG: torch (and CUDA) as tensors, numpy and python as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                     "python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | os.PathLike[str], *, weights: dict[str, dict[str, Any]],
                    optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    """Write ``weights`` (prefix -> state dict), the optimizer, the RNGs and ``state``."""
    from safetensors.torch import save_file

    path = Path(path)
    flat = {f"{prefix}.{k}": v.detach().cpu().contiguous().clone()
            for prefix, sd in weights.items() if sd for k, v in sd.items()}
    opt_tensors, opt_meta = _split_optimizer(optimizer)
    rng_tensors, rng_meta = rng_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=path.parent))
    save_file(flat, tmp / "weights.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in {**opt_tensors, **rng_tensors}
               .items()}, tmp / "optimizer.safetensors")
    full = {**state, "optimizer": opt_meta, "rng": rng_meta}
    (tmp / STATE_NAME).write_text(json.dumps(full, indent=1))
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint directory, or a run directory holding ``checkpoint/``."""
    path = Path(path)
    for cand in (path, path / "checkpoint"):
        if (cand / STATE_NAME).is_file():
            return cand
    raise ConfigError(f"no checkpoint under {path}: expected {path}/checkpoint/{STATE_NAME} "
                      "from an earlier run with --checkpoint-every > 0 (--resume)")


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    from safetensors.torch import load_file

    path = find_checkpoint(path)
    return Checkpoint(load_file(path / "weights.safetensors"),
                      load_file(path / "optimizer.safetensors"),
                      json.loads((path / STATE_NAME).read_text()))


def restore_optimizer(opt: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    opt.load_state_dict(_join_optimizer(ckpt.optim, ckpt.state["optimizer"]))
