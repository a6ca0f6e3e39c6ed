"""A layer norm whose output is read in 16 bits: its result written in the compute dtype under autocast.

torch.autocast keeps ``layer_norm`` in float32 (Micikevicius et al. 2018, §3.3: reductions in float32),
and so does :mod:`minipeft.amp`: the statistics, xhat and the affine map are float32. But when the
only reader of the output is a linear layer, that layer rounds it to the compute dtype at once (its
16-bit GEMM operand, :func:`minipeft.amp.to_compute`). Then the float32 output is written, read back,
rounded and written again: a pass over (N, C) that changes nothing. Here the layer norm writes the
rounded values itself::

    y16 = round(xhat * w + b)        the float32 y of the layer norm, rounded once to nearest even

bit for bit what the linear layer would have made of the float32 y, so the step's numbers do not
change at all. The backward is the layer norm's: the rounding is autocast's cast, whose gradient is
passed on as it is (the consumer's dL/dy comes back in float32). xhat and rstd are saved as by the
float32 layer norm, so the saved bytes do not change either.

GPT asks for it (:class:`minipeft.gpt.Block`) only where the consumer reads 16 bits anyway
(:func:`minipeft.gpt.reads_16bit`): a plain ``nn.Linear`` (``c_attn``, ``c_fc``, the LM head), or a LoRA
layer whose fused op takes the input (``peft/lora_fused.py``: it too only rounds x to 16 bits, once for
W0 and A). Any other PEFT layer in its place (LoRA with dropout in training, DoRA, an adapter, (IA)³ ...)
gets the float32 output as before.

Two ways to run it, chosen per call: the kernel (float32 CuPy x, kernels on: ``layernorm.cu``'s
16-bit entry points, one pass), and the twin (the float32 layer norm, then
:func:`minipeft.amp.to_compute`: a CuPy 16-bit array, or on NumPy float32 values on the 16-bit grid).
"""
from __future__ import annotations

import numpy as np

from .amp import autocast_dtype, to_compute
from .engine import Tensor
from .fast import enabled, float32_on_gpu, on_gpu
from .ops.norm_act import LayerNorm, layer_norm


def uses_kernel(x, weight, bias) -> bool:
    """True where ``layernorm.cu`` writes the 16-bit output: float32 C-contiguous CuPy arrays (the float32
    layer norm kernel's condition), kernels on."""
    return enabled() and float32_on_gpu(x, weight, bias)


class AmpLayerNormOut16(LayerNorm):
    """:class:`~minipeft.ops.norm_act.LayerNorm` whose output is rounded to the active autocast dtype
    (module docstring); saves what the float32 layer norm saves."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dt = autocast_dtype(x, weight)
        if not uses_kernel(x, weight, bias):
            return to_compute(LayerNorm.forward(ctx, x, weight, bias, eps), dt)
        from .kernels.functions import FusedLayerNorm  # lazy: CuPy only

        return FusedLayerNorm.forward(ctx, x, weight, bias, eps, out_dtype=dt)  # y in dt, the same saved arrays

    @staticmethod
    def backward(ctx, g):
        # the saved arrays are those of LayerNorm (the twin) or FusedLayerNorm (the kernel): one backward serves
        from .kernels.functions import FusedLayerNorm  # the kernels' backward on CuPy, else the reference's

        return FusedLayerNorm.backward(ctx, g) if on_gpu(g) and enabled() else LayerNorm.backward(ctx, g)


def layer_norm_output_16bit(x, weight, bias, eps: float = 1e-5):
    """``F.layer_norm`` for a layer norm whose output is read in 16 bits: under a 16-bit autocast (float32
    operands) it runs as :class:`AmpLayerNormOut16`; otherwise it is ``F.layer_norm`` itself."""
    arrays = (t.data if isinstance(t, Tensor) else t for t in (x, weight, bias))
    if any(a.dtype != np.float32 for a in arrays) or autocast_dtype() is None:
        return layer_norm(x, weight, bias, eps)
    return AmpLayerNormOut16.apply(x, weight, bias, eps)
