"""Fused layer norm (Ba et al. 2016) forward and backward: one warp per row.

The NumPy twin is :class:`minipeft.ops.norm_act.LayerNorm`;
:class:`~minipeft.kernels.functions.FusedLayerNorm` runs these in its place for float32 CuPy
arrays and saves the same arrays for backward (``xhat`` and ``rstd``), so the engine's
count of saved bytes is the same on either path. ``tests/kernels/test_layernorm.py``
checks that they agree. Floor for GPT-2 small's (8*512, 768) activations: the forward
reads x and writes y and xhat (12 bytes per element, ~12 µs at 3 TB/s), the backward
reads g and xhat and writes dx (12 bytes) plus one more read of both for dw, db; the
twin makes ~8 passes forward and ~12 backward, each a kernel launch.
"""
from __future__ import annotations

import numpy as np

from ..amp import device_dtype
from ._module import cupy, f32, i32, i64, kernel

ROWS_PER_CHUNK = 64  # rows summed by one block of the parameter-gradient kernel


_FORWARD = {"float32": "layernorm_forward", "float16": "layernorm_forward_f16", "bfloat16": "layernorm_forward_bf16"}


def layernorm_forward(x, weight, bias, eps: float, out_dtype: str = "float32"):
    """``(y, xhat, rstd)`` for x (..., C) and weight, bias (C,); rstd has shape (..., 1).

    ``out_dtype`` float16 or bfloat16: y is written in it (the float32 y rounded once, to nearest even:
    :mod:`minipeft.amp_layernorm`); xhat and rstd stay float32."""
    cp = cupy()
    C = x.shape[-1]
    n_rows = x.size // C if C else 0
    weight, bias = cp.ascontiguousarray(weight), cp.ascontiguousarray(bias)
    y_dtype = np.float32 if out_dtype == "float32" else device_dtype(out_dtype)
    y, xhat = cp.empty(x.shape, dtype=y_dtype), cp.empty_like(x)
    rstd = cp.empty(x.shape[:-1] + (1,), dtype=cp.float32)        # (..., 1)
    if n_rows:
        grid = -(-n_rows * 32 // 256)                                   # one warp per row
        kernel("layernorm.cu", _FORWARD[out_dtype])((grid,), (256,), (
            x, weight, bias, f32(eps), i64(n_rows), i32(C), y, xhat, rstd))
    return y, xhat, rstd


def layernorm_backward_x(g, xhat, rstd, weight):
    """``dL/dx`` (..., C) from the upstream gradient ``g`` and the saved ``xhat``, ``rstd``."""
    cp = cupy()
    g = cp.ascontiguousarray(g)
    C = xhat.shape[-1]
    n_rows = xhat.size // C if C else 0
    gx = cp.empty_like(xhat)
    if n_rows:
        grid = -(-n_rows * 32 // 256)
        kernel("layernorm.cu", "layernorm_backward_x")((grid,), (256,), (
            g, xhat, rstd, cp.ascontiguousarray(weight), i64(n_rows), i32(C), gx))
    return gx


def layernorm_backward_params(g, xhat):
    """``(dL/dweight, dL/dbias)``, each (C,): column sums of ``g * xhat`` and ``g``."""
    cp = cupy()
    g = cp.ascontiguousarray(g)
    C = xhat.shape[-1]
    n_rows = xhat.size // C if C else 0
    n_chunks = max(1, -(-n_rows // ROWS_PER_CHUNK))
    part_w = cp.zeros((n_chunks, C), dtype=cp.float32)              # (chunks, C)
    part_b = cp.zeros((n_chunks, C), dtype=cp.float32)
    if n_rows:
        kernel("layernorm.cu", "layernorm_backward_params")(((C + 31) // 32, n_chunks), (32, 8), (
            g, xhat, i64(n_rows), i32(C), i32(ROWS_PER_CHUNK), part_w, part_b))
    return part_w.sum(axis=0), part_b.sum(axis=0)
