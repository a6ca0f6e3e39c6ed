"""float32 -> float16 / bfloat16 casts (with zero padding) for mixed precision's 16-bit operands.

The twin is :func:`minipeft.amp.cast_16bit` (CuPy's ``astype``, and a zero-filled array the
cast is copied into when an axis is padded). On the H200, CuPy's float32 -> bfloat16 ``astype``
ran at a fraction of the copy rate: 219 casts took 8.3 ms of a 48 ms bfloat16 training step of
GPT-2 small (``benchmarks/results/h200-2026-12-02/prof_bf16.log``), and a padded cast is two
passes (the zeros, then the copy). Here one pass reads 4 bytes and writes 2 per element, 16-byte
loads where the pointers allow. Same bits as CuPy's cast (round to nearest even; a NaN stays a
NaN); ``tests/kernels/test_cast16.py`` checks them against CuPy and the course's rounding.
"""
from __future__ import annotations

import numpy as np

from ._module import MAX_GRID, THREADS, blocks, cupy, i32, i64, kernel


def applies(a, dtype, n=None, axis=-1) -> bool:
    """A C-contiguous float32 CuPy array with at least one axis, padded on its first or last axis (if at all)."""
    from ..fast import float32_on_gpu

    if not float32_on_gpu(a) or a.ndim == 0:
        return False
    return n is None or axis % a.ndim in (0, a.ndim - 1)


def cast_16bit_cuda(a, dtype, n=None, axis=-1):
    """``a`` rounded to ``dtype`` (float16 or ml_dtypes' bfloat16), ``axis`` zero-padded to ``n``."""
    cp = cupy()
    dtype = np.dtype(dtype)
    suffix = "bf16" if dtype.name == "bfloat16" else "f16"
    if dtype.name not in ("bfloat16", "float16"):
        raise TypeError(f"cast_16bit_cuda casts to float16 or bfloat16, got {dtype}")
    axis = axis % a.ndim
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
