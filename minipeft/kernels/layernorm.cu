// Layer normalization over the last axis (Ba et al. 2016), forward and backward.
//     mu = mean x,  var = mean (x - mu)^2,  rstd = 1 / sqrt(var + eps),
//     xhat = (x - mu) rstd,  y = xhat w + b
// backward, with gxhat = g w:
//     dx = rstd (gxhat - mean(gxhat) - xhat mean(gxhat xhat)),  dw = sum_rows g xhat,  db = sum_rows g
// The NumPy twin is minipeft.functional.LayerNorm; like it, the forward writes xhat and
// rstd for the backward. One warp per row (C columns, lanes striding by 32: coalesced);
// a row is read from global memory once per pass, the repeats hit L1.
// The parameter gradients are column sums: layernorm_backward_params writes per-chunk
// partial sums (a block of 32 x 8 threads over 32 columns and a chunk of rows) that the
// launcher adds up, so the result is deterministic (no atomics).

#include "common.cuh"   // i64, u8, u16, warp_sum, warp_max, f2h, f2bf

// OUT16 = 0: y in float32; 1 / 2: y rounded once to float16 / bfloat16 (round to nearest even, common.cuh's
// f2h / f2bf), the float32 y of OUT16 = 0 to the bit: a layer norm whose consumer reads 16 bits anyway
// (minipeft.amp_layernorm), which saves the separate cast pass. xhat and rstd stay float32.
template <int OUT16>
__device__ void layernorm_forward_impl(const float* __restrict__ x, const float* __restrict__ w,
                                       const float* __restrict__ b, float eps, i64 n_rows, int C,
                                       void* __restrict__ y, float* __restrict__ xhat, float* __restrict__ rstd) {
    const i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const float* xr = x + row * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += xr[c];
    const float mu = warp_sum(s) / (float)C;
    float q = 0.0f;
    for (int c = lane; c < C; c += 32) { const float d = xr[c] - mu; q += d * d; }
    const float rs = 1.0f / sqrtf(warp_sum(q) / (float)C + eps);
    float* hr = xhat + row * C;
    for (int c = lane; c < C; c += 32) {
        const float h = (xr[c] - mu) * rs;
        hr[c] = h;
        const float v = h * w[c] + b[c];
        if (OUT16 == 0) static_cast<float*>(y)[row * C + c] = v;
        else static_cast<u16*>(y)[row * C + c] = (u16)(OUT16 == 2 ? f2bf(v) : f2h(v));
    }
    if (lane == 0) rstd[row] = rs;
}

#define LN_FORWARD(NAME, OUT16)                                                                      \
    extern "C" __global__ void NAME(const float* __restrict__ x, const float* __restrict__ w,        \
                                    const float* __restrict__ b, float eps, i64 n_rows, int C,       \
                                    void* __restrict__ y, float* __restrict__ xhat, float* __restrict__ rstd) { \
        layernorm_forward_impl<OUT16>(x, w, b, eps, n_rows, C, y, xhat, rstd);                      \
    }
LN_FORWARD(layernorm_forward, 0)
LN_FORWARD(layernorm_forward_f16, 1)
LN_FORWARD(layernorm_forward_bf16, 2)

extern "C" __global__ void layernorm_backward_x(const float* __restrict__ g, const float* __restrict__ xhat,
                                                const float* __restrict__ rstd, const float* __restrict__ w,
                                                i64 n_rows, int C, float* __restrict__ gx) {
    const i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const float* gr = g + row * C;
    const float* hr = xhat + row * C;
    float a = 0.0f, d = 0.0f;
    for (int c = lane; c < C; c += 32) {
        const float gh = gr[c] * w[c];
        a += gh;
        d += gh * hr[c];
    }
    const float mean_gh = warp_sum(a) / (float)C;
    const float mean_ghh = warp_sum(d) / (float)C;
    const float rs = rstd[row];
    float* out = gx + row * C;
    for (int c = lane; c < C; c += 32)   // the twin's roundings, no fused multiply-add: a constant row gives 0
        out[c] = __fmul_rn(rs, __fsub_rn(__fsub_rn(__fmul_rn(gr[c], w[c]), mean_gh), __fmul_rn(hr[c], mean_ghh)));
}

// grid (ceil(C / 32), n_chunks), block (32, 8); chunk k covers rows [k * rows_per_chunk, ...).
extern "C" __global__ void layernorm_backward_params(const float* __restrict__ g, const float* __restrict__ xhat,
                                                     i64 n_rows, int C, int rows_per_chunk,
                                                     float* __restrict__ part_w, float* __restrict__ part_b) {
    __shared__ float sw[8][33];
    __shared__ float sb[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int c = blockIdx.x * 32 + tx;
    const i64 r0 = (i64)blockIdx.y * rows_per_chunk;
    i64 r1 = r0 + rows_per_chunk;
    if (r1 > n_rows) r1 = n_rows;
    float aw = 0.0f, ab = 0.0f;
    if (c < C) {
        for (i64 r = r0 + ty; r < r1; r += 8) {
            const float gv = g[r * C + c];
            aw += gv * xhat[r * C + c];
            ab += gv;
        }
    }
    sw[ty][tx] = aw;
    sb[ty][tx] = ab;
    __syncthreads();
    if (ty == 0 && c < C) {
        float tw = 0.0f, tb = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) { tw += sw[k][tx]; tb += sb[k][tx]; }
        part_w[(i64)blockIdx.y * C + c] = tw;
        part_b[(i64)blockIdx.y * C + c] = tb;
    }
}
