// LoRA family: the gated low-rank update of KSTYLE.md and plain LoRA, forward and backward.
//
//   g[b, k] = a[b] * scale * w_down[b, k] * w_up[b, k]     (plain LoRA: null gates, g = scale)
//   z = h A^T            (B*S, r)   h (B, S, Din), A (r, Din)
//   out = base + (z * g) B^T         (B*S, Dout), B (Dout, r)
//
// r <= 64. Forward is one kernel: a block takes 32 rows (tokens), builds their rank-r codes z in
// shared memory from Din-chunks of h and A, gates them, then streams Dout-chunks of B to write the
// output rows. The rank-r intermediate never touches global memory (except an optional f32 copy
// of z saved for backward). `base` may alias `out` (in-place add onto the frozen layer's output).
//
// Backward: lora_gated_bwd (du = d_out B, d_h = (du * g) A, one pass over d_out), lora_outer_bwd
// (d_A and d_B as split-row outer products into f32 partials, finished by reduce_colsum_fwd_f32)
// and lora_gates_bwd (d_w_down, d_w_up, d_a from sum_s du * z).
#include "common.cuh"

#define LR_ROWS 32     // rows per block: A/B are re-read from L2 once per 32 rows of h
#define LR_CH 64       // Din / Dout chunk staged in shared memory
#define LR_THREADS 256 // block size every lora kernel assumes
#define LR_MAXR 64
#define LR_PER_THREAD (LR_ROWS * LR_MAXR / LR_THREADS) // 8 rank-space outputs per thread
#define LR_PAD (LR_CH + 1)                             // +1 word per row: conflict-free columns

template <typename T>
__device__ __forceinline__ float lora_gate(const T* w_down, const T* w_up, const T* a, float scale, int b, int k, int r) {
    float g = scale;
    if (a) g *= ld(a, b);
    if (w_down) g *= ld(w_down, (i64)b * r + k);
    if (w_up) g *= ld(w_up, (i64)b * r + k);
    return g;
}

// acc[c] for output o = tid + 256 c (row = o / r, k = o % r) gets sum_j X[row0 + row, j] * M(k, j)
// with M(k, j) = M[k * mk + j * mj]. X is (rows_total, K) contiguous.
template <typename T>
__device__ __forceinline__ void rank_project(const T* __restrict__ X, i64 row0, int nrows, int K, const T* __restrict__ M,
                                             i64 mk, i64 mj, int r, float (*xs)[LR_PAD], float (*ms)[LR_PAD],
                                             float (&acc)[LR_PER_THREAD]) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int c = 0; c < LR_PER_THREAD; ++c) acc[c] = 0.0f;
    for (int j0 = 0; j0 < K; j0 += LR_CH) {
        const int w = min(LR_CH, K - j0);
        for (int idx = tid; idx < LR_ROWS * LR_CH; idx += LR_THREADS) {
            const int row = idx / LR_CH, j = idx % LR_CH;
            xs[row][j] = (row < nrows && j < w) ? ld(X, (row0 + row) * K + j0 + j) : 0.0f;
        }
        for (int idx = tid; idx < r * LR_CH; idx += LR_THREADS) {
            const int k = idx / LR_CH, j = idx % LR_CH;
            ms[k][j] = j < w ? ld(M, k * mk + (i64)(j0 + j) * mj) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < LR_PER_THREAD; ++c) {
            const int o = tid + LR_THREADS * c;
            if (o < LR_ROWS * r) {
                const int row = o / r, k = o % r;
                float s = acc[c];
#pragma unroll 16
                for (int j = 0; j < LR_CH; ++j) s = fmaf(xs[row][j], ms[k][j], s);
                acc[c] = s;
            }
        }
        __syncthreads();
    }
}

// Y[row0 + row, o] = (base ? base[...] : 0) + sum_k zs[row][k] * N(o, k), N(o, k) = N[o * no + k * nk],
// for o < Dout. `base` may alias `Y`; each element is read and written by the same thread.
template <typename T>
__device__ __forceinline__ void rank_expand(const float (*zs)[LR_MAXR + 1], i64 row0, int nrows, const T* __restrict__ N,
                                            i64 no, i64 nk, int r, int Dout, const T* base, T* Y,
                                            float (*ns)[LR_MAXR + 1]) {
    const int tid = threadIdx.x;
    for (int o0 = 0; o0 < Dout; o0 += LR_CH) {
        const int w = min(LR_CH, Dout - o0);
        for (int idx = tid; idx < LR_CH * r; idx += LR_THREADS) {
            const int oo = idx / r, k = idx % r;
            ns[oo][k] = oo < w ? ld(N, (i64)(o0 + oo) * no + k * nk) : 0.0f;
        }
        __syncthreads();
        for (int idx = tid; idx < LR_ROWS * LR_CH; idx += LR_THREADS) {
            const int row = idx / LR_CH, oo = idx % LR_CH;
            if (row < nrows && oo < w) {
                float s = 0.0f;
                for (int k = 0; k < r; ++k) s = fmaf(zs[row][k], ns[oo][k], s);
                const i64 i = (row0 + row) * Dout + o0 + oo;
                st(Y, i, base ? ld(base, i) + s : s);
            }
        }
        __syncthreads();
    }
}

// Grid ceil(B*S / 32), block 256.
template <typename T>
__device__ __forceinline__ void lora_fwd(const T* h, const T* A, const T* Bm, const T* w_down, const T* w_up,
                                         const T* a, const T* base, T* out, float* z_save, int S, int Din,
                                         int Dout, int r, float scale, i64 rows) {
    __shared__ float xs[LR_ROWS][LR_PAD];
    __shared__ float zs[LR_ROWS][LR_MAXR + 1];
    __shared__ float buf[LR_CH * (LR_MAXR + 1)]; // M chunk in projection, N chunk in expansion
    float(*ms)[LR_PAD] = reinterpret_cast<float(*)[LR_PAD]>(buf);
    float(*ns)[LR_MAXR + 1] = reinterpret_cast<float(*)[LR_MAXR + 1]>(buf);
    const i64 row0 = (i64)blockIdx.x * LR_ROWS;
    const int nrows = (int)min((i64)LR_ROWS, rows - row0);
    float acc[LR_PER_THREAD];
    rank_project(h, row0, nrows, Din, A, Din, 1, r, xs, ms, acc);
#pragma unroll
    for (int c = 0; c < LR_PER_THREAD; ++c) {
        const int o = threadIdx.x + LR_THREADS * c;
        if (o < LR_ROWS * r) {
            const int row = o / r, k = o % r;
            if (row < nrows) {
                const int b = (int)((row0 + row) / S);
                if (z_save) z_save[(row0 + row) * r + k] = acc[c];
                zs[row][k] = acc[c] * lora_gate(w_down, w_up, a, scale, b, k, r);
            } else {
                zs[row][k] = 0.0f;
            }
        }
    }
    __syncthreads();
    rank_expand(zs, row0, nrows, Bm, r, 1, r, Dout, base, out, ns);
}

// du = d_out B (saved, f32, ungated) and d_h = (du * g) A, added onto `d_h_base` when given
// (pass the base layer's d_h, possibly the same buffer as d_h). Grid ceil(B*S / 32), block 256.
template <typename T>
__device__ __forceinline__ void lora_bwd(const T* d_out, const T* A, const T* Bm, const T* w_down, const T* w_up,
                                         const T* a, const T* d_h_base, T* d_h, float* du_save, int S, int Din,
                                         int Dout, int r, float scale, i64 rows) {
    __shared__ float xs[LR_ROWS][LR_PAD];
    __shared__ float zs[LR_ROWS][LR_MAXR + 1];
    __shared__ float buf[LR_CH * (LR_MAXR + 1)];
    float(*ms)[LR_PAD] = reinterpret_cast<float(*)[LR_PAD]>(buf);
    float(*ns)[LR_MAXR + 1] = reinterpret_cast<float(*)[LR_MAXR + 1]>(buf);
    const i64 row0 = (i64)blockIdx.x * LR_ROWS;
    const int nrows = (int)min((i64)LR_ROWS, rows - row0);
    float acc[LR_PER_THREAD];
    // M(k, j) = B[j, k]: j walks Dout.
    rank_project(d_out, row0, nrows, Dout, Bm, 1, r, r, xs, ms, acc);
#pragma unroll
    for (int c = 0; c < LR_PER_THREAD; ++c) {
        const int o = threadIdx.x + LR_THREADS * c;
        if (o < LR_ROWS * r) {
            const int row = o / r, k = o % r;
            if (row < nrows) {
                const int b = (int)((row0 + row) / S);
                if (du_save) du_save[(row0 + row) * r + k] = acc[c];
                zs[row][k] = acc[c] * lora_gate(w_down, w_up, a, scale, b, k, r);
            } else {
                zs[row][k] = 0.0f;
            }
        }
    }
    __syncthreads();
    // N(i, k) = A[k, i]: i walks Din.
    if (d_h) rank_expand(zs, row0, nrows, A, 1, Din, r, Din, d_h_base, d_h, ns);
}

// partial[split] = sum over rows in the split of (L[row, k] * g[b, k]) * R[row, i], written as
// (r, D) or, with transpose_out, (D, r). L f32 (rows, r), R (rows, D). Grid (ceil(D / 64), splits),
// block 256: thread owns column i = tid % 64 and ranks k = tid / 64 + 4 c.
// d_A: L = du, R = h, (r, Din).  d_B: L = z, R = d_out, transpose_out -> (Dout, r).
template <typename T>
__device__ __forceinline__ void lora_outer(const float* __restrict__ L, const T* __restrict__ R, const T* w_down,
                                           const T* w_up, const T* a, float* __restrict__ partial, int S, int D,
                                           int r, float scale, i64 rows, int rows_per_split, int transpose_out) {
    __shared__ float rs[LR_ROWS][LR_CH];
    __shared__ float ls[LR_ROWS][LR_MAXR + 1];
    const int tid = threadIdx.x, col = tid % LR_CH, kg = tid / LR_CH;
    const int i0 = blockIdx.x * LR_CH;
    const i64 s0 = (i64)blockIdx.y * rows_per_split, s1 = min(rows, s0 + rows_per_split);
    float acc[LR_MAXR / 4];
#pragma unroll
    for (int c = 0; c < LR_MAXR / 4; ++c) acc[c] = 0.0f;
    for (i64 t0 = s0; t0 < s1; t0 += LR_ROWS) {
        const int n = (int)min((i64)LR_ROWS, s1 - t0);
        for (int idx = tid; idx < LR_ROWS * LR_CH; idx += LR_THREADS) {
            const int row = idx / LR_CH, j = idx % LR_CH;
            rs[row][j] = (row < n && i0 + j < D) ? ld(R, (t0 + row) * D + i0 + j) : 0.0f;
        }
        for (int idx = tid; idx < LR_ROWS * r; idx += LR_THREADS) {
            const int row = idx / r, k = idx % r;
            ls[row][k] = row < n ? L[(t0 + row) * r + k] * lora_gate(w_down, w_up, a, scale, (int)((t0 + row) / S), k, r)
                                 : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < LR_MAXR / 4; ++c) {
            const int k = kg + 4 * c;
            if (k < r) {
                float s = acc[c];
                for (int row = 0; row < LR_ROWS; ++row) s = fmaf(ls[row][k], rs[row][col], s);
                acc[c] = s;
            }
        }
        __syncthreads();
    }
    const int i = i0 + col;
    if (i >= D) return;
    float* p = partial + (i64)blockIdx.y * r * D;
#pragma unroll
    for (int c = 0; c < LR_MAXR / 4; ++c) {
        const int k = kg + 4 * c;
        if (k < r) p[transpose_out ? (i64)i * r + k : (i64)k * D + i] = acc[c];
    }
}

// dg[b, k] = sum_s du[b, s, k] z[b, s, k]; g = a scale wd wu, so
// d_wd = dg a scale wu, d_wu = dg a scale wd, d_a = sum_k dg scale wd wu. Grid B, block 256.
template <typename T>
__device__ __forceinline__ void lora_gates(const float* __restrict__ du, const float* __restrict__ z, const T* w_down,
                                           const T* w_up, const T* a, T* d_w_down, T* d_w_up, T* d_a, int S, int r,
                                           float scale) {
    __shared__ float scratch[32];
    const int b = blockIdx.x;
    float da = 0.0f;
    for (int k = 0; k < r; ++k) {
        float s = 0.0f;
        for (int t = threadIdx.x; t < S; t += blockDim.x) {
            const i64 i = ((i64)b * S + t) * r + k;
            s = fmaf(du[i], z[i], s);
        }
        const float dg = block_sum(s, scratch);
        const float av = a ? ld(a, b) : 1.0f;
        const float wd = w_down ? ld(w_down, (i64)b * r + k) : 1.0f;
        const float wu = w_up ? ld(w_up, (i64)b * r + k) : 1.0f;
        if (threadIdx.x == 0) {
            if (d_w_down) st(d_w_down, (i64)b * r + k, dg * av * scale * wu);
            if (d_w_up) st(d_w_up, (i64)b * r + k, dg * av * scale * wd);
        }
        da += dg * scale * wd * wu;
    }
    if (threadIdx.x == 0 && d_a) st(d_a, b, da);
}

#define KS_LORA(T, tn)                                                                                     \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lora_gated_fwd_##tn(                          \
        const T* h, const T* A, const T* B, const T* w_down, const T* w_up, const T* a, const T* base,    \
        T* out, float* z_save, int S, int Din, int Dout, int r, float scale, i64 rows) {                   \
        lora_fwd<T>(h, A, B, w_down, w_up, a, base, out, z_save, S, Din, Dout, r, scale, rows);            \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lora_gated_bwd_##tn(                          \
        const T* d_out, const T* A, const T* B, const T* w_down, const T* w_up, const T* a,                \
        const T* d_h_base, T* d_h, float* du_save, int S, int Din, int Dout, int r, float scale, i64 rows) { \
        lora_bwd<T>(d_out, A, B, w_down, w_up, a, d_h_base, d_h, du_save, S, Din, Dout, r, scale, rows);   \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lora_outer_bwd_##tn(                          \
        const float* L, const T* R, const T* w_down, const T* w_up, const T* a, float* partial, int S,     \
        int D, int r, float scale, i64 rows, int rows_per_split, int transpose_out) {                      \
        lora_outer<T>(L, R, w_down, w_up, a, partial, S, D, r, scale, rows, rows_per_split, transpose_out); \
    }                                                                                                     \
    extern "C" __global__ void lora_gates_bwd_##tn(const float* du, const float* z, const T* w_down,       \
                                                   const T* w_up, const T* a, T* d_w_down, T* d_w_up,     \
                                                   T* d_a, int S, int r, float scale) {                   \
        lora_gates<T>(du, z, w_down, w_up, a, d_w_down, d_w_up, d_a, S, r, scale);                        \
    }

KS_LORA(float, f32)
KS_LORA(bf16, bf16)
KS_LORA(f16, f16)
