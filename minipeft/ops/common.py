"""Helpers every op file shares: the broadcasting rule for gradients, and Python scalars as arrays."""
from __future__ import annotations

import numpy as np

from ..backend import xp_of
from ..engine import Tensor


def array_module(*arrays):
    """The array module (numpy or cupy) of the first argument that is an array; numpy if none is."""
    for a in arrays:
        if hasattr(a, "shape") and hasattr(a, "dtype"):
            return xp_of(a)
    return np


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes along which an input of ``shape`` was broadcast.

    ``a + b`` with ``a`` (3, 4) and ``b`` (4,) adds ``b`` to every row, so dL/db is the sum
    of dL/dy over the rows: broadcasting forward is summing backward.
    """
    if grad.shape == tuple(shape):
        return grad
    ndiff = grad.ndim - len(shape)
    if ndiff > 0:
        grad = grad.sum(axis=tuple(range(ndiff)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def shape_of(a) -> tuple:
    """``a.shape``, or () for a Python scalar."""
    return tuple(a.shape) if hasattr(a, "shape") else ()


def swap_last(a):
    """``a`` with its last two axes swapped (the transpose of a batch of matrices)."""
    return a.swapaxes(-1, -2)


def as_tensor_arg(a, like: Tensor | None = None):
    """Leave Tensors and arrays alone; turn Python scalars into arrays of ``like``'s dtype and device.

    The 0-d array is filled on the device (``full``), not copied from the host: a step recorded
    into a CUDA graph (:mod:`minipeft.graph_train`) may hold no copy from host memory that a
    replay would read again after the host has reused it.
    """
    if isinstance(a, Tensor) or hasattr(a, "shape"):
        return a
    if like is not None:
        xp = xp_of(like.data)
        return xp.full((), a, dtype=like.dtype)
    return a


def pair(a, b):
    """Both operands of a binary op, a Python scalar among them made an array like the Tensor one."""
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    return as_tensor_arg(a, like), as_tensor_arg(b, like)
