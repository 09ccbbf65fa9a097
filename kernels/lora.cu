// LoRA family: the gated low-rank update of KSTYLE.md and plain LoRA, forward and backward.
//
//   g[b, k] = a[b] * scale * w_down[b, k] * w_up[b, k]     (plain LoRA: null gates, g = scale)
//   z = h A^T            (B*S, r)   h (B, S, Din), A (r, Din)
//   out = base + (z * g) B^T         (B*S, Dout), B (Dout, r)
//
// r <= 64. The rank-r projections z = h A^T and du = d_out B are cuBLAS GEMMs with f32 output
// (src/backend/cuda/lora.rs); the codes stay in f32 from there on. lora_expand_fwd gates them and
// expands back to full width in one pass, adding onto `base` (which may alias the output):
// out = base + (z * g) B^T in the forward, d_h = (du * g) A in the backward.
//
// Backward: lora_outer_bwd (d_A and d_B as split-row outer products into f32 partials, finished by
// reduce_colsum_fwd_f32) and lora_gates_bwd (d_w_down, d_w_up, d_a from sum_s du * z).
#include "common.cuh"

#define LR_ROWS 32     // rows per tile of the outer products
#define LR_CH 64       // columns per block of the outer products
#define LR_THREADS 256 // block size every lora kernel assumes
#define LR_MAXR 64

template <typename T>
__device__ __forceinline__ float lora_gate(const T* w_down, const T* w_up, const T* a, float scale, int b, int k, int r) {
    float g = scale;
    if (a) g *= ld(a, b);
    if (w_down) g *= ld(w_down, (i64)b * r + k);
    if (w_up) g *= ld(w_up, (i64)b * r + k);
    return g;
}

// 8 consecutive elements at p (16-byte aligned) as floats, and back: one or two 16-byte
// accesses per lane instead of eight 2-byte ones 16 bytes apart.
template <typename T> __device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
    constexpr int W = (int)sizeof(T) / 2; // 16-byte words in 8 elements
    uint4 raw[W];
#pragma unroll
    for (int w = 0; w < W; ++w) raw[w] = reinterpret_cast<const uint4*>(p)[w];
    const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = to_f32(e[j]);
}
template <typename T> __device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
    constexpr int W = (int)sizeof(T) / 2;
    uint4 raw[W];
    T* e = reinterpret_cast<T*>(raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) e[j] = from_f32<T>(v[j]);
#pragma unroll
    for (int w = 0; w < W; ++w) reinterpret_cast<uint4*>(p)[w] = raw[w];
}

// Y[row, o] = (base ? base[row, o] : 0) + sum_k L[row, k] g[b, k] N(o, k) for o < D, where
// N(o, k) = N[o * no + k * nk], L f32 (rows, r), b = row / S. Each thread owns 8 consecutive
// outputs of one row (grid-stride over rows * ceil(D / 8) such chunks), sums its k in ascending
// order from 0 with f32 fused multiply-adds, and rounds once after adding base. `base` may alias
// Y: each element is read and written by the same thread. When D % 8 == 0 and Y and base are
// 16-byte aligned, base and Y move as whole 16-byte vectors (the SDXL widths all qualify).
//   forward:  L = z,  N = B (no = r, nk = 1),   D = Dout, base = the frozen layer's output
//   backward: L = du, N = A (no = 1, nk = Din), D = Din,  no base
template <typename T>
__device__ __forceinline__ void lora_expand(const float* __restrict__ L, const T* __restrict__ N, i64 no, i64 nk,
                                            const T* w_down, const T* w_up, const T* a, const T* base, T* Y, int S,
                                            int D, int r, float scale, i64 rows) {
    const i64 nch = (D + 7) / 8;
    const bool vec = D % 8 == 0 && ((unsigned long long)Y | (unsigned long long)base) % 16 == 0;
    KS_GRID_STRIDE(c, rows * nch) {
        const i64 row = c / nch;
        const int o0 = (int)(c - row * nch) * 8;
        const int b = (int)(row / S);
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
        for (int k = 0; k < r; ++k) {
            const float lk = L[row * r + k] * lora_gate(w_down, w_up, a, scale, b, k, r);
#pragma unroll
            for (int j = 0; j < 8; ++j)
                if (o0 + j < D) acc[j] = fmaf(lk, ld(N, (i64)(o0 + j) * no + k * nk), acc[j]);
        }
        const i64 i0 = row * D + o0;
        if (vec) {
            float v[8];
            if (base) {
                load8(base + i0, v);
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] += acc[j];
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) v[j] = acc[j];
            }
            store8(Y + i0, v);
            continue;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (o0 + j < D) st(Y, i0 + j, base ? ld(base, i0 + j) + acc[j] : acc[j]);
        }
    }
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
    extern "C" __global__ void __launch_bounds__(LR_THREADS) lora_expand_fwd_##tn(                         \
        const float* L, const T* N, i64 no, i64 nk, const T* w_down, const T* w_up, const T* a,            \
        const T* base, T* Y, int S, int D, int r, float scale, i64 rows) {                                 \
        lora_expand<T>(L, N, no, nk, w_down, w_up, a, base, Y, S, D, r, scale, rows);                      \
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
