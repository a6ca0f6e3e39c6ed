"""Matrix products: ``matmul`` (batched ``a @ b``) and ``linear`` (``y = x W^T + b``).

The product rule for matrices: for ``y = a @ b``, dL/da = g b^T and dL/db = a^T g.
:func:`minipeft.amp.autocast` runs these products in 16 bits, and on a GPU ``linear`` is
one 2-D cuBLAS GEMM; both are fast paths (:mod:`minipeft.fast`) of the code below.
"""
from __future__ import annotations

from ..engine import Function, Tensor
from .common import swap_last, unbroadcast


class MatMul(Function):
    """Batched ``a @ b`` (both at least 2-D; leading dims broadcast)."""

    @staticmethod
    def forward(ctx, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs inputs with >= 2 dims, got shapes {a.shape} and {b.shape}")
        na, nb = ctx.needs_input_grad
        ctx.save_for_backward(b if na else None, a if nb else None)  # dL/da needs b, dL/db needs a
        ctx.shapes = (a.shape, b.shape)
        return a @ b

    @staticmethod
    def backward(ctx, g):
        b, a = ctx.saved_tensors
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        ga = unbroadcast(g @ swap_last(b), sa) if na else None
        gb = unbroadcast(swap_last(a) @ g, sb) if nb else None
        return ga, gb


def matmul(a, b) -> Tensor:
    return MatMul.apply(a, b)


class Linear(Function):
    """``y = x W^T + b`` with ``W`` of shape (out, in), as ``torch.nn.functional.linear``.

    A frozen ``W`` needs no gradient, so ``x`` is not saved for it: dL/dx = g W needs
    only ``W`` (a weight, not an activation). That is the saving LoRA relies on.
    """

    @staticmethod
    def forward(ctx, x, w, b=None):
        nx, nw = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if nw else None, w if nx else None)
        y = x @ w.T  # (..., out)
        return y if b is None else y + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (N, out): every leading position is one row
        gx = g @ w if needs[0] else None  # (..., in)
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if needs[1] else None  # (out, in), summed over the rows
        gb = g2.sum(axis=0) if len(needs) > 2 and needs[2] else None  # (out,)
        return (gx, gw, gb) if len(needs) > 2 else (gx, gw)


def check_linear(x, weight) -> None:
    """``x`` (..., in) against ``weight`` (out, in): a clear error when the feature counts differ."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: input has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {weight.shape[1]}"
        )


def linear(x, weight, bias=None) -> Tensor:
    check_linear(x, weight)
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)
