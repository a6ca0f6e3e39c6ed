"""LoRA lesson's figures: the rank sweep, merged vs unmerged latency, the update's singular spectra.

Each function takes data the lesson computed and returns a matplotlib Figure.
"""
from __future__ import annotations

from .common import plt


def lora_rank_sweep(ranks, losses, full_ft: float, base: float, paper: dict | None = None,
                    trainable=None, title: str = ""):
    """Validation loss against LoRA rank (log2 axis) with full fine-tuning and the base as lines.

    With ``paper`` ({r: loss}), a second panel compares the shape of the curve: each loss
    relative to the lowest loss of its own sweep, ours beside the paper's.
    """
    import numpy as np

    fig, axes = plt.subplots(1, 2 if paper else 1, figsize=(11.5 if paper else 6.4, 4.0), squeeze=False)
    ax = axes[0, 0]
    ax.grid(True, alpha=0.3)
    ax.plot(ranks, losses, "o-", lw=1.8, label="LoRA")
    if trainable is not None:
        for r, y, n in zip(ranks, losses, trainable):
            ax.annotate(f"{n / 1e3:.1f}K", (r, y), textcoords="offset points", xytext=(0, 7), ha="center",
                        fontsize=7, color="C0")
    ax.axhline(full_ft, ls="--", color="C3", lw=1.2, label="full fine-tuning")
    ax.axhline(base, ls=":", color="gray", lw=1.2, label="base model (no training)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r (labels: trainable parameters)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    if paper:
        ax2 = axes[0, 1]
        ax2.grid(True, alpha=0.3)
        ours = np.asarray(losses, dtype=float)
        ax2.plot(ranks, 100 * (ours / ours.min() - 1), "o-", lw=1.8, label="minipeft (tiny base, Python code)")
        pr = sorted(paper)
        pl = np.array([paper[r] for r in pr])
        ax2.plot(pr, 100 * (pl / pl.min() - 1), "s--", lw=1.5, color="C2", label="LoRA paper (GPT-2 M, E2E)")
        ax2.set_xscale("log", base=2)
        ticks = sorted(set(ranks) | set(pr))
        ax2.set_xticks(ticks, [str(r) for r in ticks])
        ax2.set_xlabel("LoRA rank r")
        ax2.set_ylabel("loss above the sweep's best (%)")
        ax2.set_title("The shape of the curve: where it flattens", fontsize=10)
        ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lora_latency(latency_ms: dict, title: str = ""):
    """Grouped bars: forward-pass ms per model ({shape: {model: ms}}), one panel per shape, ratio to base on top."""
    import numpy as np

    shapes = list(latency_ms)
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 3.8), squeeze=False)
    for ax, sh in zip(axes[0], shapes):
        ax.grid(True, axis="y", alpha=0.3)
        d = latency_ms[sh]
        names = list(d)
        vals = np.array([d[n] for n in names])
        colors = ["gray" if n == "base" else "C2" if "merged" in n and "unmerged" not in n else
                  "C1" if "unmerged" in n else "C3" for n in names]
        bars = ax.bar(range(len(names)), vals, color=colors, width=0.65)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v / d['base']:.2f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 2) for n in names], fontsize=8)
        ax.set_ylabel("ms per forward pass (median)")
        ax.set_title(f"batch x tokens = {sh}", fontsize=10)
        ax.set_ylim(0, vals.max() * 1.18)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def lora_spectra(spectra: dict, random_spectra: dict, overlap=None, title: str = ""):
    """Singular values of weight updates against random matrices of the same shape and norm.

    Panels: singular values (log scale); the share of energy in the top r; and, with
    ``overlap = (js, {label: phis}, chance, r)``, the subspace similarity phi(r, j) of a
    rank-r LoRA update with the top-j directions of other updates, beside chance level.
    """
    import numpy as np

    n = 3 if overlap is not None else 2
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 3.9))
    for c, (name, s) in enumerate(spectra.items()):
        s = np.asarray(s, dtype=float)
        rnd = np.asarray(random_spectra[name], dtype=float)
        idx = np.arange(1, len(s) + 1)
        axes[0].semilogy(idx, s, "-", color=f"C{c}", lw=1.6, label=f"{name} dW")
        axes[0].semilogy(idx, rnd, ":", color=f"C{c}", lw=1.3, label="random, same shape/norm")
        axes[1].plot(idx, np.cumsum(s ** 2) / (s ** 2).sum(), "-", color=f"C{c}", lw=1.6, label=f"{name} dW")
        axes[1].plot(idx, np.cumsum(rnd ** 2) / (rnd ** 2).sum(), ":", color=f"C{c}", lw=1.3, label="random")
    axes[0].set_xlabel("index i")
    axes[0].set_ylabel("singular value sigma_i")
    axes[0].set_title("Singular values", fontsize=10)
    axes[0].legend(fontsize=7)
    axes[1].axhline(0.9, color="gray", lw=0.8, ls="--")
    axes[1].set_xlabel("r")
    axes[1].set_ylabel("energy share in the top r")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("Energy in the top-r directions", fontsize=10)
    axes[1].legend(fontsize=7)
    if overlap is not None:
        js, curves, chance, r = overlap
        names = list(spectra)
        for c, (label, phis) in enumerate(curves.items()):
            color = next((f"C{i}" for i, nm in enumerate(names) if label.endswith(nm)), f"C{c + 2}")
            axes[2].plot(js, phis, "-" if "FT" in label else "--", color=color, lw=1.5, label=label)
        axes[2].plot(js, chance, ":", color="gray", lw=1.5, label="chance: max(r, j) / k")
        axes[2].set_ylim(0, 1.02)
        axes[2].set_xlabel("j (top-j right-singular vectors of the other update)")
        axes[2].set_ylabel(f"phi({r}, j)")
        axes[2].set_title(f"How much of LoRA's top-{r} subspace lies in theirs", fontsize=10)
        axes[2].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.24), ncol=1)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
