"""Differentiable ops: each ``Function``'s forward next to its backward.

Every op works on NumPy or CuPy arrays alike (``xp = xp_of(array)``). Gradients of
broadcast inputs are summed back to the input's shape (``_unbroadcast``). Ops that are
used in every transformer block (linear, layer norm, attention, cross-entropy) are
fused Functions: they save exactly what their backward needs, which keeps the engine's
count of bytes held for backward meaningful.

On float32 CuPy arrays GELU, LayerNorm, CrossEntropy and the softmax inside Attention run
as fused RawKernels (``minipeft/kernels/``), for which the code below is the NumPy twin
they are tested against; ``MINIPEFT_KERNELS=0`` turns them off. Everything else, and every
NumPy or float64 array, runs the code written here.

References: GELU tanh form (Hendrycks & Gimpel 2016, eq. in §2, as GPT-2 uses it);
layer norm (Ba et al. 2016); scaled dot-product attention (Vaswani et al. 2017, eq. 1);
label smoothing (Szegedy et al. 2016, §7).
"""
from __future__ import annotations

import builtins
import math

import numpy as np

from . import amp
from .backend import scatter_add, xp_of
from .engine import Function, Tensor
from .kernels import use_fused

# ------------------------------------------------------------------------ helpers


def _xp(*arrays):
    for a in arrays:
        if hasattr(a, "shape") and hasattr(a, "dtype"):
            return xp_of(a)
    return np


def _unbroadcast(grad, shape):
    """Sum ``grad`` over the axes along which an input of ``shape`` was broadcast."""
    if grad.shape == tuple(shape):
        return grad
    ndiff = grad.ndim - len(shape)
    if ndiff > 0:
        grad = grad.sum(axis=tuple(range(ndiff)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def _on_gpu(a) -> bool:
    """True for a CuPy array (without importing CuPy)."""
    return type(a).__module__.startswith("cupy")


def _shape(a):
    return tuple(a.shape) if hasattr(a, "shape") else ()


def _as_tensor_arg(a, like: Tensor | None = None):
    """Leave Tensors alone; turn Python scalars into arrays of ``like``'s dtype/device."""
    if isinstance(a, Tensor) or hasattr(a, "shape"):
        return a
    if like is not None:
        xp = xp_of(like.data)
        return xp.asarray(a, dtype=like.dtype)
    return a


def _pair(a, b):
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    return _as_tensor_arg(a, like), _as_tensor_arg(b, like)


# -------------------------------------------------------------- elementwise binary


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (_shape(a), _shape(b))
        return a + b

    @staticmethod
    def backward(ctx, g):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (_unbroadcast(g, sa) if na else None, _unbroadcast(g, sb) if nb else None)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (_shape(a), _shape(b))
        return a - b

    @staticmethod
    def backward(ctx, g):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (_unbroadcast(g, sa) if na else None, _unbroadcast(-g, sb) if nb else None)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        na, nb = ctx.needs_input_grad
        # d(ab)/da needs b, d(ab)/db needs a: save only what a needed gradient uses
        ctx.save_for_backward(b if na else None, a if nb else None)
        ctx.shapes = (_shape(a), _shape(b))
        return a * b

    @staticmethod
    def backward(ctx, g):
        b, a = ctx.saved_tensors
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (_unbroadcast(g * b, sa) if na else None, _unbroadcast(g * a, sb) if nb else None)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b)  # d(a/b)/da needs only b
        ctx.shapes = (_shape(a), _shape(b))
        return a / b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        ga = _unbroadcast(g / b, sa) if na else None
        gb = _unbroadcast(-g * a / (b * b), sb) if nb else None
        return ga, gb


def add(a, b) -> Tensor:
    return Add.apply(*_pair(a, b))


def sub(a, b) -> Tensor:
    return Sub.apply(*_pair(a, b))


def mul(a, b) -> Tensor:
    return Mul.apply(*_pair(a, b))


def div(a, b) -> Tensor:
    return Div.apply(*_pair(a, b))


class Where(Function):
    """``cond ? a : b`` elementwise (``cond`` is a boolean array, not differentiated)."""

    @staticmethod
    def forward(ctx, cond, a, b):
        xp = _xp(a, b, cond)
        ctx.save_for_backward(cond)
        ctx.shapes = (_shape(a), _shape(b))
        return xp.where(cond, a, b)

    @staticmethod
    def backward(ctx, g):
        (cond,) = ctx.saved_tensors
        sa, sb = ctx.shapes
        _, na, nb = ctx.needs_input_grad
        zero = g.dtype.type(0)
        xp = xp_of(g)
        ga = _unbroadcast(xp.where(cond, g, zero), sa) if na else None
        gb = _unbroadcast(xp.where(cond, zero, g), sb) if nb else None
        return None, ga, gb


def where(cond, a, b) -> Tensor:
    cond = cond.data if isinstance(cond, Tensor) else cond
    a, b = _pair(a, b)
    return Where.apply(cond, a, b)


# --------------------------------------------------------------- elementwise unary


class Neg(Function):
    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, g):
        return (-g,)


class Pow(Function):
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
        out = _xp(x).exp(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (g * out,)


class Log(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _xp(x).log(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (g / x,)


class Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        out = _xp(x).tanh(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (g * (1 - out * out),)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        xp = _xp(x)
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
        out = _xp(x).maximum(x, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return (g * (out > 0),)


_GELU_C = math.sqrt(2.0 / math.pi)


class GELU(Function):
    """GELU, tanh form as in GPT-2: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""

    @staticmethod
    def forward(ctx, x):
        xp = _xp(x)
        ctx.save_for_backward(x)
        if use_fused(x):  # float32 CuPy: one fused kernel (minipeft/kernels/gelu.cu), this code's twin
            from .kernels.gelu import gelu_forward

            return gelu_forward(x)
        u = _GELU_C * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1 + xp.tanh(u))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if use_fused(x) and g.dtype == x.dtype:
            from .kernels.gelu import gelu_backward

            return (gelu_backward(x, g),)
        xp = xp_of(x)
        u = _GELU_C * (x + 0.044715 * x * x * x)
        t = xp.tanh(u)
        du = _GELU_C * (1 + 3 * 0.044715 * x * x)
        return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du),)


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


def gelu(x):
    return GELU.apply(x)


def cast(x, dtype):
    return x if x.dtype == dtype else Cast.apply(x, dtype)


# ------------------------------------------------------------------------ matmuls


def _swap_last(a):
    return a.swapaxes(-1, -2)


class MatMul(Function):
    """Batched ``a @ b`` (both at least 2-D; leading dims broadcast); 2-D products run in 16 bits
    under :func:`amp.autocast` (batched ones stay float32, see :class:`Attention`)."""

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs inputs with >= 2 dims, got shapes {a.shape} and {b.shape}")
        na, nb = ctx.needs_input_grad
        dt = ctx.amp = amp.autocast_dtype(a, b) if a.ndim == b.ndim == 2 else None  # batched: see Attention
        if dt:
            a, b = amp.to_compute(a, dt), amp.to_compute(b, dt)
        ctx.save_for_backward(b if na else None, a if nb else None)
        ctx.shapes = (a.shape, b.shape)
        return amp.gemm(a, b, dt) if dt else a @ b

    @staticmethod
    def backward(ctx, g):
        b, a = ctx.saved_tensors
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        dt = ctx.amp
        if dt:
            g = amp.to_compute(g, dt)
            ga = _unbroadcast(amp.gemm(g, _swap_last(b), dt), sa) if na else None
            gb = _unbroadcast(amp.gemm(_swap_last(a), g, dt), sb) if nb else None
            return ga, gb
        ga = _unbroadcast(g @ _swap_last(b), sa) if na else None
        gb = _unbroadcast(_swap_last(a) @ g, sb) if nb else None
        return ga, gb


def matmul(a, b) -> Tensor:
    return MatMul.apply(a, b)


def _sum_rows(g2):
    """``g2.sum(axis=0)`` of a (rows, n) array; on the GPU as a cuBLAS GEMV (ones @ g2), which
    reads the array once, coalesced: 2-3x faster than CuPy's column reduction at GPT-2 sizes."""
    if _on_gpu(g2) and g2.dtype == np.float32:
        return _xp(g2).ones(g2.shape[0], g2.dtype) @ g2
    return g2.sum(axis=0)


class Linear(Function):
    """``y = x W^T + b`` with ``W`` of shape (out, in), as ``torch.nn.functional.linear``.

    A frozen ``W`` needs no gradient, so ``x`` is not saved for it: dL/dx = g W needs
    only ``W`` (a weight, not an activation). That is the saving LoRA relies on.
    Under :func:`amp.autocast` the three products run in 16 bits and the 16-bit ``x``
    and ``W`` are what is saved; the bias is added in float32.
    """

    @staticmethod
    def forward(ctx, x, w, b=None):
        nx, nw = ctx.needs_input_grad[:2]
        dt = ctx.amp = amp.autocast_dtype(x, w)
        out = ctx.out_features = w.shape[0]
        if dt:  # W zero-padded to a multiple of 8 rows (tensor-core kernels; see amp.aligned)
            x, w = amp.to_compute(x, dt), amp.to_compute_padded(w, dt, amp.aligned(out), axis=0)  # (out8, in)
        ctx.save_for_backward(x if nw else None, w if nx else None)
        ctx.x_shape = x.shape
        if dt:
            y = amp.gemm_2d(x, w.T, dt, cols=out)  # (..., out) float32
        elif x.ndim > 2 and _on_gpu(x):  # CuPy: one 2-D GEMM, not a batched one over the leading axes
            y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))  # (..., out)
        else:
            y = x @ w.T  # (..., out)
        if b is not None:
            y = y + b
        return y

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dt = ctx.amp
        out = ctx.out_features
        # the 16-bit gradient (loss scaling keeps it from underflowing), padded like W: (..., out8)
        gc = amp.to_compute_padded(g, dt, amp.aligned(out)) if dt else g
        gx = None
        if needs[0]:
            if dt:
                gx = amp.gemm_2d(gc, w, dt)  # (..., in) float32
            elif g.ndim > 2 and _on_gpu(g):  # CuPy: one 2-D GEMM (see forward)
                gx = (g.reshape(-1, g.shape[-1]) @ w).reshape(ctx.x_shape)  # (..., in)
            else:
                gx = g @ w  # (..., in)
        gw = gb = None
        if needs[1]:
            g2 = gc.reshape(-1, gc.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            gw = amp.gemm(g2.T, x2, dt, rows=out) if dt else g2.T @ x2  # (out, in)
        if len(needs) > 2 and needs[2]:
            gb = _sum_rows(g.reshape(-1, g.shape[-1]))  # (out,)
        return (gx, gw, gb) if len(needs) > 2 else (gx, gw)


def linear(x, weight, bias=None) -> Tensor:
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)


# ---------------------------------------------------------------------- reductions


def _norm_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(a % ndim for a in axis)


def _expand_back(g, shape, axes, keepdims):
    if not keepdims:
        for a in sorted(axes):
            g = _xp(g).expand_dims(g, a)
    return _xp(g).broadcast_to(g, shape)


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


# -------------------------------------------------------------------------- shapes


class Reshape(Function):
    @staticmethod
    def forward(ctx, x, shape):
        ctx.in_shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.in_shape), None


class Transpose(Function):
    @staticmethod
    def forward(ctx, x, axes):
        axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(a % x.ndim for a in axes)
        ctx.inv = tuple(int(i) for i in np.argsort(axes))
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, g):
        return g.transpose(ctx.inv), None


class BroadcastTo(Function):
    @staticmethod
    def forward(ctx, x, shape):
        ctx.in_shape = x.shape
        return _xp(x).broadcast_to(x, shape)

    @staticmethod
    def backward(ctx, g):
        return _unbroadcast(g, ctx.in_shape), None


def _is_basic_index(idx) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items)


class GetItem(Function):
    """``x[idx]``: basic slicing or advanced (integer array) indexing."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.in_shape, ctx.dtype, ctx.idx = x.shape, x.dtype, idx
        ctx.basic = _is_basic_index(idx)
        if not ctx.basic:
            arrays = [i for i in (idx if isinstance(idx, tuple) else (idx,)) if hasattr(i, "shape")]
            ctx.save_for_backward(*arrays)  # index arrays are kept (and counted)
        return x[idx]

    @staticmethod
    def backward(ctx, g):
        xp = xp_of(g)
        out = xp.zeros(ctx.in_shape, dtype=g.dtype)
        if ctx.basic:
            out[ctx.idx] = g
        else:
            scatter_add(out, ctx.idx, g)
        return out, None


def reshape(x, shape):
    return Reshape.apply(x, tuple(shape))


def transpose(x, axes=None):
    return Transpose.apply(x, axes)


def broadcast_to(x, shape):
    return BroadcastTo.apply(x, tuple(shape))


def _index_item(i, xp):
    """Tensor -> its array; list or host array -> an integer/bool array on x's backend."""
    if isinstance(i, Tensor):
        i = i.data
    if isinstance(i, list) or (hasattr(i, "shape") and xp_of(i) is not xp):
        i = xp.asarray(i)
    return i


def getitem(x, idx):
    xp = xp_of(x.data)
    idx = tuple(_index_item(i, xp) for i in idx) if isinstance(idx, tuple) else _index_item(idx, xp)
    return GetItem.apply(x, idx)


class Concatenate(Function):
    @staticmethod
    def forward(ctx, *xs, axis=0):
        ctx.axis = axis
        ctx.sizes = [x.shape[axis] for x in xs]
        return _xp(*xs).concatenate(xs, axis=axis)

    @staticmethod
    def backward(ctx, g):
        xp = xp_of(g)
        cuts = np.cumsum(ctx.sizes)[:-1].tolist()
        parts = xp.split(g, cuts, axis=ctx.axis)
        return tuple(p if n else None for p, n in zip(parts, ctx.needs_input_grad))


def concatenate(tensors, axis: int = 0) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate needs at least one tensor")
    like = next((t for t in tensors if isinstance(t, Tensor)), None)
    tensors = [_as_tensor_arg(t, like) for t in tensors]
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors, axis: int = 0) -> Tensor:
    tensors = list(tensors)
    ax = axis % (tensors[0].ndim + 1)
    return concatenate([reshape(t, t.shape[:ax] + (1,) + t.shape[ax:]) for t in tensors], axis=ax)


def split(x, split_size_or_sections, axis: int = -1) -> list[Tensor]:
    """Split like ``torch.split``: an int chunk size, or a list of section sizes."""
    n = x.shape[axis]
    if isinstance(split_size_or_sections, int):
        sizes = [split_size_or_sections] * (n // split_size_or_sections)
        if n % split_size_or_sections:
            sizes.append(n % split_size_or_sections)
    else:
        sizes = list(split_size_or_sections)
    if builtins.sum(sizes) != n:
        raise ValueError(f"split sizes {sizes} do not add up to dimension {n}")
    ax = axis % x.ndim
    out, start = [], 0
    for s in sizes:
        idx = (slice(None),) * ax + (slice(start, start + s),)
        out.append(getitem(x, idx))
        start += s
    return out


# ------------------------------------------------------------ softmax and friends


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, axis):
        xp = _xp(x)
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
        xp = _xp(x)
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
        xp = _xp(x)
        nx, nw = ctx.needs_input_grad[:2]
        if use_fused(x, weight, bias):  # float32 CuPy: minipeft/kernels/layernorm.cu, this code's twin
            from .kernels.layernorm import layernorm_forward

            y, xhat, rstd = layernorm_forward(x, weight, bias, eps)
            ctx.save_for_backward(xhat if (nx or nw) else None, rstd if nx else None, weight if nx else None)
            return y
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
        if xhat is not None and use_fused(xhat) and g.dtype == xhat.dtype:
            from .kernels import layernorm as K

            gw = gb = gx = None
            if nw or nb:
                gw, gb = K.layernorm_backward_params(g, xhat)  # column sums, one pass
            if nx:
                gx = K.layernorm_backward_x(g, xhat, rstd, w)
            return gx, gw if nw else None, gb if nb else None, None
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


class Embedding(Function):
    """``weight[idx]``; the backward scatter-adds rows (a token may repeat)."""

    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx)
        ctx.w_shape = weight.shape
        return weight[idx]  # (*idx.shape, C)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        xp = xp_of(g)
        gw = xp.zeros(ctx.w_shape, dtype=g.dtype)
        scatter_add(gw, idx.reshape(-1), g.reshape(-1, ctx.w_shape[1]))
        return None, gw


def embedding(idx, weight):
    idx = idx.data if isinstance(idx, Tensor) else idx
    xp = xp_of(weight.data)
    idx = xp.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding indices must be integers, got dtype {idx.dtype}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= weight.shape[0]):
        raise ValueError(
            f"embedding index out of range: indices span [{int(idx.min())}, {int(idx.max())}] "
            f"but the table has {weight.shape[0]} rows"
        )
    return Embedding.apply(idx, weight)


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
        from .random import generator

        rng = generator(x.device)
    return Dropout.apply(x, p, rng)


class CrossEntropy(Function):
    """Mean cross-entropy of ``logits`` (N, V) against ``targets`` (N,).

    Rows whose target is ``ignore_index`` count for nothing. With label smoothing
    ``eps`` the target distribution is (1 - eps) one-hot + eps / V (Szegedy et al. 2016).
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing):
        xp = _xp(logits)
        n, v = logits.shape
        if use_fused(logits):  # float32 CuPy: minipeft/kernels/cross_entropy.cu, this code's twin
            from .kernels.cross_entropy import cross_entropy_forward

            loss, probs, safe_t, valid, count = cross_entropy_forward(logits, targets, ignore_index, label_smoothing)
            ctx.count, ctx.eps, ctx.v = count, label_smoothing, v  # count stays on the GPU: no sync
            ctx.save_for_backward(probs, safe_t, valid)
            return loss
        z = logits - logits.max(axis=-1, keepdims=True)
        lse = xp.log(xp.exp(z).sum(axis=-1, keepdims=True))
        logp = z - lse  # (N, V)
        valid = targets != ignore_index  # (N,)
        safe_t = xp.where(valid, targets, 0)
        nll = -logp[xp.arange(n), safe_t]  # (N,)
        if label_smoothing:
            nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
        count = int(valid.sum())
        ctx.count, ctx.eps, ctx.v = count, label_smoothing, v
        ctx.save_for_backward(xp.exp(logp), safe_t, valid)
        if count == 0:
            return xp.asarray(xp.nan, dtype=logits.dtype)
        return (nll * valid).sum() / logits.dtype.type(count)

    @staticmethod
    def backward(ctx, g):
        probs, t, valid = ctx.saved_tensors
        if not isinstance(ctx.count, int):  # the fused forward ran (count is a device array)
            from .kernels.cross_entropy import cross_entropy_backward

            return cross_entropy_backward(g, probs, t, valid, ctx.count, ctx.eps), None, None, None
        xp = xp_of(probs)
        n = probs.shape[0]
        grad = probs.copy()
        grad[xp.arange(n), t] -= 1 - ctx.eps
        if ctx.eps:
            grad -= ctx.eps / ctx.v
        grad *= (valid[:, None] * (g / builtins.max(ctx.count, 1))).astype(grad.dtype)
        return grad, None, None, None


def cross_entropy(logits, targets, ignore_index: int = -100, label_smoothing: float = 0.0):
    """Cross-entropy with ``ignore_index`` and label smoothing; logits (..., V), targets (...)."""
    targets = targets.data if isinstance(targets, Tensor) else targets
    xp = xp_of(logits.data)
    targets = xp.asarray(targets)
    if targets.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class indices, got dtype {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: targets shape {targets.shape} != logits shape without V {logits.shape[:-1]}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    v = logits.shape[-1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))  # an index outside [0, V) would wrap
    if targets.size and bool(bad.any()):
        raise ValueError(f"cross_entropy: targets must be class indices in [0, {v}) or ignore_index "
                         f"({ignore_index}); got {int(bad.sum())} outside, e.g. {int(targets[bad].reshape(-1)[0])}. "
                         f"Mark positions to skip with ignore_index, or check the tokenizer's vocabulary size")
    flat = reshape(logits, (-1, v)) if logits.ndim != 2 else logits
    return CrossEntropy.apply(flat, targets.reshape(-1), ignore_index, label_smoothing)


# ----------------------------------------------------------------------- attention


class Attention(Function):
    """softmax(q k^T / sqrt(d) + mask) v for q (B, H, Tq, D) and k, v (B, H, Tk, D).

    Keys may be longer than queries (Tk >= Tq): the first Tk - Tq keys are a prefix
    (prefix tuning's learned vectors, or a key/value cache) that every query sees.
    Causal rule: query i sees key j iff j <= (Tk - Tq) + i. ``key_mask`` (B, Tk), True
    where a key may be attended, hides padding. Saves q, k, v and the probabilities.

    Stays float32 under :func:`amp.autocast`: its products are batched (B, H) GEMMs, which
    CuPy runs in float16 only by converting to float32 and back (measured on an H100:
    six float32 GEMMs per layer plus conversions of (B, H, T, T) arrays, 44% of a GPT-2
    step at 32 x 512), so 16 bits would only add rounding.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, key_mask, scale):
        xp = _xp(q)
        tq, tk = q.shape[-2], k.shape[-2]
        ctx.scale = scale
        ctx.fused = False
        if q.ndim == 4 and use_fused(q, k, v, contiguous=False):  # minipeft/kernels/attention_softmax.cu
            from .kernels.attention_softmax import attn_softmax_forward

            s = q @ _swap_last(k)  # (B, H, Tq, Tk), a fresh C-contiguous array
            if s.shape[:2] == q.shape[:2] and s.flags.c_contiguous:
                p = attn_softmax_forward(s, scale, causal, key_mask)  # in place: scale, mask, softmax
                ctx.fused = True
                ctx.save_for_backward(q, k, v, p)
                return p @ v  # (B, H, Tq, D)
        s = (q @ _swap_last(k)) * q.dtype.type(scale)  # (B, H, Tq, Tk)
        allowed = None
        if causal:
            allowed = xp.arange(tk)[None, :] <= (tk - tq) + xp.arange(tq)[:, None]  # (Tq, Tk)
        if key_mask is not None:
            km = key_mask[:, None, None, :].astype(bool)  # (B, 1, 1, Tk)
            allowed = km if allowed is None else (allowed & km)
        if allowed is not None:
            s = xp.where(allowed, s, xp.finfo(s.dtype).min)
        s = s - s.max(axis=-1, keepdims=True)
        p = xp.exp(s)
        p /= p.sum(axis=-1, keepdims=True)  # (B, H, Tq, Tk)
        ctx.save_for_backward(q, k, v, p)
        return p @ v  # (B, H, Tq, D)

    @staticmethod
    def backward(ctx, g):
        q, k, v, p = ctx.saved_tensors
        nq, nk, nv = ctx.needs_input_grad[:3]
        dt = g.dtype.type(ctx.scale)
        gv = _unbroadcast(_swap_last(p) @ g, v.shape) if nv else None
        gq = gk = None
        if (nq or nk) and ctx.fused and g.dtype == p.dtype:
            from .kernels.attention_softmax import attn_softmax_backward

            ds = attn_softmax_backward(p, g @ _swap_last(v), ctx.scale)  # (B, H, Tq, Tk), scale folded in
            gq = _unbroadcast(ds @ k, q.shape) if nq else None
            gk = _unbroadcast(_swap_last(ds) @ q, k.shape) if nk else None
            return gq, gk, gv, None, None, None
        if nq or nk:
            dp = g @ _swap_last(v)  # (B, H, Tq, Tk)
            ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
            if nq:
                gq = _unbroadcast((ds @ k) * dt, q.shape)
            if nk:
                gk = _unbroadcast((_swap_last(ds) @ q) * dt, k.shape)
        return gq, gk, gv, None, None, None


def scaled_dot_product_attention(q, k, v, causal: bool = True, key_mask=None, scale=None):
    """Causal attention with optional key/value prefixes (Tk > Tq) and a key padding mask."""
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention shapes do not fit: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[-2] < q.shape[-2] and causal:
        raise ValueError(f"causal attention needs at least as many keys ({k.shape[-2]}) as queries ({q.shape[-2]})")
    if key_mask is not None:
        key_mask = key_mask.data if isinstance(key_mask, Tensor) else key_mask
        key_mask = xp_of(q.data).asarray(key_mask)  # lists, or a host mask for a GPU q
        if key_mask.shape != (q.shape[0], k.shape[-2]):
            raise ValueError(f"key_mask must have shape (B, Tk) = {(q.shape[0], k.shape[-2])}, got {key_mask.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return Attention.apply(q, k, v, causal, key_mask, scale)
