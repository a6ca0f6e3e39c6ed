"""CUDA RawKernels (``<name>.cu``) with their launchers (``<name>.py``), and the plug board
that registers each one as the fast path of its NumPy twin.

Only this package and :mod:`minipeft.backend` import CuPy, and only when a CuPy array
reaches them. Launchers take arrays and tables (a ``QuantState`` from
:mod:`minipeft.quant.state` bundles those of a quantized tensor) and import no private
name; the code they replace is the reference a student reads (``minipeft/ops``,
``minipeft/quant``, ``minipeft/optim/core.py``), and a ``gpu`` test in ``tests/kernels``
checks that the two agree (bit for bit for AdamW and the quantizers). Shared device
helpers are in ``common.cuh``, included through NVRTC.

Below, every kernel is registered in :mod:`minipeft.fast` with the condition under
which it runs (float32 CuPy arrays, mostly). ``MINIPEFT_KERNELS=0`` in the environment
turns all of them off, the bit-exact quantizers included, so the very same NumPy-style
code runs through CuPy instead (what ``benchmarks/gpu_profile.py`` compares against, and
how a student can check that a kernel changes speed, not results). BGMV / SGMV
(``bgmv.py``), whose twins live in :mod:`minipeft.serve` above this package, are
registered there. Two registrations are a precision mode rather than a kernel:
:class:`~minipeft.kernels.amp_attention.AmpAttention`, attention under a 16-bit
``amp.autocast``, and :class:`~minipeft.kernels.amp_cross_entropy.AmpCrossEntropy`, the loss of
the 16-bit logits the LM head writes there, run on NumPy too (as their twins, an emulation of the
GPU's arithmetic) and stay on with ``MINIPEFT_KERNELS=0`` (which makes them run the twins on CuPy as well).
"""
from __future__ import annotations

from .. import amp, backend, fast
from ..ops.attention import Attention
from ..ops.linalg import Linear
from ..ops.loss import CrossEntropy
from ..ops.norm_act import GELU, LayerNorm
from ..optim import core as optim_core
from ..quant import blockwise, int8
from . import adamw, amp_attention, amp_cross_entropy, cast16, functions, gemm16, quant4bit, quant8bit


def _first_on_gpu(a, *args, **kwargs) -> bool:
    """The quantizers' condition: the array to (de)quantize is a CuPy array."""
    return fast.on_gpu(a)


# Training: fused Functions in place of the reference ops (minipeft/kernels/functions.py)
fast.register(GELU, functions.FusedGELU, when=functions.gelu_applies)
fast.register(LayerNorm, functions.FusedLayerNorm, when=functions.layernorm_applies)
# the loss of 16-bit logits (the LM head's under autocast): float32 statistics, its twin on NumPy and with
# MINIPEFT_KERNELS=0 (a precision mode, as the 16-bit attention below); float32 logits: the fused float32 one
fast.register(CrossEntropy, amp_cross_entropy.AmpCrossEntropy, when=amp_cross_entropy.amp_cross_entropy_applies,
              switch=False)
fast.register(CrossEntropy, functions.FusedCrossEntropy, when=functions.cross_entropy_applies)
# Attention: under a 16-bit autocast the 16-bit one (tried first; other numbers by request, so, like
# minipeft.amp's products, not switched off by MINIPEFT_KERNELS=0, which only makes it run its twin),
# else the float32 fused one
fast.register(Attention, amp_attention.AmpAttention, when=amp_attention.amp_attention_applies, switch=False)
fast.register(Attention, functions.FusedAttention, when=functions.attention_applies)
fast.register(Linear, functions.LinearGEMM, when=functions.linear_applies)
fast.register(optim_core.adamw_update, adamw.adamw_update_cuda, when=adamw.applies)
fast.register(optim_core.adamw_update_from, adamw.adamw_update_from_cuda, when=adamw.applies_from)
# Mixed precision: its operands float32 -> float16/bfloat16 (zero-padded) in one pass, CuPy's bits; its
# 2-D products as one cuBLAS GEMM, 16-bit in, float32 out; a product plus a bias as one cuBLASLt GEMM that
# adds the bias in its epilogue (kernels/cublaslt.py)
fast.register(amp.cast_16bit, cast16.cast_16bit_cuda, when=cast16.applies)
fast.register(amp.matmul_16bit, gemm16.matmul_16bit_cuda, when=gemm16.matmul_16bit_applies)
fast.register(amp.matmul_16bit_bias, gemm16.matmul_16bit_bias_cuda, when=gemm16.matmul_16bit_bias_applies)
fast.register(backend.sum_rows, gemm16.sum_rows_cuda, when=gemm16.sum_rows_applies)

# Quantization: bit-exact kernels in place of minipeft.quant's array code
fast.register(blockwise.quantize_4bit, quant4bit.quantize_4bit_cuda, when=_first_on_gpu)
fast.register(blockwise.dequantize_4bit, quant4bit.dequantize_4bit_cuda, when=_first_on_gpu)
fast.register(blockwise.quantize_blockwise, quant8bit.quantize_blockwise_cuda, when=_first_on_gpu)
fast.register(blockwise.dequantize_blockwise, quant8bit.dequantize_blockwise_cuda, when=_first_on_gpu)
fast.register(int8.int8_vectorwise_quant, quant8bit.int8_vectorwise_quant_cuda, when=_first_on_gpu)
