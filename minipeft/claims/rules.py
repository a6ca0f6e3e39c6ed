"""The verdict vocabulary: one rule, stated in words and applied in code, for every claim.

A claim of the course is checked by comparing one number minipeft measured or computed
(the *relation*: a ratio, a difference, a count) with the band the rule gives:

* ``reproduced``   -- the relation lies in the rule's reproduced band;
* ``partly``       -- it lies in the (wider) partly band;
* ``contradicted`` -- it lies in neither;
* ``not-attempted`` -- there is no number: the recorded run it needs is absent, or the
  claim is out of minipeft's scale (the claim's note says which).

Lessons (``minipeft.lessons._common.verdict``) and the claims table
(``minipeft.claims``) both call :func:`verdict`, so the rule lives here once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

VERDICTS = ("reproduced", "partly", "contradicted", "not-attempted")
INF = math.inf


def at_least(x: float) -> tuple[float, float]:
    """The band [x, inf)."""
    return (float(x), INF)


def at_most(x: float) -> tuple[float, float]:
    """The band (-inf, x]."""
    return (-INF, float(x))


def _band(b, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in b)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a (low, high) pair such as at_least(0.95) or (1.5, 3.0), got {b!r}") from None
    if not lo <= hi:
        raise ValueError(f"{what} band {b!r} is empty: its low end is above its high end")
    return lo, hi


def _number(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"a verdict needs a number (or None for 'not measured'), got {value!r}") from None
    return None if math.isnan(v) else v


def verdict(value, reproduced, partly=None) -> str:
    """The verdict for ``value`` under the bands ``reproduced`` and ``partly`` (inclusive).

    ``value`` None or NaN -> 'not-attempted' (nothing was measured). A band is a
    ``(low, high)`` pair; :func:`at_least` and :func:`at_most` build one-sided ones.
    ``partly`` None: no partly band (reproduced or contradicted).
    """
    lo, hi = _band(reproduced, "reproduced")
    plo, phi = _band(partly, "partly") if partly is not None else (lo, hi)
    v = _number(value)
    if v is None:
        return "not-attempted"
    if lo <= v <= hi:
        return "reproduced"
    if plo <= v <= phi:
        return "partly"
    return "contradicted"


def check_verdict(v: str) -> str:
    """``v`` if it is one of :data:`VERDICTS`, else a ValueError naming them."""
    if v not in VERDICTS:
        raise ValueError(f"unknown verdict {v!r}; expected one of {VERDICTS}")
    return v


def _fmt(x: float) -> str:
    return f"{x:g}"


def _band_text(q: str, band: tuple[float, float]) -> str:
    lo, hi = band
    if hi == INF:
        return f"{q} >= {_fmt(lo)}"
    if lo == -INF:
        return f"{q} <= {_fmt(hi)}"
    return f"{_fmt(lo)} <= {q} <= {_fmt(hi)}"


@dataclass(frozen=True)
class Rule:
    """A verdict rule: the quantity judged, and its bands. ``rule(value)`` gives the verdict; ``rule.text`` says it."""

    quantity: str  # what the relation is, in words ("LoRA BLEU / full FT BLEU")
    reproduced: tuple  # band for 'reproduced', e.g. at_least(0.95)
    partly: tuple | None = None  # band for 'partly' (None: none)

    def __post_init__(self):
        if not self.quantity:
            raise ValueError("a Rule needs the quantity it judges, in words")
        object.__setattr__(self, "reproduced", _band(self.reproduced, "reproduced"))
        if self.partly is not None:
            object.__setattr__(self, "partly", _band(self.partly, "partly"))

    def __call__(self, value) -> str:
        return verdict(value, self.reproduced, self.partly)

    @property
    def text(self) -> str:
        s = f"reproduced if {_band_text(self.quantity, self.reproduced)}"
        if self.partly is not None:
            s += f"; partly if {_band_text(self.quantity, self.partly)}"
        return s + "; else contradicted"
