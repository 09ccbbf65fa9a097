//! The fused gated low-rank update (kernels/lora.cu) written plainly: the oracle the CUDA kernel
//! is tested against. Everything widens to f64; the result narrows once.
//!
//! ```text
//! g[b, k] = a[b] * scale * w_down[b, k] * w_up[b, k]     (absent gates count as 1)
//! z = h A^T (B*S, r),  out = base + (z * g) B^T           (B*S, Dout)
//! ```

use super::CpuStorage;
use crate::tensor::{DType, Layout};
use crate::{Error, Result};

/// Sizes of one update: h (batch, seq, d_in), A (rank, d_in), B (d_out, rank).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraGeom {
    pub batch: usize,
    pub seq: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
    /// (alpha / r) * guidance for the gated form, alpha / r for plain LoRA.
    pub scale: f64,
}

impl LoraGeom {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// The three optional gates: w_down (B, r), w_up (B, r), a (B).
#[derive(Clone, Copy, Default)]
pub struct Gates<'a> {
    pub w_down: Option<Operand<'a>>,
    pub w_up: Option<Operand<'a>>,
    pub a: Option<Operand<'a>>,
}

/// Gradients of [`lora_fwd`]. d_a / d_b are f32 (they feed the AdamW master); the rest carry
/// h's dtype. A gate gradient is present only when the gate was given.
pub struct LoraGrads<S> {
    pub d_h: S,
    pub d_a: S,
    pub d_b: S,
    pub d_w_down: Option<S>,
    pub d_w_up: Option<S>,
    pub d_alpha: Option<S>,
}

fn vals(o: Operand) -> Vec<f64> {
    o.0.to_f64_vec(o.1)
}

fn check(o: Operand, n: usize, what: &str) -> Result<()> {
    if o.1.shape().elem_count() != n {
        return Err(Error::BadShape {
            op: "lora",
            msg: format!("{what} must have {n} elements"),
            shape: o.1.shape().clone(),
        });
    }
    Ok(())
}

/// g (B, r) from the gates.
fn gate_matrix(gates: &Gates, g: &LoraGeom) -> Result<Vec<f64>> {
    let (b, r) = (g.batch, g.rank);
    let mut out = vec![g.scale; b * r];
    if let Some(a) = gates.a {
        check(a, b, "a")?;
        let a = vals(a);
        out.iter_mut().enumerate().for_each(|(i, v)| *v *= a[i / r]);
    }
    for (w, what) in [(gates.w_down, "w_down"), (gates.w_up, "w_up")] {
        if let Some(w) = w {
            check(w, b * r, what)?;
            out.iter_mut().zip(vals(w)).for_each(|(v, x)| *v *= x);
        }
    }
    Ok(out)
}

/// (rows, cols) x (cols, k) row-major products, written out plainly.
fn project(
    x: &[f64],
    rows: usize,
    cols: usize,
    m: impl Fn(usize, usize) -> f64,
    k: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; rows * k];
    for i in 0..rows {
        for j in 0..k {
            out[i * k + j] = (0..cols).map(|c| x[i * cols + c] * m(c, j)).sum();
        }
    }
    out
}

pub fn lora_fwd(
    h: Operand,
    a: Operand,
    b: Operand,
    gates: Gates,
    base: Option<Operand>,
    g: &LoraGeom,
) -> Result<CpuStorage> {
    let (rows, r) = (g.rows(), g.rank);
    check(h, rows * g.d_in, "h")?;
    check(a, r * g.d_in, "A")?;
    check(b, g.d_out * r, "B")?;
    let gm = gate_matrix(&gates, g)?;
    let (hv, av, bv) = (vals(h), vals(a), vals(b));
    let mut z = project(&hv, rows, g.d_in, |c, k| av[k * g.d_in + c], r); // (rows, r)
    for (i, v) in z.iter_mut().enumerate() {
        *v *= gm[(i / r) / g.seq * r + i % r];
    }
    let mut out = project(&z, rows, r, |k, o| bv[o * r + k], g.d_out); // (rows, d_out)
    if let Some(base) = base {
        check(base, rows * g.d_out, "base")?;
        out.iter_mut().zip(vals(base)).for_each(|(o, x)| *o += x);
    }
    Ok(CpuStorage::F64(out).to_dtype(&Layout::contiguous(rows * g.d_out), h.0.dtype()))
}

pub fn lora_bwd(
    h: Operand,
    a: Operand,
    b: Operand,
    gates: Gates,
    d_out: Operand,
    g: &LoraGeom,
) -> Result<LoraGrads<CpuStorage>> {
    let (rows, r, bsz) = (g.rows(), g.rank, g.batch);
    check(d_out, rows * g.d_out, "d_out")?;
    let gm = gate_matrix(&gates, g)?;
    let (hv, av, bv, dov) = (vals(h), vals(a), vals(b), vals(d_out));
    let z = project(&hv, rows, g.d_in, |c, k| av[k * g.d_in + c], r); // (rows, r), ungated
    let du = project(&dov, rows, g.d_out, |o, k| bv[o * r + k], r); // (rows, r)
    let gate = |i: usize| gm[(i / r) / g.seq * r + i % r];
    let dug: Vec<f64> = du.iter().enumerate().map(|(i, v)| v * gate(i)).collect();
    let zg: Vec<f64> = z.iter().enumerate().map(|(i, v)| v * gate(i)).collect();
    let d_h = project(&dug, rows, r, |k, c| av[k * g.d_in + c], g.d_in);
    // d_A (r, d_in) = dug^T h ; d_B (d_out, r) = d_out^T zg
    let mut d_a = vec![0.0; r * g.d_in];
    let mut d_b = vec![0.0; g.d_out * r];
    for t in 0..rows {
        for k in 0..r {
            for c in 0..g.d_in {
                d_a[k * g.d_in + c] += dug[t * r + k] * hv[t * g.d_in + c];
            }
            for o in 0..g.d_out {
                d_b[o * r + k] += dov[t * g.d_out + o] * zg[t * r + k];
            }
        }
    }
    // dg[b, k] = sum_s du * z; g = a * scale * wd * wu.
    let mut dg = vec![0.0; bsz * r];
    for (i, (x, y)) in du.iter().zip(&z).enumerate() {
        dg[(i / r) / g.seq * r + i % r] += x * y;
    }
    let opt = |o: Option<Operand>| o.map(vals);
    let (wd, wu, al) = (opt(gates.w_down), opt(gates.w_up), opt(gates.a));
    let at = |v: &Option<Vec<f64>>, i: usize| v.as_ref().map_or(1.0, |v| v[i]);
    let want = h.0.dtype();
    let narrow = |v: Vec<f64>, dtype: DType| {
        let n = v.len();
        CpuStorage::F64(v).to_dtype(&Layout::contiguous(n), dtype)
    };
    let d_w_down = wd.as_ref().map(|_| {
        let v = (0..bsz * r)
            .map(|i| dg[i] * at(&al, i / r) * g.scale * at(&wu, i))
            .collect();
        narrow(v, want)
    });
    let d_w_up = wu.as_ref().map(|_| {
        let v = (0..bsz * r)
            .map(|i| dg[i] * at(&al, i / r) * g.scale * at(&wd, i))
            .collect();
        narrow(v, want)
    });
    let d_alpha = al.as_ref().map(|_| {
        let v = (0..bsz)
            .map(|bi| {
                (0..r)
                    .map(|k| dg[bi * r + k] * g.scale * at(&wd, bi * r + k) * at(&wu, bi * r + k))
                    .sum()
            })
            .collect();
        narrow(v, want)
    });
    Ok(LoraGrads {
        d_h: narrow(d_h, want),
        d_a: narrow(d_a, DType::F32),
        d_b: narrow(d_b, DType::F32),
        d_w_down,
        d_w_up,
        d_alpha,
    })
}
