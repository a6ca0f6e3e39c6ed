"""PEFT-methods lesson's figures: the parameters/loss trade-off, adapters vs full fine-tuning,
prompt tuning against model scale.

Each function takes data the lesson computed and returns a matplotlib Figure.
"""
from __future__ import annotations

from .common import plt


FAMILY_COLORS = {"full": "black", "selective": "tab:gray", "reparameterization": "tab:blue",
                 "additive: adapters": "tab:green", "additive: soft prompts": "tab:red"}


def _label_points(ax, xs, ys, labels, fontsize=7.5):
    """Write each label next to its point, trying a few offsets so that no two labels overlap."""
    renderer = ax.figure.canvas.get_renderer()
    offsets = [(5, 2), (5, -9), (-5, 2), (-5, -9), (5, 11), (5, -18), (-5, 11), (-5, -18), (5, 20), (5, -27)]
    placed = []
    for i in sorted(range(len(xs)), key=lambda i: ys[i]):
        for dx, dy in offsets:
            t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                            fontsize=fontsize, ha="left" if dx > 0 else "right", va="bottom")
            box = t.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in placed):
                break
            t.remove()
        else:  # every offset collides: keep the first one
            t = ax.annotate(labels[i], (xs[i], ys[i]), xytext=offsets[0], textcoords="offset points",
                            fontsize=fontsize)
            box = t.get_window_extent(renderer)
        placed.append(box)


def peft_methods_tradeoff(results: dict, base_loss: float, title: str = ""):
    """Left: validation loss vs trainable parameters (log x), one point per method, coloured by
    family. Right: one training step's measured memory by category, per method.

    ``results``: {name: {"label", "family", "trainable", "val_loss", "memory": {category: bytes}}}.
    """
    import numpy as np

    names = list(results)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(13.0, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})
    a0.grid(True, alpha=0.3)
    for fam, color in FAMILY_COLORS.items():
        pts = [results[n] for n in names if results[n]["family"] == fam]
        if pts:
            a0.scatter([p["trainable"] for p in pts], [p["val_loss"] for p in pts], color=color, s=40,
                       label=fam, zorder=3)
    a0.axhline(base_loss, ls="--", lw=1, color="gray")
    a0.set_xscale("log")
    a0.set_xlabel("trainable parameters")
    a0.set_ylabel("validation loss after fine-tuning (nats/token)")
    lo, hi = a0.get_xlim()
    a0.set_xlim(lo, hi * 2.5)  # room for the labels of the largest methods
    a0.text(hi * 2.4, base_loss, "base model (no fine-tuning) ", va="bottom", ha="right", fontsize=8, color="gray")
    a0.set_title("loss against trainable parameters", fontsize=10)
    a0.legend(fontsize=8, loc="best")
    fig.tight_layout()  # final axes positions first: the labels are placed in display space
    _label_points(a0, [results[n]["trainable"] for n in names], [results[n]["val_loss"] for n in names],
                  [results[n]["label"] for n in names])
    cats = ("weights_frozen", "weights_trainable", "gradients", "optimizer_state", "activations")
    y = np.arange(len(names))[::-1]
    left = np.zeros(len(names))
    colors = plt.get_cmap("tab10")
    biggest = max(sum(results[n]["memory"].get(c, 0) for c in cats) for n in names)
    unit, unit_name = next((u, nm) for u, nm in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")) if biggest >= u)
    for i, c in enumerate(cats):
        v = np.array([results[n]["memory"].get(c, 0) for n in names], dtype=float) / unit
        a1.barh(y, v, left=left, height=0.65, color=colors(i), label=c.replace("_", " "))
        left += v
    a1.set_yticks(y, [results[n]["label"] for n in names], fontsize=8)
    a1.set_xlabel(f"one training step, measured ({unit_name})")
    a1.set_title("where one training step's memory goes", fontsize=10)
    a1.grid(True, alpha=0.3, axis="x")
    a1.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def adapters_vs_full(data: dict, lr: dict, base_loss: float, labels: dict | None = None, title: str = ""):
    """Left: best validation loss vs training tokens (early stopping), per method.
    Right: final validation loss vs peak learning rate (log x), per method.

    ``data``: {method: [{"tokens", "best_val"}, ...]}; ``lr``: {method: {lr: loss}} (NaN = diverged).
    """
    import numpy as np

    labels = labels or {}
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    for ax in (a0, a1):
        ax.grid(True, alpha=0.3)
        ax.set_xscale("log")
        ax.axhline(base_loss, ls="--", lw=1, color="gray")
    for m, pts in data.items():
        a0.errorbar([p["tokens"] for p in pts], [p["best_val"] for p in pts], yerr=[p.get("std", 0) for p in pts],
                    fmt="o-", capsize=3, label=labels.get(m, m))
    a0.set_xlabel("fine-tuning tokens (bytes of Python)")
    a0.set_ylabel("best validation loss (nats/token)")
    a0.set_title("as the training set shrinks (early stopping; mean, std over seeds)", fontsize=10)
    a0.legend(fontsize=8)
    for m, curve in lr.items():
        xs = np.array(list(curve), dtype=float)
        ys = np.array(list(curve.values()), dtype=float)
        a1.plot(xs, ys, "o-", label=labels.get(m, m))
        for x in xs[~np.isfinite(ys)]:
            a1.axvline(x, color="tab:red", lw=0.8, ls=":")
    a1.set_xlabel("peak learning rate")
    a1.set_ylabel("final validation loss (nats/token)")
    a1.set_title("sensitivity to the learning rate", fontsize=10)
    a1.legend(fontsize=8)
    for ax in (a0, a1):
        ax.text(ax.get_xlim()[0], base_loss, "  base model", va="bottom", fontsize=8, color="gray")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def prompt_tuning_scale(rows: list, title: str = ""):
    """Left: base, prompt-tuned and fully fine-tuned validation loss vs non-embedding parameters.
    Right: the share of full fine-tuning's gain that prompt tuning recovers.

    ``rows``: [{"size", "params", "base", "prompt", "full", "recovered"}, ...] in size order.
    """
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    n = [r["params"] for r in rows]
    for ax in (a0, a1):
        ax.grid(True, alpha=0.3)
        ax.set_xscale("log")
        ax.set_xlabel("base model, non-embedding parameters N")
        ax.set_xticks(n, [f"{r['size']}\n{r['params']:,}" for r in rows])
        ax.minorticks_off()
        ax.set_xlim(min(n) / 1.6, max(n) * 1.6)
    for key, style, label in (("base", "s--", "base (no fine-tuning)"), ("prompt", "o-", "prompt tuning"),
                              ("full", "o-", "full fine-tuning")):
        a0.plot(n, [r[key] for r in rows], style, label=label)
    a0.set_ylabel("validation loss on Python (nats/token)")
    a0.set_title("fine-tuned from bases of growing size", fontsize=10)
    a0.legend(fontsize=8)
    rec = [100 * r["recovered"] for r in rows]
    a1.plot(n, rec, "o-", color="tab:red")
    for x, v in zip(n, rec):
        a1.annotate(f"{v:.0f}%", (x, v), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=9)
    a1.axhline(100, ls="--", lw=1, color="gray")
    a1.text(min(n) / 1.5, 100, " = full fine-tuning (Lester et al.: reached at 11B)", va="bottom", fontsize=8,
            color="gray")
    a1.set_ylabel("prompt tuning's share of full FT's gain (%)")
    a1.set_title("(base - prompt) / (base - full)", fontsize=10)
    a1.set_ylim(min(0, min(rec) - 5), 110)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
