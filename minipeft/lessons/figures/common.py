"""The figures' shared style: matplotlib without a display, one plain axes, the loss curves
several lessons draw (pretraining, QLoRA, E2E)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() == "agg" else None
import matplotlib.pyplot as plt  # noqa: E402


def new_axes(figsize=(6.4, 4.0)):
    """A figure with one axes and a light grid: the style every figure starts from."""
    fig, ax = plt.subplots(figsize=figsize)
    ax.grid(True, alpha=0.3)
    return fig, ax


def loss_curves(curves: dict, hlines: dict | None = None, title: str = "", xlabel: str = "optimizer step",
                ylabel: str = "cross-entropy (nats/token)", logx: bool = False):
    """One line per name in ``curves`` ({name: (steps, losses)}); dashed reference levels in ``hlines``."""
    fig, ax = new_axes()
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=name, lw=1.5)
    for name, y in (hlines or {}).items():
        ax.axhline(y, ls="--", lw=1, color="gray")
        ax.text(ax.get_xlim()[1], y, f" {name}", va="bottom", ha="right", color="gray", fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig
