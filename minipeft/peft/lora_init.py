"""LoRA initialisations that start from the base weight: PiSSA, OLoRA, LoftQ (peft's ``init_lora_weights``).

Plain LoRA starts at ΔW = 0 (B = 0). These start the factors from W itself, and change
the base weight so that the layer still computes (about) W x at step 0. With s the LoRA
scaling, r the rank and W (out, in):

* **PiSSA** (Meng et al. 2024, arXiv 2404.02948, Sec. 3): W = U S Vᵀ; the principal part
  U_r S_r V_rᵀ goes to the adapter, the rest stays frozen:
  ``A = sqrt(S_r / s) V_rᵀ`` (r, in), ``B = U_r sqrt(S_r / s)`` (out, r),
  ``W_res = W - s B A`` (= Σ_{i>r} σ_i u_i v_iᵀ). ``"pissa_niter_K"`` takes U_r, S_r, V_r
  from a randomized SVD with K subspace iterations (Halko, Martinsson, Tropp 2011,
  arXiv 0909.4061, Alg. 4.4: ``svd_lowrank``), far cheaper for large W.
* **OLoRA** (Büyükakyüz 2024, arXiv 2406.01775): W = Q R (QR decomposition);
  ``B = Q[:, :r]``, ``A = R[:r]``, ``W_res = W - s B A``. (As in peft, A and B are not divided
  by s, so s B A = s Q_r R_r.)
* **LoftQ** (Li et al. 2023, arXiv 2310.08659, Algorithm 1): alternate T = ``loftq_iter``
  times ``Q_t = dequant(quant(W - B_{t-1} A_{t-1}))`` (NF4 blocks of 64 for 4 bits,
  LLM.int8()'s row-wise absmax for 8 bits) and ``B_t A_t = SVD_r(W - Q_t)`` (B = U_r sqrt(S_r),
  A = sqrt(S_r) V_rᵀ); the base becomes ``Q_T`` (float values on the quantization grid,
  so quantizing it again with the same code and block size is exact) and the adapter
  (A_T, B_T). As in peft, the factors are not divided by s: Q_T + B A ≈ W only when s = 1
  (``lora_alpha == r``).

Every init leaves W_res + s B A = W to float rounding, except LoftQ (≈ W, its point being
that Q + B A is closer to W than Q alone). They need a float base: initialise on the
full-precision model, then quantize the residual (QPiSSA). ``disable_adapter()`` runs the
residual (or Q), not the original W, as in peft.

**Converting back to plain LoRA** (peft's ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``, ``LoraModel.subtract_mutated_init``): after
training, W + ΔW = W_res + s B A and W = W_res + s B₀ A₀, so ΔW = s (B A - B₀ A₀) =
s [B | -B₀] [A ; A₀]: a plain LoRA of rank 2r (lora_alpha doubled, or times sqrt(2) with
rsLoRA, so s is unchanged) that applies to the *original* W, beside other adapters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backend import xp_of

#: init_lora_weights values that start from the base weight (and change it)
WEIGHT_INITS = ("pissa", "olora", "loftq")  # plus "pissa_niter_K"


@dataclass
class LoftQConfig:
    """peft's ``LoftQConfig``; ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig())``."""

    loftq_bits: int = 4  # 4: NF4 (blocks of 64), 8: LLM.int8()'s row-wise absmax int8
    loftq_iter: int = 1  # T, alternating quantize / SVD steps

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8):
            raise ValueError(f"loftq_bits must be 4 (NF4) or 8 (int8), got {self.loftq_bits!r}")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"loftq_iter must be an integer >= 1, got {self.loftq_iter!r}")


def check_init(init, loftq_config) -> dict:
    """Validate ``init_lora_weights`` with ``loftq_config``; returns the loftq_config as peft's dict."""
    if isinstance(loftq_config, LoftQConfig):
        loftq_config = dict(vars(loftq_config))
    ok = init in (True, False, "gaussian", "olora", "pissa", "loftq") or pissa_niter(init) is not None
    if not ok:
        raise ValueError(f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K >= 0 "
                         f"subspace iterations, e.g. 'pissa_niter_4'), 'olora' or 'loftq'; got {init!r}")
    if init == "loftq":
        if not loftq_config:
            raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. LoftQConfig(loftq_bits=4, loftq_iter=1)")
        unknown = sorted(set(loftq_config) - {"loftq_bits", "loftq_iter"})
        if unknown:
            raise ValueError(f"loftq_config has unknown keys {unknown}; it takes loftq_bits and loftq_iter")
        return dict(vars(LoftQConfig(**loftq_config)))
    if loftq_config:
        raise ValueError(f"loftq_config is used only with init_lora_weights='loftq' (got init_lora_weights="
                         f"{init!r}); leave it {{}}")
    return {}


def pissa_niter(init) -> int | None:
    """K of ``"pissa_niter_K"``, else None."""
    if not isinstance(init, str) or not init.startswith("pissa_niter_"):
        return None
    k = init[len("pissa_niter_"):]
    return int(k) if k.isdigit() else None


def is_weight_init(init) -> bool:
    return isinstance(init, str) and (init in WEIGHT_INITS or pissa_niter(init) is not None)


# ------------------------------------------------------------------ the factorizations (arrays in, arrays out)


def svd_lowrank(W, q: int, niter: int, rng: np.random.Generator):
    """Randomized rank-q SVD (Halko et al. 2011, Alg. 4.4, as ``torch.svd_lowrank``): (U (m, q), S (q,), V (n, q)).

    A Gaussian test matrix Ω (n, q) gives the range basis Q = qr(W Ω); each of the ``niter``
    subspace iterations refines it with Q = qr(Wᵀ Q), Q = qr(W Q); the small SVD of Qᵀ W
    finishes. A wide W (m < n) is handled through Wᵀ, as torch does.
    """
    xp = xp_of(W)
    wide = W.shape[0] < W.shape[1]
    A = W.T if wide else W                                                  # (m, n), m >= n
    omega = xp.asarray(rng.standard_normal((A.shape[1], q))).astype(A.dtype)  # (n, q)
    Q = xp.linalg.qr(A @ omega)[0]                                          # (m, q)
    for _ in range(niter):
        Q = xp.linalg.qr(A.T @ Q)[0]                                        # (n, q)
        Q = xp.linalg.qr(A @ Q)[0]                                          # (m, q)
    u, s, vh = xp.linalg.svd(Q.T @ A, full_matrices=False)                 # (q, q), (q,), (q, n)
    U, V = Q @ u, vh.T                                                      # (m, q), (n, q)
    return (V, s, U) if wide else (U, s, V)


def pissa(W, r: int, scaling: float, niter: int | None = None, rng: np.random.Generator | None = None):
    """PiSSA's (A (r, in), B (out, r), W_res (out, in)); ``niter``: the randomized SVD (pissa_niter_K)."""
    xp = xp_of(W)
    if niter is None:
        U, S, Vh = xp.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]                                  # (out, r), (r,), (r, in)
    else:
        U, S, V = svd_lowrank(W, r, niter, rng)
        Vh = V.T
    root = xp.sqrt(S / scaling)                                             # (r,)
    A = root[:, None] * Vh                                                  # (r, in)
    B = U * root[None, :]                                                   # (out, r)
    return A, B, W - scaling * (B @ A)


def olora(W, r: int, scaling: float):
    """OLoRA's (A = R[:r] (r, in), B = Q[:, :r] (out, r), W_res = W - s B A)."""
    Q, R = xp_of(W).linalg.qr(W)                                            # (out, k), (k, in), k = min(out, in)
    A, B = R[:r], Q[:, :r]
    return A, B, W - scaling * (B @ A)


def quantize_roundtrip(W, bits: int):
    """``dequant(quant(W))`` as LoftQ's peft path does it: NF4 (blocks of 64) or LLM.int8() rows (via float16)."""
    from ..quant import dequantize_4bit, int8_vectorwise_dequant, int8_vectorwise_quant, quantize_nf4
    W32 = W.astype(np.float32)
    if bits == 4:
        packed, state = quantize_nf4(W32, blocksize=64)
        return dequantize_4bit(packed, state, dtype=np.float32)
    CA, stats, _ = int8_vectorwise_quant(W32.astype(np.float16))  # bitsandbytes' Int8Params casts to float16 first
    return int8_vectorwise_dequant(CA, stats)


def loftq(W, r: int, bits: int = 4, num_iter: int = 1):
    """LoftQ's (A (r, in), B (out, r), Q_T (out, in)) after ``num_iter`` alternating steps (no scaling, as peft)."""
    xp = xp_of(W)
    W = W.astype(np.float32)
    res = W
    for t in range(num_iter):
        Q = quantize_roundtrip(res, bits)                                   # (out, in) on the quantization grid
        U, S, Vh = xp.linalg.svd(W - Q, full_matrices=False)
        root = xp.sqrt(S[:r])
        B, A = U[:, :r] * root[None, :], root[:, None] * Vh[:r]             # (out, r), (r, in)
        if t + 1 < num_iter:
            res = W - B @ A
    return A, B, Q


def initialize(layer, adapter_name: str, init: str, r: int, scaling: float, loftq_config: dict, rng):
    """Run ``init`` on ``layer``'s base weight: set it to the residual and return (A, B) in the base's dtype."""
    base = layer.get_base_layer()
    w = getattr(base, "weight", None)
    xp = xp_of(w.data) if w is not None else np
    if w is None or not xp.issubdtype(w.data.dtype, np.floating):
        raise TypeError(
            f"init_lora_weights={init!r} changes the base weight, which must be a float Parameter; "
            f"{type(base).__name__} holds a quantized one. Initialise on the full-precision model, then "
            "quantize the residual (PiSSA's QPiSSA; for LoftQ the residual is on the NF4 grid already)")
    W = w.data.astype(np.float64 if w.data.dtype == np.float64 else np.float32)  # (out, in); bfloat16/16 -> 32
    if init == "olora":
        A, B, res = olora(W, r, scaling)
    elif init == "loftq":
        A, B, res = loftq(W, r, loftq_config["loftq_bits"], loftq_config["loftq_iter"])
    else:
        A, B, res = pissa(W, r, scaling, pissa_niter(init), rng)
    layer.set_base_weight(res)
    return A, B


# ------------------------------------------------------------------ converting to a plain LoRA file


def converted_config(d: dict, path: str) -> dict:
    """The adapter_config.json of the converted adapter: rank 2r, same scaling, ``init_lora_weights=true``."""
    if d.get("use_rslora") and (d.get("rank_pattern") or d.get("alpha_pattern")):
        raise ValueError(f"cannot convert to plain LoRA with {path}: use_rslora with rank_pattern/alpha_pattern "
                         "(peft does not support it either); save without path_initial_model_for_weight_conversion")
    factor = math.sqrt(2) if d.get("use_rslora") else 2  # scaling alpha / r or alpha / sqrt(r) stays the same
    return dict(d, init_lora_weights=True, r=2 * d["r"], lora_alpha=d["lora_alpha"] * factor,
                rank_pattern={k: 2 * v for k, v in d.get("rank_pattern", {}).items()},
                alpha_pattern={k: 2 * v for k, v in d.get("alpha_pattern", {}).items()})


def converted_tensors(tensors: dict, initial: dict, path: str) -> dict:
    """``A' = [A; A0]`` (2r, in), ``B' = [B, -B0]`` (out, 2r) per layer, from the trained and initial files."""
    factors = [k for k in tensors if ".lora_A." in k or ".lora_B." in k]  # peft keeps only these
    missing = sorted(set(factors) - set(initial))
    shapes = [k for k in factors if k in initial and initial[k].shape != tensors[k].shape]
    if missing or shapes or not factors:
        raise ValueError(f"{path} does not hold this adapter's initial factors: missing {missing[:5]}, "
                         f"other shapes {shapes[:5]}. Pass the folder save_adapter wrote right after get_peft_model")
    out = {}
    for k in factors:
        a, a0 = tensors[k], np.asarray(initial[k], dtype=tensors[k].dtype)
        out[k] = np.concatenate([a, a0], axis=0) if ".lora_A" in k else np.concatenate([a, -a0], axis=1)
    return out


__all__ = ["LoftQConfig", "pissa", "olora", "loftq", "svd_lowrank", "quantize_roundtrip", "initialize",
           "check_init", "is_weight_init", "pissa_niter", "converted_config", "converted_tensors"]
