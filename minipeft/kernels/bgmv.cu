// Many LoRA adapters in one batch: BGMV (decode) and SGMV (prefill), float32.
//
// Punica (Chen et al. 2023, arXiv 2310.18547), Sec. 4; semantics in
// shared/reference/peft-format.md section 8. Every op ADDS into y in place:
//     y[m, :] += scale[i] * (x[m, :] A[i]^T) B[i]^T,      i = the adapter slot of row m
// with the stacked, rank-padded layout of minipeft.serve:
//     A: (N, R, H1)  (peft's lora_A.weight, padded with zero rows up to R)
//     B: (N, H2, R)  (peft's lora_B.weight, padded with zero columns)
// A slot < 0 marks a base-model row: it is left untouched.
// The NumPy twins are minipeft.serve.bgmv_reference and minipeft.serve.sgmv_reference.
//
// bgmv_f32 (decode, one token per request): one block per row m. The row of x goes to
// shared memory; warp w computes v[r] = x . A[i, r, :] for r = w, w + W, ... (lanes stride
// over H1, warp-shuffle reduction); then thread t computes y[m, o] for o = t, t + T, ...
// from v and the row B[i, o, :]. Shrink and expand are fused: v never leaves the block.
//
// sgmv_shrink_f32 / sgmv_expand_f32 (prefill, rows grouped by adapter): the rows of one
// adapter are contiguous (segment s = rows indptr[s] .. indptr[s+1]); each block takes a
// tile of up to TM rows of one segment, so a tile of the adapter's weights read into shared
// memory serves TM rows (the point of SGMV over BGMV: weight reuse, a small GEMM per
// segment). Shrink: v (M, R) = x A^T in TK-wide slices of H1. Expand: y += s v B^T for a
// TO-wide slice of H2 per block (grid.y).

typedef long long i64;

#define TM 32      // rows per SGMV tile
#define TK 32      // input features per shrink step
#define TO 128     // output features per expand block
#define RMAX 64    // largest padded rank the SGMV kernels take (shared-memory tiles)

extern "C" __global__ void bgmv_f32(const float* __restrict__ x, const float* __restrict__ A,
                                    const float* __restrict__ B, const int* __restrict__ idx,
                                    const float* __restrict__ scales, float* __restrict__ y,
                                    int H1, int H2, int R) {
    extern __shared__ float smem[];               // xs[H1], then vs[R]
    const int m = blockIdx.x;
    const int slot = idx[m];
    if (slot < 0) return;                          // base-model row: y unchanged
    float* xs = smem;
    float* vs = smem + H1;
    const float* xm = x + (i64)m * H1;
    for (int i = threadIdx.x; i < H1; i += blockDim.x) xs[i] = xm[i];
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const float* As = A + (i64)slot * R * H1;
    for (int r = warp; r < R; r += nwarps) {       // shrink: v = x A_i^T
        const float* a = As + (i64)r * H1;
        float acc = 0.0f;
        for (int i = lane; i < H1; i += 32) acc += xs[i] * a[i];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) vs[r] = acc;
    }
    __syncthreads();
    const float s = scales[slot];
    const float* Bs = B + (i64)slot * H2 * R;
    float* ym = y + (i64)m * H2;
    for (int o = threadIdx.x; o < H2; o += blockDim.x) {   // expand: y += s v B_i^T
        const float* b = Bs + (i64)o * R;
        float acc = 0.0f;
        for (int r = 0; r < R; ++r) acc += vs[r] * b[r];
        ym[o] += s * acc;
    }
}

// Tile t covers rows row0[t] .. min(row0[t] + TM, indptr[seg[t] + 1]) of segment seg[t].
extern "C" __global__ void sgmv_shrink_f32(const float* __restrict__ x, const float* __restrict__ A,
                                           const int* __restrict__ tile_seg, const int* __restrict__ tile_row0,
                                           const int* __restrict__ indptr, const int* __restrict__ seg_slot,
                                           float* __restrict__ v, int H1, int R) {
    __shared__ float xs[TM][TK + 1];
    __shared__ float as[RMAX][TK + 1];
    const int t = blockIdx.x, seg = tile_seg[t], row0 = tile_row0[t];
    const int rows = min(TM, indptr[seg + 1] - row0);
    const int slot = seg_slot[seg];
    const float* As = A + (i64)slot * R * H1;
    const int tid = threadIdx.x, nt = blockDim.x;  // nt = 256: outputs p = tid + 256 j, j < 8
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
    for (int k0 = 0; k0 < H1; k0 += TK) {
        for (int e = tid; e < TM * TK; e += nt) {
            const int i = e / TK, k = e % TK;
            xs[i][k] = (i < rows && k0 + k < H1) ? x[(i64)(row0 + i) * H1 + k0 + k] : 0.0f;
        }
        for (int e = tid; e < R * TK; e += nt) {
            const int r = e / TK, k = e % TK;
            as[r][k] = (k0 + k < H1) ? As[(i64)r * H1 + k0 + k] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int p = tid + 256 * j;
            if (p < TM * R) {
                const int i = p / R, r = p % R;
                float a = acc[j];
#pragma unroll 8
                for (int k = 0; k < TK; ++k) a += xs[i][k] * as[r][k];
                acc[j] = a;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int p = tid + 256 * j;
        if (p < TM * R) {
            const int i = p / R, r = p % R;
            if (i < rows) v[(i64)(row0 + i) * R + r] = acc[j];
        }
    }
}

extern "C" __global__ void sgmv_expand_f32(const float* __restrict__ v, const float* __restrict__ B,
                                           const int* __restrict__ tile_seg, const int* __restrict__ tile_row0,
                                           const int* __restrict__ indptr, const int* __restrict__ seg_slot,
                                           const float* __restrict__ scales, float* __restrict__ y, int H2, int R) {
    __shared__ float vs[TM][RMAX + 1];
    __shared__ float bs[TO][RMAX + 1];
    const int t = blockIdx.x, o0 = blockIdx.y * TO;
    const int seg = tile_seg[t], row0 = tile_row0[t];
    const int rows = min(TM, indptr[seg + 1] - row0);
    const int slot = seg_slot[seg];
    const int tid = threadIdx.x, nt = blockDim.x;  // nt = 256 = 2 x TO
    for (int e = tid; e < TM * R; e += nt) {
        const int i = e / R, r = e % R;
        vs[i][r] = i < rows ? v[(i64)(row0 + i) * R + r] : 0.0f;
    }
    const float* Bs = B + (i64)slot * H2 * R;
    for (int e = tid; e < TO * R; e += nt) {       // B rows o0 .. o0 + TO: one contiguous run
        const int oo = e / R, r = e % R;
        bs[oo][r] = (o0 + oo < H2) ? Bs[(i64)(o0 + oo) * R + r] : 0.0f;
    }
    __syncthreads();
    const int oo = tid % TO, half = tid / TO, o = o0 + oo;
    if (o >= H2) return;
    const float s = scales[slot];
    for (int i = half; i < rows; i += nt / TO) {
        float acc = 0.0f;
        for (int r = 0; r < R; ++r) acc += vs[i][r] * bs[oo][r];
        y[(i64)(row0 + i) * H2 + o] += s * acc;
    }
}
