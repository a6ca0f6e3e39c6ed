"""Floating-point formats from their bit patterns: float32 -> bfloat16 and float16.

A binary float with e exponent bits and m fraction bits stores sign s, biased exponent E
(bias 2**(e-1) - 1) and fraction f:

    normal     (E = 1 .. 2**e - 2):  (-1)^s * (1 + f / 2**m) * 2**(E - bias)
    subnormal  (E = 0):              (-1)^s * (f / 2**m) * 2**(1 - bias)
    E = 2**e - 1:                    inf (f = 0) or NaN (f != 0)

float32 is (8, 23), float16 (5, 10), bfloat16 (8, 7): bfloat16 keeps float32's
exponent (same range, ~1e-38 .. 3.4e38) and gives up precision (eps = 2**-7), float16
keeps more precision (eps = 2**-10) in a small range (max 65504). That trade is why
bfloat16 trains without loss scaling (the lecture's "bfloat16" slide; QLoRA computes in
bfloat16).

Conversions round to nearest, ties to even, on the integer bit patterns (``uint32``
view): overflow becomes inf, results below the smallest normal become subnormals (or
zero), NaN stays NaN. NumPy has no bfloat16 dtype, so bfloat16 values travel as their
``uint16`` bit patterns (or as float32 arrays holding bfloat16-representable values).

:func:`flush_subnormals` emulates CUDA's flush-to-zero mode, which bitsandbytes' kernels
run in (they are compiled with ``--use_fast_math``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backend import xp_of


@dataclass(frozen=True)
class FloatFormat:
    """Range and precision of a binary floating-point format, derived from its bit counts."""

    name: str            # e.g. "bfloat16"
    exponent_bits: int   # e
    mantissa_bits: int   # m, stored fraction bits (the leading 1 is implicit)

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def max(self) -> float:
        """Largest finite value: (2 - 2**-m) * 2**bias."""
        return (2.0 - 2.0 ** -self.mantissa_bits) * 2.0 ** self.bias

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value: 2**(1 - bias)."""
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value: 2**(1 - bias - m)."""
        return 2.0 ** (1 - self.bias - self.mantissa_bits)

    @property
    def epsilon(self) -> float:
        """Gap between 1 and the next value: 2**-m (relative rounding error <= eps/2)."""
        return 2.0 ** -self.mantissa_bits

    @property
    def decimal_digits(self) -> float:
        """Significant decimal digits, (m + 1) * log10(2)."""
        return (self.mantissa_bits + 1) * math.log10(2.0)

    def info(self) -> dict:
        """The numbers a lesson prints side by side."""
        return {"name": self.name, "bits": self.bits, "exponent_bits": self.exponent_bits,
                "mantissa_bits": self.mantissa_bits, "max": self.max,
                "min_normal": self.min_normal, "min_subnormal": self.min_subnormal,
                "epsilon": self.epsilon, "decimal_digits": self.decimal_digits}


FLOAT32 = FloatFormat("float32", 8, 23)
FLOAT16 = FloatFormat("float16", 5, 10)
BFLOAT16 = FloatFormat("bfloat16", 8, 7)
FORMATS = {f.name: f for f in (FLOAT32, FLOAT16, BFLOAT16)}


def _bits32(x):
    """The uint32 bit patterns of a float32 array."""
    if not hasattr(x, "dtype") or np.dtype(x.dtype) != np.float32:
        raise TypeError(f"expected a float32 array, got {getattr(x, 'dtype', type(x).__name__)}; "
                        "use x.astype(np.float32) (a float64 would be rounded twice)")
    xp = xp_of(x)
    return xp.ascontiguousarray(x).view(xp.uint32)


def float32_to_bfloat16_bits(x):
    """bfloat16 bit patterns (uint16) of float32 ``x``, rounded to nearest even.

    bfloat16 is the top half of a float32, so rounding is one integer add on the bits:
    ``(u + 0x7FFF + lsb) >> 16`` with lsb the lowest kept bit; a carry out of the
    fraction bumps the exponent, and past the largest finite value lands on inf.
    Subnormals round the same way. NaN becomes 0x7FC0, PyTorch's quiet NaN.
    """
    u = _bits32(x)
    xp = xp_of(u)
    lsb = (u >> 16) & 1
    rounded = ((u + (0x7FFF + lsb).astype(xp.uint32)) >> 16).astype(xp.uint16)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    return xp.where(is_nan, xp.uint16(0x7FC0), rounded)


def bfloat16_bits_to_float32(b):
    """float32 values of bfloat16 bit patterns (exact: append 16 zero bits)."""
    xp = xp_of(b)
    return (xp.asarray(b).astype(xp.uint32) << 16).view(xp.float32)


def float32_to_float16_bits(x):
    """float16 bit patterns (uint16) of float32 ``x``, rounded to nearest even.

    Normal results keep the top 10 fraction bits and round on the 13 dropped ones (a
    carry can overflow into the exponent, and from 65520 on into inf). Below 2**-14 the
    result is subnormal: the value counted in units of 2**-24, i.e. the 24-bit
    significand shifted right by ``126 - E``, rounded to nearest even (tiny values -> +-0).
    NaN stays a quiet NaN with the top payload bits, like the hardware conversion.
    """
    u = _bits32(x)
    xp = xp_of(u)
    sign = (u >> 16) & 0x8000
    exp = ((u >> 23) & 0xFF).astype(xp.int32)
    mant = u & 0x7FFFFF
    # normal float16: exponent E16 = E - 127 + 15
    e16 = exp - 112
    kept = (xp.clip(e16, 0, 31).astype(xp.uint32) << 10) | (mant >> 13)
    dropped = mant & 0x1FFF
    up = (dropped > 0x1000) | ((dropped == 0x1000) & ((kept & 1) == 1))
    normal = xp.where(e16 >= 31, xp.uint32(0x7C00), kept + up.astype(xp.uint32))
    # subnormal float16: k = significand * 2**(E - 126), 0 <= k <= 1024
    significand = xp.where(exp == 0, mant, mant | 0x800000)
    shift = xp.clip(126 - exp, 14, 31).astype(xp.uint32)
    k = significand >> shift
    rest = significand & ((xp.uint32(1) << shift) - 1)
    half = xp.uint32(1) << (shift - 1)
    sub = k + ((rest > half) | ((rest == half) & ((k & 1) == 1))).astype(xp.uint32)
    # inf / NaN
    special = xp.where(mant == 0, xp.uint32(0x7C00), xp.uint32(0x7E00) | (mant >> 13))
    out = xp.where(exp == 255, special, xp.where(e16 >= 1, normal, sub))
    return (out | sign).astype(xp.uint16)


def float16_bits_to_float32(h):
    """float32 values of float16 bit patterns (exact; float32 holds every float16)."""
    xp = xp_of(h)
    h = xp.asarray(h).astype(xp.uint32)
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    normal = ((exp + 112) << 23) | (mant << 13)
    sub = (mant.astype(xp.float32) * xp.float32(2.0 ** -24)).view(xp.uint32)
    special = xp.uint32(0x7F800000) | (mant << 13)
    bits = xp.where(exp == 0, sub, xp.where(exp == 31, special, normal)) | sign
    return bits.astype(xp.uint32).view(xp.float32)


def round_to_bfloat16(x):
    """float32 ``x`` rounded to the nearest bfloat16 value, returned as float32."""
    return bfloat16_bits_to_float32(float32_to_bfloat16_bits(x))


def round_to_float16(x):
    """float32 ``x`` rounded to the nearest float16 value, returned as float32."""
    return float16_bits_to_float32(float32_to_float16_bits(x))


def flush_subnormals(x):
    """float32 ``x`` with subnormals (0 < |x| < 2**-126) replaced by a zero of the same sign.

    This is CUDA's flush-to-zero mode (``-ftz=true``, implied by ``--use_fast_math``, which
    bitsandbytes' kernels are built with): ``.ftz`` instructions read a subnormal operand as
    +-0 and write a subnormal result as +-0. Normal values, zeros, inf and NaN pass unchanged.
    """
    xp = xp_of(x)
    tiny = xp.float32(np.finfo(np.float32).tiny)                      # 2**-126
    return xp.where(xp.abs(x) < tiny, xp.copysign(xp.float32(0), x), x).astype(xp.float32)
