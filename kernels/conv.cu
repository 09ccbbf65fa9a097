// Conv family (NCHW): im2col / col2im so that conv2d is one cuBLAS GEMM per image (forward and
// input gradient; the weight gradient is a GEMM against the same columns), nearest upsampling,
// average pooling and adaptive average pooling, each forward and backward, and max pooling forward.
//
// Backward kernels gather (one thread per input element sums the outputs that read it) instead of
// scattering with atomics: deterministic, and no f32 scratch buffer for 16-bit outputs.
#include "common.cuh"

struct ConvGeom {
    int N, C, H, W;
    int KH, KW, SH, SW, PH, PW, DH, DW;
    int OH, OW;
};

// col (N, C*KH*KW, OH*OW): row (c, ki, kj), column (oh, ow). One thread per col element with ow
// fastest, so writes are coalesced; reads of x are strided by SW, served from L1/L2.
template <typename T>
__device__ __forceinline__ void im2col(const T* __restrict__ x, T* __restrict__ col, const ConvGeom g) {
    const int P = g.OH * g.OW, KK = g.KH * g.KW, CKK = g.C * KK;
    const i64 total = (i64)g.N * CKK * P;
    KS_GRID_STRIDE(i, total) {
        const int p = (int)(i % P);
        const i64 rest = i / P;
        const int kk = (int)(rest % CKK), n = (int)(rest / CKK);
        const int c = kk / KK, kr = kk % KK, ki = kr / g.KW, kj = kr % g.KW;
        const int oh = p / g.OW, ow = p % g.OW;
        const int ih = oh * g.SH - g.PH + ki * g.DH, iw = ow * g.SW - g.PW + kj * g.DW;
        T v = from_f32<T>(0.0f);
        if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) v = x[(((i64)n * g.C + c) * g.H + ih) * g.W + iw];
        col[i] = v;
    }
}

// dx[n, c, h, w] = sum over (ki, kj) with h = oh*SH - PH + ki*DH (and likewise w) of dcol.
template <typename T>
__device__ __forceinline__ void col2im(const T* __restrict__ dcol, T* __restrict__ dx, const ConvGeom g) {
    const int P = g.OH * g.OW, KK = g.KH * g.KW;
    const i64 total = (i64)g.N * g.C * g.H * g.W;
    KS_GRID_STRIDE(i, total) {
        const int w = (int)(i % g.W);
        const i64 r1 = i / g.W;
        const int h = (int)(r1 % g.H);
        const i64 nc = r1 / g.H;
        const i64 col_base = nc * KK * P; // (n, c) row block of dcol: n*C*KK*P + c*KK*P
        float s = 0.0f;
        for (int ki = 0; ki < g.KH; ++ki) {
            const int th = h + g.PH - ki * g.DH;
            if (th < 0 || th % g.SH) continue;
            const int oh = th / g.SH;
            if (oh >= g.OH) continue;
            for (int kj = 0; kj < g.KW; ++kj) {
                const int tw = w + g.PW - kj * g.DW;
                if (tw < 0 || tw % g.SW) continue;
                const int ow = tw / g.SW;
                if (ow >= g.OW) continue;
                s += ld(dcol, col_base + (i64)(ki * g.KW + kj) * P + oh * g.OW + ow);
            }
        }
        st(dx, i, s);
    }
}

// ---- nearest upsample by an integer factor f ---------------------------------------------------
template <typename T>
__device__ __forceinline__ void upsample_fwd(const T* __restrict__ x, T* __restrict__ y, int NC, int H, int W, int f) {
    const int OW = f * W, OH = f * H;
    const i64 total = (i64)NC * OH * OW;
    KS_GRID_STRIDE(i, total) {
        const int ow = (int)(i % OW);
        const i64 r = i / OW;
        const int oh = (int)(r % OH);
        const i64 nc = r / OH;
        y[i] = x[(nc * H + oh / f) * W + ow / f];
    }
}

// Each input pixel gathers its f x f block (no atomics).
template <typename T>
__device__ __forceinline__ void upsample_bwd(const T* __restrict__ dy, T* __restrict__ dx, int NC, int H, int W, int f) {
    const int OW = f * W;
    const i64 total = (i64)NC * H * W;
    KS_GRID_STRIDE(i, total) {
        const int w = (int)(i % W);
        const i64 r = i / W;
        const int h = (int)(r % H);
        const i64 nc = r / H;
        const i64 o = (nc * f * H + (i64)f * h) * OW + (i64)f * w;
        float s = 0.0f;
        for (int a = 0; a < f; ++a)
            for (int b = 0; b < f; ++b) s += ld(dy, o + (i64)a * OW + b);
        st(dx, i, s);
    }
}

// ---- average pooling ---------------------------------------------------------------------------
// PyTorch defaults: count_include_pad = true, so the divisor is always KH * KW (padding counts).
template <typename T>
__device__ __forceinline__ void avgpool_fwd(const T* __restrict__ x, T* __restrict__ y, const ConvGeom g) {
    const i64 total = (i64)g.N * g.C * g.OH * g.OW;
    const float inv = 1.0f / (g.KH * g.KW);
    KS_GRID_STRIDE(i, total) {
        const int ow = (int)(i % g.OW);
        const i64 r = i / g.OW;
        const int oh = (int)(r % g.OH);
        const i64 nc = r / g.OH;
        float s = 0.0f;
        for (int ki = 0; ki < g.KH; ++ki) {
            const int ih = oh * g.SH - g.PH + ki;
            if (ih < 0 || ih >= g.H) continue;
            for (int kj = 0; kj < g.KW; ++kj) {
                const int iw = ow * g.SW - g.PW + kj;
                if (iw >= 0 && iw < g.W) s += ld(x, (nc * g.H + ih) * g.W + iw);
            }
        }
        st(y, i, s * inv);
    }
}

// Output rows that read input row h: oh with oh*SH - PH <= h < oh*SH - PH + KH.
template <typename T>
__device__ __forceinline__ void avgpool_bwd(const T* __restrict__ dy, T* __restrict__ dx, const ConvGeom g) {
    const i64 total = (i64)g.N * g.C * g.H * g.W;
    const float inv = 1.0f / (g.KH * g.KW);
    KS_GRID_STRIDE(i, total) {
        const int w = (int)(i % g.W);
        const i64 r = i / g.W;
        const int h = (int)(r % g.H);
        const i64 nc = r / g.H;
        const int th = h + g.PH, tw = w + g.PW;
        const int oh0 = th < g.KH ? 0 : (th - g.KH) / g.SH + 1, oh1 = min(g.OH - 1, th / g.SH);
        const int ow0 = tw < g.KW ? 0 : (tw - g.KW) / g.SW + 1, ow1 = min(g.OW - 1, tw / g.SW);
        float s = 0.0f;
        for (int oh = oh0; oh <= oh1; ++oh)
            for (int ow = ow0; ow <= ow1; ++ow) s += ld(dy, (nc * g.OH + oh) * g.OW + ow);
        st(dx, i, s * inv);
    }
}

// Adaptive pooling window of output index o over an input of size n split into m bins:
// [floor(o*n/m), ceil((o+1)*n/m)), PyTorch's definition (windows may overlap when n % m != 0).
__device__ __forceinline__ int win_start(int o, int n, int m) { return (int)(((i64)o * n) / m); }
__device__ __forceinline__ int win_end(int o, int n, int m) { return (int)(((i64)(o + 1) * n + m - 1) / m); }

template <typename T>
__device__ __forceinline__ void adaptive_avgpool_fwd(const T* __restrict__ x, T* __restrict__ y, int NC, int H,
                                                     int W, int OH, int OW) {
    const i64 total = (i64)NC * OH * OW;
    KS_GRID_STRIDE(i, total) {
        const int ow = (int)(i % OW);
        const i64 r = i / OW;
        const int oh = (int)(r % OH);
        const i64 nc = r / OH;
        const int h0 = win_start(oh, H, OH), h1 = win_end(oh, H, OH);
        const int w0 = win_start(ow, W, OW), w1 = win_end(ow, W, OW);
        float s = 0.0f;
        for (int h = h0; h < h1; ++h)
            for (int w = w0; w < w1; ++w) s += ld(x, (nc * H + h) * W + w);
        st(y, i, s / (float)((h1 - h0) * (w1 - w0)));
    }
}

// Output bins containing input row h: every oh with win_start(oh) <= h < win_end(oh). Bins are
// monotone, so scan from the bin floor(h*OH/H) outwards (at most a few bins overlap).
template <typename T>
__device__ __forceinline__ void adaptive_avgpool_bwd(const T* __restrict__ dy, T* __restrict__ dx, int NC, int H,
                                                     int W, int OH, int OW) {
    const i64 total = (i64)NC * H * W;
    KS_GRID_STRIDE(i, total) {
        const int w = (int)(i % W);
        const i64 r = i / W;
        const int h = (int)(r % H);
        const i64 nc = r / H;
        const int ohc = (int)(((i64)h * OH) / H), owc = (int)(((i64)w * OW) / W);
        float s = 0.0f;
        for (int oh = max(0, ohc - 1); oh < OH; ++oh) {
            const int h0 = win_start(oh, H, OH), h1 = win_end(oh, H, OH);
            if (h0 > h) break;
            if (h >= h1) continue;
            for (int ow = max(0, owc - 1); ow < OW; ++ow) {
                const int w0 = win_start(ow, W, OW), w1 = win_end(ow, W, OW);
                if (w0 > w) break;
                if (w >= w1) continue;
                s += ld(dy, (nc * OH + oh) * OW + ow) / (float)((h1 - h0) * (w1 - w0));
            }
        }
        st(dx, i, s);
    }
}

// Max pooling, no padding (LPIPS' AlexNet; forward only, nothing trains through it).
template <typename T>
__device__ __forceinline__ void maxpool_fwd(const T* __restrict__ x, T* __restrict__ y, const ConvGeom g) {
    const i64 total = (i64)g.N * g.C * g.OH * g.OW;
    KS_GRID_STRIDE(i, total) {
        const int ow = (int)(i % g.OW);
        const i64 r = i / g.OW;
        const int oh = (int)(r % g.OH);
        const i64 nc = r / g.OH;
        float m = KS_NEG_INF;
        for (int ki = 0; ki < g.KH; ++ki)
            for (int kj = 0; kj < g.KW; ++kj)
                m = fmaxf(m, ld(x, (nc * g.H + oh * g.SH + ki) * g.W + ow * g.SW + kj));
        st(y, i, m);
    }
}

#define KS_CONV(T, tn)                                                                                     \
    extern "C" __global__ void conv_im2col_fwd_##tn(const T* x, T* col, ConvGeom g) { im2col<T>(x, col, g); } \
    extern "C" __global__ void conv_im2col_bwd_##tn(const T* d_col, T* d_x, ConvGeom g) {                  \
        col2im<T>(d_col, d_x, g);                                                                         \
    }                                                                                                     \
    extern "C" __global__ void conv_upsample_fwd_##tn(const T* x, T* y, int NC, int H, int W, int f) {    \
        upsample_fwd<T>(x, y, NC, H, W, f);                                                               \
    }                                                                                                     \
    extern "C" __global__ void conv_upsample_bwd_##tn(const T* d_y, T* d_x, int NC, int H, int W, int f) { \
        upsample_bwd<T>(d_y, d_x, NC, H, W, f);                                                           \
    }                                                                                                     \
    extern "C" __global__ void conv_maxpool_fwd_##tn(const T* x, T* y, ConvGeom g) { maxpool_fwd<T>(x, y, g); } \
    extern "C" __global__ void conv_avgpool_fwd_##tn(const T* x, T* y, ConvGeom g) { avgpool_fwd<T>(x, y, g); } \
    extern "C" __global__ void conv_avgpool_bwd_##tn(const T* d_y, T* d_x, ConvGeom g) {                   \
        avgpool_bwd<T>(d_y, d_x, g);                                                                      \
    }                                                                                                     \
    extern "C" __global__ void conv_adaptive_avgpool_fwd_##tn(const T* x, T* y, int NC, int H, int W,     \
                                                              int OH, int OW) {                           \
        adaptive_avgpool_fwd<T>(x, y, NC, H, W, OH, OW);                                                  \
    }                                                                                                     \
    extern "C" __global__ void conv_adaptive_avgpool_bwd_##tn(const T* d_y, T* d_x, int NC, int H, int W, \
                                                              int OH, int OW) {                           \
        adaptive_avgpool_bwd<T>(d_y, d_x, NC, H, W, OH, OW);                                              \
    }

KS_CONV(float, f32)
KS_CONV(bf16, bf16)
KS_CONV(f16, f16)
