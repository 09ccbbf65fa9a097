// Reduce family: softmax over the last dim (fwd/bwd), sum and max/argmax over the last dim of a
// contiguous (rows, n) view, and a deterministic column sum used to finish split reductions
// (norm and lora parameter gradients). One block per row: rows are long in this project
// (n = 77..4096), and a block keeps every SM busy once rows >= a few hundred.
#include "common.cuh"

// Online (max, sum-of-exp) pair: merging two partial states rescales the smaller-max side, so a
// row is read once to get both statistics (the classic two-pass would read it twice).
struct MaxSum {
    float m, s;
};
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
    float m = fmaxf(a.m, b.m);
    if (m == KS_NEG_INF) return MaxSum{m, 0.0f};
    return MaxSum{m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ MaxSum block_maxsum(MaxSum v, float* sm, float* ss) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
        v = merge(v, other);
    }
    if (lane == 0) {
        sm[warp] = v.m;
        ss[warp] = v.s;
    }
    __syncthreads();
    v = lane < nwarps ? MaxSum{sm[lane], ss[lane]} : MaxSum{KS_NEG_INF, 0.0f};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
        v = merge(v, other);
    }
    __syncthreads();
    return v;
}

// causal_sq > 0: the rows are (.., Sq, n) attention scores and row r (query i = r % Sq) sees only
// keys j <= i (top-left aligned, as the flash kernels); masked entries come out exactly 0, so the
// backward needs no mask (dx = y (dy - dot) is 0 wherever y is).
template <typename T>
__device__ __forceinline__ void softmax_fwd(const T* __restrict__ x, T* __restrict__ y, int n, int causal_sq) {
    __shared__ float sm[32], ss[32];
    const i64 base = (i64)blockIdx.x * n;
    const int visible = causal_sq > 0 ? min(n, (int)(blockIdx.x % (unsigned)causal_sq) + 1) : n;
    MaxSum acc{KS_NEG_INF, 0.0f};
    for (int j = threadIdx.x; j < visible; j += blockDim.x) acc = merge(acc, MaxSum{ld(x, base + j), 1.0f});
    acc = block_maxsum(acc, sm, ss);
    // A fully masked row (all -inf) gives 0/0 = NaN, as PyTorch does.
    const float inv = 1.0f / acc.s;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        st(y, base + j, j < visible ? __expf(ld(x, base + j) - acc.m) * inv : 0.0f);
}

// dx = y * (dy - sum(dy * y))
template <typename T>
__device__ __forceinline__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx, int n) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * n;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) dot += ld(y, base + j) * ld(dy, base + j);
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float yv = ld(y, base + j);
        st(dx, base + j, yv * (ld(dy, base + j) - dot));
    }
}

template <typename T>
__device__ __forceinline__ void sum_fwd(const T* __restrict__ x, T* __restrict__ y, int n) {
    __shared__ float scratch[32];
    const i64 base = (i64)blockIdx.x * n;
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) s += ld(x, base + j);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) st(y, blockIdx.x, s);
}

// (value, index) with NaN winning (PyTorch's max propagates NaN) and, among equal values, the
// lowest index, so the result does not depend on the block size.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    if (v != v) return bv == bv || i < bi;
    if (bv != bv) return false;
    return v > bv || (v == bv && i < bi);
}

template <typename T>
__device__ __forceinline__ void max_fwd(const T* __restrict__ x, T* __restrict__ y, int* __restrict__ argmax, int n) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const i64 base = (i64)blockIdx.x * n;
    float bv = KS_NEG_INF;
    int bi = 0x7fffffff;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = ld(x, base + j);
        if (better(v, j, bv, bi)) {
            bv = v;
            bi = j;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        bv = lane < nwarps ? sv[lane] : KS_NEG_INF;
        bi = lane < nwarps ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            // n >= 1 always (host rejects empty rows); an all -inf row keeps index 0.
            st(y, blockIdx.x, bv);
            if (argmax) argmax[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
        }
    }
}

#define KS_REDUCE(T, tn)                                                                                 \
    extern "C" __global__ void reduce_softmax_fwd_##tn(const T* x, T* y, int rows, int n, int causal_sq) { \
        softmax_fwd<T>(x, y, n, causal_sq);                                                             \
    }                                                                                                   \
    extern "C" __global__ void reduce_softmax_bwd_##tn(const T* y, const T* d_y, T* d_x, int rows, int n) { \
        softmax_bwd<T>(y, d_y, d_x, n);                                                                 \
    }                                                                                                   \
    extern "C" __global__ void reduce_sum_fwd_##tn(const T* x, T* y, int rows, int n) { sum_fwd<T>(x, y, n); } \
    extern "C" __global__ void reduce_max_fwd_##tn(const T* x, T* y, int* argmax, int rows, int n) {     \
        max_fwd<T>(x, y, argmax, n);                                                                    \
    }                                                                                                   \
    /* The max gradient goes to the arg-max position only; everything else is written 0. */          \
    extern "C" __global__ void reduce_max_bwd_##tn(const T* d_y, const int* argmax, T* d_x, int rows, int n) { \
        KS_GRID_STRIDE(i, (i64)rows * n) {                                                              \
            i64 r = i / n;                                                                              \
            int c = (int)(i - r * n);                                                                   \
            st(d_x, i, c == argmax[r] ? ld(d_y, r) : 0.0f);                                             \
        }                                                                                               \
    }

KS_REDUCE(float, f32)
KS_REDUCE(bf16, bf16)
KS_REDUCE(f16, f16)

// y[c] = sum_r x[r, c] over a contiguous f32 (rows, n), in a fixed order (deterministic, unlike
// atomics). Block (32, 8): 32 columns per block so each row segment is one coalesced 128-byte
// load; the 8 row-lanes are folded through shared memory at the end.
// accumulate != 0 adds into y (gradient accumulation across micro-batches).
extern "C" __global__ void reduce_colsum_fwd_f32(const float* __restrict__ x, float* __restrict__ y, int rows, int n,
                                                  int accumulate) {
    __shared__ float part[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (c < n)
        for (int r = threadIdx.y; r < rows; r += 8) s += x[(i64)r * n + c];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < n) {
        float t = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += part[k][threadIdx.x];
        y[c] = accumulate ? y[c] + t : t;
    }
}
