// float32 -> float16 / bfloat16, round to nearest even: the operands of mixed precision's 16-bit
// products (Micikevicius et al. 2018, Sec. 3; minipeft.amp.cast_16bit is the twin: CuPy's astype
// and a zero-padded copy). Bits as common.cuh's f2h / f2bf (bfloat16 NaN -> the quiet NaN 0x7FC0).
//
// cast_flat_*: n contiguous values, 4 per thread (one 16-byte load, one 8-byte store) where the
//   pointers allow it, then the tail one by one.
// cast_pad_*:  x (rows, cols) into y (rows_p, cols_p), zeros outside x (rows_p >= rows, cols_p >=
//   cols): a weight's rows padded to a multiple of 8 (a GEMM's tensor-core shapes) or a gradient's
//   columns. One CUDA block per row (grid-stride over rows), threads along the row: coalesced.
// cast_strided_*: a strided view of up to 4 axes (d0, d1, d2, d3), strides in elements (such as
//   attention's q, k, v: (B, H, T, D) views of c_attn's (B, T, 3C) output), into a C-contiguous
//   array: thread i writes y[i] from x at the offset of i's 4-D index (reads coalesced along d3).
#include "common.cuh"

template <bool BF>
__device__ __forceinline__ u32 to16(float v) { return BF ? f2bf(v) : f2h(v); }

template <bool BF>
__device__ void cast_flat(const float* __restrict__ x, u16* __restrict__ y, i64 n, int vec) {
    const i64 stride = (i64)gridDim.x * blockDim.x, t = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    const i64 n4 = vec ? n / 4 : 0;
    for (i64 i = t; i < n4; i += stride) {
        const float4 v = reinterpret_cast<const float4*>(x)[i];
        reinterpret_cast<uint2*>(y)[i] = make_uint2(to16<BF>(v.x) | (to16<BF>(v.y) << 16),
                                                    to16<BF>(v.z) | (to16<BF>(v.w) << 16));
    }
    for (i64 i = 4 * n4 + t; i < n; i += stride) y[i] = (u16)to16<BF>(x[i]);
}

template <bool BF>
__device__ void cast_pad(const float* __restrict__ x, u16* __restrict__ y, i64 rows, i64 cols, i64 rows_p,
                         i64 cols_p) {
    for (i64 r = blockIdx.x; r < rows_p; r += gridDim.x) {
        u16* yr = y + r * cols_p;
        if (r < rows) {
            const float* xr = x + r * cols;
            for (i64 c = threadIdx.x; c < cols_p; c += blockDim.x) yr[c] = (u16)(c < cols ? to16<BF>(xr[c]) : 0u);
        } else {
            for (i64 c = threadIdx.x; c < cols_p; c += blockDim.x) yr[c] = 0;
        }
    }
}

template <bool BF>
__device__ void cast_strided(const float* __restrict__ x, u16* __restrict__ y, i64 n, i64 d1, i64 d2, i64 d3,
                             i64 s0, i64 s1, i64 s2, i64 s3) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i;
        const i64 i3 = r % d3; r /= d3;
        const i64 i2 = r % d2; r /= d2;
        const i64 i1 = r % d1; r /= d1;                      // r is now i0
        y[i] = (u16)to16<BF>(x[r * s0 + i1 * s1 + i2 * s2 + i3 * s3]);
    }
}

extern "C" __global__ void cast_flat_f16(const float* __restrict__ x, u16* __restrict__ y, i64 n, int vec) {
    cast_flat<false>(x, y, n, vec);
}
extern "C" __global__ void cast_flat_bf16(const float* __restrict__ x, u16* __restrict__ y, i64 n, int vec) {
    cast_flat<true>(x, y, n, vec);
}
extern "C" __global__ void cast_pad_f16(const float* __restrict__ x, u16* __restrict__ y, i64 rows, i64 cols,
                                        i64 rows_p, i64 cols_p) {
    cast_pad<false>(x, y, rows, cols, rows_p, cols_p);
}
extern "C" __global__ void cast_pad_bf16(const float* __restrict__ x, u16* __restrict__ y, i64 rows, i64 cols,
                                         i64 rows_p, i64 cols_p) {
    cast_pad<true>(x, y, rows, cols, rows_p, cols_p);
}
extern "C" __global__ void cast_strided_f16(const float* __restrict__ x, u16* __restrict__ y, i64 n, i64 d1,
                                            i64 d2, i64 d3, i64 s0, i64 s1, i64 s2, i64 s3) {
    cast_strided<false>(x, y, n, d1, d2, d3, s0, s1, s2, s3);
}
extern "C" __global__ void cast_strided_bf16(const float* __restrict__ x, u16* __restrict__ y, i64 n, i64 d1,
                                             i64 d2, i64 d3, i64 s0, i64 s1, i64 s2, i64 s3) {
    cast_strided<true>(x, y, n, d1, d2, d3, s0, s1, s2, s3);
}
