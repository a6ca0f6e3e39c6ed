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
