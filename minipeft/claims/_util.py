"""Small arithmetic shared by the claim catalogs (no claim logic here)."""
from __future__ import annotations

import math

from .results import Missing


def num(x, what: str = "value") -> float:
    """``x`` as a finite float, else Missing (a recorded NaN or a non-number cannot be judged)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise Missing(f"{what} is not a number ({x!r})") from None
    if not math.isfinite(v):
        raise Missing(f"{what} is not finite ({v}): the recorded run diverged or did not measure it")
    return v


def ratio(a, b, what: str = "ratio") -> float:
    a, b = num(a, what), num(b, what)
    if b == 0:
        raise Missing(f"{what}: the denominator is 0")
    return a / b


def worst_ratio(pairs) -> float:
    """max over (ours, course) of max(ours/course, course/ours): 1 when every pair agrees exactly."""
    out = 1.0
    for ours, course in pairs:
        r = ratio(ours, course)
        if r <= 0:
            raise Missing(f"cannot compare {ours} with {course}: signs differ")
        out = max(out, r, 1 / r)
    return out


def plateau_rank(losses: dict) -> int:
    """The smallest rank r such that every rank >= r has a loss within 2% of the best loss."""
    if not losses:
        raise Missing("no ranks recorded")
    items = sorted((int(r), num(v, f"loss at r={r}")) for r, v in losses.items())
    best = min(v for _, v in items)
    plateau = items[-1][0]
    for r, v in reversed(items):
        if v > 1.02 * best:
            break
        plateau = r
    return plateau


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    x = float(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}g}" if abs(x) < 100 else f"{x:,.0f}"
