"""train(): from a labelled folder (or manifest) to a run directory holding a bundle.

Run directory layout::

    RUN/config.json      the resolved TrainConfig
    RUN/splits.csv       path,label,group,split of every sample
    RUN/metrics.jsonl    one line per epoch
    RUN/defects.json     files that could not be used, with the reason
    RUN/bundle/          the bundle (manifest.json + weights.safetensors)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgtriage.bundle import new_manifest, save_bundle
from imgtriage.data import (
    PreprocessSpec,
    discover,
    samples_by_split,
    split_dataset,
    write_split_manifest,
)
from imgtriage.data.loaders import LoadedSplit, decode_samples, detect_in_chans
from imgtriage.errors import DataError
from imgtriage.models import create_model, get_entry
from imgtriage.train.config import TrainConfig
from imgtriage.train.loop import fit, predict_logits


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    bundle_path: Path
    metrics: dict[str, Any]
    seconds: float


def resolve_spec(cfg: TrainConfig, in_chans: int) -> PreprocessSpec:
    """The preprocessing a run will record in its bundle."""
    if cfg.model.startswith("timm:"):
        size = (cfg.img_size or 224,) * 2
    else:
        size = (cfg.img_size,) * 2 if cfg.img_size else get_entry(cfg.model).default_size
    return PreprocessSpec.default_for(in_chans, tuple(size), scaling=cfg.scaling,
                                      stretch=cfg.stretch, resize=cfg.resize)


def set_threads(n: int | None) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        from rich.console import Console

        Console(stderr=True).print(msg)


def _decode(split: str, samples: list, classes: tuple[str, ...], spec: PreprocessSpec,
            cfg: TrainConfig, quiet: bool) -> LoadedSplit:
    t0 = time.perf_counter()
    loaded = decode_samples(samples, classes, spec, workers=cfg.decode_workers)
    _say(f"decoded {len(loaded.samples)} {split} images in {time.perf_counter() - t0:.1f}s"
         f"{f' ({len(loaded.defects)} unusable, see defects.json)' if loaded.defects else ''}",
         quiet)
    return loaded


def _val_metrics(model: torch.nn.Module, val: LoadedSplit) -> dict[str, Any]:
    if not len(val.y):
        return {}
    logits = predict_logits(model, val.x)
    probs = torch.softmax(torch.as_tensor(logits), 1).numpy()
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(val.y)), val.y], 1e-12, 1))))
    return {"val_accuracy": float((logits.argmax(1) == val.y).mean()), "val_nll": nll,
            "val_count": len(val.y)}


def train(data: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          cfg: TrainConfig = TrainConfig(), *, quiet: bool = False) -> TrainResult:
    """Discover, split, decode, fit, and save a bundle with everything that decides an answer.

    Example:
        >>> res = train("data/digits", "runs/digits", TrainConfig(epochs=5))  # doctest: +SKIP
        >>> res.bundle_path
        PosixPath('runs/digits/bundle')
    """
    t0 = time.perf_counter()
    set_threads(cfg.num_threads)
    run = Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    ds = split_dataset(discover(data), val_frac=cfg.val_frac, test_frac=cfg.test_frac,
                       seed=cfg.seed)
    write_split_manifest(ds, run / "splits.csv")
    parts = samples_by_split(ds)
    in_chans = cfg.in_chans or detect_in_chans(parts["train"])
    cfg = replace(cfg, in_chans=in_chans)
    spec = resolve_spec(cfg, in_chans)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    _say(f"{len(ds.classes)} classes, {ds.counts()} | {in_chans} channel(s) at "
         f"{spec.size[0]}x{spec.size[1]} | model {cfg.model}", quiet)
    tr = _decode("train", parts["train"], ds.classes, spec, cfg, quiet)
    va = _decode("val", parts.get("val", []), ds.classes, spec, cfg, quiet)
    defects = [d.to_dict() for d in (*tr.defects, *va.defects)]
    defects += [{"path": p, "issue": "unsupported_format", "message": why}
                for p, why in ds.ignored]
    (run / "defects.json").write_text(json.dumps(defects, indent=2))
    if len(tr.y) < 2:
        raise DataError("fewer than 2 usable training images; see defects.json")
    kwargs = dict(cfg.model_kwargs)
    model = create_model(cfg.model, len(ds.classes), in_chans, pretrained=cfg.pretrained,
                         **kwargs) if cfg.pretrained else create_model(
        cfg.model, len(ds.classes), in_chans, **kwargs)
    (run / "metrics.jsonl").unlink(missing_ok=True)
    result = fit(model, (tr.x, tr.y), (va.x, va.y), cfg, log_path=run / "metrics.jsonl",
                 show_progress=not quiet)
    metrics = {**_val_metrics(model, va), "best_epoch": result.best_epoch,
               "train_count": len(tr.y)}
    manifest = new_manifest(model_name=cfg.model, model_kwargs=kwargs, in_chans=in_chans,
                            preprocess=spec.to_dict(), classes=list(ds.classes),
                            training={"config": cfg.to_dict(), "counts": ds.counts(),
                                      "data": str(data)}, metrics=metrics)
    bundle = save_bundle(run / "bundle", manifest, model.state_dict())
    seconds = time.perf_counter() - t0
    _say(f"best epoch {result.best_epoch}: {metrics} | bundle: {bundle} | {seconds:.1f}s", quiet)
    return TrainResult(run, bundle, metrics, seconds)
