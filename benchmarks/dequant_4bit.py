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

Kernel variants (``--variants``, a comma-separated list): ``cCHUNKuUNROLLsSTREAMING[iINTERLEAVE]`` is the
swept kernel (CHUNK packed bytes per load, UNROLL chunks per thread and sweep, STREAMING cache hints 0/1,
``i1``: its sweeps dealt out to the CUDA blocks in turn)
and ``bTILEkSTAGESpPREFETCHsSTREAMING[aAHEAD][iINTERLEAVE]`` the staged one (sm_90+: TILE KiB of output per
tile decoded into shared memory and written by one bulk copy, STAGES buffers, PREFETCH tiles ahead into L2,
``a1``: the next tile's codes and absmax loaded into registers while a tile decodes, ``i1``: the tiles dealt
out to the CUDA blocks in turn, so that they all write one window of the output, instead of contiguous
shares), and ``wUNROLLbWIDE_BLOCKS[eWIDE_EARLY][pPDL]`` the wide one (a 16-byte load per lane, four 512-byte store
instructions per warp and group of 1024 values, UNROLL groups per warp and step, one CUDA block per step,
registers for WIDE_BLOCKS blocks per SM, ``e1``/``e2``: a block's first loads issued before its table and barrier,
the nested code read through the read-only cache / from shared memory, ``p1``/``p2``: launched with programmatic
dependent launch, the kernel waiting for the one before at its start / after its first loads), see
``minipeft/kernels/quant4bit.cu``. Each is timed as ``variant-kernel`` (its ``DequantizeLaunch``
into a preallocated output, the launch alone) and ``variant-call``
(``cached_dequantize_launch(packed, state, dtype, variant)()``, the whole call as
``dequantize_4bit_cuda`` makes it), and its output is compared bit for bit with the default
kernel's (the device's ``default_variant``: the wide kernel on sm_90+). Peers per shape show what
the traffic itself attains on this device: ``peer-traffic`` is a kernel of this file that reads the
same packed bytes and writes the same 16-bit output in a swept variant's access shape, with the
least work per value (each 4-bit code becomes the 16-bit integer it holds: no table, no absmax, no
float); ``peer-staged`` the same in the staged kernel's shape (16 KiB tiles, two buffers), and
``peer-staged-i`` with its tiles dealt out in turn (as ``i1``);
``peer-memset`` is ``cudaMemsetAsync`` of the output (written bytes only); ``peer-copy`` a
device-to-device copy moving the dequantize's bytes (1.25 n read and 1.25 n written), what a copy
attains at this size against the 1 GiB reference. The first two bound the dequantize kernels of
their shapes.

Timing (METHOD.md): warm-up calls, then ``--reps`` repetitions of ``--inner`` back-to-back
calls between two CUDA events, the two libraries alternating repetition by repetition; median and
interquartile range of the time per call. Each repetition enqueues one call before its start event
(since 2026-12-03), so the GPU is busy when it reaches the event and the host's launch overhead
overlaps the GPU work, as in a model's forward, where earlier layers' kernels are queued; the row
``minipeft-idle`` times the whole call the earlier way, the GPU idle at the start event until the
first call's launch arrives. ``host us`` is the host's own time per call: a call whose host time
exceeds its GPU time is host-bound, and the event timing shows it. Both libraries run on the legacy
default stream, so one pair of events times either. ``--no-bnb`` leaves bitsandbytes' call out of the
timed rounds (its state still checks the bits), to see minipeft's rows on their own.

    python benchmarks/dequant_4bit.py
    python benchmarks/dequant_4bit.py --shapes 8192x8192,4096x11008 --reps 100 --json out.json
    python benchmarks/dequant_4bit.py --variants c4u4s0,b16k2p0s0,b8k3p0s0 --out-dtypes bfloat16
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time

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
    ap.add_argument("--variants", default=DEFAULT_SWEEP,
                    help="comma-separated dequantize kernel variants cCHUNKuUNROLLsSTREAMING (e.g. c16u2s1) "
                         "or, staged (sm_90+), bTILEKIBkSTAGESpPREFETCHsSTREAMING (e.g. b16k2p0s0) "
                         "or, wide, wUNROLLbWIDE_BLOCKS[eWIDE_EARLY][pPDL] (e.g. w1b4e1, w1b6p1) "
                         f"(default {DEFAULT_SWEEP}; '' for none)")
    ap.add_argument("--gc-off", action="store_true",
                    help="Python's garbage collector off during the timed repetitions (as timeit)")
    ap.add_argument("--no-bnb", action="store_true",
                    help="leave bitsandbytes' call out of the timing (its state still checks the bits): minipeft's "
                         "rows timed on their own")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if not set(args.out_dtypes.split(",")) <= {"float16", "bfloat16"}:
        ap.error(f"--out-dtypes takes float16 and/or bfloat16, got {args.out_dtypes!r}")
    try:
        args.variants = parse_variants(args.variants)
    except ValueError as e:
        ap.error(f"--variants: {e}")
    for k in ("warmup", "reps", "inner", "copy_mib"):
        if getattr(args, k) <= 0:
            ap.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    return args


def parse_variants(text: str) -> list:
    """``'c4u4s0,c16u2s1'`` as checked variants (``quant4bit.dequantize_variant`` tuples), in order."""
    from minipeft.kernels.quant4bit import dequantize_variant

    variants = []
    for token in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"c(\d+)u(\d+)s(\d+)(?:i(\d+))?", token)
        b = re.fullmatch(r"b(\d+)k(\d+)p(\d+)s(\d+)(?:a(\d+))?(?:i(\d+))?", token)
        w = re.fullmatch(r"w(\d+)b(\d+)(?:e(\d+))?(?:p(\d+))?", token)
        if w is not None:
            v = dequantize_variant(dict(WIDE=1, UNROLL=int(w[1]), WIDE_BLOCKS=int(w[2]), WIDE_EARLY=int(w[3] or 0),
                                        PDL=int(w[4] or 0)))
        elif m is not None:
            v = dequantize_variant(dict(CHUNK=int(m[1]), UNROLL=int(m[2]), STREAMING=int(m[3]), STAGED=0,
                                        INTERLEAVE=int(m[4] or 0)))
        elif b is not None:
            v = dequantize_variant(dict(CHUNK=4, STAGED=1, TILE=1024 * int(b[1]), STAGES=int(b[2]),
                                        PREFETCH=int(b[3]), STREAMING=int(b[4]), AHEAD=int(b[5] or 0),
                                        INTERLEAVE=int(b[6] or 0)))
        else:
            raise ValueError(f"{token!r} is neither cCHUNKuUNROLLsSTREAMING[iINTERLEAVE] (e.g. c16u2s1), "
                             "bTILEKIBkSTAGESpPREFETCHsSTREAMING[aAHEAD][iINTERLEAVE] (the staged kernel, e.g. "
                             "b16k2p0s0a1i1) nor wUNROLLbWIDE_BLOCKS[eWIDE_EARLY][pPDL] (the wide kernel, e.g. w1b4e1, w1b6p1)")
        if v not in variants:
            variants.append(v)
    return variants


def variant_name(variant) -> str:
    """A variant (pairs or dict) as its ``--variants`` token, e.g. ``c16u2s1``."""
    v = dict(variant)
    if v.get("WIDE"):
        return (f"w{v['UNROLL']}b{v['WIDE_BLOCKS']}" + (f"e{v['WIDE_EARLY']}" if v.get("WIDE_EARLY") else "")
                + (f"p{v['PDL']}" if v.get("PDL") else ""))
    if v.get("STAGED"):
        return (f"b{v['TILE'] // 1024}k{v['STAGES']}p{v['PREFETCH']}s{v['STREAMING']}" + ("a1" if v.get("AHEAD") else "")
                + ("i1" if v.get("INTERLEAVE") else ""))
    return f"c{v['CHUNK']}u{v['UNROLL']}s{v['STREAMING']}" + ("i1" if v.get("INTERLEAVE") else "")


# The default sweep: the wide kernel (the access shape that moved this traffic fastest with no
# decoding: dequant_traffic.py, ../results/h200-2026-12-03/; w1b8p1 the default on the H200, w1b8e2p1 for float16
# output with double quantization) with registers for 8 or 6 CUDA blocks per SM, launched with programmatic
# dependent launch (p1; p2: the first loads before the wait, correct only after a kernel that did not write the
# codes) and plainly; and the staged kernel (sm_90+: bulk stores from shared memory, the default before w1b6)
# with its tiles dealt out in turn.
# (Measured slower on the H200, ../results/h200-2026-12-03/: the wide kernel with its first loads before the
# table (e1; e2 but for float16 output with double quantization), w1b6p1 (call m), with 4 blocks per SM or two
# groups per warp and step (w1b4, w2b4e1, w2b6), the swept kernel with its sweeps in turn (c4u4s0i1), the staged
# kernel with 16 KiB tiles or the next tile's loads in flight (a1), contiguous shares (3-5 points); and
# ../results/h200-2026-12-02/staged/: streaming hints, 4 stages, prefetching 2+ tiles ahead.)
DEFAULT_SWEEP = "w1b8p1,w1b8e2p1,w1b8p2,w1b8,w1b6,b8k2p0s0i1"

# The traffic peer: dequantize_4bit's bytes and access shape, with the least work per value.
PEER_SOURCE = r"""
// Reads the packed 4-bit codes and writes one 16-bit value per code, as minipeft's
// dequantize_4bit does (quant4bit.cu: CHUNK packed bytes per load, UNROLL chunks per thread and
// sweep, STREAMING cache hints, each CUDA block an equal share), but each code q becomes the
// 16-bit integer q: no table, no absmax, no float arithmetic.
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#ifndef CHUNK
#define CHUNK 4
#endif
#ifndef UNROLL
#define UNROLL 4
#endif
#ifndef STREAMING
#define STREAMING 0
#endif
#ifndef INTERLEAVE
#define INTERLEAVE 0
#endif
static_assert(CHUNK == 4 || CHUNK == 8 || CHUNK == 16, "CHUNK is 4, 8 or 16 packed bytes");
constexpr int WORDS = CHUNK / 4;                 // 32-bit words of codes per chunk, 8 codes each

template <typename V>
__device__ __forceinline__ V load_ro(const V* p) {
#if STREAMING
    return __ldcs(p);
#else
    return __ldg(p);
#endif
}
template <typename V>
__device__ __forceinline__ void store_vec(V* p, V v) {
#if STREAMING
    __stcs(p, v);
#else
    *p = v;
#endif
}

// Code k (0..7) of a word: element 2j is the high nibble of byte j.
__device__ __forceinline__ u32 code(u32 w, int k) { return (w >> (8 * (k >> 1) + ((k & 1) ? 0 : 4))) & 0xFu; }

extern "C" __global__ void traffic_peer(const u8* __restrict__ packed, i64 n, u16* __restrict__ out) {
    const i64 nbytes = (n + 1) >> 1, chunks = (nbytes + CHUNK - 1) / CHUNK;
    const i64 T = blockDim.x;
#if INTERLEAVE
    const i64 first = (i64)blockIdx.x * T * UNROLL, step = (i64)gridDim.x * T * UNROLL, end = chunks;
#else
    const i64 share = ((chunks + gridDim.x - 1) / gridDim.x + T - 1) / T * T;
    const i64 first = (i64)blockIdx.x * share, step = T * UNROLL;
    const i64 end = first + share < chunks ? first + share : chunks;
#endif
    for (i64 c0 = first + threadIdx.x; c0 < end; c0 += step) {
        u32 word[UNROLL][WORDS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {       // every load of the sweep first
            const i64 c = c0 + u * T, j0 = c * CHUNK;
#pragma unroll
            for (int i = 0; i < WORDS; ++i) word[u][i] = 0u;
            if (c >= end) continue;
            if (j0 + CHUNK <= nbytes) {
#if CHUNK == 16
                const uint4 q = load_ro(reinterpret_cast<const uint4*>(packed + j0));
                word[u][0] = q.x; word[u][1] = q.y; word[u][2] = q.z; word[u][3] = q.w;
#elif CHUNK == 8
                const uint2 q = load_ro(reinterpret_cast<const uint2*>(packed + j0));
                word[u][0] = q.x; word[u][1] = q.y;
#else
                word[u][0] = load_ro(reinterpret_cast<const u32*>(packed + j0));
#endif
            } else {
#pragma unroll
                for (int k = 0; k < CHUNK; ++k)
                    if (j0 + k < nbytes) word[u][k >> 2] |= (u32)packed[j0 + k] << (8 * (k & 3));
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {       // then every store: 16 bytes per word
            const i64 c = c0 + u * T;
            if (c >= end) break;
#pragma unroll
            for (int i = 0; i < WORDS; ++i) {
                const u32 w = word[u][i];
                const i64 e0 = c * (2 * CHUNK) + 8 * i;
                if (e0 + 8 <= n) {
                    uint4 o;
                    o.x = code(w, 0) | (code(w, 1) << 16); o.y = code(w, 2) | (code(w, 3) << 16);
                    o.z = code(w, 4) | (code(w, 5) << 16); o.w = code(w, 6) | (code(w, 7) << 16);
                    store_vec(reinterpret_cast<uint4*>(out + e0), o);
                } else {
                    for (int k = 0; k < 8 && e0 + k < n; ++k) out[e0 + k] = (u16)code(w, k);
                }
            }
        }
    }
}
"""


# The staged peer: the staged kernel's bytes and access shape (quant4bit.cu, STAGED=1: a tile of 16 KiB
# of 16-bit output per CUDA block and step, decoded into shared memory, one bulk copy out, two
# buffers), each code written as the 16-bit integer it holds: no table, no absmax.
STAGED_PEER_SOURCE = r"""
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
#define T 256
#define TILE 16384
__device__ __forceinline__ u32 code(u32 w, int k) { return (w >> (8 * (k >> 1) + ((k & 1) ? 0 : 4))) & 0xFu; }
extern "C" __global__ void __launch_bounds__(256, 6) staged_peer(const u32* __restrict__ packed, i64 n,
                                                                 u16* __restrict__ out) {
    constexpr int VPT = TILE / 2, CPT = VPT / 8, U = CPT / T;
    __shared__ __align__(128) uint4 stage[2][TILE / 16];
    const i64 tiles = n / VPT;                                   // whole tiles only (the shapes timed have no tail)
#if INTERLEAVE
    const i64 first = blockIdx.x, step = gridDim.x, end = tiles;  // tiles dealt out in turn
#else
    const i64 share = (tiles + gridDim.x - 1) / gridDim.x, first = (i64)blockIdx.x * share, step = 1;
    const i64 end = first + share < tiles ? first + share : tiles;
#endif
    int slot = 0;
    for (i64 tile = first; tile < end; tile += step) {
        u32 w[U];
#pragma unroll
        for (int u = 0; u < U; ++u) w[u] = __ldg(packed + tile * CPT + u * T + threadIdx.x);
        __syncthreads();
#pragma unroll
        for (int u = 0; u < U; ++u)
            stage[slot][u * T + threadIdx.x] = make_uint4(code(w[u], 0) | (code(w[u], 1) << 16), code(w[u], 2) | (code(w[u], 3) << 16),
                                                          code(w[u], 4) | (code(w[u], 5) << 16), code(w[u], 6) | (code(w[u], 7) << 16));
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        if (threadIdx.x == 0) {
            asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" :: "l"(out + tile * VPT),
                         "r"((u32)__cvta_generic_to_shared(stage[slot])), "r"(TILE) : "memory");
            asm volatile("cp.async.bulk.commit_group;" ::: "memory");
            asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
        }
        slot ^= 1;
    }
    if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
"""


def staged_peer(cp, threads: int, interleave: int = 0):
    """The staged peer kernel (sm_90+; ``interleave``: its tiles dealt out in turn, as INTERLEAVE in
    quant4bit.cu) and its one-wave grid function ``grid(tiles)``; None below sm_90."""
    from minipeft.kernels._module import compute_capability

    device = cp.cuda.runtime.getDevice()
    if compute_capability(device) < 90:
        return None
    props = cp.cuda.runtime.getDeviceProperties(device)
    fn = cp.RawModule(code=STAGED_PEER_SOURCE, options=("-std=c++17", f"-DINTERLEAVE={interleave}")).get_function(
        "staged_peer")
    per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0)
    return fn, lambda tiles: max(1, min(max(1, per_sm) * props["multiProcessorCount"], tiles))


def traffic_peer(cp, variant, threads: int):
    """The peer kernel compiled for ``variant`` and its one-wave grid function ``grid(chunks)``."""
    v = dict(variant)
    fn = cp.RawModule(code=PEER_SOURCE, options=("-std=c++17",) + tuple(
        f"-D{k}={val}" for k, val in sorted(v.items()))).get_function("traffic_peer")
    per_sm = cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, 0)
    resident = max(1, per_sm) * cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())[
        "multiProcessorCount"]
    return fn, lambda chunks: max(1, min(resident, -(-chunks // (threads * v["UNROLL"]))))


def _quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def time_alternating(fns: dict, torch, warmup: int, reps: int, inner: int, primed: bool = True,
                     host: dict | None = None, gc_off: bool = False) -> dict:
    """Seconds per call of each function: median and quartiles over ``reps`` event pairs.

    ``primed``: one call is enqueued before the start event, so the GPU is still busy with it when it
    reaches the start event and every timed call's host time (Python, allocation, launch) overlaps GPU
    work, as in a model's forward, where the layers before have kernels queued. Unprimed, the GPU idles
    from the start event until the first timed call's launch arrives, and that host time is counted
    once per ``inner`` calls. ``host``, if given, receives each function's median host seconds per call
    (the enqueueing loop on the host clock): above the GPU's time per call, the call is host-bound.
    ``gc_off``: Python's garbage collector is collected once, then off for all the timed repetitions,
    as ``timeit`` does, so that no collection stalls the host mid-repetition. (Collecting before every
    repetition instead made call o's run, results/h200-2026-12-03/, too slow to finish one shape in 90 s.)
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    host_times = {k: [] for k in fns}
    was_enabled = gc.isenabled()
    if gc_off:
        gc.collect()
        gc.disable()
    try:
        for _ in range(reps):
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if primed:
                    fn()
                start.record()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                t1 = time.perf_counter()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) * 1e-3 / inner)
                host_times[name].append((t1 - t0) / inner)
    finally:
        if gc_off and was_enabled:
            gc.enable()
    if host is not None:
        host.update({k: statistics.median(v) for k, v in host_times.items()})
    return {k: _quartiles(v) for k, v in times.items()}


def bytes_read(n: int, blocksize: int, double_quant: bool) -> int:
    """Bytes a dequantize of ``n`` values reads (DESIGN.md, "Performance and memory"): the packed codes
    and the absmax, float32 per block, or, nested: one uint8 per block, a float32 per 256 blocks, the
    256-entry code and the offset."""
    n_blocks = -(-n // blocksize)
    absmax = n_blocks + 4 * -(-n_blocks // 256) + 4 * 256 + 4 if double_quant else 4 * n_blocks
    return (n + 1) // 2 + absmax


def write_result(path, result: dict) -> dict:
    """Write ``result`` as JSON to ``path`` (nothing when None) and return it: every dequantize benchmark's end.
    Written as the project saves files (``minipeft.atomic``): a killed run leaves the previous file whole."""
    if path:
        from minipeft.atomic import write_text_atomic
        write_text_atomic(path, json.dumps(result, indent=1))
    return result


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
    from minipeft.kernels.quant4bit import (THREADS, DequantizeLaunch, cached_dequantize_launch, default_variant,
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

    device = cp.cuda.runtime.getDevice()
    default = default_variant(device)                                  # what a launch with no variant takes,
    tuned = {(o, dq): default_variant(device, o, dq) for o in args.out_dtypes.split(",") for dq in (False, True)}
    tuned = {k: v for k, v in tuned.items() if v != default}           # but for these (output dtype, nested)
    print(f"default variant: {variant_name(default)}"
          + "".join(f" ({o}{' with double quantization' if dq else ''}: {variant_name(v)})"
                    for (o, dq), v in tuned.items())
          + f"; variants timed: {', '.join(variant_name(v) for v in args.variants) or 'none'}")
    rows, variant_rows, peer_rows = [], [], []
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    impls = ("bnb",) * (not args.no_bnb) + ("minipeft", "minipeft-idle", "mp-kernel", "mp-waves")
    peers = {v: traffic_peer(cp, v, THREADS) for v in args.variants   # compiled once per variant
             if not dict(v)["STAGED"] and not dict(v)["WIDE"]}          # (the swept kernel's shape; wide's peer:
    #                                                                      dequant_traffic.py)
    speers = {key: staged_peer(cp, THREADS, i) for key, i in (("staged", 0), ("staged-i", 1))}   # sm_90+: else None
    for spec in args.shapes.split(","):
        shape = tuple(int(s) for s in spec.lower().split("x"))
        W = torch.randn(shape, dtype=torch.float16, device="cuda", generator=gen)
        n = W.numel()
        for out_name in args.out_dtypes.split(","):
            Wq = W.to(getattr(torch, out_name))                        # what bitsandbytes quantizes
            ours_in = cp.from_dlpack(Wq if out_name == "float16" else Wq.float())   # the same values
            for dq in (False, True):
                config_default = tuned.get((out_name, dq), default)   # the kernel a launch with no variant takes
                pb, qsb = F.quantize_4bit(Wq, blocksize=args.blocksize, compress_statistics=dq,
                                          quant_type=args.quant_type)
                pm, qsm = quantize_4bit_cuda(ours_in, args.blocksize, args.quant_type, dq)
                same_packed = bool((cp.from_dlpack(pb).reshape(-1) == pm.reshape(-1)).all())
                ref = F.dequantize_4bit(pb, qsb)                       # Wq's dtype
                ours_on_bnb_state = dequantize_4bit_cuda(cp.from_dlpack(pb), bnb_state_to_minipeft(qsb, cp),
                                                         out_name)
                same_out = bool((cp.from_dlpack(ref.view(torch.int16)).reshape(-1)
                                 == ours_on_bnb_state.view(cp.int16).reshape(-1)).all())
                read = bytes_read(n, args.blocksize, dq)
                written = 2 * n
                prepared = prepare_dequantize_4bit(pm, qsm, out_name)
                launch = cached_dequantize_launch(pm, qsm, out_name)
                one_wave = launch.grid[0]
                expected = prepared().view(cp.uint16)                  # the default kernel's bits
                same_prepared = bool((expected == dequantize_4bit_cuda(pm, qsm, out_name).view(cp.uint16)).all())
                waves = DequantizeLaunch(pm, qsm, np.dtype(out_name), grid=launch.sweeps)
                waves_out = waves()
                same_waves = bool((waves(waves_out).view(cp.uint16) == expected).all())
                fns = {} if args.no_bnb else {"bnb": lambda pb=pb, qsb=qsb: F.dequantize_4bit(pb, qsb)}   # bound now
                fns.update({"minipeft": lambda pm=pm, qsm=qsm: dequantize_4bit_cuda(pm, qsm, out_name),
                       "mp-kernel": prepared,
                       "mp-waves": lambda waves=waves, waves_out=waves_out: waves(waves_out)})
                # each variant: its launch alone into its own output, and the whole call through the cache
                var = {}
                for v in args.variants:
                    vl = DequantizeLaunch(pm, qsm, np.dtype(out_name), variant=v)
                    vout = vl()
                    same = bool((vl(vout).view(cp.uint16) == expected).all()) and bool(
                        (cached_dequantize_launch(pm, qsm, out_name, v)().view(cp.uint16) == expected).all())
                    var[v] = (vl, same)
                    fns[("kernel", v)] = lambda vl=vl, vout=vout: vl(vout)
                    fns[("call", v)] = lambda v=v, pm=pm, qsm=qsm: cached_dequantize_launch(pm, qsm, out_name, v)()
                host = {}
                t = time_alternating(fns, torch, args.warmup, args.reps, args.inner, host=host, gc_off=args.gc_off)
                # the whole call again with the GPU idle at each start event (the timing before 2026-12-03)
                t["minipeft-idle"] = time_alternating({"minipeft-idle": fns["minipeft"]}, torch, args.warmup,
                                                      args.reps, args.inner, primed=False, host=host,
                                                      gc_off=args.gc_off)["minipeft-idle"]
                for impl in impls:
                    q1, med, q3 = t[impl]
                    gbs = (read + written) / med
                    rows.append({"shape": list(shape), "out_dtype": out_name, "double_quant": dq,
                                 "impl": impl, "variant": None if impl == "bnb" else config_default,
                                 "median_us": med * 1e6, "q1_us": q1 * 1e6, "q3_us": q3 * 1e6,
                                 "bytes_read": read, "bytes_written": written, "GB_s": gbs / 1e9,
                                 "frac_copy": gbs / copy_bw,
                                 "speedup_vs_bnb": None if args.no_bnb else t["bnb"][1] / med,
                                 "host_us": host[impl] * 1e6,
                                 "grid": {"minipeft": one_wave, "minipeft-idle": one_wave, "mp-kernel": one_wave,
                                          "mp-waves": waves.grid[0]}.get(impl),
                                 "packed_equal_bnb": same_packed, "out_equal_bnb_same_state": same_out,
                                 "prepared_equal_call": same_prepared, "waves_equal_one_wave": same_waves})
                for v, (vl, same) in var.items():
                    for kind in ("kernel", "call"):
                        q1, med, q3 = t[(kind, v)]
                        gbs = (read + written) / med
                        variant_rows.append({
                            "shape": list(shape), "out_dtype": out_name, "double_quant": dq,
                            "impl": f"variant-{kind}", "variant": dict(v), "median_us": med * 1e6,
                            "q1_us": q1 * 1e6, "q3_us": q3 * 1e6, "bytes_read": read, "bytes_written": written,
                            "GB_s": gbs / 1e9, "frac_copy": gbs / copy_bw,
                            "speedup_vs_bnb": None if args.no_bnb else t["bnb"][1] / med,
                            "host_us": host[(kind, v)] * 1e6, "grid": vl.grid[0], "equal_default_kernel": same,
                            "is_default": dict(v) == config_default})
                del pb, qsb, pm, qsm, ref, ours_on_bnb_state, prepared, launch, expected, waves, waves_out, fns, var
            del Wq, ours_in
        # the peers: this shape's bytes with no arithmetic (read packed, write 16-bit), and the write alone
        packed = cp.from_dlpack(torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, device="cuda",
                                              generator=gen))
        nib = cp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1)[:n].astype(cp.uint16)   # the codes
        pfns, pinfo = {}, {}
        for v, (fn, grid_of) in peers.items():
            pout = cp.empty(n, dtype=cp.uint16)
            grid = grid_of(-(-((n + 1) // 2) // dict(v)["CHUNK"]))
            args_v = (packed, np.int64(n), pout)
            fn((grid,), (THREADS,), args_v)
            pinfo[v] = (grid, bool((pout == nib).all()))
            pfns[v] = lambda fn=fn, grid=grid, args_v=args_v: fn((grid,), (THREADS,), args_v)
        for key, speer in speers.items():
            if speer is None or n % 8192:                           # whole 16 KiB tiles of 16-bit output only
                continue
            fn, grid_of = speer
            sout = cp.empty(n, dtype=cp.uint16)
            grid = grid_of(n // 8192)
            fn((grid,), (THREADS,), (packed, np.int64(n), sout))
            pinfo[key] = (grid, bool((sout == nib).all()))
            pfns[key] = lambda fn=fn, grid=grid, a=(packed, np.int64(n), sout): fn((grid,), (THREADS,), a)
        mout = cp.empty(n, dtype=cp.uint16)
        pfns["memset"] = lambda ptr=mout.data.ptr, size=2 * n: cp.cuda.runtime.memsetAsync(ptr, 0, size, 0)
        # a device-to-device copy moving the same bytes as a dequantize of this shape (n/2 read + 2n
        # written = 2 x 1.25 n): what the copy itself attains at this size, next to the 1 GiB reference
        csrc = cp.empty(5 * n // 4, dtype=cp.uint8)
        cdst = cp.empty_like(csrc)
        pfns["copy"] = lambda d=cdst.data.ptr, s=csrc.data.ptr, size=csrc.size: cp.cuda.runtime.memcpyAsync(
            d, s, size, cp.cuda.runtime.memcpyDeviceToDevice, 0)
        tp = time_alternating(pfns, torch, args.warmup, args.reps, args.inner)
        for key, (q1, med, q3) in tp.items():
            memset, copy = key == "memset", key == "copy"
            read, written = ((0, 2 * n) if memset else (5 * n // 4, 5 * n // 4) if copy else ((n + 1) // 2, 2 * n))
            gbs = (read + written) / med
            kernel = not (memset or copy)
            peer_rows.append({"shape": list(shape), "out_dtype": "uint16", "double_quant": None,
                              "impl": "peer-" + (key if isinstance(key, str) else "traffic"),
                              "variant": dict(key) if isinstance(key, tuple) else None, "median_us": med * 1e6,
                              "q1_us": q1 * 1e6, "q3_us": q3 * 1e6, "bytes_read": read, "bytes_written": written,
                              "GB_s": gbs / 1e9, "frac_copy": gbs / copy_bw, "speedup_vs_bnb": None,
                              "grid": pinfo[key][0] if kernel else None,
                              "peer_output_correct": pinfo[key][1] if kernel else None})
        del W, packed, nib, pfns, mout, csrc, cdst

    print(f"\n{'shape':>12} {'out':>8} {'DQ':>3} {'impl':>13} {'median us':>10} {'IQR us':>13} {'GB/s':>7} "
          f"{'% copy':>7} {'mp/bnb':>7} {'host us':>8} {'bytes=':>7}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['out_dtype']:>8} {'yes' if r['double_quant'] else 'no':>3} "
              f"{r['impl']:>13} {r['median_us']:10.1f} {r['q1_us']:6.1f}-{r['q3_us']:6.1f} "
              f"{r['GB_s']:7.0f} {100 * r['frac_copy']:6.1f}% "
              f"{'-' if r['speedup_vs_bnb'] is None else format(r['speedup_vs_bnb'], '.2f'):>7} {r['host_us']:8.1f} "
              f"{str(r['packed_equal_bnb'] and r['out_equal_bnb_same_state']):>7}")
    print("minipeft: dequantize_4bit_cuda(packed, state, dtype), the whole Python call (launch cached on the "
          "state); minipeft-idle: the same, timed with the GPU idle at the start event (the first call's host "
          "time counted once per --inner calls); mp-kernel: prepare_dequantize_4bit(...)() (the launch alone, the "
          "default grid); mp-waves: the same kernel, one sweep per CUDA block (several waves); host us: the host's "
          "time per call (enqueueing): a row whose host us exceeds its median is host-bound")
    print("mp/bnb: bitsandbytes' time / this row's (>1: minipeft faster; -: --no-bnb); bytes=: packed bytes "
          "equal bnb's and minipeft's output from bnb's state equals bnb's, bit for bit")

    if variant_rows:
        print(f"\n{'shape':>12} {'out':>8} {'DQ':>3} {'variant':>10} {'kernel us':>10} {'% copy':>7} "
              f"{'call us':>9} {'% copy':>7} {'host us':>8} {'grid':>6} {'bits=':>6}")
        for rk, rc in zip(variant_rows[0::2], variant_rows[1::2]):     # kernel row, then call row
            name = variant_name(rk["variant"]) + ("*" if rk["is_default"] else "")
            print(f"{'x'.join(map(str, rk['shape'])):>12} {rk['out_dtype']:>8} "
                  f"{'yes' if rk['double_quant'] else 'no':>3} {name:>10} {rk['median_us']:10.1f} "
                  f"{100 * rk['frac_copy']:6.1f}% {rc['median_us']:9.1f} {100 * rc['frac_copy']:6.1f}% "
                  f"{rc['host_us']:8.1f} {rk['grid']:6d} {str(rk['equal_default_kernel']):>6}")
        print("variant cCHUNKuUNROLLsSTREAMING (* the default): kernel = its DequantizeLaunch into a preallocated "
              "output (the launch alone); call = cached_dequantize_launch(packed, state, dtype, variant)() (the "
              "whole call; host us: its host time per call); bits=: its output equals the default kernel's, bit for bit")
    print(f"\n{'shape':>12} {'peer':>13} {'variant':>8} {'median us':>10} {'IQR us':>13} {'GB/s':>7} "
          f"{'% copy':>7} {'grid':>6} {'ok':>5}")
    for r in peer_rows:
        kernel = r["grid"] is not None
        name = variant_name(r["variant"]) if r["variant"] else {"peer-staged": "b16k2", "peer-staged-i": "b16k2i1"}.get(r["impl"], "-")
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['impl']:>13} "
              f"{name:>8} {r['median_us']:10.1f} "
              f"{r['q1_us']:6.1f}-{r['q3_us']:6.1f} {r['GB_s']:7.0f} {100 * r['frac_copy']:6.1f}% "
              f"{r['grid'] if kernel else '-':>6} {str(r['peer_output_correct']) if kernel else '-':>5}")
    print("peer-traffic: the packed bytes read and one 16-bit value per code written in the variant's access "
          "shape, with no arithmetic (each code as a 16-bit integer; ok: it wrote exactly that); peer-staged: the "
          "same in the staged kernel's shape (16 KiB tiles through shared memory, bulk stores); peer-memset: "
          "cudaMemsetAsync of the 16-bit output (bytes written only); peer-copy: a device-to-device copy of "
          "1.25 n bytes (the dequantize's bytes moved, read + written). Their % copy bounds the dequantize rows'")

    result = {**meta, "copy_GB_s": copy_bw / 1e9, "blocksize": args.blocksize,
              "quant_type": args.quant_type, "warmup": args.warmup, "reps": args.reps,
              "inner": args.inner, "bnb_timed": not args.no_bnb, "gc_off": args.gc_off, "default_variant": default,
              "default_tuned": [{"out_dtype": o, "double_quant": dq, "variant": v} for (o, dq), v in tuned.items()],
              "variants": [dict(v) for v in args.variants], "rows": rows + variant_rows + peer_rows}
    return write_result(args.json_out, result)


if __name__ == "__main__":
    main()
