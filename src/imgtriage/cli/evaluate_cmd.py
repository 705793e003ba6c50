"""imgtriage evaluate / calibrate: their options are generated from EvaluateConfig and
CalibrateConfig (one per field, its help text with the field)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import argument, command, config_from_options
from imgtriage.predict.assess_config import (
    CalibrateConfig,
    CalibrateOutput,
    EvaluateConfig,
    EvaluateOutput,
)


def evaluate_command(**options: Any) -> None:
    """Metrics, calibration, abstain, conformal sets and a failure gallery (JSON + HTML)."""
    from imgtriage.predict.assess import drift_against, evaluate_bundle

    bundle, data = options["bundle"], options["data"]
    out = config_from_options(EvaluateOutput, options).out
    cfg = config_from_options(EvaluateConfig, options)
    if cfg.reference is not None:
        res = drift_against(bundle, [data], cfg.reference, alpha=cfg.drift_alpha,
                            batch_size=cfg.batch_size)
        target = out or Path("drift.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(res, indent=2))
        typer.echo(f"shift: {res['shift']} -> {target}")
        raise typer.Exit(1 if res["shift"] else 0)
    out = out or Path(bundle).resolve().parent / "eval"
    rep = evaluate_bundle(bundle, data, out, cfg)
    for warning in (rep.get("extra") or {}).get("warnings") or []:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    m = rep["metrics"]
    typer.echo(f"accuracy {m['accuracy']:.4f}  balanced {m['balanced_accuracy']:.4f}  "
               f"NLL {m['nll']:.4f}  ECE {m['ece']:.4f}  ({rep['meta']['n_samples']} images)")
    d, h = rep.get("decision"), rep.get("headline")
    if d and h:
        recall = ", ".join(f"{p['class']} {p['recall']:.4f}" for p in d["per_class"]
                           if p["recall"] is not None)
        why = ", ".join(f"{n} {k}" for k, n in h["abstained_by_reason"].items() if n)
        acc = h["accuracy_answered"]
        typer.echo(f"under the decision rule: coverage {h['coverage']:.4f}, accuracy of "
                   f"answered {acc if acc is None else format(acc, '.4f')}, "
                   f"{h['abstained']} abstained ({why or 'none'}), {h['wrong_answers']} wrong; "
                   f"recall {recall}")
    o = rep.get("ood")
    if o:
        scores = "; ".join(f"{k} AUROC {m['auroc']:.4f} FPR@95TPR {m['fpr_at_95tpr']:.4f}"
                           for k, m in o["methods"].items())
        bad = len(o.get("defects") or [])
        typer.echo(f"OOD folder ({o['n']} images"
                   f"{f', {bad} unreadable: report.json ood.defects' if bad else ''}): "
                   f"{scores}; the rule refuses {o['refused']:.1%}")
    unused = (rep.get("extra") or {}).get("defects") or []
    if unused:
        kinds = Counter(d["issue"] for d in unused)
        typer.echo(f"{len(unused)} files not scored ("
                   + ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
                   + f", e.g. {unused[0]['message']}): report.json extra.defects")
    typer.echo(f"report: {out / 'report.html'}")


BUNDLE = argument("bundle", "Bundle directory or .zip.", Path)
# The bundle, the data and where the report goes, then one option per EvaluateConfig field.
command(evaluate_command, arguments=[BUNDLE, argument(
    "data", "Labelled folder or manifest (e.g. RUN/splits.csv); with --reference, any files "
            "or folders.", Path)], configs=[EvaluateOutput, EvaluateConfig])


def calibrate_command(**options: Any) -> None:
    """Fit temperature, thresholds, abstain and conformal sets; write them into the bundle."""
    from imgtriage.predict.assess import calibrate_bundle

    bundle, data = options["bundle"], options["data"]
    out = config_from_options(CalibrateOutput, options).out
    cfg = config_from_options(CalibrateConfig, options)
    s = calibrate_bundle(bundle, data, cfg, out=out)
    _print_calibration(s)
    typer.echo(f"bundle updated: {out or bundle} (profile {cfg.profile!r})")


# The bundle and the data, then one option per CalibrateConfig field, then where it goes.
command(calibrate_command, arguments=[
    argument("bundle", "Bundle directory or .zip (updated in place unless --out).", Path),
    argument("data", "Calibration data: a labelled folder or a manifest (e.g. RUN/splits.csv "
                     "with --split val). Never the training images or the test set.", Path)],
    configs=[CalibrateConfig, CalibrateOutput])


def _print_calibration(s: dict) -> None:
    t = s["temperature"]
    if t.get("fitted", True) and "nll_before" in t:
        typer.echo(f"temperature {t['temperature']:.4f}: NLL {t['nll_before']:.4f} -> "
                   f"{t['nll_after']:.4f}, ECE {t['ece_before']:.4f} -> {t['ece_after']:.4f}")
    else:
        typer.echo(f"temperature {t['temperature']} (given)")
    if t.get("note"):
        typer.echo(f"  note: {t['note']}")
    for line in _threshold_lines(s.get("thresholds") or {}, s.get("class_names") or []):
        typer.echo(line)
    if s.get("abstain"):
        a = s["abstain"]
        typer.echo(f"abstain: coverage {a['coverage']:.4f}, accuracy at coverage "
                   f"{a['accuracy_at_coverage']}")
    if s.get("conformal"):
        c = s["conformal"]
        typer.echo(f"conformal: coverage {c['coverage']:.4f}, mean set size "
                   f"{c['mean_set_size']:.3f}, singletons {c['singleton_rate']:.3f}")


def _threshold_lines(t: dict, names: list[str]) -> list[str]:
    """One line per fitted class threshold: what it achieved on how many positives, and a
    warning where the positives are too few for the target to mean anything on new data."""
    lines = []
    target = t.get("target")
    for k, a in enumerate(t.get("achieved") or []):
        if a.get("note") == "not fitted: always accepted":
            continue
        name = names[k] if k < len(names) else str(k)
        rec, prec = a.get("recall"), a.get("precision")
        lines.append(
            f"threshold {name!r} ({t['strategy']}{f' {target:g}' if target else ''}): "
            f"{a['threshold']:.4f}, validation recall "
            f"{'-' if rec is None else f'{rec:.3f}'} ({a['tp']} of {a['support']} positives), "
            f"precision {'-' if prec is None else f'{prec:.3f}'}"
            f"{'' if a.get('met', True) else ', target NOT met'}")
        if a.get("note"):
            lines.append(f"  {a['note']}")
        few = (t["strategy"] == "target_recall" and target and target < 1
               and t.get("delta") is None and 0 < a["support"] < 1 / (1 - target))
        if few:
            lines.append(
                f"  warning: {a['support']} validation positive(s) of {name!r}, fewer than "
                f"1/(1 - target) = {1 / (1 - target):.0f}: the target then asks for every one "
                "of them, so the threshold sits at the lowest positive's score and new "
                f"positives will often fall below it; calibrate on more images of {name!r}, "
                "or add --delta 0.05 (a threshold that holds on new data, or says it cannot)")
    return lines


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
    app.command("calibrate")(calibrate_command)
