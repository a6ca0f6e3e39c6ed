"""Figure functions: each takes data a lesson computed and returns a matplotlib Figure.

Lessons call these and save the result with ``lessons._common.save_figure``;
``python -m minipeft.figures`` regenerates every committed figure in ``figures/``.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() == "agg" else None
import matplotlib.pyplot as plt  # noqa: E402


def _new(figsize=(6.4, 4.0)):
    fig, ax = plt.subplots(figsize=figsize)
    ax.grid(True, alpha=0.3)
    return fig, ax


# ------------------------------------------------------------------ pretraining


def loss_curves(curves: dict, hlines: dict | None = None, title: str = "", xlabel: str = "optimizer step",
                ylabel: str = "cross-entropy (nats/token)", logx: bool = False):
    """One line per name in ``curves`` ({name: (steps, losses)}); dashed reference levels in ``hlines``."""
    fig, ax = _new()
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


# ------------------------------------------------------------------------ memory

MEMORY_CATEGORIES = ("weights_trainable", "weights_frozen", "quant_constants", "gradients", "optimizer_state",
                     "activations")


def memory_breakdown(measured: dict, predicted: dict | None = None, title: str = "", unit: float = 1e6,
                     unit_name: str = "MB"):
    """Stacked bars of bytes by category per method ({method: {category: bytes}}).

    With ``predicted`` (same shape), a black tick marks each method's predicted total.
    """
    import numpy as np

    fig, ax = _new((7.0, 4.2))
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


# ------------------------------------------------------------------ quantization


def int8_code_histograms(codes: dict, title: str = ""):
    """How often each int8 code (-128..127) is used, one step line per method ({name: int codes})."""
    import numpy as np

    fig, ax = _new((6.4, 3.6))
    edges = np.arange(-128, 129)
    for name, q in codes.items():
        counts = np.bincount(np.asarray(q, dtype=np.int64).ravel() + 128, minlength=256)
        used = int((counts > 0).sum())
        ax.stairs(counts, edges, label=f"{name} ({used} of 256 codes used)", lw=1.2, fill=False)
    ax.set_yscale("log")
    ax.set_xlim(-130, 130)
    ax.set_xlabel("int8 code")
    ax.set_ylabel("values per code")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def blockwise_outlier_errors(errors: dict, outlier_block: int, blocksize: int, title: str = ""):
    """Mean |error| of each block ({name: per-block errors}); the block holding the outlier is marked."""
    import numpy as np

    fig, ax = _new((6.4, 3.6))
    for name, e in errors.items():
        e = np.asarray(e, dtype=float)
        ax.plot(np.arange(e.size), e, marker="o", ms=2.5, lw=1.0, label=name)
    ax.axvline(outlier_block, color="gray", ls="--", lw=1)
    ax.annotate("block with the outlier", (outlier_block, 1.0), xycoords=("data", "axes fraction"),
                xytext=(4, -4), textcoords="offset points", va="top", fontsize=8, color="gray",
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.8))
    ax.set_yscale("log")
    ax.set_xlabel(f"block of {blocksize} values")
    ax.set_ylabel("mean |x - dequant(quant(x))|")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    return fig


def four_bit_codes(codes: dict, sweep: dict, reference: dict | None = None, title: str = ""):
    """Left: the 16 values of each 4-bit code over the N(0,1) density (scaled to a block's absmax).
    Right: mean |error| on N(0,1) data against block size ({name: (blocksizes, errors)}); ``reference``
    (same shape) is drawn as open markers (bitsandbytes' measured means)."""
    import numpy as np

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11.0, 4.0), gridspec_kw={"width_ratios": [1, 1.15]})
    for ax in (a0, a1):
        ax.grid(True, alpha=0.3)
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(codes)}
    t = np.linspace(-1, 1, 400)
    a0.fill_between(t, 0, np.exp(-0.5 * (t * 2.7) ** 2) * (len(codes) + 0.6), color="0.9", label="N(0,1) / 2.7")
    for i, (name, vals) in enumerate(codes.items()):
        v = np.unique(np.asarray(vals, dtype=float))
        a0.scatter(v, np.full(v.size, len(codes) - i), color=colors[name], s=22, zorder=3)
        a0.text(-1.02, len(codes) - i, name, ha="right", va="center", fontsize=9, color=colors[name])
    a0.set_yticks([])
    a0.set_xlim(-1.3, 1.08)
    a0.set_ylim(0.3, len(codes) + 0.7)
    a0.set_xlabel("code value (fraction of the block absmax)")
    a0.set_title("the 16 values of each code")
    for name, (bs, err) in sweep.items():
        a1.plot(bs, err, marker="o", ms=4, lw=1.5, color=colors.get(name), label=f"{name} (minipeft)")
    for name, (bs, err) in (reference or {}).items():
        a1.plot(bs, err, ls="none", marker="o", ms=9, mfc="none", color=colors.get(name),
                label=f"{name} (bitsandbytes)")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("block size")
    a1.set_ylabel("mean |error| on N(0,1) values")
    a1.set_title("error against block size")
    a1.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def scale_overhead(blocksizes, plain_bits, dq_bits, highlight: int = 64, title: str = ""):
    """Bits per parameter spent on block scales: float32 scales against double quantization."""
    import numpy as np

    fig, ax = _new((6.4, 3.8))
    bs = np.asarray(blocksizes)
    ax.plot(bs, plain_bits, marker="o", label="float32 absmax per block")
    ax.plot(bs, dq_bits, marker="s", label="double quantization (8-bit absmax, blocks of 256)")
    i = int(np.nonzero(bs == highlight)[0][0])
    for y in (plain_bits[i], dq_bits[i]):
        ax.annotate(f"{y:.3f} bits at block {highlight}", (highlight, y), xytext=(12, 8),
                    textcoords="offset points", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("block size")
    ax.set_ylabel("scale overhead (bits per parameter)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def float_rounding_error(magnitudes, rel_errors: dict, ranges: dict | None = None, title: str = ""):
    """Relative error of rounding float32 values of each magnitude to a 16-bit format (log-log).

    ``rel_errors``: {format: errors, capped at 1 where the value is lost to overflow or zero};
    ``ranges``: {format: (smallest normal, largest finite)} drawn as dotted lines.
    """
    fig, ax = _new((7.0, 4.0))
    colors = {}
    for name, e in rel_errors.items():
        (line,) = ax.plot(magnitudes, e, lw=1.3, label=name)
        colors[name] = line.get_color()
    for name, (lo, hi) in (ranges or {}).items():
        for v in (lo, hi):
            ax.axvline(v, color=colors.get(name, "gray"), ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1e-5, 2)
    ax.set_xlabel("|x| (dotted: smallest normal and largest finite value)")
    ax.set_ylabel("relative rounding error (1 = value lost)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def outlier_features(panels: dict, threshold: float = 6.0, title: str = ""):
    """Largest |x| of each hidden dimension, one panel per activation ({title: max_abs per dim})."""
    import numpy as np

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, m) in zip(axes[0], panels.items()):
        m = np.asarray(m, dtype=float)
        hot = m >= threshold
        ax.bar(np.arange(m.size), m, width=1.0, color=np.where(hot, "tab:red", "tab:blue"))
        ax.scatter(np.nonzero(hot)[0], m[hot], color="tab:red", s=14, zorder=3)
        ax.set_ylim(0, max(float(m.max()), threshold) * 1.12)
        ax.axhline(threshold, color="gray", ls="--", lw=1)
        ax.text(m.size - 1, threshold, f"|x| = {threshold:g} ", va="bottom", ha="right", fontsize=8, color="gray")
        ax.set_xlabel("hidden dimension")
        ax.set_ylabel("max |x| over tokens")
        ax.set_title(f"{name}\n{int(hot.sum())} outlier dimensions", fontsize=10)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def labeled_bars(values: dict, xlabel: str = "", title: str = "", log: bool = False, fmt: str = "{:.3g}",
                 reference: float | None = None, reference_label: str = ""):
    """Horizontal bars, one per label ({label: value}), the value written at each bar's end."""
    import numpy as np

    names = list(values)
    fig, ax = _new((7.0, 0.45 * len(names) + 1.4))
    v = np.array([values[n] for n in names], dtype=float)
    y = np.arange(len(names))[::-1]
    ax.barh(y, v, color=plt.get_cmap("tab10")(0), height=0.6)
    for yi, vi in zip(y, v):
        ax.text(vi, yi, " " + fmt.format(vi), va="center", fontsize=8)
    if reference is not None:
        ax.axvline(reference, color="gray", ls="--", lw=1)
        ax.text(reference, y[0] + 0.45, f" {reference_label}", fontsize=8, color="gray", va="bottom")
    ax.set_yticks(y, names)
    if log:
        ax.set_xscale("log")
    lo = v[v > 0].min() if log and (v > 0).any() else 0.0
    ax.set_xlim(lo / 2 if log else 0, v.max() * (3.0 if log else 1.18))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def quantized_model_summary(losses: dict, sizes: dict, reference: str, title: str = ""):
    """Validation loss and model size of each variant ({name: loss}, {name: bytes}) side by side."""
    import numpy as np

    names = list(losses)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11.0, 0.45 * len(names) + 1.6), sharey=True)
    y = np.arange(len(names))[::-1]
    ref = losses[reference]
    lv = np.array([losses[n] for n in names])
    a0.barh(y, lv - ref, color=np.where(lv - ref > 0, "tab:red", "tab:green"), height=0.6)
    for yi, n in zip(y, names):
        a0.text(losses[n] - ref, yi, f" {losses[n]:.4f}", va="center", fontsize=8)
    a0.axvline(0, color="black", lw=0.8)
    span = max(float(np.abs(lv - ref).max()), 1e-6)
    a0.set_xlim(-0.1 * span, 1.35 * span)
    a0.set_yticks(y, names)
    a0.set_xlabel(f"validation loss - {reference} (nats/token)")
    kib = np.array([sizes[n] for n in names]) / 1024
    a1.barh(y, kib, color="tab:blue", height=0.6)
    for yi, k in zip(y, kib):
        a1.text(k, yi, f" {k:,.0f} KiB", va="center", fontsize=8)
    a1.set_xlim(0, kib.max() * 1.25)
    a1.set_xlabel("bytes the model holds (KiB)")
    for ax in (a0, a1):
        ax.grid(True, alpha=0.3, axis="x")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- lora


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


# ---- peft_methods

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


# ---- side_tuning

SIDE_MEMORY_PARTS = (("weights", "weights (incl. 4-bit constants)"), ("gradients", "gradients"),
                     ("optimizer_state", "optimizer state"), ("saved", "activations saved (ledger)"),
                     ("held", "backbone states held"))


def side_tuning_memory(batch_sweep: dict, seq_sweep: dict, breakdown: dict, curves: dict, base_loss=None,
                       seq_len: int | None = None, seq_batch: int | None = None, title: str = "", unit: float = 1e6):
    """Side tuning against (Q)LoRA in four panels.

    Top: activation bytes (saved + held) per method against the batch size (``batch_sweep``
    {method: (batch sizes, bytes)}) and the sequence length (``seq_sweep``, same form).
    Bottom left: one step's memory by category at the largest batch (``breakdown``
    {method: {category: bytes}}, categories of ``SIDE_MEMORY_PARTS``). Bottom right:
    validation loss during training (``curves`` {method: (steps, losses)}), the base dashed.
    """
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(2, 2, figsize=(11.5, 8.0))
    (a0, a1), (a2, a3) = axes
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    styles = {"qst": dict(lw=2.5, color="tab:red"), "lst": dict(color="tab:orange"),
              "qlora": dict(lw=2.0, color="tab:blue"), "lora": dict(color="tab:cyan"), "full": dict(color="black")}
    for ax, sweep, xlabel in ((a0, batch_sweep, "batch size (sequences)"), (a1, seq_sweep, "sequence length (tokens)")):
        for m, (xs, ys) in sweep.items():
            ax.plot(xs, np.asarray(ys, float) / unit, "o-", label=m, **styles.get(m, {}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("activations for backward (MB)")
        ax.legend(fontsize=8)
    if "qlora" in batch_sweep and "qst" in batch_sweep:  # the ratio at the largest batch
        (xs, q), (_, s) = batch_sweep["qlora"], batch_sweep["qst"]
        a0.text(0.97, 0.04, f"at batch {xs[-1]}: QLoRA / QST = {q[-1] / s[-1]:.2f}x", transform=a0.transAxes,
                ha="right", va="bottom", fontsize=9)
    a0.set_title(f"as the batch grows ({seq_len} tokens each)" if seq_len else "as the batch grows", fontsize=10)
    a1.set_title(f"as the sequence grows (batch {seq_batch})" if seq_batch else "as the sequence grows", fontsize=10)
    names = list(breakdown)
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    colors = plt.get_cmap("tab10")
    for i, (key, label) in enumerate(SIDE_MEMORY_PARTS):
        vals = np.array([breakdown[n].get(key, 0) for n in names], float) / unit
        a2.bar(x, vals, bottom=bottom, label=label, color=colors(i), width=0.6)
        bottom += vals
    for xi, tot in zip(x, bottom):
        a2.text(xi, tot, f"{tot:.1f}", ha="center", va="bottom", fontsize=8)
    a2.set_xticks(x, names)
    a2.set_ylabel("MB")
    a2.set_title("one training step at the largest batch, by category", fontsize=10)
    a2.legend(fontsize=7, loc="upper right")
    for m, (steps, losses) in curves.items():
        a3.plot(steps, losses, label=m, **styles.get(m, {}))
    if base_loss is not None:
        a3.axhline(base_loss, ls="--", lw=1, color="gray", label="base model")
        high = {m: c[1][0] for m, c in curves.items() if c[1][0] > base_loss + 0.3}
        if high:  # a method that does not start at the base (LST): keep the axis on the others
            lo = min(min(c[1]) for c in curves.values())
            a3.set_ylim(lo - 0.05, base_loss + 0.3)
            a3.text(0.02, 0.97, ", ".join(f"{m} starts at {v:.2f}" for m, v in high.items()) + " (off the axis)",
                    transform=a3.transAxes, va="top", fontsize=8)
    a3.set_xlabel("optimizer step")
    a3.set_ylabel("validation loss (nats/token)")
    a3.set_title("adapting to Python code", fontsize=10)
    a3.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- serving


def serving_throughput(ns, throughput: dict, base_tps: float, latency: dict, base_latency_ms: float,
                       title: str = ""):
    """Decode tokens/s (left) and mean request latency (right) against the number of adapters N.

    ``throughput`` / ``latency``: {method: [value per N]} (a method may stop before the last N);
    the base model alone is a dashed line on both panels.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.0))
    for ax, data, ref, ylabel in ((axes[0], throughput, base_tps, "decode tokens / s"),
                                  (axes[1], latency, base_latency_ms, "mean request latency (ms)")):
        ax.grid(True, alpha=0.3)
        for k, (name, vals) in enumerate(data.items()):
            if len(vals):
                ax.plot(ns[: len(vals)], vals, "o-", lw=1.6, color=f"C{k}", label=name)
        ax.axhline(ref, ls="--", color="gray", lw=1.2, label="(a) base model alone")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("adapters N in the batch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[0].set_title("throughput", fontsize=10)
    axes[1].set_title("latency (prefill and weight swaps included)", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def serving_memory(ns, series: dict, title: str = "", unit: float = 2**20, unit_name: str = "MiB"):
    """Bytes against the number of adapters N (log-log), one line per way of serving ({label: [bytes per N]})."""
    fig, ax = _new()
    for k, (name, vals) in enumerate(series.items()):
        style = "s--" if "merged" in name else "o-"
        ax.plot(ns, [v / unit for v in vals], style, lw=1.6, color=f"C{k}", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("adapters N")
    ax.set_ylabel(f"memory ({unit_name})")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---- transfer


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

    One panel per source. ``points``: rows of ``minipeft.transfer.analyze`` (D_F, D_T, N, size,
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


# ---- e2e


def e2e_method_table(ours: dict, course: dict, base_name: str = "minipeft", title: str = ""):
    """BLEU against trainable parameters: minipeft's methods ({label: (params, BLEU)}) beside the course's."""
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for ax, (name, pts) in zip(axes, ((base_name, ours), ("course: GPT-2 Medium", course))):
        ax.grid(True, alpha=0.3, which="both")
        xs, ys = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
        ax.scatter(xs, ys, s=40, zorder=3, color="tab:blue" if pts is ours else "tab:orange")
        for i, (lab, (x, y)) in enumerate(pts.items()):
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4 if i % 2 == 0 else -11), fontsize=7.5)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("BLEU (x100)")
        ax.set_title(name, fontsize=10)
        lo, hi = min(ys), max(ys)
        pad = max(0.5, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, hi + 2 * pad)
    fig.suptitle(title or "E2E: BLEU against trainable parameters")
    fig.tight_layout()
    return fig


def e2e_rank_curves(ours: dict, course: dict, title: str = ""):
    """LoRA rank against validation loss and BLEU: minipeft ({r: (val loss, BLEU)}) and the course (right axes)."""
    ranks = sorted(ours)
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.0))
    for i, (ax, what) in enumerate(zip(axes, ("validation loss (nats/byte)", "BLEU (x100)"))):
        ax.grid(True, alpha=0.3)
        ys = [ours[r][i] for r in ranks]
        ax.plot(ranks, ys, "o-", color="tab:blue", label="minipeft")
        missing = [r for r, y in zip(ranks, ys) if not math.isfinite(y)]
        if missing:  # e.g. the GPU run scores the rank sweep by validation loss only
            ax.text(0.02, 0.02, f"minipeft measured only at r = {', '.join(str(r) for r in ranks if r not in missing)}",
                    transform=ax.transAxes, fontsize=8, color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel(f"minipeft {what}", color="tab:blue")
        cr = [r for r in ranks if r in course]
        twin = ax.twinx()
        twin.plot(cr, [course[r][i] for r in cr], "s--", color="tab:orange", label="course (GPT-2 M)")
        twin.set_ylabel(f"course {what.replace('nats/byte', 'per token')}", color="tab:orange")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="best")
    fig.suptitle(title or "E2E: LoRA rank")
    fig.tight_layout()
    return fig
