"""Elementwise ops: the four arithmetic operators, ``where``, and the unary functions.

Binary ops broadcast like NumPy, so each gradient is summed back to its input's shape
(:func:`~minipeft.ops.common.unbroadcast`). A Function saves only what a *needed*
gradient uses: d(ab)/da needs b, so ``a * frozen_b`` keeps ``b`` only if ``a`` trains.
"""
from __future__ import annotations

from ..backend import xp_of
from ..engine import Function, Tensor
from .common import array_module, pair, shape_of, unbroadcast

# -------------------------------------------------------------------------- binary


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (shape_of(a), shape_of(b))
        return a + b

    @staticmethod
    def backward(ctx, g):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(g, sa) if na else None, unbroadcast(g, sb) if nb else None)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (shape_of(a), shape_of(b))
        return a - b

    @staticmethod
    def backward(ctx, g):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(g, sa) if na else None, unbroadcast(-g, sb) if nb else None)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        na, nb = ctx.needs_input_grad
        # d(ab)/da needs b, d(ab)/db needs a: save only what a needed gradient uses
        ctx.save_for_backward(b if na else None, a if nb else None)
        ctx.shapes = (shape_of(a), shape_of(b))
        return a * b

    @staticmethod
    def backward(ctx, g):
        b, a = ctx.saved_tensors
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(g * b, sa) if na else None, unbroadcast(g * a, sb) if nb else None)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b)  # d(a/b)/da needs only b
        ctx.shapes = (shape_of(a), shape_of(b))
        return a / b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        ga = unbroadcast(g / b, sa) if na else None
        gb = unbroadcast(-g * a / (b * b), sb) if nb else None
        return ga, gb


def add(a, b) -> Tensor:
    return Add.apply(*pair(a, b))


def sub(a, b) -> Tensor:
    return Sub.apply(*pair(a, b))


def mul(a, b) -> Tensor:
    return Mul.apply(*pair(a, b))


def div(a, b) -> Tensor:
    return Div.apply(*pair(a, b))


class Where(Function):
    """``cond ? a : b`` elementwise (``cond`` is a boolean array, not differentiated)."""

    @staticmethod
    def forward(ctx, cond, a, b):
        xp = array_module(a, b, cond)
        ctx.save_for_backward(cond)
        ctx.shapes = (shape_of(a), shape_of(b))
        return xp.where(cond, a, b)

    @staticmethod
    def backward(ctx, g):
        (cond,) = ctx.saved_tensors
        sa, sb = ctx.shapes
        _, na, nb = ctx.needs_input_grad
        zero = g.dtype.type(0)
        xp = xp_of(g)
        ga = unbroadcast(xp.where(cond, g, zero), sa) if na else None
        gb = unbroadcast(xp.where(cond, zero, g), sb) if nb else None
        return None, ga, gb


def where(cond, a, b) -> Tensor:
    cond = cond.data if isinstance(cond, Tensor) else cond
    a, b = pair(a, b)
    return Where.apply(cond, a, b)


# --------------------------------------------------------------------------- unary


class Neg(Function):
    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, g):
        return (-g,)


class Pow(Function):
    """``x ** p`` for a constant ``p``: d/dx = p x^(p-1)."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.p = p
        ctx.save_for_backward(x)
        return x**p

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        p = ctx.p
        return g * p * x ** (p - 1), None


class Exp(Function):
    @staticmethod
    def forward(ctx, x):
        out = array_module(x).exp(x)
        ctx.save_for_backward(out)  # d(e^x)/dx = e^x: the output is all backward needs
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (g * out,)


class Log(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return array_module(x).log(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (g / x,)


class Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        out = array_module(x).tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (g * (1 - out * out),)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        xp = array_module(x)
        out = 0.5 * (xp.tanh(0.5 * x) + 1)  # = 1/(1+e^-x) without overflow
        ctx.save_for_backward(out)
        return out.astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (g * out * (1 - out),)


class ReLU(Function):
    @staticmethod
    def forward(ctx, x):
        out = array_module(x).maximum(x, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (g * (out > 0),)


class Cast(Function):
    @staticmethod
    def forward(ctx, x, dtype):
        ctx.in_dtype = x.dtype
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, g):
        return g.astype(ctx.in_dtype), None


def neg(x):
    return Neg.apply(x)


def pow(x, p: float):  # noqa: A001 - mirrors the operator
    if isinstance(p, Tensor):
        raise TypeError("pow supports a constant exponent; use exp(p * log(x)) for a tensor one")
    return Pow.apply(x, p)


def sqrt(x):
    return Pow.apply(x, 0.5)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def tanh(x):
    return Tanh.apply(x)


def sigmoid(x):
    return Sigmoid.apply(x)


def relu(x):
    return ReLU.apply(x)


def cast(x, dtype):
    return x if x.dtype == dtype else Cast.apply(x, dtype)
