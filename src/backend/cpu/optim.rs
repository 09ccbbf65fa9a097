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
