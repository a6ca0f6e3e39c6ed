// GELU, tanh form as GPT-2 uses it (Hendrycks & Gimpel 2016, Sec. 2):
//     u = sqrt(2/pi) * (x + 0.044715 x^3),   y = 0.5 x (1 + tanh u)
//     dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t = tanh u
// The NumPy twin is minipeft.functional.GELU; the products are written in its order.
// One read and one write per element forward (two reads, one write backward) instead of
// the ~8 (~15) full passes the twin's separate array operations make.
// Grid-stride loops; consecutive threads on consecutive elements (coalesced).

typedef long long i64;
#define GELU_C 0.7978845608028654f   // sqrt(2/pi), float32 as the twin's weak Python scalar
#define GELU_A 0.044715f

extern "C" __global__ void gelu_forward(const float* __restrict__ x, float* __restrict__ y, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float v = x[i];
        const float u = GELU_C * (v + GELU_A * v * v * v);
        y[i] = 0.5f * v * (1.0f + tanhf(u));
    }
}

extern "C" __global__ void gelu_backward(const float* __restrict__ x, const float* __restrict__ g,
                                         float* __restrict__ gx, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float v = x[i];
        const float u = GELU_C * (v + GELU_A * v * v * v);
        const float t = tanhf(u);
        const float du = GELU_C * (1.0f + 3.0f * GELU_A * v * v);
        gx[i] = g[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du);
    }
}
