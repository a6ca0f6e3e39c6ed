// 4-bit block-wise quantization (NF4 / FP4 / Int4), bit for bit with minipeft.quant.blockwise.
//
// QLoRA (Dettmers et al. 2023, arXiv 2305.14314, Sec. 3): per block of B values
//     absmax = max |x|,   s = x * (1 / absmax),   q = index of the code value nearest s,
//     x^ = decode[q] * absmax,
// two indices per byte, element 2j in the HIGH nibble of byte j. Double quantization keeps
// absmax as uint8 codes q2 of (absmax - offset) in blocks of B2 = 256 (dynamic map):
//     absmax^ = code2[q2] * absmax2[b / B2] + offset.
//
// Float semantics are the NumPy twin's, op for op: flush-to-zero float32 where the twin
// flushes (flush_subnormals), every product and sum rounded on its own (__fmul_rn/__fadd_rn:
// no fused multiply-add, which the compiler would otherwise form), IEEE reciprocal.
//
// Quantize: one thread = 8 consecutive elements (one 16-byte load for float16, two for
// float32) -> 4 packed bytes (one 4-byte store); G = B/8 consecutive threads share a block
// and reduce its absmax with warp shuffles (and shared memory when G > 32).
// Dequantize: one thread = UNROLL chunks of CHUNK packed bytes (2 * CHUNK values) per sweep, all
// loads of a sweep issued before its stores; each chunk is one CHUNK-byte load (CHUNK = 4 by
// default; 8 and 16 are compile-time variants) and one 16-byte store per 8 values (float16,
// bfloat16) or two (float32), consecutive threads on consecutive chunks; a grid of one wave, each
// CUDA block an equal share (see dequantize_4bit below). STAGED = 1 compiles the staged body
// instead (sm_90+, dequantize_4bit_staged below): tiles decoded into shared memory, each written
// with one bulk copy by the Tensor Memory Accelerator. WIDE = 1 compiles the wide body
// (dequantize_4bit_wide below, the default on sm_90+): 512-byte warp loads and 512-byte store
// instructions, one CUDA block per step.

#include "common.cuh"   // u8 u16 u32 i64, flush, h2f, f2h, load8, group_absmax, block_absmax, nested_absmax

// Index of one scaled value: map[#{k : thr[k] < a}], a = s (or |s| for FP4, whose bit 3 is
// the sign); unused thresholds are +inf. NaN (an all-zero block's 0 * inf) -> index 0.
__device__ __forceinline__ u32 index4(float s, const float* thr, const u8* map, int fp4) {
    if (s != s) return 0u;
    const float a = fp4 ? fabsf(s) : s;
    int c = 0;
#pragma unroll
    for (int k = 0; k < 15; ++k) c += (thr[k] < a);
    u32 q = map[c];
    if (fp4 && s < 0.0f) q |= 8u;
    return q;
}

template <typename T>
__device__ void quantize_4bit(const T* __restrict__ x, i64 n, int log2_bs,
                              const float* __restrict__ thr_g, const u8* __restrict__ map_g, int fp4,
                              u8* __restrict__ packed, float* __restrict__ absmax) {
    __shared__ float thr[16];
    __shared__ u8 map[16];
    __shared__ float smem_max[32];
    if (threadIdx.x < 16) { thr[threadIdx.x] = thr_g[threadIdx.x]; map[threadIdx.x] = map_g[threadIdx.x]; }
    __syncthreads();

    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 e0 = t * 8;
    float v[8];
    load8(x, e0, n, v);
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) { v[k] = flush(v[k]); m = fmaxf(m, fabsf(v[k])); }

    const int G = 1 << (log2_bs - 3);                      // threads per quantization block
    m = group_absmax(m, log2_bs, smem_max);

    const i64 n_blocks = (n + (1LL << log2_bs) - 1) >> log2_bs;
    const i64 b = e0 >> log2_bs;
    if ((t & (G - 1)) == 0 && b < n_blocks) absmax[b] = m;

    const float inv = flush(__frcp_rn(m));
    u32 word = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const u32 q = index4(flush(__fmul_rn(v[k], inv)), thr, map, fp4);
        word |= q << (8 * (k >> 1) + ((k & 1) ? 0 : 4));   // even element: high nibble
    }
    const i64 nbytes = (n + 1) >> 1, j0 = t * 4;
    if (j0 + 4 <= nbytes) {
        *reinterpret_cast<u32*>(packed + j0) = word;
    } else {
        for (int k = 0; k < 4; ++k)
            if (j0 + k < nbytes) packed[j0 + k] = (u8)(word >> (8 * k));
    }
}

extern "C" __global__ void quantize_4bit_f32(const float* x, i64 n, int log2_bs, const float* thr,
                                             const u8* map, int fp4, u8* packed, float* absmax) {
    quantize_4bit<float>(x, n, log2_bs, thr, map, fp4, packed, absmax);
}
extern "C" __global__ void quantize_4bit_f16(const u16* x, i64 n, int log2_bs, const float* thr,
                                             const u8* map, int fp4, u8* packed, float* absmax) {
    quantize_4bit<u16>(x, n, log2_bs, thr, map, fp4, packed, absmax);
}

// ------------------------------------------------------------------------------------------
// Dequantize: x^ = decode[q] * absmax in float32 (flushed), then one rounding, nearest even, to
// the output type: float32 (none), float16 or bfloat16 (the twin's one cast).
enum OutType { OUT_F32, OUT_F16, OUT_BF16 };

// The shape of the dequantizer's memory accesses, fixed at compile time: quant4bit.py passes
// -DNAME=value for a variant other than these defaults (DequantizeLaunch's `variant`). Every
// variant computes each value with the same operations, so all give the same bits; only the
// width of the loads and stores, their number per thread and their cache hints change.
#ifndef CHUNK
#define CHUNK 4       // packed bytes per chunk, one load: 4 (32 bits), 8 (uint2) or 16 (uint4)
#endif
#ifndef UNROLL
#define UNROLL 4      // chunks per thread per sweep: their loads are all issued before the first store
#endif
#ifndef STREAMING
#define STREAMING 0   // 1: streaming cache hints (__ldcs, __stcs: each byte is touched once, evict it first)
#endif
#ifndef STAGED
#define STAGED 0      // 1: the staged kernel (sm_90+, below): values through shared memory, one bulk store per tile
#endif
#ifndef TILE
#define TILE 16384    // STAGED: output bytes per tile (8192 or 16384)
#endif
#ifndef STAGES
#define STAGES 2      // STAGED: tiles of shared memory in flight (2 to 4; STAGES * TILE <= 32 KiB)
#endif
#ifndef PREFETCH
#define PREFETCH 0    // STAGED: tiles ahead whose codes and absmax are prefetched into L2 (0: none, up to 4)
#endif
#ifndef AHEAD
#define AHEAD 0       // STAGED: 1 loads the next tile's codes and absmax into registers while this tile decodes
#endif
#ifndef INTERLEAVE
#define INTERLEAVE 0  // 1 deals the sweeps (STAGED: the tiles) out in turn (block b: b, b + G, ...), 0 contiguous shares
#endif
#ifndef WIDE
#define WIDE 0        // 1: the wide kernel (below): a warp loads 512 packed bytes at once, each store 512 contiguous bytes
#endif
#ifndef WIDE_EARLY
#define WIDE_EARLY 0  // WIDE: 1 issues a block's first loads before its shared-memory table and barrier (nested:
#endif                // code2 read through the read-only cache); 2 the same with code2 copied to shared memory
#ifndef PDL
#define PDL 0         // WIDE, sm_90+: programmatic dependent launch (quant4bit.py launches with the attribute):
#endif                // 1 waits for the kernel before at the start, 2 issues the first loads before waiting
static_assert(CHUNK == 4 || CHUNK == 8 || CHUNK == 16, "CHUNK is 4, 8 or 16 packed bytes");
static_assert(UNROLL >= 1 && UNROLL <= 16, "UNROLL is 1 to 16 chunks");
static_assert(STREAMING == 0 || STREAMING == 1, "STREAMING is 0 or 1");
static_assert(STAGED == 0 || STAGED == 1, "STAGED is 0 or 1");
static_assert(!STAGED || CHUNK == 4, "the staged kernel loads 4 packed bytes per chunk");
static_assert(TILE == 8192 || TILE == 16384, "TILE is 8192 or 16384 output bytes");
static_assert(STAGES >= 2 && STAGES <= 4 && STAGES * TILE <= 32768, "STAGES is 2 to 4, STAGES * TILE <= 32 KiB");
static_assert(PREFETCH >= 0 && PREFETCH <= 4, "PREFETCH is 0 to 4 tiles");
static_assert(AHEAD == 0 || AHEAD == 1, "AHEAD is 0 or 1");
static_assert(INTERLEAVE == 0 || INTERLEAVE == 1, "INTERLEAVE is 0 or 1");
static_assert(WIDE_EARLY >= 0 && WIDE_EARLY <= 2, "WIDE_EARLY is 0, 1 or 2");
static_assert(PDL >= 0 && PDL <= 2 && (PDL == 0 || WIDE == 1), "PDL is 0, 1 or 2, and only for the wide kernel");
static_assert(WIDE == 0 || (WIDE == 1 && !STAGED && CHUNK == 16 && INTERLEAVE == 1 && !STREAMING),
              "WIDE = 1 is the swept kernel's shape with CHUNK = 16, INTERLEAVE = 1, no streaming hints");

// A chunk is WORDS little-endian 32-bit words of codes, 8 values each; each word becomes one
// 16-byte store (float16, bfloat16; two for float32). A chunk's 2 * CHUNK <= 32 values start at
// a multiple of 2 * CHUNK, and a quantization block's B >= 32 values (a power of two,
// check_blocksize) at a multiple of B, so a chunk never straddles two blocks: one absmax each.
constexpr int WORDS = CHUNK / 4;

// A read-only load and a store of one vector (u32, uint2, uint4; uint4, float4), with or
// without the streaming hints.
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

// One chunk: the CHUNK packed bytes from byte j0 as WORDS words. A whole chunk is one CHUNK-byte
// load (packed starts on a CHUNK-byte boundary: DequantizeLaunch sees to it, and j0 is a
// multiple of CHUNK); the last, partial chunk is read byte by byte (bytes past nbytes: 0).
__device__ __forceinline__ void load_chunk(const u8* __restrict__ packed, i64 j0, i64 nbytes, u32 w[WORDS]) {
    if (j0 + CHUNK <= nbytes) {
#if CHUNK == 16
        const uint4 q = load_ro(reinterpret_cast<const uint4*>(packed + j0));
        w[0] = q.x; w[1] = q.y; w[2] = q.z; w[3] = q.w;
#elif CHUNK == 8
        const uint2 q = load_ro(reinterpret_cast<const uint2*>(packed + j0));
        w[0] = q.x; w[1] = q.y;
#else
        w[0] = load_ro(reinterpret_cast<const u32*>(packed + j0));
#endif
        return;
    }
#pragma unroll
    for (int i = 0; i < WORDS; ++i) w[i] = 0u;
#pragma unroll
    for (int k = 0; k < CHUNK; ++k)                        // unrolled: w stays in registers
        if (j0 + k < nbytes) w[k >> 2] |= (u32)packed[j0 + k] << (8 * (k & 3));
}

template <int OUT>
__device__ __forceinline__ u32 to16(float v) { return OUT == OUT_BF16 ? f2bf(v) : f2h(v); }

// The 8 values of one word of codes: decode[q] * absmax, flushed (even element: high nibble).
__device__ __forceinline__ void decode8(u32 word, float a, const float* tab, float v[8]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const u32 byte = (word >> (8 * k)) & 0xFFu;
        v[2 * k] = flush(__fmul_rn(tab[byte >> 4], a));
        v[2 * k + 1] = flush(__fmul_rn(tab[byte & 0xFu], a));
    }
}

// The 8 values of one word from element e0: one 16-byte store (two for float32); none past n.
template <int OUT>
__device__ __forceinline__ void store8(void* __restrict__ out, i64 e0, i64 n, const float v[8]) {
    if (e0 + 8 <= n) {
        if (OUT == OUT_F32) {
            float4* o = reinterpret_cast<float4*>(static_cast<float*>(out) + e0);
            store_vec(o, make_float4(v[0], v[1], v[2], v[3]));
            store_vec(o + 1, make_float4(v[4], v[5], v[6], v[7]));
        } else {
            uint4 o;
            o.x = to16<OUT>(v[0]) | (to16<OUT>(v[1]) << 16); o.y = to16<OUT>(v[2]) | (to16<OUT>(v[3]) << 16);
            o.z = to16<OUT>(v[4]) | (to16<OUT>(v[5]) << 16); o.w = to16<OUT>(v[6]) | (to16<OUT>(v[7]) << 16);
            store_vec(reinterpret_cast<uint4*>(static_cast<u16*>(out) + e0), o);
        }
    } else {
        for (int k = 0; k < 8 && e0 + k < n; ++k) {
            if (OUT == OUT_F32) static_cast<float*>(out)[e0 + k] = v[k];
            else static_cast<u16*>(out)[e0 + k] = (u16)to16<OUT>(v[k]);
        }
    }
}

// The grid is one wave (as many CUDA blocks as the device runs at once: quant4bit.py asks the
// occupancy calculator) and each CUDA block takes an equal, contiguous share of the chunks, a
// whole number of sweeps of blockDim.x * UNROLL chunks but the last: all blocks finish together,
// with no last partial wave running on a few SMs. In a sweep thread t takes chunks
// c0, c0 + T, ..., c0 + (UNROLL-1) T (T = blockDim.x, c0 = sweep start + t), so a warp reads
// 32 * CHUNK contiguous bytes per load instruction and its stores of those 32 chunks fill one
// contiguous span. With CHUNK = 4 and a 16-bit output each store instruction of a warp writes 512 contiguous
// bytes; otherwise (CHUNK = 8 or 16, or float32) its lanes' 16-byte pieces lie one chunk's output
// apart and the chunk's other stores fill the gaps. A thread loads all UNROLL chunks, then the UNROLL
// block absmax (nested: code2[q2] * absmax2 + offset, a chain of two loads), and only then
// decodes and stores, so no load waits behind a store. INTERLEAVE = 1 deals the sweeps out in turn
// instead (block b of G takes sweeps b, b + G, ...), as the staged kernel below can.
template <int OUT, bool NESTED>
__device__ void dequantize_4bit(const u8* __restrict__ packed, i64 n, const float* __restrict__ decode,
                                const float* __restrict__ absmax, const u8* __restrict__ qabsmax,
                                const float* __restrict__ code2, const float* __restrict__ absmax2,
                                const float* __restrict__ offset, int log2_bs, int log2_bs2,
                                void* __restrict__ out) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = decode[threadIdx.x];
    __syncthreads();

    const i64 nbytes = (n + 1) >> 1, chunks = (nbytes + CHUNK - 1) / CHUNK;   // CHUNK packed bytes each
    const i64 last_block = ((n + (1LL << log2_bs) - 1) >> log2_bs) - 1;
    const i64 T = blockDim.x;
#if INTERLEAVE
    const i64 first = (i64)blockIdx.x * T * UNROLL, step = (i64)gridDim.x * T * UNROLL;   // sweeps b, b + G, ...
    const i64 end = chunks;
#else
    const i64 share = ((chunks + gridDim.x - 1) / gridDim.x + T - 1) / T * T;   // whole warps
    const i64 first = (i64)blockIdx.x * share, step = T * UNROLL;
    const i64 end = first + share < chunks ? first + share : chunks;  // this CUDA block's [first, end)
#endif
    const float off = NESTED ? __ldg(offset) : 0.0f;

    for (i64 c0 = first + threadIdx.x; c0 < end; c0 += step) {
        u32 word[UNROLL][WORDS];
        float a[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const i64 c = c0 + u * T;
            if (c < end) {
                load_chunk(packed, c * CHUNK, nbytes, word[u]);
            } else {
#pragma unroll
                for (int i = 0; i < WORDS; ++i) word[u][i] = 0u;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {                 // a chunk's values share one block (see WORDS)
            const i64 b = ((c0 + u * T) * (2 * CHUNK)) >> log2_bs;
            a[u] = block_absmax<NESTED>(b < last_block ? b : last_block,   // past the end: stored nowhere
                                        absmax, qabsmax, code2, absmax2, off, log2_bs2);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const i64 c = c0 + u * T;
            if (c >= end) break;                           // after every load: nothing waits on it
#pragma unroll
            for (int i = 0; i < WORDS; ++i) {              // word i: elements e0 + 8i .. e0 + 8i + 7
                float v[8];
                decode8(word[u][i], a[u], tab, v);
                store8<OUT>(out, c * (2 * CHUNK) + 8 * i, n, v);
            }
        }
    }
}

// The decoding with fewer instructions, for finite absmax and table (decode_word below): flush in
// one instruction, x * 1 with flush-to-zero (a subnormal x becomes the zero of its sign, anything
// else but NaN is unchanged: flush's result), and two values rounded to 16 bits by one cvt (x2: the
// same rounding as two cvt.rn, packed with `hi` in the upper half).
__device__ __forceinline__ float flush1(float x) {
    float r; asm("mul.rn.ftz.f32 %0, %1, 0f3F800000;" : "=f"(r) : "f"(x)); return r;
}
template <int OUT>
__device__ __forceinline__ u32 pack16x2(float lo, float hi) {
    u32 r;
#if __CUDA_ARCH__ >= 800
    if (OUT == OUT_BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    r = to16<OUT>(lo) | (to16<OUT>(hi) << 16);             // no cvt.rn.bf16x2 before sm_80: the same bits
#endif
    return r;
}
// One word of codes (8 values, even element in the high nibble) into `dst` (shared or global memory):
// 16 bytes of 16-bit values or 32 of float32. `fast` (a and the table finite: no NaN can arise)
// takes the short instructions above, else decode8/to16 as the swept kernel; the same bits. The staged
// and the wide kernel decode with it.
template <int OUT>
__device__ __forceinline__ void decode_word(u32 word, float a, const float* tab, bool fast, uint4* dst) {
    float v[8];
    if (fast) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 byte = (word >> (8 * k)) & 0xFFu;
            v[2 * k] = flush1(__fmul_rn(tab[byte >> 4], a));
            v[2 * k + 1] = flush1(__fmul_rn(tab[byte & 0xFu], a));
        }
    } else {
        decode8(word, a, tab, v);
    }
    if (OUT == OUT_F32) {
        dst[0] = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
        dst[1] = make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]), __float_as_uint(v[7]));
    } else if (fast) {
        dst[0] = make_uint4(pack16x2<OUT>(v[0], v[1]), pack16x2<OUT>(v[2], v[3]), pack16x2<OUT>(v[4], v[5]),
                            pack16x2<OUT>(v[6], v[7]));
    } else {
        dst[0] = make_uint4(to16<OUT>(v[0]) | (to16<OUT>(v[1]) << 16), to16<OUT>(v[2]) | (to16<OUT>(v[3]) << 16),
                            to16<OUT>(v[4]) | (to16<OUT>(v[5]) << 16), to16<OUT>(v[6]) | (to16<OUT>(v[7]) << 16));
    }
}

// ------------------------------------------------------------------------------------------
// The staged dequantizer (STAGED = 1; Hopper, sm_90+). The kernel above writes the output with
// the SM's ordinary stores: every warp issues its 16-byte stores itself, and the same-traffic peer
// of benchmarks/dequant_4bit.py (no decoding at all) tops out near 75-78% of the copy rate in
// that shape. Here the output goes through shared memory instead: the CUDA block decodes one tile
// of TILE output bytes into a shared-memory buffer, and one thread hands the whole tile to the
// Tensor Memory Accelerator as one bulk copy (cp.async.bulk, PTX ISA 8.0: a contiguous
// shared -> global copy the TMA unit carries out by itself, in full 128-byte lines). STAGES
// buffers rotate, so a tile is loaded and decoded while the TMA still drains the tiles before it;
// thread 0 also asks the TMA to prefetch the codes and absmax of the PREFETCH tiles ahead into L2
// (cp.async.bulk.prefetch.L2), so the block's own loads find them there (PREFETCH > 0; measured no
// faster on the H200, benchmarks/results/h200-2026-12-02/staged/). With double quantization the
// 256-entry code of the absmax is kept in shared memory.
//
// A tile is VPT = TILE / sizeof(out) values, CPT = VPT / 8 chunks of 4 packed bytes; thread t of
// the T = 256 holds chunks t, t + T, ..., t + (U-1) T of it (U = CPT / T: a warp reads 128
// contiguous bytes per load and writes 512 contiguous bytes of shared memory per store, no bank
// conflicts). Every value is computed as in the kernel above (decode8, to16): the same bits. The
// CUDA blocks (one wave, several per SM: their loads, decoding and barriers overlap) take equal
// contiguous shares of the tiles; the last tile of the output, when partial, is stored directly
// (store8), with no bulk copy. INTERLEAVE = 1 deals the tiles out in turn instead (block b of G takes
// tiles b, b + G, b + 2G, ...): at any moment the blocks then write one window of about G tiles, as a
// copy kernel does, rather than G places a share apart.
#if STAGED
constexpr int STAGED_THREADS = 256;                        // quant4bit.py launches THREADS = 256

__device__ __forceinline__ void bulk_store(void* dst, const void* src, u32 bytes) {
#if __CUDA_ARCH__ >= 900
    // shared -> global, completion tracked per bulk group (PTX ISA: cp.async.bulk); dst and bytes: 16-byte multiples
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                 :: "l"(dst), "r"((u32)__cvta_generic_to_shared(src)), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
#endif
}
template <int PENDING>
__device__ __forceinline__ void bulk_wait_read() {         // at most PENDING groups still reading shared memory
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group.read %0;" :: "n"(PENDING) : "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_all() {          // every group complete (its writes done)
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#endif
}
// A hint: bring the 16-byte-aligned part of [lo, hi) into L2 (the TMA fetches it; nothing waits).
__device__ __forceinline__ void prefetch_l2(const void* lo, const void* hi) {
#if __CUDA_ARCH__ >= 900
    const unsigned long long a = ((unsigned long long)lo + 15) & ~15ull, b = (unsigned long long)hi & ~15ull;
    if (b > a) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(a), "r"((u32)(b - a)) : "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async() {      // shared-memory writes made visible to the TMA
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

template <int OUT, bool NESTED>
__device__ void dequantize_4bit_staged(const u8* __restrict__ packed, i64 n, const float* __restrict__ decode,
                                       const float* __restrict__ absmax, const u8* __restrict__ qabsmax,
                                       const float* __restrict__ code2, const float* __restrict__ absmax2,
                                       const float* __restrict__ offset, int log2_bs, int log2_bs2,
                                       void* __restrict__ out) {
#if __CUDA_ARCH__ < 900
    __trap();                                              // quant4bit.py picks STAGED only on sm_90+
#else
    constexpr int OB = OUT == OUT_F32 ? 4 : 2;             // output bytes per value
    constexpr int VPT = TILE / OB, CPT = VPT / 8, U = CPT / STAGED_THREADS;
    static_assert(U >= 1 && U * STAGED_THREADS == CPT, "a tile is a whole number of chunks per thread");
    __shared__ float tab[16];
    __shared__ float code2_s[NESTED ? 256 : 1];            // the nested absmax's 8-bit code, one load fewer per block
    __shared__ __align__(128) uint4 stage[STAGES][TILE / 16];
    bool finite = true;
    if (threadIdx.x < 16) { tab[threadIdx.x] = decode[threadIdx.x]; finite = isfinite(tab[threadIdx.x]); }
    if (NESTED) code2_s[threadIdx.x] = code2[threadIdx.x];  // STAGED_THREADS = 256 entries
    const bool tab_finite = __syncthreads_and(finite);     // (a barrier too)

    const i64 nbytes = (n + 1) >> 1, tiles = (n + VPT - 1) / VPT;
    const i64 last_block = ((n + (1LL << log2_bs) - 1) >> log2_bs) - 1;
#if INTERLEAVE
    const i64 first = blockIdx.x, step = gridDim.x, end = tiles;     // this CUDA block's tiles: first, first + step, ...
#else
    const i64 share = (tiles + gridDim.x - 1) / gridDim.x;
    const i64 first = (i64)blockIdx.x * share, step = 1;
    const i64 end = first + share < tiles ? first + share : tiles;   // this CUDA block's tiles [first, end)
#endif
    const float off = NESTED ? __ldg(offset) : 0.0f;

    // A tile's loads, kept raw so that nothing waits on them until the tile is decoded: the codes,
    // and per chunk the absmax (plain) or its 8-bit code and absmax2 (nested; code2 is applied at decode).
    struct Loads { u32 word[U]; u32 q[U]; float a[U]; };
    auto load_tile = [&](i64 tile, Loads& L) {
        const i64 c0 = tile * CPT + threadIdx.x;           // this thread's first chunk of the tile
        const bool whole = (tile + 1) * VPT <= n;          // a whole tile: plain loads, every block in range
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (whole) L.word[u] = load_ro(reinterpret_cast<const u32*>(packed) + c0 + u * STAGED_THREADS);
            else load_chunk(packed, (c0 + u * STAGED_THREADS) * 4, nbytes, &L.word[u]);   // past the end: 0
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            i64 b = ((c0 + u * STAGED_THREADS) * 8) >> log2_bs;
            b = b < last_block ? b : last_block;           // past the end: stored nowhere
            if (NESTED) { L.q[u] = __ldg(qabsmax + b); L.a[u] = __ldg(absmax2 + (b >> log2_bs2)); }
            else L.a[u] = __ldg(absmax + b);
        }
    };
    auto absmax_of = [&](const Loads& L, int u) -> float {  // block_absmax (common.cuh), code2 from shared memory
        return NESTED ? nested_absmax_of(code2_s[L.q[u]], L.a[u], off) : flush(L.a[u]);
    };
    auto prefetch_tile = [&](i64 tile) {                   // thread 0: tile's codes and absmax into L2
        const i64 v0 = tile * VPT, v1 = v0 + VPT < n ? v0 + VPT : n;
        prefetch_l2(packed + v0 / 2, packed + (v1 + 1) / 2);
        const i64 b0 = v0 >> log2_bs, b1 = ((v1 - 1) >> log2_bs) + 1;
        if (NESTED) prefetch_l2(qabsmax + b0, qabsmax + b1);
        else prefetch_l2(absmax + b0, absmax + b1);
    };
    Loads cur, next;
    if (AHEAD && first < end) load_tile(first, cur);
    if (PREFETCH && threadIdx.x == 0)                      // the L2 prefetch window: the PREFETCH tiles after this one
        for (i64 t = first + step; t < first + PREFETCH * step && t < end; t += step) prefetch_tile(t);
    int slot = 0;
    for (i64 tile = first; tile < end; tile += step) {
        if (PREFETCH && threadIdx.x == 0 && tile + PREFETCH * step < end) prefetch_tile(tile + PREFETCH * step);
        if (!AHEAD) load_tile(tile, cur);
        else if (tile + step < end) load_tile(tile + step, next);   // in flight while this tile decodes and stores
        const i64 v0 = tile * VPT;
        if (v0 + VPT <= n) {                               // a whole tile: shared memory, one bulk store
            uint4* buf = stage[slot];
            __syncthreads();                               // thread 0's bulk_wait_read has freed buf
#pragma unroll
            for (int u = 0; u < U; ++u) {                  // chunk l = u T + t of the tile: 8 values
                const int l = u * STAGED_THREADS + threadIdx.x;
                const float a = absmax_of(cur, u);
                decode_word<OUT>(cur.word[u], a, tab, tab_finite && isfinite(a), buf + (OUT == OUT_F32 ? 2 * l : l));
            }
            fence_proxy_async();
            __syncthreads();                               // the whole tile is in buf
            if (threadIdx.x == 0) {
                bulk_store(static_cast<u8*>(out) + v0 * OB, buf, TILE);
                bulk_wait_read<STAGES - 1>();              // the oldest buffer is free for the tile STAGES on
            }
            slot = slot + 1 == STAGES ? 0 : slot + 1;
        } else {                                           // the last, partial tile: direct stores
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const i64 e0 = (tile * CPT + u * STAGED_THREADS + threadIdx.x) * 8;
                if (e0 >= n) break;
                float v[8];
                decode8(cur.word[u], absmax_of(cur, u), tab, v);
                store8<OUT>(out, e0, n, v);
            }
        }
        if (AHEAD) cur = next;
    }
    if (threadIdx.x == 0) bulk_wait_all();                 // shared memory outlives the bulk copies reading it
#endif
}
#endif

// ------------------------------------------------------------------------------------------
// The wide dequantizer (WIDE = 1). benchmarks/dequant_traffic.py moves this kernel's traffic (one
// byte read for four written) with no decoding in several access shapes; the fastest on the H200 was
// the one below, ahead of the staged kernel's shape (results/h200-2026-12-03/f/). A warp takes groups
// of 1024 values: it loads their 512 packed bytes with one 16-byte load per lane (lane l: words
// 4l .. 4l + 3 of the group's 128) and writes their 2 KiB of 16-bit output with four store
// instructions of 512 contiguous bytes each. Store k of lane l is the 8 values of word 32k + l, which
// lane 8k + l/4 loaded: four warp shuffles bring it over. A CUDA block's warps take UNROLL groups
// each per step, all loads (codes and absmax) before any store; the steps are dealt out to the blocks
// in turn, and quant4bit.py launches one block per step (several waves: blocks start in order, so the
// writes move through the output as one window, as a copy kernel's do). Every value is computed as in
// the other kernels (decode_word): the same bits. A partial last group is read byte by byte and
// stored without the shuffles (store8). WIDE_EARLY = 1 sends a block's first loads out before its
// table is in shared memory (the one barrier) and reads the nested absmax's code through the read-only
// cache rather than copying it to shared memory, so that a block that lives for one step does not
// spend its start waiting; WIDE_EARLY = 2 sends them out first and still copies the code.
#if WIDE
// The rare cases out of line, so that their registers do not count against the common path's:
// decode_word's long decoding (a NaN or infinite absmax or table) and the partial last group's word.
template <int OUT>
__device__ __noinline__ void decode_word_slow(u32 word, float a, const float* tab, uint4* dst) {
    decode_word<OUT>(word, a, tab, false, dst);
}
template <int OUT>
__device__ __noinline__ void decode_word_tail(const u8* __restrict__ packed, i64 w, i64 n, float a, const float* tab,
                                              void* __restrict__ out) {
    const i64 nbytes = (n + 1) >> 1;
    u32 word = 0u;
    for (int j = 0; j < 4; ++j)                            // byte by byte: bytes past the end read as 0
        if (w * 4 + j < nbytes) word |= (u32)packed[w * 4 + j] << (8 * j);
    float vals[8];
    decode8(word, a, tab, vals);
    store8<OUT>(out, w * 8, n, vals);                      // no value past n
}

template <int OUT, bool NESTED>
__device__ void dequantize_4bit_wide(const u8* __restrict__ packed, i64 n, const float* __restrict__ decode,
                                     const float* __restrict__ absmax, const u8* __restrict__ qabsmax,
                                     const float* __restrict__ code2, const float* __restrict__ absmax2,
                                     const float* __restrict__ offset, int log2_bs, int log2_bs2,
                                     void* __restrict__ out) {
    constexpr int OW = OUT == OUT_F32 ? 2 : 1;              // 16-byte output pieces per word of codes
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const i64 nbytes = (n + 1) >> 1, groups = (nbytes + 511) >> 9;   // 512 packed bytes, 1024 values each
    const i64 last_block = ((n + (1LL << log2_bs) - 1) >> log2_bs) - 1;
    const i64 per_step = (i64)warps * UNROLL;             // groups per CUDA block and step

    // A step's loads, kept raw so that nothing waits on them until its decoding: this lane's 16 packed
    // bytes of each group, and the absmax of the group's quantization block number `lane` (nested: its
    // 8-bit code and absmax2). A group of 1024 values spans NB = 1024 / B blocks (B >= 32: at most 32;
    // 1 when B >= 1024), so lanes 0 .. NB-1 load one each, and store k's lanes take theirs with a shuffle.
    const int nb = log2_bs >= 10 ? 1 : 1 << (10 - log2_bs);
    uint4 q[UNROLL];
    float a[UNROLL];
    u32 qa[UNROLL];
    auto load_step = [&](i64 base) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const i64 g = base + (i64)u * warps + warp;    // the same for the whole warp
            q[u] = g < groups && (g + 1) * 1024 <= n ? load_ro(reinterpret_cast<const uint4*>(packed) + g * 32 + lane)
                                                     : make_uint4(0u, 0u, 0u, 0u);
            i64 b = ((g * 1024) >> log2_bs) + lane;
            b = b < last_block ? b : last_block;           // past the end: stored nowhere
            a[u] = 0.0f; qa[u] = 0u;
            if (lane < nb) {
                if (NESTED) { qa[u] = __ldg(qabsmax + b); a[u] = __ldg(absmax2 + (b >> log2_bs2)); }
                else a[u] = __ldg(absmax + b);
            }
        }
    };
    // WIDE_EARLY: the first step's loads go out before the table and the barrier (a CUDA block here
    // lives for one step, quant4bit.py's grid, and its loads need neither); 1 also reads the nested
    // absmax's code through the read-only cache instead of a copy in shared memory.
    // PDL (programmatic dependent launch, sm_90+, quant4bit.py launches with the attribute): the kernel
    // after this one may place its blocks once every block of this one has started, and
    // griddepcontrol.wait returns once the kernel before has finished and its writes are visible.
    // PDL = 1 waits before any memory access: correct whatever ran before. PDL = 2 first issues the
    // first step's loads of codes and absmax: correct only if the kernel before did not write them (a
    // frozen weight quantized earlier), a measured variant, never a default. Launched plainly, both
    // instructions return at once.
#if PDL
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#if PDL == 1
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#endif
    i64 base = (i64)blockIdx.x * per_step;
    const i64 first = base;
    constexpr bool early = WIDE_EARLY != 0 || PDL == 2;
    if (early && base < groups) load_step(base);
#if PDL == 2
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    __shared__ float tab[16];
    constexpr bool code2_shared = NESTED && WIDE_EARLY != 1;
    __shared__ float code2_s[code2_shared ? 256 : 1];
    bool finite = true;
    if (threadIdx.x < 16) { tab[threadIdx.x] = decode[threadIdx.x]; finite = isfinite(tab[threadIdx.x]); }
    if (code2_shared)
        for (int i = threadIdx.x; i < 256; i += blockDim.x) code2_s[i] = code2[i];
    const bool tab_finite = __syncthreads_and(finite);     // (a barrier too)
    const float off = NESTED ? __ldg(offset) : 0.0f;

    for (; base < groups; base += (i64)gridDim.x * per_step) {
        if (!early || base != first) load_step(base);      // (early: the first step's are in flight)
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const i64 g = base + (i64)u * warps + warp;
            if (g >= groups) break;                        // warp-uniform, as every branch below
            const float c2 = NESTED ? (code2_shared ? code2_s[qa[u]] : __ldg(code2 + qa[u])) : 0.0f;
            const float block_ab = NESTED ? nested_absmax_of(c2, a[u], off) : flush(a[u]);   // lanes < nb: block `lane`
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const i64 w = g * 128 + 32 * k + lane;     // the word of codes this lane stores
                const float ab = __shfl_sync(0xffffffffu, block_ab, ((32 * k + lane) * 8) >> log2_bs);
                if ((g + 1) * 1024 <= n) {                 // a whole group: word l % 4 of lane 8k + l / 4
                    const int src = 8 * k + (lane >> 2), i = lane & 3;
                    const u32 x = __shfl_sync(0xffffffffu, q[u].x, src), y = __shfl_sync(0xffffffffu, q[u].y, src);
                    const u32 z = __shfl_sync(0xffffffffu, q[u].z, src), v = __shfl_sync(0xffffffffu, q[u].w, src);
                    const u32 word = i == 0 ? x : i == 1 ? y : i == 2 ? z : v;
                    uint4* dst = reinterpret_cast<uint4*>(out) + w * OW;
                    if (tab_finite && isfinite(ab)) decode_word<OUT>(word, ab, tab, true, dst);
                    else decode_word_slow<OUT>(word, ab, tab, dst);
                } else if (w * 8 < n) {                    // the partial last group: byte by byte, no shuffles
                    decode_word_tail<OUT>(packed, w, n, ab, tab, out);
                }
            }
        }
    }
}
#endif

// One kernel name per output type and absmax kind; STAGED or WIDE picks the body compiled into it.
#if STAGED
#define DEQ4_BODY dequantize_4bit_staged
// Registers for as many CUDA blocks per SM as shared memory allows (227 KiB): 6 with 32 KiB of stages
// (<= 40 registers), 8, the most 256-thread blocks an SM runs, with 8 KiB tiles and 2 or 3 stages (<= 32).
#define DEQ4_BOUNDS __launch_bounds__(256, STAGES * TILE <= 24576 ? 8 : 6)
#elif WIDE
#define DEQ4_BODY dequantize_4bit_wide
#ifndef WIDE_BLOCKS
#define WIDE_BLOCKS 8  // CUDA blocks per SM the registers must allow (8: <= 32 registers, the most 256-thread blocks an SM runs)
#endif
#define DEQ4_BOUNDS __launch_bounds__(256, WIDE_BLOCKS)
#else
#define DEQ4_BODY dequantize_4bit
#define DEQ4_BOUNDS
#endif
#define DEQ4(NAME, OUT, NESTED)                                                                   \
    extern "C" __global__ void DEQ4_BOUNDS NAME(const u8* packed, i64 n, const float* decode,     \
                                    const float* absmax, const u8* qabsmax, const float* code2,   \
                                    const float* absmax2, const float* offset, int log2_bs,       \
                                    int log2_bs2, void* out) {                                    \
        DEQ4_BODY<OUT, NESTED>(packed, n, decode, absmax, qabsmax, code2, absmax2, offset,        \
                               log2_bs, log2_bs2, out);                                           \
    }
DEQ4(dequantize_4bit_f32, OUT_F32, false)
DEQ4(dequantize_4bit_f16, OUT_F16, false)
DEQ4(dequantize_4bit_bf16, OUT_BF16, false)
DEQ4(dequantize_4bit_f32_nested, OUT_F32, true)
DEQ4(dequantize_4bit_f16_nested, OUT_F16, true)
DEQ4(dequantize_4bit_bf16_nested, OUT_BF16, true)
