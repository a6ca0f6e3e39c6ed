"""Attention in 16 bits under ``amp.autocast``: tensor-core products around a float32 softmax.

Scaled dot-product attention (Vaswani et al. 2017, eq. 1), softmax(q k^T / sqrt(d) + mask) v,
run the mixed-precision way (Micikevicius et al. 2018, §3): the operands of its four
products (two forward, dq/dk/dv backward) are 16-bit, the sums float32, and the softmax
with its masks stays float32 (§3.3: reductions in float32)::

    q, k, v  -> 16-bit, once                          (B, H, Tq, D), (B, H, Tk, D)
    s  = q k^T                float32 sums            (B, H, Tq, Tk)
    p  = softmax(scale s + mask)   float32, then -> 16-bit
    out = p v                 float32                 (B, H, Tq, D)
    backward, g -> 16-bit:    dv = p^T g,  dp = g v^T,
                              ds = scale p (dp - sum(dp p)) -> 16-bit,  dq = ds k,  dk = ds^T q

q, k, v and p are saved in 16 bits: half the bytes of the float32 attention. The masks are
the reference's (:class:`minipeft.ops.attention.Attention`): causal with a key/value prefix
(Tk >= Tq), and a key padding mask (B, Tk).

Two ways to run the same arithmetic, chosen per call:

* **tensor cores** (CuPy arrays, kernels on): real float16 / bfloat16 arrays, the products
  by cuBLAS (:func:`minipeft.kernels.gemm16.batched_gemm`), the softmax and its backward
  by the fused float32 kernels of ``attention_softmax.cu``;
* **the twin** (NumPy, or CuPy with ``MINIPEFT_KERNELS=0``): operands rounded to the 16-bit
  grid but held in float32 (:func:`minipeft.amp.round_to_compute`), float32 ``@``, the
  reference's softmax. The numbers agree with the tensor-core path up to the order of the
  float32 sums, so the CPU under autocast is an emulation of the GPU.
"""
from __future__ import annotations

from ..amp import autocast_dtype, cast_16bit, device_dtype, round_to_compute
from ..fast import enabled, on_gpu
from ..ops.attention import Attention, masked_softmax  # the reference's, the twin of attn_softmax_forward
from ..ops.common import swap_last
from . import attention_softmax
from .gemm16 import batched_gemm


def uses_tensor_cores(a) -> bool:
    """True where attention runs on real 16-bit arrays: a CuPy array with the kernels on."""
    return on_gpu(a) and enabled()


def to_16bit(a, compute_dtype: str, real: bool):
    """A 16-bit operand: a C-contiguous float16/bfloat16 CuPy array (``real``), else rounded float32."""
    if not real:
        return round_to_compute(a, compute_dtype)
    return cast_16bit(a, device_dtype(compute_dtype))  # C-contiguous; ml_dtypes' bfloat16 for bfloat16


def bmm(a, b, real: bool, trans_a: bool = False, trans_b: bool = False):
    """``op(a) @ op(b)`` over the (B, H) batch with float32 sums, returned as float32."""
    if real:
        return batched_gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    return (swap_last(a) if trans_a else a) @ (swap_last(b) if trans_b else b)


def softmax_backward(p, dp, scale: float):
    """The twin of ``attn_softmax_backward``: ``scale * p * (dp - sum(dp * p))`` over the keys."""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * p.dtype.type(scale)


class AmpAttention(Attention):
    """:class:`~minipeft.ops.attention.Attention` with 16-bit products and a float32 softmax.

    The compute dtype active at the forward (``autocast``) and the path taken (tensor cores
    or twin) are kept in ``ctx``, so the backward runs the same way, also outside the block.
    Inputs and gradients are float32.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, key_mask, scale):
        dt = ctx.compute_dtype = autocast_dtype(q, k, v)
        real = ctx.real16 = uses_tensor_cores(q)
        ctx.scale = scale
        q, k, v = (to_16bit(a, dt, real) for a in (q, k, v))  # (B, H, Tq, D), (B, H, Tk, D) x 2
        s = bmm(q, k, real, trans_b=True)  # (B, H, Tq, Tk) float32
        if real:
            p = attention_softmax.attn_softmax_forward(s, scale, causal, key_mask)  # in place, float32
        else:
            p = masked_softmax(s, scale, causal, key_mask)
        p = to_16bit(p, dt, real)  # (B, H, Tq, Tk) 16-bit
        ctx.save_for_backward(q, k, v, p)
        return bmm(p, v, real)  # (B, H, Tq, D) float32

    @staticmethod
    def backward(ctx, g):
        q, k, v, p = ctx.saved_tensors
        dt, real = ctx.compute_dtype, ctx.real16
        nq, nk, nv = ctx.needs_input_grad[:3]
        g = to_16bit(g, dt, real)  # (B, H, Tq, D): loss scaling keeps it from underflowing
        gv = bmm(p, g, real, trans_a=True) if nv else None  # (B, H, Tk, D)
        gq = gk = None
        if nq or nk:
            dp = bmm(g, v, real, trans_b=True)  # (B, H, Tq, Tk) float32
            if real:  # the kernel reads float32 probabilities: widen the saved 16-bit ones
                ds = attention_softmax.attn_softmax_backward(p.astype("float32"), dp, ctx.scale)  # in place on dp
            else:
                ds = softmax_backward(p, dp, ctx.scale)
            ds = to_16bit(ds, dt, real)  # (B, H, Tq, Tk), already scaled
            gq = bmm(ds, k, real) if nq else None  # (B, H, Tq, D)
            gk = bmm(ds, q, real, trans_a=True) if nk else None  # (B, H, Tk, D)
        return gq, gk, gv, None, None, None


def amp_attention_applies(q, k, v, causal, key_mask, scale) -> bool:
    """Under a 16-bit ``autocast``: float32 q, k, v of 4 dims (B, H, T, D) with the same (B, H)."""
    return (autocast_dtype(q, k, v) is not None and q.ndim == 4
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2])
