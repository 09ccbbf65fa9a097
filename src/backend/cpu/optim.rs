//! AdamW with PyTorch's semantics (decoupled weight decay applied before the Adam step, bias
//! corrections on both moments), over f32 master values.

/// Hyper-parameters of one AdamW step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The f32 buffers one step updates in place: master values and the two moments (host slices
/// here, device storages on CUDA).
pub struct State<'a, B: ?Sized> {
    pub p: &'a mut B,
    pub m: &'a mut B,
    pub v: &'a mut B,
}

/// A run of consecutive elements of the flat buffers stepped at one learning rate (a parameter
/// group, or the part of one that sits between two others).
#[derive(Clone, Debug, PartialEq)]
pub struct LrRun {
    pub range: std::ops::Range<usize>,
    pub lr: f64,
}

/// One step at 1-based step number `t` with gradient `grad_scale * g`, in place. Computed in f64
/// per element and stored back, so the oracle carries no f32 rounding beyond the storage itself;
/// the scaled gradient is rounded to f32 first, as the kernel forms it.
pub fn adamw_step(h: &AdamW, t: u64, s: State<'_, [f32]>, g: &[f32], grad_scale: f32) {
    let bc1 = 1.0 - h.beta1.powi(t as i32);
    let bc2 = 1.0 - h.beta2.powi(t as i32);
    let State { p, m, v } = s;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = (g * grad_scale) as f64;
        let mut pi = *p as f64 * (1.0 - h.lr * h.weight_decay);
        let mi = h.beta1 * *m as f64 + (1.0 - h.beta1) * g;
        let vi = h.beta2 * *v as f64 + (1.0 - h.beta2) * g * g;
        let denom = (vi / bc2).sqrt() + h.eps;
        pi -= h.lr / bc1 * mi / denom;
        *p = pi as f32;
        *m = mi as f32;
        *v = vi as f32;
    }
}

/// The sum of squares of `x` in f64 (the squared global gradient norm). Fixed chunks summed in
/// order, so the result does not depend on how the work was spread over the cores.
pub fn sqnorm(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    let partial: Vec<f64> = x
        .par_chunks(1 << 16)
        .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum())
        .collect();
    partial.iter().sum()
}

/// `flat[offset .. offset + part.len()] += part`.
pub fn gather_add(flat: &mut [f32], part: &[f32], offset: usize) {
    for (d, &s) in flat[offset..offset + part.len()].iter_mut().zip(part) {
        *d += s;
    }
}

/// Prodigy's per-element settings for one step's first pass (prodigyopt 1.1.2, `Prodigy.step`):
/// the moments take the gradient scaled by d, and s by `s_coef`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProdigyMoments {
    pub beta1: f64,
    pub beta2: f64,
    pub beta3: f64,
    /// d before this step.
    pub d: f64,
    /// (d / d0) * dlr, or (d / d0) * d with the safeguard.
    pub s_coef: f64,
}

/// The f32 buffers Prodigy's first pass reads and writes besides the gradient.
pub struct ProdigyBuffers<'a, B: ?Sized> {
    pub p: &'a B,
    pub p0: &'a B,
    pub m: &'a mut B,
    pub v: &'a mut B,
    pub s: &'a mut B,
}

/// Prodigy's first pass with gradient `grad_scale * g`: m <- b1 m + d (1 - b1) g,
/// v <- b2 v + d^2 (1 - b2) g^2, s <- b3 s + s_coef g, in place (f64 per element, stored f32).
/// Returns (sum of g (p0 - p), sum of |s|) after the update, in f64: the step's share of d's
/// numerator (before its factor) and d's denominator.
pub fn prodigy_moments(
    h: &ProdigyMoments,
    b: ProdigyBuffers<'_, [f32]>,
    g: &[f32],
    grad_scale: f32,
) -> (f64, f64) {
    let ProdigyBuffers { p, p0, m, v, s } = b;
    let (mut num, mut den) = (0.0, 0.0);
    for i in 0..g.len() {
        let gi = (g[i] * grad_scale) as f64;
        num += gi * (p0[i] as f64 - p[i] as f64);
        let mi = h.beta1 * m[i] as f64 + h.d * (1.0 - h.beta1) * gi;
        let vi = h.beta2 * v[i] as f64 + h.d * h.d * (1.0 - h.beta2) * gi * gi;
        let si = h.beta3 * s[i] as f64 + h.s_coef * gi;
        m[i] = mi as f32;
        v[i] = vi as f32;
        s[i] = si as f32;
        den += (s[i] as f64).abs();
    }
    (num, den)
}

/// Prodigy's second pass: p <- p - wd dlr p, then p <- p - dlr m / (sqrt(v) + d eps) with the
/// new d (prodigyopt's order and values).
pub fn prodigy_update(
    p: &mut [f32],
    m: &[f32],
    v: &[f32],
    dlr: f64,
    weight_decay: f64,
    d_eps: f64,
) {
    for i in 0..p.len() {
        let mut pi = p[i] as f64;
        pi -= weight_decay * dlr * pi;
        pi -= dlr * m[i] as f64 / ((v[i] as f64).sqrt() + d_eps);
        p[i] = pi as f32;
    }
}

/// Lion's settings for one step (Chen et al., "Symbolic Discovery of Optimization Algorithms";
/// lion-pytorch 0.2.5, kohya's `--optimizer_type Lion`). The learning rate comes per run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LionStep {
    pub beta1: f64,
    pub beta2: f64,
    /// The factor of `lr * p` taken off first (lion-pytorch's weight decay, already divided by
    /// the starting rate when it is decoupled).
    pub weight_decay: f64,
}

/// The sign of `c` as PyTorch's `sgn_` gives it: 0 for zero (not 1, as `f64::signum` would),
/// NaN for NaN.
fn sgn(c: f64) -> f64 {
    if c > 0.0 {
        1.0
    } else if c < 0.0 {
        -1.0
    } else {
        c
    }
}

/// One Lion step at rate `lr` with gradient `grad_scale * g`, in place (lion-pytorch's
/// `update_fn`, in f64 per element and stored f32):
/// p <- p (1 - lr wd);  p <- p - lr sgn(b1 m + (1 - b1) g);  m <- b2 m + (1 - b2) g.
pub fn lion_step(h: &LionStep, lr: f64, p: &mut [f32], m: &mut [f32], g: &[f32], grad_scale: f32) {
    for ((p, m), &g) in p.iter_mut().zip(m.iter_mut()).zip(g) {
        let g = (g * grad_scale) as f64;
        let mi = *m as f64;
        let pi = *p as f64 * (1.0 - lr * h.weight_decay);
        *p = (pi - lr * sgn(h.beta1 * mi + (1.0 - h.beta1) * g)) as f32;
        *m = (h.beta2 * mi + (1.0 - h.beta2) * g) as f32;
    }
}

/// Elements per quantization block of the 8-bit AdamW state (bitsandbytes' blockwise optimizers):
/// each block of a tensor's moments shares one absmax.
pub const BLOCK_8BIT: usize = 256;

/// bitsandbytes' dynamic quantization map (`create_dynamic_map(signed, 7, 8)`): 256 sorted f32
/// codes in [-1, 1] (signed, for the first moment) or [0, 1] (unsigned, the second). Each of
/// seven decades 10^-6 .. 10^0 holds the midpoints of an even split of [0.1, 1] into more parts
/// the larger the decade (2^(i+1) unsigned, 2^i per sign signed), then 0 and 1. Built in f32 as
/// torch builds it: `linspace` in f32, midpoints in f32, the decade's power of ten as a float
/// scalar times the f32 tensor.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    // Python's `10 ** (i - 6)`, a double, rounded to f32 as torch rounds a scalar operand.
    let decades = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    for (i, &decade) in decades.iter().enumerate() {
        let items = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let bounds = linspace_f32(0.1, 1.0, items);
        let scale = decade as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-(scale * mean));
            }
        }
    }
    // 254 values either way (127 per sign, or 254 positive), then 0 and 1: 256 codes.
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(|a, b| a.total_cmp(b));
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// `torch.linspace(start, end, steps, dtype=float32)` as its CPU kernel computes it (measured
/// bit for bit against torch 2.15 for 2 to 4097 steps): the step in f32, each value in f64 from
/// it and rounded once, the first half counted up from `start`, the second down from `end`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = ((end - start) / (steps - 1) as f32) as f64;
    let half = steps / 2;
    (0..steps)
        .map(|i| match i < half {
            true => (start as f64 + step * i as f64) as f32,
            false => (end as f64 - step * (steps - 1 - i) as f64) as f32,
        })
        .collect()
}

/// The code of `x` (already divided by its block's absmax) in `map`: the nearest, the lower on a
/// tie, as `torch.bucketize` on the f32 midpoints between codes gives it (bitsandbytes' blockwise
/// quantizer).
pub fn quantize_code(map: &[f32; 256], x: f64) -> u8 {
    // The number of midpoints below x; midpoints rise with the codes.
    let (mut lo, mut hi) = (0usize, 255usize);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if (((map[mid] + map[mid + 1]) / 2.0) as f64) < x {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo as u8
}

/// Where one trainable sits in the flat buffers of the 8-bit AdamW step, and its rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot8 {
    /// The trainable's elements in the masters and the gradient.
    pub offset: usize,
    pub len: usize,
    /// Where its moments start: in the f32 `m` / `v` buffers, or (quantized) in the code buffers.
    pub state: usize,
    /// The first of its `len.div_ceil(256)` absmax entries when its moments are quantized.
    pub block: Option<usize>,
    pub lr: f64,
}

/// The buffers one 8-bit AdamW step updates in place besides the masters: f32 moments of the
/// small trainables, codes and per-block absmax of the others.
pub struct Moments8<'a, B: ?Sized, C: ?Sized> {
    pub m: &'a mut B,
    pub v: &'a mut B,
    pub q1: &'a mut C,
    pub q2: &'a mut C,
    pub absmax1: &'a mut B,
    pub absmax2: &'a mut B,
}

/// One block of a quantized trainable stepped at `lr` (bitsandbytes' blockwise AdamW8bit update,
/// its CPU path): dequantize both moments (code times the block's absmax), update them and the
/// masters as AdamW does (decay first, then the step; f64 per element), then store each moment
/// again as the nearest code of its new block absmax (the largest magnitude, rounded to f32).
#[allow(clippy::too_many_arguments)]
pub fn adamw8bit_block(
    h: &AdamW,
    t: u64,
    lr: f64,
    maps: (&[f32; 256], &[f32; 256]),
    p: &mut [f32],
    g: &[f32],
    grad_scale: f32,
    q: (&mut [u8], &mut [u8]),
    absmax: (&mut f32, &mut f32),
) {
    let bc1 = 1.0 - h.beta1.powi(t as i32);
    let bc2 = 1.0 - h.beta2.powi(t as i32);
    let (signed, unsigned) = maps;
    let (q1, q2) = q;
    let (a1, a2) = absmax;
    let mut m = Vec::with_capacity(p.len());
    let mut v = Vec::with_capacity(p.len());
    for i in 0..p.len() {
        let gi = (g[i] * grad_scale) as f64;
        let mi = h.beta1 * (signed[q1[i] as usize] as f64 * *a1 as f64) + (1.0 - h.beta1) * gi;
        let vi =
            h.beta2 * (unsigned[q2[i] as usize] as f64 * *a2 as f64) + (1.0 - h.beta2) * gi * gi;
        let pi = p[i] as f64 * (1.0 - lr * h.weight_decay);
        p[i] = (pi - lr / bc1 * mi / ((vi / bc2).sqrt() + h.eps)) as f32;
        m.push(mi);
        v.push(vi);
    }
    requantize(&m, q1, a1, signed);
    requantize(&v, q2, a2, unsigned);
}

/// One block of a trainable whose Lion moment is quantized, stepped at `lr` (bitsandbytes'
/// blockwise Lion8bit update, its CPU path): dequantize m, then Lion's step in f64 per element
/// (p <- p (1 - lr wd) - lr sgn(b1 m + (1 - b1) g), m <- b2 m + (1 - b2) g, sgn(0) = 0), then
/// store m again as the nearest codes of its new block absmax.
#[allow(clippy::too_many_arguments)]
pub fn lion8bit_block(
    h: &LionStep,
    lr: f64,
    map: &[f32; 256],
    p: &mut [f32],
    g: &[f32],
    grad_scale: f32,
    q1: &mut [u8],
    absmax1: &mut f32,
) {
    let mut m = Vec::with_capacity(p.len());
    for i in 0..p.len() {
        let gi = (g[i] * grad_scale) as f64;
        let mi = map[q1[i] as usize] as f64 * *absmax1 as f64;
        let pi = p[i] as f64 * (1.0 - lr * h.weight_decay);
        p[i] = (pi - lr * sgn(h.beta1 * mi + (1.0 - h.beta1) * gi)) as f32;
        m.push(h.beta2 * mi + (1.0 - h.beta2) * gi);
    }
    requantize(&m, q1, absmax1, map);
}

/// `values` stored as codes of `map` against their largest magnitude (the new absmax, rounded
/// to f32): each the nearest code of value / absmax, clamped to [-1, 1]; all codes of 0 when
/// every value is 0.
fn requantize(values: &[f64], codes: &mut [u8], absmax: &mut f32, map: &[f32; 256]) {
    let top = values.iter().fold(0f64, |a, &x| a.max(x.abs())) as f32;
    *absmax = top;
    for (c, &x) in codes.iter_mut().zip(values) {
        let scaled = match top {
            0.0 => 0.0,
            _ => (x / top as f64).clamp(-1.0, 1.0),
        };
        *c = quantize_code(map, scaled);
    }
}

/// The update an 8-bit step applies (see [`Moments8`]): AdamW's at 1-based step `t`, or Lion's
/// (one moment: `v`, `q2` and `absmax2` unused).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule8 {
    AdamW { h: AdamW, t: u64 },
    Lion(LionStep),
}

/// Where one trainable sits in Adafactor's flat buffers (see `train::adafactor`), its shape as
/// Adafactor factors it, and its rate.
#[derive(Clone, Debug, PartialEq)]
pub struct FactorSlot {
    /// The trainable's elements in the masters, the gradient and the first moment.
    pub offset: usize,
    pub len: usize,
    /// (L, R, C): a trainable of two dims or more as L matrices of R rows and C columns (its
    /// last two dims); `rows` 0 for a vector, whose second moment is kept whole.
    pub lead: usize,
    pub rows: usize,
    pub cols: usize,
    /// Where its second moment starts in `v`: the L R row means, the L C column means and L
    /// scratch values (the row means' means, rewritten each step); or `len` values.
    pub state: usize,
    /// The step size before the parameter scale: the schedule's rate, or the relative step.
    pub rate: f64,
}

impl FactorSlot {
    pub fn factored(&self) -> bool {
        self.rows > 0
    }

    /// Values of `v` the slot holds.
    pub fn state_len(&self) -> usize {
        match self.factored() {
            true => self.lead * (self.rows + self.cols + 1),
            false => self.len,
        }
    }
}

/// Adafactor's settings for one step (transformers' names), the step's `beta2t` and whether a
/// first moment is kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdafactorStep {
    pub eps1: f64,
    pub eps2: f64,
    pub clip_threshold: f64,
    /// `1 - t^decay_rate`.
    pub beta2t: f64,
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    pub scale_parameter: bool,
}

fn rms(x: impl Iterator<Item = f64>, n: usize) -> f64 {
    (x.map(|v| v * v).sum::<f64>() / n as f64).sqrt()
}

/// One Adafactor step of one trainable, as transformers' `Adafactor.step` (in f64, stored in
/// f32): `p` and `g` its elements, `m` its first moment (empty without one), `v` its second
/// moment (`slot.state_len()` values).
pub fn adafactor_slot(
    h: &AdafactorStep,
    slot: &FactorSlot,
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    grad_scale: f32,
) {
    let n = slot.len;
    let grad = |i: usize| g[i] as f64 * grad_scale as f64;
    let rms_p = rms(p.iter().map(|&x| x as f64), n);
    let lr = slot.rate
        * match h.scale_parameter {
            true => h.eps2.max(rms_p),
            false => 1.0,
        };
    let (keep, mix) = (h.beta2t, 1.0 - h.beta2t);
    let mut u: Vec<f64> = vec![0.0; n];
    if slot.factored() {
        let (l_n, r_n, c_n) = (slot.lead, slot.rows, slot.cols);
        let (row, rest) = v.split_at_mut(l_n * r_n);
        let (col, means) = rest.split_at_mut(l_n * c_n);
        for l in 0..l_n {
            let at = |r: usize, c: usize| l * r_n * c_n + r * c_n + c;
            for r in 0..r_n {
                let s: f64 = (0..c_n).map(|c| grad(at(r, c)).powi(2) + h.eps1).sum();
                let x = &mut row[l * r_n + r];
                *x = (keep * *x as f64 + mix * (s / c_n as f64)) as f32;
            }
            for c in 0..c_n {
                let s: f64 = (0..r_n).map(|r| grad(at(r, c)).powi(2) + h.eps1).sum();
                let x = &mut col[l * c_n + c];
                *x = (keep * *x as f64 + mix * (s / r_n as f64)) as f32;
            }
            let mean = row[l * r_n..(l + 1) * r_n]
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>()
                / r_n as f64;
            means[l] = mean as f32;
            for r in 0..r_n {
                let rf = 1.0 / (row[l * r_n + r] as f64 / mean).sqrt();
                for c in 0..c_n {
                    let cf = 1.0 / (col[l * c_n + c] as f64).sqrt();
                    u[at(r, c)] = rf * cf * grad(at(r, c));
                }
            }
        }
    } else {
        for (i, (x, u)) in v.iter_mut().zip(&mut u).enumerate() {
            let s = keep * *x as f64 + mix * (grad(i).powi(2) + h.eps1);
            *x = s as f32;
            *u = grad(i) / (*x as f64).sqrt();
        }
    }
    let d = (rms(u.iter().copied(), n) / h.clip_threshold).max(1.0);
    let decay = -h.weight_decay * lr;
    for (i, &ui) in u.iter().enumerate() {
        let mut step = ui / d * lr;
        if let Some(b1) = h.beta1 {
            let mi = b1 * m[i] as f64 + (1.0 - b1) * step;
            m[i] = mi as f32;
            step = m[i] as f64;
        }
        let x = p[i] as f64;
        p[i] = (x + decay * x - step) as f32;
    }
}
