// One AdamW step (Loshchilov & Hutter 2019, Alg. 2, with Adam's bias correction, Kingma &
// Ba 2015, Alg. 1) over one parameter, in place on p, m and v:
//     p <- p (1 - lr wd)
//     m <- m + (1 - b1)(g - m);   v <- b2 v + (1 - b2) g g
//     p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// The NumPy twin is minipeft.optim.core.adamw_update: the scalars arrive rounded to
// float32 as NumPy rounds them, and every operation is rounded on its own in the twin's
// order (__fmul_rn etc.: no fused multiply-add), so the result is the twin's bit for bit.
// One read of p, g, m, v and one write of p, m, v per element (28 bytes) instead of the
// twin's ~10 separate passes.

typedef long long i64;

__device__ __forceinline__ void adamw_element(float* __restrict__ p, const float* __restrict__ g,
                                              float* __restrict__ m, float* __restrict__ v, i64 i,
                                              int decay, float keep, float one_minus_b1, float b2,
                                              float one_minus_b2, float bc2_sqrt, float eps, float step_size) {
    float pi = p[i];
    const float gi = g[i];
    float mi = m[i], vi = v[i];
    if (decay) pi = __fmul_rn(pi, keep);
    mi = __fadd_rn(mi, __fmul_rn(one_minus_b1, __fsub_rn(gi, mi)));
    vi = __fmul_rn(vi, b2);
    vi = __fadd_rn(vi, __fmul_rn(__fmul_rn(one_minus_b2, gi), gi));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
    pi = __fsub_rn(pi, __fmul_rn(step_size, __fdiv_rn(mi, denom)));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
}

extern "C" __global__ void adamw_update(float* __restrict__ p, const float* __restrict__ g,
                                        float* __restrict__ m, float* __restrict__ v, i64 n,
                                        int decay, float keep, float one_minus_b1, float b2,
                                        float one_minus_b2, float bc2_sqrt, float eps, float step_size) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        adamw_element(p, g, m, v, i, decay, keep, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, step_size);
}

// The same update with the step's scalars read from device memory, scalars = (keep, bc2_sqrt,
// step_size) as float32: a step recorded into a CUDA graph reads the values written before each
// replay (minipeft/capture.py) instead of the ones it was recorded with. Nothing changes when
// *skip is true (float16's loss scaler found an inf or nan gradient in this step).
extern "C" __global__ void adamw_update_from(float* __restrict__ p, const float* __restrict__ g,
                                             float* __restrict__ m, float* __restrict__ v, i64 n,
                                             int decay, float one_minus_b1, float b2, float one_minus_b2,
                                             float eps, const float* __restrict__ scalars,
                                             const bool* __restrict__ skip) {
    if (*skip) return;
    const float keep = scalars[0], bc2_sqrt = scalars[1], step_size = scalars[2];
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        adamw_element(p, g, m, v, i, decay, keep, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, step_size);
}
