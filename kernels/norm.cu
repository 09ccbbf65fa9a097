// Norm family: layer norm over the last dim and group norm over NCHW (optionally fused with SiLU),
// forward and backward. Statistics are saved in f32 (mean, rstd) for the backward pass.
//
// Parameter gradients never use atomics: kernels write per-chunk partial sums laid out
// (chunks, 2, C) = [sum dy | sum dy*xhat], and reduce_colsum_fwd_f32 folds the chunks, giving
// [dbeta (C) | dgamma (C)] contiguous in one f32 buffer. Same inputs, same bits, every run.
#include "common.cuh"

// ---- layer norm --------------------------------------------------------------------------------
// One block per row. Two passes over the row (mean, then centred variance): the second read hits
// L1/L2 (rows are <= 8 KB here) and avoids the E[x^2] - E[x]^2 cancellation.
template <typename T>
__device__ __forceinline__ void layernorm_fwd(const T* __restrict__ x, const T* __restrict__ gamma,
                                              const T* __restrict__ beta, T* __restrict__ y,
                                              float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                              int n, float eps) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * n;
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) s += ld(x, base + j);
    const float mean = block_sum(s, scratch) / n;
    float v = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float d = ld(x, base + j) - mean;
        v += d * d;
    }
    const float rstd = rsqrtf(block_sum(v, scratch) / n + eps);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float h = (ld(x, base + j) - mean) * rstd;
        float g = gamma ? ld(gamma, j) : 1.0f, b = beta ? ld(beta, j) : 0.0f;
        st(y, base + j, fmaf(h, g, b));
    }
    if (threadIdx.x == 0) {
        if (mean_out) mean_out[blockIdx.x] = mean;
        if (rstd_out) rstd_out[blockIdx.x] = rstd;
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma. One block per row.
template <typename T>
__device__ __forceinline__ void layernorm_bwd(const T* __restrict__ x, const T* __restrict__ gamma,
                                              const T* __restrict__ dy, const float* __restrict__ mean,
                                              const float* __restrict__ rstd, T* __restrict__ dx, int n) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * n;
    const float mu = mean[blockIdx.x], rs = rstd[blockIdx.x];
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float g = ld(dy, base + j) * (gamma ? ld(gamma, j) : 1.0f);
        s1 += g;
        s2 += g * (ld(x, base + j) - mu) * rs;
    }
    const float c1 = block_sum(s1, scratch) / n;
    const float c2 = block_sum(s2, scratch) / n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float g = ld(dy, base + j) * (gamma ? ld(gamma, j) : 1.0f);
        float h = (ld(x, base + j) - mu) * rs;
        st(dx, base + j, rs * (g - c1 - h * c2));
    }
}

// Block (32, 8), grid (ceil(n / 32), chunks): chunk k covers rows [k * rows_per_chunk, ...).
template <typename T>
__device__ __forceinline__ void layernorm_params_bwd(const T* __restrict__ x, const T* __restrict__ dy,
                                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                                     float* __restrict__ partial, int rows, int n, int rows_per_chunk) {
    __shared__ float pb[8][33], pg[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min(rows, r0 + rows_per_chunk);
    float sb = 0.0f, sg = 0.0f;
    if (c < n)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            float d = ld(dy, (i64)r * n + c);
            sb += d;
            sg += d * (ld(x, (i64)r * n + c) - mean[r]) * rstd[r];
        }
    pb[threadIdx.y][threadIdx.x] = sb;
    pg[threadIdx.y][threadIdx.x] = sg;
    __syncthreads();
    if (threadIdx.y == 0 && c < n) {
        float tb = 0.0f, tg = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            tb += pb[k][threadIdx.x];
            tg += pg[k][threadIdx.x];
        }
        partial[(i64)blockIdx.y * 2 * n + c] = tb;
        partial[(i64)blockIdx.y * 2 * n + n + c] = tg;
    }
}

// ---- group norm (NCHW) ---------------------------------------------------------------------------
// Statistics are gathered per (n, c) plane by a (C, N) grid and merged per group by the apply
// kernel. A block per (n, group) would give SDXL only N * 32 = 64 blocks for 132 SMs; per-plane
// blocks give N * C >= 640. Each plane uses sums shifted by its first element (the "shifted data"
// variance algorithm), which keeps f32 accurate when |mean| >> std.
#define KS_GN_TILE 4096 // elements per apply block: 256 threads x 16, enough work to hide latency

template <typename T>
__device__ __forceinline__ void groupnorm_stats_fwd(const T* __restrict__ x, float* __restrict__ part, int C, int HW) {
    __shared__ float scratch[32];
    const int c = blockIdx.x, n = blockIdx.y;
    const i64 base = ((i64)n * C + c) * HW;
    const float k = ld(x, base);
    float s1 = 0.0f, s2 = 0.0f;
    for (int i = threadIdx.x; i < HW; i += blockDim.x) {
        float d = ld(x, base + i) - k;
        s1 += d;
        s2 += d * d;
    }
    s1 = block_sum(s1, scratch);
    s2 = block_sum(s2, scratch);
    if (threadIdx.x == 0) {
        part[(i64)n * 2 * C + c] = k + s1 / HW;                     // plane mean
        part[(i64)n * 2 * C + C + c] = fmaxf(s2 - s1 * s1 / HW, 0.0f); // plane sum of squared deviations
    }
}

// Chan's merge of equal-count planes: M2 = sum M2_c + HW * sum (mean_c - mean)^2.
__device__ __forceinline__ void group_stats(const float* part, int n, int C, int HW, int g, int cpg, float eps,
                                            float* mean, float* rstd) {
    const float* pm = part + (i64)n * 2 * C + g * cpg;
    const float* pv = pm + C;
    float mu = 0.0f;
    for (int k = 0; k < cpg; ++k) mu += pm[k];
    mu /= cpg;
    float m2 = 0.0f;
    for (int k = 0; k < cpg; ++k) {
        float d = pm[k] - mu;
        m2 += pv[k] + (float)HW * d * d;
    }
    *mean = mu;
    *rstd = rsqrtf(m2 / ((float)cpg * HW) + eps);
}

// Grid (ceil(cpg * HW / KS_GN_TILE), N * G), block 256.
template <typename T>
__device__ __forceinline__ void groupnorm_fwd(const T* __restrict__ x, const T* __restrict__ gamma,
                                              const T* __restrict__ beta, T* __restrict__ y,
                                              float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                              const float* __restrict__ part, int C, int HW, int G, float eps,
                                              int silu) {
    __shared__ float stats[2];
    const int ng = blockIdx.y, n = ng / G, g = ng % G, cpg = C / G;
    if (threadIdx.x == 0) {
        group_stats(part, n, C, HW, g, cpg, eps, &stats[0], &stats[1]);
        if (blockIdx.x == 0) {
            if (mean_out) mean_out[ng] = stats[0];
            if (rstd_out) rstd_out[ng] = stats[1];
        }
    }
    __syncthreads();
    const float mu = stats[0], rs = stats[1];
    const i64 gsize = (i64)cpg * HW, base = (i64)ng * gsize;
    const i64 e1 = min(gsize, (i64)(blockIdx.x + 1) * KS_GN_TILE);
    for (i64 e = (i64)blockIdx.x * KS_GN_TILE + threadIdx.x; e < e1; e += blockDim.x) {
        int c = g * cpg + (int)(e / HW);
        float z = (ld(x, base + e) - mu) * rs * (gamma ? ld(gamma, c) : 1.0f) + (beta ? ld(beta, c) : 0.0f);
        if (silu) z = z / (1.0f + __expf(-z));
        st(y, base + e, z);
    }
}

// dz = dy (times silu'(z) when fused); per plane: [sum dz | sum dz * xhat] into part (N, 2, C).
// These serve both dx (merged per group) and dbeta/dgamma (reduce_colsum over N).
__device__ __forceinline__ float groupnorm_dz(float dyv, float h, float gam, float bet, int silu) {
    if (!silu) return dyv;
    float z = fmaf(h, gam, bet);
    float s = 1.0f / (1.0f + __expf(-z));
    return dyv * s * (1.0f + z * (1.0f - s));
}

template <typename T>
__device__ __forceinline__ void groupnorm_stats_bwd(const T* __restrict__ x, const T* __restrict__ dy,
                                                    const T* __restrict__ gamma, const T* __restrict__ beta,
                                                    const float* __restrict__ mean, const float* __restrict__ rstd,
                                                    float* __restrict__ part, int C, int HW, int G, int silu) {
    __shared__ float scratch[32];
    const int c = blockIdx.x, n = blockIdx.y, ng = n * G + c / (C / G);
    const i64 base = ((i64)n * C + c) * HW;
    const float mu = mean[ng], rs = rstd[ng];
    const float gam = gamma ? ld(gamma, c) : 1.0f, bet = beta ? ld(beta, c) : 0.0f;
    float a = 0.0f, b = 0.0f;
    for (int i = threadIdx.x; i < HW; i += blockDim.x) {
        float h = (ld(x, base + i) - mu) * rs;
        float dz = groupnorm_dz(ld(dy, base + i), h, gam, bet, silu);
        a += dz;
        b += dz * h;
    }
    a = block_sum(a, scratch);
    b = block_sum(b, scratch);
    if (threadIdx.x == 0) {
        part[(i64)n * 2 * C + c] = a;
        part[(i64)n * 2 * C + C + c] = b;
    }
}

// dx = rstd * (gamma_c dz - c1 - xhat c2), c1 = sum_{c in g} gamma_c a_c / M, c2 = same with b.
template <typename T>
__device__ __forceinline__ void groupnorm_bwd(const T* __restrict__ x, const T* __restrict__ dy,
                                              const T* __restrict__ gamma, const T* __restrict__ beta,
                                              const float* __restrict__ mean, const float* __restrict__ rstd,
                                              const float* __restrict__ part, T* __restrict__ dx, int C, int HW,
                                              int G, int silu) {
    __shared__ float cs[2];
    const int ng = blockIdx.y, n = ng / G, g = ng % G, cpg = C / G;
    if (threadIdx.x == 0) {
        float s1 = 0.0f, s2 = 0.0f;
        for (int k = 0; k < cpg; ++k) {
            int c = g * cpg + k;
            float gam = gamma ? ld(gamma, c) : 1.0f;
            s1 += gam * part[(i64)n * 2 * C + c];
            s2 += gam * part[(i64)n * 2 * C + C + c];
        }
        float m = (float)cpg * HW;
        cs[0] = s1 / m;
        cs[1] = s2 / m;
    }
    __syncthreads();
    const float c1 = cs[0], c2 = cs[1], mu = mean[ng], rs = rstd[ng];
    const i64 gsize = (i64)cpg * HW, base = (i64)ng * gsize;
    const i64 e1 = min(gsize, (i64)(blockIdx.x + 1) * KS_GN_TILE);
    for (i64 e = (i64)blockIdx.x * KS_GN_TILE + threadIdx.x; e < e1; e += blockDim.x) {
        int c = g * cpg + (int)(e / HW);
        float gam = gamma ? ld(gamma, c) : 1.0f, bet = beta ? ld(beta, c) : 0.0f;
        float h = (ld(x, base + e) - mu) * rs;
        float dz = groupnorm_dz(ld(dy, base + e), h, gam, bet, silu);
        st(dx, base + e, rs * (gam * dz - c1 - h * c2));
    }
}

#define KS_NORM(T, tn)                                                                                   \
    extern "C" __global__ void norm_layernorm_fwd_##tn(const T* x, const T* gamma, const T* beta, T* y,  \
                                                       float* mean, float* rstd, int rows, int n,       \
                                                       float eps) {                                     \
        layernorm_fwd<T>(x, gamma, beta, y, mean, rstd, n, eps);                                        \
    }                                                                                                   \
    extern "C" __global__ void norm_layernorm_bwd_##tn(const T* x, const T* gamma, const T* d_y,         \
                                                       const float* mean, const float* rstd, T* d_x,    \
                                                       int rows, int n) {                               \
        layernorm_bwd<T>(x, gamma, d_y, mean, rstd, d_x, n);                                            \
    }                                                                                                   \
    extern "C" __global__ void norm_layernorm_params_bwd_##tn(const T* x, const T* d_y, const float* mean, \
                                                              const float* rstd, float* partial, int rows, \
                                                              int n, int rows_per_chunk) {             \
        layernorm_params_bwd<T>(x, d_y, mean, rstd, partial, rows, n, rows_per_chunk);                  \
    }                                                                                                   \
    extern "C" __global__ void norm_groupnorm_stats_fwd_##tn(const T* x, float* partial, int N, int C,   \
                                                             int HW) {                                  \
        groupnorm_stats_fwd<T>(x, partial, C, HW);                                                      \
    }                                                                                                   \
    extern "C" __global__ void norm_groupnorm_fwd_##tn(const T* x, const T* gamma, const T* beta, T* y,  \
                                                       float* mean, float* rstd, const float* partial,  \
                                                       int N, int C, int HW, int G, float eps, int silu) { \
        groupnorm_fwd<T>(x, gamma, beta, y, mean, rstd, partial, C, HW, G, eps, silu);                  \
    }                                                                                                   \
    extern "C" __global__ void norm_groupnorm_stats_bwd_##tn(const T* x, const T* d_y, const T* gamma,   \
                                                             const T* beta, const float* mean,          \
                                                             const float* rstd, float* partial, int N,  \
                                                             int C, int HW, int G, int silu) {          \
        groupnorm_stats_bwd<T>(x, d_y, gamma, beta, mean, rstd, partial, C, HW, G, silu);               \
    }                                                                                                   \
    extern "C" __global__ void norm_groupnorm_bwd_##tn(const T* x, const T* d_y, const T* gamma,         \
                                                       const T* beta, const float* mean, const float* rstd, \
                                                       const float* partial, T* d_x, int N, int C, int HW, \
                                                       int G, int silu) {                               \
        groupnorm_bwd<T>(x, d_y, gamma, beta, mean, rstd, partial, d_x, C, HW, G, silu);                \
    }

KS_NORM(float, f32)
KS_NORM(bf16, bf16)
KS_NORM(f16, f16)
