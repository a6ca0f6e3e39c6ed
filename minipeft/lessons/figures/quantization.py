"""Quantization lesson's figures: code histograms, block-wise errors, 4-bit codes, scale overhead,
float rounding, outlier features, error bars, the quantized-model summary.

Each function takes data the lesson computed and returns a matplotlib Figure.
"""
from __future__ import annotations

from .common import new_axes, plt


def int8_code_histograms(codes: dict, title: str = ""):
    """How often each int8 code (-128..127) is used, one step line per method ({name: int codes})."""
    import numpy as np

    fig, ax = new_axes((6.4, 3.6))
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

    fig, ax = new_axes((6.4, 3.6))
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

    fig, ax = new_axes((6.4, 3.8))
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
    fig, ax = new_axes((7.0, 4.0))
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
    fig, ax = new_axes((7.0, 0.45 * len(names) + 1.4))
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
