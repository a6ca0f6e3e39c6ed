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
slices, no dropout in training) on a float32 ``Linear`` base or on QLoRA's ``Linear4bit``;
anything else runs the reference. With a 4-bit base, W0 is dequantized in forward and again
in backward, never saved (as :class:`minipeft.quant.modules.MatMul4bit` does: QLoRA's memory).
"""
from __future__ import annotations

from .. import fast
from ..amp import aligned, autocast_dtype, gemm, padded_bias, to_compute, to_compute_padded
from ..backend import sum_rows
from ..engine import Function, Tensor
from ..nn import Linear
from ..quant.modules import Linear4bit, dequantized_for


def _padded(a, dt: str, n: int):
    """``a``'s rows (or a gradient's columns) as an operand of a ``dt`` product, zero-padded to ``n``."""
    return to_compute_padded(a, dt, n, axis=0)


class LoraLinear(Function):
    """``x W0^T + b + s (x A^T) B^T`` in one op; ``x`` (..., in), ``W0`` (out, in), ``A`` (r, in), ``B`` (out, r).

    ``w`` None: W0 is ``base4.dequantize``'d (a frozen 4-bit base) in forward and in backward."""

    @staticmethod
    def forward(ctx, x, w, b, a, bw, scaling: float = 1.0, base4=None):
        dt = ctx.compute_dtype = autocast_dtype(x, a) or "float32"
        ctx.base4 = base4
        if w is None:
            w = dequantized_for(base4.weight.data, base4.quant_state, x, dt)  # (out, in), 16-bit on the GPU
        out = ctx.out = w.shape[0]
        n = aligned(out) if dt != "float32" else out  # tensor-core shapes, as amp.AmpLinear pads
        ctx.lead, ctx.scaling, ctx.n_in = x.shape[:-1], scaling, x.shape[-1]
        x2 = to_compute(x.reshape(-1, x.shape[-1]), dt)         # (M, in), cast once for W0 and A
        wc, ac, bc = _padded(w, dt, n), to_compute(a, dt), _padded(bw, dt, n)  # (n, in), (r, in), (n, r)
        t = gemm(x2, ac.T)                                      # (M, r) float32
        tc = to_compute(t, dt)
        bias = None if b is None else padded_bias(b, n)         # (n,): added by the base's GEMM (on the GPU
        y = gemm(x2, wc.T, cols=out, bias=bias)                 # in its epilogue); (M, out) float32: the base
        y = y + gemm(tc, bc.T, cols=out) * scaling              # + s B A x
        nx, nw, _, na, nB = ctx.needs_input_grad[:5]  # save what the reference's ops would (same bytes)
        ctx.save_for_backward(x2 if na or nw else None, wc if nx and base4 is None else None,
                              ac if nx else None, bc if na or nx else None, tc if nB else None)
        return y.reshape(ctx.lead + (out,))

    @staticmethod
    def backward(ctx, g):
        x2, wc, ac, bc, tc = ctx.saved_tensors
        nx, nw, nb, na, nB = ctx.needs_input_grad[:5]
        dt, out, s = ctx.compute_dtype, ctx.out, ctx.scaling
        n = aligned(out) if dt != "float32" else out
        if wc is None and nx:  # a 4-bit base: dequantized again, as MatMul4bit's backward does
            wc = _padded(dequantized_for(ctx.base4.weight.data, ctx.base4.quant_state, g, dt), dt, n)
        g2 = g.reshape(-1, out)                                 # (M, out)
        gc = to_compute_padded(g2, dt, n)                       # (M, n)
        gsc = gc if s == 1 else to_compute_padded(g2 * s, dt, n)  # the reference's Mul: s g, then its cast
        gtc = to_compute(gemm(gsc, bc), dt) if na or nx else None  # (M, r) dL/dt
        gB = gemm(gsc.T, tc, rows=out) if nB else None          # (out, r)
        gA = gemm(gtc.T, x2) if na else None                    # (r, in)
        gx = None
        if nx:
            gx = (gemm(gc, wc) + gemm(gtc, ac)).reshape(ctx.lead + (ctx.n_in,))  # (..., in)
        gw = gemm(gc.T, x2, rows=out) if nw else None           # (out, in)
        gb = sum_rows(g2) if nb else None                       # (out,)
        return gx, gw, gb, gA, gB


def fused_applies(layer, x, *args, **kwargs) -> bool:
    """One active plain-LoRA adapter, no dropout in training, x float32 (or, under autocast, already in
    its compute dtype: a 16-bit layer-norm output) on the adapter's device, and a float32 Linear base or
    a Linear4bit that computes in the dtype the adapter does."""
    if args or kwargs or not isinstance(x, Tensor):
        return False
    dt = autocast_dtype(x.data)
    return _fusable(layer, dt) and (x.data.dtype == "float32" or dt is not None) and _same_device(layer, x.data)


def reads_16bit(layer) -> bool:
    """True where the fused op takes this layer's input under the active autocast, whatever its dtype: then
    the input is only ever rounded to 16 bits (``x`` cast once for W0 and A), and a layer norm before it
    may write it so (:mod:`minipeft.amp_layernorm`). Not with ``MINIPEFT_KERNELS=0`` (the reference runs)."""
    return (fast.enabled() and layer.batch_adapters is None and _fusable(layer, autocast_dtype())
            and _same_device(layer, layer.lora_A[layer.active_adapters[0]].weight.data))


def _fusable(layer, dt) -> bool:
    """:func:`fused_applies` but for the input: the layer's adapters, dropout, base and dtypes (``dt``: the
    autocast dtype of the call, or None)."""
    if layer.disable_adapters or layer.merged:
        return False
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or len(layer.active_adapters) != 1:
        return False
    name = active[0]
    if layer.use_dora.get(name) or layer.enable_lora.get(name):
        return False
    drop = layer.lora_dropout[name]
    base = layer.get_base_layer()
    if drop.p > 0 and drop.training:
        return False
    arrays = [layer.lora_A[name].weight.data, layer.lora_B[name].weight.data]
    if type(base) is Linear:
        arrays.append(base.weight.data)
    elif type(base) is not Linear4bit or base.compute_dtype not in ("float32", dt or "float32"):
        return False  # another base, or a 4-bit layer computing in another dtype than the adapter
    return all(a.dtype == "float32" for a in arrays)


def _same_device(layer, x) -> bool:
    """``x``, the adapter's weights and the base's weight are all NumPy or all CuPy arrays."""
    name = layer.active_adapters[0]
    arrays = [x, layer.lora_A[name].weight.data, layer.lora_B[name].weight.data, layer.get_base_layer().weight.data]
    return len({type(a) for a in arrays}) == 1


def fused_forward(layer, x, *args, **kwargs) -> Tensor:
    """``lora_forward`` of a layer :func:`fused_applies` accepts, as one :class:`LoraLinear`."""
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    four_bit = type(base) is Linear4bit
    return LoraLinear.apply(x, None if four_bit else base.weight, base.bias, layer.lora_A[name].weight,
                            layer.lora_B[name].weight, scaling=float(layer.scaling[name]),
                            base4=base if four_bit else None)


def register(lora_forward) -> None:
    """Enter :func:`fused_forward` as ``lora_forward``'s fast path (``MINIPEFT_KERNELS=0`` turns it off)."""
    fast.register(lora_forward, fused_forward, when=fused_applies)
