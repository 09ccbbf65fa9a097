// Attention family: flash attention forward (online softmax, saves the per-row log-sum-exp) and
// backward (recomputes P from the LSE; D = rowsum(dO * O) preprocessing; dK/dV and dQ in two
// kernels so that no atomics are needed and results are bit-reproducible).
//
// Layout: q, o, d_q, d_o (BH, Sq, HD); k, v, d_k, d_v (BH, Skv, HD); lse, D (BH, Sq) f32; all
// contiguous, BH = B * NH. Causal masking is top-left aligned (key j visible to query i iff j <= i),
// PyTorch's is_causal convention. Skv is arbitrary (77 for cross-attention): ragged tiles are
// zero-filled and masked to -inf.
//
// Two implementations:
//  - attention_flash_*_f32_hd*: portable scalar-FMA kernels (f32 tiles in shared memory), forward
//    and backward.
//  - attention_flash_*_bf16_hd*: tensor cores (mma.sync m16n8k16 bf16, f32 accumulation, sm_80+),
//    forward and backward.
#include "common.cuh"

// ================================ portable kernels ================================================
// 4 warps. Score tiles are computed with lane = key (32 keys per tile) and 1/4 of the tile's query
// rows per warp, so row max / row sum are warp shuffles. The P.V style products then switch to
// thread = (row or key, d = warp + 4c), which reads the shared P tile along a padded row
// (conflict-free) and the V/K/Q tile as a warp-wide broadcast.
#define FA_WARPS 4
#define FA_THREADS (FA_WARPS * 32)
#define FA_BKV 32

template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int ld_dst, const T* src, i64 row0, int nrows_valid, int rows,
                                          int HD) {
    for (int idx = threadIdx.x; idx < rows * HD; idx += FA_THREADS) {
        const int r = idx / HD, d = idx % HD;
        dst[r * ld_dst + d] = r < nrows_valid ? ld(src, (row0 + r) * HD + d) : 0.0f;
    }
}

// Grid (ceil(Sq / 32), BH), block 128.
template <typename T, int HD>
__device__ __forceinline__ void flash_fwd_simple(const T* __restrict__ q, const T* __restrict__ k,
                                                 const T* __restrict__ v, T* __restrict__ o, float* __restrict__ lse,
                                                 int Sq, int Skv, float scale, int causal) {
    constexpr int BQ = 32, RPW = BQ / FA_WARPS, DC = (HD + FA_WARPS - 1) / FA_WARPS;
    __shared__ float Qs[BQ][HD];
    __shared__ float Ks[FA_BKV][HD + 1];
    __shared__ float Vs[FA_BKV][HD];
    __shared__ float Ps[BQ][FA_BKV + 1];
    __shared__ float alpha_s[BQ];
    static_assert(sizeof(float) * (BQ * HD + FA_BKV * (2 * HD + 1) + BQ * (FA_BKV + 2)) <= 48 * 1024, "smem");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 bh = blockIdx.y;
    const int q0 = blockIdx.x * BQ;
    load_tile(&Qs[0][0], HD, q + bh * Sq * HD, q0, min(BQ, Sq - q0), BQ, HD);
    float m[RPW], l[RPW], acc[DC];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        m[r] = KS_NEG_INF;
        l[r] = 0.0f;
    }
#pragma unroll
    for (int c = 0; c < DC; ++c) acc[c] = 0.0f;
    const int kv_end = causal ? min(Skv, q0 + BQ) : Skv;
    for (int kv0 = 0; kv0 < kv_end; kv0 += FA_BKV) {
        const int nkv = min(FA_BKV, Skv - kv0);
        load_tile(&Ks[0][0], HD + 1, k + bh * Skv * HD, kv0, nkv, FA_BKV, HD);
        load_tile(&Vs[0][0], HD, v + bh * Skv * HD, kv0, nkv, FA_BKV, HD);
        __syncthreads();
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int i = warp * RPW + r;
            float s = 0.0f;
#pragma unroll 8
            for (int d = 0; d < HD; ++d) s = fmaf(Qs[i][d], Ks[lane][d], s);
            s *= scale;
            const int j = kv0 + lane;
            if (j >= Skv || (causal && j > q0 + i)) s = KS_NEG_INF;
            const float mt = warp_max(s);
            const float mn = fmaxf(m[r], mt);
            // Nothing visible yet: keep the state at (−inf, 0) and contribute p = 0.
            const float mu = mn == KS_NEG_INF ? 0.0f : mn;
            const float p = __expf(s - mu);
            const float alpha = __expf(m[r] - mu);
            l[r] = l[r] * alpha + warp_sum(p);
            m[r] = mn;
            Ps[i][lane] = p;
            if (lane == 0) alpha_s[i] = alpha;
        }
        __syncthreads();
        // Thread (row i = lane, d = warp + 4c).
        const float al = alpha_s[lane];
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = warp + FA_WARPS * c;
            if (d < HD) {
                float s = acc[c] * al;
#pragma unroll 8
                for (int j = 0; j < FA_BKV; ++j) s = fmaf(Ps[lane][j], Vs[j][d], s);
                acc[c] = s;
            }
        }
        __syncthreads();
    }
    // Row sums and LSE are known to the owning warp; publish l through shared memory.
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int i = warp * RPW + r;
        if (lane == 0) {
            alpha_s[i] = l[r];
            if (q0 + i < Sq && lse) lse[bh * Sq + q0 + i] = l[r] > 0.0f ? m[r] + logf(l[r]) : KS_NEG_INF;
        }
    }
    __syncthreads();
    // Stage O through Qs (no longer needed) so the global write is coalesced along d.
    const float li = alpha_s[lane];
    const float inv = li > 0.0f ? 1.0f / li : 0.0f;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int d = warp + FA_WARPS * c;
        if (d < HD) Qs[lane][d] = acc[c] * inv;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < BQ * HD; idx += FA_THREADS) {
        const int r = idx / HD, d = idx % HD;
        if (q0 + r < Sq) st(o, (bh * Sq + q0 + r) * HD + d, Qs[r][d]);
    }
}

// D[row] = sum_d dO[row, d] * O[row, d]. One warp per row; grid ceil(BH * Sq / 4), block 128.
template <typename T>
__device__ __forceinline__ void flash_prep_bwd(const T* __restrict__ o, const T* __restrict__ d_o,
                                               float* __restrict__ Dvec, i64 rows, int HD) {
    const i64 row = (i64)blockIdx.x * FA_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    float s = 0.0f;
    for (int d = threadIdx.x & 31; d < HD; d += 32) s += ld(o, row * HD + d) * ld(d_o, row * HD + d);
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) Dvec[row] = s;
}

// P and dS for a (rows x 32 keys) tile: warp w takes rows w*RPW.., lane = key. Shared by both
// backward kernels. Q/dO rows are read by broadcast, K/V rows (lane-indexed) from padded tiles.
template <int HD, int RPW>
__device__ __forceinline__ void score_tile_bwd(const float* Qs, const float* dOs, const float* Ks, const float* Vs,
                                               const float* lse_s, const float* D_s, float* Ps, float* dSs,
                                               int ldp, int q0, int kv0, int Sq, int Skv, float scale, int causal) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int i = warp * RPW + r;
        float s = 0.0f, dp = 0.0f;
#pragma unroll 8
        for (int d = 0; d < HD; ++d) {
            s = fmaf(Qs[i * HD + d], Ks[lane * (HD + 1) + d], s);
            dp = fmaf(dOs[i * HD + d], Vs[lane * (HD + 1) + d], dp);
        }
        const int qi = q0 + i, j = kv0 + lane;
        const bool visible = qi < Sq && j < Skv && !(causal && j > qi);
        const float p = visible ? __expf(s * scale - lse_s[i]) : 0.0f;
        if (Ps) Ps[i * ldp + lane] = p;
        dSs[i * ldp + lane] = p * (dp - D_s[i]);
    }
}

// dK, dV for 32 keys per block, looping over query tiles of 16 rows (16 keeps the four f32 tiles
// plus P and dS under the 48 KB static limit at HD = 80). Grid (ceil(Skv / 32), BH), block 128.
template <typename T, int HD>
__device__ __forceinline__ void flash_dkdv_bwd(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, const T* __restrict__ d_o,
                                               const float* __restrict__ lse, const float* __restrict__ Dvec,
                                               T* __restrict__ d_k, T* __restrict__ d_v, int Sq, int Skv,
                                               float scale, int causal) {
    constexpr int BQ = 16, RPW = BQ / FA_WARPS, DC = (HD + FA_WARPS - 1) / FA_WARPS;
    __shared__ float Ks[FA_BKV][HD + 1], Vs[FA_BKV][HD + 1];
    __shared__ float Qs[BQ][HD], dOs[BQ][HD];
    __shared__ float Ps[BQ][FA_BKV + 1], dSs[BQ][FA_BKV + 1];
    __shared__ float lse_s[BQ], D_s[BQ];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 bh = blockIdx.y;
    const int kv0 = blockIdx.x * FA_BKV, nkv = min(FA_BKV, Skv - kv0);
    load_tile(&Ks[0][0], HD + 1, k + bh * Skv * HD, kv0, nkv, FA_BKV, HD);
    load_tile(&Vs[0][0], HD + 1, v + bh * Skv * HD, kv0, nkv, FA_BKV, HD);
    float dk[DC], dv[DC];
#pragma unroll
    for (int c = 0; c < DC; ++c) dk[c] = dv[c] = 0.0f;
    // Causal: queries before kv0 see none of these keys.
    for (int q0 = causal ? (kv0 / BQ) * BQ : 0; q0 < Sq; q0 += BQ) {
        const int nq = min(BQ, Sq - q0);
        load_tile(&Qs[0][0], HD, q + bh * Sq * HD, q0, nq, BQ, HD);
        load_tile(&dOs[0][0], HD, d_o + bh * Sq * HD, q0, nq, BQ, HD);
        if (threadIdx.x < BQ) {
            const bool ok = threadIdx.x < nq;
            lse_s[threadIdx.x] = ok ? lse[bh * Sq + q0 + threadIdx.x] : 0.0f;
            D_s[threadIdx.x] = ok ? Dvec[bh * Sq + q0 + threadIdx.x] : 0.0f;
        }
        __syncthreads();
        score_tile_bwd<HD, RPW>(&Qs[0][0], &dOs[0][0], &Ks[0][0], &Vs[0][0], lse_s, D_s, &Ps[0][0], &dSs[0][0],
                                FA_BKV + 1, q0, kv0, Sq, Skv, scale, causal);
        __syncthreads();
        // Thread (key j = lane, d = warp + 4c).
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = warp + FA_WARPS * c;
            if (d < HD) {
                float a = dv[c], b = dk[c];
#pragma unroll
                for (int i = 0; i < BQ; ++i) {
                    a = fmaf(Ps[i][lane], dOs[i][d], a);
                    b = fmaf(dSs[i][lane], Qs[i][d], b);
                }
                dv[c] = a;
                dk[c] = b;
            }
        }
        __syncthreads();
    }
    // Stage through the K/V tiles for coalesced writes. The barrier matters when no query tile
    // sees these keys (causal, kv0 >= Sq): the loop above never ran, and without it a thread could
    // still be loading K while another overwrites its row with the (zero) gradient.
    __syncthreads();
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int d = warp + FA_WARPS * c;
        if (d < HD) {
            Ks[lane][d] = dk[c] * scale;
            Vs[lane][d] = dv[c];
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nkv * HD; idx += FA_THREADS) {
        const int r = idx / HD, d = idx % HD;
        const i64 g = (bh * Skv + kv0 + r) * HD + d;
        st(d_k, g, Ks[r][d]);
        st(d_v, g, Vs[r][d]);
    }
}

// dQ for 32 query rows per block, looping over key tiles. Grid (ceil(Sq / 32), BH), block 128.
template <typename T, int HD>
__device__ __forceinline__ void flash_dq_bwd(const T* __restrict__ q, const T* __restrict__ k,
                                             const T* __restrict__ v, const T* __restrict__ d_o,
                                             const float* __restrict__ lse, const float* __restrict__ Dvec,
                                             T* __restrict__ d_q, int Sq, int Skv, float scale, int causal) {
    constexpr int BQ = 32, RPW = BQ / FA_WARPS, DC = (HD + FA_WARPS - 1) / FA_WARPS;
    __shared__ float Qs[BQ][HD], dOs[BQ][HD];
    __shared__ float Ks[FA_BKV][HD + 1], Vs[FA_BKV][HD + 1];
    __shared__ float dSs[BQ][FA_BKV + 1];
    __shared__ float lse_s[BQ], D_s[BQ];
    static_assert(sizeof(float) * (2 * BQ * HD + 2 * FA_BKV * (HD + 1) + BQ * (FA_BKV + 3)) <= 48 * 1024, "smem");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 bh = blockIdx.y;
    const int q0 = blockIdx.x * BQ, nq = min(BQ, Sq - q0);
    load_tile(&Qs[0][0], HD, q + bh * Sq * HD, q0, nq, BQ, HD);
    load_tile(&dOs[0][0], HD, d_o + bh * Sq * HD, q0, nq, BQ, HD);
    if (threadIdx.x < BQ) {
        const bool ok = threadIdx.x < nq;
        lse_s[threadIdx.x] = ok ? lse[bh * Sq + q0 + threadIdx.x] : 0.0f;
        D_s[threadIdx.x] = ok ? Dvec[bh * Sq + q0 + threadIdx.x] : 0.0f;
    }
    float dq[DC];
#pragma unroll
    for (int c = 0; c < DC; ++c) dq[c] = 0.0f;
    const int kv_end = causal ? min(Skv, q0 + BQ) : Skv;
    for (int kv0 = 0; kv0 < kv_end; kv0 += FA_BKV) {
        const int nkv = min(FA_BKV, Skv - kv0);
        load_tile(&Ks[0][0], HD + 1, k + bh * Skv * HD, kv0, nkv, FA_BKV, HD);
        load_tile(&Vs[0][0], HD + 1, v + bh * Skv * HD, kv0, nkv, FA_BKV, HD);
        __syncthreads();
        score_tile_bwd<HD, RPW>(&Qs[0][0], &dOs[0][0], &Ks[0][0], &Vs[0][0], lse_s, D_s, nullptr, &dSs[0][0],
                                FA_BKV + 1, q0, kv0, Sq, Skv, scale, causal);
        __syncthreads();
        // Thread (row i = lane, d = warp + 4c).
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = warp + FA_WARPS * c;
            if (d < HD) {
                float a = dq[c];
#pragma unroll 8
                for (int j = 0; j < FA_BKV; ++j) a = fmaf(dSs[lane][j], Ks[j][d], a);
                dq[c] = a;
            }
        }
        __syncthreads();
    }
    __syncthreads(); // as in dkdv: the Q tile may still be loading when no key tile ran
#pragma unroll
    for (int c = 0; c < DC; ++c) {
        const int d = warp + FA_WARPS * c;
        if (d < HD) Qs[lane][d] = dq[c] * scale;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nq * HD; idx += FA_THREADS) {
        const int r = idx / HD, d = idx % HD;
        st(d_q, (bh * Sq + q0 + r) * HD + d, Qs[r][d]);
    }
}

#define KS_FA_SIMPLE(T, tn, HD)                                                                                \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_flash_dkdv_bwd_##tn##_hd##HD(           \
        const T* q, const T* k, const T* v, const T* d_o, const float* lse, const float* D, T* d_k, T* d_v,   \
        int Sq, int Skv, float scale, int causal) {                                                           \
        flash_dkdv_bwd<T, HD>(q, k, v, d_o, lse, D, d_k, d_v, Sq, Skv, scale, causal);                        \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_flash_dq_bwd_##tn##_hd##HD(             \
        const T* q, const T* k, const T* v, const T* d_o, const float* lse, const float* D, T* d_q, int Sq,   \
        int Skv, float scale, int causal) {                                                                   \
        flash_dq_bwd<T, HD>(q, k, v, d_o, lse, D, d_q, Sq, Skv, scale, causal);                               \
    }

#define KS_FA_FWD_SIMPLE(T, tn, HD)                                                                            \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_flash_fwd_##tn##_hd##HD(                \
        const T* q, const T* k, const T* v, T* o, float* lse, int Sq, int Skv, float scale, int causal) {      \
        flash_fwd_simple<T, HD>(q, k, v, o, lse, Sq, Skv, scale, causal);                                     \
    }

#define KS_FA_HDS(X, T, tn) X(T, tn, 16) X(T, tn, 32) X(T, tn, 40) X(T, tn, 64) X(T, tn, 80)

KS_FA_HDS(KS_FA_FWD_SIMPLE, float, f32)
KS_FA_HDS(KS_FA_SIMPLE, float, f32)

extern "C" __global__ void __launch_bounds__(FA_THREADS)
    attention_flash_prep_bwd_f32(const float* o, const float* d_o, float* D, i64 rows, int HD) {
    flash_prep_bwd<float>(o, d_o, D, rows, HD);
}
extern "C" __global__ void __launch_bounds__(FA_THREADS)
    attention_flash_prep_bwd_bf16(const bf16* o, const bf16* d_o, float* D, i64 rows, int HD) {
    flash_prep_bwd<bf16>(o, d_o, D, rows, HD);
}


// ================================ tensor-core forward (bf16, sm_80+) ==============================
// FlashAttention-2 forward on mma.sync.m16n8k16 (bf16 in, f32 accumulate). Block = 8 warps,
// 128 query rows (16 per warp, one m16 tile), key tiles of 64. Each warp keeps its Q fragments,
// S tile (16 x 64) and O accumulator (16 x HD) in registers; the S accumulator layout is reused
// directly as the A operand of P.V (the C fragment of two n8 tiles is the A fragment of one k16).
// K/V tiles are double-buffered with cp.async: the next tile streams into shared memory while
// the current one is multiplied (the Q tile borrows the second buffer before the loop). K's B
// fragments come by ldmatrix.x4 (two n8 tiles at once), V's by ldmatrix.x2.trans. Only tiles
// that reach past Skv or cross the causal diagonal of the warp's rows pay for the mask.
// Shared rows are padded by 8 bf16 (16 bytes): with the row stride an odd multiple of 16 bytes
// the 8 rows touched by one fragment load fall in distinct bank groups, and ldmatrix / cp.async
// addresses stay 16-byte aligned. HD is zero-padded to a multiple of 16 for the QK^T k-loop
// (HD = 40 -> 48). Static shared memory: 4 tiles of 64 x (HDP + 8) bf16 (36 KB at HD 64, 44 KB
// at HD 80). Requirements: HD % 8 == 0 and q/k/v/o base pointers 16-byte aligned.
// The arithmetic per row is the same sequence as the 4-warp single-buffered kernel it replaced,
// so outputs did not move by a bit.
#define FF_WARPS 8
#define FF_THREADS (FF_WARPS * 32)
#define FF_BQ (FF_WARPS * 16)
#define FF_BKV 64

// Starts copying rows [row0, row0 + rows) of a (S, HD) bf16 matrix into a (rows, STR) shared
// tile with cp.async, zero filling rows past nvalid and columns [HD, HDP). The caller commits,
// waits and synchronises.
template <int HD, int HDP, int STR, int THREADS>
__device__ __forceinline__ void load_tile_async(unsigned short* dst, const bf16* src, i64 row0, int nvalid, int rows) {
    constexpr int CH = HDP / 8; // 16-byte chunks per padded row
    for (int idx = threadIdx.x; idx < rows * CH; idx += THREADS) {
        const int r = idx / CH, c = idx % CH;
        const bool in = r < nvalid && c * 8 < HD;
        cp_async_16(dst + r * STR + c * 8, in ? src + (row0 + r) * HD + c * 8 : src, in ? 16 : 0);
    }
}

// Starts streaming rows [row0, row0 + R) of two (S, HD) bf16 matrices (K and V, or Q and dO)
// into the tile pair at dst (the first at dst, the second R rows after it), zero filling rows
// past S. The caller commits, waits and synchronises.
template <int HD, int HDP, int STR, int THREADS, int R>
__device__ __forceinline__ void load_pair_async(unsigned short* dst, const bf16* a, const bf16* b, int row0, int S) {
    const int n = min(R, S - row0);
    load_tile_async<HD, HDP, STR, THREADS>(dst, a, row0, n, R);
    load_tile_async<HD, HDP, STR, THREADS>(dst + R * STR, b, row0, n, R);
}

// Fragments of rows [r0, r0 + 16) of a (rows, STR) shared tile as the A operand (k = HD).
template <int KS, int STR>
__device__ __forceinline__ void load_a_frags(unsigned (&a)[KS][4], const unsigned short* tile, int r0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        const unsigned short* base = tile + (r0 + g) * STR + ks * 16 + 2 * t;
        a[ks][0] = *reinterpret_cast<const unsigned*>(base);
        a[ks][1] = *reinterpret_cast<const unsigned*>(base + 8 * STR);
        a[ks][2] = *reinterpret_cast<const unsigned*>(base + 8);
        a[ks][3] = *reinterpret_cast<const unsigned*>(base + 8 * STR + 8);
    }
}

// C (16 x 64) += A (16 x HDP, fragments) x X^T where X is a (64, STR) shared tile: the score
// shape, for S = Q K^T in the forward and dQ, S^T = K Q^T in dK/dV, and dP (X = V or dO). B
// fragments by ldmatrix.x4: lanes 0-7 address rows 16p + 0..7 at columns 16 ks + 0..7 (matrix
// 0), lanes 8-15 the same rows at columns + 8, lanes 16-31 rows 16p + 8..15 likewise, which are
// the B fragments of n8 tiles 2p and 2p + 1. Each score accumulates its k16 steps in ascending ks.
template <int KS, int STR>
__device__ __forceinline__ void mma_rows_xt(float (&c)[8][4], const unsigned (&a)[KS][4], const unsigned short* x) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
    const unsigned short* xrow = x + ((lane >> 4) * 8 + (lane & 7)) * STR + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            unsigned b0, b1, b2, b3;
            ldmatrix_x4(xrow + p * 16 * STR + ks * 16, b0, b1, b2, b3);
            mma_bf16_16816(c[2 * p], a[ks], b0, b1);
            mma_bf16_16816(c[2 * p + 1], a[ks], b2, b3);
        }
    }
}

// acc (16 x HD) += L (16 x 64, C fragments rounded to bf16) x X where X is a (64, STR) shared tile
// of rows k: the C fragment of n-tiles 2kk, 2kk + 1 is the A fragment of k16 step kk.
template <int DN, int STR>
__device__ __forceinline__ void mma_frags_x(float (&acc)[DN][4], const float (&l)[8][4], const unsigned short* x) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        unsigned la[4];
        la[0] = pack_bf16x2(l[2 * kk][0], l[2 * kk][1]);
        la[1] = pack_bf16x2(l[2 * kk][2], l[2 * kk][3]);
        la[2] = pack_bf16x2(l[2 * kk + 1][0], l[2 * kk + 1][1]);
        la[3] = pack_bf16x2(l[2 * kk + 1][2], l[2 * kk + 1][3]);
        const unsigned short* xrow = x + (kk * 16 + (lane & 15)) * STR;
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
            unsigned b0, b1;
            ldmatrix_x2_trans(xrow + dn * 8, b0, b1);
            mma_bf16_16816(acc[dn], la, b0, b1);
        }
    }
}

// Scores of one tile into the log2 domain, masked to -inf where MASK says (keys past Skv, keys
// after the query under a causal mask), and the two row maxima of this thread's columns.
template <bool MASK, int NT>
__device__ __forceinline__ void scale_tile(float (&s)[NT][4], float sl2, int kv0, int Skv, int causal, int qi0,
                                           int qi1, float& mt0, float& mt1) {
    const int t = threadIdx.x & 3;
    mt0 = KS_NEG_INF;
    mt1 = KS_NEG_INF;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float x = s[nt][e] * sl2;
            if (MASK) {
                const int j = kv0 + nt * 8 + 2 * t + (e & 1);
                const int qi = e < 2 ? qi0 : qi1;
                if (j >= Skv || (causal && j > qi)) x = KS_NEG_INF;
            }
            s[nt][e] = x;
            if (e < 2) mt0 = fmaxf(mt0, x);
            else mt1 = fmaxf(mt1, x);
        }
    }
}

template <int HD>
__device__ __forceinline__ void flash_fwd_mma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                              const bf16* __restrict__ v, bf16* __restrict__ o,
                                              float* __restrict__ lse, int Sq, int Skv, float scale, int causal) {
    static_assert(HD % 8 == 0, "HD must be a multiple of 8");
    constexpr int HDP = (HD + 15) / 16 * 16, STR = HDP + 8, KS = HDP / 16, DN = HD / 8, NT = FF_BKV / 8;
    constexpr int TILE = FF_BKV * STR;
    static_assert(FF_BQ == 2 * FF_BKV, "the Q tile borrows the second K/V buffer");
    // Buffer b: K at sm + 2b TILE, V at sm + (2b + 1) TILE. Q (FF_BQ rows) first fills buffer 1.
    __shared__ __align__(16) unsigned short sm[4 * TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
    const i64 bh = blockIdx.y;
    const int q0 = blockIdx.x * FF_BQ, r0 = warp * 16;
    const bf16* kb = k + bh * Skv * HD;
    const bf16* vb = v + bh * Skv * HD;
    // exp2 with log2(e) folded into the scale: one FMUL less per score.
    const float sl2 = scale * 1.4426950408889634f;

    load_tile_async<HD, HDP, STR, FF_THREADS>(sm + 2 * TILE, q + bh * Sq * HD, q0, min(FF_BQ, Sq - q0), FF_BQ);
    load_pair_async<HD, HDP, STR, FF_THREADS, FF_BKV>(sm, kb, vb, 0, Skv);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    unsigned qa[KS][4];
    load_a_frags<KS, STR>(qa, sm + 2 * TILE, r0);
    __syncthreads(); // every warp holds its Q fragments: buffer 1 is free for the second tile
    float acc[DN][4];
#pragma unroll
    for (int dn = 0; dn < DN; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.0f;
    float m0 = KS_NEG_INF, m1 = KS_NEG_INF, l0 = 0.0f, l1 = 0.0f; // rows g and g + 8 (log2 domain)
    const int qi0 = q0 + r0 + g, qi1 = qi0 + 8;

    const int kv_end = causal ? min(Skv, q0 + FF_BQ) : Skv;
    for (int kv0 = 0, buf = 0; kv0 < kv_end; kv0 += FF_BKV, buf ^= 1) {
        if (kv0 + FF_BKV < kv_end) { // the next tile streams in behind this one's arithmetic
            load_pair_async<HD, HDP, STR, FF_THREADS, FF_BKV>(sm + 2 * (buf ^ 1) * TILE, kb, vb, kv0 + FF_BKV, Skv);
            cp_async_commit();
        }
        const unsigned short* Ks = sm + 2 * buf * TILE;
        const unsigned short* Vs = Ks + TILE;

        static_assert(NT == 8, "mma_rows_xt covers 64 keys");
        float s[NT][4];
        mma_rows_xt<KS, STR>(s, qa, Ks);
        // Scale, mask, row max over this thread's columns, then across the quad that shares a row.
        float mt0, mt1;
        const bool edge = kv0 + FF_BKV > Skv || (causal && kv0 + FF_BKV - 1 > q0 + r0);
        if (edge) scale_tile<true, NT>(s, sl2, kv0, Skv, causal, qi0, qi1, mt0, mt1);
        else scale_tile<false, NT>(s, sl2, kv0, Skv, causal, qi0, qi1, mt0, mt1);
        mt0 = fmaxf(mt0, __shfl_xor_sync(0xffffffffu, mt0, 1));
        mt0 = fmaxf(mt0, __shfl_xor_sync(0xffffffffu, mt0, 2));
        mt1 = fmaxf(mt1, __shfl_xor_sync(0xffffffffu, mt1, 1));
        mt1 = fmaxf(mt1, __shfl_xor_sync(0xffffffffu, mt1, 2));
        const float mn0 = fmaxf(m0, mt0), mn1 = fmaxf(m1, mt1);
        const float mu0 = mn0 == KS_NEG_INF ? 0.0f : mn0, mu1 = mn1 == KS_NEG_INF ? 0.0f : mn1;
        const float al0 = exp2f(m0 - mu0), al1 = exp2f(m1 - mu1);
        m0 = mn0;
        m1 = mn1;
        // l is kept per thread (a partial over its columns) and reduced across the quad once at
        // the end: alpha is uniform across the quad, so partial sums rescale consistently.
        l0 *= al0;
        l1 *= al1;
#pragma unroll
        for (int dn = 0; dn < DN; ++dn) {
            acc[dn][0] *= al0;
            acc[dn][1] *= al0;
            acc[dn][2] *= al1;
            acc[dn][3] *= al1;
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - mu0);
            s[nt][1] = exp2f(s[nt][1] - mu0);
            s[nt][2] = exp2f(s[nt][2] - mu1);
            s[nt][3] = exp2f(s[nt][3] - mu1);
            l0 += s[nt][0] + s[nt][1];
            l1 += s[nt][2] + s[nt][3];
        }
        // O += P V: P (16 x 64) from registers as four k16 A fragments; V fragments by ldmatrix.trans
        // (V is stored key-major, the B operand wants (k = key) x (n = d) column-major).
        mma_frags_x<DN, STR>(acc, s, Vs);
        // The next tile has landed (this thread's copies) and is visible to all; and every warp
        // is done with this buffer before the next iteration streams into it.
        cp_async_wait_all();
        __syncthreads();
    }
    const int t = lane & 3;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int dn = 0; dn < DN; ++dn) {
        const int d = dn * 8 + 2 * t;
        if (qi0 < Sq)
            *reinterpret_cast<unsigned*>(o + (bh * Sq + qi0) * HD + d) = pack_bf16x2(acc[dn][0] * inv0, acc[dn][1] * inv0);
        if (qi1 < Sq)
            *reinterpret_cast<unsigned*>(o + (bh * Sq + qi1) * HD + d) = pack_bf16x2(acc[dn][2] * inv1, acc[dn][3] * inv1);
    }
    // LSE in natural log: (m + log2 l) * ln 2.
    if (t == 0 && lse) {
        if (qi0 < Sq) lse[bh * Sq + qi0] = l0 > 0.0f ? (m0 + __log2f(l0)) * 0.6931471805599453f : KS_NEG_INF;
        if (qi1 < Sq) lse[bh * Sq + qi1] = l1 > 0.0f ? (m1 + __log2f(l1)) * 0.6931471805599453f : KS_NEG_INF;
    }
}

#define KS_FA_MMA(HD)                                                                                         \
    extern "C" __global__ void __launch_bounds__(FF_THREADS) attention_flash_fwd_bf16_hd##HD(                 \
        const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, int Sq, int Skv, float scale,       \
        int causal) {                                                                                        \
        flash_fwd_mma<HD>(q, k, v, o, lse, Sq, Skv, scale, causal);                                          \
    }

KS_FA_MMA(16)
KS_FA_MMA(32)
KS_FA_MMA(40)
KS_FA_MMA(64)
KS_FA_MMA(80)

// ================================ tensor-core backward (bf16, sm_80+) =============================
// FlashAttention-2 backward on mma.sync.m16n8k16, split into a dK/dV kernel (one key block each,
// looping over query tiles) and a dQ kernel (one query block each, looping over key tiles), so that
// nothing is accumulated with atomics and results stay bit-reproducible. Both recompute the scores
// and dP = dO V^T; P = exp(scale S - lse) (lse from the forward), dS = P (dP - D).
//
// dK/dV works on the transposes: each warp owns 16 keys, so S^T = K Q^T and dP^T = V dO^T come out
// as C fragments with the key as the row, and those registers are directly the A operands of
// dV += P^T dO and dK += dS^T Q (as the forward reuses S for P V). K and V fragments stay in
// registers for the whole block; Q and dO tiles are read from shared memory as B operands: rows
// of Q are the columns of Q^T (ldmatrix.x4, as the forward reads K), and the (query x d)
// operands of the two products by ldmatrix.trans (as the forward reads V).
// dQ is the forward's shape: each warp owns 16 queries with Q and dO fragments in registers,
// S = Q K^T and dP = dO V^T from K and V rows, and dQ += dS K with K by ldmatrix.trans.
// Both kernels double-buffer the tiles they loop over with cp.async, the second buffer first
// holding the tiles that become register fragments (4 tiles: 45 KB of shared memory at HD = 80).
// P and dS are rounded to bf16 as mma operands (flash-attention does the same); the accumulators
// are f32, and the scale of dK and dQ is applied once when they are written.

#define FM_BQ 64
#define FM_BKV 64

// Writes rows i0 and i0 + 8 (the C fragment's two rows) of a (16 x HD) accumulator times mul.
template <int DN, int HD>
__device__ __forceinline__ void store_frag_rows(bf16* dst, const float (&acc)[DN][4], i64 row_base, int i0, int n,
                                                float mul) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int dn = 0; dn < DN; ++dn) {
        const int d = dn * 8 + 2 * t;
        if (i0 < n)
            *reinterpret_cast<unsigned*>(dst + (row_base + i0) * HD + d) =
                pack_bf16x2(acc[dn][0] * mul, acc[dn][1] * mul);
        if (i0 + 8 < n)
            *reinterpret_cast<unsigned*>(dst + (row_base + i0 + 8) * HD + d) =
                pack_bf16x2(acc[dn][2] * mul, acc[dn][3] * mul);
    }
}

// Grid (ceil(Skv / 64), BH), block 128. Q/dO tiles double-buffered by cp.async (K and V borrow
// the second buffer until their fragments are in registers); the next tile's lse and D ride in
// registers across the arithmetic and are staged at its end.
template <int HD>
__device__ __forceinline__ void flash_dkdv_mma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                               const bf16* __restrict__ v, const bf16* __restrict__ d_o,
                                               const float* __restrict__ lse, const float* __restrict__ Dvec,
                                               bf16* __restrict__ d_k, bf16* __restrict__ d_v, int Sq, int Skv,
                                               float scale, int causal) {
    static_assert(HD % 8 == 0, "HD must be a multiple of 8");
    static_assert(FM_BQ == 64 && FM_BKV == 64, "mma_rows_xt and mma_frags_x cover 64 rows");
    constexpr int HDP = (HD + 15) / 16 * 16, STR = HDP + 8, KS = HDP / 16, DN = HD / 8, NT = FM_BQ / 8;
    constexpr int TILE = FM_BQ * STR;
    // Buffer b: Q at sm + 2b TILE, dO at sm + (2b + 1) TILE.
    __shared__ __align__(16) unsigned short sm[4 * TILE];
    __shared__ float lse_s[2][FM_BQ], D_s[2][FM_BQ]; // lse in the log2 domain
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
    const i64 bh = blockIdx.y;
    const int kv0 = blockIdx.x * FM_BKV, r0 = warp * 16;
    const float sl2 = scale * 1.4426950408889634f;
    const bf16* qb = q + bh * Sq * HD;
    const bf16* ob = d_o + bh * Sq * HD;

    // Causal: queries before kv0 see none of these keys (FM_BQ == FM_BKV keeps q0 tile-aligned).
    const int qstart = causal ? kv0 : 0;
    load_pair_async<HD, HDP, STR, FA_THREADS, FM_BKV>(sm + 2 * TILE, k + bh * Skv * HD, v + bh * Skv * HD, kv0, Skv);
    if (qstart < Sq) {
        load_pair_async<HD, HDP, STR, FA_THREADS, FM_BQ>(sm, qb, ob, qstart, Sq);
        if (threadIdx.x < FM_BQ) {
            const bool ok = (int)threadIdx.x < Sq - qstart;
            lse_s[0][threadIdx.x] = ok ? lse[bh * Sq + qstart + threadIdx.x] * 1.4426950408889634f : 0.0f;
            D_s[0][threadIdx.x] = ok ? Dvec[bh * Sq + qstart + threadIdx.x] : 0.0f;
        }
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    unsigned ka[KS][4], va[KS][4];
    load_a_frags<KS, STR>(ka, sm + 2 * TILE, r0);
    load_a_frags<KS, STR>(va, sm + 3 * TILE, r0);
    __syncthreads(); // K and V are in registers: buffer 1 is free for the second Q/dO tile
    float dk[DN][4], dv[DN][4];
#pragma unroll
    for (int dn = 0; dn < DN; ++dn)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[dn][e] = dv[dn][e] = 0.0f;
    const int kj0 = kv0 + r0 + (lane >> 2); // this thread's keys: kj0 and kj0 + 8

    for (int q0 = qstart, buf = 0; q0 < Sq; q0 += FM_BQ, buf ^= 1) {
        const int qn = q0 + FM_BQ;
        float lse_n = 0.0f, D_n = 0.0f;
        if (qn < Sq) { // the next tile streams in behind this one's arithmetic
            load_pair_async<HD, HDP, STR, FA_THREADS, FM_BQ>(sm + 2 * (buf ^ 1) * TILE, qb, ob, qn, Sq);
            cp_async_commit();
            if ((int)threadIdx.x < min(FM_BQ, Sq - qn)) {
                lse_n = lse[bh * Sq + qn + threadIdx.x] * 1.4426950408889634f;
                D_n = Dvec[bh * Sq + qn + threadIdx.x];
            }
        }
        const unsigned short* Qs = sm + 2 * buf * TILE;
        const unsigned short* Os = Qs + TILE;
        float s[NT][4], dp[NT][4]; // S^T, dP^T: (16 keys x 64 queries)
        mma_rows_xt<KS, STR>(s, ka, Qs);
        mma_rows_xt<KS, STR>(dp, va, Os);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = nt * 8 + 2 * t + (e & 1), i = q0 + c, j = e < 2 ? kj0 : kj0 + 8;
                const bool visible = i < Sq && j < Skv && !(causal && j > i);
                const float p = visible ? exp2f(fmaf(s[nt][e], sl2, -lse_s[buf][c])) : 0.0f;
                s[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - D_s[buf][c]);
            }
        }
        mma_frags_x<DN, STR>(dv, s, Os);  // dV += P^T dO
        mma_frags_x<DN, STR>(dk, dp, Qs); // dK += dS^T Q
        if (qn < Sq && threadIdx.x < FM_BQ) {
            lse_s[buf ^ 1][threadIdx.x] = lse_n;
            D_s[buf ^ 1][threadIdx.x] = D_n;
        }
        // The next tile has landed and is visible to all; every warp is done with this buffer.
        cp_async_wait_all();
        __syncthreads();
    }
    store_frag_rows<DN, HD>(d_k, dk, bh * Skv, kj0, Skv, scale);
    store_frag_rows<DN, HD>(d_v, dv, bh * Skv, kj0, Skv, 1.0f);
}

// Grid (ceil(Sq / 64), BH), block 128. K/V tiles double-buffered by cp.async (Q and dO borrow the
// second buffer until their fragments are in registers), as the forward.
template <int HD>
__device__ __forceinline__ void flash_dq_mma(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                             const bf16* __restrict__ v, const bf16* __restrict__ d_o,
                                             const float* __restrict__ lse, const float* __restrict__ Dvec,
                                             bf16* __restrict__ d_q, int Sq, int Skv, float scale, int causal) {
    static_assert(HD % 8 == 0, "HD must be a multiple of 8");
    static_assert(FM_BQ == 64 && FM_BKV == 64, "mma_rows_xt and mma_frags_x cover 64 rows");
    constexpr int HDP = (HD + 15) / 16 * 16, STR = HDP + 8, KS = HDP / 16, DN = HD / 8, NT = FM_BKV / 8;
    constexpr int TILE = FM_BKV * STR;
    // Buffer b: K at sm + 2b TILE, V at sm + (2b + 1) TILE.
    __shared__ __align__(16) unsigned short sm[4 * TILE];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
    const i64 bh = blockIdx.y;
    const int q0 = blockIdx.x * FM_BQ, r0 = warp * 16;
    const float sl2 = scale * 1.4426950408889634f;
    const bf16* kb = k + bh * Skv * HD;
    const bf16* vb = v + bh * Skv * HD;

    load_pair_async<HD, HDP, STR, FA_THREADS, FM_BQ>(sm + 2 * TILE, q + bh * Sq * HD, d_o + bh * Sq * HD, q0, Sq);
    load_pair_async<HD, HDP, STR, FA_THREADS, FM_BKV>(sm, kb, vb, 0, Skv);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    unsigned qa[KS][4], oa[KS][4];
    load_a_frags<KS, STR>(qa, sm + 2 * TILE, r0);
    load_a_frags<KS, STR>(oa, sm + 3 * TILE, r0);
    __syncthreads(); // Q and dO are in registers: buffer 1 is free for the second K/V tile
    const int qi0 = q0 + r0 + (lane >> 2), qi1 = qi0 + 8;
    const float lse0 = qi0 < Sq ? lse[bh * Sq + qi0] * 1.4426950408889634f : 0.0f;
    const float lse1 = qi1 < Sq ? lse[bh * Sq + qi1] * 1.4426950408889634f : 0.0f;
    const float D0 = qi0 < Sq ? Dvec[bh * Sq + qi0] : 0.0f, D1 = qi1 < Sq ? Dvec[bh * Sq + qi1] : 0.0f;
    float dq[DN][4];
#pragma unroll
    for (int dn = 0; dn < DN; ++dn) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.0f;

    const int kv_end = causal ? min(Skv, q0 + FM_BQ) : Skv;
    for (int kv0 = 0, buf = 0; kv0 < kv_end; kv0 += FM_BKV, buf ^= 1) {
        if (kv0 + FM_BKV < kv_end) { // the next tile streams in behind this one's arithmetic
            load_pair_async<HD, HDP, STR, FA_THREADS, FM_BKV>(sm + 2 * (buf ^ 1) * TILE, kb, vb, kv0 + FM_BKV, Skv);
            cp_async_commit();
        }
        const unsigned short* Ks = sm + 2 * buf * TILE;
        const unsigned short* Vs = Ks + TILE;
        float s[NT][4], dp[NT][4]; // S, dP: (16 queries x 64 keys)
        mma_rows_xt<KS, STR>(s, qa, Ks);
        mma_rows_xt<KS, STR>(dp, oa, Vs);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = kv0 + nt * 8 + 2 * t + (e & 1), i = e < 2 ? qi0 : qi1;
                const bool visible = i < Sq && j < Skv && !(causal && j > i);
                const float p = visible ? exp2f(fmaf(s[nt][e], sl2, -(e < 2 ? lse0 : lse1))) : 0.0f;
                dp[nt][e] = p * (dp[nt][e] - (e < 2 ? D0 : D1));
            }
        }
        mma_frags_x<DN, STR>(dq, dp, Ks); // dQ += dS K
        cp_async_wait_all();
        __syncthreads();
    }
    store_frag_rows<DN, HD>(d_q, dq, bh * Sq, qi0, Sq, scale);
}

#define KS_FA_MMA_BWD(HD)                                                                                     \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_flash_dkdv_bwd_bf16_hd##HD(            \
        const bf16* q, const bf16* k, const bf16* v, const bf16* d_o, const float* lse, const float* D,       \
        bf16* d_k, bf16* d_v, int Sq, int Skv, float scale, int causal) {                                    \
        flash_dkdv_mma<HD>(q, k, v, d_o, lse, D, d_k, d_v, Sq, Skv, scale, causal);                           \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_flash_dq_bwd_bf16_hd##HD(              \
        const bf16* q, const bf16* k, const bf16* v, const bf16* d_o, const float* lse, const float* D,       \
        bf16* d_q, int Sq, int Skv, float scale, int causal) {                                               \
        flash_dq_mma<HD>(q, k, v, d_o, lse, D, d_q, Sq, Skv, scale, causal);                                  \
    }

KS_FA_MMA_BWD(16)
KS_FA_MMA_BWD(32)
KS_FA_MMA_BWD(40)
KS_FA_MMA_BWD(64)
KS_FA_MMA_BWD(80)
