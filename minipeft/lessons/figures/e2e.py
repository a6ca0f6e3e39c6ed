"""E2E lesson's figures: BLEU against trainable parameters beside the course's, BLEU against rank.

Each function takes data the lesson computed and returns a matplotlib Figure.
"""
from __future__ import annotations

import math

from .common import plt


def e2e_method_table(ours: dict, course: dict, base_name: str = "minipeft", title: str = ""):
    """BLEU against trainable parameters: minipeft's methods ({label: (params, BLEU)}) beside the course's."""
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for ax, (name, pts) in zip(axes, ((base_name, ours), ("course: GPT-2 Medium", course))):
        ax.grid(True, alpha=0.3, which="both")
        xs, ys = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
        ax.scatter(xs, ys, s=40, zorder=3, color="tab:blue" if pts is ours else "tab:orange")
        span, right = (max(ys) - min(ys)) or 1.0, max(xs)
        for lab, (x, y) in pts.items():  # labels run right of their point, the rightmost one's left of it
            dy = -11 if _crowded_above(x, y, pts, span) else 4
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(-4 if x == right else 4, dy), fontsize=7.5,
                        ha="right" if x == right else "left")
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


def _crowded_above(x, y, pts: dict, span: float) -> bool:
    """True if another point sits just above (x, y), where the label of (x, y) would run into it or into its
    label (within 15% of the BLEU range above, 0.45 decades to the left or 1.3 decades, about a label's
    length, to the right): that label then goes below its point."""
    def near(x2):
        d = math.log10(x2) - math.log10(x)
        return -0.45 < d < 1.3
    return any(0 <= y2 - y < 0.15 * span and near(x2) for x2, y2 in pts.values() if (x2, y2) != (x, y))


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
