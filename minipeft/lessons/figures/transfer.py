"""Transfer lesson's figures: loss against data, D_T against D_F, the data multiplier
(Hernandez et al. 2021, "Scaling Laws for Transfer").

Each function takes data the lesson computed and returns a matplotlib Figure.
"""
from __future__ import annotations

from .common import plt


def _size_colors(sizes):
    cmap = plt.get_cmap("viridis")
    return {s: cmap(0.85 * i / max(len(sizes) - 1, 1)) for i, s in enumerate(sizes)}


_SOURCE_STYLE = {0: dict(ls="--", marker="s"), 1: dict(ls=":", marker="^")}


def transfer_loss_vs_data(scratch: dict, finetune: dict, sizes: dict, arrows: dict | None = None, title: str = ""):
    """Test loss against Python bytes, one panel per model size (Hernandez et al. Fig. 1).

    ``scratch``: {size: [[D, loss], ...]}; ``finetune``: {source: {size: [[D_F, loss], ...]}};
    ``sizes``: {size: N} (panel order); ``arrows``: {size: (D_F, D_E, loss)} drawn as the
    horizontal D_T arrow from the fine-tuned point to the scratch curve.
    """
    import numpy as np

    names = list(sizes)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names) + 0.6, 3.7), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], names):
        ax.grid(True, alpha=0.3)
        d, l = np.array(scratch[s], dtype=float).T
        ax.plot(d, l, "o-", color="black", lw=1.6, ms=4, label="from scratch")
        for i, (src, by) in enumerate(finetune.items()):
            if s in by:
                d, l = np.array(by[s], dtype=float).T
                ax.plot(d, l, color=f"C{i}", lw=1.4, ms=4, label=f"fine-tuned from {src}", **_SOURCE_STYLE[i % 2])
        if arrows and s in arrows:
            DF, DE, loss = arrows[s]
            ax.annotate("", xy=(DE, loss), xytext=(DF, loss),
                        arrowprops=dict(arrowstyle="->", color="C3", lw=1.5))
            ax.text((DF * DE) ** 0.5, loss, "$D_T$", color="C3", ha="center", va="bottom", fontsize=9)
        ax.set_xscale("log")
        ax.set_title(f"{s} (N = {sizes[s]:,})", fontsize=10)
        ax.set_xlabel("Python bytes $D$ ($D_F$ when fine-tuned)")
    axes[0][0].set_ylabel("test loss (nats/byte)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def transfer_dt_vs_df(points: list, fits: dict, sizes: dict, title: str = ""):
    """Effective data transferred D_T against D_F, per size, with the fitted k D_F^alpha N^beta lines.

    One panel per source. ``points``: rows of ``minipeft.lessons.transfer_fits.analyze`` (D_F, D_T, N, size,
    source, flag, in_fit); filled markers were fitted, open ones were not (out of the low-data
    regime), upward triangles are lower bounds (the fine-tuned model beat every scratch run).
    """
    import numpy as np

    srcs = list(fits)
    colors = _size_colors(list(sizes))
    fig, axes = plt.subplots(1, len(srcs), figsize=(5.4 * len(srcs), 4.2), sharey=True, squeeze=False)
    for ax, src in zip(axes[0], srcs):
        ax.grid(True, alpha=0.3, which="both")
        fit = fits[src]
        for s, N in sizes.items():
            pts = [p for p in points if p["source"] == src and p["size"] == s]
            ok = [p for p in pts if p["flag"] == "ok"]
            for p in ok:
                ax.plot(p["D_F"], p["D_T"], "o", color=colors[s], ms=6,
                        mfc=colors[s] if p.get("in_fit") else "none")
            lb = [p for p in pts if p["flag"] == "above_range" and p["D_T"] > 0]
            if lb:
                ax.plot([p["D_F"] for p in lb], [p["D_T"] for p in lb], "^", color=colors[s], mfc="none", ms=7)
            neg = [p["D_F"] for p in pts if p["flag"] == "negative"]
            if neg:  # no place on a log axis: a marker on the bottom edge
                ax.plot(neg, [0.02] * len(neg), "v", color=colors[s], ms=7, transform=ax.get_xaxis_transform(),
                        clip_on=False)
            dfs = np.array(sorted({p["D_F"] for p in pts if p.get("in_fit")}), dtype=float)
            if dfs.size and np.isfinite(fit.get("alpha", np.nan)) and np.isfinite(fit.get("beta", np.nan)):
                x = np.geomspace(dfs.min(), dfs.max(), 50)
                ax.plot(x, fit["k"] * x ** fit["alpha"] * float(N) ** fit["beta"], "-", color=colors[s], lw=1.2)
            ax.plot([], [], "o-", color=colors[s], label=f"{s} (N = {N:,})")
        ax.plot([], [], "o", color="gray", mfc="none", label="not fitted (outside the low-data regime)")
        ax.plot([], [], "^", color="gray", mfc="none", label="lower bound (beats every scratch run)")
        ax.plot([], [], "v", color="gray", label="$D_T \\leq 0$: worse than scratch")
        if np.isfinite(fit.get("alpha", np.nan)):
            txt = (f"fit: k = {fit['k']:.3g}, $\\alpha$ = {fit['alpha']:.3f} ± {fit['alpha_err']:.3f}, "
                   f"$\\beta$ = {fit['beta']:.3f} ± {fit['beta_err']:.3f}")
            if fit.get("paper"):
                pp = fit["paper"]
                txt += f"\npaper: k = {pp['k']:.2g}, $\\alpha$ = {pp['alpha']}, $\\beta$ = {pp['beta']}"
            ax.text(0.02, 0.98, txt, transform=ax.transAxes, va="top", fontsize=7.5,
                    bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.8"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning data $D_F$ (Python bytes)")
        ax.set_title(f"pretrained on {src}", fontsize=10)
    axes[0][0].set_ylabel("effective data transferred $D_T$ (bytes)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8, frameon=False)
    return fig


def transfer_multiplier(points: list, fits: dict, sizes: dict, title: str = ""):
    """The effective data multiplier (D_F + D_T) / D_F against D_F, with the fit's 1 + k N^beta / D_F^(1-alpha)."""
    import numpy as np

    srcs = list(fits)
    colors = _size_colors(list(sizes))
    fig, axes = plt.subplots(1, len(srcs), figsize=(5.0 * len(srcs), 3.9), sharey=True, squeeze=False)
    for ax, src in zip(axes[0], srcs):
        ax.grid(True, alpha=0.3, which="both")
        fit = fits[src]
        for s, N in sizes.items():
            pts = sorted((p for p in points if p["source"] == src and p["size"] == s), key=lambda p: p["D_F"])
            ok = [p for p in pts if p["flag"] in ("ok", "negative")]
            if ok:
                ax.plot([p["D_F"] for p in ok], [p["multiplier"] for p in ok], "o-", color=colors[s], ms=5,
                        lw=1.2, label=f"{s} (N = {N:,})")
            lb = [p for p in pts if p["flag"] == "above_range" and p["D_T"] > 0]
            if lb:
                ax.plot([p["D_F"] for p in lb], [p["multiplier"] for p in lb], "^", color=colors[s], mfc="none")
            fitted = [p["D_F"] for p in pts if p.get("in_fit")]
            if fitted and np.isfinite(fit.get("alpha", np.nan)) and np.isfinite(fit.get("beta", np.nan)):
                x = np.geomspace(min(fitted), max(fitted), 50)
                ax.plot(x, 1 + fit["k"] * float(N) ** fit["beta"] / x ** (1 - fit["alpha"]), ":", color=colors[s])
        ax.axhline(1.0, color="gray", lw=1, ls="--")
        ax.text(0.99, 1.0, "no transfer ", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                fontsize=7, color="gray")
        ax.plot([], [], "^", color="gray", mfc="none", label="lower bound")
        ax.plot([], [], ":", color="gray", label="fit: $1 + k N^\\beta / D_F^{1-\\alpha}$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning data $D_F$ (Python bytes)")
        ax.set_title(f"pretrained on {src}", fontsize=10)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("$(D_F + D_T) / D_F$")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
