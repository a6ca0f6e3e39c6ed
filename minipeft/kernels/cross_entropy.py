"""Fused softmax + cross-entropy (with ``ignore_index`` and label smoothing): forward and backward.

The NumPy twin is :class:`minipeft.ops.loss.CrossEntropy`;
:class:`~minipeft.kernels.functions.FusedCrossEntropy` runs these in its place for float32
CuPy logits and saves the same arrays (``probs``, the safe targets, the valid mask), so
the engine's count of saved bytes is the same on either path;
``tests/kernels/test_cross_entropy.py`` checks that they agree. Unlike the twin, the
number of counted rows stays on the device (no host synchronization in the step).
Floor for GPT-2 small at 8 x 512 tokens (logits (4096, 50257), 823 MB in float32): the
forward reads the logits once and writes probs (~0.55 ms at 3 TB/s; the second read of
a row is mostly served by L2), the backward reads probs and writes the gradient
(~0.55 ms); the twin makes about six passes forward and four backward.

``cross_entropy16_*``: the same loss of float16 / bfloat16 logits (the LM head's under
``amp.autocast``) with float32 statistics; the twin and the Function are
:mod:`minipeft.kernels.amp_cross_entropy`. Forward: one read of the 16-bit logits, nothing of size
(N, V) written (the log-sum-exp per row is saved instead of probs); backward: one more read of them
and one write of the 16-bit gradient, already padded for the LM head's backward GEMMs. At 8 x 512
tokens of GPT-2: 412 MB read forward, 412 MB read and 412 MB written backward (~0.14 + 0.27 ms at
3 TB/s), against 823 MB read and 823 MB written forward and the same backward here.
"""
from __future__ import annotations

from ._module import MAX_GRID, cupy, f32, i32, i64, kernel


def cross_entropy_forward(logits, targets, ignore_index: int, label_smoothing: float):
    """``(loss, probs, safe_t, valid, count)`` for logits (N, V) float32 and targets (N,) integers.

    ``loss`` is a 0-d float32 array (NaN when no row counts), ``count`` a 0-d int64 array.
    """
    cp = cupy()
    n, v = logits.shape
    t = cp.ascontiguousarray(targets.astype(cp.int64, copy=False))   # (N,)
    probs = cp.empty_like(logits)                                      # (N, V)
    nll = cp.empty(n, dtype=cp.float32)
    safe_t = cp.empty(n, dtype=cp.int64)
    valid = cp.empty(n, dtype=cp.bool_)
    eps = float(label_smoothing)
    if n:
        kernel("cross_entropy.cu", "cross_entropy_forward")((int(min(n, MAX_GRID)),), (256,), (
            logits, t, i64(n), i32(v), i64(ignore_index), f32(eps), f32(1 - eps), i32(eps != 0.0),
            probs, nll, safe_t, valid))
    count = valid.sum(dtype=cp.int64)                                  # 0-d, stays on the GPU
    loss = nll.sum() / count.astype(cp.float32)                       # 0/0 = NaN when nothing counts
    return loss, probs, safe_t, valid, count


def cross_entropy_backward(g, probs, safe_t, valid, count, label_smoothing: float):
    """dL/dlogits (N, V) for the upstream gradient ``g`` of the mean loss (a 0-d array)."""
    cp = cupy()
    n, v = probs.shape
    g = cp.ascontiguousarray(cp.asarray(g, dtype=cp.float32).reshape(1))
    grad = cp.empty_like(probs)
    eps = float(label_smoothing)
    if n:
        kernel("cross_entropy.cu", "cross_entropy_backward")((int(min(n, MAX_GRID)),), (256,), (
            probs, safe_t, valid, g, count, i64(n), i32(v), f32(1 - eps), f32(eps / v), i32(eps != 0.0), grad))
    return grad


def _rows16(cp, logits):
    """``(logits, ld, suffix, vec)``: 16-bit logits (N, V) whose rows are contiguous (a copy if they were
    not), the elements from one row's start to the next's, the kernels' dtype suffix, and whether the
    rows start on 16-byte boundaries (8-value loads)."""
    name = logits.dtype.name
    if name not in ("float16", "bfloat16") or logits.ndim != 2:
        raise TypeError(f"the 16-bit cross-entropy takes 2-D float16 or bfloat16 logits, got {logits.dtype} "
                        f"{logits.shape}")
    n, v = logits.shape
    if logits.strides[1] != 2 or logits.strides[0] < 2 * v or logits.strides[0] % 2:
        logits = cp.ascontiguousarray(logits)
    ld = logits.strides[0] // 2
    return logits, ld, "bf16" if name == "bfloat16" else "f16", int(ld % 8 == 0 and logits.data.ptr % 16 == 0)


def cross_entropy16_forward(logits, targets, ignore_index: int, label_smoothing: float):
    """``(loss, logits, lse, safe_t, valid, count)`` for 16-bit logits (N, V) (float16 or ml_dtypes'
    bfloat16; rows contiguous, any distance apart: a column view of a padded GEMM output is read in place)
    and targets (N,) integers. ``loss`` is a 0-d float32 array (NaN when no row counts), ``logits`` what
    the kernel read (the backward reads it again), ``lse`` the float32 log-sum-exp of each row (N,),
    ``count`` a 0-d int64 array: all on the GPU."""
    cp = cupy()
    logits, ld, suffix, vec = _rows16(cp, logits)
    n, v = logits.shape
    t = cp.ascontiguousarray(targets.astype(cp.int64, copy=False))   # (N,)
    lse = cp.empty(n, dtype=cp.float32)                                # (N,)
    nll = cp.empty(n, dtype=cp.float32)
    safe_t = cp.empty(n, dtype=cp.int64)
    valid = cp.empty(n, dtype=cp.bool_)
    eps = float(label_smoothing)
    if n:
        kernel("cross_entropy.cu", f"cross_entropy16_forward_{suffix}")((int(min(n, MAX_GRID)),), (256,), (
            logits, i64(ld), t, i64(n), i32(v), i64(ignore_index), f32(eps), f32(1 - eps), i32(eps != 0.0), i32(vec),
            lse, nll, safe_t, valid))
    count = valid.sum(dtype=cp.int64)                                  # 0-d, stays on the GPU
    loss = nll.sum() / count.astype(cp.float32)                       # 0/0 = NaN when nothing counts
    return loss, logits, lse, safe_t, valid, count


def cross_entropy16_backward(g, logits, lse, safe_t, valid, count, label_smoothing: float, ldg: int):
    """dL/dlogits for the upstream gradient ``g`` of the mean loss (a 0-d array): (N, V) in the logits'
    dtype, the view of a new (N, ldg) array (``ldg`` a multiple of 8, >= V) whose columns past V hold zeros."""
    cp = cupy()
    logits, ld, suffix, vec = _rows16(cp, logits)
    n, v = logits.shape
    if ldg < v or ldg % 8:
        raise ValueError(f"the gradient's rows must be a multiple of 8 values, at least V = {v}; got {ldg}")
    g = cp.ascontiguousarray(cp.asarray(g, dtype=cp.float32).reshape(1))
    grad = cp.empty((n, ldg), dtype=logits.dtype)                     # (N, ldg): every value written
    eps = float(label_smoothing)
    if n:
        kernel("cross_entropy.cu", f"cross_entropy16_backward_{suffix}")((int(min(n, MAX_GRID)),), (256,), (
            logits, i64(ld), lse, safe_t, valid, g, count, i64(n), i32(v), i32(ldg), f32(1 - eps), f32(eps / v),
            i32(eps != 0.0), i32(vec), grad))
    return grad[:, :v]                                                 # (N, V)
