// Optimizer family: AdamW with PyTorch semantics over one flat f32 master buffer (every trainable
// tensor packed back to back), f32 moments, and an optional bf16 copy of the updated weights for
// the forward pass, written in the same sweep so the weights are read once per step.
//
//   p <- p - lr * wd * p                      (decoupled weight decay, applied first)
//   m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
//   p <- p - lr * (m / bc1) / (sqrt(v / bc2) + eps),   bc1 = 1 - b1^t, bc2 = 1 - b2^t
//
// The host computes bc1/bc2 in f64 from the step count t (t starts at 1). g is multiplied by
// grad_scale first (1 / accumulation steps, or a clipping factor), saving a separate pass.
#include "common.cuh"

struct AdamWParams {
    float lr, beta1, beta2, eps, weight_decay;
    float bias_correction1, bias_correction2;
    float grad_scale;
};

// One element's update; `step` = lr / bc1, `decay` = 1 - lr * wd (hoisted by the caller).
__device__ __forceinline__ void adamw_element(float* __restrict__ p, const float* __restrict__ g,
                                              float* __restrict__ m, float* __restrict__ v,
                                              bf16* __restrict__ p_bf16, i64 i, const AdamWParams& h,
                                              float step, float inv_sqrt_bc2, float decay) {
    const float gi = g[i] * h.grad_scale;
    const float mi = fmaf(h.beta1, m[i], (1.0f - h.beta1) * gi);
    const float vi = fmaf(h.beta2, v[i], (1.0f - h.beta2) * gi * gi);
    const float denom = sqrtf(vi) * inv_sqrt_bc2 + h.eps;
    const float pi = p[i] * decay - step * mi / denom;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    if (p_bf16) p_bf16[i] = from_f32<bf16>(pi);
}

extern "C" __global__ void optim_adamw_step_f32(float* __restrict__ p, const float* __restrict__ g,
                                                float* __restrict__ m, float* __restrict__ v,
                                                bf16* __restrict__ p_bf16, i64 n, AdamWParams h) {
    // PyTorch computes sqrt(v) / sqrt(bc2) + eps; multiplying by the hoisted 1 / sqrt(bc2) saves a
    // division per element and differs from it by at most an ulp of the denominator.
    const float step = h.lr / h.bias_correction1;
    const float inv_sqrt_bc2 = 1.0f / sqrtf(h.bias_correction2);
    const float decay = 1.0f - h.lr * h.weight_decay;
    KS_GRID_STRIDE(i, n) { adamw_element(p, g, m, v, p_bf16, i, h, step, inv_sqrt_bc2, decay); }
}

// The same step with a learning rate per piece of the flat buffers (parameter groups that
// interleave, as LoRA+ gives lora_up its own rate in every module): block b updates piece b with
// its own rate; h.lr is unused. The host cuts runs of equal rate into pieces of at most one
// block's chunk and uploads the table once per step. The rate arrives as f64 and is rounded to
// f32 here, exactly as the host rounds h.lr for optim_adamw_step_f32, so both launches agree.
struct RatePiece {
    i64 offset;
    i64 len;
    double lr;
};

extern "C" __global__ void optim_adamw_pieces_step_f32(const RatePiece* __restrict__ pieces, float* __restrict__ p,
                                                  const float* __restrict__ g, float* __restrict__ m,
                                                  float* __restrict__ v, AdamWParams h) {
    const RatePiece pc = pieces[blockIdx.x];
    const float lr = static_cast<float>(pc.lr);
    const float step = lr / h.bias_correction1;
    const float inv_sqrt_bc2 = 1.0f / sqrtf(h.bias_correction2);
    const float decay = 1.0f - lr * h.weight_decay;
    for (i64 k = threadIdx.x; k < pc.len; k += blockDim.x) {
        adamw_element(p, g, m, v, nullptr, pc.offset + k, h, step, inv_sqrt_bc2, decay);
    }
}

// Sum of squares of a flat f32 buffer, for the global gradient norm (clipping, logging). Each
// block writes one partial; the host (or reduce_sum_fwd_f32 over the partials) finishes it.
// Block 256, grid = min(ceil(n / 256), 1024): partial count stays small enough for one more pass.
extern "C" __global__ void optim_sqnorm_fwd_f32(const float* __restrict__ x, float* __restrict__ partial, i64 n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    KS_GRID_STRIDE(i, n) { s = fmaf(x[i], x[i], s); }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Multi-tensor passes between the flat optimizer buffers and the trainables' own storage, so a
// step costs a fixed handful of launches however many tensors the adapter has (3,522 for the tiny
// kstyle adapter). The host cuts every tensor into pieces of at most one block's chunk and
// uploads the table once per pass; block b handles piece b.
struct Piece {
    u64 ptr;     // the tensor's first element (contiguous)
    i64 offset;  // where that element sits in the flat buffer
    i64 len;
};

// flat[offset + i] += src[i]: summing micro-batch gradients into the flat accumulator.
extern "C" __global__ void optim_gather_add_fwd_f32(const Piece* __restrict__ pieces, float* __restrict__ flat) {
    const Piece pc = pieces[blockIdx.x];
    const float* src = reinterpret_cast<const float*>(pc.ptr);
    float* dst = flat + pc.offset;
    for (i64 i = threadIdx.x; i < pc.len; i += blockDim.x) dst[i] += src[i];
}

// dst[i] = flat[offset + i], rounded to the trainable's dtype: the updated master values back into
// the tensors the model reads.
template <typename T>
__device__ void scatter(const Piece* __restrict__ pieces, const float* __restrict__ flat) {
    const Piece pc = pieces[blockIdx.x];
    T* dst = reinterpret_cast<T*>(pc.ptr);
    const float* src = flat + pc.offset;
    for (i64 i = threadIdx.x; i < pc.len; i += blockDim.x) dst[i] = from_f32<T>(src[i]);
}

extern "C" __global__ void optim_scatter_fwd_f32(const Piece* pieces, const float* flat) { scatter<float>(pieces, flat); }
extern "C" __global__ void optim_scatter_fwd_bf16(const Piece* pieces, const float* flat) { scatter<bf16>(pieces, flat); }
extern "C" __global__ void optim_scatter_fwd_f16(const Piece* pieces, const float* flat) { scatter<f16>(pieces, flat); }

// Prodigy (prodigyopt 1.1.2, kohya's --optimizer_type Prodigy) over the same flat buffers plus
// two more, s and the starting values p0: two passes a step around one decision on the host.
//
//   pass 1 (moments): num += g (p0 - p);  m <- b1 m + d (1 - b1) g;  v <- b2 v + d^2 (1 - b2) g^2;
//                     s <- b3 s + s_coef g;  den += |s|
//   host:             d from num and den (see src/train/prodigy.rs)
//   pass 2 (update):  p <- p - wd dlr p - dlr m / (sqrt(v) + d eps)
//
// Both walk a RatePiece table of the trainables whose rate is not 0 (a frozen group keeps no
// state, as prodigyopt's lr-0 groups); pass 1 writes one (num, den) pair per block, summed on the
// host in f64. g is multiplied by grad_scale first, as in AdamW.
struct ProdigyParams {
    float beta1, beta2, beta3, d, s_coef, grad_scale;
};

extern "C" __global__ void optim_prodigy_moments_step_f32(const RatePiece* __restrict__ pieces, const float* __restrict__ p,
                                                     const float* __restrict__ p0, const float* __restrict__ g,
                                                     float* __restrict__ m, float* __restrict__ v,
                                                     float* __restrict__ s, float* __restrict__ partial,
                                                     ProdigyParams h) {
    __shared__ float scratch[32];
    const RatePiece pc = pieces[blockIdx.x];
    const float c1 = h.d * (1.0f - h.beta1);
    const float c2 = h.d * h.d * (1.0f - h.beta2);
    float num = 0.0f, den = 0.0f;
    for (i64 k = threadIdx.x; k < pc.len; k += blockDim.x) {
        const i64 i = pc.offset + k;
        const float gi = g[i] * h.grad_scale;
        num = fmaf(gi, p0[i] - p[i], num);
        m[i] = fmaf(h.beta1, m[i], c1 * gi);
        v[i] = fmaf(h.beta2, v[i], c2 * gi * gi);
        const float si = fmaf(h.beta3, s[i], h.s_coef * gi);
        s[i] = si;
        den += fabsf(si);
    }
    num = block_sum(num, scratch);
    den = block_sum(den, scratch);
    if (threadIdx.x == 0) {
        partial[2 * blockIdx.x] = num;
        partial[2 * blockIdx.x + 1] = den;
    }
}

struct ProdigyUpdate {
    float dlr, weight_decay, d_eps;
};

extern "C" __global__ void optim_prodigy_update_step_f32(const RatePiece* __restrict__ pieces, float* __restrict__ p,
                                                    const float* __restrict__ m, const float* __restrict__ v,
                                                    ProdigyUpdate h) {
    const RatePiece pc = pieces[blockIdx.x];
    const float decay = 1.0f - h.weight_decay * h.dlr;
    for (i64 k = threadIdx.x; k < pc.len; k += blockDim.x) {
        const i64 i = pc.offset + k;
        p[i] = p[i] * decay - h.dlr * m[i] / (sqrtf(v[i]) + h.d_eps);
    }
}

// Lion (lion-pytorch 0.2.5, kohya's --optimizer_type Lion) over the flat masters and its one
// moment, with a rate per piece (the RatePiece table: one run, or LoRA+'s interleaved groups):
//
//   p <- p (1 - lr wd);  p <- p - lr sgn(b1 m + (1 - b1) g);  m <- b2 m + (1 - b2) g
//
// sgn as PyTorch's: 0 for 0 (a gradient and moment both zero move nothing), NaN for NaN. wd
// arrives already divided by the starting rate when the decay is decoupled. g is multiplied by
// grad_scale first, as in AdamW.
struct LionParams {
    float beta1, beta2, weight_decay, grad_scale;
};

extern "C" __global__ void optim_lion_step_f32(const RatePiece* __restrict__ pieces, float* __restrict__ p,
                                          const float* __restrict__ g, float* __restrict__ m, LionParams h) {
    const RatePiece pc = pieces[blockIdx.x];
    const float lr = static_cast<float>(pc.lr);
    const float decay = 1.0f - lr * h.weight_decay;
    for (i64 k = threadIdx.x; k < pc.len; k += blockDim.x) {
        const i64 i = pc.offset + k;
        const float gi = g[i] * h.grad_scale;
        const float mi = m[i];
        const float c = fmaf(h.beta1, mi, (1.0f - h.beta1) * gi);
        const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : c);
        p[i] = fmaf(-lr, sign, p[i] * decay);
        m[i] = fmaf(h.beta2, mi, (1.0f - h.beta2) * gi);
    }
}

// AdamW with 8-bit moments (bitsandbytes' AdamW8bit, kohya's --optimizer_type AdamW8bit; see
// src/train/adamw8bit.rs). A trainable of at least min_8bit_size elements keeps each moment as
// one byte per element, the nearest code of value / absmax in a 256-entry map (signed for m,
// unsigned for v), with one f32 absmax per block of 256 of its elements; smaller trainables keep
// f32 moments and step as plain AdamW. One launch steps every trainable: block b handles chunk b
// of 256 elements, found in the slot table by its first chunk (a binary search over the slots).
// For a quantized chunk (one quantization block):
//
//   m, v   <- code * absmax                         (dequantize)
//   m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
//   p <- p (1 - lr wd) - (lr / bc1) m / (sqrt(v / bc2) + eps)
//   absmax <- max |m|, max |v| over the chunk;  code <- nearest(m / absmax)   (ties to the lower)
//
// The maps arrive as 512 floats (signed, then unsigned); the midpoints between codes are formed
// in f32 exactly as bitsandbytes' quantizer forms them. A chunk whose moment is 0 throughout gets
// absmax 0 and the code of 0.
struct Slot8 {
    i64 offset;  // the trainable in the masters and the gradient
    i64 len;
    i64 state;   // its moments in m / v (f32) or q1 / q2 (codes)
    i64 block;   // its first absmax entry; -1 for f32 moments
    i64 chunk0;  // its first chunk (block of this launch)
    double lr;
};

struct AdamW8bitParams {
    float beta1, beta2, eps, weight_decay;
    float bias_correction1, bias_correction2;
    float grad_scale;
    int count;  // slots in the table
};

// The number of midpoints between consecutive codes that lie below x: the nearest code's index.
__device__ __forceinline__ u8 nearest_code(const float* __restrict__ code, float x) {
    int lo = 0, hi = 255;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if ((code[mid] + code[mid + 1]) * 0.5f < x) lo = mid + 1;
        else hi = mid;
    }
    return (u8)lo;
}

// The slot whose chunks include this block: the last one starting at or before it.
__device__ __forceinline__ Slot8 slot_of_block(const Slot8* __restrict__ slots, int count) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (slots[mid].chunk0 <= (i64)blockIdx.x) lo = mid;
        else hi = mid - 1;
    }
    return slots[lo];
}

extern "C" __global__ void __launch_bounds__(256) optim_adamw8bit_step_f32(
    const Slot8* __restrict__ slots, const float* __restrict__ maps, float* __restrict__ p,
    const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v, u8* __restrict__ q1,
    u8* __restrict__ q2, float* __restrict__ absmax1, float* __restrict__ absmax2, AdamW8bitParams h) {
    __shared__ float code1[256];
    __shared__ float code2[256];
    __shared__ float scratch[32];
    code1[threadIdx.x] = maps[threadIdx.x];
    code2[threadIdx.x] = maps[256 + threadIdx.x];
    const Slot8 sl = slot_of_block(slots, h.count);
    const i64 chunk = (i64)blockIdx.x - sl.chunk0;
    const i64 e = chunk * 256 + threadIdx.x;
    const bool live = e < sl.len;
    const float lr = static_cast<float>(sl.lr);
    const float step = lr / h.bias_correction1;
    const float inv_sqrt_bc2 = 1.0f / sqrtf(h.bias_correction2);
    const float decay = 1.0f - lr * h.weight_decay;
    __syncthreads();

    float mi = 0.0f, vi = 0.0f;
    if (live) {
        const i64 i = sl.offset + e, s = sl.state + e;
        const float gi = g[i] * h.grad_scale;
        float m0, v0;
        if (sl.block < 0) {
            m0 = m[s];
            v0 = v[s];
        } else {
            m0 = code1[q1[s]] * absmax1[sl.block + chunk];
            v0 = code2[q2[s]] * absmax2[sl.block + chunk];
        }
        mi = fmaf(h.beta1, m0, (1.0f - h.beta1) * gi);
        vi = fmaf(h.beta2, v0, (1.0f - h.beta2) * gi * gi);
        p[i] = p[i] * decay - step * mi / (sqrtf(vi) * inv_sqrt_bc2 + h.eps);
        if (sl.block < 0) {
            m[s] = mi;
            v[s] = vi;
        }
    }
    if (sl.block < 0) return;  // the whole block takes the same branch

    const float top1 = block_max(fabsf(mi), scratch);
    const float top2 = block_max(fabsf(vi), scratch);
    if (threadIdx.x == 0) {
        absmax1[sl.block + chunk] = top1;
        absmax2[sl.block + chunk] = top2;
    }
    if (live) {
        const i64 s = sl.state + e;
        const float x1 = top1 > 0.0f ? fminf(fmaxf(mi / top1, -1.0f), 1.0f) : 0.0f;
        const float x2 = top2 > 0.0f ? fminf(vi / top2, 1.0f) : 0.0f;
        q1[s] = nearest_code(code1, x1);
        q2[s] = nearest_code(code2, x2);
    }
}

// Lion with its one moment in 8 bits (bitsandbytes' Lion8bit, kohya's --optimizer_type Lion8bit):
// the same slot table and chunks as optim_adamw8bit_step_f32, m quantized with the signed map,
// small slots with an f32 m stepping as optim_lion_step_f32:
//
//   m <- code * absmax;  p <- p (1 - lr wd) - lr sgn(b1 m + (1 - b1) g);  m <- b2 m + (1 - b2) g
//   absmax <- max |m| over the chunk;  code <- nearest(m / absmax)
struct Lion8bitParams {
    float beta1, beta2, weight_decay, grad_scale;
    int count;
};

extern "C" __global__ void __launch_bounds__(256) optim_lion8bit_step_f32(
    const Slot8* __restrict__ slots, const float* __restrict__ maps, float* __restrict__ p,
    const float* __restrict__ g, float* __restrict__ m, u8* __restrict__ q1,
    float* __restrict__ absmax1, Lion8bitParams h) {
    __shared__ float code1[256];
    __shared__ float scratch[32];
    code1[threadIdx.x] = maps[threadIdx.x];
    const Slot8 sl = slot_of_block(slots, h.count);
    const i64 chunk = (i64)blockIdx.x - sl.chunk0;
    const i64 e = chunk * 256 + threadIdx.x;
    const bool live = e < sl.len;
    const float lr = static_cast<float>(sl.lr);
    const float decay = 1.0f - lr * h.weight_decay;
    __syncthreads();

    float mi = 0.0f;
    if (live) {
        const i64 i = sl.offset + e, s = sl.state + e;
        const float gi = g[i] * h.grad_scale;
        const float m0 = sl.block < 0 ? m[s] : code1[q1[s]] * absmax1[sl.block + chunk];
        const float c = fmaf(h.beta1, m0, (1.0f - h.beta1) * gi);
        const float sign = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : c);
        p[i] = fmaf(-lr, sign, p[i] * decay);
        mi = fmaf(h.beta2, m0, (1.0f - h.beta2) * gi);
        if (sl.block < 0) m[s] = mi;
    }
    if (sl.block < 0) return;  // the whole block takes the same branch

    const float top = block_max(fabsf(mi), scratch);
    if (threadIdx.x == 0) absmax1[sl.block + chunk] = top;
    if (live) {
        const float x = top > 0.0f ? fminf(fmaxf(mi / top, -1.0f), 1.0f) : 0.0f;
        q1[sl.state + e] = nearest_code(code1, x);
    }
}

// Adafactor (transformers' Adafactor, kohya's --optimizer_type AdaFactor; see
// src/train/adafactor.rs): one block per trainable. A trainable of two dims or more, shape
// (..., R, C), is L matrices (L the product of its leading dims) and keeps running means of
// g^2 + eps1 over each matrix's rows (L R values) and columns (L C); a vector keeps a whole second
// moment. With beta2t = 1 - t^decay_rate (the host's, t from 1):
//
//   row <- beta2t row + (1 - beta2t) mean_c(g^2 + eps1);  col likewise over r      (factored)
//   u = g rsqrt(row / mean_r(row)) rsqrt(col)
//   v <- beta2t v + (1 - beta2t) (g^2 + eps1);  u = g rsqrt(v)                   (a vector)
//   lr = rate * (scale_parameter ? max(eps2, RMS(p)) : 1)      (RMS(p) before the step)
//   u <- lr u / max(1, RMS(u) / clip);  with a first moment m <- b1 m + (1 - b1) u, u <- m
//   p <- p - lr wd p - u
//
// `rate` is the schedule's, or the relative step the host computes. The row and column means are
// one warp per line; each matrix's mean of its row means is kept in L scratch values after the
// column means. Roofline: the gradient is read three times (lines, RMS(u), step), p twice.
struct FactorSlot {
    i64 offset;  // the trainable in the masters, the gradient and m
    i64 len;
    i64 lead, rows, cols;  // L, R, C; rows = 0 for a vector
    i64 state;   // its second moment in v
    double rate;
};

struct AdafactorParams {
    float eps1, eps2, clip, beta2t, beta1, weight_decay, grad_scale;
    int scale_parameter, first_moment;
};

__device__ __forceinline__ float adafactor_update(const FactorSlot& sl, const float* __restrict__ g,
                                                  const float* __restrict__ st, float grad_scale, i64 i) {
    const float gi = g[i] * grad_scale;
    if (sl.rows == 0) return gi * rsqrtf(st[i]);
    const i64 rc = sl.rows * sl.cols;
    const i64 l = i / rc, r = (i % rc) / sl.cols, c = i % sl.cols;
    const float* row = st;
    const float* col = st + sl.lead * sl.rows;
    const float* mean = col + sl.lead * sl.cols;
    return rsqrtf(row[l * sl.rows + r] / mean[l]) * rsqrtf(col[l * sl.cols + c]) * gi;
}

extern "C" __global__ void __launch_bounds__(256) optim_adafactor_step_f32(
    const FactorSlot* __restrict__ slots, float* __restrict__ p, const float* __restrict__ g,
    float* __restrict__ m, float* __restrict__ v, AdafactorParams h) {
    __shared__ float scratch[32];
    const FactorSlot sl = slots[blockIdx.x];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float* pp = p + sl.offset;
    const float* gg = g + sl.offset;
    float* st = v + sl.state;
    const float keep = h.beta2t, mix = 1.0f - h.beta2t;

    float sp = 0.0f;
    for (i64 i = threadIdx.x; i < sl.len; i += blockDim.x) sp = fmaf(pp[i], pp[i], sp);
    const float rms_p = sqrtf(block_sum(sp, scratch) / (float)sl.len);

    if (sl.rows > 0) {
        const i64 L = sl.lead, R = sl.rows, C = sl.cols;
        float* row = st;
        float* col = st + L * R;
        float* mean = col + L * C;
        for (i64 line = warp; line < L * (R + C); line += nwarps) {
            i64 start, stride, count;
            if (line < L * R) {
                start = line * C;
                stride = 1;
                count = C;
            } else {
                const i64 k = line - L * R;
                start = (k / C) * R * C + k % C;
                stride = C;
                count = R;
            }
            float s = 0.0f;
            for (i64 j = lane; j < count; j += 32) {
                const float x = gg[start + j * stride] * h.grad_scale;
                s += fmaf(x, x, h.eps1);
            }
            s = warp_sum(s);
            if (lane == 0) {
                float* out = line < L * R ? row + line : col + (line - L * R);
                *out = fmaf(keep, *out, mix * (s / (float)count));
            }
        }
        __syncthreads();
        for (i64 l = warp; l < L; l += nwarps) {
            float s = 0.0f;
            for (i64 r = lane; r < R; r += 32) s += row[l * R + r];
            s = warp_sum(s);
            if (lane == 0) mean[l] = s / (float)R;
        }
    } else {
        for (i64 i = threadIdx.x; i < sl.len; i += blockDim.x) {
            const float x = gg[i] * h.grad_scale;
            st[i] = fmaf(keep, st[i], mix * fmaf(x, x, h.eps1));
        }
    }
    __syncthreads();

    float su = 0.0f;
    for (i64 i = threadIdx.x; i < sl.len; i += blockDim.x) {
        const float u = adafactor_update(sl, gg, st, h.grad_scale, i);
        su = fmaf(u, u, su);
    }
    const float rms_u = sqrtf(block_sum(su, scratch) / (float)sl.len);
    const float lr = (float)sl.rate * (h.scale_parameter ? fmaxf(h.eps2, rms_p) : 1.0f);
    const float d = fmaxf(1.0f, rms_u / h.clip);
    const float decay = -lr * h.weight_decay;
    for (i64 i = threadIdx.x; i < sl.len; i += blockDim.x) {
        float u = adafactor_update(sl, gg, st, h.grad_scale, i) / d * lr;
        if (h.first_moment) {
            float* mi = m + sl.offset + i;
            u = fmaf(h.beta1, *mi, (1.0f - h.beta1) * u);
            *mi = u;
        }
        const float x = pp[i];
        pp[i] = fmaf(decay, x, x) - u;
    }
}
