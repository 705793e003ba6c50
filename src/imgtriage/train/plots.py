"""The training-curve plot saved in every run directory (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(history: list[dict[str, Any]], path: str | Path,
                best_epoch: int | None = None) -> Path:
    """Loss, accuracy and learning rate per epoch as one PNG.

    Example:
        >>> history = [{"epoch": 1, "train_loss": 1.0, "lr": 0.1}]
        >>> plot_curves(history, "curves.png")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in threads

    path = Path(path)
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(12, 3.6), dpi=100)
    panels = (("loss", ("train_loss", "val_loss")),
              ("accuracy", ("train_accuracy", "val_accuracy", "val_balanced_accuracy",
                            "val_macro_f1")),
              ("learning rate", ("lr",)))
    for i, (title, keys) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 3, i)
        for key in keys:
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", markersize=3, label=key)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title != "learning rate":
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path
