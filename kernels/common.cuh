// Shared helpers for every kstyle kernel family. Compiled by NVRTC 13.0 with no CUDA headers:
// NVRTC has neither cuda_fp16.h nor cuda_bf16.h built in, so 16-bit floats are carried as raw
// bit patterns in one-member structs and converted with single PTX instructions. The structs
// (not bare `unsigned short`) keep bf16 and f16 distinct types, so templates can overload on them.
#pragma once

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };
// float8 storage (torch.float8_e4m3fn, torch.float8_e5m2): frozen weights at one byte each. Only
// casts and raw moves read or write them; arithmetic kernels never see them.
struct f8e4m3 { unsigned char bits; };
struct f8e5m2 { unsigned char bits; };

typedef long long i64;
typedef unsigned long long u64;
// Bytes: the codes of the 8-bit optimizer state (optim.cu); moved, never cast.
typedef unsigned char u8;

// INFINITY is not defined under NVRTC.
#define KS_INF __int_as_float(0x7f800000)
#define KS_NEG_INF __int_as_float(0xff800000)

// ---- PTX primitives ----------------------------------------------------------------------------
// Every piece of inline assembly lives here, behind one small function each, so the host emulator
// (kernels/emu.h, defines KS_EMU) can supply the same functions from the PTX ISA's definitions.
#ifndef KS_EMU
// Round-to-nearest-even in hardware (sm_80+); NaN stays NaN, overflow goes to inf.
__device__ __forceinline__ unsigned short cvt_rn_bf16(float x) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ unsigned short cvt_rn_f16(float x) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float cvt_f32_f16(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// Two f32 -> one packed bf16x2 register (low half = lo), the operand format of mma.sync.
__device__ __forceinline__ unsigned cvt_rn_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// D = A B + C on one warp: mma.sync m16n8k16, bf16 operands, f32 accumulators (sm_80+).
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two transposed 8x8 b16 matrices from shared memory; lanes 0-15 each pass one 16-byte row.
__device__ __forceinline__ void ldmatrix_x2_trans(const unsigned short* row, unsigned& r0, unsigned& r1) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r0), "=r"(r1)
                 : "r"((unsigned)a));
}
// Four 8x8 b16 matrices from shared memory, not transposed; lanes 8i..8i+7 each pass one 16-byte
// row of matrix i. Register i of lane (g = lane / 4, t = lane % 4) holds (row g, cols 2t, 2t + 1)
// of matrix i: the B fragment of mma m16n8k16 when the rows are the n index.
__device__ __forceinline__ void ldmatrix_x4(const unsigned short* row, unsigned& r0, unsigned& r1, unsigned& r2,
                                            unsigned& r3) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"((unsigned)a));
}
// 16 bytes global -> shared without passing through registers (sm_80+): the first `src_bytes`
// (0 or 16) are copied, the rest zero-filled; both addresses 16-byte aligned, `src` valid even
// when nothing is read. Completes at cp_async_wait_all (then __syncthreads for other threads).
__device__ __forceinline__ void cp_async_16(unsigned short* dst, const void* src, int src_bytes) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"((unsigned)a), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
#endif

// ---- scalar conversion -------------------------------------------------------------------------
// bf16 -> f32 is exact: bf16 is the top half of an f32.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 x) { return cvt_f32_f16(x.bits); }

// float8 -> f32 is exact. e4m3fn: bias 7, subnormal step 2^-9, NaN only at S.1111.111. e5m2 is
// the top byte of an f16.
__device__ __forceinline__ float to_f32(f8e4m3 x) {
    const unsigned s = (x.bits & 0x80u) << 24, e = (x.bits >> 3) & 0xfu, m = x.bits & 0x7u;
    if (e == 0xfu && m == 0x7u) return __uint_as_float(s | 0x7ff00000u);
    if (e == 0u) return s ? -(float)m * (1.0f / 512.0f) : (float)m * (1.0f / 512.0f);
    return __uint_as_float(s | ((e + 120u) << 23) | (m << 20));
}
__device__ __forceinline__ float to_f32(f8e5m2 x) { return cvt_f32_f16((unsigned short)(x.bits << 8)); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return bf16{cvt_rn_bf16(x)}; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return f16{cvt_rn_f16(x)}; }
// f32 -> float8 as PyTorch rounds (src/tensor/float8.rs is the oracle and explains the
// constants): nearest, ties to even; e4m3fn saturates to +-448 (inf too), e5m2 gives inf from
// 61440. Subnormals round by one
// f32 add against a magic number whose ulp is the float8 subnormal step (the add must not be
// flushed to zero: neither the kernels nor NVRTC's defaults use -ftz).
template <> __device__ __forceinline__ f8e4m3 from_f32<f8e4m3>(float x) {
    unsigned bits = __float_as_uint(x);
    const unsigned char sign = (unsigned char)((bits >> 24) & 0x80u);
    const unsigned mag = bits & 0x7fffffffu;
    unsigned char out;
    if (mag > (255u << 23)) {
        out = 0x7f;
    } else if (mag >= 0x43e00000u) {
        out = 0x7e;
    } else if (mag < (121u << 23)) {
        const unsigned r = __float_as_uint(__uint_as_float(mag) + __uint_as_float(141u << 23));
        out = (unsigned char)(r - (141u << 23));
    } else {
        const unsigned r = mag + ((unsigned)(7 - 127) << 23) + 0x7ffffu + ((mag >> 20) & 1u);
        out = (unsigned char)(r >> 20);
    }
    return f8e4m3{(unsigned char)(out | sign)};
}
template <> __device__ __forceinline__ f8e5m2 from_f32<f8e5m2>(float x) {
    unsigned bits = __float_as_uint(x);
    const unsigned char sign = (unsigned char)((bits >> 24) & 0x80u);
    const unsigned mag = bits & 0x7fffffffu;
    unsigned char out;
    if (mag >= (143u << 23)) {
        out = mag > (255u << 23) ? 0x7f : 0x7c;
    } else if (mag < (113u << 23)) {
        const unsigned r = __float_as_uint(__uint_as_float(mag) + __uint_as_float(134u << 23));
        out = (unsigned char)(r - (134u << 23));
    } else {
        const unsigned r = mag + ((unsigned)(15 - 127) << 23) + 0xfffffu + ((mag >> 21) & 1u);
        out = (unsigned char)(r >> 21);
    }
    return f8e5m2{(unsigned char)(out | sign)};
}

template <typename T> __device__ __forceinline__ float ld(const T* p, i64 i) { return to_f32(p[i]); }
template <typename T> __device__ __forceinline__ void st(T* p, i64 i, float v) { p[i] = from_f32<T>(v); }

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) { return cvt_rn_bf16x2(lo, hi); }

// ---- math --------------------------------------------------------------------------------------
// expf/logf/erff/tanhf are NVRTC builtins; __expf is the fast SFU path (ex2.approx), accurate to
// a few ulp, which is what softmax and attention want. Accurate versions are kept where an op is
// the user-visible result (elementwise exp/log).
__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }

// ---- warp / block reductions -------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024). `scratch` holds >= 32 floats.
// Every thread gets the result. Ends with a barrier so scratch can be reused at once.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : KS_NEG_INF;
    v = warp_max(v);
    __syncthreads();
    return v;
}

// ---- strided layouts ---------------------------------------------------------------------------
// Up to 6 dims, PyTorch order (outermost first). Passed by value as kernel parameters; the Rust
// side mirrors them as #[repr(C)] structs. A broadcast dim has stride 0. `contig` is a bitmask the
// host fills: bit k set means operand k is plain contiguous in the output's element order, which
// turns the index walk into `offset = i` (a uniform branch, so no divergence).
#define KS_MAX_DIMS 6
struct Dims6 {
    int ndim;
    int contig;
    i64 shape[KS_MAX_DIMS];
};
struct Strides6 {
    i64 s[KS_MAX_DIMS];
};

// Offset of the element with linear (row-major over `d.shape`) index i. 32-bit division when
// the whole tensor fits (the usual case): 64-bit division is a ~70-instruction software routine.
__device__ __forceinline__ i64 strided_offset(i64 i, const Dims6& d, const Strides6& st, bool small) {
    i64 off = 0;
    if (small) {
        unsigned r = (unsigned)i;
#pragma unroll
        for (int k = KS_MAX_DIMS - 1; k >= 0; --k) {
            if (k < d.ndim) {
                unsigned n = (unsigned)d.shape[k];
                unsigned q = r / n;
                off += (i64)(r - q * n) * st.s[k];
                r = q;
            }
        }
    } else {
        u64 r = (u64)i;
#pragma unroll
        for (int k = KS_MAX_DIMS - 1; k >= 0; --k) {
            if (k < d.ndim) {
                u64 n = (u64)d.shape[k];
                u64 q = r / n;
                off += (i64)(r - q * n) * st.s[k];
                r = q;
            }
        }
    }
    return off;
}

// Grid-stride loop over [0, n): kernels launch min(ceil(n / block), 65535 * k) blocks and loop.
#define KS_GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)
