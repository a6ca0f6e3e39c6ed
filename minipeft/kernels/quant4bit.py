"""CUDA RawKernels for 4-bit block-wise quantization (NF4 / FP4 / Int4) and their launchers.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314, Sec. 3): ``absmax_b = max |x|`` per block,
``q = nearest code index of x * (1/absmax_b)``, two indices per byte (even element in the
high nibble), ``x^ = decode[q] * absmax_b``; double quantization stores the absmax as
8-bit codes of ``absmax - mean(absmax)`` in blocks of 256.

The NumPy twins are :func:`minipeft.quant.blockwise.quantize_4bit` and
:func:`minipeft.quant.blockwise.dequantize_4bit`; ``tests/kernels`` checks that the
kernels agree with them bit for bit (packed bytes, absmax, nested state, dequantized
values). The tables the kernels compare against and decode with are the twin's
(:mod:`minipeft.quant.codes`, :mod:`minipeft.quant.state`), never retyped here. Each call
is one kernel launch (double quantization adds the mean of the absmax and one 8-bit
launch, see :mod:`minipeft.kernels.quant8bit`).

:func:`quantize_4bit_cuda` and :func:`dequantize_4bit_cuda` take the twins' arguments and
run their checks; :mod:`minipeft.kernels` registers them as the twins' fast paths for
CuPy arrays, so ``minipeft.quant.quantize_4bit(cupy_array)`` runs the kernel.
"""
from __future__ import annotations

import functools

import numpy as np

from ..backend import device_of
from ..quant import codes
from ..quant.state import (DECODE_4BIT, QuantState, check_4bit_state, check_blocksize, check_input,
                           check_out_dtype, check_quant_type_4bit)
from ._module import aligned_to, as_f32, kernel, log2
from ._module import cupy as _cupy
from .quant8bit import double_quantize_cuda, nested_arrays

THREADS = 256          # threads per CUDA block (quantize: more when blocksize/8 > 256)
UNROLL = 4             # 4-byte chunks per dequantize thread; must match UNROLL in the .cu


def _kernel(name: str):
    """The kernel ``name`` of ``quant4bit.cu``, compiled once per device (:mod:`minipeft.kernels._module`)."""
    return kernel("quant4bit.cu", name)


# ---------------------------------------------------------------------------------------
# Tables (host NumPy, built once from the twin's modules; device copies cached per device)
@functools.lru_cache(maxsize=None)
def decision_table(quant_type: str):
    """``(thresholds float32[16], index map uint8[16], fp4)``: the kernel's quantizer.

    The index of a scaled value s is ``map[#{k : thresholds[k] < a}]`` with ``a = s`` (or
    ``|s|`` and the sign in bit 3 for FP4); unused thresholds are +inf. The thresholds are
    the twin's: ``codes.NF4_THRESHOLDS`` for NF4 (bitsandbytes' literals),
    ``codes.FP4_THRESHOLDS`` and ``FP4_RANK_TO_CODE`` for FP4, and for any other code the
    float32 midpoints of its sorted distinct values mapped back to the first index holding
    each value (``codes.nearest_code_index``).
    """
    thr = np.full(16, np.inf, np.float32)
    imap = np.zeros(16, np.uint8)
    if quant_type == "fp4":
        t, m = codes.FP4_THRESHOLDS, codes.FP4_RANK_TO_CODE
    elif quant_type == "nf4":
        t, m = codes.NF4_THRESHOLDS, np.arange(16)
    else:
        code = codes.get_4bit_type(quant_type)
        _, m = np.unique(code, return_index=True)
        t = codes.midpoints(code)
    thr[: len(t)] = t
    imap[: len(m)] = m
    return thr, imap, quant_type == "fp4"


def decode_table(quant_type: str) -> np.ndarray | None:
    """The 16 values the twin multiplies absmax by, or None when it uses the state's code.

    :mod:`minipeft.quant.blockwise` decodes NF4 and FP4 from bitsandbytes' built-in tables
    (``quant.state.DECODE_4BIT``: FP4 index 8 is -0.0 there) and anything else from
    ``quant_state.code``.
    """
    table = DECODE_4BIT.get(quant_type)
    return None if table is None else np.asarray(table, np.float32)


@functools.lru_cache(maxsize=None)
def _device_decision(quant_type: str, device_id: int):
    cp = _cupy()
    thr, imap, fp4 = decision_table(quant_type)
    return cp.asarray(thr), cp.asarray(imap), fp4


@functools.lru_cache(maxsize=None)
def _device_decode(quant_type: str, device_id: int):
    table = decode_table(quant_type)
    return None if table is None else _cupy().asarray(table)


@functools.lru_cache(maxsize=None)
def _device_code(quant_type: str, device_id: int):
    return _cupy().asarray(codes.get_4bit_type(quant_type))


# ---------------------------------------------------------------------------------------
# Quantize
def _launch_quantize_4bit(A, blocksize: int, quant_type: str, compress_statistics: bool):
    cp = _cupy()
    dev = cp.cuda.runtime.getDevice()
    x = aligned_to(cp, A, 16)                                            # contiguous, n values
    n = x.size
    n_blocks = -(-n // blocksize)
    packed = cp.empty(((n + 1) // 2, 1), dtype=cp.uint8)               # ((n+1)//2, 1)
    absmax = cp.empty(n_blocks, dtype=cp.float32)                      # (n_blocks,)
    thr, imap, fp4 = _device_decision(quant_type, dev)
    group = blocksize // 8                                             # threads per block of B
    threads = max(THREADS, group)
    grid = -(-(n_blocks * group) // threads)
    name = "quantize_4bit_f16" if x.dtype == cp.float16 else "quantize_4bit_f32"
    _kernel(name)((grid,), (threads,), (x, np.int64(n), np.int32(log2(blocksize)), thr, imap,
                                         np.int32(fp4), packed, absmax))
    state = QuantState(absmax=absmax, shape=tuple(A.shape),
                          code=_device_code(quant_type, dev).copy(), blocksize=blocksize,
                          quant_type=quant_type, dtype=np.dtype(A.dtype))
    if compress_statistics:
        state.absmax, state.offset, state.state2 = double_quantize_cuda(absmax, blocksize=256)
    return packed, state


def quantize_4bit_cuda(x, blocksize: int = 64, quant_type: str = "fp4",
                       compress_statistics: bool = False):
    """4-bit block-wise quantization of a CuPy array: ``(packed uint8 ((n+1)//2, 1), QuantState)``.

    The same result, bit for bit, and the same checks as
    :func:`minipeft.quant.blockwise.quantize_4bit` (whose fast path this is for CuPy input).
    """
    if device_of(x) != "cuda":
        raise TypeError(f"quantize_4bit_cuda expects a CuPy array, got {type(x).__name__}; "
                        "use minipeft.quant.blockwise.quantize_4bit for NumPy arrays")
    check_input(x, "quantize_4bit_cuda")
    blocksize = check_blocksize(blocksize)
    check_quant_type_4bit(quant_type)
    return _launch_quantize_4bit(x, blocksize, quant_type, bool(compress_statistics))


# ---------------------------------------------------------------------------------------
# Dequantize
def _dequantize_launch(A, quant_state, dtype, out=None):
    """``(kernel, grid, block, args, out)`` of one dequantize launch, checked."""
    cp = _cupy()
    dev = cp.cuda.runtime.getDevice()
    qs = quant_state
    bs = int(qs.blocksize)
    shape = tuple(qs.shape)
    n = int(np.prod(shape, dtype=np.int64))
    packed = aligned_to(cp, A, 4)
    if packed.size != (n + 1) // 2:
        raise ValueError(f"{n} values need {(n + 1) // 2} packed bytes, got {packed.size}")
    n_blocks = -(-n // bs)
    if qs.absmax.size != n_blocks:
        raise ValueError(f"absmax has {qs.absmax.size} blocks but {n} values at blocksize {bs} "
                         f"need {n_blocks}; is the QuantState from another tensor?")
    decode = _device_decode(qs.quant_type, dev)
    if decode is None:
        decode = as_f32(cp, qs.code)
        if decode.size != 16:
            raise ValueError(f"a 4-bit code has 16 values, got {decode.size}")
    if out is None:
        out = cp.empty(shape, dtype=dtype)                             # shape of the original
    half = out.dtype == cp.float16
    if qs.nested:
        qabsmax, code2, absmax2, offset, bs2 = nested_arrays(qs)
        ptrs = (decode, absmax2, qabsmax, code2, absmax2, offset)
        name = "dequantize_4bit_f16_nested" if half else "dequantize_4bit_f32_nested"
    else:
        absmax = as_f32(cp, qs.absmax)
        bs2 = 256
        ptrs = (decode, absmax, packed, decode, absmax, decode)        # unused slots: any pointer
        name = "dequantize_4bit_f16" if half else "dequantize_4bit_f32"
    chunks = -(-((n + 1) // 2) // 4)                                   # 4 packed bytes each
    grid = max(1, -(-chunks // (THREADS * UNROLL)))
    args = (packed, np.int64(n)) + ptrs + (np.int32(log2(bs)), np.int32(log2(bs2)), out)
    return kernel("quant4bit.cu", name, dev), (grid,), (THREADS,), args, out


def _launch_dequantize_4bit(A, quant_state, dtype):
    fn, grid, block, args, out = _dequantize_launch(A, quant_state, dtype)
    fn(grid, block, args)
    return out


def prepare_dequantize_4bit(packed, quant_state, out_dtype=None):
    """A zero-argument function that dequantizes into one preallocated output and returns it.

    Checks, table look-ups and the allocation happen once, here; each call is just the
    kernel launch (what a frozen ``Linear4bit`` weight needs on every forward). The
    returned array is overwritten by the next call.
    """
    dt = check_out_dtype(quant_state.dtype if out_dtype is None else out_dtype)
    fn, grid, block, args, out = _dequantize_launch(packed, quant_state, dt)

    def run():
        fn(grid, block, args)
        return out

    return run


def dequantize_4bit_cuda(packed, quant_state, dtype=None):
    """Inverse of :func:`quantize_4bit_cuda` on the GPU: ``decode[q] * absmax[block]``, cast once.

    ``dtype`` is float16 or float32 (default: the state's dtype). Bit for bit the result
    of :func:`minipeft.quant.blockwise.dequantize_4bit` (whose fast path this is for CuPy
    input); the nested absmax is reconstructed inside the same launch.
    """
    if device_of(packed) != "cuda":
        raise TypeError(f"dequantize_4bit_cuda expects a CuPy array, got {type(packed).__name__}")
    check_4bit_state(packed, quant_state)
    check_blocksize(quant_state.blocksize)
    dt = check_out_dtype(quant_state.dtype if dtype is None else dtype)
    return _launch_dequantize_4bit(packed, quant_state, dt)
