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
// Dequantize: one thread = UNROLL chunks of 4 packed bytes (8 values), the UNROLL loads
// issued before any use; each chunk is one 4-byte load and one 16-byte store (float16) or
// two (float32), consecutive threads on consecutive chunks so every access is coalesced.

#include "common.cuh"   // u8 u16 u32 i64, flush, h2f, f2h, load8, group_absmax, block_absmax

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
#ifndef UNROLL
#define UNROLL 4   // chunks per dequantize thread; the launcher's UNROLL must match
#endif

template <bool HALF, bool NESTED>
__device__ void dequantize_4bit(const u8* __restrict__ packed, i64 n, const float* __restrict__ decode,
                                const float* __restrict__ absmax, const u8* __restrict__ qabsmax,
                                const float* __restrict__ code2, const float* __restrict__ absmax2,
                                const float* __restrict__ offset, int log2_bs, int log2_bs2,
                                void* __restrict__ out) {
    __shared__ float tab[16];
    if (threadIdx.x < 16) tab[threadIdx.x] = decode[threadIdx.x];
    __syncthreads();

    const i64 nbytes = (n + 1) >> 1;
    const i64 base = (i64)blockIdx.x * blockDim.x * UNROLL + threadIdx.x;
    u32 word[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {                     // all loads first
        const i64 c = base + (i64)u * blockDim.x, j0 = c * 4;
        if (j0 + 4 <= nbytes) {
            word[u] = __ldg(reinterpret_cast<const u32*>(packed + j0));
        } else {
            u32 w = 0;
            for (int k = 0; k < 4; ++k) if (j0 + k < nbytes) w |= (u32)packed[j0 + k] << (8 * k);
            word[u] = w;
        }
    }
    const float off = NESTED ? __ldg(offset) : 0.0f;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const i64 c = base + (i64)u * blockDim.x, e0 = c * 8;
        if (e0 >= n) break;
        const i64 b = e0 >> log2_bs;                       // the 8 values share one block (B >= 32)
        const float a = block_absmax<NESTED>(b, absmax, qabsmax, code2, absmax2, off, log2_bs2);
        float v[8];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const u32 byte = (word[u] >> (8 * k)) & 0xFFu;
            v[2 * k] = flush(__fmul_rn(tab[byte >> 4], a));
            v[2 * k + 1] = flush(__fmul_rn(tab[byte & 0xFu], a));
        }
        if (e0 + 8 <= n) {
            if (HALF) {
                uint4 o;
                o.x = f2h(v[0]) | (f2h(v[1]) << 16); o.y = f2h(v[2]) | (f2h(v[3]) << 16);
                o.z = f2h(v[4]) | (f2h(v[5]) << 16); o.w = f2h(v[6]) | (f2h(v[7]) << 16);
                *reinterpret_cast<uint4*>(static_cast<u16*>(out) + e0) = o;
            } else {
                float4* o = reinterpret_cast<float4*>(static_cast<float*>(out) + e0);
                o[0] = make_float4(v[0], v[1], v[2], v[3]);
                o[1] = make_float4(v[4], v[5], v[6], v[7]);
            }
        } else {
            for (int k = 0; k < 8; ++k) {
                if (e0 + k >= n) break;
                if (HALF) static_cast<u16*>(out)[e0 + k] = (u16)f2h(v[k]);
                else static_cast<float*>(out)[e0 + k] = v[k];
            }
        }
    }
}

#define DEQ4(NAME, HALF, NESTED)                                                                  \
    extern "C" __global__ void NAME(const u8* packed, i64 n, const float* decode,                 \
                                    const float* absmax, const u8* qabsmax, const float* code2,   \
                                    const float* absmax2, const float* offset, int log2_bs,       \
                                    int log2_bs2, void* out) {                                    \
        dequantize_4bit<HALF, NESTED>(packed, n, decode, absmax, qabsmax, code2, absmax2, offset, \
                                      log2_bs, log2_bs2, out);                                    \
    }
DEQ4(dequantize_4bit_f16, true, false)
DEQ4(dequantize_4bit_f32, false, false)
DEQ4(dequantize_4bit_f16_nested, true, true)
DEQ4(dequantize_4bit_f32_nested, false, true)
