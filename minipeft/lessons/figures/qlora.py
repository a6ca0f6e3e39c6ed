"""QLoRA lesson's figures: memory by category, measured beside predicted.

Each function takes data the lesson computed and returns a matplotlib Figure.
"""
from __future__ import annotations

from .common import new_axes, plt


MEMORY_CATEGORIES = ("weights_trainable", "weights_frozen", "quant_constants", "gradients", "optimizer_state",
                     "activations")


def memory_breakdown(measured: dict, predicted: dict | None = None, title: str = "", unit: float = 1e6,
                     unit_name: str = "MB"):
    """Stacked bars of bytes by category per method ({method: {category: bytes}}).

    With ``predicted`` (same shape), a black tick marks each method's predicted total.
    """
    import numpy as np

    fig, ax = new_axes((7.0, 4.2))
    names = list(measured)
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    colors = plt.get_cmap("tab10")
    for i, cat in enumerate(MEMORY_CATEGORIES):
        vals = np.array([measured[n].get(cat, 0) for n in names], dtype=float) / unit
        if not vals.any():
            continue
        ax.bar(x, vals, bottom=bottom, label=cat.replace("_", " "), color=colors(i), width=0.6)
        bottom += vals
    if predicted:
        tot = [sum(predicted[n].get(c, 0) for c in MEMORY_CATEGORIES) / unit for n in names]
        ax.scatter(x, tot, marker="_", s=900, color="black", zorder=3, label="predicted total")
    ax.set_xticks(x, names)
    ax.set_ylabel(unit_name)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
