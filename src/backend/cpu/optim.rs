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
