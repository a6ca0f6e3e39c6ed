"""Block-wise quantization with any code: 8-bit (dynamic map) and 4-bit (NF4/FP4/Int4).

8-bit Optimizers via Block-wise Quantization (Dettmers et al. 2021, arXiv 2110.02861,
Sec. 2.1): split the flattened tensor into blocks of B values, scale each block by its
absolute maximum and store the index of the nearest code value,

    c_b = max_i |x_i| (block b)          q_i = argmin_j |code[j] - x_i / c_b|
    x̂_i = code[q_i] * c_b                |x_i - x̂_i| <= h(code) * c_b

so one outlier only costs precision inside its own block. QLoRA (Dettmers et al. 2023,
arXiv 2305.14314, Sec. 3) uses 4-bit NF4 codes at B = 64 and *double quantization*:
the float32 block constants c are themselves quantized to 8 bits in blocks of 256,
after subtracting their mean, which takes the scale cost from 32/64 = 0.5 to
8/64 + 32/(64*256) = 0.127 bits per parameter.

Everything follows bitsandbytes' CUDA kernels bit for bit: float32 in flush-to-zero mode
(the kernels are built with ``--use_fast_math``: subnormals read and written as +-0),
absmax per block, ``x * float32(1/absmax)`` (a reciprocal, then a multiply), the nearest
code with bitsandbytes' tie rules (8-bit: float32 midpoints, even index on a tie; NF4 and
FP4: the CUDA literal thresholds, ties to the lower index / smaller magnitude), two 4-bit
indices per byte with the even element in the high nibble, odd lengths padded with 0.0,
FP4 index 0b1000 decoded as -0.0, all-zero blocks stored as index 0 with absmax 0 (the
CUDA result; they dequantize to zeros, except under double quantization, whose
reconstructed absmax is not exactly 0 - as in bitsandbytes). Only the float32
mean used as the double-quantization offset can differ by an ulp from PyTorch's CUDA
reduction (its summation order is not reproducible); see :func:`double_quantize`.

All functions take NumPy or CuPy arrays (``xp = xp_of(A)``); codes are small NumPy
tables moved to the array's device.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .. import fast
from ..backend import xp_of
from .codes import DYNAMIC_SIGNED, fp4_index, get_4bit_type, nearest_code_index, nf4_index
from .floats import flush_subnormals
from .state import (DECODE_4BIT, QUANT_TYPES_4BIT, QuantState, blockwise_state, check_4bit_state,  # noqa: F401
                    check_blocksize, check_input, check_out_dtype, check_quant_type_4bit, mean_f32)

ZERO_BLOCK_INDEX = 0   # what bitsandbytes' CUDA kernels store for an all-zero block (0 * inf = NaN)


# ---------------------------------------------------------------------------------------
# Blocks
def _quiet(xp):
    """NumPy warns on 1/0 and 0*inf; those are intended here (CuPy never warns)."""
    if xp is np:
        return np.errstate(divide="ignore", over="ignore", invalid="ignore")
    return contextlib.nullcontext()


def _to_blocks(A, blocksize: int):
    """Flatten row-major, pad with zeros to whole blocks; absmax and ``x * (1/absmax)``.

    In flush-to-zero float32, as the CUDA kernel: subnormal inputs count as +-0 (a block
    of subnormals has absmax 0), and a subnormal reciprocal or product becomes +-0. The
    reciprocal of a zero absmax is inf and ``0 * inf`` is NaN: every element of an
    all-zero block comes out NaN, which fails every comparison of CUDA's search and lands
    on index 0 (see :func:`_nan_to_zero_index`).
    """
    xp = xp_of(A)
    flat = flush_subnormals(A.reshape(-1).astype(xp.float32))
    n = flat.size
    n_blocks = -(-n // blocksize)
    blocks = xp.zeros(n_blocks * blocksize, dtype=xp.float32)
    blocks[:n] = flat
    blocks = blocks.reshape(n_blocks, blocksize)                       # (n_blocks, B)
    absmax = xp.abs(blocks).max(axis=1)                                # (n_blocks,)
    with _quiet(xp):
        recip = flush_subnormals(xp.float32(1) / absmax)               # reciprocal, then multiply
        scaled = flush_subnormals(blocks * recip[:, None])
    return scaled, absmax, n


def _nan_to_zero_index(idx, scaled):
    """Index ZERO_BLOCK_INDEX (0) where the scaled value is NaN, as bitsandbytes' CUDA."""
    xp = xp_of(idx)
    return xp.where(xp.isnan(scaled), ZERO_BLOCK_INDEX, idx)


def _from_blocks(values, absmax, blocksize: int, n: int, shape, dtype):
    """``values * absmax[block]`` in flush-to-zero float32, cast once to ``dtype``, in ``shape``."""
    xp = xp_of(values)
    n_blocks = absmax.size
    if n_blocks != -(-n // blocksize):
        raise ValueError(f"absmax has {n_blocks} blocks but {n} values at blocksize {blocksize} "
                         f"need {-(-n // blocksize)}; is the QuantState from another tensor?")
    padded = xp.zeros(n_blocks * blocksize, dtype=xp.float32)
    padded[:n] = values
    scale = flush_subnormals(absmax.astype(xp.float32))[:, None]
    out = flush_subnormals(padded.reshape(n_blocks, blocksize) * scale)
    return out.reshape(-1)[:n].astype(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------
# 8-bit
@fast.dispatch  # CuPy arrays: minipeft/kernels/quant8bit.cu, bit for bit
def quantize_blockwise(A, code=None, *, blocksize: int = 4096, nested: bool = False):
    """8-bit block-wise quantization: ``(uint8 indices shaped like A, QuantState)``.

    ``code`` defaults to the signed dynamic map; ties between two code values go to the
    even index, as bitsandbytes' CUDA binary search does. ``nested=True`` quantizes the
    absmax again (offset = their mean, same blocksize), like bitsandbytes.
    """
    check_input(A, "quantize_blockwise")
    blocksize = check_blocksize(blocksize)
    xp = xp_of(A)
    code = xp.asarray(DYNAMIC_SIGNED if code is None else code, dtype=xp.float32)
    if code.ndim != 1 or not 2 <= code.size <= 256:
        raise ValueError(f"an 8-bit code must be 1-D with 2..256 values, got shape {code.shape}")
    scaled, absmax, n = _to_blocks(A, blocksize)                       # (n_blocks, B)
    idx = nearest_code_index(scaled, code, tie="even")
    idx = _nan_to_zero_index(idx, scaled)
    q = idx.reshape(-1)[:n].astype(xp.uint8).reshape(A.shape)
    state = QuantState(absmax=absmax, shape=tuple(A.shape), code=code, blocksize=blocksize,
                       dtype=np.dtype(A.dtype))
    if nested:
        qabsmax, offset, state2 = double_quantize(absmax, blocksize=blocksize)
        state.absmax, state.offset, state.state2 = qabsmax, offset, state2
    return q, state


@fast.dispatch  # CuPy arrays: minipeft/kernels/quant8bit.cu, bit for bit
def dequantize_blockwise(A, quant_state: QuantState | None = None, *, absmax=None, code=None,
                         blocksize: int = 4096, dtype=None):
    """Inverse of :func:`quantize_blockwise`: ``code[A] * absmax[block]`` in float32.

    Pass the ``quant_state``, or ``absmax`` (and optionally ``code``, ``blocksize``).
    The result has the state's dtype unless ``dtype`` is given.
    """
    quant_state = blockwise_state(A, quant_state, absmax, code, blocksize)
    bs = check_blocksize(quant_state.blocksize)
    out_dtype = check_out_dtype(quant_state.dtype if dtype is None else dtype)
    xp = xp_of(A)
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = double_dequantize(absmax, quant_state.offset, quant_state.state2)
    table = xp.asarray(quant_state.code, dtype=xp.float32)
    return _from_blocks(table[A.reshape(-1)], absmax, bs, A.size, A.shape, out_dtype)


def double_quantize(absmax, *, blocksize: int = 256, offset=None):
    """Double quantization of float32 block constants (QLoRA Sec. 3, "Double Quantization").

    ``offset = mean(absmax)``; ``absmax - offset`` (centred, so the signed map is used
    on both sides) goes through 8-bit :func:`quantize_blockwise` with the signed dynamic
    map at ``blocksize`` (256 for 4-bit weights). Returns ``(uint8 codes, offset,
    state2)``. Pass ``offset`` to reuse a given one (e.g. bitsandbytes' own, to compare
    bit for bit, since float32 means differ by an ulp between summation orders).
    """
    xp = xp_of(absmax)
    absmax = absmax.astype(xp.float32)
    offset = mean_f32(absmax) if offset is None else xp.asarray(offset, dtype=xp.float32)
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=blocksize)
    return qabsmax, offset, state2


def double_dequantize(qabsmax, offset, state2: QuantState):
    """float32 absmax back from its 8-bit codes: ``code[q] * absmax2[i // 256] + offset``."""
    xp = xp_of(qabsmax)
    deq = dequantize_blockwise(qabsmax, state2, dtype=np.float32)
    return (deq + xp.asarray(offset, dtype=xp.float32)).astype(xp.float32)


# ---------------------------------------------------------------------------------------
# 4-bit
@fast.dispatch  # CuPy arrays: minipeft/kernels/quant4bit.cu, bit for bit
def quantize_4bit(A, *, blocksize: int = 64, compress_statistics: bool = False,
                  quant_type: str = "fp4"):
    """4-bit block-wise quantization, packed two per byte: ``(uint8 ((n+1)//2, 1), QuantState)``.

    ``quant_type`` is ``'nf4'``, ``'fp4'`` (bitsandbytes' default, kept for parity: QLoRA
    asks for ``'nf4'``) or ``'int4'``. Byte j holds element 2j in its high nibble and
    2j+1 in its low nibble; an odd length is padded with 0.0 (NF4 index 7, FP4 index 0).
    ``compress_statistics=True`` double-quantizes the absmax (blocks of 256).
    """
    check_input(A, "quantize_4bit")
    blocksize = check_blocksize(blocksize)
    check_quant_type_4bit(quant_type)
    xp = xp_of(A)
    code = xp.asarray(get_4bit_type(quant_type))
    scaled, absmax, n = _to_blocks(A, blocksize)                       # (n_blocks, B)
    if quant_type == "fp4":
        idx = fp4_index(scaled)
    elif quant_type == "nf4":
        idx = nf4_index(scaled)
    else:
        idx = nearest_code_index(scaled, code, tie="lower")
    idx = _nan_to_zero_index(idx, scaled).astype(xp.uint8)
    idx = idx.reshape(-1)[: n + (n % 2)]                               # the pad 0.0 when n is odd
    packed = ((idx[0::2] << 4) | idx[1::2]).astype(xp.uint8).reshape(-1, 1)  # ((n+1)//2, 1)
    state = QuantState(absmax=absmax, shape=tuple(A.shape), code=code, blocksize=blocksize,
                       quant_type=quant_type, dtype=np.dtype(A.dtype))
    if compress_statistics:
        qabsmax, offset, state2 = double_quantize(absmax, blocksize=256)
        state.absmax, state.offset, state.state2 = qabsmax, offset, state2
    return packed, state


def unpack_4bit(packed, n: int):
    """The ``n`` 4-bit indices in a packed byte array (high nibble first)."""
    xp = xp_of(packed)
    b = packed.reshape(-1)
    if b.size != (n + 1) // 2:
        raise ValueError(f"{n} values need {(n + 1) // 2} packed bytes, got {b.size}")
    return xp.stack([b >> 4, b & 0xF], axis=-1).reshape(-1)[:n]        # (n,)


@fast.dispatch  # CuPy arrays: minipeft/kernels/quant4bit.cu, bit for bit
def dequantize_4bit(A, quant_state: QuantState, *, dtype=None):
    """Inverse of :func:`quantize_4bit`: ``code[q] * absmax[block]`` in float32, cast once.

    NF4 and FP4 decode as bitsandbytes' CUDA kernel does, from its built-in tables rather
    than ``quant_state.code``: FP4 is ``magnitude[q & 7] * absmax * sign`` with the sign
    from bit 3, so index 0b1000 gives -0.0 (bitsandbytes' code tensor holds +0.0 there).
    ``dtype`` is float32, float16 or bfloat16 (``'bfloat16'``: an ``ml_dtypes.bfloat16``
    array, each float32 value rounded once to nearest even, what QLoRA's bfloat16 compute
    multiplies with; :func:`minipeft.quant.floats.round_to_bfloat16` gives the same values).
    """
    check_4bit_state(A, quant_state)
    xp = xp_of(A)
    bs = check_blocksize(quant_state.blocksize)
    out_dtype = check_out_dtype(quant_state.dtype if dtype is None else dtype, bfloat16=True)
    n = int(np.prod(quant_state.shape, dtype=np.int64))
    idx = unpack_4bit(A, n)
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = double_dequantize(absmax, quant_state.offset, quant_state.state2)
    table = xp.asarray(DECODE_4BIT.get(quant_state.quant_type, quant_state.code),
                       dtype=xp.float32)
    return _from_blocks(table[idx], absmax, bs, n, quant_state.shape, out_dtype)


def quantize_nf4(A, *, blocksize: int = 64, compress_statistics: bool = False):
    """:func:`quantize_4bit` with ``quant_type='nf4'`` (QLoRA's data type)."""
    return quantize_4bit(A, blocksize=blocksize, compress_statistics=compress_statistics,
                         quant_type="nf4")


def quantize_fp4(A, *, blocksize: int = 64, compress_statistics: bool = False):
    """:func:`quantize_4bit` with ``quant_type='fp4'``."""
    return quantize_4bit(A, blocksize=blocksize, compress_statistics=compress_statistics,
                         quant_type="fp4")


# ---------------------------------------------------------------------------------------
# Storage arithmetic
def bits_per_parameter(bits: int = 4, blocksize: int = 64, double_quant: bool = False, *,
                       scale_bits: int = 32, nested_blocksize: int = 256,
                       nested_bits: int = 8, numel: int | None = None) -> float:
    """Storage bits per quantized parameter, block constants included.

    Without ``numel`` (the large-tensor limit):
    plain ``bits + scale_bits / blocksize`` (4 + 32/64 = 4.5);
    double quantization ``bits + nested_bits / blocksize
    + scale_bits / (blocksize * nested_blocksize)`` (4 + 8/64 + 32/16384 = 4.126953125).
    With ``numel``: the exact count for that many values (whole bytes of packed data,
    partial last blocks, and the one float32 offset of double quantization).
    """
    for name, v in (("bits", bits), ("blocksize", blocksize), ("scale_bits", scale_bits),
                    ("nested_blocksize", nested_blocksize), ("nested_bits", nested_bits)):
        if int(v) <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if numel is None:
        if double_quant:
            return bits + nested_bits / blocksize + scale_bits / (blocksize * nested_blocksize)
        return bits + scale_bits / blocksize
    if numel <= 0:
        raise ValueError(f"numel must be positive, got {numel}")
    n_blocks = -(-numel // blocksize)
    total = 8 * (-(-numel * bits // 8))                                # packed data, whole bytes
    if double_quant:
        total += n_blocks * nested_bits + (-(-n_blocks // nested_blocksize)) * scale_bits
        total += 32                                                    # the float32 offset
    else:
        total += n_blocks * scale_bits
    return total / numel
