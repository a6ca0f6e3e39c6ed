"""Scaled dot-product attention (Vaswani et al. 2017, eq. 1), with the masks GPT-2 and
the PEFT methods need: causal, key padding, and key/value prefixes longer than the queries."""
from __future__ import annotations

import math

from ..backend import xp_of
from ..engine import Function, Tensor
from .common import array_module, swap_last, unbroadcast


def masked_softmax(s, scale: float, causal: bool, key_mask):
    """softmax(scale * s + mask) over the keys, for scores ``s = q k^T`` (B, H, Tq, Tk).

    Causal rule: query i sees key j iff j <= (Tk - Tq) + i (the first Tk - Tq keys are a
    prefix every query sees); ``key_mask`` (B, Tk), True where a key may be attended.
    """
    xp = array_module(s)
    tq, tk = s.shape[-2:]
    s = s * s.dtype.type(scale)
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
    p /= p.sum(axis=-1, keepdims=True)
    return p


class Attention(Function):
    """softmax(q k^T / sqrt(d) + mask) v for q (B, H, Tq, D) and k, v (B, H, Tk, D).

    Keys may be longer than queries (Tk >= Tq): the first Tk - Tq keys are a prefix
    (prefix tuning's learned vectors, or a key/value cache) that every query sees.
    Causal rule: query i sees key j iff j <= (Tk - Tq) + i. ``key_mask`` (B, Tk), True
    where a key may be attended, hides padding. Saves q, k, v and the probabilities.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, key_mask, scale):
        ctx.scale = scale
        p = masked_softmax(q @ swap_last(k), scale, causal, key_mask)  # (B, H, Tq, Tk)
        ctx.save_for_backward(q, k, v, p)
        return p @ v  # (B, H, Tq, D)

    @staticmethod
    def backward(ctx, g):
        q, k, v, p = ctx.saved_tensors
        nq, nk, nv = ctx.needs_input_grad[:3]
        gv = unbroadcast(swap_last(p) @ g, v.shape) if nv else None
        gq = gk = None
        if nq or nk:
            dt = g.dtype.type(ctx.scale)
            dp = g @ swap_last(v)  # (B, H, Tq, Tk)
            ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # softmax backward
            if nq:
                gq = unbroadcast((ds @ k) * dt, q.shape)
            if nk:
                gk = unbroadcast((swap_last(ds) @ q) * dt, k.shape)
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
