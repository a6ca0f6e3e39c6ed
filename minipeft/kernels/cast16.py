"""float32 -> float16 / bfloat16 casts (with zero padding) for mixed precision's 16-bit operands.

The twin is :func:`minipeft.amp.cast_16bit` (CuPy's ``astype``, and a zero-filled array the
cast is copied into when an axis is padded). On the H200, CuPy's float32 -> bfloat16 ``astype``
ran at a fraction of the copy rate: 219 casts took 8.3 ms of a 48 ms bfloat16 training step of
GPT-2 small (``benchmarks/results/h200-2026-12-02/prof_bf16.log``), and a padded cast is two
passes (the zeros, then the copy); a strided view (attention's q, k, v, (B, H, T, D) views of
c_attn's output) went through CuPy's generic strided copy (72 casts, 3.7 ms of the same step after the
flat casts moved here). Here one pass reads 4 bytes and writes 2 per element, 16-byte loads where the
pointers allow. Same bits as CuPy's cast (round to nearest even; a NaN stays a
NaN); ``tests/kernels/test_cast16.py`` checks them against CuPy and the course's rounding.
"""
from __future__ import annotations

import numpy as np

from ._module import MAX_GRID, THREADS, blocks, cupy, i32, i64, kernel


def applies(a, dtype, n=None, axis=-1) -> bool:
    """A float32 CuPy array with 1 to 4 axes: C-contiguous, padded on its first or last axis (if at all);
    or any strided view (of whole float32 elements, not padded)."""
    from ..fast import float32_on_gpu

    if not float32_on_gpu(a, contiguous=False) or not 1 <= a.ndim <= 4:
        return False
    if not a.flags.c_contiguous:
        return n is None and all(s % 4 == 0 for s in a.strides)
    return n is None or axis % a.ndim in (0, a.ndim - 1)


def cast_16bit_cuda(a, dtype, n=None, axis=-1):
    """``a`` rounded to ``dtype`` (float16 or ml_dtypes' bfloat16), ``axis`` zero-padded to ``n``."""
    cp = cupy()
    dtype = np.dtype(dtype)
    suffix = "bf16" if dtype.name == "bfloat16" else "f16"
    if dtype.name not in ("bfloat16", "float16"):
        raise TypeError(f"cast_16bit_cuda casts to float16 or bfloat16, got {dtype}")
    axis = axis % a.ndim
    if not a.flags.c_contiguous:  # a strided view (attention's q, k, v): gathered into a contiguous array
        y = cp.empty(a.shape, dtype=dtype)
        if a.size:
            shape = (1,) * (4 - a.ndim) + a.shape
            strides = (0,) * (4 - a.ndim) + tuple(s // 4 for s in a.strides)  # in elements
            kernel("cast16.cu", f"cast_strided_{suffix}")((blocks(a.size),), (THREADS,), (
                a, y, i64(a.size), *(i64(d) for d in shape[1:]), *(i64(s) for s in strides)))
        return y
    if n is None or a.shape[axis] == n:
        y = cp.empty(a.shape, dtype=dtype)
        if a.size:
            vec = a.data.ptr % 16 == 0 and y.data.ptr % 8 == 0
            kernel("cast16.cu", f"cast_flat_{suffix}")((blocks(-(-a.size // 4)),), (THREADS,),
                                                       (a, y, i64(a.size), i32(vec)))
        return y
    shape = a.shape[:axis] + (n,) + a.shape[axis + 1:]
    y = cp.empty(shape, dtype=dtype)
    if axis == a.ndim - 1:  # (rows, cols) -> (rows, n)
        rows, cols = int(np.prod(a.shape[:-1])), a.shape[-1]
        rows_p, cols_p = rows, n
    else:                   # axis 0: (rows, cols) -> (n, cols)
        rows, cols = a.shape[0], int(np.prod(a.shape[1:]))
        rows_p, cols_p = n, cols
    if y.size:
        kernel("cast16.cu", f"cast_pad_{suffix}")((int(min(rows_p, MAX_GRID)),), (THREADS,),
                                                  (a, y, i64(rows), i64(cols), i64(rows_p), i64(cols_p)))
    return y
