"""train(): from a labelled folder (or manifest) to a run directory holding a bundle.

Run directory layout::

    RUN/config.json         the resolved TrainConfig (after --model auto, in_chans, ...)
    RUN/run.json            why the model was chosen, loss plan, cache mode, world size,
                            byte-identical files across splits (``duplicates``)
    RUN/class_weights.json  the class weights / focal alphas used (by class name)
    RUN/splits.csv          path,label,group,split of every sample
    RUN/metrics.jsonl       one line per epoch
    RUN/curves.png          loss, accuracy and learning rate per epoch
    RUN/defects.json        files that could not be used, with the reason
    RUN/checkpoint/         the latest resumable checkpoint (``--resume``)
    RUN/bundle/             the bundle (manifest.json + weights.safetensors + model.onnx, the
                            fp32 graph checked against torch on validation images)

Under ``torchrun`` every process runs train(); only process 0 writes files and prints.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from imgtriage.bundle import load_bundle, new_manifest, save_bundle
from imgtriage.bundle.graph import graph_summary
from imgtriage.data import (
    DuplicateCheck,
    PreprocessSpec,
    check_duplicates,
    discover,
    samples_by_split,
    split_dataset,
    write_split_manifest,
)
from imgtriage.data.duplicates import TRAIN_DIGESTS
from imgtriage.data.features import FeatureStandardizer
from imgtriage.data.loaders import check_trainable, decode_samples, defects_line
from imgtriage.errors import ConfigError, DataError
from imgtriage.evaluate.decision import DecisionPolicy
from imgtriage.io import ReadPolicy
from imgtriage.models import create_model, get_entry
from imgtriage.models.fusion import default_size as fusion_size
from imgtriage.models.fusion import is_fusion
from imgtriage.models.pretrained import WeightsPlan, normalize_pretrained, resolve_weights
from imgtriage.predict.ood_graph import attach_ood_score
from imgtriage.train.auto import ImageProbe, choose_model, probe_images
from imgtriage.train.auto_recipe import DECODE_FACTOR, plan_recipe_timed, pretrained_scaling
from imgtriage.train.auto_route import RouteCheck, RouteVerdict, decide_route, plan_routes
from imgtriage.train.calibrate import Calibration, calibrate_run
from imgtriage.train.checkpoint import find_checkpoint
from imgtriage.train.config import MODALITIES, TrainConfig, settled, training_flips
from imgtriage.train.distributed import DistInfo, barrier, init_distributed, shutdown
from imgtriage.train.embed_cache import Embedded
from imgtriage.train.fusion import (
    feature_spec,
    fit_features,
    fit_streamed_features,
    manifest_extras,
)
from imgtriage.train.loop import FitResult, fit
from imgtriage.train.losses import LossPlan, plan_loss
from imgtriage.train.onnx_step import PARITY_IMAGES, GraphInputs, attach_graph, graph_inputs
from imgtriage.train.pipeline import ArraySource, FileSource, default_workers
from imgtriage.train.plots import plot_curves
from imgtriage.train.semisup import (
    SemiSupervised,
    build_semi,
    count_files,
    semi_budget,
    semi_teacher,
)
from imgtriage.train.stage_cache import prepare as prepare_stage_cache
from imgtriage.train.transfer import (
    LR_CHECK_FACTOR,
    Deadline,
    HeadOnEmbeddings,
    LrCheck,
    cached_head_applies,
    combine,
    embed_splits,
    finetune_norm,
    lr_check_applies,
    train_head,
)
from imgtriage.train.view_choice import choose_views


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    bundle_path: Path
    metrics: dict[str, Any]
    seconds: float
    rule: str = ""  # what the bundle's default decision rule does on validation, in a line


AFTER_TRAINING_S = 110.0  # flip-view choice, calibration, OOD bank, ONNX export + checks
# after the last epoch (CIFAR-small, 5,000 images at 128-160 px on 2 cores: ~60-75 s before
# the flip views; a bundle that keeps them embeds validation and the bank twice)


def weights_plan(cfg: TrainConfig) -> WeightsPlan:
    """Where the run's backbone weights come from (``--pretrained``), for its model."""
    name = cfg.model[7:] if cfg.model.startswith("fusion:") else cfg.model
    pretrainable = name.startswith("timm:") or get_entry(name).pretrainable
    plan = resolve_weights(name, cfg.pretrained, pretrainable=pretrainable)
    if not pretrainable and normalize_pretrained(cfg.pretrained) not in ("auto", "none"):
        raise ConfigError(f"--pretrained {cfg.pretrained} needs a pretrainable backbone, but "
                          f"{name} is trained from scratch; drop --pretrained or pick one of "
                          f"the timm backbones (`imgtriage models`)")
    return plan


def _norm(plan: WeightsPlan | None, in_chans: int) -> dict[str, tuple[float, ...]]:
    """The weights' own mean/std (averaged over RGB for other channel counts)."""
    if plan is None or plan.mean is None or plan.std is None:
        return {}
    if in_chans == len(plan.mean):
        return {"mean": plan.mean, "std": plan.std}
    m, s = sum(plan.mean) / len(plan.mean), sum(plan.std) / len(plan.std)
    return {"mean": (m,) * in_chans, "std": (s,) * in_chans}


def resolve_spec(cfg: TrainConfig, in_chans: int, plan: WeightsPlan | None = None
                 ) -> PreprocessSpec:
    """The preprocessing a run will record in its bundle (with the feature spec for
    ``fusion:<backbone>`` models, so every reader computes the same features); with
    pretrained weights, the normalisation they were trained with."""
    features = feature_spec(cfg, in_chans) if is_fusion(cfg.model) else None
    if cfg.model.startswith("timm:"):
        size = (cfg.img_size or 224,) * 2
    elif cfg.img_size:
        size = (cfg.img_size,) * 2
    else:
        size = fusion_size(cfg.model) if features else get_entry(cfg.model).default_size
    return PreprocessSpec.default_for(in_chans, tuple(size), scaling=settled(cfg).scaling,
                                      stretch=cfg.stretch, resize=cfg.resize,
                                      crop_pct=cfg.crop_pct, features=features,
                                      read=ReadPolicy(max_decoded_bytes=cfg.max_decoded_bytes),
                                      **_norm(plan, in_chans))


def tta_views(cfg: TrainConfig) -> list[str]:
    """The TTA views that match the augmentation the model was trained with."""
    cfg = settled(cfg)
    flips = training_flips(cfg)
    if cfg.augment == "none":
        flips = "none" if MODALITIES[cfg.modality] == "none" else "hflip"
    return {"none": [], "hflip": ["hflip"],
            "d4": ["hflip", "vflip", "rot90", "rot180", "rot270"]}[flips]


def set_threads(n: int | None, local_world_size: int = 1) -> int:
    """Compute threads: ``n``, or the cores shared evenly between torchrun processes."""
    n = n or max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    torch.set_num_threads(n)
    return n


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(msg, highlight=False)  # no wrap in logs


def _resolve(cfg: TrainConfig, counts: dict[str, int], probe: ImageProbe, n_val: int = 0,
             distributed: bool = False
             ) -> tuple[TrainConfig, str, RouteCheck | None, dict | None]:
    """Fill in in_chans and, for --model auto, the model, input size and the rest of the
    recipe (train/auto_recipe.py; not under torchrun, where every process must agree), the
    route check when a pretrained route is in doubt (train/auto_route.py), and the seconds
    the plan expects (None when nothing was planned)."""
    chans_given, size_given = cfg.in_chans is not None, cfg.img_size is not None
    cfg = replace(cfg, in_chans=cfg.in_chans or probe.in_chans)
    if cfg.model != "auto":
        why = None
        if weights_plan(cfg).active:  # pretrained weights: 16-bit images must not go dark
            cfg, why = pretrained_scaling(cfg, probe.eight_bit)
        return (settled(cfg), f"--model {cfg.model} given" + (f"; {why}" if why else ""),
                None, None)
    base = cfg
    value = normalize_pretrained(cfg.pretrained)
    ready = value not in ("auto", "none") or (
        value == "auto" and resolve_weights(cfg.auto_backbone, "auto").active)
    choice = choose_model(counts, replace(probe, in_chans=cfg.in_chans), pretrained=ready,
                          backbone=cfg.auto_backbone, img_size=cfg.img_size,
                          unlabeled=count_files(cfg.unlabeled) if cfg.unlabeled else 0)
    cfg = replace(cfg, model=choice.model, img_size=choice.img_size,
                  in_chans=cfg.in_chans if chans_given else choice.in_chans or cfg.in_chans)
    if distributed or cfg.unlabeled:
        return settled(cfg), choice.reason, None, None
    if choice.pretrained:
        cfg, recipe, check, planned = plan_routes(cfg, base, counts, n_val, probe,
                                                  size_given=size_given)
        return settled(cfg), f"{choice.reason}; {recipe}", check, planned
    cfg, recipe, planned = plan_recipe_timed(
        cfg, counts, n_val, pretrained=False, rgb_photos=probe.in_chans == 3,
        source_side=min(probe.median_hw), size_given=size_given, in_chans=probe.in_chans,
        eight_bit=probe.eight_bit, decode_s=probe.read_s * DECODE_FACTOR)
    return settled(cfg), f"{choice.reason}; {recipe}", None, planned


def _conservative_ids(cfg: TrainConfig, classes: tuple[str, ...]) -> list[int]:
    unknown = sorted(set(cfg.conservative_classes) - set(classes))
    if unknown:
        raise ConfigError(f"conservative classes {unknown} are not among the classes "
                          f"{list(classes)} (--conservative-classes)")
    return [classes.index(c) for c in cfg.conservative_classes]


@dataclass(frozen=True)
class _Sources:
    """Training and validation sources, decode defects, cache mode, fitted features."""

    train: Any
    val: Any
    defects: list
    mode: str
    features: FeatureStandardizer | None = None


def _sources(data: Any, parts: dict[str, list], classes: tuple[str, ...],
             spec: PreprocessSpec, cfg: TrainConfig, info: DistInfo, say: Any) -> _Sources:
    """In-memory sources when the decoded data fits ``--cache-limit-gb``, else streaming;
    for fusion models the scaled features ride along (scaler fitted on train only)."""
    tr, va = parts["train"], parts.get("val", [])
    gb = (len(tr) + len(va)) * spec.in_chans * spec.size[0] * spec.size[1] * 4 / 2**30
    mode = cfg.cache if cfg.cache != "auto" else ("memory" if gb <= cfg.cache_limit_gb
                                                  else "stream")
    if mode == "stream":
        workers = cfg.workers if cfg.workers is not None else default_workers(
            info.local_world_size)
        pin = info.device.startswith("cuda")
        say(f"streaming {len(tr)} train / {len(va)} val images ({gb:.1f} GB decoded) with "
            f"{workers} decoding process(es)")
        fx, extras = None, None
        if spec.features is not None:  # fusion: scaler fitted on train, rows from each decode
            extras = manifest_extras(data, spec.features)
            fx = fit_streamed_features(spec.features, tr, spec, extras, cfg.decode_workers)
            say(f"features: {len(fx.feature_names_)} columns, scaler fitted on the training "
                "split")
        return _Sources(*(FileSource(s, classes, spec, workers=workers, pin_memory=pin,
                                     features=fx, extras=extras) for s in (tr, va)), [], mode,
                        fx)
    splits, defects = [], []
    for split, samples in (("train", tr), ("val", va)):
        t0 = time.perf_counter()
        loaded = decode_samples(samples, classes, spec, workers=cfg.decode_workers)
        defects += loaded.defects
        splits.append(loaded)
        say(f"decoded {len(loaded.samples)} {split} images in {time.perf_counter() - t0:.1f}s"
            f"{f' ({len(loaded.defects)} unusable, see defects.json)' if loaded.defects else ''}")
    check_trainable(splits[0].y, classes, tr, splits[0].defects)
    feats: list[Any] = [None, None]
    fx = None
    if spec.features is not None:
        fx, feats = fit_features(spec.features, splits[0], splits[1:],
                                 manifest_extras(data, spec.features))
        say(f"features: {len(fx.feature_names_)} columns, scaler fitted on the training split")
    out = [ArraySource(s.x, s.y, f) for s, f in zip(splits, feats, strict=True)]
    return _Sources(out[0], out[1], defects, mode, fx)


def _create(cfg: TrainConfig, num_classes: int, fx: FeatureStandardizer | None = None,
            plan: WeightsPlan | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model, initialised from ``--seed``; returns it with the kwargs the bundle records."""
    kwargs = dict(cfg.model_kwargs)
    if fx is not None:
        kwargs["num_features"] = len(fx.feature_names_)
    if cfg.drop_rate is not None:
        kwargs["drop_rate"] = cfg.drop_rate
    extra = {"pretrained": plan} if plan is not None and plan.active else {}
    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, num_classes, cfg.in_chans, **kwargs, **extra), kwargs


def _semi(cfg: TrainConfig, parts: dict[str, list], spec: PreprocessSpec, labels: Any,
          num_classes: int, info: DistInfo, say: Any) -> SemiSupervised | None:
    """The semi-supervised extension for --unlabeled (None without it)."""
    if not cfg.unlabeled:
        return None
    t0 = time.perf_counter()
    holdout = [s.path for split in ("val", "test") for s in parts.get(split, [])]
    semi = build_semi(cfg, spec, holdout, labels, num_classes, rank=info.rank)
    pool = semi.pool
    say(f"unlabelled: decoded {len(pool)} images in {time.perf_counter() - t0:.1f}s"
        f" ({len(pool.defects)} unreadable, {len(pool.excluded)} left out: same content as a "
        f"validation/test file) | {cfg.semi_method}, {cfg.unlabeled_ratio} unlabelled per "
        f"labelled image, pseudo-label threshold {cfg.pseudo_threshold:g}")
    return semi


def _write_defects(run: Path, ds: Any, defects: list) -> None:
    rows = [d.to_dict() for d in defects]
    rows += ds.found_rows()
    (run / "defects.json").write_text(json.dumps(rows, indent=2))


def _finish(run: Path, data: Any, cfg: TrainConfig, ds: Any, spec: PreprocessSpec,
            model: torch.nn.Module, kwargs: dict[str, Any], result: FitResult,
            info: dict[str, Any], fx: FeatureStandardizer | None = None
            ) -> tuple[Path, dict[str, Any]]:
    """Process 0: curves, metrics, manifest (with TTA views), the ONNX graph and the bundle."""
    if result.history:
        plot_curves(result.history, run / "curves.png", result.best_epoch)
    best = result.best_metrics
    metrics: dict[str, Any] = {"best_epoch": result.best_epoch, "train_count": info["n_train"],
                               "epochs_run": len(result.history),
                               "stopped_early": result.stopped_early}
    if "val_accuracy" in best:
        metrics = {"val_accuracy": best["val_accuracy"], "val_nll": best["val_loss"],
                   "val_balanced_accuracy": best["val_balanced_accuracy"],
                   "val_macro_f1": best["val_macro_f1"], "val_count": info["n_val"], **metrics}
    manifest = new_manifest(model_name=cfg.model, model_kwargs=kwargs, in_chans=cfg.in_chans,
                            preprocess=spec.to_dict(), classes=list(ds.classes),
                            decision=DecisionPolicy().to_dict(),
                            training={"config": cfg.to_dict(),
                                      "counts": fit_counts(ds.classes, samples_by_split(ds)),
                                      "data": str(data), "model_choice": info["reason"],
                                      "loss": result.loss_plan,
                                      "view_average": info.get("view_average"),
                                      "pretrained": info["weights"].to_dict(),
                                      **_duplicates_block(info.get("duplicates"))},
                            metrics=metrics,
                            features=fx.to_dict() if fx is not None else None)
    cal: Calibration = info["calibration"]
    if cal.summary and cal.summary.get("temperature"):
        t = cal.summary["temperature"]
        metrics.update(temperature=t["temperature"], val_nll_calibrated=t["nll_after"],
                       val_ece=t["ece_before"], val_ece_calibrated=t["ece_after"],
                       val_coverage=cal.summary["default_rule"]["coverage"],
                       val_accuracy_answered=cal.summary["default_rule"]["accuracy_answered"])
    # the calibration before the graph: an OOD rule adds its output
    manifest = manifest.with_changes(tta=tta_views(cfg), metrics=metrics,
                                     **cal.manifest_changes())
    state = model.state_dict()
    manifest, graph = attach_graph(manifest, state, info["graph_inputs"], cfg.quantize,
                                   info["say"], cal.files)
    # the OOD score joins every graph (fp32 and int8) last: one run gives logits and score
    check = info["graph_inputs"].check
    manifest, files = attach_ood_score(manifest, {**graph, **cal.files},
                                       check.x[:PARITY_IMAGES] if check is not None else None,
                                       info["say"])
    dups: DuplicateCheck | None = info.get("duplicates")
    if dups is not None:  # evaluate warns about images of these bytes
        files = {**files, TRAIN_DIGESTS: dups.train_digests}
    return save_bundle(run / "bundle", manifest, state, files), metrics


def _duplicates_block(dups: DuplicateCheck | None) -> dict[str, Any]:
    """The training block's record of copies across the splits, and where the training
    images' digests are (``evaluate`` reads them to flag images the model was trained on)."""
    if dups is None:
        return {}
    return {"duplicates": dups.summary(), "train_digests": TRAIN_DIGESTS}


def _graph_inputs(src: _Sources | None, parts: dict[str, list], spec: PreprocessSpec,
                  classes: tuple[str, ...], quantize: str) -> GraphInputs:
    """Validation images for the ONNX parity check (and the int8 verdict), training images to
    calibrate int8 on; ``src`` None (the head trained on embeddings) reads them from files."""
    val = parts.get("val", [])
    if src is None:  # a non-empty source without arrays: sample_inputs reads the files
        return graph_inputs((parts["train"], parts["train"]), (val or None, val), spec,
                            classes, quantize)
    return graph_inputs((src.train, parts["train"]), (src.val, val), spec, classes, quantize)


def time_taken(planned: dict[str, Any], seconds: float, history: list[dict[str, Any]],
               budget_min: float) -> dict[str, Any]:
    """The seconds a ``--time-budget`` plan expected against those the run took, both split
    into the epochs and the rest (``run.json`` -> ``time``, and the line printed).

    Example:
        >>> fixed = {"total": 14.0}
        >>> t = time_taken({"total_s": 94.0, "fixed": fixed, "passes_s": 0.0, "epochs": 40,
        ...                 "epoch_s": 2.0}, 88.0, [{"seconds": 1.8}] * 40, 15)
        >>> t["line"].split("), ")[0]
        'time: planned ~94s (40 epochs x ~2.0s + ~14s fixed'
        >>> t["line"].split("), ")[1]
        'took 88s (40 epochs 72s + the rest 16s); --time-budget 15 min'
    """
    epochs_s = float(sum(float(r.get("seconds", 0.0)) for r in history))
    rest = seconds - epochs_s
    plan_rest = float(planned["total_s"]) - planned["epochs"] * planned["epoch_s"]
    line = (f"time: planned ~{planned['total_s']:.0f}s ({planned['epochs']} epochs x "
            f"~{planned['epoch_s']:.1f}s + ~{plan_rest:.0f}s fixed), took {seconds:.0f}s "
            f"({len(history)} epochs {epochs_s:.0f}s + the rest {rest:.0f}s); --time-budget "
            f"{budget_min:g} min")
    return {"planned": planned, "actual_s": round(seconds, 1),
            "actual_epochs_s": round(epochs_s, 1), "actual_rest_s": round(rest, 1),
            "epochs_run": len(history), "budget_s": round(budget_min * 60, 1), "line": line}


def fit_counts(classes: tuple[str, ...], parts: dict[str, list]) -> dict[str, int]:
    """Images per class the run learns from (train + val); the test split is never counted."""
    counts = {c: 0 for c in classes}
    for split in ("train", "val"):
        for s in parts.get(split, []):
            counts[s.label] += 1
    return counts


def split_line(parts: dict[str, list], *, carved: bool) -> str:
    """One line saying how big each split is and where validation came from."""
    n = {k: len(parts.get(k, [])) for k in ("train", "val", "test")}
    where = ("carved from train, stratified and group-aware (--val-frac)" if carved
             else "given by the data")
    text = f"splits: {n['train']} train / {n['val']} val ({where})"
    if n["test"]:
        text += f" / {n['test']} test (held out, never used here)"
    if not n["val"]:
        text += " | no validation images: best epoch = last, the bundle stays uncalibrated"
    return text


def _prepare(given: Any, run: Path, cfg: TrainConfig, info: DistInfo
             ) -> tuple[Any, dict[str, list], TrainConfig, str, RouteCheck | None,
                        DuplicateCheck, dict | None]:
    ds = split_dataset(given, val_frac=cfg.val_frac, test_frac=cfg.test_frac, seed=cfg.seed)
    ds, dups = check_duplicates(ds, drop_val_copies=cfg.dedupe_val,
                                workers=cfg.decode_workers or 2)
    parts = samples_by_split(ds)
    if "train" not in parts:
        raise DataError("no training samples; lower --val-frac/--test-frac")
    if cfg.quantize == "static" and not parts.get("val"):
        raise ConfigError("--quantize static judges int8 on held-out validation images and "
                          "this run has none: give --val-frac > 0 (or a val split), or use "
                          "--quantize auto (fp32 then) or none")
    counts = {c: 0 for c in ds.classes}
    for s in parts["train"]:
        counts[s.label] += 1
    cfg, reason, check, planned = _resolve(cfg, counts, probe_images(parts["train"]),
                                           len(parts.get("val", [])), info.distributed)
    cfg, budget = semi_budget(cfg, len(parts["train"]), info.world_size)
    cfg, teacher = semi_teacher(cfg)
    reason = "; ".join(x for x in (reason, budget, teacher) if x)
    if info.is_main:
        write_split_manifest(ds, run / "splits.csv")
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return ds, parts, cfg, reason, check, dups, planned


def train(data: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          cfg: TrainConfig = TrainConfig(), *, quiet: bool = False,
          resume: bool = False) -> TrainResult:
    """Discover, split, decode, fit, and save a bundle with everything that decides an answer.

    ``resume=True`` continues ``out_dir/checkpoint`` exactly (same settings required).
    Under torchrun, call it in every process (``torchrun -m imgtriage train ...`` does).

    Example:
        >>> res = train("data/digits", "runs/digits", TrainConfig(epochs=5))  # doctest: +SKIP
        >>> res.bundle_path  # doctest: +SKIP
        PosixPath('runs/digits/bundle')
    """
    info = init_distributed(cfg.device)
    try:
        return _train(data, Path(out_dir), cfg, quiet or not info.is_main, resume, info)
    finally:
        shutdown(info)


@dataclass(frozen=True)
class _Head:
    """The head phase on cached embeddings: the model with its trained head."""

    model: torch.nn.Module
    kwargs: dict[str, Any]
    result: FitResult
    loss: Any
    defects: list
    train: Embedded
    val: Embedded


def _head_phase(run: Path, parts: dict[str, list], classes: tuple[str, ...],
                spec: PreprocessSpec, cfg: TrainConfig, plan: WeightsPlan, say: Any,
                quiet: bool) -> _Head:
    """Embed every image once through the frozen pretrained backbone, train the head."""
    model, kwargs = _create(cfg, len(classes), None, plan)
    tr, va = embed_splits(model, parts, classes, spec, cfg, plan, say=say, progress=not quiet)
    check_trainable(tr.y, classes, parts["train"], tr.defects)
    lplan = plan_loss(cfg, tr.y, len(classes))
    say(f"loss: {lplan.strategy} ({lplan.note}); {lplan.prior_note}")
    result = train_head(model, tr, va, cfg, lplan, run / "head_metrics.jsonl", say)
    return _Head(model, kwargs, result, lplan, [*tr.defects, *va.defects], tr, va)


def _route_probe(run: Path, data: Any, parts: dict[str, list], classes: tuple[str, ...],
                 check: RouteCheck, head: _Head, info: DistInfo, say: Any, quiet: bool
                 ) -> tuple[RouteVerdict, _Sources, tuple[torch.nn.Module, dict[str, Any]]]:
    """Train the from-scratch route for a few epochs and compare it with the head on
    validation (train/auto_route.py); returns the verdict, the from-scratch sources and the
    probe's model (its best epoch: the from-scratch route continues from it)."""
    t0 = time.perf_counter()
    pcfg = check.probe_config()
    spec = resolve_spec(pcfg, pcfg.in_chans, weights_plan(pcfg))
    say(f"route check: {check.probe_epochs} epoch(s) of {pcfg.model} from scratch at "
        f"{spec.size[0]} px (~{check.probe_s:.0f}s planned) against the head's validation "
        f"{check.metric} {head.result.best_metrics.get(check.metric, float('nan')):.3f}")
    src = _sources(data, parts, classes, spec, pcfg, info, say)
    model, kwargs = _create(pcfg, len(classes), src.features)
    res = fit(model, src.train, src.val, pcfg, log_path=run / "route_check_metrics.jsonl",
              show_progress=not quiet, num_classes=len(classes))
    model.load_state_dict(res.best_state)
    verdict = decide_route(head.result.best_metrics, res.best_metrics, check.metric,
                           check.probe_epochs, time.perf_counter() - t0,
                           planned_epochs=check.probe_epochs + check.scratch.epochs)
    say(verdict.line())
    return verdict, src, (model, kwargs)


@dataclass(frozen=True)
class _Trained:
    """What every route hands to the end of the run (:func:`_conclude`), so that every
    bundle goes through the same calibration, OOD scorer, ONNX graph (with the features
    output the OOD rule reads) and summary. ``calib``: the module calibration runs and the
    train / validation sources it reads (the model on decoded images, or its head on the
    cached embeddings of a frozen backbone: the same logits and penultimate features).
    ``loss``: the loss plan training used; its prior correction is the default rule's."""

    model: torch.nn.Module
    kwargs: dict[str, Any]
    result: FitResult
    calib: tuple[torch.nn.Module, Any, Any]
    graph: Callable[[], GraphInputs]  # read on process 0 only (a streamed run reads files)
    run_json: dict[str, Any]
    defects: list
    loss: LossPlan
    features: FeatureStandardizer | None = None
    views_on: Any = None  # validation images to try the flip views on (None: not tried)
    duplicates: DuplicateCheck | None = None  # byte copies across the splits


def _head_only(run: Path, cfg: TrainConfig, split: tuple[Any, dict[str, list]],
               spec: PreprocessSpec, plan: WeightsPlan, head: _Head,
               route: RouteVerdict | None = None) -> _Trained:
    """--freeze-backbone with pretrained weights: the head phase is the whole run."""
    ds, parts = split
    (run / "metrics.jsonl").write_text((run / "head_metrics.jsonl").read_text())
    weights = head.loss.weights
    (run / "class_weights.json").write_text(json.dumps(
        {**head.loss.to_dict(), "by_class": dict(zip(ds.classes, weights, strict=True))
         if weights else None}, indent=2))
    return _Trained(head.model, head.kwargs, head.result,
                    (HeadOnEmbeddings(head.model), ArraySource(head.train.x, head.train.y),
                     ArraySource(head.val.x, head.val.y)),
                    functools.partial(_graph_inputs, None, parts, spec, ds.classes,
                                      cfg.quantize),
                    {"loss": head.loss.to_dict(), "weights": plan.to_dict(),
                     "cache": "embeddings", "world_size": 1, "resumed_from": None,
                     "finetune": None,
                     "route_check": route.to_dict() if route is not None else None,
                     "unlabeled": None}, head.defects, head.loss)


def _conclude(run: Path, data: Any, cfg: TrainConfig, ds: Any, spec: PreprocessSpec,
              plan: WeightsPlan, reason: str, done: _Trained, info: DistInfo, say: Any,
              t0: float, planned: dict | None = None) -> TrainResult:
    """The end of every route: defects, run.json, calibration on validation (temperature,
    default rule, OOD scorer), the bundle with its graph, and the summary lines; with a
    time plan (``--model auto``), the seconds planned against those taken."""
    bundle, metrics, cal, kwargs = run / "bundle", {}, None, done.kwargs
    net, ctr, cva = done.calib
    if info.is_main:
        _write_defects(run, ds, done.defects)
        offsets = done.loss.prior_offsets  # the decision's prior correction: the loss's
        views = None  # flip TTA folded into the model (and graph) when validation says so
        if done.views_on is not None:
            hooks, views = choose_views(done.model, done.views_on, cfg, say, offsets)
            if hooks is not None:
                kwargs = {**kwargs, "view_average": list(hooks.views)}
        cal = calibrate_run(net, ctr, cva, list(ds.classes), cfg, done.loss)
        dups = done.duplicates.summary() if done.duplicates is not None else None
        (run / "run.json").write_text(json.dumps(
            {"model_choice": reason, **done.run_json, "view_average": views,
             "prior_correction": (cal.summary or {}).get("prior_correction"),
             "duplicates": dups}, indent=2))
        bundle, metrics = _finish(run, data, cfg, ds, spec, done.model, kwargs,
                                  done.result,
                                  {"reason": reason, "n_train": len(ctr), "weights": plan,
                                   "calibration": cal, "view_average": views,
                                   "n_val": len(cva) if cva is not None else 0,
                                   "say": say, "graph_inputs": done.graph(),
                                   "duplicates": done.duplicates},
                                  done.features)
    barrier(info)
    seconds = time.perf_counter() - t0
    say(f"best epoch {done.result.best_epoch}: {metrics} | bundle: {bundle} | {seconds:.1f}s")
    if planned is not None and info.is_main:
        took = time_taken(planned, seconds, done.result.history, cfg.time_budget)
        said = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**said, "time": took}, indent=2))
        say(took["line"])
    if info.is_main:
        say(graph_summary(load_bundle(bundle, verify=False).info.block("onnx")))
    if cal is not None:
        say(cal.line)
    return TrainResult(run, bundle, metrics, seconds, cal.line if cal is not None else "")


def _train(data: Any, run: Path, cfg: TrainConfig, quiet: bool, resume: bool,
           info: DistInfo) -> TrainResult:
    t0 = time.perf_counter()
    set_threads(cfg.num_threads, info.local_world_size)
    run.mkdir(parents=True, exist_ok=True)
    ckpt = find_checkpoint(run) if resume else None
    ds_given = discover(data)
    budgeted = cfg.model == "auto"  # --time-budget plans the run; keep it inside it
    ds, parts, cfg, reason, check, dups, planned = _prepare(ds_given, run, cfg, info)
    plan = weights_plan(cfg)
    spec = resolve_spec(cfg, cfg.in_chans, plan)
    conservative = _conservative_ids(cfg, ds.classes)
    say = functools.partial(_say, quiet=quiet)
    say(split_line(parts, carved=not any(s.split == "val" for s in ds_given.samples)))
    for line in dups.lines():
        say(line)
    if ds.defects:  # files of the class folders whose bytes are no image: reported, not used
        say(f"not images: {defects_line(ds.defects)}; not trained on (RUN/defects.json)")
    say(f"{len(ds.classes)} classes, {fit_counts(ds.classes, parts)} | {cfg.in_chans} "
        f"channel(s) at "
        f"{spec.size[0]}x{spec.size[1]} | model {cfg.model} ({reason})"
        f"{f' | {info.world_size} processes' if info.distributed else ''}")
    if plan.note:
        say(f"weights: {plan.note}")
    head, fit_cfg, src, verdict, probed = None, cfg, None, None, None
    if cached_head_applies(cfg, plan, info.distributed):
        head = _head_phase(run, parts, ds.classes, spec, cfg, plan, say, quiet)
        if check is not None:
            verdict, probe_src, probe_model = _route_probe(run, data, parts, ds.classes,
                                                           check, head, info, say, quiet)
            reason = f"{reason}; {verdict.line()}"
            if verdict.route == "scratch":
                cfg, head, src, probed = check.scratch, None, probe_src, probe_model
                planned = check.planned
                fit_cfg, plan = cfg, weights_plan(check.scratch)
                spec = resolve_spec(cfg, cfg.in_chans, plan)
                reason = f"{reason}; {check.reason}"
                say(f"model {cfg.model} at {spec.size[0]}x{spec.size[1]}, {cfg.in_chans} "
                    f"channel(s), {cfg.epochs} epochs ({check.reason})")
                if info.is_main:
                    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if head is not None and cfg.freeze_backbone:
        done = replace(_head_only(run, cfg, (ds, parts), spec, plan, head, verdict),
                       duplicates=dups)
        return _conclude(run, data, cfg, ds, spec, plan, reason, done, info, say, t0,
                         planned)
    if head is not None:
        fit_cfg = replace(cfg, freeze_epochs=0, epochs=cfg.epochs - cfg.freeze_epochs,
                          backbone_norm=finetune_norm(cfg, head=True))
        say(f"fine-tuning the whole network for {fit_cfg.epochs} epoch(s) from that head "
            f"(--layer-decay {cfg.layer_decay:g}, batch-norm statistics "
            f"{fit_cfg.backbone_norm})")
    src = src or _sources(data, parts, ds.classes, spec, cfg, info, say)
    tr, va, defects, mode = src.train, src.val, src.defects, src.mode
    lplan = plan_loss(cfg, tr.labels, len(ds.classes))
    weights = dict(zip(ds.classes, lplan.weights, strict=True)) if lplan.weights else None
    say(f"loss: {lplan.strategy} ({lplan.note})"
        + (": " + ", ".join(f"{c}={w:.3g}" for c, w in weights.items()) if weights else "")
        + f"; {lplan.prior_note}")
    if info.is_main:
        (run / "class_weights.json").write_text(json.dumps(
            {**lplan.to_dict(), "by_class": weights}, indent=2))
    semi = _semi(cfg, parts, spec, tr.labels, len(ds.classes), info, say)
    model, kwargs = (head.model, head.kwargs) if head is not None else probed or _create(
        cfg, len(ds.classes), src.features, plan)
    fit_args = {"log_path": run / "metrics.jsonl", "show_progress": not quiet,
                "checkpoint_dir": run / "checkpoint", "num_classes": len(ds.classes),
                "conservative": conservative, "unlabeled": semi}
    check = (LrCheck(head.result.best_metrics.get("val_loss"))
             if head is not None and ckpt is None and lr_check_applies(cfg, head=True)
             else None)
    switched = verdict is not None and verdict.route == "scratch"
    deadline = (Deadline(t0 + cfg.time_budget * 60, AFTER_TRAINING_S)
                if (head is not None or switched) and budgeted and ckpt is None else None)
    cbs = [c for c in (check, deadline) if c is not None]
    extra = {"callbacks": cbs} if cbs else {}
    stage = (prepare_stage_cache(model, tr, va, fit_cfg, training_flips(cfg), say)
             if head is not None and ckpt is None else None)
    net, ftr, fva = (stage.net, stage.train, stage.val) if stage else (model, tr, va)
    if stage is not None:
        fit_cfg = stage.cfg
    result = fit(net, ftr, fva, fit_cfg, resume_from=ckpt, **extra, **fit_args)
    finetune: dict[str, Any] | None = None
    if head is not None:
        finetune = {"lr": fit_cfg.lr, "epochs": fit_cfg.epochs,
                    "backbone_norm": fit_cfg.backbone_norm,
                    "stage_cache": stage.summary if stage is not None else None}
    if check is not None and finetune is not None:
        finetune["lr_check"] = check.line(fit_cfg.lr)
        say(finetune["lr_check"])
        if check.tripped:  # restart from the head at a lower rate for the epochs left
            if info.is_main:
                (run / "metrics.jsonl").replace(run / "metrics_lr_check.jsonl")
            model.load_state_dict(head.result.best_state)  # type: ignore[union-attr]
            fit_cfg = replace(fit_cfg, lr=fit_cfg.lr * LR_CHECK_FACTOR,
                              epochs=fit_cfg.epochs - 1)
            finetune.update(lr=fit_cfg.lr, epochs=fit_cfg.epochs)
            result = fit(net, ftr, fva, fit_cfg, **fit_args,
                         **({"callbacks": [deadline]} if deadline is not None else {}))
    if deadline is not None and finetune is not None and deadline.line(fit_cfg.epochs):
        finetune["time_budget"] = deadline.line(fit_cfg.epochs)
        say(finetune["time_budget"])
    elif deadline is not None and deadline.line(fit_cfg.epochs):
        reason = f"{reason}; {deadline.line(fit_cfg.epochs)}"
        say(deadline.line(fit_cfg.epochs))
    if head is not None:
        result = combine(head.result, result, cfg.select_metric)
        model.load_state_dict(result.best_state)  # the head's, when fine-tuning lost
        defects = [*head.defects, *defects]
    done = _Trained(model, kwargs, result, (model, tr, va),
                    functools.partial(_graph_inputs, src, parts, spec, ds.classes,
                                      cfg.quantize),
                    {"loss": lplan.to_dict(), "weights": plan.to_dict(), "cache": mode,
                     "world_size": info.world_size,
                     "resumed_from": str(ckpt) if ckpt else None, "finetune": finetune,
                     "route_check": verdict.to_dict() if verdict is not None else None,
                     "unlabeled": semi.pool.summary() if semi is not None else None},
                    [*defects, *result.defects,
                     *(semi.pool.defects if semi is not None else ())], lplan, src.features,
                    va, dups)
    return _conclude(run, data, cfg, ds, spec, plan, reason, done, info, say, t0, planned)
