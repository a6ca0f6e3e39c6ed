"""CUDA RawKernels for 8-bit block-wise quantization and LLM.int8() row-wise int8, with launchers.

8-bit Optimizers via Block-wise Quantization (Dettmers et al. 2021, arXiv 2110.02861,
Sec. 2.1): per block ``absmax_b = max |x|`` and ``q = nearest index of x * (1/absmax_b)``
in a 256-entry code (the signed dynamic map by default), ties to the even index as
bitsandbytes' CUDA binary search; ``x^ = code[q] * absmax_b``. The kernel binary-searches
the code's float32 midpoints held in shared memory.

LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339, Sec. 3.1): row-wise
``stats = max |x|`` over the last axis (elements with ``|x| >= threshold`` left out) and
``q = rint(x * (127 / stats))`` in int8; one CUDA block per row.

The NumPy twins are :func:`minipeft.quant.blockwise.quantize_blockwise`,
:func:`~minipeft.quant.blockwise.dequantize_blockwise`,
:func:`~minipeft.quant.blockwise.double_quantize` and
:func:`minipeft.quant.int8.int8_vectorwise_quant`; ``tests/kernels`` checks bit equality.
The ``*_cuda`` functions take the twins' arguments and run their checks
(:mod:`minipeft.quant.state`); :mod:`minipeft.kernels` registers them as the twins' fast
paths for CuPy arrays.
"""
from __future__ import annotations

import functools

import numpy as np

from ..backend import device_of, to_numpy
from ..quant.codes import DYNAMIC_SIGNED, midpoints
from ..quant.int8 import outlier_columns
from ..quant.state import (QuantState, blockwise_state, check_blocksize, check_float, check_input, check_out_dtype,
                           mean_f32)
from ._module import aligned_to, as_f32, kernel, log2
from ._module import cupy as _cupy

THREADS = 256          # threads per CUDA block (quantize: more when blocksize/8 > 256)
UNROLL = 4             # 4-byte chunks per dequantize thread; must match UNROLL in the .cu


def _kernel(name: str):
    """The kernel ``name`` of ``quant8bit.cu``, compiled once per device (:mod:`minipeft.kernels._module`)."""
    return kernel("quant8bit.cu", name)


# ---------------------------------------------------------------------------------------
# Tables
def search_table(code) -> tuple[np.ndarray, np.ndarray, int]:
    """``(midpoints float32[256], index map uint8[256], n_mids)`` for the binary search.

    As :func:`minipeft.quant.codes.nearest_code_index`: the float32 midpoints of the
    code's sorted distinct values (+inf past the last), and for each position the first
    index of the code holding that value.
    """
    host = to_numpy(code).astype(np.float32).ravel()
    return _search_table(host.tobytes())


@functools.lru_cache(maxsize=64)
def _search_table(code_bytes: bytes):
    host = np.frombuffer(code_bytes, dtype=np.float32)
    if host.size < 2 or not np.isfinite(host).all():
        raise ValueError("code must hold at least two finite values")
    _, first = np.unique(host, return_index=True)
    t = midpoints(host)
    mids = np.full(256, np.inf, np.float32)
    imap = np.zeros(256, np.uint8)
    mids[: t.size] = t
    imap[: first.size] = first
    return mids, imap, int(t.size)


@functools.lru_cache(maxsize=64)
def _device_search_table(code_bytes: bytes, device_id: int):
    cp = _cupy()
    mids, imap, n_mids = _search_table(code_bytes)
    return cp.asarray(mids), cp.asarray(imap), n_mids


def _table256(cp, code):
    """The code as 256 float32 values on the device (NaN past a shorter code)."""
    t = as_f32(cp, code).reshape(-1)
    if t.size == 256:
        return t
    if t.size > 256:
        raise ValueError(f"an 8-bit code has at most 256 values, got {t.size}")
    return cp.concatenate([t, cp.full(256 - t.size, cp.nan, dtype=cp.float32)])


# ---------------------------------------------------------------------------------------
# 8-bit block-wise
def _launch_quantize(A, code_host: np.ndarray, blocksize: int, offset=None):
    """``(q uint8 (n,), absmax float32 (n_blocks,))`` of ``A - offset`` (offset: 0-d array).

    ``code_host`` is the code as a NumPy array (its search table is cached by value).
    """
    cp = _cupy()
    x = aligned_to(cp, A, 16)                                            # contiguous, n values
    n = x.size
    n_blocks = -(-n // blocksize)
    q = cp.empty(n, dtype=cp.uint8)
    absmax = cp.empty(n_blocks, dtype=cp.float32)
    host = np.ascontiguousarray(code_host, dtype=np.float32).ravel()
    mids, imap, n_mids = _device_search_table(host.tobytes(), cp.cuda.runtime.getDevice())
    group = blocksize // 8
    threads = max(THREADS, group)
    grid = -(-(n_blocks * group) // threads)
    off = absmax if offset is None else cp.asarray(offset, dtype=cp.float32).reshape(1)
    name = "quantize_8bit_f16" if x.dtype == cp.float16 else "quantize_8bit_f32"
    _kernel(name)((grid,), (threads,), (x, np.int64(n), np.int32(log2(blocksize)), mids, imap,
                                         np.int32(n_mids), off, np.int32(offset is not None),
                                         q, absmax))
    return q, absmax


def _launch_quantize_blockwise(A, code, blocksize: int, nested: bool):
    cp = _cupy()
    code_dev = cp.asarray(DYNAMIC_SIGNED if code is None else code, dtype=cp.float32)
    if code_dev.ndim != 1 or not 2 <= code_dev.size <= 256:
        raise ValueError(f"an 8-bit code must be 1-D with 2..256 values, got shape {code_dev.shape}")
    q, absmax = _launch_quantize(A, DYNAMIC_SIGNED if code is None else to_numpy(code), blocksize)
    state = QuantState(absmax=absmax, shape=tuple(A.shape), code=code_dev, blocksize=blocksize,
                       dtype=np.dtype(A.dtype))
    if nested:
        state.absmax, state.offset, state.state2 = double_quantize_cuda(absmax, blocksize=blocksize)
    return q.reshape(A.shape), state


def quantize_blockwise_cuda(A, code=None, *, blocksize: int = 4096, nested: bool = False):
    """8-bit block-wise quantization of a CuPy array: ``(uint8 shaped like A, QuantState)``.

    Bit for bit :func:`minipeft.quant.blockwise.quantize_blockwise`, with its checks.
    """
    if device_of(A) != "cuda":
        raise TypeError(f"quantize_blockwise_cuda expects a CuPy array, got {type(A).__name__}")
    check_input(A, "quantize_blockwise_cuda")
    return _launch_quantize_blockwise(A, code, check_blocksize(blocksize), bool(nested))


def double_quantize_cuda(absmax, *, blocksize: int = 256):
    """Double quantization on the GPU: ``(uint8 codes, offset, state2)`` as the twin's
    :func:`minipeft.quant.blockwise.double_quantize` (offset = its float32 mean, then one
    launch quantizing ``absmax - offset`` with the signed dynamic map)."""
    cp = _cupy()
    absmax = cp.asarray(absmax, dtype=cp.float32)
    offset = mean_f32(absmax)                                          # the twin's own mean
    q2, absmax2 = _launch_quantize(absmax, DYNAMIC_SIGNED, blocksize, offset=offset)
    code = cp.asarray(DYNAMIC_SIGNED)
    state2 = QuantState(absmax=absmax2, shape=tuple(absmax.shape), code=code,
                        blocksize=blocksize, dtype=np.dtype(np.float32))
    return q2.reshape(absmax.shape), offset, state2


def nested_arrays(quant_state):
    """``(qabsmax uint8, code2 float32[256], absmax2 float32, offset float32 (one value), blocksize2)``."""
    cp = _cupy()
    s2 = quant_state.state2
    return (aligned_to(cp, cp.asarray(quant_state.absmax, dtype=cp.uint8), 1), _table256(cp, s2.code),
            as_f32(cp, s2.absmax), as_f32(cp, quant_state.offset), int(s2.blocksize))


def _launch_dequantize_blockwise(A, quant_state, dtype):
    cp = _cupy()
    qs = quant_state
    bs = int(qs.blocksize)
    q = aligned_to(cp, A, 4)
    n = q.size
    n_blocks = -(-n // bs)
    if qs.absmax.size != n_blocks:
        raise ValueError(f"absmax has {qs.absmax.size} blocks but {n} values at blocksize {bs} "
                         f"need {n_blocks}; is the QuantState from another tensor?")
    code = _table256(cp, qs.code)
    out = cp.empty(n, dtype=dtype)                                     # (n,)
    half = np.dtype(dtype) == np.float16
    if qs.nested:
        qabsmax, code2, absmax2, offset, bs2 = nested_arrays(qs)
        args = (code, absmax2, qabsmax, code2, absmax2, offset)
        name = "dequantize_8bit_f16_nested" if half else "dequantize_8bit_f32_nested"
    else:
        absmax = as_f32(cp, qs.absmax)
        bs2 = bs
        args = (code, absmax, q, code, absmax, code)                   # unused slots: any pointer
        name = "dequantize_8bit_f16" if half else "dequantize_8bit_f32"
    chunks = -(-n // 4)                                                # 4 codes per chunk
    grid = max(1, -(-chunks // (THREADS * UNROLL)))
    _kernel(name)((grid,), (THREADS,), (q, np.int64(n)) + args
                  + (np.int32(log2(bs)), np.int32(log2(bs2)), out))
    return out.reshape(A.shape)


def dequantize_blockwise_cuda(A, quant_state=None, dtype=None, *, absmax=None, code=None, blocksize: int = 4096):
    """Inverse of :func:`quantize_blockwise_cuda`: ``code[A] * absmax[block]``, cast once.

    Bit for bit :func:`minipeft.quant.blockwise.dequantize_blockwise`, with its arguments
    (a state, or ``absmax``/``code``/``blocksize``); the nested absmax is reconstructed
    inside the same launch.
    """
    if device_of(A) != "cuda":
        raise TypeError(f"dequantize_blockwise_cuda expects a CuPy array, got {type(A).__name__}")
    quant_state = blockwise_state(A, quant_state, absmax, code, blocksize)
    check_blocksize(quant_state.blocksize)
    dt = check_out_dtype(quant_state.dtype if dtype is None else dtype)
    return _launch_dequantize_blockwise(A, quant_state, dt)


# ---------------------------------------------------------------------------------------
# Row-wise int8 (LLM.int8())
def _launch_int8_vectorwise_quant(A, threshold: float):
    cp = _cupy()
    x = aligned_to(cp, A, 4)
    K = int(A.shape[-1])
    rows = x.size // K
    q = cp.empty((rows, K), dtype=cp.int8)                             # (N, K)
    stats = cp.empty(rows, dtype=cp.float32)                           # (N,)
    name = "int8_rowwise_f16" if x.dtype == cp.float16 else "int8_rowwise_f32"
    _kernel(name)((rows,), (THREADS,), (x, np.int64(K), np.float32(threshold),
                                        np.int32(threshold > 0), q, stats))
    cols = None
    if threshold > 0:
        cols = outlier_columns(A, threshold)
        if cols.size:
            q[:, cols] = 0
    return q.reshape(A.shape), stats, cols


def int8_vectorwise_quant_cuda(A, threshold: float = 0.0):
    """Row-wise absmax int8 of a CuPy array: ``(int8 like A, row_stats (rows,), outlier_cols)``.

    Bit for bit :func:`minipeft.quant.int8.int8_vectorwise_quant`, with its checks.
    """
    if device_of(A) != "cuda":
        raise TypeError(f"int8_vectorwise_quant_cuda expects a CuPy array, got {type(A).__name__}")
    check_float(A, "int8_vectorwise_quant_cuda")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return _launch_int8_vectorwise_quant(A, float(threshold))
