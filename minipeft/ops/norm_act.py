"""Activations and normalization: GELU, softmax, log-softmax, layer norm, dropout.

References: GELU, tanh form (Hendrycks & Gimpel 2016, §2, as GPT-2 uses it); layer
normalization (Ba et al. 2016, eq. 4, over the last axis); inverted dropout (Srivastava
et al. 2014, scaled at training time so inference is the identity).
"""
from __future__ import annotations

import math

from ..backend import xp_of
from ..engine import Function
from ..random import generator
from .common import array_module

_GELU_C = math.sqrt(2.0 / math.pi)


class GELU(Function):
    """GELU, tanh form as in GPT-2: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    @staticmethod
    def forward(ctx, x):
        xp = array_module(x)
        ctx.save_for_backward(x)
        u = _GELU_C * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1 + xp.tanh(u))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        xp = xp_of(x)
        u = _GELU_C * (x + 0.044715 * x * x * x)
        t = xp.tanh(u)
        du = _GELU_C * (1 + 3 * 0.044715 * x * x)  # du/dx
        return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du),)


def gelu(x):
    return GELU.apply(x)


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, axis):
        xp = array_module(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))  # stable: the max is subtracted
        out = e / e.sum(axis=axis, keepdims=True)
        ctx.axis = axis
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return out * (g - (g * out).sum(axis=ctx.axis, keepdims=True)), None


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, axis):
        xp = array_module(x)
        z = x - x.max(axis=axis, keepdims=True)
        out = z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
        ctx.axis = axis
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        xp = xp_of(out)
        return g - xp.exp(out) * g.sum(axis=ctx.axis, keepdims=True), None


def softmax(x, axis: int = -1):
    return Softmax.apply(x, axis)


def log_softmax(x, axis: int = -1):
    return LogSoftmax.apply(x, axis)


class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (Ba et al. 2016)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        xp = array_module(x)
        nx, nw = ctx.needs_input_grad[:2]
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
        xhat = (x - mu) * rstd  # (..., C)
        ctx.save_for_backward(xhat if (nx or nw) else None, rstd if nx else None, weight if nx else None)
        return xhat * weight + bias

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        nx, nw, nb = ctx.needs_input_grad[:3]
        lead = tuple(range(g.ndim - 1))
        gw = (g * xhat).sum(axis=lead) if nw else None
        gb = g.sum(axis=lead) if nb else None
        gx = None
        if nx:
            gxhat = g * w
            gx = rstd * (
                gxhat
                - gxhat.mean(axis=-1, keepdims=True)
                - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True)
            )
        return gx, gw, gb, None


def layer_norm(x, weight, bias, eps: float = 1e-5):
    return LayerNorm.apply(x, weight, bias, eps)


class Dropout(Function):
    @staticmethod
    def forward(ctx, x, p, rng):
        keep = rng.random(x.shape) >= p  # (...) bool, 1 byte per element
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return x * keep * x.dtype.type(ctx.scale)

    @staticmethod
    def backward(ctx, g):
        (keep,) = ctx.saved_tensors
        return g * keep * g.dtype.type(ctx.scale), None, None


def dropout(x, p: float, training: bool = True, rng=None):
    """Inverted dropout; ``rng`` is a numpy/cupy Generator (default: the engine's)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if rng is None:
        rng = generator(x.device)
    return Dropout.apply(x, p, rng)
