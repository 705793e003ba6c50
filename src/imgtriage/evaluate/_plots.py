"""Report figures as ``data:image/png;base64`` URIs (matplotlib Agg, no pyplot global state)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_LEGEND = 15


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_data_uri(fig: Any) -> str:
    """Render a Figure to an inline PNG (no software/URL metadata in the file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def confusion_plot(normalized: Sequence[Sequence[float]], names: Sequence[str]) -> str:
    cm = np.asarray(normalized, dtype=np.float64)
    k = len(names)
    side = min(12.0, 3.0 + 0.35 * k)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of true class")
    if k <= 40:
        ax.set_xticks(range(k), [str(n) for n in names], rotation=90, fontsize=8)
        ax.set_yticks(range(k), [str(n) for n in names], fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j] >= 0.005:
                    ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (row-normalised)")
    return png_data_uri(fig)


def pr_plot(pr_curves: Sequence[dict[str, Any]]) -> str:
    fig = _figure(6.5, 5.0)
    ax = fig.add_subplot()
    drawn = [c for c in pr_curves if c.get("recall") is not None]
    for c in drawn:
        ap = c.get("average_precision")
        label = f"{c['class']} (AP {ap:.3f})" if ap is not None else str(c["class"])
        ax.plot(c["recall"], c["precision"], lw=1.2, label=label, drawstyle="steps-post")
    if 0 < len(drawn) <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="lower left")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision–recall, one-vs-rest per class")
    ax.grid(alpha=0.3)
    return png_data_uri(fig)


def reliability_plot(bins: dict[str, Any], ece: float | None) -> str:
    fig = _figure(6.5, 5.5)
    ax, axh = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    lower = np.asarray(bins["lower"], dtype=np.float64)
    upper = np.asarray(bins["upper"], dtype=np.float64)
    acc = np.array([np.nan if v is None else v for v in bins["accuracy"]], dtype=np.float64)
    conf = np.array([np.nan if v is None else v for v in bins["confidence"]], dtype=np.float64)
    width = upper - lower
    used = np.isfinite(acc)
    ax.bar(lower[used], acc[used], width=width[used], align="edge", edgecolor="black",
           color="#4c72b0", label="accuracy")
    ax.bar(lower[used], conf[used] - acc[used], bottom=acc[used], width=width[used],
           align="edge", color="#dd8452", alpha=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    title = "Reliability diagram" + (f" (ECE {ece:.4f})" if ece is not None else "")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    axh.bar(lower, bins["count"], width=width, align="edge", color="gray", edgecolor="black")
    axh.set_xlabel("top-class confidence")
    axh.set_ylabel("count")
    axh.set_xlim(0, 1)
    return png_data_uri(fig)


def risk_coverage_plot(rc: dict[str, Any], operating: tuple[float, float] | None) -> str:
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    ax.plot(rc["coverage"], rc["risk"], lw=1.5, label="model")
    if operating is not None:
        ax.plot([operating[0]], [operating[1]], "o", color="C3", label="with thresholds")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (fraction answered)")
    ax.set_ylabel("risk (error rate on answered)")
    aurc = rc.get("aurc")
    ax.set_title("Risk–coverage" + (f" (AURC {aurc:.4f})" if aurc is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_data_uri(fig)


def feature_importance_plot(importance: dict[str, float], top: int = 30) -> str:
    items = sorted(importance.items(), key=lambda kv: abs(kv[1]), reverse=True)[:top]
    items.reverse()
    fig = _figure(6.5, 1.0 + 0.25 * len(items))
    ax = fig.add_subplot()
    ax.barh([str(k) for k, _ in items], [float(v) for _, v in items], color="#55a868")
    ax.set_xlabel("importance")
    ax.set_title(f"Feature importance (top {len(items)})")
    ax.tick_params(axis="y", labelsize=8)
    return png_data_uri(fig)
