"""Claims of Scaling Laws for Transfer (Hernandez et al. 2021, arXiv 2102.01293), as the notes state them.

Read from the transfer lesson's result (or its saved ``figures/transfer_data.json``):
``fits.<source>.{k, alpha, beta, alpha_err, beta_err}``, ``points[*].{D_F, multiplier, flag,
source, size, N}`` and ``ossification[*].{size, N, ossified.<source>}``.
"""
from __future__ import annotations

from ._util import fmt, num, ratio
from .core import SEED_FZENG, Claim, Measurement
from .results import Missing
from .rules import Rule, at_least

TEXT = "english"  # minipeft's stand-in for the paper's text source
MIX = "english+c"  # and for its 50% text + 50% non-Python code source
DIFFERS = ("minipeft's bases (N <= 4.7M, under 2 MB of English that is the standard library's own docs) and "
           "byte tokens are far from the paper's 40M+ models pretrained on 24B characters of web text; see the "
           "transfer lesson's docstring.")


def _first_source(r) -> str:
    if r.has("transfer", "fits", TEXT):
        return TEXT
    fits = r.get("transfer", "fits")
    if not fits:
        raise Missing("the transfer run has no fit")
    return next(iter(fits))


def _fit(r, src: str, keys=("k", "alpha", "beta", "alpha_err", "beta_err")) -> dict:
    return {k: r.get("transfer", "fits", src, k) for k in keys}


def _power_law(r) -> Measurement:
    src = _first_source(r)
    f = _fit(r, src)
    a, b, sa, sb = (num(f[k], k) for k in ("alpha", "beta", "alpha_err", "beta_err"))
    z = min(a / sa, (1 - a) / sa, b / sb) if sa > 0 and sb > 0 else float("nan")
    return Measurement(z, f"{src} -> Python: k {fmt(f['k'])}, alpha {a:.3f} ± {sa:.3f}, beta {b:.3f} ± {sb:.3f}",
                       relation_text=f"weakest of alpha/σ, (1-alpha)/σ, beta/σ = {z:.2f}")


def _beta_2alpha(r) -> Measurement:
    src = _first_source(r)
    f = _fit(r, src, ("alpha", "beta"))
    q = ratio(f["beta"], f["alpha"], "beta/alpha")
    return Measurement(q, f"alpha {num(f['alpha']):.3f}, beta {num(f['beta']):.3f}", relation_text=f"beta/alpha = {q:.2f}")


def _points(r, src: str) -> list[dict]:
    pts = [p for p in r.get("transfer", "points") if p.get("source") == src and p.get("flag") == "ok"]
    if not pts:
        raise Missing(f"the transfer run has no measured points for source {src!r}")
    return pts


def _low_data_multiplier(r) -> Measurement:
    src = _first_source(r)
    pts = _points(r, src)
    n_max = max(num(p["N"]) for p in pts)
    big = [p for p in pts if num(p["N"]) == n_max]
    p = min(big, key=lambda p: num(p["D_F"]))
    m = num(p["multiplier"], "multiplier")
    return Measurement(m, f"{p['size']} (N {fmt(n_max)}) at D_F {fmt(p['D_F'])} bytes: D_E/D_F {m:.1f}",
                       relation_text=f"multiplier = {m:.1f}")


def _multiplier_falls(r) -> Measurement:
    src = _first_source(r)
    series: dict[str, list] = {}
    for s in r.get("transfer", "fits"):
        for p in (p for p in r.get("transfer", "points") if p.get("source") == s and p.get("flag") == "ok"):
            series.setdefault(f"{s}/{p['size']}", []).append((num(p["D_F"]), num(p["multiplier"])))
    series = {k: sorted(v) for k, v in series.items() if len(v) >= 2}
    if not series:
        raise Missing(f"the transfer run has no series of two or more D_F (source {src!r})")
    falls = sum(v[-1][1] < v[0][1] for v in series.values())
    frac = falls / len(series)
    return Measurement(frac, f"falls from the smallest to the largest D_F in {falls} of {len(series)} "
                             "(source, size) series", relation_text=f"share = {frac:.2f}")


def _closer_source(r) -> Measurement:
    fits = r.get("transfer", "fits")
    if TEXT not in fits or MIX not in fits:
        raise Missing(f"the transfer run lacks a fit for both sources {TEXT!r} and {MIX!r}")
    t, m = _fit(r, TEXT, ("k", "alpha")), _fit(r, MIX, ("k", "alpha"))
    smaller_alpha = num(m["alpha"]) < num(t["alpha"])
    larger_k = num(m["k"]) > num(t["k"])
    n = int(smaller_alpha) + int(larger_k)
    return Measurement(n, f"{MIX}: alpha {num(m['alpha']):.3f}, k {fmt(m['k'])}; {TEXT}: alpha "
                          f"{num(t['alpha']):.3f}, k {fmt(t['k'])}",
                       relation_text=f"{n} of 2 (smaller alpha: {'yes' if smaller_alpha else 'no'}, "
                                     f"larger k: {'yes' if larger_k else 'no'})")


def _ossification(r) -> Measurement:
    rows = r.get("transfer", "ossification")
    if not rows:
        raise Missing("the transfer run has no ossification rows")
    smallest = min(rows, key=lambda o: num(o["N"]))
    oss = smallest.get("ossified", {})
    src = _first_source(r)
    if oss.get(src):
        level, how = 2, f"ossifies fine-tuned from {src}"
    elif any(oss.values()):
        level, how = 1, f"ossifies only fine-tuned from {', '.join(s for s, v in oss.items() if v)}"
    else:
        level, how = 0, "does not ossify"
    larger = [o["size"] for o in rows if o is not smallest and any(o.get("ossified", {}).values())]
    return Measurement(level, f"smallest model {smallest['size']} (N {fmt(smallest['N'])}) at D_F "
                              f"{fmt(smallest['D_F'])}: {how}; larger models ossified: {', '.join(larger) or 'none'}",
                       relation_text=f"level {level} (2: from the text source, 1: another source only, 0: none)")


CLAIMS = [
    Claim("transfer-power-law",
          "Effective data transferred follows a power law in fine-tuning data and model size: D_T = k D_F^alpha N^beta",
          SEED_FZENG, "text -> Python: k 1.9e4, alpha 0.18, beta 0.38", None, "transfer", _power_law,
          Rule("min(alpha/σ_alpha, (1-alpha)/σ_alpha, beta/σ_beta) of the fit", at_least(1), at_least(0)),
          DIFFERS),
    Claim("transfer-beta-2alpha",
          "beta ≈ 2 alpha: 100x more fine-tuning data gives the same improvement as a 10x larger model",
          SEED_FZENG, "beta/alpha = 0.38/0.18 = 2.1", 0.38 / 0.18, "transfer", _beta_2alpha,
          Rule("beta/alpha", (1.5, 3.0), (1.0, 6.0)),
          "alpha comes out small here: the bases already predict Python zero-shot, so D_T hardly grows with D_F "
          "(the lesson's docstring). " + DIFFERS),
    Claim("transfer-low-data-multiplier",
          "In the low-data regime pre-training is worth far more data than it is given "
          "(a 40M model at 3e5 characters matches from-scratch training on ~1000x more)",
          SEED_FZENG, "D_E/D_F ≈ 1000 (40M model, D_F = 3e5 characters)", 1000, "transfer", _low_data_multiplier,
          Rule("effective data multiplier D_E/D_F of the largest model at the smallest D_F", at_least(100),
               at_least(1.01)),
          DIFFERS),
    Claim("transfer-multiplier-falls",
          "As the fine-tuning data D_F grows, the effective data multiplier (D_F + D_T)/D_F decreases",
          SEED_FZENG, "the multiplier decreases with D_F", 1.0, "transfer", _multiplier_falls,
          Rule("share of (source, size) series whose multiplier falls from the smallest to the largest D_F",
               at_least(1.0), at_least(0.5)), DIFFERS),
    Claim("transfer-closer-source",
          "alpha measures how close the source is to the target: 50% text + 50% code (closer to Python) has a "
          "smaller alpha and a larger k than text alone",
          SEED_FZENG, "text+code: alpha 0.096, k 2.1e5; text: alpha 0.18, k 1.9e4", 2, "transfer", _closer_source,
          Rule("conditions met of {smaller alpha, larger k} for the text+code source", at_least(2), at_least(1)),
          "minipeft's 'English' is the standard library's own docstrings and help, closer to Python than the C "
          "headers that make up half of the mixed source, and the mix holds half as much of it; so the mixed "
          "source is not the closer one here."),
    Claim("transfer-ossification",
          "Pre-training can hurt small models: with much fine-tuning data a small pre-trained model ends worse than "
          "one trained from scratch (ossification)",
          SEED_FZENG, "small (1M) models fine-tuned from text lose to scratch at large D_F", 2, "transfer",
          _ossification,
          Rule("ossification level of the smallest model (2: from text, 1: other source only, 0: none)",
               at_least(2), at_least(1)), DIFFERS),
]
