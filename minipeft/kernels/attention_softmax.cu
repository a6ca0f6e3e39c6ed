// The softmax of scaled dot-product attention (Vaswani et al. 2017, eq. 1), in place on
// the score tensor s = q k^T of shape (B, H, Tq, Tk), forward and backward.
// forward:  p[j] = exp(a[j] - max a) / sum_j exp(a[j] - max a),
//           a[j] = scale * s[j] where key j is allowed, else -FLT_MAX (the twin's finfo.min)
//           allowed: causal rule j <= (Tk - Tq) + i for query i, and key_mask[b, j] != 0
//           (a row with no allowed key comes out uniform, exactly as the twin's).
// backward: ds[j] = scale * p[j] (dp[j] - sum_k dp[k] p[k]), in place on dp = g v^T,
//           so that dq = ds k and dk = ds^T q need no further scaling.
// The NumPy twin is minipeft.functional.Attention. One warp per row; three passes over the
// row forward (max, sum, write), two backward, the repeats served from L1. The twin's
// scale, where, max, subtract, exp, sum and divide are seven full passes over s.

#include "common.cuh"   // i64, u8, warp_sum, warp_max
#define NEG_MAX (-3.402823466e38f)

extern "C" __global__ void attn_softmax_forward(float* __restrict__ s, i64 n_rows, int Tq, int Tk, int H,
                                                float scale, int causal, const u8* __restrict__ key_mask,
                                                int has_mask) {
    const i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const int i = (int)(row % Tq);
    const i64 b = row / ((i64)H * Tq);
    const int limit = causal ? (Tk - Tq) + i : Tk - 1;               // allowed: j <= limit
    const u8* km = key_mask + b * Tk;
    float* r = s + row * Tk;
    float m = NEG_MAX;
    for (int j = lane; j < Tk; j += 32) {
        const bool ok = j <= limit && (!has_mask || km[j]);
        m = fmaxf(m, ok ? r[j] * scale : NEG_MAX);
    }
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < Tk; j += 32) {
        const bool ok = j <= limit && (!has_mask || km[j]);
        sum += expf((ok ? r[j] * scale : NEG_MAX) - m);
    }
    sum = warp_sum(sum);
    for (int j = lane; j < Tk; j += 32) {
        const bool ok = j <= limit && (!has_mask || km[j]);
        r[j] = expf((ok ? r[j] * scale : NEG_MAX) - m) / sum;
    }
}

extern "C" __global__ void attn_softmax_backward(const float* __restrict__ p, float* __restrict__ dp,
                                                 i64 n_rows, int Tk, float scale) {
    const i64 row = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_rows) return;
    const float* pr = p + row * Tk;
    float* dr = dp + row * Tk;
    float dot = 0.0f;
    for (int j = lane; j < Tk; j += 32) dot += dr[j] * pr[j];
    dot = warp_sum(dot);
    for (int j = lane; j < Tk; j += 32) dr[j] = pr[j] * (dr[j] - dot) * scale;
}
