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

typedef long long i64;
typedef unsigned char u8;
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

extern "C" __global__ void __launch_bounds__(BLOCK) cross_entropy_forward(
        const float* __restrict__ logits, const i64* __restrict__ targets, i64 n_rows, int V,
        i64 ignore_index, float eps, float one_minus_eps, int smoothing,
        float* __restrict__ probs, float* __restrict__ nll_out, i64* __restrict__ safe_t,
        u8* __restrict__ valid) {
    __shared__ float shm[BLOCK / 32], shs[BLOCK / 32], sh[BLOCK / 32];
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    for (i64 row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const float* x = logits + row * V;
        float m = NEG_INF, s = 0.0f;
        for (int j = tid; j < V; j += BLOCK) {
            const float v = x[j];
            if (v > m) { s = s * expf(m - v) + 1.0f; m = v; }
            else { s += expf(v - m); }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            merge(m, s, m2, s2);
        }
        __syncthreads();
        if (lane == 0) { shm[w] = m; shs[w] = s; }
        __syncthreads();
        float M = shm[0], S = shs[0];
        for (int k = 1; k < BLOCK / 32; ++k) merge(M, S, shm[k], shs[k]);
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
