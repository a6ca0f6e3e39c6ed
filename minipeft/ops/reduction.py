"""Reductions: sum, mean and max over axes. Backward spreads the gradient back over the
reduced axes (max: only to the maxima, shared equally among ties)."""
from __future__ import annotations

import numpy as np

from ..engine import Function
from .common import array_module


def _norm_axis(axis, ndim) -> tuple:
    """``axis`` (None, an int or a tuple, possibly negative) as a tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(a % ndim for a in axis)


def _expand_back(g, shape, axes, keepdims):
    """The gradient of a reduction, broadcast back to the input's ``shape``."""
    xp = array_module(g)
    if not keepdims:
        for a in sorted(axes):
            g = xp.expand_dims(g, a)
    return xp.broadcast_to(g, shape)


class Sum(Function):
    @staticmethod
    def forward(ctx, x, axis, keepdims):
        ctx.meta = (x.shape, _norm_axis(axis, x.ndim), keepdims)
        return x.sum(axis=ctx.meta[1], keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        shape, axes, keepdims = ctx.meta
        return _expand_back(g, shape, axes, keepdims).copy(), None, None


class Mean(Function):
    @staticmethod
    def forward(ctx, x, axis, keepdims):
        axes = _norm_axis(axis, x.ndim)
        ctx.meta = (x.shape, axes, keepdims)
        ctx.n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
        return x.mean(axis=axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):
        shape, axes, keepdims = ctx.meta
        return _expand_back(g / ctx.n, shape, axes, keepdims).copy(), None, None


class Max(Function):
    """Max over axes; the gradient is shared equally among tied maxima."""

    @staticmethod
    def forward(ctx, x, axis, keepdims):
        axes = _norm_axis(axis, x.ndim)
        out = x.max(axis=axes, keepdims=True)
        mask = x == out
        ctx.save_for_backward(mask)
        ctx.meta = (x.shape, axes, keepdims)
        return out if keepdims else out.reshape([n for i, n in enumerate(x.shape) if i not in axes])

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        shape, axes, keepdims = ctx.meta
        g = _expand_back(g, shape, axes, keepdims)
        count = mask.sum(axis=axes, keepdims=True)
        return (g * mask / count).astype(g.dtype), None, None


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return Sum.apply(x, axis, keepdims)


def mean(x, axis=None, keepdims=False):
    return Mean.apply(x, axis, keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(x, axis, keepdims)
