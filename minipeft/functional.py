"""The differentiable ops by the names lessons and methods use: ``F.linear``, ``F.gelu`` ...

The ops themselves live in ``minipeft/ops/``, one topic per file, each ``Function``'s
forward next to its backward, in NumPy (CuPy runs the same lines). This module

1. re-exports every op (``from minipeft import functional as F``);
2. makes them ``Tensor``'s operators: ``a + b`` is :func:`add`, ``a @ b`` is :func:`matmul`,
   ``x[i]`` is :func:`getitem` ... (``minipeft/engine.py`` imports no ops, so the arrow
   between the two runs one way: ops use the engine);
3. imports :mod:`minipeft.amp` and :mod:`minipeft.kernels`, which register their fast
   paths - 16-bit products under ``amp.autocast``, fused CUDA kernels for float32 CuPy
   arrays - in :mod:`minipeft.fast`, where ``Function.apply`` looks them up.

``import minipeft`` imports this module, so the operators and the fast paths are in place
whichever minipeft module a program imports first.
"""
from __future__ import annotations

from .engine import Function, Tensor
from .ops.attention import Attention, scaled_dot_product_attention
from .ops.elementwise import (Add, Cast, Div, Exp, Log, Mul, Neg, Pow, ReLU, Sigmoid, Sub, Tanh, Where, add,
                              cast, div, exp, log, mul, neg, pow, relu, sigmoid, sqrt, sub, tanh, where)
from .ops.linalg import Linear, MatMul, linear, matmul
from .ops.loss import CrossEntropy, cross_entropy
from .ops.norm_act import (GELU, Dropout, LayerNorm, LogSoftmax, Softmax, dropout, gelu, layer_norm,
                           log_softmax, softmax)
from .ops.reduction import Max, Mean, Sum, max, mean, sum
from .ops.shape import (BroadcastTo, Concatenate, Embedding, GetItem, Reshape, Transpose, broadcast_to,
                        concatenate, embedding, getitem, reshape, split, stack, transpose)

from . import amp, kernels  # noqa: E402,F401  (registering their fast paths is the point of importing them)

# ------------------------------------------------------------------ Tensor's operators


def _reshape_method(self, *shape):
    """``t.reshape(2, 3)`` or ``t.reshape((2, 3))``."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return reshape(self, shape)


def _transpose_method(self, *axes):
    """``t.transpose()`` (all axes reversed), ``t.transpose(1, 0, 2)`` or ``t.transpose((1, 0, 2))``."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return transpose(self, axes or None)


Tensor.__add__ = add
Tensor.__radd__ = lambda self, other: add(other, self)
Tensor.__sub__ = sub
Tensor.__rsub__ = lambda self, other: sub(other, self)
Tensor.__mul__ = mul
Tensor.__rmul__ = lambda self, other: mul(other, self)
Tensor.__truediv__ = div
Tensor.__rtruediv__ = lambda self, other: div(other, self)
Tensor.__neg__ = neg
Tensor.__pow__ = pow
Tensor.__matmul__ = matmul
Tensor.__rmatmul__ = lambda self, other: matmul(other, self)
Tensor.__getitem__ = getitem
Tensor.sum = sum
Tensor.mean = mean
Tensor.max = max
Tensor.reshape = _reshape_method
Tensor.transpose = _transpose_method
Tensor.T = property(lambda self: transpose(self, None))
Tensor.exp = exp
Tensor.log = log
Tensor.tanh = tanh
Tensor.astype = cast

__all__ = [
    "Function", "Tensor",
    # elementwise
    "Add", "Sub", "Mul", "Div", "Where", "Neg", "Pow", "Exp", "Log", "Tanh", "Sigmoid", "ReLU", "Cast",
    "add", "sub", "mul", "div", "where", "neg", "pow", "sqrt", "exp", "log", "tanh", "sigmoid", "relu", "cast",
    # reduction
    "Sum", "Mean", "Max", "sum", "mean", "max",
    # shape
    "Reshape", "Transpose", "BroadcastTo", "GetItem", "Concatenate", "Embedding", "reshape", "transpose",
    "broadcast_to", "getitem", "concatenate", "stack", "split", "embedding",
    # linalg
    "MatMul", "Linear", "matmul", "linear",
    # norm_act
    "GELU", "Softmax", "LogSoftmax", "LayerNorm", "Dropout", "gelu", "softmax", "log_softmax", "layer_norm",
    "dropout",
    # attention, loss
    "Attention", "scaled_dot_product_attention", "CrossEntropy", "cross_entropy",
]
