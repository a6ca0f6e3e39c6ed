"""Fused GELU (tanh form) forward and backward: one CUDA kernel each.

The NumPy twin is :class:`minipeft.ops.norm_act.GELU`; :class:`~minipeft.kernels.functions.FusedGELU`
runs these in its place for float32 CuPy arrays; ``tests/kernels/test_gelu.py`` checks that they agree. Floor: forward reads x
and writes y (8 bytes per element), backward reads x and g and writes dx (12 bytes);
on an H100 (~3 TB/s) that is about 35 µs and 50 µs for GPT-2 small's (8*512, 3072) MLP
activation, against ~8 and ~15 full passes for the twin's array expressions.
"""
from __future__ import annotations

from ._module import blocks, cupy, i64, kernel


def gelu_forward(x):
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` of a C-contiguous float32 CuPy array."""
    y = cupy().empty_like(x)
    kernel("gelu.cu", "gelu_forward")((blocks(x.size),), (256,), (x, y, i64(x.size)))
    return y


def gelu_backward(x, g):
    """``g * dGELU/dx`` at ``x`` (both C-contiguous float32 CuPy arrays of one shape)."""
    cp = cupy()
    g = cp.ascontiguousarray(g)
    gx = cp.empty_like(x)
    kernel("gelu.cu", "gelu_backward")((blocks(x.size),), (256,), (x, g, gx, i64(x.size)))
    return gx
