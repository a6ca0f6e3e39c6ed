"""Experiment: the wide dequantize kernel with fewer, persistent CUDA blocks (grid-stride steps) vs one block per step."""
import sys, json
sys.path.insert(0, "benchmarks")
import cupy as cp, numpy as np, torch
import dequant_4bit as d4
from minipeft.backend import bfloat16_dtype
from minipeft.kernels.quant4bit import DequantizeLaunch, quantize_4bit_cuda
bfloat16_dtype()
sm = cp.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
copy_bw = d4.copy_bandwidth(cp, torch, 1024, 10)
print("copy GB/s", copy_bw / 1e9)
res = []
for spec in ("4096x11008", "8192x8192"):
    shape = tuple(int(s) for s in spec.split("x")); n = shape[0] * shape[1]
    x = cp.random.standard_normal(n, dtype=cp.float32).reshape(shape)
    for dq in (False, True):
        pm, qs = quantize_4bit_cuda(x, 64, "nf4", dq)
        for dt in ("float16", "bfloat16"):
            fns = {}; ref = None
            for v in (dict(WIDE=1, WIDE_BLOCKS=8, PDL=1), dict(WIDE=1, WIDE_BLOCKS=6, PDL=1)):
                for waves in (0, 1, 2, 4):
                    grid = None if waves == 0 else sm * v["WIDE_BLOCKS"] * waves
                    L = DequantizeLaunch(pm, qs, np.dtype(dt), variant=v, grid=grid)
                    o = L()
                    if ref is None: ref = o.view(cp.uint16).copy()
                    assert bool((L(o).view(cp.uint16) == ref).all())
                    fns[f"b{v['WIDE_BLOCKS']}g{waves}"] = lambda L=L, o=o: L(o)
            t = d4.time_alternating(fns, torch, 10, 40, 10)
            moved = d4.bytes_read(n, 64, dq) + 2 * n
            for k, (q1, med, q3) in t.items():
                pct = moved / med / copy_bw * 100
                res.append(dict(shape=spec, dq=dq, dtype=dt, row=k, median_us=med * 1e6, pct=pct))
                print(f"{spec:>11} dq={int(dq)} {dt:>8} {k:>6} {med*1e6:7.2f} us {pct:5.1f}%")
json.dump(res, open(sys.argv[1], "w"), indent=1)
