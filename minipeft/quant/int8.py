"""Vector-wise int8 quantization and LLM.int8() matrix multiplication.

LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339), Sec. 3.1-3.2. For ``Y = X W^T``
with X (tokens, hidden) and W (out, hidden), give every row of X and every row of W its
own absmax, quantize both to int8, multiply with **int32 accumulation**, and rescale by
the outer product of the two scale vectors (Sec. 3.1, with c = 127/absmax):

    C_i8 = round(X * 127/a_x) @ round(W * 127/a_w)^T        (int32)
    Y    ~ C_i8 * (a_x outer a_w) / 127^2

Large-magnitude *outlier features* (|x| >= 6 in a few hidden dimensions of big models)
would stretch every row's scale and wipe out the small values, so the mixed-precision
decomposition (Sec. 3.2) sends the hidden dimensions O that hold any outlier
through a floating-point matmul and the rest through int8:

    Y ~ X[:, O] W[:, O]^T  +  S * (X_i8[:, not O] W_i8[:, not O]^T)

bitsandbytes conventions kept here: stats are the absmax itself (not 127/absmax);
``round`` is half-to-even; outlier elements are left out of their row's absmax and the
whole outlier columns are zeroed in the int8 matrix; the product is dequantized as
``((C * row) * col) * float32(1/127**2)`` (``MM_DEQUANT_CONST = 6.200012e-05``, fused
with the bias like CUDA's ``fmaf``); since bitsandbytes 0.45 the outlier columns use the
int8-dequantized weight (pass ``weight=`` for the paper's float columns). The int8
threshold default is 6.0 as in the paper and Hugging Face's ``llm_int8_threshold``
(bitsandbytes' own ``Linear8bitLt`` defaults to 0.0, decomposition off).

NumPy warning: ``int8 @ int8`` returns int8 and wraps around (127*127*4 -> 4); every
product here is cast to int32 first.
"""
from __future__ import annotations

import numpy as np

from .. import fast
from ..backend import xp_of
from .state import FLOAT_DTYPES, check_float

MM_DEQUANT_CONST = np.float32(6.200012e-05)    # == float32(1 / 127**2), bitsandbytes' CUDA value
INV_127 = np.float32(1.0 / 127.0)              # 7.874015718698502e-3


def outlier_columns(X, threshold: float = 6.0):
    """Hidden dimensions (indices on the last axis) where any row has ``|x| >= threshold``.

    This is LLM.int8()'s outlier criterion for one matmul input (the paper's analysis
    additionally asks for >= 25% of layers and >= 6% of positions). ``threshold <= 0``
    turns decomposition off and returns no columns.
    """
    xp = xp_of(X)
    if threshold <= 0:
        return xp.zeros(0, dtype=xp.int64)
    rows = X.reshape(-1, X.shape[-1])                                  # (N, K)
    return xp.nonzero(xp.any(xp.abs(rows) >= threshold, axis=0))[0].astype(xp.int64)


@fast.dispatch  # CuPy arrays: minipeft/kernels/quant8bit.cu, bit for bit
def int8_vectorwise_quant(A, threshold: float = 0.0):
    """Row-wise absmax int8 quantization, as bitsandbytes' ``int8_vectorwise_quant``.

    Rows run over all leading axes, the absmax over the last one. Returns ``(CA int8
    shaped like A, row_stats float32 (rows,), outlier_cols)``, with
    ``CA = round(A * (127 / row_stats))`` in float32 (half to even) and
    ``outlier_cols`` None when ``threshold == 0``. With ``threshold > 0`` the elements
    with ``|a| >= threshold`` do not count towards their row's absmax, and every column
    that holds one is zeroed in CA. An all-zero row gets stats 0 and codes 0.
    """
    check_float(A, "int8_vectorwise_quant")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    xp = xp_of(A)
    rows = A.reshape(-1, A.shape[-1]).astype(xp.float32)              # (N, K)
    cols = None
    if threshold > 0:
        rows = xp.where(xp.abs(rows) >= xp.float32(threshold), xp.float32(0), rows)
        cols = outlier_columns(A, threshold)
    row_stats = xp.abs(rows).max(axis=1)                               # (N,)
    scale = xp.float32(127) / xp.where(row_stats == 0, xp.float32(1), row_stats)
    q = xp.rint(rows * scale[:, None])
    q = xp.where((row_stats == 0)[:, None], xp.float32(0), q).astype(xp.int8)
    if cols is not None and cols.size:
        q[:, cols] = 0
    return q.reshape(A.shape), row_stats.astype(xp.float32), cols


def int8_vectorwise_dequant(A, stats):
    """``A * stats[row] * float32(1/127)`` in float32 (A int8, stats per row)."""
    xp = xp_of(A)
    rows = A.reshape(-1, A.shape[-1]).astype(xp.float32)
    out = rows * xp.asarray(stats, dtype=xp.float32).reshape(-1)[:, None] * INV_127
    return out.reshape(A.shape)


def int8_linear_matmul(A, B, accumulate: str = "int32"):
    """``A @ B.T`` for int8 A (..., K) and int8 B (out, K), accumulated in int32.

    ``accumulate='float64'`` gives the same integers faster on a CPU (BLAS): every partial
    sum is an integer below 2**53, so float64 is exact.
    """
    xp = xp_of(A)
    for name, M in (("A", A), ("B", B)):
        if np.dtype(M.dtype) != np.int8:
            raise TypeError(f"int8_linear_matmul: {name} must be int8, got {M.dtype}")
    if B.ndim != 2 or A.shape[-1] != B.shape[1]:
        raise ValueError(f"int8_linear_matmul computes A @ B.T: got A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}; B must be (out, {A.shape[-1]})")
    if accumulate == "int32":
        return xp.matmul(A.astype(xp.int32), B.astype(xp.int32).T)    # (..., out) int32
    if accumulate == "float64":
        return xp.matmul(A.astype(xp.float64), B.astype(xp.float64).T).astype(xp.int32)
    raise ValueError(f"accumulate must be 'int32' or 'float64', got {accumulate!r}")


def int8_mm_dequant(A, row_stats, col_stats, dtype=np.float16, bias=None):
    """Dequantize an int32 product: ``((A * row_stats[i]) * col_stats[j]) * 1/127**2 + bias[j]``.

    float32 throughout, with the last multiply-add fused (one rounding) as in the CUDA
    kernel's ``fmaf``, then one cast to ``dtype`` (float16 by default, as bitsandbytes;
    its CUDA kernel always rounds through float16, this returns float32 unrounded when
    asked for float32).
    """
    xp = xp_of(A)
    if np.dtype(A.dtype) != np.int32:
        raise TypeError(f"int8_mm_dequant expects the int32 product, got {A.dtype}")
    out_dtype = np.dtype(dtype)
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"int8_mm_dequant returns float16 or float32, got {out_dtype}")
    C = A.reshape(-1, A.shape[-1]).astype(xp.float32)                 # (N, out)
    row = xp.asarray(row_stats, dtype=xp.float32).reshape(-1)[:, None]
    col = xp.asarray(col_stats, dtype=xp.float32).reshape(-1)[None, :]
    t = (C * row) * col                                                # float32, this order
    # fmaf(t, const, bias): t * const is exact in float64 (24 + 24 bits), then one rounding.
    fused = t.astype(xp.float64) * np.float64(MM_DEQUANT_CONST)
    if bias is not None:
        fused = fused + xp.asarray(bias).astype(xp.float32).astype(xp.float64)[None, :]
    return fused.astype(xp.float32).astype(out_dtype).reshape(A.shape)


def matmul_8bit(X, CB, SCB, threshold: float = 6.0, bias=None, weight=None):
    """LLM.int8() ``X @ W^T`` with the weight already quantized row-wise (CB int8, SCB absmax).

    X (..., K) float16/float32 -> (..., out) in X's dtype (computed in float32).
    Columns of X with any ``|x| >= threshold`` go through a float matmul against the
    int8-dequantized weight columns ``CB[:, O] * SCB / 127`` (or ``weight[:, O]`` when the
    float weight is given); the rest through int8 with int32 accumulation.
    """
    check_float(X, "matmul_8bit")
    xp = xp_of(X)
    rows = X.reshape(-1, X.shape[-1])                                  # (N, K)
    CA, SCA, cols = int8_vectorwise_quant(rows, threshold)
    out = int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB,
                          dtype=np.float32, bias=bias)                 # (N, out)
    if cols is not None and cols.size:
        if weight is None:
            w_cols = int8_vectorwise_dequant(CB[:, cols], SCB)         # (out, |O|)
        else:
            w_cols = weight[:, cols].astype(xp.float32)
        out = out + rows[:, cols].astype(xp.float32) @ w_cols.T        # (N, out)
    return out.astype(X.dtype).reshape(*X.shape[:-1], CB.shape[0])


def llm_int8_matmul(X, W, threshold: float = 6.0, bias=None, keep_float_outliers: bool = False):
    """Quantize W (out, K) row-wise to int8, then :func:`matmul_8bit` (``X @ W^T``).

    ``threshold=0`` is plain vector-wise int8 (no decomposition). With
    ``keep_float_outliers=True`` the outlier columns use W itself (the paper's Sec. 3.2 form)
    instead of its int8 version (bitsandbytes >= 0.45).
    """
    check_float(W, "llm_int8_matmul")
    CB, SCB, _ = int8_vectorwise_quant(W)                              # (out, K), (out,)
    return matmul_8bit(X, CB, SCB, threshold=threshold, bias=bias,
                       weight=W if keep_float_outliers else None)
