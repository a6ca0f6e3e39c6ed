"""Fused masked, scaled softmax of attention scores (forward) and its backward, in place.

The NumPy twin is :class:`minipeft.ops.attention.Attention`;
:class:`~minipeft.kernels.functions.FusedAttention` runs these in its place for float32 CuPy
arrays; ``tests/kernels/test_attention_softmax.py`` checks that they agree.
Floor for GPT-2 small at B=8, T=512 (scores (8, 12, 512, 512), 100 MB in float32): the
forward reads and writes the scores once (~70 µs at 3 TB/s), the backward reads p and
dp and writes ds (~100 µs); the twin makes 7 and 5 full passes. The two matrix products
around it stay cuBLAS calls.
"""
from __future__ import annotations

from ._module import cupy, f32, i32, i64, kernel


def attn_softmax_forward(s, scale: float, causal: bool, key_mask=None):
    """Turn scores ``s = q k^T`` (B, H, Tq, Tk), C-contiguous float32, into probabilities in place.

    ``key_mask`` (B, Tk), True where a key may be attended, or None. Returns ``s``.
    """
    cp = cupy()
    B, H, Tq, Tk = s.shape
    n_rows = B * H * Tq
    if key_mask is None:
        km, has = s, 0                                                  # any pointer: not read
    else:
        km, has = cp.ascontiguousarray(key_mask.astype(cp.bool_, copy=False)), 1   # (B, Tk) 1 byte each
    if n_rows and Tk:
        kernel("attention_softmax.cu", "attn_softmax_forward")((-(-n_rows * 32 // 256),), (256,), (
            s, i64(n_rows), i32(Tq), i32(Tk), i32(H), f32(scale), i32(bool(causal)), km, i32(has)))
    return s


def attn_softmax_backward(p, dp, scale: float):
    """``scale * p * (dp - sum(dp * p))`` over the last axis, in place on ``dp`` (returned)."""
    Tk = p.shape[-1]
    n_rows = p.size // Tk if Tk else 0
    if n_rows:
        kernel("attention_softmax.cu", "attn_softmax_backward")((-(-n_rows * 32 // 256),), (256,), (
            p, dp, i64(n_rows), i32(Tk), f32(scale)))
    return dp
