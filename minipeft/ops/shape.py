"""Ops that move values without computing new ones: reshape, transpose, broadcast,
indexing, concatenate / stack / split, and the embedding look-up (a row index).

Their backward puts each gradient value back where its input value came from; indexing
with repeated indices (an embedding table, a gather) adds the repeats up (scatter-add).
"""
from __future__ import annotations

import numpy as np

from ..backend import scatter_add, xp_of
from ..capture import capturing  # recorded into a CUDA graph: the caller checks the indices
from ..engine import Function, Tensor
from .common import array_module, as_tensor_arg, unbroadcast


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
        return array_module(x).broadcast_to(x, shape)

    @staticmethod
    def backward(ctx, g):
        return unbroadcast(g, ctx.in_shape), None


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
        return array_module(*xs).concatenate(xs, axis=axis)

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
    tensors = [as_tensor_arg(t, like) for t in tensors]
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
    if sum(sizes) != n:
        raise ValueError(f"split sizes {sizes} do not add up to dimension {n}")
    ax = axis % x.ndim
    out, start = [], 0
    for s in sizes:
        idx = (slice(None),) * ax + (slice(start, start + s),)
        out.append(getitem(x, idx))
        start += s
    return out


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
    if idx.size and capturing() is None and (int(idx.min()) < 0 or int(idx.max()) >= weight.shape[0]):
        raise ValueError(
            f"embedding index out of range: indices span [{int(idx.min())}, {int(idx.max())}] "
            f"but the table has {weight.shape[0]} rows"
        )
    return Embedding.apply(idx, weight)
