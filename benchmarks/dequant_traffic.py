"""Which memory-access shape moves the 4-bit dequantize's traffic at the copy rate?

The NF4 dequantize reads n/2 packed bytes and writes 2n bytes of 16-bit output: one byte read for
four written. This script times kernels that move exactly that traffic with no decoding at all
(each output uint4 is a loaded uint4 of codes, xor-ed with its index, so nothing can be skipped),
in several access shapes, against ``cudaMemcpy`` of the same total bytes and ``cudaMemset`` of the
output, on the 1 GiB device-to-device copy rate measured in the same run (``dequant_4bit.py``'s
reference). Its question: is the dequantize's shortfall from 85% of the copy rate (issue #17,
item 5) in its access shape, or does this traffic itself stay below it at these sizes?

Shapes (``wide``: a warp loads 512 contiguous bytes of codes, one uint4 per lane, and writes the
2 KiB they become as four 512-byte coalesced uint4 stores; U such groups per warp and step, all loads
of a step before its stores):

- ``wide-uU-tT-wave``: blocks of T threads, one wave (the occupancy calculator's resident blocks),
  the steps dealt out to the blocks in turn (grid-stride);
- ``wide-uU-tT-all``: one step per block, as many blocks as steps (several waves);
- ``swept-i0``/``swept-i1``: ``dequant_4bit.py``'s traffic peer of the swept kernel (CHUNK 4, UNROLL 4),
  contiguous shares or sweeps in turn;
- ``staged-i1``: ``dequant_4bit.py``'s staged peer with its tiles in turn (sm_90+).

    python benchmarks/dequant_traffic.py --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # minipeft from this checkout

WIDE_SOURCE = r"""
typedef long long i64;
#ifndef WU
#define WU 1                                                  // groups per warp and step
#endif
// groups: 512-byte groups of codes (32 uint4); group g becomes output uint4s [128 g, 128 g + 128).
extern "C" __global__ void wide_peer(const uint4* __restrict__ packed, i64 groups, uint4* __restrict__ out) {
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5, warp = threadIdx.x >> 5;
    const i64 per_step = (i64)warps * WU;                          // groups per block and step
    for (i64 base = (i64)blockIdx.x * per_step; base < groups; base += (i64)gridDim.x * per_step) {
        uint4 q[WU];
#pragma unroll
        for (int u = 0; u < WU; ++u) {                             // step's groups: base + u * warps + warp
            const i64 g = base + (i64)u * warps + warp;
            q[u] = g < groups ? __ldg(packed + g * 32 + lane) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < WU; ++u) {
            const i64 g = base + (i64)u * warps + warp;
            if (g >= groups) break;
#pragma unroll
            for (int k = 0; k < 4; ++k) {                         // 512 contiguous bytes per store instruction
                const unsigned s = (unsigned)(k * 32 + lane);
                out[g * 128 + s] = make_uint4(q[u].x ^ s, q[u].y ^ s, q[u].z ^ s, q[u].w ^ s);
            }
        }
    }
}
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8192x8192,4096x11008")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import cupy as cp
    import torch

    import dequant_4bit as d4

    def time_it(fns, warmup, reps, inner):                            # primed, as dequant_4bit.py times
        return d4.time_alternating(fns, torch, warmup, reps, inner)

    props = cp.cuda.runtime.getDeviceProperties(0)
    meta = {"command": " ".join(["python", "benchmarks/dequant_traffic.py"] + list(sys.argv[1:] if argv is None else argv)),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device_name": props["name"].decode(), "sm_count": props["multiProcessorCount"], "cupy": cp.__version__}
    for k, v in meta.items():
        print(f"{k}: {v}")
    copy_bw = d4.copy_bandwidth(cp, torch, args.copy_mib, 10)           # the reference, as dequant_4bit.py takes it
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + written, {args.copy_mib} MiB)")

    sms = props["multiProcessorCount"]
    kernels = {}
    for u in (1, 2, 4):
        for threads in (256, 512):
            fn = cp.RawModule(code=WIDE_SOURCE, options=("-std=c++17", f"-DWU={u}")).get_function("wide_peer")
            per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0)
            kernels[(u, threads)] = (fn, per_sm * sms)
    swept = {i: d4.traffic_peer(cp, {"CHUNK": 4, "UNROLL": 4, "STREAMING": 0, "INTERLEAVE": i}, 256) for i in (0, 1)}
    staged = d4.staged_peer(cp, 256, 1)

    rows = []
    for spec in args.shapes.split(","):
        shape = tuple(int(s) for s in spec.lower().split("x"))
        n = shape[0] * shape[1]
        assert n % 1024 == 0, "whole 512-byte groups only"
        packed = cp.random.randint(0, 2 ** 31, size=n // 8, dtype=cp.uint32)   # n/2 bytes of random codes
        out = cp.empty(n, dtype=cp.uint16)
        both = cp.empty(5 * n // 8, dtype=cp.uint16)          # 1.25 n bytes: copied, the dequantize's 2.5 n moved
        both2 = cp.empty_like(both)
        groups = n // 1024
        fns = {}
        for (u, threads), (fn, resident) in kernels.items():
            steps = -(-groups // (threads // 32 * u))
            for mode, grid in (("wave", min(resident, steps)), ("all", steps)):
                fns[f"wide-u{u}-t{threads}-{mode}"] = (lambda fn=fn, grid=grid, threads=threads:
                                                       fn((grid,), (threads,), (packed, cp.int64(groups), out)))
        for i, (fn, grid) in swept.items():
            chunks = n // 8
            fns[f"swept-i{i}"] = lambda fn=fn, g=grid(chunks): fn((g,), (256,), (packed, cp.int64(n), out))
        if staged is not None:
            fn, grid = staged
            fns["staged-i1"] = lambda fn=fn, g=grid(n // 8192): fn((g,), (256,), (packed, cp.int64(n), out))
        fns["memcpy-same-bytes"] = lambda: cp.cuda.runtime.memcpyAsync(both2.data.ptr, both.data.ptr, both.nbytes,
                                                                       cp.cuda.runtime.memcpyDeviceToDevice, 0)
        fns["memset-output"] = lambda: cp.cuda.runtime.memsetAsync(out.data.ptr, 0, out.nbytes, 0)
        # every wide shape writes the same, checkable output
        expect = None
        for name, fn in fns.items():
            if name.startswith("wide"):
                out.fill(0)
                fn()
                got = out.copy()
                if expect is None:
                    p = packed.reshape(-1, 32, 4)                             # (groups, lane, word)
                    s = cp.arange(128, dtype=cp.uint32).reshape(4, 32)       # (k, lane)
                    expect = (p[:, None, :, :] ^ s[None, :, :, None]).reshape(-1).view(cp.uint16)
                assert bool((got == expect).all()), f"{name} wrote the wrong bytes"
        t = time_it(fns, args.warmup, args.reps, args.inner)
        moved = n // 2 + 2 * n
        print(f"\n{spec}: {moved / 1e6:.1f} MB moved (memset: {2 * n / 1e6:.1f} MB)")
        print(f"{'shape':>22}  {'median us':>9}  {'IQR us':>13}  {'% copy':>6}")
        for name, (q1, med, q3) in sorted(t.items(), key=lambda kv: kv[1][1]):
            b = 2 * n if name == "memset-output" else moved
            frac = b / med / copy_bw
            rows.append({"shape": list(shape), "kernel": name, "median_us": med * 1e6, "q1_us": q1 * 1e6,
                         "q3_us": q3 * 1e6, "bytes": b, "frac_copy": frac})
            print(f"{name:>22}  {med * 1e6:9.1f}  {q1 * 1e6:6.1f}-{q3 * 1e6:6.1f}  {100 * frac:5.1f}%")
    result = {**meta, "copy_GB_s": copy_bw / 1e9, "rows": rows}
    return d4.write_result(args.json, result)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
