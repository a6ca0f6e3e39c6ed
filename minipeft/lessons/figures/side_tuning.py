"""Side-tuning lesson's figure: memory against batch and sequence length, the breakdown, the loss curves.

Each function takes data the lesson computed and returns a matplotlib Figure.
"""
from __future__ import annotations

from .common import plt


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
