"""Section 4 of the LoRA lesson: the singular values of a fine-tuning update, and subspace similarity.

How concentrated the energy of ``dW = W_ft - W0`` is in its top singular values, against a
random matrix of the same shape and norm, and how much two updates share their top
right-singular directions: phi(i, j) of the LoRA paper (Hu et al. 2021, §7.2, eq. 4).
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy

ENERGY_RANKS = (1, 4, 8, 16)  # top-r singular-value energy reported for each update (8 must be in it)
RANDOM_DRAWS = 50  # random matrices averaged for the chance level of the subspace similarity


def delta_weights(base, tuned, names) -> dict:
    """``{name: W_tuned - W_base}`` as float64 numpy (out, in); LoRA models give their merged delta."""
    from ..peft import PeftModel

    out = {}
    for name in names:
        w0 = to_numpy(base.get_submodule(name).weight.data).astype(np.float64)
        if isinstance(tuned, PeftModel):
            layer = tuned.base_model.model.get_submodule(name)
            w = w0 + to_numpy(layer.get_delta_weight("default").data).astype(np.float64)
        else:
            w = to_numpy(tuned.get_submodule(name).weight.data).astype(np.float64)
        out[name] = w - w0
    return out


def energy_fractions(sigma: np.ndarray, ranks=ENERGY_RANKS) -> dict:
    """Share of ``||dW||_F^2 = sum sigma_i^2`` in the top-r singular values, for each r."""
    e = np.cumsum(np.asarray(sigma, dtype=np.float64) ** 2)
    return {int(r): float(e[min(r, len(e)) - 1] / e[-1]) for r in ranks}


def rank_for_energy(sigma: np.ndarray, share: float = 0.9) -> int:
    """Smallest r whose top-r singular values hold ``share`` of the energy."""
    e = np.cumsum(np.asarray(sigma, dtype=np.float64) ** 2)
    return int(np.searchsorted(e / e[-1], share) + 1)


def random_like(dw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian matrix with ``dw``'s shape, scaled to ``dw``'s Frobenius norm."""
    g = rng.standard_normal(dw.shape)
    return g * (np.linalg.norm(dw) / np.linalg.norm(g))


def right_singular(dw: np.ndarray) -> np.ndarray:
    """Right-singular vectors of ``dw`` (out, in) as columns (in, min(out, in)), by decreasing sigma."""
    return np.linalg.svd(dw, full_matrices=False)[2].T


def subspace_similarity(u1: np.ndarray, u2: np.ndarray, i: int, j: int) -> float:
    """phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) in [0, 1] (LoRA paper §7.2, eq. 4).

    ``u1``, ``u2`` have orthonormal columns (singular vectors ordered by singular value).
    Two random subspaces of R^k give about max(i, j) / k.
    """
    m = u1[:, :i].T @ u2[:, :j]  # (i, j)
    return float((m ** 2).sum() / min(i, j))


def subspace_study(base, full_model, sweep, r_small: int, r_large: int, rng) -> dict:
    """Subspace similarity of LoRA r_small's dW (``attn.c_attn`` of each layer) with the full update's,
    LoRA r_large's, and random matrices' right-singular vectors (the chance level: ``RANDOM_DRAWS`` draws)."""
    names = [f"transformer.h.{i}.attn.c_attn" for i in range(base.config.n_layer)]
    small, large, ft = (delta_weights(base, m, names) for m in (sweep[r_small]["model"], sweep[r_large]["model"],
                                                                  full_model))
    k = ft[names[0]].shape[1]  # the input dimension: right-singular vectors live in R^k
    top = min(8, r_small)
    js = list(range(1, min(32, k) + 1))
    rows, curves = [], {}
    for n in names:
        short = n.replace("transformer.", "")
        u_small = right_singular(small[n])
        rand = [right_singular(random_like(ft[n], rng)) for _ in range(RANDOM_DRAWS)]
        for label, us in (("full FT", [right_singular(ft[n])]), (f"LoRA r={r_large}", [right_singular(large[n])]),
                          (f"random (mean of {RANDOM_DRAWS})", rand)):
            row = dict(pair=f"LoRA r={r_small} vs {label}", matrix=short)
            for i in (1, 4, 8):
                row[f"phi{i}"] = float(np.mean([subspace_similarity(u_small, u, min(i, top), i) for u in us]))
            rows.append(row)
            if not label.startswith("random"):
                curves[f"LoRA r={r_small} vs {label}, {short}"] = [subspace_similarity(u_small, us[0], top, j)
                                                                    for j in js]

    def mean(label: str, key: str) -> float:
        return float(np.mean([r[key] for r in rows if f" vs {label}" in r["pair"]]))

    return dict(rows=rows, k=k, top=top, js=js, curves=curves, chance=[max(top, j) / k for j in js],
                ft=mean("full FT", "phi8"), ft1=mean("full FT", "phi1"), lora1=mean(f"LoRA r={r_large}", "phi1"),
                lora=mean(f"LoRA r={r_large}", "phi8"), random1=mean("random", "phi1"), random=mean("random", "phi8"))
