"""Does the host's time per call slow the dequantize's GPU work, and which part of the whole call does it?

At 4096x11008 the default dequantize's launch takes about 32 µs on the H200 and its whole Python call
(``dequantize_4bit_cuda``: cache look-up, allocation, launch) 13-21 µs of host time, yet the whole call
measured 0.5-3 µs slower than the launch alone in the runs where the host was slower
(``results/h200-2026-12-03/README.md``, calls h and i). This script takes the whole call apart. Every row
is timed as ``dequant_4bit.py`` times (one call enqueued before each start event, ``--inner`` calls per
event pair), on one quantized weight (NF4, block size 64, bfloat16 output; ``--double-quant``: with double
quantization):

- ``launch``: the cached launch into one preallocated output (the launch alone);
- ``launch+spin{X}``: the same, then the host spins X µs before the next call (host time alone, no
  allocation): if these rows stay at ``launch`` while X is below the GPU's time, the host's time alone
  does not slow the GPU;
- ``empty+launch``: ``cp.empty`` of the output, then the launch into it (the allocation alone added);
- ``cached-call``: ``cached_dequantize_launch(packed, state, dtype)()`` (look-up, allocation, launch);
- ``whole-call``: ``dequantize_4bit_cuda(packed, state, dtype)``;
- where the default launches with programmatic dependent launch (``PDL``, sm_90+): ``plain-launch``, the same
  kernel launched plainly (``PDL=0``); ``gemm``, a float16 ``--gemm`` x ``--gemm`` matrix product (cuBLAS,
  which does not let the next kernel start early); ``gemm+launch`` and ``gemm+plain-launch``, that product
  followed by the launch: what PDL gains where the kernel before is not a dequantize, as in a forward pass.

    python benchmarks/dequant_host.py --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # minipeft from this checkout


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x11008")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--inners", default="10,50", help="calls per event pair, comma-separated")
    ap.add_argument("--spins", default="10,20,30,40", help="host spin times in µs, comma-separated")
    ap.add_argument("--double-quant", action="store_true", help="the weight with double quantization")
    ap.add_argument("--gemm", type=int, default=2048, help="size of the square float16 matrix product of the "
                    "gemm rows (0: none)")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def spin(us: float) -> None:
    """Keep the host busy for ``us`` microseconds (no sleep: a sleep's wake-up is far coarser)."""
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def main(argv=None) -> dict:
    args = parse_args(argv)
    import cupy as cp
    import torch

    import dequant_4bit as d4
    from minipeft.backend import bfloat16_dtype
    from minipeft.kernels.quant4bit import (DequantizeLaunch, cached_dequantize_launch, default_variant,
                                            dequantize_4bit_cuda, quantize_4bit_cuda)

    bfloat16_dtype()
    props = cp.cuda.runtime.getDeviceProperties(0)
    meta = {"command": " ".join(["python", "benchmarks/dequant_host.py"] + list(sys.argv[1:] if argv is None else argv)),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device_name": props["name"].decode(), "cupy": cp.__version__,
            "default_variant": d4.variant_name(default_variant(0))}
    for k, v in meta.items():
        print(f"{k}: {v}")
    copy_bw = d4.copy_bandwidth(cp, torch, 1024, 10)
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + written, 1024 MiB)")

    shape = tuple(int(s) for s in args.shape.lower().split("x"))
    n = shape[0] * shape[1]
    x = cp.random.standard_normal(n, dtype=cp.float32).reshape(shape)
    packed, state = quantize_4bit_cuda(x, 64, "nf4", args.double_quant)
    launch = cached_dequantize_launch(packed, state, "bfloat16")
    out = launch()
    expected = out.view(cp.uint16).copy()
    fns = {"launch": lambda: launch(out)}
    for us in (float(s) for s in args.spins.split(",") if s):
        fns[f"launch+spin{us:g}"] = lambda us=us: (launch(out), spin(us))
    fns["empty+launch"] = lambda: launch(cp.empty(shape, dtype=launch.dtype))
    fns["cached-call"] = lambda: cached_dequantize_launch(packed, state, "bfloat16")()
    fns["whole-call"] = lambda: dequantize_4bit_cuda(packed, state, "bfloat16")
    dequantize_only = set(fns)                                         # rows whose bytes are the dequantize's
    if launch.variant.get("PDL"):
        plain = DequantizeLaunch(packed, state, launch.dtype, variant={**launch.variant, "PDL": 0})
        fns["plain-launch"] = lambda: plain(out)
        dequantize_only.add("plain-launch")
        if args.gemm:
            a = cp.random.standard_normal((args.gemm, args.gemm), dtype=cp.float32).astype(cp.float16)
            c = cp.empty_like(a)
            fns["gemm"] = lambda: cp.matmul(a, a, out=c)
            fns["gemm+launch"] = lambda: (cp.matmul(a, a, out=c), launch(out))
            fns["gemm+plain-launch"] = lambda: (cp.matmul(a, a, out=c), plain(out))
    for name, fn in fns.items():                                       # every row writes the same bits
        r = fn()
        if name == "gemm":
            continue
        got = r if isinstance(r, cp.ndarray) and r.shape == shape else out
        assert bool((got.view(cp.uint16) == expected).all()), f"{name}: not the launch's output"
    moved = d4.bytes_read(n, 64, args.double_quant) + 2 * n
    rows = []
    for inner in (int(s) for s in args.inners.split(",")):
        host = {}
        t = d4.time_alternating(fns, torch, 3, args.reps, inner, host=host)
        print(f"\n--inner {inner}: {args.shape}, NF4{' + double quantization' if args.double_quant else ''}, "
              f"bfloat16 output, {moved / 1e6:.1f} MB moved per call")
        print(f"{'row':>17} {'median us':>10} {'IQR us':>13} {'% copy':>7} {'host us':>8}")
        for name, (q1, med, q3) in t.items():
            frac = moved / med / copy_bw if name in dequantize_only else None   # (gemm rows: time only)
            rows.append({"inner": inner, "row": name, "median_us": med * 1e6, "q1_us": q1 * 1e6, "q3_us": q3 * 1e6,
                         "host_us": host[name] * 1e6, "frac_copy": frac})
            pct = "-" if frac is None else f"{100 * frac:.1f}%"
            print(f"{name:>17} {med * 1e6:10.1f} {q1 * 1e6:6.1f}-{q3 * 1e6:6.1f} {pct:>7} {host[name] * 1e6:8.1f}")
    result = {**meta, "copy_GB_s": copy_bw / 1e9, "shape": list(shape), "double_quant": args.double_quant,
              "rows": rows}
    return d4.write_result(args.json, result)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
