"""Time minipeft's 4-bit dequantize kernel against bitsandbytes' ``dequantize_4bit`` in one run.

Both dequantize the same weight, quantized to NF4 at block size 64 (QLoRA's setting), with
and without double quantization, to a float16 and to a bfloat16 output (``--out-dtypes``;
bitsandbytes returns its state's dtype, so for bfloat16 it quantizes the weight cast to
bfloat16, and minipeft the same values as float32). The weight is drawn once with torch on
the GPU; bitsandbytes quantizes it with its own ``quantize_4bit`` and minipeft with
``quantize_4bit_cuda`` (the packed bytes are compared: they should be identical).
minipeft's kernel also dequantizes bitsandbytes' own state, and that output is compared
bit for bit with bitsandbytes'.

Bytes counted (DESIGN.md, "Performance and memory"): read = packed bytes + absmax
(float32 per block; nested: one uint8 per block + float32 per 256 blocks + the 256-entry
code + the offset), written = the 16-bit output. Achieved GB/s = bytes / time, set
against the device-to-device copy bandwidth measured in the same run (``cudaMemcpy`` of
1 GiB, counting bytes read + written).

Rows: ``bnb`` is ``bitsandbytes.functional.dequantize_4bit(packed, state)``; ``minipeft``
is ``dequantize_4bit_cuda(packed, state, dtype)``, the whole Python call (the launch cached
on the state after the first call: an identity check, the allocation, the launch);
``mp-kernel`` is a ``prepare_dequantize_4bit`` launcher (the output allocated once too, the
launch alone), which shows the kernel's own bandwidth; ``mp-waves`` is the same kernel on
the grid of one sweep per CUDA block (several waves) instead of one wave of equal shares,
to see what the one-wave grid buys.

Timing (METHOD.md): warm-up calls, then ``--reps`` repetitions of ``--inner`` back-to-back
calls between two CUDA events (so the host's launch overhead overlaps the GPU work, as in
a model's forward), the two libraries alternating repetition by repetition; median and
interquartile range of the time per call. Both libraries run on the legacy default
stream, so one pair of events times either.

    python benchmarks/dequant_4bit.py
    python benchmarks/dequant_4bit.py --shapes 8192x8192,4096x11008 --reps 100 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # minipeft from this checkout


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8192x8192,4096x11008",
                    help="comma-separated weight shapes ROWSxCOLS (default 8192x8192,4096x11008)")
    ap.add_argument("--blocksize", type=int, default=64, help="4-bit block size (default 64)")
    ap.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"), help="default nf4")
    ap.add_argument("--out-dtypes", default="float16,bfloat16",
                    help="comma-separated output dtypes, float16 and/or bfloat16 (default both)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    ap.add_argument("--reps", type=int, default=60, help="timed repetitions (default 60)")
    ap.add_argument("--inner", type=int, default=10, help="calls per repetition (default 10)")
    ap.add_argument("--copy-mib", type=int, default=1024, help="bytes copied for the bandwidth (MiB)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not set(args.out_dtypes.split(",")) <= {"float16", "bfloat16"}:
        ap.error(f"--out-dtypes takes float16 and/or bfloat16, got {args.out_dtypes!r}")
    for k in ("warmup", "reps", "inner", "copy_mib"):
        if getattr(args, k) <= 0:
            ap.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    return args


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def time_alternating(fns: dict, torch, warmup: int, reps: int, inner: int) -> dict:
    """Seconds per call of each function: median and quartiles over ``reps`` event pairs."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) * 1e-3 / inner)
    return {k: _quartiles(v) for k, v in times.items()}


def copy_bandwidth(cp, torch, mib: int, reps: int) -> float:
    """Device-to-device cudaMemcpy of ``mib`` MiB: (read + written bytes) / median time."""
    nbytes = mib << 20
    src = cp.random.random(nbytes // 4, dtype=cp.float32)             # random data, not zeros
    dst = cp.empty_like(src)

    def copy():
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                    cp.cuda.runtime.memcpyDeviceToDevice, 0)

    t = time_alternating({"copy": copy}, torch, 5, reps, 5)["copy"][1]
    assert bool((dst == src).all()), "the copy did not copy"
    return 2 * nbytes / t


def bnb_state_to_minipeft(qs, cp):
    """bitsandbytes' QuantState as minipeft's (zero-copy CuPy views through DLPack)."""
    import numpy as np

    from minipeft.quant.blockwise import QuantState

    dl = cp.from_dlpack
    state = QuantState(absmax=dl(qs.absmax), shape=tuple(qs.shape), code=dl(qs.code),
                       blocksize=qs.blocksize, quant_type=qs.quant_type,
                       dtype=np.dtype(str(qs.dtype).replace("torch.", "")))
    if qs.nested:
        s2 = qs.state2
        state.offset = dl(qs.offset.reshape(1).float())
        state.state2 = QuantState(absmax=dl(s2.absmax), shape=tuple(qs.absmax.shape), code=dl(s2.code),
                                  blocksize=s2.blocksize, dtype=np.dtype(np.float32))
    return state


def main(argv=None) -> dict:
    args = parse_args(argv)
    import cupy as cp
    import numpy as np
    import torch

    import bitsandbytes
    import bitsandbytes.functional as F
    from minipeft.backend import bfloat16_dtype
    from minipeft.kernels.quant4bit import (THREADS, UNROLL, DequantizeLaunch, cached_dequantize_launch,
                                            dequantize_4bit_cuda, prepare_dequantize_4bit, quantize_4bit_cuda)

    bfloat16_dtype()                                                   # np.dtype("bfloat16") from here on
    assert cp.cuda.get_current_stream().ptr == 0 and torch.cuda.current_stream().cuda_stream == 0
    props = cp.cuda.runtime.getDeviceProperties(0)
    versions = {"python": platform.python_version(), "numpy": np.__version__, "cupy": cp.__version__,
                "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                "cuda_driver": cp.cuda.runtime.driverGetVersion()}
    meta = {"command": " ".join(["python", "benchmarks/dequant_4bit.py"]
                                + list(sys.argv[1:] if argv is None else argv)),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device_name": props["name"].decode(), "sm_count": props["multiProcessorCount"],
            "versions": versions}
    for k, v in meta.items():
        print(f"{k}: {v}")

    copy_bw = copy_bandwidth(cp, torch, args.copy_mib, max(10, args.reps // 2))
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + written, {args.copy_mib} MiB)")

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    impls = ("bnb", "minipeft", "mp-kernel", "mp-waves")
    for spec in args.shapes.split(","):
        shape = tuple(int(s) for s in spec.lower().split("x"))
        W = torch.randn(shape, dtype=torch.float16, device="cuda", generator=gen)
        n = W.numel()
        for out_name in args.out_dtypes.split(","):
            Wq = W.to(getattr(torch, out_name))                        # what bitsandbytes quantizes
            ours_in = cp.from_dlpack(Wq if out_name == "float16" else Wq.float())   # the same values
            for dq in (False, True):
                pb, qsb = F.quantize_4bit(Wq, blocksize=args.blocksize, compress_statistics=dq,
                                          quant_type=args.quant_type)
                pm, qsm = quantize_4bit_cuda(ours_in, args.blocksize, args.quant_type, dq)
                same_packed = bool((cp.from_dlpack(pb).reshape(-1) == pm.reshape(-1)).all())
                ref = F.dequantize_4bit(pb, qsb)                       # Wq's dtype
                ours_on_bnb_state = dequantize_4bit_cuda(cp.from_dlpack(pb), bnb_state_to_minipeft(qsb, cp),
                                                         out_name)
                same_out = bool((cp.from_dlpack(ref.view(torch.int16)).reshape(-1)
                                 == ours_on_bnb_state.view(cp.int16).reshape(-1)).all())
                n_blocks = -(-n // args.blocksize)
                read = pm.nbytes + (n_blocks + 4 * -(-n_blocks // 256) + 4 * 256 + 4 if dq else 4 * n_blocks)
                written = 2 * n
                prepared = prepare_dequantize_4bit(pm, qsm, out_name)
                one_wave = cached_dequantize_launch(pm, qsm, out_name).grid[0]
                same_prepared = bool((prepared().view(cp.uint16) == dequantize_4bit_cuda(pm, qsm, out_name)
                                      .view(cp.uint16)).all())
                chunks = -(-((n + 1) // 2) // 4)                       # 4 packed bytes each
                waves = DequantizeLaunch(pm, qsm, np.dtype(out_name), grid=-(-chunks // (THREADS * UNROLL)))
                waves_out = waves()
                same_waves = bool((waves(waves_out).view(cp.uint16) == prepared().view(cp.uint16)).all())
                t = time_alternating({"bnb": lambda: F.dequantize_4bit(pb, qsb),
                                      "minipeft": lambda: dequantize_4bit_cuda(pm, qsm, out_name),
                                      "mp-kernel": prepared,
                                      "mp-waves": lambda: waves(waves_out)},
                                     torch, args.warmup, args.reps, args.inner)
                for impl in impls:
                    q1, med, q3 = t[impl]
                    gbs = (read + written) / med
                    rows.append({"shape": list(shape), "out_dtype": out_name, "double_quant": dq,
                                 "impl": impl, "median_us": med * 1e6, "q1_us": q1 * 1e6, "q3_us": q3 * 1e6,
                                 "bytes_read": read, "bytes_written": written, "GB_s": gbs / 1e9,
                                 "frac_copy": gbs / copy_bw,
                                 "speedup_vs_bnb": t["bnb"][1] / med,
                                 "grid": {"minipeft": one_wave, "mp-kernel": one_wave,
                                          "mp-waves": waves.grid[0]}.get(impl),
                                 "packed_equal_bnb": same_packed, "out_equal_bnb_same_state": same_out,
                                 "prepared_equal_call": same_prepared, "waves_equal_one_wave": same_waves})
                del pb, qsb, pm, qsm, ref, ours_on_bnb_state, prepared, waves, waves_out
            del Wq, ours_in
        del W

    print(f"\n{'shape':>12} {'out':>8} {'DQ':>3} {'impl':>9} {'median us':>10} {'IQR us':>13} {'GB/s':>7} "
          f"{'% copy':>7} {'mp/bnb':>7} {'bytes=':>7}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['out_dtype']:>8} {'yes' if r['double_quant'] else 'no':>3} "
              f"{r['impl']:>9} {r['median_us']:10.1f} {r['q1_us']:6.1f}-{r['q3_us']:6.1f} "
              f"{r['GB_s']:7.0f} {100 * r['frac_copy']:6.1f}% {r['speedup_vs_bnb']:7.2f} "
              f"{str(r['packed_equal_bnb'] and r['out_equal_bnb_same_state']):>7}")
    print("minipeft: dequantize_4bit_cuda(packed, state, dtype), the whole Python call (launch cached on the "
          "state); mp-kernel: prepare_dequantize_4bit(...)() (the launch alone, one wave of equal shares); "
          "mp-waves: the same kernel, one sweep per CUDA block (several waves)")
    print("mp/bnb: bitsandbytes' time / this row's (>1: minipeft faster); bytes=: packed bytes "
          "equal bnb's and minipeft's output from bnb's state equals bnb's, bit for bit")
    result = {**meta, "copy_GB_s": copy_bw / 1e9, "blocksize": args.blocksize,
              "quant_type": args.quant_type, "warmup": args.warmup, "reps": args.reps,
              "inner": args.inner, "rows": rows}
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
