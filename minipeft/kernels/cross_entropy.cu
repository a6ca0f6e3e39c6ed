// Mean cross-entropy over rows of logits (N, V) with ignore_index and label smoothing
// (Szegedy et al. 2016, Sec. 7), forward and backward.
// forward, per row: M = max x, lse = log sum exp(x - M), logp = (x - M) - lse,
//     probs = exp(logp) (saved for backward),
//     nll = -logp[t]   or, with smoothing eps,  (1 - eps) (-logp[t]) - eps mean(logp),
//     out[row] = nll * valid  (valid: t != ignore_index; t is replaced by 0 where invalid)
// backward: grad = (probs - (1 - eps) onehot(t) - eps / V) * (valid ? g / max(count, 1) : 0)
// g (the upstream gradient of the scalar loss) and count (valid rows) are read on the
// device, so neither direction waits for the host. The NumPy twin is
// minipeft.functional.CrossEntropy. One block per row, a grid-stride loop over rows;
// the forward keeps a running (max, sum) per thread (one pass over the row), merges the
// pairs across the block, then a second pass writes probs. The twin makes ~6 passes over
// the (N, V) logits forward and ~4 backward.
//
// cross_entropy16_*: the same loss of float16 / bfloat16 logits with float32 statistics (under
// amp.autocast the LM head writes 16-bit logits; minipeft.kernels.amp_cross_entropy is the twin and
// states the math). Rows are ld elements apart (the LM head's are aligned(V): its padded GEMM's rows,
// cut to V columns by a view). Nothing of size (N, V) is made forward:
// forward, one pass per row: M, S = sum exp(x - M) (online) and sum x (for smoothing);
//     lse = M + log S (saved, float32), nll = lse - x[t]  or  (1 - eps)(lse - x[t]) - eps (sum x / V - lse)
// backward, one pass: grad = (exp(x - lse) - (1 - eps) onehot(t) - eps / V) * (valid ? g / max(count, 1) : 0),
//     rounded to the logits' dtype and written in rows of ldg = aligned(V) values, zeros past V: the
//     layout AmpLinear's backward GEMMs multiply (minipeft.amp.to_compute_padded takes it as it is).
// Each thread takes 8 consecutive values at a time: one 16-byte load where all 8 are in the row and
// the rows are 16-byte aligned (vec), else one by one.
#include "common.cuh"   // u8 u16 u32 i64, h2f, f2h, f2bf

#define NEG_INF (-__int_as_float(0x7f800000))
#define BLOCK 256

__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {   // (m, s): sum exp(x - m)
    if (m2 > m) { s = s * expf(m - m2) + s2; m = m2; }
    else if (m2 != NEG_INF) { s += s2 * expf(m2 - m); }
}

__device__ __forceinline__ float block_sum(float v, float* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float t = 0.0f;
    for (int k = 0; k < BLOCK / 32; ++k) t += sh[k];
    return t;
}

// The block's threads' running (m, s) pairs merged into the row's (M, S), returned in m and s of every thread.
__device__ __forceinline__ void block_merge(float& m, float& s, float* shm, float* shs) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
    }
    const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) { shm[w] = m; shs[w] = s; }
    __syncthreads();
    m = shm[0]; s = shs[0];
    for (int k = 1; k < BLOCK / 32; ++k) merge(m, s, shm[k], shs[k]);
}

extern "C" __global__ void __launch_bounds__(BLOCK) cross_entropy_forward(
        const float* __restrict__ logits, const i64* __restrict__ targets, i64 n_rows, int V,
        i64 ignore_index, float eps, float one_minus_eps, int smoothing,
        float* __restrict__ probs, float* __restrict__ nll_out, i64* __restrict__ safe_t,
        u8* __restrict__ valid) {
    __shared__ float shm[BLOCK / 32], shs[BLOCK / 32], sh[BLOCK / 32];
    const int tid = threadIdx.x;
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const float* x = logits + row * V;
        float m = NEG_INF, s = 0.0f;
        for (int j = tid; j < V; j += BLOCK) {
            const float v = x[j];
            if (v > m) { s = s * expf(m - v) + 1.0f; m = v; }
            else { s += expf(v - m); }
        }
        block_merge(m, s, shm, shs);                            // the row's (M, S) in every thread
        const float M = m, S = s;
        const float lse = logf(S);
        float* pr = probs + row * V;
        float acc = 0.0f;
        for (int j = tid; j < V; j += BLOCK) {
            const float lp = (x[j] - M) - lse;
            pr[j] = expf(lp);
            acc += lp;
        }
        if (smoothing) acc = block_sum(acc, sh);
        if (tid == 0) {
            const i64 t = targets[row];
            const bool ok = t != ignore_index;
            const i64 st = ok ? t : 0;
            float nll = (st >= 0 && st < V) ? -((x[st] - M) - lse) : __int_as_float(0x7fc00000);
            if (smoothing) nll = one_minus_eps * nll - eps * (acc / (float)V);
            nll_out[row] = nll * (ok ? 1.0f : 0.0f);
            safe_t[row] = st;
            valid[row] = ok ? 1 : 0;
        }
    }
}

extern "C" __global__ void __launch_bounds__(BLOCK) cross_entropy_backward(
        const float* __restrict__ probs, const i64* __restrict__ safe_t, const u8* __restrict__ valid,
        const float* __restrict__ g, const i64* __restrict__ count, i64 n_rows, int V,
        float one_minus_eps, float eps_over_v, int smoothing, float* __restrict__ grad) {
    const i64 c = *count;
    const float factor_valid = g[0] / (float)(c > 1 ? c : 1);
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const float f = valid[row] ? factor_valid : 0.0f;
        const i64 t = safe_t[row];
        const float* pr = probs + row * V;
        float* gr = grad + row * V;
        for (int j = threadIdx.x; j < V; j += BLOCK) {
            float v = pr[j];
            if (j == t) v = v - one_minus_eps;
            if (smoothing) v = v - eps_over_v;
            gr[j] = v * f;
        }
    }
}

// ---------------------------------------------------------------- 16-bit logits, float32 statistics

template <bool BF>
__device__ __forceinline__ float from16(u16 h) { return BF ? __uint_as_float((u32)h << 16) : h2f(h); }   // exact
template <bool BF>
__device__ __forceinline__ u32 to16(float v) { return BF ? f2bf(v) : f2h(v); }   // round to nearest even

// x[j0 .. j0 + 8) widened to float32; values at or past V are 0 (callers mask them).
template <bool BF>
__device__ __forceinline__ void load8_16(const u16* __restrict__ x, int j0, int V, int vec, float v[8]) {
    if (vec && j0 + 8 <= V) {
        const uint4 a = *reinterpret_cast<const uint4*>(x + j0);
        const u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            v[2 * k] = from16<BF>((u16)(w[k] & 0xFFFFu));
            v[2 * k + 1] = from16<BF>((u16)(w[k] >> 16));
        }
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (j0 + k < V) ? from16<BF>(x[j0 + k]) : 0.0f;
    }
}

template <bool BF>
__device__ void ce16_forward(const u16* __restrict__ logits, i64 ld, const i64* __restrict__ targets, i64 n_rows,
                             int V, i64 ignore_index, float eps, float one_minus_eps, int smoothing, int vec,
                             float* __restrict__ lse_out, float* __restrict__ nll_out, i64* __restrict__ safe_t,
                             u8* __restrict__ valid) {
    __shared__ float shm[BLOCK / 32], shs[BLOCK / 32], sh[BLOCK / 32];
    const int tid = threadIdx.x;
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const u16* x = logits + row * ld;
        float m = NEG_INF, s = 0.0f, sx = 0.0f;                  // running max, sum exp(x - m), sum x
        for (int j0 = 8 * tid; j0 < V; j0 += 8 * BLOCK) {
            float v[8];
            load8_16<BF>(x, j0, V, vec, v);
            float cm = NEG_INF;
#pragma unroll
            for (int k = 0; k < 8; ++k) if (j0 + k < V) cm = fmaxf(cm, v[k]);
            if (cm > m) { s *= expf(m - cm); m = cm; }
#pragma unroll
            for (int k = 0; k < 8; ++k) if (j0 + k < V) { s += expf(v[k] - m); sx += v[k]; }
        }
        block_merge(m, s, shm, shs);                            // the row's (M, S) in every thread
        const float M = m, S = s;
        const float lse = M + logf(S);
        if (smoothing) sx = block_sum(sx, sh);
        if (tid == 0) {
            const i64 t = targets[row];
            const bool ok = t != ignore_index;
            const i64 st = ok ? t : 0;
            float nll = (st >= 0 && st < V) ? lse - from16<BF>(x[st]) : __int_as_float(0x7fc00000);
            if (smoothing) nll = one_minus_eps * nll - eps * (sx / (float)V - lse);
            lse_out[row] = lse;
            nll_out[row] = nll * (ok ? 1.0f : 0.0f);
            safe_t[row] = st;
            valid[row] = ok ? 1 : 0;
        }
    }
}

template <bool BF>
__device__ void ce16_backward(const u16* __restrict__ logits, i64 ld, const float* __restrict__ lse,
                              const i64* __restrict__ safe_t, const u8* __restrict__ valid, const float* __restrict__ g,
                              const i64* __restrict__ count, i64 n_rows, int V, int ldg, float one_minus_eps,
                              float eps_over_v, int smoothing, int vec, u16* __restrict__ grad) {
    const i64 c = *count;
    const float factor_valid = g[0] / (float)(c > 1 ? c : 1);
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const float f = valid[row] ? factor_valid : 0.0f;
        const i64 t = safe_t[row];
        const float L = lse[row];
        const u16* x = logits + row * ld;
        u16* gr = grad + row * (i64)ldg;
        for (int j0 = 8 * threadIdx.x; j0 < ldg; j0 += 8 * BLOCK) {   // ldg is a multiple of 8: whole 16-byte stores
            float v[8];
            load8_16<BF>(x, j0, V, vec, v);
            u32 h[8];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const int j = j0 + k;
                float d = 0.0f;                                          // the padding past V: zeros
                if (j < V) {
                    d = expf(v[k] - L);                                  // p, recomputed
                    if (j == t) d = d - one_minus_eps;
                    if (smoothing) d = d - eps_over_v;
                    d = d * f;
                }
                h[k] = to16<BF>(d);
            }
            *reinterpret_cast<uint4*>(gr + j0) = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16),
                                                            h[4] | (h[5] << 16), h[6] | (h[7] << 16));
        }
    }
}

#define CE16_FORWARD_ARGS const u16* __restrict__ logits, i64 ld, const i64* __restrict__ targets, i64 n_rows, int V, \
    i64 ignore_index, float eps, float one_minus_eps, int smoothing, int vec, float* __restrict__ lse, \
    float* __restrict__ nll, i64* __restrict__ safe_t, u8* __restrict__ valid
#define CE16_FORWARD_PASS logits, ld, targets, n_rows, V, ignore_index, eps, one_minus_eps, smoothing, vec, lse, nll, \
    safe_t, valid
#define CE16_BACKWARD_ARGS const u16* __restrict__ logits, i64 ld, const float* __restrict__ lse, \
    const i64* __restrict__ safe_t, const u8* __restrict__ valid, const float* __restrict__ g, \
    const i64* __restrict__ count, i64 n_rows, int V, int ldg, float one_minus_eps, float eps_over_v, int smoothing, \
    int vec, u16* __restrict__ grad
#define CE16_BACKWARD_PASS logits, ld, lse, safe_t, valid, g, count, n_rows, V, ldg, one_minus_eps, eps_over_v, \
    smoothing, vec, grad

extern "C" __global__ void __launch_bounds__(BLOCK) cross_entropy16_forward_f16(CE16_FORWARD_ARGS) {
    ce16_forward<false>(CE16_FORWARD_PASS);
}
extern "C" __global__ void __launch_bounds__(BLOCK) cross_entropy16_forward_bf16(CE16_FORWARD_ARGS) {
    ce16_forward<true>(CE16_FORWARD_PASS);
}
extern "C" __global__ void __launch_bounds__(BLOCK) cross_entropy16_backward_f16(CE16_BACKWARD_ARGS) {
    ce16_backward<false>(CE16_BACKWARD_PASS);
}
extern "C" __global__ void __launch_bounds__(BLOCK) cross_entropy16_backward_bf16(CE16_BACKWARD_ARGS) {
    ce16_backward<true>(CE16_BACKWARD_PASS);
}
