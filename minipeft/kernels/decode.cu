// One greedy decode step of GPT-2 (Radford et al. 2019) for B <= 8 rows, float32, written so
// that the whole step can be captured once into a CUDA graph and replayed per token (CUDA C++
// Programming Guide, "CUDA Graphs"). What a graph freezes and what it does not:
//   * every kernel argument (pointers, sizes, eps) is frozen at capture: the kernels write
//     into buffers allocated before the capture, never allocate;
//   * what changes per token lives in device memory and is read and advanced by the kernels
//     themselves: tok[b] (the token to run), pos[b] (its position), slot[0] (the cache slot
//     of this step), step[0] (the column of out that receives the next token).
// The NumPy twin is minipeft.decoding.graph_step (the ``Reference`` ops, the same buffers);
// tests/test_graph_decode.py and tests/test_graph_serve.py check that they agree.
//
// The step, per token (x is the residual stream, (B, C)):
//     embed:  x = wte[tok] + wpe[pos]
//     each block:  h = ln_1(x); qkv = h Wa^T + ba; att = attention(qkv, cache); x += att Wp^T + bp
//                  h = ln_2(x); f = gelu(h Wf^T + bf); x += f Wm^T + bm
//     h = ln_f(x); logits = h wte^T; tok = argmax(logits); then advance pos, slot, step.
// A served Linear of the multi-adapter server (minipeft.serve_graph) adds each row's own LoRA
// term: lora_shrink (u = A_j x, j = the row's adapter slot, read from device memory) and then
// gemv_lora_rows (y = epilogue(x W^T + b + s_j u B_j^T)), Punica's BGMV in two launches.
// Every product is a thin GEMV (B rows): memory-bound on the weight, so one warp per output
// feature reads its weight row once (16-byte loads) for all B rows at once.

#include "common.cuh"   // i64, warp_sum, warp_max

#define NEG_INF (-__int_as_float(0x7f800000))   // -inf
#define MAX_ROWS 8                       // B <= 8: the GEMV keeps one accumulator per row in registers
#define GELU_C 0.7978845608028654f       // sqrt(2/pi)
#define GELU_A 0.044715f
#define EPILOGUE_NONE 0                  // y = x W^T + b
#define EPILOGUE_GELU 1                  // y = gelu(x W^T + b)   (GPT-2's "gelu_new", tanh form)
#define EPILOGUE_RESIDUAL 2              // y = resid + x W^T + b (resid may be y itself)

// Sum / max over the whole thread block (blockDim.x a multiple of 32); every thread gets the
// result. `red` is 32 floats of shared memory; the leading barrier lets a block call these
// twice in a row (the second call must not overwrite `red` while the first is being read).
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return warp_sum(lane < nw ? red[lane] : 0.0f);
}
__device__ __forceinline__ float block_max(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return warp_max(lane < nw ? red[lane] : NEG_INF);
}

// x[b, :] = wte[tok[b], :] + wpe[pos[b], :]        grid-stride over the B*C outputs
extern "C" __global__ void embed(const int* __restrict__ tok, const int* __restrict__ pos,
                                 const float* __restrict__ wte, const float* __restrict__ wpe,
                                 float* __restrict__ x, int B, int C) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < B * C; e += gridDim.x * blockDim.x) {
        const int b = e / C, c = e - b * C;
        x[e] = wte[(i64)tok[b] * C + c] + wpe[(i64)pos[b] * C + c];
    }
}

// Layer norm (Ba et al. 2016) of each row of x (B, C): one block per row, two passes in float32.
//     mean = sum x / C,  var = sum (x - mean)^2 / C,  y = (x - mean) / sqrt(var + eps) * gamma + beta
extern "C" __global__ void layernorm_rows(const float* __restrict__ x, const float* __restrict__ gamma,
                                          const float* __restrict__ beta, float* __restrict__ y, int C, float eps) {
    __shared__ float red[32];
    const float* xr = x + (i64)blockIdx.x * C;
    float* yr = y + (i64)blockIdx.x * C;
    float s = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) s += xr[c];
    const float mean = block_sum(s, red) / (float)C;
    float q = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) { const float d = xr[c] - mean; q += d * d; }
    const float rstd = 1.0f / sqrtf(block_sum(q, red) / (float)C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) yr[c] = (xr[c] - mean) * rstd * gamma[c] + beta[c];
}

// y[b, o] = epilogue(sum_i x[b, i] W[o, i] + bias[o]) for b < nb <= MAX_ROWS.
// W is (n_out, n_in) row-major (minipeft's Linear.weight; the LM head passes wte). One warp per
// output o (blockDim.x / 32 of them per block); lane l reads W[o, 4l .. 4l+3], then 128 further
// on (one 512-byte coalesced read per warp), and the same four inputs of every row. The B sums
// stay in registers (the loops over b unroll, so acc[] is never indexed at run time) and are
// reduced across the warp by shuffles; lane 0 writes the B results.
// resid and y may be the same buffer (the residual stream): each element is read, then written,
// by the same thread, so they are not __restrict__.
//
// LORA (gemv_lora_rows): each row b also gets its own adapter's LoRA term (Hu et al. 2021, eq. 3;
// Punica's BGMV expand, Chen et al. 2023, Sec. 4), added BEFORE the epilogue, as
// minipeft.serve_layers.MultiLoraLinear adds it to the base Linear's output:
//     y[b, o] = epilogue((sum_i x[b, i] W[o, i] + bias[o]) + scales[j] * sum_r LB[j, o, r] u[b, r])
// with j = slot[b] (j < 0: no adapter, no term), LB the stack (N, n_out, R) and u (nb, R) the
// shrink u[b] = A[j] x[b] (lora_shrink, launched just before). Lanes stride over r (before the
// main loop, so the loads overlap it); the sum is reduced apart from the base sum, so the base
// sum rounds as in the plain kernel. LORA is a template argument: the plain kernel (gemv_rows)
// compiles without any of it.
template <bool LORA>
__device__ __forceinline__ void gemv_body(const float* __restrict__ x, const float* __restrict__ W,
                                          const float* __restrict__ bias, const float* resid, float* y,
                                          int nb, int n_in, int n_out, int has_bias, int epilogue,
                                          const float* __restrict__ u, const float* __restrict__ LB,
                                          const float* __restrict__ scales, const int* __restrict__ slot, int R) {
    const int lane = threadIdx.x & 31;
    const int o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (o >= n_out) return;                                    // a whole warp leaves together
    const float* w = W + (i64)o * n_in;
    float acc[MAX_ROWS];
#pragma unroll
    for (int b = 0; b < MAX_ROWS; ++b) acc[b] = 0.0f;
    float lora[MAX_ROWS];                                      // each lane's part of the LoRA sums (LORA only)
    int js[MAX_ROWS];                                          // each row's slot (LORA only)
    if (LORA) {                                                // first, so these loads overlap the main loop's
#pragma unroll
        for (int b = 0; b < MAX_ROWS; ++b) {
            js[b] = b < nb ? __ldg(slot + b) : -1;             // the same in every lane
            lora[b] = 0.0f;
            if (js[b] >= 0) {
                const float* lb = LB + ((i64)js[b] * n_out + o) * R;   // LB[j, o, :], R floats
                const float* ub = u + (i64)b * R;
                for (int r = lane; r < R; r += 32) lora[b] += __ldg(lb + r) * __ldg(ub + r);
            }
        }
    }
    const bool vec = (n_in & 3) == 0 && ((unsigned long long)W & 15) == 0 && ((unsigned long long)x & 15) == 0;
    if (vec) {                                                 // 16-byte loads
        const int n4 = n_in >> 2;
        const float4* w4 = reinterpret_cast<const float4*>(w);
        const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll 4
        for (int i = lane; i < n4; i += 32) {
            const float4 a = __ldg(w4 + i);
#pragma unroll
            for (int b = 0; b < MAX_ROWS; ++b) {
                if (b < nb) {
                    const float4 v = __ldg(x4 + (i64)b * n4 + i);
                    acc[b] += a.x * v.x + a.y * v.y + a.z * v.z + a.w * v.w;
                }
            }
        }
    } else {                                                   // any n_in: one float at a time
        for (int i = lane; i < n_in; i += 32) {
            const float a = __ldg(w + i);
#pragma unroll
            for (int b = 0; b < MAX_ROWS; ++b)
                if (b < nb) acc[b] += a * __ldg(x + (i64)b * n_in + i);
        }
    }
#pragma unroll
    for (int b = 0; b < MAX_ROWS; ++b)
        if (b < nb) acc[b] = warp_sum(acc[b]);                 // nb is the same in every lane
    if (LORA) {
#pragma unroll
        for (int b = 0; b < MAX_ROWS; ++b)
            if (js[b] >= 0) lora[b] = warp_sum(lora[b]);       // js[b] is the same in every lane
    }
    if (lane != 0) return;
    const float bo = has_bias ? bias[o] : 0.0f;
#pragma unroll
    for (int b = 0; b < MAX_ROWS; ++b) {
        if (b < nb) {
            float v = acc[b] + bo;
            if (LORA && js[b] >= 0) v += __ldg(scales + js[b]) * lora[b];
            if (epilogue == EPILOGUE_GELU) v = 0.5f * v * (1.0f + tanhf(GELU_C * (v + GELU_A * v * v * v)));
            else if (epilogue == EPILOGUE_RESIDUAL) v += resid[(i64)b * n_out + o];
            y[(i64)b * n_out + o] = v;
        }
    }
}

extern "C" __global__ void gemv_rows(const float* __restrict__ x, const float* __restrict__ W,
                                     const float* __restrict__ bias, const float* resid, float* y,
                                     int nb, int n_in, int n_out, int has_bias, int epilogue) {
    gemv_body<false>(x, W, bias, resid, y, nb, n_in, n_out, has_bias, epilogue, nullptr, nullptr, nullptr, nullptr, 0);
}

extern "C" __global__ void gemv_lora_rows(const float* __restrict__ x, const float* __restrict__ W,
                                          const float* __restrict__ bias, const float* resid, float* y,
                                          int nb, int n_in, int n_out, int has_bias, int epilogue,
                                          const float* __restrict__ u, const float* __restrict__ LB,
                                          const float* __restrict__ scales, const int* __restrict__ slot, int R) {
    gemv_body<true>(x, W, bias, resid, y, nb, n_in, n_out, has_bias, epilogue, u, LB, scales, slot, R);
}

// LoRA's shrink for every row (Punica's BGMV shrink): u[b, r] = sum_i A[j, r, i] x[b, i] with
// j = slot[b], A the stack (N, R, n_in); u[b, :] = 0 where j < 0 (a base-model row). One warp per
// (b, r): g = global warp id, b = g / R, r = g % R; lanes stride over i (16-byte loads when
// aligned), then a shuffle reduction; lane 0 writes.
extern "C" __global__ void lora_shrink(const float* __restrict__ x, const float* __restrict__ A,
                                       const int* __restrict__ slot, float* __restrict__ u,
                                       int nb, int n_in, int R) {
    const int lane = threadIdx.x & 31;
    const int g = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (g >= nb * R) return;                                   // a whole warp leaves together
    const int b = g / R, r = g - (g / R) * R;
    const int j = slot[b];                                     // the same in every lane of the warp
    float acc = 0.0f;
    if (j >= 0) {
        const float* a = A + ((i64)j * R + r) * n_in;          // A[j, r, :]
        const float* xb = x + (i64)b * n_in;
        if ((n_in & 3) == 0 && ((unsigned long long)A & 15) == 0 && ((unsigned long long)x & 15) == 0) {
            const float4* a4 = reinterpret_cast<const float4*>(a);
            const float4* x4 = reinterpret_cast<const float4*>(xb);
#pragma unroll 4
            for (int i = lane; i < (n_in >> 2); i += 32) {
                const float4 p = __ldg(a4 + i), q = __ldg(x4 + i);
                acc += p.x * q.x + p.y * q.y + p.z * q.z + p.w * q.w;
            }
        } else {
            for (int i = lane; i < n_in; i += 32) acc += __ldg(a + i) * __ldg(xb + i);
        }
        acc = warp_sum(acc);
    }
    if (lane == 0) u[(i64)b * R + r] = acc;
}

// Attention of one new token per row over its key/value cache; one block per (row b, head h).
// qkv (B, 3C) is c_attn's output in GPT-2's order: q = qkv[:, :C], k = qkv[:, C:2C],
// v = qkv[:, 2C:], head h = columns h*D .. (h+1)*D. The cache kc, vc is (B, H, S, D).
//   1. write this token's k and v into cache slot s = slot[0];
//   2. scores[j] = q . k_j / sqrt(D) for j <= s (one warp per key, lanes over D), -inf where the
//      row's kept[b, j] == 0 (left padding); slot s itself is always kept (the advance kernel
//      marks it in kept for the later steps);
//   3. softmax with the max subtracted, in float32; out[b, h*D + d] = sum_j p_j v_j[d] / sum_j p_j.
// Dynamic shared memory: q (D floats), then the scores (S floats).
extern "C" __global__ void attend(const float* __restrict__ qkv, float* kc, float* vc,
                                  const int* __restrict__ kept, const int* __restrict__ slot_p,
                                  float* __restrict__ out, int H, int D, int S, float scale) {
    extern __shared__ float smem[];
    __shared__ float red[32];
    float* q = smem;
    float* p = smem + D;
    const int b = blockIdx.x / H, h = blockIdx.x - (blockIdx.x / H) * H;
    const int C = H * D;
    const int s = slot_p[0];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* row = qkv + (i64)b * 3 * C + h * D;
    float* kb = kc + (i64)(b * H + h) * S * D;                 // this (row, head)'s cache, (S, D)
    float* vb = vc + (i64)(b * H + h) * S * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        q[d] = row[d];
        kb[(i64)s * D + d] = row[C + d];
        vb[(i64)s * D + d] = row[2 * C + d];
    }
    __syncthreads();                                           // q and the new k, v visible to the block
    for (int j = warp; j <= s; j += nw) {
        const float* kj = kb + (i64)j * D;
        float acc = 0.0f;
        for (int d = lane; d < D; d += 32) acc += q[d] * kj[d];
        acc = warp_sum(acc);
        if (lane == 0) p[j] = (j == s || kept[(i64)b * S + j] != 0) ? acc * scale : NEG_INF;
    }
    __syncthreads();
    float m = NEG_INF;
    for (int j = threadIdx.x; j <= s; j += blockDim.x) m = fmaxf(m, p[j]);
    m = block_max(m, red);                                     // finite: slot s is always kept
    float z = 0.0f;
    for (int j = threadIdx.x; j <= s; j += blockDim.x) {
        const float e = expf(p[j] - m);                        // exp(-inf) = 0 for excluded keys
        p[j] = e;
        z += e;
    }
    z = block_sum(z, red);                                     // its barriers also publish p[]
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j <= s; ++j) acc += p[j] * vb[(i64)j * D + d];
        out[(i64)b * C + h * D + d] = acc / z;
    }
}

// NumPy's argmax order: the larger value wins, the first NaN counts as the largest, ties go to
// the smaller index.
__device__ __forceinline__ bool ahead(float v, int i, float bv, int bi) {
    const bool vn = v != v, bn = bv != bv;       // NaN
    if (vn || bn) return vn && (!bn || i < bi);
    return v > bv || (v == bv && i < bi);
}

// tok[b] = argmax_v logits[b, v]; out[b, step[0]] = tok[b]. One block per row.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int V, int* __restrict__ tok,
                                       int* __restrict__ out, int out_cols, const int* __restrict__ step) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int b = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* row = logits + (i64)b * V;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = row[i];
        if (ahead(v, i, bv, bi)) { bv = v; bi = i; }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (ahead(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    if (warp != 0) return;
    bv = lane < nw ? sv[lane] : NEG_INF;
    bi = lane < nw ? si[lane] : 0x7fffffff;
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (ahead(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) {
        tok[b] = bi;
        out[(i64)b * out_cols + step[0]] = bi;
    }
}

// The last kernel of the step, after every reader of the counters: the slot just written is
// kept from now on, and every row moves one position on. One thread (B <= 8).
extern "C" __global__ void advance(int* pos, int* slot, int* step, int* kept, int B, int S) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const int s = slot[0];
    for (int b = 0; b < B; ++b) {
        pos[b] += 1;
        kept[(i64)b * S + s] = 1;
    }
    slot[0] = s + 1;
    step[0] += 1;
}
