// Device helpers shared by the kernels of this folder; a .cu file takes them with
//     #include "common.cuh"
// (NVRTC finds this file through -I, see _module.py). Each is the one copy of a piece that
// several kernels need: the integer names, float16 <-> float32 and float32 -> bfloat16 conversions, CUDA's
// flush-to-zero of subnormals, 8-element loads, warp reductions.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define FLT_TINY 1.17549435e-38f   // 2**-126, the smallest normal float32

__device__ __forceinline__ float flush(float x) {        // CUDA -ftz: subnormal -> +-0
    return fabsf(x) < FLT_TINY ? copysignf(0.0f, x) : x;
}
__device__ __forceinline__ float h2f(u16 h) {            // float16 bits -> float32 (exact)
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u32 f2h(float f) {            // float32 -> float16 bits, round to nearest even
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return (u32)h;
}
__device__ __forceinline__ u32 f2bf(float f) {           // float32 -> bfloat16 bits, round to nearest even
    const u32 u = __float_as_uint(f);                      // as minipeft.quant.floats.float32_to_bfloat16_bits:
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;   // NaN -> the quiet NaN
#if __CUDA_ARCH__ >= 800
    u16 b; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f)); return (u32)b;   // the hardware's rounding (sm_80+)
#else
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;         // one integer add on the bits (a carry bumps the exponent)
#endif
}
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(u16 x) { return h2f(x); }

// 8 elements from e0 (zeros past n): 16-byte loads when the 8 are all in range.
__device__ __forceinline__ void load8(const float* __restrict__ x, i64 e0, i64 n, float v[8]) {
    if (e0 + 8 <= n) {
        const float4 a = *reinterpret_cast<const float4*>(x + e0);
        const float4 b = *reinterpret_cast<const float4*>(x + e0 + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (e0 + k < n) ? x[e0 + k] : 0.0f;
    }
}
__device__ __forceinline__ void load8(const u16* __restrict__ x, i64 e0, i64 n, float v[8]) {
    if (e0 + 8 <= n) {
        const uint4 a = *reinterpret_cast<const uint4*>(x + e0);
        const u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) { v[2 * k] = h2f((u16)(w[k] & 0xFFFF)); v[2 * k + 1] = h2f((u16)(w[k] >> 16)); }
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (e0 + k < n) ? h2f(x[e0 + k]) : 0.0f;
    }
}

// Sum / max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wise quantizers: the absmax of one quantization block of B = 2**log2_bs values held
// by G = B/8 consecutive threads (8 values each), from each thread's own max m. Warp
// shuffles within the group, then shared memory (`smem`, 32 floats) when G > 32; called
// by every thread of the CUDA block (it may synchronize).
__device__ __forceinline__ float group_absmax(float m, int log2_bs, float* smem) {
    const int G = 1 << (log2_bs - 3);
    const int lanes = G < 32 ? G : 32;
    for (int o = 1; o < lanes; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (G > 32) {                                          // uniform over the thread block
        const int warp = threadIdx.x >> 5, per = G >> 5;
        if ((threadIdx.x & 31) == 0) smem[warp] = m;
        __syncthreads();
        const int first = warp & ~(per - 1);
        m = smem[first];
        for (int w = 1; w < per; ++w) m = fmaxf(m, smem[first + w]);
    }
    return m;
}

// Dequantizers: the absmax of block b, as the twin flushes it. Double quantization keeps it
// as a uint8 code q2 of (absmax - offset) in blocks of 2**log2_bs2:
//     absmax^ = code2[q2[b]] * absmax2[b >> log2_bs2] + offset.
// nested_absmax is that formula given the code's value c2 = code2[q2[b]], wherever the caller keeps code2;
// nested_absmax_of is the same given also a2 = absmax2[b >> log2_bs2], for a caller that loaded it ahead.
__device__ __forceinline__ float nested_absmax_of(float c2, float a2, float offset) {
    const float d2 = flush(__fmul_rn(c2, flush(a2)));
    return flush(__fadd_rn(d2, offset));                   // the twin flushes the absmax it scales by
}
__device__ __forceinline__ float nested_absmax(float c2, i64 b, const float* __restrict__ absmax2, float offset,
                                               int log2_bs2) {
    return nested_absmax_of(c2, __ldg(absmax2 + (b >> log2_bs2)), offset);
}
template <bool NESTED>
__device__ __forceinline__ float block_absmax(i64 b, const float* __restrict__ absmax,
                                              const u8* __restrict__ qabsmax, const float* __restrict__ code2,
                                              const float* __restrict__ absmax2, float offset, int log2_bs2) {
    if (NESTED) return nested_absmax(__ldg(code2 + __ldg(qabsmax + b)), b, absmax2, offset, log2_bs2);
    return flush(__ldg(absmax + b));
}
