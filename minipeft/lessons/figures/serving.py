"""Serving lesson's figures: throughput and latency against the number of adapters, memory.

Each function takes data the lesson computed and returns a matplotlib Figure.
"""
from __future__ import annotations

from .common import new_axes, plt


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
    fig, ax = new_axes()
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
