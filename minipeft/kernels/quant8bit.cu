// 8-bit block-wise quantization with a 256-entry code (the dynamic map), and LLM.int8()'s
// row-wise int8 quantization; bit for bit with minipeft.quant.blockwise / minipeft.quant.int8.
//
// Block-wise (Dettmers et al. 2021, arXiv 2110.02861, Sec. 2.1): per block of B values
//     absmax = max |x|,   s = x * (1 / absmax),   q = nearest code index (ties: even index),
//     x^ = code[q] * absmax.
// The nearest index is a binary search over the float32 midpoints of the sorted distinct
// code values, held in shared memory (+inf past the last), then a map back to the code's
// own index order. With an offset (double quantization of 4-bit absmax values) the kernel
// quantizes x - offset, as the twin does.
//
// Row-wise int8 (LLM.int8(), Dettmers et al. 2022, arXiv 2208.07339, Sec. 3.1): per row
//     stats = max |x| (elements with |x| >= threshold left out),  q = rint(x * (127 / stats)).
//
// Float semantics follow the twins op for op: flush-to-zero only where they flush, every
// product/sum rounded on its own (__fmul_rn/__fadd_rn/__fsub_rn), IEEE reciprocal/division.

#include "common.cuh"   // u8 u16 u32 i64, flush, h2f, f2h, to_f32, load8, warp_max, group_absmax, block_absmax

// Nearest code index of s: lower_bound over 256 midpoint slots (unused = +inf), ties (s on a
// midpoint) to the even position, then the code's index. NaN -> 0.
__device__ __forceinline__ u32 index8(float s, const float* mids, const u8* map, int n_mids) {
    if (s != s) return 0u;
    int pos = 0;
#pragma unroll
    for (int step = 128; step >= 1; step >>= 1)
        if (mids[pos + step - 1] < s) pos += step;
    if (pos < n_mids && (pos & 1) && mids[pos] == s) pos += 1;
    return map[pos];
}

// One thread = 8 consecutive elements -> 8 bytes; G = B/8 threads share a block.
template <typename T>
__device__ void quantize_8bit(const T* __restrict__ x, i64 n, int log2_bs, const float* __restrict__ mids_g,
                              const u8* __restrict__ map_g, int n_mids, const float* __restrict__ offset,
                              int has_offset, u8* __restrict__ q, float* __restrict__ absmax) {
    __shared__ float mids[256];
    __shared__ u8 map[256];
    __shared__ float smem_max[32];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) { mids[i] = mids_g[i]; map[i] = map_g[i]; }
    __syncthreads();

    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 e0 = t * 8;
    float v[8];
    load8(x, e0, n, v);
    const float off = has_offset ? *offset : 0.0f;
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        // twin: (absmax - offset) is formed first (unflushed), then the block code flushes it;
        // padding past n stays 0.
        if (has_offset && e0 + k < n) v[k] = __fsub_rn(v[k], off);
        v[k] = flush(v[k]);
        m = fmaxf(m, fabsf(v[k]));
    }
    const int G = 1 << (log2_bs - 3);                      // threads per quantization block
    m = group_absmax(m, log2_bs, smem_max);
    const i64 n_blocks = (n + (1LL << log2_bs) - 1) >> log2_bs;
    const i64 b = e0 >> log2_bs;
    if ((t & (G - 1)) == 0 && b < n_blocks) absmax[b] = m;

    const float inv = flush(__frcp_rn(m));
    u32 lo = 0, hi = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const u32 c = index8(flush(__fmul_rn(v[k], inv)), mids, map, n_mids);
        if (k < 4) lo |= c << (8 * k); else hi |= c << (8 * (k - 4));
    }
    if (e0 + 8 <= n) {
        *reinterpret_cast<uint2*>(q + e0) = make_uint2(lo, hi);
    } else {
        for (int k = 0; k < 8; ++k)
            if (e0 + k < n) q[e0 + k] = (u8)((k < 4 ? lo >> (8 * k) : hi >> (8 * (k - 4))) & 0xFFu);
    }
}

extern "C" __global__ void quantize_8bit_f32(const float* x, i64 n, int log2_bs, const float* mids,
                                             const u8* map, int n_mids, const float* offset,
                                             int has_offset, u8* q, float* absmax) {
    quantize_8bit<float>(x, n, log2_bs, mids, map, n_mids, offset, has_offset, q, absmax);
}
extern "C" __global__ void quantize_8bit_f16(const u16* x, i64 n, int log2_bs, const float* mids,
                                             const u8* map, int n_mids, const float* offset,
                                             int has_offset, u8* q, float* absmax) {
    quantize_8bit<u16>(x, n, log2_bs, mids, map, n_mids, offset, has_offset, q, absmax);
}

// ------------------------------------------------------------------------------------------
// Dequantize: one thread = UNROLL chunks of 4 codes (one 4-byte load each, issued first);
// output 8 bytes (float16) or 16 bytes (float32) per chunk, coalesced across the warp.
#ifndef UNROLL
#define UNROLL 4   // chunks per dequantize thread; the launcher's UNROLL must match
#endif

template <bool HALF, bool NESTED>
__device__ void dequantize_8bit(const u8* __restrict__ q, i64 n, const float* __restrict__ code_g,
                                const float* __restrict__ absmax, const u8* __restrict__ qabsmax,
                                const float* __restrict__ code2, const float* __restrict__ absmax2,
                                const float* __restrict__ offset, int log2_bs, int log2_bs2,
                                void* __restrict__ out) {
    __shared__ float tab[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) tab[i] = code_g[i];
    __syncthreads();

    const i64 base = (i64)blockIdx.x * blockDim.x * UNROLL + threadIdx.x;
    u32 word[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const i64 e0 = (base + (i64)u * blockDim.x) * 4;
        if (e0 + 4 <= n) {
            word[u] = __ldg(reinterpret_cast<const u32*>(q + e0));
        } else {
            u32 w = 0;
            for (int k = 0; k < 4; ++k) if (e0 + k < n) w |= (u32)q[e0 + k] << (8 * k);
            word[u] = w;
        }
    }
    const float off = NESTED ? __ldg(offset) : 0.0f;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const i64 e0 = (base + (i64)u * blockDim.x) * 4;
        if (e0 >= n) break;
        const i64 b = e0 >> log2_bs;
        const float a = block_absmax<NESTED>(b, absmax, qabsmax, code2, absmax2, off, log2_bs2);
        float v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) v[k] = flush(__fmul_rn(tab[(word[u] >> (8 * k)) & 0xFFu], a));
        if (e0 + 4 <= n) {
            if (HALF) *reinterpret_cast<uint2*>(static_cast<u16*>(out) + e0) =
                make_uint2(f2h(v[0]) | (f2h(v[1]) << 16), f2h(v[2]) | (f2h(v[3]) << 16));
            else *reinterpret_cast<float4*>(static_cast<float*>(out) + e0) = make_float4(v[0], v[1], v[2], v[3]);
        } else {
            for (int k = 0; k < 4; ++k) {
                if (e0 + k >= n) break;
                if (HALF) static_cast<u16*>(out)[e0 + k] = (u16)f2h(v[k]);
                else static_cast<float*>(out)[e0 + k] = v[k];
            }
        }
    }
}

#define DEQ8(NAME, HALF, NESTED)                                                                \
    extern "C" __global__ void NAME(const u8* q, i64 n, const float* code, const float* absmax, \
                                    const u8* qabsmax, const float* code2, const float* absmax2,\
                                    const float* offset, int log2_bs, int log2_bs2, void* out) {\
        dequantize_8bit<HALF, NESTED>(q, n, code, absmax, qabsmax, code2, absmax2, offset,      \
                                      log2_bs, log2_bs2, out);                                  \
    }
DEQ8(dequantize_8bit_f16, true, false)
DEQ8(dequantize_8bit_f32, false, false)
DEQ8(dequantize_8bit_f16_nested, true, true)
DEQ8(dequantize_8bit_f32_nested, false, true)

// ------------------------------------------------------------------------------------------
// Row-wise int8: one thread block per row of K values.
template <typename T>
__device__ void int8_rowwise(const T* __restrict__ x, i64 K, float threshold, int use_threshold,
                             signed char* __restrict__ q, float* __restrict__ stats) {
    __shared__ float smem_max[32];
    __shared__ float row_max;
    const T* row = x + (i64)blockIdx.x * K;
    signed char* qrow = q + (i64)blockIdx.x * K;
    float m = 0.0f;
    for (i64 j = threadIdx.x; j < K; j += blockDim.x) {
        const float v = to_f32(row[j]);
        if (!(use_threshold && fabsf(v) >= threshold)) m = fmaxf(m, fabsf(v));
    }
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) smem_max[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float r = smem_max[0];
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) r = fmaxf(r, smem_max[w]);
        row_max = r;
        stats[blockIdx.x] = r;
    }
    __syncthreads();
    m = row_max;
    const float scale = __fdiv_rn(127.0f, m == 0.0f ? 1.0f : m);
    for (i64 j = threadIdx.x; j < K; j += blockDim.x) {
        float v = to_f32(row[j]);
        if (use_threshold && fabsf(v) >= threshold) v = 0.0f;
        qrow[j] = (m == 0.0f) ? (signed char)0 : (signed char)(int)rintf(__fmul_rn(v, scale));
    }
}

extern "C" __global__ void int8_rowwise_f32(const float* x, i64 K, float threshold, int use_threshold,
                                            signed char* q, float* stats) {
    int8_rowwise<float>(x, K, threshold, use_threshold, q, stats);
}
extern "C" __global__ void int8_rowwise_f16(const u16* x, i64 K, float threshold, int use_threshold,
                                            signed char* q, float* stats) {
    int8_rowwise<u16>(x, K, threshold, use_threshold, q, stats);
}
