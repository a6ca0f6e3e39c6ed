"""LoRA's layer as one Function: ``y = x W0^T + b + s (x A^T) B^T``, its backward written out.

The reference is :func:`minipeft.peft.lora.lora_forward` (``LoraLayer.forward``): the base
Linear, ``lora_A``, ``lora_B``, the scaling and the sum, five ops of the autograd engine, and
under :func:`minipeft.amp.autocast` the base and ``lora_A`` each cast the same ``x`` to 16 bits.
This Function computes the same products (Hu et al. 2021, arXiv 2106.09685, eq. 3) in one op,
with ``x`` cast once; on a GPU, where a training step waits on the host, fewer ops is most of the
gain (issue [fast16], item 3: "LoRA's two thin GEMMs arranged to avoid extra round trips").

With ``t = x A^T`` (M, r) and ``g = dL/dy`` (M, out), the backward by hand::

    dL/dB  = (s g)^T t           (out, r)
    dL/dt  = (s g) B             (M, r)
    dL/dA  = (dL/dt)^T x         (r, in)
    dL/dx  = g W0 + (dL/dt) A    (M, in)
    dL/db  = sum over rows of g  (out,)
    dL/dW0 = g^T x               (only if the base weight trains)

The products and their roundings are the reference's, one by one (``amp.gemm`` of
``amp.to_compute`` operands, the same zero padding), so the results are the reference's up to
the order cuBLAS picks for a sum; ``tests/peft/test_lora_fused.py`` compares the two. It is
the fast path of ``lora_forward`` for a layer with one active plain-LoRA adapter (no DoRA, no
slices, no dropout in training) on a float32 ``Linear`` base; anything else runs the reference.
"""
from __future__ import annotations

from .. import fast
from ..amp import aligned, autocast_dtype, gemm, to_compute, to_compute_padded
from ..backend import sum_rows
from ..engine import Function, Tensor
from ..nn import Linear


def _padded(a, dt: str, n: int):
    """``a``'s rows (or a gradient's columns) as an operand of a ``dt`` product, zero-padded to ``n``."""
    return to_compute_padded(a, dt, n, axis=0)


class LoraLinear(Function):
    """``x W0^T + b + s (x A^T) B^T`` in one op; ``x`` (..., in), ``W0`` (out, in), ``A`` (r, in), ``B`` (out, r)."""

    @staticmethod
    def forward(ctx, x, w, b, a, bw, scaling: float = 1.0):
        dt = ctx.compute_dtype = autocast_dtype(x, w) or "float32"
        out = ctx.out = w.shape[0]
        n = aligned(out) if dt != "float32" else out  # tensor-core shapes, as amp.AmpLinear pads
        ctx.lead, ctx.scaling = x.shape[:-1], scaling
        x2 = to_compute(x.reshape(-1, x.shape[-1]), dt)         # (M, in), cast once for W0 and A
        wc, ac, bc = _padded(w, dt, n), to_compute(a, dt), _padded(bw, dt, n)  # (n, in), (r, in), (n, r)
        t = gemm(x2, ac.T)                                      # (M, r) float32
        tc = to_compute(t, dt)
        y = gemm(x2, wc.T, cols=out)                            # (M, out) float32: the base
        if b is not None:
            y = y + b
        y = y + gemm(tc, bc.T, cols=out) * scaling              # + s B A x
        ctx.save_for_backward(x2, wc, ac, bc, tc)
        return y.reshape(ctx.lead + (out,))

    @staticmethod
    def backward(ctx, g):
        x2, wc, ac, bc, tc = ctx.saved_tensors
        nx, nw, nb, na, nB = ctx.needs_input_grad[:5]
        dt, out, s, n = ctx.compute_dtype, ctx.out, ctx.scaling, wc.shape[0]
        g2 = g.reshape(-1, out)                                 # (M, out)
        gc = to_compute_padded(g2, dt, n)                       # (M, n)
        gsc = gc if s == 1 else to_compute_padded(g2 * s, dt, n)  # the reference's Mul: s g, then its cast
        gt = gemm(gsc, bc)                                      # (M, r) dL/dt
        gtc = to_compute(gt, dt)
        gB = gemm(gsc.T, tc, rows=out) if nB else None          # (out, r)
        gA = gemm(gtc.T, x2) if na else None                    # (r, in)
        gx = None
        if nx:
            gx = (gemm(gc, wc) + gemm(gtc, ac)).reshape(ctx.lead + (x2.shape[-1],))  # (..., in)
        gw = gemm(gc.T, x2, rows=out) if nw else None           # (out, in)
        gb = sum_rows(g2) if nb else None                       # (out,)
        return gx, gw, gb, gA, gB


def fused_applies(layer, x, *args, **kwargs) -> bool:
    """One active plain-LoRA adapter, no dropout in training, a float32 Linear base, x float32 on its device."""
    if args or kwargs or layer.disable_adapters or layer.merged or not isinstance(x, Tensor):
        return False
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or len(layer.active_adapters) != 1:
        return False
    name = active[0]
    if layer.use_dora.get(name) or layer.enable_lora.get(name):
        return False
    drop = layer.lora_dropout[name]
    base = layer.get_base_layer()
    if (drop.p > 0 and drop.training) or type(base) is not Linear:
        return False
    arrays = (x.data, base.weight.data, layer.lora_A[name].weight.data, layer.lora_B[name].weight.data)
    return all(a.dtype == "float32" for a in arrays) and len({type(a) for a in arrays}) == 1


def fused_forward(layer, x, *args, **kwargs) -> Tensor:
    """``lora_forward`` of a layer :func:`fused_applies` accepts, as one :class:`LoraLinear`."""
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    return LoraLinear.apply(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                            scaling=float(layer.scaling[name]))


def register(lora_forward) -> None:
    """Enter :func:`fused_forward` as ``lora_forward``'s fast path (``MINIPEFT_KERNELS=0`` turns it off)."""
    fast.register(lora_forward, fused_forward, when=fused_applies)
