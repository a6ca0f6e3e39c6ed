"""The fused training kernels as Functions: fast paths of the reference ops in ``minipeft/ops``.

Each class here subclasses the op it replaces and saves for backward the arrays the
reference saves (so the engine counts the same bytes either way), but runs its forward
and backward as one CUDA kernel (``<name>.cu``, launched from ``<name>.py``). Where a
backward meets a case the kernel does not take (a gradient of another dtype), it hands
over to the reference's backward, which reads the same saved arrays. They apply to
float32 CuPy arrays; :mod:`minipeft.kernels` registers them with their conditions.

:class:`LinearGEMM` is no RawKernel: it shapes ``linear`` for cuBLAS (one 2-D GEMM over
all leading axes instead of a batch of small ones, the bias gradient as a GEMV).
"""
from __future__ import annotations

import numpy as np

from ..amp import autocast_dtype
from ..backend import sum_rows
from ..fast import float32_on_gpu, on_gpu
from ..ops.attention import Attention
from ..ops.common import swap_last, unbroadcast
from ..ops.linalg import Linear
from ..ops.loss import CrossEntropy
from ..ops.norm_act import GELU, LayerNorm
from . import attention_softmax, cross_entropy, gelu, layernorm


class FusedGELU(GELU):
    """GELU forward and backward as one elementwise kernel each (``gelu.cu``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return gelu.gelu_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if g.dtype != x.dtype:
            return GELU.backward(ctx, g)
        return (gelu.gelu_backward(x, g),)


class FusedLayerNorm(LayerNorm):
    """Layer norm with one warp per row (``layernorm.cu``); saves ``xhat`` and ``rstd`` as the reference."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype: str = "float32"):
        """``out_dtype`` float16 / bfloat16: y written in it (:mod:`minipeft.amp_layernorm`); the same saved arrays."""
        nx, nw = ctx.needs_input_grad[:2]
        y, xhat, rstd = layernorm.layernorm_forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(xhat if (nx or nw) else None, rstd if nx else None, weight if nx else None)
        return y

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        if xhat is None or g.dtype != xhat.dtype:  # only the bias needs a gradient, or another dtype
            return LayerNorm.backward(ctx, g)
        nx, nw, nb = ctx.needs_input_grad[:3]
        gw = gb = gx = None
        if nw or nb:
            gw, gb = layernorm.layernorm_backward_params(g, xhat)  # column sums, one pass
        if nx:
            gx = layernorm.layernorm_backward_x(g, xhat, rstd, w)
        return gx, gw if nw else None, gb if nb else None, None


class FusedCrossEntropy(CrossEntropy):
    """Softmax and cross-entropy in one kernel (``cross_entropy.cu``).

    Unlike the reference, the number of counted rows stays on the GPU (a 0-d array): the
    step never waits for the host. The backward is always the kernel's: it reads that count.
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing):
        loss, probs, safe_t, valid, count = cross_entropy.cross_entropy_forward(
            logits, targets, ignore_index, label_smoothing)
        ctx.count, ctx.eps, ctx.v = count, label_smoothing, logits.shape[1]
        ctx.save_for_backward(probs, safe_t, valid)
        return loss

    @staticmethod
    def backward(ctx, g):
        probs, t, valid = ctx.saved_tensors
        return cross_entropy.cross_entropy_backward(g, probs, t, valid, ctx.count, ctx.eps), None, None, None


class FusedAttention(Attention):
    """Attention whose scale, masks and softmax run in place on the scores in one kernel
    (``attention_softmax.cu``); the two products around it stay cuBLAS GEMMs."""

    @staticmethod
    def forward(ctx, q, k, v, causal, key_mask, scale):
        ctx.scale = scale
        s = q @ swap_last(k)  # (B, H, Tq, Tk), a fresh array
        if not s.flags.c_contiguous:
            s = s.copy()
        p = attention_softmax.attn_softmax_forward(s, scale, causal, key_mask)  # in place: scale, mask, softmax
        ctx.save_for_backward(q, k, v, p)
        return p @ v  # (B, H, Tq, D)

    @staticmethod
    def backward(ctx, g):
        q, k, v, p = ctx.saved_tensors
        if g.dtype != p.dtype:
            return Attention.backward(ctx, g)
        nq, nk, nv = ctx.needs_input_grad[:3]
        gv = unbroadcast(swap_last(p) @ g, v.shape) if nv else None
        gq = gk = None
        if nq or nk:
            ds = attention_softmax.attn_softmax_backward(p, g @ swap_last(v), ctx.scale)  # (B, H, Tq, Tk), scaled
            gq = unbroadcast(ds @ k, q.shape) if nq else None
            gk = unbroadcast(swap_last(ds) @ q, k.shape) if nk else None
        return gq, gk, gv, None, None, None


class LinearGEMM(Linear):
    """``linear`` on CuPy arrays: one 2-D GEMM over all leading axes (x (..., in) seen as
    (N, in)), where ``x @ W^T`` would be a batch of small GEMMs; the bias gradient as a GEMV."""

    @staticmethod
    def forward(ctx, x, w, b=None):
        nx, nw = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if nw else None, w if nx else None)
        ctx.x_shape = x.shape
        y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))  # (..., out)
        return y if b is None else y + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        needs = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gx = (g2 @ w).reshape(ctx.x_shape) if needs[0] else None  # (..., in)
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if needs[1] else None  # (out, in)
        gb = sum_rows(g2) if len(needs) > 2 and needs[2] else None  # (out,)
        return (gx, gw, gb) if len(needs) > 2 else (gx, gw)


# -------------------------------------------------------------- when each one applies


def gelu_applies(x) -> bool:
    return float32_on_gpu(x)


def layernorm_applies(x, weight, bias, eps) -> bool:
    return float32_on_gpu(x, weight, bias)


def cross_entropy_applies(logits, targets, ignore_index, label_smoothing) -> bool:
    return float32_on_gpu(logits)


def attention_applies(q, k, v, causal, key_mask, scale) -> bool:
    """float32 CuPy q, k, v of 4 dims (B, H, T, D), k's leading axes broadcasting into q's."""
    return (q.ndim == 4 and float32_on_gpu(q, k, v, contiguous=False)
            and np.broadcast_shapes(q.shape[:-2], k.shape[:-2]) == q.shape[:-2])


def linear_applies(x, w, b=None) -> bool:
    """A CuPy input outside autocast (under autocast :class:`minipeft.amp.AmpLinear` runs)."""
    return on_gpu(x) and autocast_dtype(x, w) is None
