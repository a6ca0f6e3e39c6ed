"""Scalar int8 quantization: absmax (symmetric) and zero-point (asymmetric).

LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339), Sec. 2.1:

**Absmax** scales into [-127, 127] by the absolute maximum,

    c = 127 / max|X|        X_i8 = round(c * X)        dequant(X_i8) = X_i8 / c

so the error of every element is at most ``0.5 / c = max|X| / 254``. One number per
tensor, per row or per column (``per=``) sets the scale; finer scales isolate outliers.
Like bitsandbytes we store the absmax itself (not c) and round half to even
(``torch.round``), dequantizing as ``X_i8 * absmax * float32(1/127)``.

**Zero-point** uses the whole 8-bit range for skewed data (e.g. ReLU outputs, which
are never negative): scale by the range, then shift so the minimum lands on -128,

    s = 255 / (max X - min X)    z = -128 - round(s * min X)
    X_q = clip(round(s * X) + z, -128, 127)       dequant(X_q) = (X_q - z) / s

with error at most ``0.5 / s = (max - min) / 510``; 0 is reproduced exactly whenever it
lies in [min, max]. This is bitsandbytes' former ``vectorwise_quant(quant_type=
"zeropoint")`` (scale 255/range, integer zero-point round(min * s)) up to the constant
shift that puts the codes in int8; the paper writes 2*127 instead of 255.
"""
from __future__ import annotations

import numpy as np

from ..backend import xp_of

_PER = ("tensor", "row", "column")
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _check(x, per: str, bits: int, what: str):
    if not hasattr(x, "dtype"):
        raise TypeError(f"{what} expects a NumPy or CuPy array, got {type(x).__name__}")
    if np.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise TypeError(f"{what} expects a float array, got {x.dtype}; use x.astype(np.float32)")
    if x.size == 0:
        raise ValueError(f"{what} got an empty array")
    if per not in _PER:
        raise ValueError(f"per must be one of {_PER}, got {per!r}")
    if per != "tensor" and x.ndim < 2:
        raise ValueError(f"per={per!r} needs an array with >= 2 dims, got shape {x.shape}; "
                         "use per='tensor' for a vector")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")
    xp = xp_of(x)
    if not bool(xp.isfinite(x).all()):
        raise ValueError(f"{what} got NaN/inf values; a scale cannot be formed from them")


def _reduce_axes(x, per: str):
    """Axes to reduce: all (tensor), the last (one scale per row), all but the last (column)."""
    if per == "tensor":
        return tuple(range(x.ndim))
    if per == "row":
        return (x.ndim - 1,)
    return tuple(range(x.ndim - 1))


def absmax_quantize(x, per: str = "tensor", bits: int = 8):
    """Symmetric quantization: ``(int8 codes, absmax)``, absmax shaped to broadcast.

    ``q = round(x * (qmax / absmax))`` with qmax = 2**(bits-1) - 1 (127), computed in
    float32 (float64 stays float64). A scale group that is all zeros gets absmax 0 and
    codes 0.
    """
    _check(x, per, bits, "absmax_quantize")
    xp = xp_of(x)
    ftype = xp.float64 if x.dtype == np.float64 else xp.float32
    xf = x.astype(ftype)
    qmax = ftype(2 ** (bits - 1) - 1)
    absmax = xp.abs(xf).max(axis=_reduce_axes(x, per), keepdims=True)    # (1,1) / (R,1) / (1,C)
    scale = qmax / xp.where(absmax == 0, ftype(1), absmax)
    q = xp.where(absmax == 0, ftype(0), xp.rint(xf * scale))
    return q.astype(xp.int8), absmax


def absmax_dequantize(q, absmax, bits: int = 8):
    """``q * absmax * (1 / qmax)`` (bitsandbytes multiplies by float32(1/127))."""
    xp = xp_of(q)
    ftype = xp.float64 if absmax.dtype == np.float64 else xp.float32
    inv_qmax = ftype(1) / ftype(2 ** (bits - 1) - 1)
    return (q.astype(ftype) * absmax.astype(ftype) * inv_qmax).astype(ftype)


def zeropoint_quantize(x, per: str = "tensor", bits: int = 8):
    """Asymmetric quantization: ``(int8 codes, scale, zero_point)``, both shaped to broadcast.

    ``scale = (2**bits - 1) / (max - min)`` (a constant group uses range 1, as
    bitsandbytes did); ``zero_point = qmin - round(scale * min)`` (int32: it leaves the
    int8 range when 0 is not inside [min, max]); ``q = clip(round(scale*x) + zero_point,
    qmin, qmax)``.
    """
    _check(x, per, bits, "zeropoint_quantize")
    xp = xp_of(x)
    ftype = xp.float64 if x.dtype == np.float64 else xp.float32
    xf = x.astype(ftype)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    axes = _reduce_axes(x, per)
    lo = xf.min(axis=axes, keepdims=True)
    hi = xf.max(axis=axes, keepdims=True)
    span = hi - lo
    scale = ftype(qmax - qmin) / xp.where(span == 0, ftype(1), span)
    shift = xp.rint(scale * lo)
    if bool((xp.abs(shift) > 2 ** 31 - 2 ** 10).any()):
        raise ValueError("zeropoint_quantize: the value range is too narrow for the values' "
                         "magnitude (the zero-point would not fit in int32); subtract the "
                         "mean first or use absmax_quantize")
    zero_point = (qmin - shift).astype(xp.int32)
    q = xp.clip(xp.rint(scale * xf) + zero_point.astype(ftype), qmin, qmax)
    return q.astype(xp.int8), scale.astype(ftype), zero_point


def zeropoint_dequantize(q, scale, zero_point):
    """``(q - zero_point) / scale``."""
    xp = xp_of(q)
    ftype = xp.float64 if scale.dtype == np.float64 else xp.float32
    return ((q.astype(ftype) - zero_point.astype(ftype)) / scale.astype(ftype)).astype(ftype)
