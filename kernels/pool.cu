// Pool family: the fused spatial-attention pooling of the gated LoRA layer (KSTYLE.md):
//   w_s = sigmoid(logit_s)
//   h_att = sum_s w_s h_s / (sum_s w_s + 1e-6)      (B, D)
//   h_max = max_s h_s, per channel                   (B, D), argmax kept for backward
//   h_c = 0.7 h_att + 0.3 h_max                      (B, D)
// in one read of h (B, S, D); backward produces d_h and d_logits in one more read of h.
#include "common.cuh"

#define KS_POOL_EPS 1e-6f
#define KS_POOL_ATT 0.7f
#define KS_POOL_MAX 0.3f

// NaN wins (as torch.max), then the larger value, then the lower index among equals; a slot that
// has seen nothing (index INT_MAX) loses to anything.
__device__ __forceinline__ bool max_better(float v, int i, float bv, int bi) {
    if (bi == 0x7fffffff) return i != 0x7fffffff;
    if (v != v) return bv == bv || i < bi;
    if (bv != bv) return false;
    return v > bv || (v == bv && i < bi);
}

// One block's pass over rows [s0, s1) of batch b for 32 channels: block (32, 8), 32 channels per
// block so each row read is one coalesced 64/128-byte segment, 8 row-lanes walking the rows. On
// return, threads with ty == 0 hold the block's weighted sum, max and its row for channel d, and
// every thread holds the sum of the weights in W.
template <typename T>
__device__ __forceinline__ void spatial_pass(const T* __restrict__ h, const T* __restrict__ logits, int b, int d,
                                             int S, int D, int s0, int s1, float& num, float& mx, int& arg,
                                             float& W) {
    __shared__ float s_num[8][33], s_max[8][33], s_w[8];
    __shared__ int s_arg[8][33];
    const int ty = threadIdx.y;
    const T* hb = h + (i64)b * S * D;
    float wsum = 0.0f;
    num = 0.0f;
    mx = KS_NEG_INF;
    arg = 0x7fffffff;
    for (int s = s0 + ty; s < s1; s += 8) {
        const float w = 1.0f / (1.0f + expf(-ld(logits, (i64)b * S + s)));
        wsum += w;
        if (d < D) {
            const float v = ld(hb, (i64)s * D + d);
            num = fmaf(w, v, num);
            if (max_better(v, s, mx, arg)) {
                mx = v;
                arg = s;
            }
        }
    }
    s_num[ty][threadIdx.x] = num;
    s_max[ty][threadIdx.x] = mx;
    s_arg[ty][threadIdx.x] = arg;
    if (threadIdx.x == 0) s_w[ty] = wsum;
    __syncthreads();
    W = s_w[0];
#pragma unroll
    for (int k = 1; k < 8; ++k) W += s_w[k];
    if (ty == 0) {
        num = s_num[0][threadIdx.x];
        mx = s_max[0][threadIdx.x];
        arg = s_arg[0][threadIdx.x];
#pragma unroll
        for (int k = 1; k < 8; ++k) {
            num += s_num[k][threadIdx.x];
            if (max_better(s_max[k][threadIdx.x], s_arg[k][threadIdx.x], mx, arg)) {
                mx = s_max[k][threadIdx.x];
                arg = s_arg[k][threadIdx.x];
            }
        }
    }
}

// h_c = 0.7 num / (W + eps) + 0.3 max, and the statistics the backward reads.
template <typename T>
__device__ __forceinline__ void spatial_finish(T* h_c, float* h_att_out, int* argmax_out, float* sum_w_out, int b,
                                               int d, int D, float num, float mx, int arg, float W) {
    const float att = num / (W + KS_POOL_EPS);
    st(h_c, (i64)b * D + d, KS_POOL_ATT * att + KS_POOL_MAX * mx);
    if (h_att_out) h_att_out[(i64)b * D + d] = att;
    if (argmax_out) argmax_out[(i64)b * D + d] = arg;
    if (sum_w_out && d == 0) sum_w_out[b] = W;
}

// Whole rows in one block. Grid (ceil(D / 32), B), block (32, 8): for short sequences or enough
// (batch, channel) blocks to fill the device.
template <typename T>
__device__ __forceinline__ void spatial_fwd(const T* __restrict__ h, const T* __restrict__ logits, T* __restrict__ h_c,
                                            float* __restrict__ h_att_out, int* __restrict__ argmax_out,
                                            float* __restrict__ sum_w_out, int S, int D) {
    const int b = blockIdx.y, d = blockIdx.x * 32 + threadIdx.x;
    float num, mx, W;
    int arg;
    spatial_pass(h, logits, b, d, S, D, 0, S, num, mx, arg, W);
    if (threadIdx.y == 0 && d < D) spatial_finish(h_c, h_att_out, argmax_out, sum_w_out, b, d, D, num, mx, arg, W);
}

// Split rows: grid (ceil(D / 32), B, splits), block (32, 8); split z takes rows
// [z rows_per_split, min(S, (z + 1) rows_per_split)) and writes its partials at index
// (z B + b) D + d (part_w at z B + b). A (B, D) batch of one 640-channel image is 20 blocks when
// whole, too few for the device's 132 SMs; the SDXL training step pools 4,096 rows that way.
template <typename T>
__device__ __forceinline__ void spatial_part(const T* __restrict__ h, const T* __restrict__ logits,
                                             float* __restrict__ part_num, float* __restrict__ part_max,
                                             int* __restrict__ part_arg, float* __restrict__ part_w, int B, int S,
                                             int D, int rows_per_split) {
    const int b = blockIdx.y, d = blockIdx.x * 32 + threadIdx.x, z = blockIdx.z;
    const int s0 = z * rows_per_split, s1 = min(S, s0 + rows_per_split);
    float num, mx, W;
    int arg;
    spatial_pass(h, logits, b, d, S, D, s0, s1, num, mx, arg, W);
    if (threadIdx.y != 0) return;
    const i64 i = ((i64)z * B + b) * D + d;
    if (d < D) {
        part_num[i] = num;
        part_max[i] = mx;
        part_arg[i] = arg;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) part_w[(i64)z * B + b] = W;
}

// Combines the splits in order (sums in split order; the max keeps the first row among equals).
// GS over B * D, block 256.
template <typename T>
__device__ __forceinline__ void spatial_combine(const float* __restrict__ part_num, const float* __restrict__ part_max,
                                                const int* __restrict__ part_arg, const float* __restrict__ part_w,
                                                T* __restrict__ h_c, float* __restrict__ h_att_out,
                                                int* __restrict__ argmax_out, float* __restrict__ sum_w_out, int B,
                                                int D, int splits) {
    KS_GRID_STRIDE(i, (i64)B * D) {
        const int b = (int)(i / D), d = (int)(i % D);
        float num = 0.0f, mx = KS_NEG_INF, W = 0.0f;
        int arg = 0x7fffffff;
        for (int z = 0; z < splits; ++z) {
            const i64 j = ((i64)z * B + b) * D + d;
            num += part_num[j];
            W += part_w[(i64)z * B + b];
            if (max_better(part_max[j], part_arg[j], mx, arg)) {
                mx = part_max[j];
                arg = part_arg[j];
            }
        }
        spatial_finish(h_c, h_att_out, argmax_out, sum_w_out, b, d, D, num, mx, arg, W);
    }
}

// d_h[b,s,d] = 0.7 g_d w_s / (W + eps) + [s == argmax_d] 0.3 g_d
// d_w_s = sum_d 0.7 g_d (h_sd - h_att_d) / (W + eps);  d_logit_s = d_w_s w_s (1 - w_s)
// One warp per (b, s) row, lanes over d: the row dot for d_w_s is a warp reduction, and the d_h
// writes are coalesced. Block 256 = 8 rows; grid ceil(B * S / 8).
template <typename T>
__device__ __forceinline__ void spatial_bwd(const T* __restrict__ h, const T* __restrict__ logits,
                                            const T* __restrict__ d_hc, const float* __restrict__ h_att,
                                            const int* __restrict__ argmax, const float* __restrict__ sum_w,
                                            T* __restrict__ d_h, T* __restrict__ d_logits, int B, int S, int D,
                                            int accumulate) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (i64)B * S) return;
    const int b = (int)(row / S), s = (int)(row % S);
    const float w = 1.0f / (1.0f + expf(-ld(logits, row)));
    const float inv = 1.0f / (sum_w[b] + KS_POOL_EPS);
    float dw = 0.0f;
    for (int d = lane; d < D; d += 32) {
        const i64 bd = (i64)b * D + d, i = row * D + d;
        const float g = ld(d_hc, bd);
        const float hv = ld(h, i);
        dw += g * (hv - h_att[bd]);
        if (d_h) {
            float v = KS_POOL_ATT * g * w * inv + (argmax[bd] == s ? KS_POOL_MAX * g : 0.0f);
            if (accumulate) v += ld(d_h, i);
            st(d_h, i, v);
        }
    }
    dw = warp_sum(dw) * KS_POOL_ATT * inv;
    if (lane == 0 && d_logits) st(d_logits, row, dw * w * (1.0f - w));
}

#define KS_POOL(T, tn)                                                                                   \
    extern "C" __global__ void pool_spatial_fwd_##tn(const T* h, const T* logits, T* h_c, float* h_att,   \
                                                     int* argmax, float* sum_w, int B, int S, int D) {    \
        spatial_fwd<T>(h, logits, h_c, h_att, argmax, sum_w, S, D);                                      \
    }                                                                                                    \
    extern "C" __global__ void pool_spatial_part_fwd_##tn(const T* h, const T* logits, float* part_num,   \
                                                          float* part_max, int* part_arg, float* part_w,  \
                                                          int B, int S, int D, int rows_per_split) {      \
        spatial_part<T>(h, logits, part_num, part_max, part_arg, part_w, B, S, D, rows_per_split);       \
    }                                                                                                    \
    extern "C" __global__ void pool_spatial_combine_fwd_##tn(const float* part_num, const float* part_max, \
                                                             const int* part_arg, const float* part_w,    \
                                                             T* h_c, float* h_att, int* argmax,           \
                                                             float* sum_w, int B, int D, int splits) {    \
        spatial_combine<T>(part_num, part_max, part_arg, part_w, h_c, h_att, argmax, sum_w, B, D, splits); \
    }                                                                                                    \
    extern "C" __global__ void pool_spatial_bwd_##tn(const T* h, const T* logits, const T* d_h_c,         \
                                                     const float* h_att, const int* argmax,              \
                                                     const float* sum_w, T* d_h, T* d_logits, int B,     \
                                                     int S, int D, int accumulate) {                     \
        spatial_bwd<T>(h, logits, d_h_c, h_att, argmax, sum_w, d_h, d_logits, B, S, D, accumulate);      \
    }

KS_POOL(float, f32)
KS_POOL(bf16, bf16)
KS_POOL(f16, f16)
