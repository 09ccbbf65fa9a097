// Elementwise family: strided unary ops and their backward, broadcasting binary ops and their
// backward, affine, clamp_min, casts, strided copy, concatenation, row gather and fill. Every output is contiguous; every
// forward input may be strided (a broadcast dim has stride 0). Math in f32 whatever the storage.
#include "common.cuh"

// ---- unary ops: forward f(x) and derivative f'(x) (backward recomputes from x) --------------
// 1/sqrt(2), 2/sqrt(pi) * 1/sqrt(2) and sqrt(2/pi) for the two GELU forms.
#define KS_SQRT1_2 0.70710678118654752f
#define KS_SQRT_2_OVER_PI 0.79788456080286536f
#define KS_INV_SQRT_2PI 0.39894228040143268f

struct OpNeg { static __device__ float f(float x) { return -x; } static __device__ float df(float) { return -1.0f; } };
struct OpExp { static __device__ float f(float x) { return expf(x); } static __device__ float df(float x) { return expf(x); } };
struct OpLog { static __device__ float f(float x) { return logf(x); } static __device__ float df(float x) { return 1.0f / x; } };
struct OpSqrt {
    static __device__ float f(float x) { return sqrtf(x); }
    static __device__ float df(float x) { return 0.5f / sqrtf(x); }
};
struct OpRecip {
    static __device__ float f(float x) { return 1.0f / x; }
    static __device__ float df(float x) { return -1.0f / (x * x); }
};
struct OpSqr { static __device__ float f(float x) { return x * x; } static __device__ float df(float x) { return 2.0f * x; } };
// PyTorch's abs backward is sign(x), 0 at 0.
struct OpAbs {
    static __device__ float f(float x) { return fabsf(x); }
    static __device__ float df(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }
};
// expf (not __expf) so that large |x| saturates cleanly to 0 / 1.
struct OpSigmoid {
    static __device__ float f(float x) { return 1.0f / (1.0f + expf(-x)); }
    static __device__ float df(float x) { float s = f(x); return s * (1.0f - s); }
};
struct OpSilu {
    static __device__ float f(float x) { return x / (1.0f + expf(-x)); }
    static __device__ float df(float x) { float s = 1.0f / (1.0f + expf(-x)); return s * (1.0f + x * (1.0f - s)); }
};
struct OpTanh {
    static __device__ float f(float x) { return tanhf(x); }
    static __device__ float df(float x) { float t = tanhf(x); return 1.0f - t * t; }
};
struct OpGelu {
    static __device__ float f(float x) { return 0.5f * x * (1.0f + erff(x * KS_SQRT1_2)); }
    static __device__ float df(float x) {
        return 0.5f * (1.0f + erff(x * KS_SQRT1_2)) + x * KS_INV_SQRT_2PI * expf(-0.5f * x * x);
    }
};
struct OpGeluTanh {
    static __device__ float f(float x) {
        float u = KS_SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    static __device__ float df(float x) {
        float u = KS_SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
        float t = tanhf(u);
        float du = KS_SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * x * x);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
};
// CLIP's activation: x * sigmoid(1.702 x).
struct OpQuickGelu {
    static __device__ float f(float x) { return x / (1.0f + expf(-1.702f * x)); }
    static __device__ float df(float x) {
        float s = 1.0f / (1.0f + expf(-1.702f * x));
        return s * (1.0f + 1.702f * x * (1.0f - s));
    }
};
// PyTorch: relu backward passes where x > 0.
struct OpRelu {
    static __device__ float f(float x) { return fmaxf(x, 0.0f); }
    static __device__ float df(float x) { return x > 0.0f ? 1.0f : 0.0f; }
};

template <typename Op, typename T>
__device__ __forceinline__ void unary_fwd(i64 n, const Dims6& dims, const Strides6& xs, const T* x, T* y) {
    const bool small = n <= 0xffffffffll;
    const bool contig = dims.contig & 1;
    KS_GRID_STRIDE(i, n) {
        i64 xi = contig ? i : strided_offset(i, dims, xs, small);
        st(y, i, Op::f(ld(x, xi)));
    }
}

// Backward inputs are contiguous (autograd keeps x and dy as produced), so no strides.
template <typename Op, typename T>
__device__ __forceinline__ void unary_bwd(i64 n, const T* x, const T* dy, T* dx) {
    KS_GRID_STRIDE(i, n) { st(dx, i, ld(dy, i) * Op::df(ld(x, i))); }
}

#define KS_UNARY(name, Op, T, tn)                                                                      \
    extern "C" __global__ void elementwise_##name##_fwd_##tn(i64 n, Dims6 dims, Strides6 x_strides,    \
                                                             const T* x, T* y) {                       \
        unary_fwd<Op, T>(n, dims, x_strides, x, y);                                                    \
    }                                                                                                  \
    extern "C" __global__ void elementwise_##name##_bwd_##tn(i64 n, const T* x, const T* d_y, T* d_x) { \
        unary_bwd<Op, T>(n, x, d_y, d_x);                                                              \
    }

#define KS_UNARY_ALL(name, Op) KS_UNARY(name, Op, float, f32) KS_UNARY(name, Op, bf16, bf16) KS_UNARY(name, Op, f16, f16)

KS_UNARY_ALL(neg, OpNeg)
KS_UNARY_ALL(exp, OpExp)
KS_UNARY_ALL(log, OpLog)
KS_UNARY_ALL(sqrt, OpSqrt)
KS_UNARY_ALL(recip, OpRecip)
KS_UNARY_ALL(sqr, OpSqr)
KS_UNARY_ALL(abs, OpAbs)
KS_UNARY_ALL(sigmoid, OpSigmoid)
KS_UNARY_ALL(silu, OpSilu)
KS_UNARY_ALL(tanh, OpTanh)
KS_UNARY_ALL(gelu, OpGelu)
KS_UNARY_ALL(gelu_tanh, OpGeluTanh)
KS_UNARY_ALL(quick_gelu, OpQuickGelu)
KS_UNARY_ALL(relu, OpRelu)

// ---- binary ops with broadcasting --------------------------------------------------------------
// fwd: z = f(x, y). bwd: (dz * df/dx, dz * df/dy) at full output shape; the host sums over the
// broadcast dims afterwards (reduce family), which keeps this kernel free of atomics.
struct OpAdd {
    static __device__ float f(float x, float y) { return x + y; }
    static __device__ float dx(float, float) { return 1.0f; }
    static __device__ float dy(float, float) { return 1.0f; }
};
struct OpSub {
    static __device__ float f(float x, float y) { return x - y; }
    static __device__ float dx(float, float) { return 1.0f; }
    static __device__ float dy(float, float) { return -1.0f; }
};
struct OpMul {
    static __device__ float f(float x, float y) { return x * y; }
    static __device__ float dx(float, float y) { return y; }
    static __device__ float dy(float x, float) { return x; }
};
struct OpDiv {
    static __device__ float f(float x, float y) { return x / y; }
    static __device__ float dx(float, float y) { return 1.0f / y; }
    static __device__ float dy(float x, float y) { return -x / (y * y); }
};
// Ties split the gradient evenly, as PyTorch's maximum/minimum do.
struct OpMaximum {
    static __device__ float f(float x, float y) { return fmaxf(x, y); }
    static __device__ float dx(float x, float y) { return x > y ? 1.0f : (x == y ? 0.5f : 0.0f); }
    static __device__ float dy(float x, float y) { return y > x ? 1.0f : (x == y ? 0.5f : 0.0f); }
};
struct OpMinimum {
    static __device__ float f(float x, float y) { return fminf(x, y); }
    static __device__ float dx(float x, float y) { return x < y ? 1.0f : (x == y ? 0.5f : 0.0f); }
    static __device__ float dy(float x, float y) { return y < x ? 1.0f : (x == y ? 0.5f : 0.0f); }
};

template <typename Op, typename T>
__device__ __forceinline__ void binary_fwd(i64 n, const Dims6& dims, const Strides6& xs, const Strides6& ys,
                                           const T* x, const T* y, T* z) {
    const bool small = n <= 0xffffffffll;
    const bool xc = dims.contig & 1, yc = dims.contig & 2;
    KS_GRID_STRIDE(i, n) {
        i64 xi = xc ? i : strided_offset(i, dims, xs, small);
        i64 yi = yc ? i : strided_offset(i, dims, ys, small);
        st(z, i, Op::f(ld(x, xi), ld(y, yi)));
    }
}

template <typename Op, typename T>
__device__ __forceinline__ void binary_bwd(i64 n, const Dims6& dims, const Strides6& xs, const Strides6& ys,
                                           const T* x, const T* y, const T* dz, T* dx, T* dy) {
    const bool small = n <= 0xffffffffll;
    const bool xc = dims.contig & 1, yc = dims.contig & 2;
    KS_GRID_STRIDE(i, n) {
        float xv = ld(x, xc ? i : strided_offset(i, dims, xs, small));
        float yv = ld(y, yc ? i : strided_offset(i, dims, ys, small));
        float g = ld(dz, i);
        if (dx) st(dx, i, g * Op::dx(xv, yv));
        if (dy) st(dy, i, g * Op::dy(xv, yv));
    }
}

#define KS_BINARY(name, Op, T, tn)                                                                          \
    extern "C" __global__ void elementwise_##name##_fwd_##tn(i64 n, Dims6 dims, Strides6 x_strides,         \
                                                             Strides6 y_strides, const T* x, const T* y,    \
                                                             T* z) {                                        \
        binary_fwd<Op, T>(n, dims, x_strides, y_strides, x, y, z);                                          \
    }                                                                                                       \
    extern "C" __global__ void elementwise_##name##_bwd_##tn(i64 n, Dims6 dims, Strides6 x_strides,         \
                                                             Strides6 y_strides, const T* x, const T* y,    \
                                                             const T* d_z, T* d_x, T* d_y) {                \
        binary_bwd<Op, T>(n, dims, x_strides, y_strides, x, y, d_z, d_x, d_y);                              \
    }

#define KS_BINARY_ALL(name, Op) KS_BINARY(name, Op, float, f32) KS_BINARY(name, Op, bf16, bf16) KS_BINARY(name, Op, f16, f16)

KS_BINARY_ALL(add, OpAdd)
KS_BINARY_ALL(sub, OpSub)
KS_BINARY_ALL(mul, OpMul)
KS_BINARY_ALL(div, OpDiv)
KS_BINARY_ALL(maximum, OpMaximum)
KS_BINARY_ALL(minimum, OpMinimum)

// ---- affine, clamp_min, copy, fill, cast -------------------------------------------------------
// affine backward is affine_fwd(d_y, a, 0).
// SplitMix64's output function (Steele, Lea and Flood 2014): the mix applied to a state.
__device__ __forceinline__ unsigned long long ks_splitmix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

#define KS_MISC(T, tn)                                                                                    \
    extern "C" __global__ void elementwise_affine_fwd_##tn(i64 n, Dims6 dims, Strides6 x_strides,         \
                                                           const T* x, T* y, float a, float b) {          \
        const bool small = n <= 0xffffffffll;                                                            \
        KS_GRID_STRIDE(i, n) {                                                                           \
            i64 xi = (dims.contig & 1) ? i : strided_offset(i, dims, x_strides, small);                  \
            st(y, i, fmaf(ld(x, xi), a, b));                                                             \
        }                                                                                                \
    }                                                                                                    \
    extern "C" __global__ void elementwise_clamp_min_fwd_##tn(i64 n, Dims6 dims, Strides6 x_strides,      \
                                                              const T* x, T* y, float lo) {               \
        const bool small = n <= 0xffffffffll;                                                            \
        KS_GRID_STRIDE(i, n) {                                                                           \
            i64 xi = (dims.contig & 1) ? i : strided_offset(i, dims, x_strides, small);                  \
            st(y, i, fmaxf(ld(x, xi), lo));                                                              \
        }                                                                                                \
    }                                                                                                    \
    /* The gradient passes where x > lo, as the CPU oracle (backend/cpu/elementwise.rs) defines it. */ \
    extern "C" __global__ void elementwise_clamp_min_bwd_##tn(i64 n, const T* x, const T* d_y, T* d_x,    \
                                                              float lo) {                                 \
        KS_GRID_STRIDE(i, n) { st(d_x, i, ld(x, i) > lo ? ld(d_y, i) : 0.0f); }                          \
    }                                                                                                    \
    extern "C" __global__ void elementwise_fill_fwd_##tn(i64 n, T* y, float value) {                     \
        const T v = from_f32<T>(value);                                                                  \
        KS_GRID_STRIDE(i, n) { y[i] = v; }                                                               \
    }                                                                                                    \
    /* LoRA network dropout's keep mask (nn/lora_dropout.rs entry_kept): element i of sample      */ \
    /* s = i / per_sample is kept when SplitMix64's (j + 1)-th output from the sample's key,       */ \
    /* splitmix(seed ^ salt), has its top 53 bits at or above the threshold ceil(p 2^53).          */ \
    extern "C" __global__ void elementwise_dropout_mask_fwd_##tn(i64 n, i64 per_sample, const i64* seeds, \
                                                                 unsigned long long salt,               \
                                                                 unsigned long long threshold, T* y) {  \
        KS_GRID_STRIDE(i, n) {                                                                           \
            const i64 s = i / per_sample;                                                                \
            const unsigned long long key = ks_splitmix((unsigned long long)seeds[s] ^ salt);             \
            const unsigned long long j = (unsigned long long)(i - s * per_sample) + 1ull;                \
            const unsigned long long u = ks_splitmix(key + j * 0x9E3779B97F4A7C15ull);                   \
            y[i] = from_f32<T>((u >> 11) >= threshold ? 1.0f : 0.0f);                                    \
        }                                                                                                \
    }

KS_MISC(float, f32)
KS_MISC(bf16, bf16)
KS_MISC(f16, f16)

// ---- raw element moves: copy, concatenation slice, row gather (every storage dtype, i64 too) --
// Bit-exact, NaN payloads included: no conversion happens.
#define KS_MOVE(T, tn)                                                                                    \
    extern "C" __global__ void elementwise_copy_fwd_##tn(i64 n, Dims6 dims, Strides6 x_strides,           \
                                                         const T* x, T* y) {                              \
        const bool small = n <= 0xffffffffll;                                                            \
        KS_GRID_STRIDE(i, n) {                                                                           \
            i64 xi = (dims.contig & 1) ? i : strided_offset(i, dims, x_strides, small);                  \
            y[i] = x[xi];                                                                                \
        }                                                                                                \
    }                                                                                                    \
    /* One part of a concatenation: x (outer, chunk) contiguous lands in y (outer, total) at column   \
       `offset`. One launch per part keeps the kernel free of a pointer table. */                       \
    extern "C" __global__ void elementwise_cat_fwd_##tn(i64 n, const T* x, T* y, i64 chunk, i64 total,    \
                                                        i64 offset) {                                     \
        KS_GRID_STRIDE(i, n) {                                                                           \
            const i64 o = i / chunk;                                                                     \
            y[o * total + offset + (i - o * chunk)] = x[i];                                              \
        }                                                                                                \
    }                                                                                                    \
    /* y (ids, d) = table[ids] for a contiguous (rows, d) table; the host validates the ids. */          \
    extern "C" __global__ void elementwise_index_select_fwd_##tn(i64 n, const T* table, const i64* ids,  \
                                                                 T* y, i64 d) {                           \
        KS_GRID_STRIDE(i, n) {                                                                           \
            const i64 r = i / d;                                                                         \
            y[i] = table[ids[r] * d + (i - r * d)];                                                      \
        }                                                                                                \
    }

KS_MOVE(float, f32)
KS_MOVE(bf16, bf16)
KS_MOVE(f16, f16)
KS_MOVE(f8e4m3, f8e4m3)
KS_MOVE(f8e5m2, f8e5m2)
KS_MOVE(i64, i64)
KS_MOVE(u8, u8)

// Arg-max indices: the reduce kernels write i32, tensors carry i64.
extern "C" __global__ void elementwise_cast_fwd_i32_i64(i64 n, const int* x, i64* y) {
    KS_GRID_STRIDE(i, n) { y[i] = (i64)x[i]; }
}
extern "C" __global__ void elementwise_cast_fwd_i64_i32(i64 n, const i64* x, int* y) {
    KS_GRID_STRIDE(i, n) { y[i] = (int)x[i]; }
}

// Casts read a strided source and write a contiguous destination, so a cast also makes contiguous.
// Rounding is round-to-nearest-even; f16 overflow gives inf, as in PyTorch.
#define KS_CAST(S, sn, D, dn)                                                                            \
    extern "C" __global__ void elementwise_cast_fwd_##sn##_##dn(i64 n, Dims6 dims, Strides6 x_strides,   \
                                                                const S* x, D* y) {                      \
        const bool small = n <= 0xffffffffll;                                                           \
        KS_GRID_STRIDE(i, n) {                                                                          \
            i64 xi = (dims.contig & 1) ? i : strided_offset(i, dims, x_strides, small);                 \
            y[i] = from_f32<D>(to_f32(x[xi]));                                                          \
        }                                                                                               \
    }

KS_CAST(float, f32, bf16, bf16)
KS_CAST(float, f32, f16, f16)
KS_CAST(bf16, bf16, float, f32)
KS_CAST(bf16, bf16, f16, f16)
KS_CAST(f16, f16, float, f32)
KS_CAST(f16, f16, bf16, bf16)
// float8 weights widen to the compute dtype before a GEMM (exact), and quantize from any float.
#define KS_CAST_F8(F, fn)                                                                                \
    KS_CAST(F, fn, float, f32)                                                                          \
    KS_CAST(F, fn, bf16, bf16)                                                                          \
    KS_CAST(F, fn, f16, f16)                                                                            \
    KS_CAST(float, f32, F, fn)                                                                          \
    KS_CAST(bf16, bf16, F, fn)                                                                          \
    KS_CAST(f16, f16, F, fn)
KS_CAST_F8(f8e4m3, f8e4m3)
KS_CAST_F8(f8e5m2, f8e5m2)
KS_CAST(f8e4m3, f8e4m3, f8e5m2, f8e5m2)
KS_CAST(f8e5m2, f8e5m2, f8e4m3, f8e4m3)
