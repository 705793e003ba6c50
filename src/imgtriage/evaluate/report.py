"""The evaluation report: ``report.json`` for scripts and a self-contained ``report.html``.

The HTML has no external references: CSS is inline and every figure and thumbnail is an
inline base64 PNG, so the file can be mailed, archived or opened offline. Every path and class
name is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from imgtriage.errors import DataError
from imgtriage.evaluate import _plots
from imgtriage.evaluate._gallery import Reader, attach_thumbnails, default_reader, failure_cases
from imgtriage.evaluate._validation import as_labels, as_scores, check_class_names, json_safe
from imgtriage.evaluate.abstain import abstain_summary
from imgtriage.evaluate.calibration import TemperatureScaler
from imgtriage.evaluate.conformal import coverage_summary, prediction_sets_from_dict
from imgtriage.evaluate.decision import REASONS, DecisionPolicy, softmax
from imgtriage.evaluate.metrics import (
    classification_report,
    expected_calibration_error,
    negative_log_likelihood,
)
from imgtriage.evaluate.outcomes import decision_outcomes

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.fig{max-width:100%;height:auto}
.gallery{display:flex;flex-wrap:wrap;gap:.6em;margin:.3em 0 1em}
.card{width:150px;font-size:.75em;border:1px solid #ddd;padding:4px;word-break:break-all}
.card img{display:block;margin:0 auto 3px}
.ph{width:96px;height:96px;margin:0 auto 3px;background:#eee;border:1px dashed #999;
display:flex;align-items:center;justify-content:center;text-align:center;font-size:.8em;
overflow:hidden;color:#a00}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em}
.muted{color:#777}
"""


def _as_policy(decision: DecisionPolicy | dict[str, Any] | None) -> DecisionPolicy | None:
    if decision is None or isinstance(decision, DecisionPolicy):
        return decision
    return DecisionPolicy.from_dict(decision)


def _calibration(logits: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, Any]:
    raw, cal = softmax(logits), softmax(logits, temperature)
    fitted = TemperatureScaler(cap_confidence=False).fit(logits, y)  # the NLL optimum
    return {"temperature": temperature,
            "nll_raw": negative_log_likelihood(raw, y),
            "nll_calibrated": negative_log_likelihood(cal, y),
            "ece_raw": expected_calibration_error(raw, y),
            "ece_calibrated": expected_calibration_error(cal, y),
            "best_temperature_on_this_data": fitted.temperature_,
            "note": "best_temperature_on_this_data is fitted on the evaluated data itself: "
                    "a diagnostic, not a calibration to deploy"}


def build_report(*, logits: Any, labels: Any, class_names: Sequence[str], paths: Sequence[Any],
                 decision: DecisionPolicy | dict[str, Any] | None = None,
                 title: str = "imgtriage evaluation report", extra: dict[str, Any] | None = None,
                 feature_importance: dict[str, float] | None = None,
                 gallery_per_class: int = 5, n_confused_pairs: int = 10,
                 ood_scores: Any = None, ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything ``report.json`` holds, computed from plain arrays (no files written).

    ``ood_scores`` (one per row) let the policy's out-of-distribution rule refuse rows as
    ``predict`` does; ``ood`` is a ready OOD-detection section (``evaluate --ood``).
    ``report["headline"]`` holds the one set of numbers the summary shows under the rule:
    they are the decision section's numbers, refusals counted by reason.

    Metrics use the policy's calibrated probabilities; without ``decision``, plain softmax.
    They score the top class; when the policy has thresholds, ``report["decision"]`` scores
    what the rule answers (recall-first positive class, abstentions sent to review): see
    :func:`~imgtriage.evaluate.outcomes.decision_outcomes`.

    Example:
        >>> r = build_report(logits=[[2.0, 0.0], [0.0, 1.0]], labels=[0, 0],
        ...                  class_names=["a", "b"], paths=["x.png", "y.png"])
        >>> r["metrics"]["accuracy"], r["failures"]["per_class"][0]["false_negatives"][0]["path"]
        (0.5, 'y.png')
    """
    z = as_scores(logits, "logits")
    y = as_labels(labels, len(z), z.shape[1])
    names = check_class_names(class_names, z.shape[1])
    path_list = [str(p) for p in paths]
    if len(path_list) != len(y):
        raise DataError(f"{len(path_list)} paths for {len(y)} samples; give one path per row")
    policy = _as_policy(decision)
    # the labels are the argmax the rule decides with (equal class priors under a prior
    # correction); the probability metrics (ECE, NLL, Brier, AUC) are those of what it reports
    probs = policy.probabilities(z) if policy else softmax(z)
    scores = policy.decision_probabilities(z) if policy else probs
    report: dict[str, Any] = {
        "meta": _meta(title, len(y), names, policy),
        "metrics": classification_report(probs, y, names, from_logits=False,
                                         pred=scores.argmax(axis=1)),
        "calibration": _calibration(z, y, policy.temperature if policy else 1.0),
        "abstain": None, "conformal": None,
        "failures": failure_cases(probs, y, names, path_list, gallery_per_class,
                                  n_confused_pairs, pred=scores.argmax(axis=1)),
        "feature_importance": dict(feature_importance) if feature_importance else None,
        "decision": None, "extra": extra,
    }
    report["ood"] = ood
    report["headline"] = None
    if policy is not None and (policy.thresholds is not None or policy.ood is not None):
        decided = policy.decide(z, ood_scores)
        report["decision"] = decision_outcomes(
            decided, y, names, path_list, unknown_label=policy.unknown_label,
            rule=policy.to_dict(), gallery_per_class=gallery_per_class,
            n_confused_pairs=n_confused_pairs)
        report["headline"] = _headline(report["decision"], decided.reason)
    if policy is not None and policy.thresholds is not None:
        report["abstain"] = {"enabled": policy.abstain,
                             **abstain_summary(scores, y, policy.thresholds, names,
                                                positive_class=policy.positive_class)}
    if policy is not None and policy.conformal is not None:
        sets = prediction_sets_from_dict(policy.conformal, scores)
        report["conformal"] = {"settings": policy.conformal,
                               **coverage_summary(sets, y, n_classes=len(names))}
    return json_safe(report)


def _headline(d: dict[str, Any], reasons: Sequence[str | None]) -> dict[str, Any]:
    counts = {r: sum(1 for x in reasons if x == r) for r in REASONS}
    return {"n": d["n_samples"] if "n_samples" in d else len(reasons),
            "coverage": d["coverage"], "accuracy_answered": d["accuracy_at_coverage"],
            "abstained": d["abstain_count"], "abstained_by_reason": counts,
            "wrong_answers": d["errors"]}


def _meta(title: str, n: int, names: list[str], policy: DecisionPolicy | None) -> dict[str, Any]:
    try:
        from imgtriage._version import __version__
    except ImportError:  # pragma: no cover - the package always ships _version
        __version__ = "unknown"
    return {"title": title, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "version": __version__, "n_samples": n, "classes": names,
            "decision": policy.to_dict() if policy else None,
            "priors": policy.describe_priors() if policy else None}


def write_report(out_dir: str | Path, *, logits: Any, labels: Any, class_names: Sequence[str],
                 paths: Sequence[Any], decision: DecisionPolicy | dict[str, Any] | None = None,
                 title: str = "imgtriage evaluation report", extra: dict[str, Any] | None = None,
                 feature_importance: dict[str, float] | None = None,
                 gallery_per_class: int = 5, n_confused_pairs: int = 10,
                 image_reader: Reader | None = None, thumbnail_size: int = 96,
                 max_thumbnails: int = 1000, ood_scores: Any = None,
                 ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``report.json``, a self-contained ``report.html`` and each figure as a PNG
    beside them (``confusion_matrix.png``, ``pr_curves.png``, ``reliability.png``,
    ``risk_coverage.png``, ``feature_importance.png`` when given; ``report["figures"]``
    lists them) into ``out_dir``.

    ``logits`` (N, K), integer ``labels`` (N,), ``class_names`` in output order and one image
    ``path`` per row. ``decision`` (a DecisionPolicy or its dict) adds calibration, abstain and
    conformal sections. Thumbnails are read with ``image_reader`` (default
    ``imgtriage.io.read_image``); unreadable files are shown as a box with the reason.
    Returns the dict written to ``report.json``.

    Example:
        >>> write_report("out", logits=logits, labels=labels, class_names=names,
        ...              paths=paths)  # doctest: +SKIP
    """
    report = build_report(logits=logits, labels=labels, class_names=class_names, paths=paths,
                          decision=decision, title=title, extra=extra,
                          feature_importance=feature_importance,
                          gallery_per_class=gallery_per_class, n_confused_pairs=n_confused_pairs,
                          ood_scores=ood_scores, ood=ood)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = report_figures(report)
    for name, uri in figures.items():
        (out / name).write_bytes(base64.b64decode(uri.split(",", 1)[1]))
    report["figures"] = sorted(figures)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False, default=str),
                                     encoding="utf-8")
    reader = image_reader if image_reader is not None else default_reader()
    thumbs = attach_thumbnails(report["failures"], reader, thumbnail_size, max_thumbnails)
    if report.get("decision"):
        thumbs.update(attach_thumbnails(report["decision"]["failures"], reader, thumbnail_size,
                                        max_thumbnails, known=thumbs))
    (out / "report.html").write_text(render_html(report, thumbs, figures), encoding="utf-8",
                                     errors="backslashreplace")  # names that are not UTF-8
    return report


def report_figures(report: dict[str, Any]) -> dict[str, str]:
    """Every figure of a :func:`build_report` dict as a PNG data URI, keyed by file name."""
    m, a = report["metrics"], report["abstain"]
    op = (a["coverage"], a["risk_at_coverage"]) if a and a["risk_at_coverage"] is not None \
        else None
    figs = {"confusion_matrix.png": _plots.confusion_plot(m["confusion_matrix"]["normalized"],
                                                          m["class_names"]),
            "pr_curves.png": _plots.pr_plot(m["curves"]["pr"]),
            "reliability.png": _plots.reliability_plot(m["reliability"], m["ece"]),
            "risk_coverage.png": _plots.risk_coverage_plot(m["risk_coverage"], op)}
    if report.get("feature_importance"):
        figs["feature_importance.png"] = _plots.feature_importance_plot(
            report["feature_importance"])
    return figs


# ---------------------------------------------------------------------------- HTML rendering

def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.{digits}f}"
    return _e(v)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{_e(h)}</th>'
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(
        f'<td class="{"l" if i == 0 else ""}">{_fmt(c)}</td>' for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(uri: str, alt: str) -> str:
    return f'<img class="fig" src="{uri}" alt="{_e(alt)}">'


def _summary(r: dict[str, Any]) -> str:
    m, c, h = r["metrics"], r["calibration"], r.get("headline")
    head = ""
    if h:
        why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in
                        h["abstained_by_reason"].items() if n) or "none"
        head = ("<p><b>Under the bundle's rule</b>: answers "
                f"{_e(_fmt(h['coverage']))} of {h['n']} images at accuracy "
                f"{_e(_fmt(h['accuracy_answered']))}; abstains on {h['abstained']} ({_e(why)})."
                " The rows below score the top class of every image, answered or not.</p>")
    rows = [["samples", m["n_samples"]], ["classes", m["n_classes"]],
            ["accuracy", m["accuracy"]], ["balanced accuracy", m["balanced_accuracy"]]]
    rows += [[f"top-{k} accuracy", v] for k, v in m["top_k_accuracy"].items() if k != "1"]
    rows += [["macro F1", m["macro_avg"]["f1"]], ["weighted F1", m["weighted_avg"]["f1"]],
             ["macro ROC AUC", m["macro_roc_auc"]], ["mean AP", m["mean_average_precision"]],
             ["NLL", m["nll"]], ["Brier", m["brier"]], ["ECE (15 bins)", m["ece"]],
             ["adaptive ECE", m["adaptive_ece"]], ["class-wise ECE", m["classwise_ece"]],
             ["AURC", m["risk_coverage"]["aurc"]], ["temperature", c["temperature"]]]
    return "<h2>Summary</h2>" + head + _table(rows, ["metric", "value"])


def _per_class(m: dict[str, Any]) -> str:
    rows = [[p["class"], p["precision"], p["recall"], p["f1"], p["support"],
             p["average_precision"], p["roc_auc"]] for p in m["per_class"]]
    return "<h2>Per class</h2>" + _table(
        rows, ["class", "precision", "recall", "F1", "support", "AP", "ROC AUC"])


def _calibration_html(r: dict[str, Any], figs: dict[str, str]) -> str:
    c = r["calibration"]
    rows = [["NLL", c["nll_raw"], c["nll_calibrated"]], ["ECE", c["ece_raw"], c["ece_calibrated"]]]
    note = (f'<p class="muted">Temperature {_fmt(c["temperature"])}; the best temperature on '
            f'this data would be {_fmt(c["best_temperature_on_this_data"])} (diagnostic only).</p>')
    fig = _img(figs["reliability.png"], "reliability diagram")
    return ("<h2>Calibration</h2>" + _table(rows, ["", "raw softmax", "calibrated"]) + note
            + fig)


def _selective_html(r: dict[str, Any], figs: dict[str, str]) -> str:
    a, cf = r["abstain"], r["conformal"]
    out = "<h2>Abstain and selective prediction</h2>"
    out += _img(figs["risk_coverage.png"], "risk-coverage")
    if a:
        out += _table([["abstain enabled", a["enabled"]], ["coverage", a["coverage"]],
                       ["accuracy at coverage", a["accuracy_at_coverage"]],
                       ["abstained", a["abstain_count"]], ["accuracy (no abstain)", a["accuracy"]]],
                      ["", "value"])
        out += _table([[p["class"], p["threshold"], p["support"], p["abstain_rate"],
                        p["predicted_abstain_rate"]] for p in a["per_class"]],
                      ["class", "threshold", "support", "abstain rate (true class)",
                       "abstain rate (predicted class)"])
    if cf:
        s = cf["settings"]
        out += (f"<h3>Conformal sets ({_e(s.get('method'))}, alpha {_fmt(s.get('alpha'))}"
                f"{', per class' if s.get('mondrian') else ''})</h3>")
        out += _table([["coverage", cf["coverage"]], ["mean set size", cf["mean_set_size"]],
                       ["singleton rate", cf["singleton_rate"]], ["empty rate", cf["empty_rate"]]],
                      ["", "value"])
        if cf.get("per_class_coverage"):
            out += _table([[n, v] for n, v in zip(r["meta"]["classes"],
                                                  cf["per_class_coverage"], strict=True)],
                          ["class", "coverage (true class in its set)"])
    return out


def _short(text: Any, limit: int = 90) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _card(it: dict[str, Any], thumbs: dict[int, tuple[str | None, str | None]]) -> str:
    uri, reason = thumbs.get(it["index"], (None, "no thumbnail"))
    pic = (f'<img src="{uri}" alt="{_e(it["path"])}">' if uri
           else f'<div class="ph" title="{_e(reason)}">unreadable: {_e(_short(reason))}</div>')
    return (f'<div class="card">{pic}<div><b>{_e(it["true"])}</b> → <b>{_e(it["predicted"])}'
            f'</b> ({it["score"]:.3f})</div><div class="muted">{_e(it["path"])}</div></div>')


def _decision_html(r: dict[str, Any], thumbs: dict[int, tuple[str | None, str | None]],
                   shown: set[tuple[str, str, str]] | None = None) -> str:
    d = r.get("decision")
    if not d:
        return ""
    rule = d["rule"] or {}
    pos = rule.get("positive_class")
    names = d["columns"][:-1]
    why = (f"{_e(names[pos])} whenever its probability reaches its threshold"
           if pos is not None else "the top class when it reaches its threshold")
    if rule.get("abstain"):
        why += f"; below threshold it abstains ({_e(d['columns'][-1])}: human review)"
    out = [f"<h2>Answers under the decision rule</h2><p class='muted'>The rule answers "
           f"{why}. Rows: true class; columns: the answer.</p>"]
    cm = d["confusion_matrix"]
    out.append(_table([[n, *row] for n, row in zip(names, cm, strict=True)],
                      ["true \\ answer", *d["columns"]]))
    out.append(_table([["coverage", d["coverage"]], ["abstained (review)", d["abstain_count"]],
                       ["accuracy", d["accuracy"]],
                       ["accuracy at coverage", d["accuracy_at_coverage"]],
                       ["wrong answers", d["errors"]]], ["", "value"]))
    out.append(_table([[p["class"], p["support"], p["recall"], p["missed"], p["abstained"],
                        p["precision"]] for p in d["per_class"]],
                      ["class", "support", "recall", "missed", "abstained", "precision"]))
    out.append(_gallery_html({"failures": d["failures"]}, thumbs,
                             "Failure gallery under the rule",
                             "What the rule got wrong (abstentions excluded): card shows "
                             "true → answered (score of the answered class), then the path.",
                             shown))
    return "".join(out)


def _cards(items: Sequence[dict[str, Any]], thumbs: dict[int, tuple[str | None, str | None]],
           shown: set[tuple[str, str, str]]) -> str:
    """Cards of the items not shown yet on the page (one mistake is one card, once): with two
    classes every mistake is a confused pair, a false negative and a false positive."""
    fresh = []
    for it in items:
        key = (str(it["path"]), str(it["true"]), str(it["predicted"]))
        if key not in shown:
            shown.add(key)
            fresh.append(it)
    return ("<div class='gallery'>" + "".join(_card(it, thumbs) for it in fresh) + "</div>"
            if fresh else "")


def _gallery_html(r: dict[str, Any], thumbs: dict[int, tuple[str | None, str | None]],
                  title: str = "Failure gallery",
                  note: str = "Highest-confidence mistakes: card shows true → predicted (score "
                              "of the predicted class), then the path.",
                  shown: set[tuple[str, str, str]] | None = None) -> str:
    f = r["failures"]
    shown = set() if shown is None else shown
    out = [f"<h2>{_e(title)}</h2><p class='muted'>{_e(note)} Each mistake appears once: "
           "under its confused pair, else under its class.</p>"]
    out.append("<h3>Most confused pairs</h3>")
    if not f["confused_pairs"]:
        out.append("<p>No mistakes.</p>")
    for pair in f["confused_pairs"]:
        out.append(f"<h4>{_e(pair['true'])} → {_e(pair['predicted'])}: {pair['count']}</h4>")
        out.append(_cards(pair["examples"], thumbs, shown))
    for c in f["per_class"]:
        parts = []
        for key, label in (("false_negatives", "missed (false negatives)"),
                           ("false_positives", "wrongly predicted (false positives)")):
            cards = _cards(c[key], thumbs, shown)
            if cards:
                parts.append(f"<h4>{label}</h4>{cards}")
        if parts:
            out.append(f"<h3>{_e(c['class'])}</h3>" + "".join(parts))
    return "".join(out)


def _ood_html(r: dict[str, Any]) -> str:
    o = r.get("ood")
    if not o:
        return ""
    rows = [[name, m["auroc"], m.get("fpr_at_95tpr"), m["n_id"], m["n_ood"]]
            for name, m in o["methods"].items()]
    why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in o["refused_by_reason"].items())
    return (f"<h2>Out-of-distribution images ({_e(o['folder'])})</h2><p class='muted'>"
            f"{_e(o['note'])}. {_e(', '.join(k for k in o['methods'] if k != 'msp'))}: the "
            "bundle's OOD score; msp: max softmax probability (baseline).</p>"
            + _table(rows, ["score", "AUROC", "FPR at 95% TPR", "in-distribution", "OOD"])
            + f"<p>The rule refuses {_e(_fmt(o['refused']))} of the {o['n']} images"
            f"{f' ({_e(why)})' if why else ''}; {len(o['defects'])} unreadable.</p>")


def render_html(report: dict[str, Any],
                thumbs: dict[int, tuple[str | None, str | None]] | None = None,
                figures: dict[str, str] | None = None) -> str:
    """The self-contained HTML page for a :func:`build_report` dict (``figures`` from
    :func:`report_figures`, computed when not given)."""
    thumbs = thumbs or {}
    shown: set[tuple[str, str, str]] = set()  # every mistake's card once on the page
    figs = figures if figures is not None else report_figures(report)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>{_e(report['meta']['title'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(report['meta']['title'])}</h1><p class='muted'>created "
             f"{_e(report['meta']['created'])} · imgtriage {_e(report['meta']['version'])}</p>",
             _summary(report), _per_class(report["metrics"]),
             "<h2>Confusion matrix</h2>" + _img(figs["confusion_matrix.png"], "confusion matrix"),
             "<h2>Precision–recall</h2>" + _img(figs["pr_curves.png"], "PR curves"),
             _calibration_html(report, figs), _selective_html(report, figs),
             _ood_html(report), _decision_html(report, thumbs, shown)]
    if report.get("feature_importance"):
        parts.append("<h2>Feature importance</h2>" + _img(figs["feature_importance.png"],
                                                          "feature importance"))
    parts.append(_gallery_html(report, thumbs, shown=shown))
    if report.get("extra"):
        text = json.dumps(report["extra"], indent=2, default=str)
        parts.append(f"<h2>Extra</h2><pre>{_e(text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)
