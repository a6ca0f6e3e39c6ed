"""Scaling laws for transfer (Hernandez et al. 2021, arXiv 2102.01293): D_T and its power law.

The runs (``transfer_runs.py``) give, for each model size of N non-embedding parameters, a
loss-vs-data curve from scratch and one fine-tuned from each source. The **effective data
transferred** D_T is the extra Python a from-scratch model of the same size would need to
reach the fine-tuned loss (methods.md §16.1, §16.3):

    D_E = L_scratch^{-1}(N, L_ft(N, D_F))      read off the scratch loss-vs-data curve
    D_T = D_E - D_F

and in the low-data regime it follows a power law in D_F and N (eq. 1.1; §16.2):

    D_T = k (D_F)^alpha (N)^beta,    log D_T = log k + alpha log D_F + beta log N,

so the effective data multiplier (eq. 1.2) is (D_F + D_T)/D_F = 1 + k N^beta / D_F^(1 - alpha).
Where the fine-tuned model ends *worse* than scratch, D_T < 0: "ossification" (§3.1).
"""
from __future__ import annotations

import math

import numpy as np

# Hernandez et al. 2021, Table 1 / Fig. 2 (methods.md §16.2): source -> Python
PAPER_FITS = {"english": {"k": 1.9e4, "alpha": 0.18, "beta": 0.38},
              "english+c": {"k": 2.1e5, "alpha": 0.096, "beta": 0.38}}


# ---- measuring D_T ------------------------------------------------------------------------------
def isotonic_decreasing(y) -> np.ndarray:
    """The closest non-increasing sequence to ``y`` in least squares (pool adjacent violators).

    A scratch model given more data should never end worse; where noise says otherwise,
    neighbouring points are pooled to their mean.
    """
    y = np.asarray(y, dtype=np.float64)
    blocks: list[list[float]] = []  # [mean, count]
    for v in y:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:  # an increase: pool
            (m2, c2), (m1, c1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.concatenate([np.full(int(c), m) for m, c in blocks]) if blocks else y


def data_for_loss(D, L, target: float) -> tuple[float, str]:
    """Invert a scratch curve: the data ``D_E`` at which loss ``L(D)`` falls to ``target``.

    ``log L`` is made non-increasing (``isotonic_decreasing``) and interpolated linearly in
    ``log D`` (exact for a pure power law). Returns ``(D_E, flag)``: ``'ok'``; ``'above_range'``
    when even the largest D does worse than ``target`` (``D_E`` is then a lower bound, the
    largest D); ``'below_range'`` when the smallest D already does better (an upper bound,
    the smallest D).
    """
    D, L = np.asarray(D, dtype=np.float64), np.asarray(L, dtype=np.float64)
    if D.ndim != 1 or D.shape != L.shape or D.size < 2:
        raise ValueError(f"D and L must be 1-D of the same length >= 2, got shapes {D.shape} and {L.shape}")
    if not (np.all(D > 0) and np.all(L > 0) and np.all(np.isfinite(L)) and np.all(np.diff(D) > 0)):
        raise ValueError("D must be positive and strictly increasing, L positive and finite; sort the curve by D")
    if not (np.isfinite(target) and target > 0):
        raise ValueError(f"target loss must be positive and finite, got {target!r}")
    logD, logL, lt = np.log(D), isotonic_decreasing(np.log(L)), math.log(target)
    if lt > logL[0]:
        return float(D[0]), "below_range"
    i = int(np.argmax(logL <= lt)) if np.any(logL <= lt) else -1
    if i < 0:
        return float(D[-1]), "above_range"
    if i == 0:
        return float(D[0]), "ok"
    t = (logL[i - 1] - lt) / (logL[i - 1] - logL[i])  # in (0, 1]: the crossing between D[i-1] and D[i]
    return float(math.exp(logD[i - 1] + t * (logD[i] - logD[i - 1]))), "ok"


def saturation_data(D, L, tolerance: float = 0.01) -> tuple[float, bool]:
    """D(N): the least D whose loss is within ``tolerance`` of the curve's best (§16.2's 99% rule).

    The best loss of the grid stands in for L(D -> inf); returns ``(D(N), is_lower_bound)``,
    a lower bound when only the last point qualifies (the curve may still be falling).
    """
    env = np.exp(isotonic_decreasing(np.log(np.asarray(L, dtype=np.float64))))
    i = int(np.argmax(env <= env[-1] * (1 + tolerance)))
    return float(D[i]), i == len(D) - 1


def effective_data_transferred(scratch: dict, finetune: dict) -> list[dict]:
    """D_E, D_T and the multiplier of each fine-tuned point, read off the scratch curve.

    ``scratch``: {D: loss} from scratch; ``finetune``: {D_F: loss} fine-tuned (same size).
    Each row: D_F, loss, D_E, D_T = D_E - D_F, multiplier D_E / D_F, flag ('ok', 'negative' when
    D_T <= 0, 'above_range' / 'below_range' when the loss lies outside the scratch curve).
    """
    D = np.array(sorted(scratch), dtype=np.float64)
    L = np.array([scratch[d] for d in sorted(scratch)])
    rows = []
    for DF in sorted(finetune):
        D_E, flag = data_for_loss(D, L, finetune[DF])
        D_T = D_E - DF
        if flag == "ok" and D_T <= 0:
            flag = "negative"
        rows.append({"D_F": float(DF), "loss": float(finetune[DF]), "D_E": D_E, "D_T": D_T,
                     "multiplier": D_E / DF, "flag": flag})
    return rows


def fit_transfer(D_F, N, D_T) -> dict:
    """Least squares of ``log D_T = log k + alpha log D_F + beta log N`` (scipy curve_fit).

    Returns k, alpha, beta, their standard errors (from the covariance; NaN without spare
    degrees of freedom), ``log10_k`` and its error, the residual RMS in log10 and the point
    count. With one model size beta cannot be fit: it is NaN and only k, alpha are fit.
    """
    from scipy.optimize import curve_fit

    with np.errstate(invalid="ignore", divide="ignore"):  # non-positive values are reported below
        x1, x2, y = (np.log(np.asarray(a, dtype=np.float64)) for a in (D_F, N, D_T))
    if not (x1.shape == x2.shape == y.shape) or x1.ndim != 1:
        raise ValueError("D_F, N and D_T must be 1-D arrays of the same length")
    if not np.all(np.isfinite(np.concatenate([x1, x2, y]))):
        raise ValueError("D_F, N and D_T must all be positive (drop points with D_T <= 0 before fitting)")
    one_n = np.unique(x2).size < 2
    n_par = 2 if one_n else 3
    nan = float("nan")
    if y.size < n_par or np.unique(x1).size < 2:
        return {"k": nan, "alpha": nan, "beta": nan, "k_err_factor": nan, "alpha_err": nan, "beta_err": nan,
                "log10_k": nan, "log10_k_err": nan, "rms_log10": nan, "points": int(y.size)}
    if one_n:
        f = lambda X, logk, a: logk + a * X[0]  # noqa: E731
    else:
        f = lambda X, logk, a, b: logk + a * X[0] + b * X[1]  # noqa: E731
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "covariance could not be estimated" when dof = 0: reported as NaN
        popt, pcov = curve_fit(f, np.vstack([x1, x2]), y, p0=np.zeros(n_par))
    err = np.sqrt(np.diag(pcov)) if y.size > n_par and np.all(np.isfinite(pcov)) else np.full(n_par, nan)
    resid = y - f(np.vstack([x1, x2]), *popt)
    return {"k": float(math.exp(popt[0])), "alpha": float(popt[1]), "beta": nan if one_n else float(popt[2]),
            "k_err_factor": float(math.exp(err[0])), "alpha_err": float(err[1]),
            "beta_err": nan if one_n else float(err[2]), "log10_k": float(popt[0] / math.log(10)),
            "log10_k_err": float(err[0] / math.log(10)), "covariance": np.asarray(pcov).tolist(),
            "rms_log10": float(np.sqrt(np.mean(resid ** 2)) / math.log(10)), "points": int(y.size)}


def fitted_D_T(fit: dict, D_F, N) -> np.ndarray:
    """k D_F^alpha N^beta (eq. 1.1)."""
    return fit["k"] * np.asarray(D_F, dtype=np.float64) ** fit["alpha"] * float(N) ** fit["beta"]


def analyze(results: list[dict], low_data_fraction: float = 0.1) -> dict:
    """Everything the lesson reports and plots, from the run records (plain JSON types).

    Fits use the points with 0 < D_T inside the scratch curve and D_F <= low_data_fraction
    * D(N) (§16.2's low-data regime); with fewer than 4 such points, all usable points.
    """
    scratch, ft, N = {}, {}, {}
    for r in results:
        N[r["size"]] = int(r["N"])
        if r["kind"] == "scratch":
            scratch.setdefault(r["size"], {})[int(r["D"])] = float(r["loss"])
        else:
            ft.setdefault(r["source"], {}).setdefault(r["size"], {})[int(r["D"])] = float(r["loss"])
    sizes = sorted(N, key=N.get)
    sat = {s: saturation_data(sorted(scratch[s]), [scratch[s][d] for d in sorted(scratch[s])])
           for s in sizes if len(scratch.get(s, {})) >= 2}
    points, fits = [], {}
    for src, by_size in ft.items():
        for s in sizes:
            if s not in by_size or s not in sat:
                continue
            for row in effective_data_transferred(scratch[s], by_size[s]):
                row.update(source=src, size=s, N=N[s], D_N=sat[s][0],
                           low_data=row["D_F"] <= low_data_fraction * sat[s][0])
                row["scratch_loss_same_D"] = scratch[s].get(int(row["D_F"]))
                points.append(row)
        usable = [p for p in points if p["source"] == src and p["flag"] == "ok"]
        low = [p for p in usable if p["low_data"]]
        chosen, on = (low, "low-data points") if len(low) >= 4 else (usable, "all in-range points with D_T > 0")
        fit = fit_transfer([p["D_F"] for p in chosen], [p["N"] for p in chosen], [p["D_T"] for p in chosen]) \
            if chosen else fit_transfer([], [], [])
        for p in points:
            if p["source"] == src:
                p["in_fit"] = p in chosen
        fits[src] = {**fit, "fit_on": on, "paper": PAPER_FITS.get(src)}
    oss = []
    for s in sizes:
        common = [d for d in scratch.get(s, {}) if all(d in ft[src].get(s, {}) for src in ft)]
        if common:
            d = max(common)
            oss.append({"size": s, "N": N[s], "D_F": d, "scratch_loss": scratch[s][d],
                        **{f"finetune_loss[{src}]": ft[src][s][d] for src in ft},
                        "ossified": {src: ft[src][s][d] > scratch[s][d] for src in ft}})
    return {"sizes": {s: N[s] for s in sizes}, "D_N": {s: list(v) for s, v in sat.items()},
            "scratch": {s: sorted([d, l] for d, l in scratch.get(s, {}).items()) for s in sizes},
            "finetune": {src: {s: sorted([d, l] for d, l in v.items()) for s, v in by.items()}
                         for src, by in ft.items()},
            "points": points, "fits": fits, "ossification": oss}
