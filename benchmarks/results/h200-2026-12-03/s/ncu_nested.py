"""One launch each (after warm-up) of the default wide kernel, float16 and bfloat16 out, with and without double quantization."""
import os, sys
sys.path.insert(0, os.getcwd())
import cupy as cp, numpy as np
from minipeft.backend import bfloat16_dtype
from minipeft.kernels.quant4bit import DequantizeLaunch, quantize_4bit_cuda
bfloat16_dtype()
n = 4096 * 11008
x = cp.random.standard_normal(n, dtype=cp.float32).reshape(4096, 11008)
for dq in (False, True):
    pm, qs = quantize_4bit_cuda(x, 64, "nf4", dq)
    for dt in ("float16", "bfloat16"):
        l = DequantizeLaunch(pm, qs, np.dtype(dt))
        o = l(); l(o); cp.cuda.runtime.deviceSynchronize()
print("done")
