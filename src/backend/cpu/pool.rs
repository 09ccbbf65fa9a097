//! The fused spatial-attention pooling of the gated LoRA layer (kernels/pool.cu), written plainly
//! as the oracle. h (B, S, D), logits (B, S):
//!
//!   w_s = sigmoid(logit_s),  h_att = sum_s w_s h_s / (sum_s w_s + eps),  h_max = max_s h_s
//!   h_c = lambda h_att + (1 - lambda) h_max                                   (B, D)
//!
//! The same function `nn::lora::Gates::forward` composes from primitives; the max gradient goes to
//! the first arg-max, as there.

use super::CpuStorage;
use crate::nn::lora::{POOL_EPS, POOL_LAMBDA};
use crate::tensor::Layout;
use crate::{Error, Result};

type Operand<'a> = (&'a CpuStorage, &'a Layout);

fn dims(h: Operand, logits: Operand) -> Result<(usize, usize, usize)> {
    let (b, s, d) = match h.1.dims() {
        &[b, s, d] => (b, s, d),
        _ => {
            return Err(Error::Rank {
                op: "spatial_pool",
                expected: 3,
                got: h.1.shape().clone(),
            })
        }
    };
    if logits.1.shape().elem_count() != b * s {
        return Err(Error::ShapeMismatch {
            op: "spatial_pool",
            lhs: h.1.shape().clone(),
            rhs: logits.1.shape().clone(),
        });
    }
    Ok((b, s, d))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Per (b, d): (h_att, first arg-max), and per b the weight sum.
fn stats(
    h: &[f64],
    w: &[f64],
    (b, s, d): (usize, usize, usize),
) -> (Vec<f64>, Vec<usize>, Vec<f64>) {
    let mut att = vec![0.0; b * d];
    let mut arg = vec![0usize; b * d];
    let mut wsum = vec![0.0; b];
    for bi in 0..b {
        wsum[bi] = w[bi * s..(bi + 1) * s].iter().sum();
        for di in 0..d {
            let mut num = 0.0;
            let mut best = 0;
            for si in 0..s {
                let v = h[(bi * s + si) * d + di];
                num += w[bi * s + si] * v;
                let m = h[(bi * s + best) * d + di];
                if v > m || (v.is_nan() && !m.is_nan()) {
                    best = si;
                }
            }
            att[bi * d + di] = num / (wsum[bi] + POOL_EPS);
            arg[bi * d + di] = best;
        }
    }
    (att, arg, wsum)
}

pub fn spatial_fwd(h: Operand, logits: Operand) -> Result<CpuStorage> {
    let (b, s, d) = dims(h, logits)?;
    let hv = h.0.to_f64_vec(h.1);
    let w: Vec<f64> = logits
        .0
        .to_f64_vec(logits.1)
        .into_iter()
        .map(sigmoid)
        .collect();
    let (att, arg, _) = stats(&hv, &w, (b, s, d));
    let out: Vec<f64> = (0..b * d)
        .map(|i| {
            let mx = hv[((i / d) * s + arg[i]) * d + i % d];
            POOL_LAMBDA * att[i] + (1.0 - POOL_LAMBDA) * mx
        })
        .collect();
    Ok(CpuStorage::F64(out).to_dtype(&Layout::contiguous(b * d), h.0.dtype()))
}

/// (d_h (B, S, D), d_logits (B, S)) given d_h_c (B, D).
pub fn spatial_bwd(h: Operand, logits: Operand, d_hc: Operand) -> Result<(CpuStorage, CpuStorage)> {
    let (b, s, d) = dims(h, logits)?;
    let hv = h.0.to_f64_vec(h.1);
    let w: Vec<f64> = logits
        .0
        .to_f64_vec(logits.1)
        .into_iter()
        .map(sigmoid)
        .collect();
    let gv = d_hc.0.to_f64_vec(d_hc.1);
    let (att, arg, wsum) = stats(&hv, &w, (b, s, d));
    let mut d_h = vec![0.0; b * s * d];
    let mut d_l = vec![0.0; b * s];
    for bi in 0..b {
        let inv = 1.0 / (wsum[bi] + POOL_EPS);
        for si in 0..s {
            let row = bi * s + si;
            let mut dw = 0.0;
            for di in 0..d {
                let g = gv[bi * d + di];
                let mut v = POOL_LAMBDA * g * w[row] * inv;
                if arg[bi * d + di] == si {
                    v += (1.0 - POOL_LAMBDA) * g;
                }
                d_h[row * d + di] = v;
                dw += g * (hv[row * d + di] - att[bi * d + di]);
            }
            d_l[row] = dw * POOL_LAMBDA * inv * w[row] * (1.0 - w[row]);
        }
    }
    let want = h.0.dtype();
    Ok((
        CpuStorage::F64(d_h).to_dtype(&Layout::contiguous(b * s * d), want),
        CpuStorage::F64(d_l).to_dtype(&Layout::contiguous(b * s), want),
    ))
}
