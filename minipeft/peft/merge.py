"""Combining LoRA adapters into one: peft's ``add_weighted_adapter`` and its merge rules.

Each adapter i gives a *task tensor* τ_i (a factor A_i or B_i, or its whole ΔW_i =
s_i B_i A_i) and a weight w_i. The rules (peft's ``utils/merge_utils.py``):

* **task arithmetic** (``linear``, ``svd``; Ilharco et al. 2023, arXiv 2212.04089):
  τ = Σ w_i τ_i.
* **magnitude_prune**: keep the ``density`` fraction of entries of each τ_i with the
  largest |τ_i| (the rest set to 0), then Σ w_i τ_i.
* **TIES** (Yadav et al. 2023, arXiv 2306.01708, Sec. 3): trim as magnitude_prune; elect
  a sign per entry, that of Σ_i τ_i (``majority_sign_method="total"``) or of Σ_i sign(τ_i)
  (``"frequency"``), over the *unweighted* trimmed τ_i as peft does (ties go to +); then the
  disjoint mean: τ = Σ_i w_i τ_i [sign τ_i = elected] / max(1, #agreeing i).
* **DARE** (Yu et al. 2024, arXiv 2311.03099, eq. 2): drop each entry with probability
  1 - ``density`` and rescale the kept ones by 1/density (τ_i ⊙ m_i / p, m_i ~ Bernoulli(p)),
  then task arithmetic (``dare_linear``) or TIES' sign election and disjoint mean
  (``dare_ties``).

Applied to LoRA (``combine_lora``), with s_i adapter i's scaling, the new adapter has
lora_alpha = r_new (scaling 1) and, per layer:

* ``cat``: A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]: ΔW = Σ w_i s_i B_i A_i exactly;
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (equal ranks): the
  rule on the A's with weights sign(w_i s_i) sqrt(|w_i s_i|) and, separately, on the B's
  with sqrt(|w_i s_i|). The product of the two combinations has cross terms B_i A_j: these
  are cheap approximations of combining the ΔW's;
* ``svd`` and ``<rule>_svd``: the rule on the ΔW_i with weights w_i, then the best rank-r_new
  approximation (truncated SVD: B = U_r S_r, A = V_rᵀ; ``svd_rank`` defaults to max r_i),
  optionally clamped to the ``svd_clamp`` quantile of their entries.

DARE's masks come from ``numpy.random.default_rng(seed)``, drawn in peft's order (module by
module; per module the A's then the B's, or the ΔW's, adapter by adapter), or are given in
``dare_masks``: {"<module>.<part>.<adapter>": 0/1 array}, ``<part>`` one of lora_A, lora_B,
delta (ΔW as (out, in)), ``<module>`` the PeftModel's module name — so that peft's own
masks can be replayed to compare with it.
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from ..backend import xp_of

#: combination_type -> (rule, on the whole ΔW then SVD?)
COMBINATIONS = {
    "linear": ("task_arithmetic", False), "ties": ("ties", False), "dare_linear": ("dare_linear", False),
    "dare_ties": ("dare_ties", False), "magnitude_prune": ("magnitude_prune", False),
    "svd": ("task_arithmetic", True), "ties_svd": ("ties", True), "dare_linear_svd": ("dare_linear", True),
    "dare_ties_svd": ("dare_ties", True), "magnitude_prune_svd": ("magnitude_prune", True),
    "cat": (None, False),
}
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# ------------------------------------------------------------------ the rules, on lists of same-shape arrays


def magnitude_prune_one(t, density: float):
    """Keep the ``int(density * t.size)`` entries of largest |t| (peft's ``magnitude_based_pruning``)."""
    xp = xp_of(t)
    if density >= 1:
        return t
    k = int(density * t.size)
    flat = xp.abs(t).reshape(-1)
    keep = xp.argsort(-flat, kind="stable")[:k]  # the k largest magnitudes (ties: the earlier entry)
    mask = xp.zeros(t.size, dtype=t.dtype)
    mask[keep] = 1
    return t * mask.reshape(t.shape)


def dare_prune_one(t, density: float, mask):
    """DARE's drop and rescale: ``t ⊙ mask / density`` (mask of 0/1, kept with probability density)."""
    if density >= 1:
        return t
    return t * mask.astype(t.dtype) / t.dtype.type(density)


def majority_sign_mask(stacked, method: str = "total"):
    """(n, ...) bool: where τ_i has the elected sign (the sign of Σ τ_i, or of Σ sign τ_i; 0 counts as +)."""
    xp = xp_of(stacked)
    sign = xp.sign(stacked)
    if method == "total":
        magnitude = stacked.sum(axis=0)
    elif method == "frequency":
        magnitude = sign.sum(axis=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    elected = xp.where(magnitude >= 0, 1, -1).astype(stacked.dtype)
    return sign == elected


def disjoint_merge(weighted, agree):
    """Σ_i weighted_i [agree_i] / max(1, Σ_i agree_i): the mean over the adapters that agree with the sign."""
    xp = xp_of(weighted)
    count = xp.maximum(agree.sum(axis=0).astype(weighted.dtype), 1)
    return (weighted * agree).sum(axis=0) / count


def combine(rule: str, tensors: list, weights: list, density=None, majority_sign_method="total", masks=None):
    """One merge rule over same-shape task tensors with scalar weights; ``masks`` only for the DARE rules."""
    xp = xp_of(tensors[0])
    if rule in ("magnitude_prune", "ties"):
        tensors = [magnitude_prune_one(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [dare_prune_one(t, density, m) for t, m in zip(tensors, masks)]
    stacked = xp.stack(tensors)                                            # (n, ...)
    w = xp.asarray(weights, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    if rule in ("ties", "dare_ties"):
        return disjoint_merge(stacked * w, majority_sign_mask(stacked, majority_sign_method))
    return (stacked * w).sum(axis=0)


def truncated_svd(delta, rank: int, clamp=None):
    """(A = V_rᵀ (rank, in), B = U_r S_r (out, rank)); zero rows/columns beyond min(out, in); clamped to a quantile."""
    xp = xp_of(delta)
    U, S, Vh = xp.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.shape[0])
    B, A = xp.zeros((delta.shape[0], rank), delta.dtype), xp.zeros((rank, delta.shape[1]), delta.dtype)
    B[:, :k], A[:k] = U[:, :k] * S[:k], Vh[:k]
    if clamp is not None:  # peft: clamp both factors to [-q, q], q the clamp-quantile of their signed entries
        # (which depends on the signs LAPACK gives the singular vectors, so torch and NumPy may differ here)
        hi = xp.quantile(xp.concatenate([B[:, :k].reshape(-1), A[:k].reshape(-1)]), clamp)
        B, A = xp.clip(B, -hi, hi), xp.clip(A, -hi, hi)
    return A, B


# ------------------------------------------------------------------ LoRA


def check_arguments(cfgs: dict, adapters, weights, adapter_name, combination_type, density, majority_sign_method,
                    svd_driver) -> str:
    """Validate ``add_weighted_adapter``'s arguments; returns the combination type actually used."""
    if adapter_name in cfgs:
        raise ValueError(f"adapter {adapter_name!r} already exists; choose a new name (peft would silently keep it)")
    missing = [a for a in adapters if a not in cfgs]
    if missing or not adapters:
        raise ValueError(f"unknown adapters {missing or adapters}; adapters: {list(cfgs)}")
    if len(weights) != len(adapters):
        raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
    if combination_type not in COMBINATIONS:
        raise ValueError(f"combination_type must be one of {list(COMBINATIONS)}, got {combination_type!r}")
    if any(cfgs[a].use_dora for a in adapters):
        raise ValueError("add_weighted_adapter cannot combine DoRA adapters (their magnitudes do not add)")
    if any(cfgs[a].enable_lora for a in adapters):
        raise ValueError("add_weighted_adapter cannot combine adapters with enable_lora (sliced B); save_adapter "
                         "writes them as plain LoRA: load that file and combine the loaded adapter")
    if any(cfgs[a].rank_pattern for a in adapters):
        raise ValueError("add_weighted_adapter does not support adapters with rank_pattern")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_driver is not None:
        raise ValueError(f"svd_driver={svd_driver!r} picks a cuSOLVER routine in torch; minipeft's SVD has no "
                         "choice of driver: leave it None")
    combination_type = "linear" if len(adapters) == 1 else combination_type  # peft: one adapter, linear only
    rule = COMBINATIONS[combination_type][0]
    if rule in NEEDS_DENSITY:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density:
            raise ValueError(f"combination_type {combination_type!r} needs density, the fraction of entries kept "
                             f"(0 < density <= 1), got {density!r}")
        if density >= 1:
            warnings.warn(f"density {density} >= 1: nothing is pruned", stacklevel=4)
        elif density == 0 and rule.startswith("dare"):
            raise ValueError("DARE rescales by 1/density: density must be > 0")
    return combination_type


def new_rank(cfgs, adapters, combination_type: str, svd_rank) -> int:
    ranks = [cfgs[a].r for a in adapters]
    if combination_type == "cat":
        return sum(ranks)
    if COMBINATIONS[combination_type][1]:
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise ValueError(f"combination_type {combination_type!r} needs equal ranks, got {ranks}; use 'cat' or an "
                         "'_svd' type")
    return ranks[0]


def combined_targets(cfgs, adapters):
    tms = [cfgs[a].target_modules for a in adapters]
    if all(isinstance(t, str) for t in tms):
        return "|".join(f"({t})" for t in tms)
    if all(isinstance(t, list) for t in tms):
        return sorted({t for tm in tms for t in tm})
    raise ValueError("cannot combine adapters whose target_modules mix a regex and a list of names")


class MaskSource:
    """DARE's Bernoulli(density) masks: from ``dare_masks`` by key, else drawn from one seeded generator."""

    def __init__(self, density, seed: int, given: dict | None) -> None:
        self.density, self.given, self.used = density, given, set()
        self.rng = np.random.default_rng(seed)

    def __call__(self, key: str, like):
        xp = xp_of(like)
        if self.given is None:
            return xp.asarray(self.rng.random(like.shape) < self.density)
        if key not in self.given:
            raise ValueError(f"dare_masks has no mask {key!r} (keys are '<module>.<lora_A|lora_B|delta>.<adapter>')")
        m = xp.asarray(self.given[key])
        if m.shape != like.shape:
            raise ValueError(f"dare_masks[{key!r}] has shape {m.shape}, the tensor {like.shape}")
        self.used.add(key)
        return m != 0


def combine_lora(peft_model, layer_class, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                 svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None, majority_sign_method="total",
                 seed: int = 0, dare_masks: dict | None = None) -> None:
    """Add ``adapter_name``, the combination of LoRA ``adapters`` (the module docstring gives the rules).

    ``svd_full_matrices`` is accepted for peft's signature: the truncated factors are the
    same either way. Unlike peft, the new adapter never uses rsLoRA (so its scaling is
    exactly 1), starts from ``init_lora_weights=True`` (a PiSSA source does not re-run its
    init on the base), and an existing ``adapter_name`` raises instead of being kept.
    """
    cfgs = peft_model.peft_config
    combination_type = check_arguments(cfgs, adapters, weights, adapter_name, combination_type, density,
                                       majority_sign_method, svd_driver)
    rule, on_delta = COMBINATIONS[combination_type]
    rank = new_rank(cfgs, adapters, combination_type, svd_rank)
    new_cfg = dataclasses.replace(cfgs[adapters[0]], r=rank, lora_alpha=rank, target_modules=combined_targets(
        cfgs, adapters), use_rslora=False, alpha_pattern={}, rank_pattern={}, init_lora_weights=True, loftq_config={})
    draw = MaskSource(density, seed, dare_masks)
    layers = [(n, m) for n, m in peft_model.named_modules()
              if isinstance(m, layer_class) and any(a in m.lora_A for a in adapters)]
    results = []
    for name, layer in layers:  # compute everything first: a bad mask leaves the model unchanged
        here = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        As = [layer.lora_A[a].weight.data for a, _ in here]
        Bs = [layer.lora_B[a].weight.data for a, _ in here]
        ws = [w * layer.scaling[a] for a, w in here]
        if combination_type == "cat":
            xp = xp_of(As[0])
            a_new = xp.concatenate([w * a for w, a in zip(ws, As)], axis=0)  # (Σ r_i, in)
            b_new = xp.concatenate(Bs, axis=1)                                 # (out, Σ r_i)
            A, B = xp.zeros((rank, a_new.shape[1]), a_new.dtype), xp.zeros((b_new.shape[0], rank), b_new.dtype)
            A[: a_new.shape[0]], B[:, : b_new.shape[1]] = a_new, b_new
        elif on_delta:
            deltas = [layer.get_delta_weight(a).data for a, _ in here]       # s_i B_i A_i, (out, in) each
            masks = [draw(f"{name}.delta.{a}", d) for (a, _), d in zip(here, deltas)] if "dare" in rule else None
            delta = combine(rule, deltas, [w for _, w in here], density, majority_sign_method, masks)
            A, B = truncated_svd(delta, rank, svd_clamp)
        else:
            wa = [math.copysign(math.sqrt(abs(w)), w) for w in ws]  # the sign goes on A only
            wb = [math.sqrt(abs(w)) for w in ws]
            mask_a = [draw(f"{name}.lora_A.{a}", t) for (a, _), t in zip(here, As)] if "dare" in rule else None
            mask_b = [draw(f"{name}.lora_B.{a}", t) for (a, _), t in zip(here, Bs)] if "dare" in rule else None
            A = combine(rule, As, wa, density, majority_sign_method, mask_a)
            B = combine(rule, Bs, wb, density, majority_sign_method, mask_b)
        results.append((layer, A, B))
    if dare_masks is not None and set(dare_masks) - draw.used and "dare" in (rule or ""):
        raise ValueError(f"dare_masks has masks for no tensor of this merge: {sorted(set(dare_masks) - draw.used)[:5]}")
    for layer, A, B in results:
        layer.update_layer(adapter_name, new_cfg, np.random.default_rng(0), check_rank_fits=False)
        layer.lora_A[adapter_name].weight.data = A.astype(layer.lora_A[adapter_name].weight.dtype)
        layer.lora_B[adapter_name].weight.data = B.astype(layer.lora_B[adapter_name].weight.dtype)
    peft_model.peft_config[adapter_name] = new_cfg
    peft_model._refresh_trainable()


__all__ = ["COMBINATIONS", "combine", "combine_lora", "magnitude_prune_one", "dare_prune_one", "majority_sign_mask",
           "disjoint_merge", "truncated_svd"]
