//! Scaled dot-product attention, forward and backward, one (batch, head) at a time. The backward
//! recomputes the probabilities from q and k, as flash attention does on the GPU.

use super::matmul::gemm_strided;
use super::{CpuStorage, FloatData};
use crate::tensor::{Float, Layout};
use crate::{Error, Result};
use rayon::prelude::*;

/// Sizes of one attention call: `bh` independent (batch x head) problems.
#[derive(Clone, Copy, Debug)]
pub struct AttnGeom {
    pub bh: usize,
    pub sq: usize,
    pub skv: usize,
    pub d: usize,
    pub dv: usize,
    pub scale: f64,
    /// Mask key j > query i (top-left aligned, as PyTorch's `is_causal`).
    pub causal: bool,
}

/// Row-softmaxed scores P (sq x skv) for one head.
fn probs<T: Float>(q: &[T], k: &[T], g: &AttnGeom) -> Vec<T> {
    let mut s = vec![T::zero(); g.sq * g.skv];
    gemm_strided(
        (g.sq, g.skv, g.d),
        q,
        (g.d, 1),
        k,
        (1, g.d),
        &mut s,
        g.skv,
        false,
    );
    let scale = T::of(g.scale);
    for (i, row) in s.chunks_mut(g.skv).enumerate() {
        let visible = if g.causal { (i + 1).min(g.skv) } else { g.skv };
        let mut m = T::neg_infinity();
        for v in row[..visible].iter_mut() {
            *v *= scale;
            m = m.max(*v);
        }
        let mut sum = 0f64;
        for v in row[..visible].iter_mut() {
            *v = (*v - m).exp();
            sum += v.as_f64();
        }
        let inv = T::of(1.0 / sum);
        row[..visible].iter_mut().for_each(|v| *v *= inv);
        row[visible..].iter_mut().for_each(|v| *v = T::zero());
    }
    s
}

fn fwd<T: Float>(q: &[T], k: &[T], v: &[T], g: &AttnGeom) -> Vec<T> {
    let mut out = vec![T::zero(); g.bh * g.sq * g.dv];
    out.par_chunks_mut(g.sq * g.dv)
        .enumerate()
        .for_each(|(h, o)| {
            let (qh, kh, vh) = (
                &q[h * g.sq * g.d..][..g.sq * g.d],
                &k[h * g.skv * g.d..][..g.skv * g.d],
                &v[h * g.skv * g.dv..][..g.skv * g.dv],
            );
            let p = probs(qh, kh, g);
            gemm_strided(
                (g.sq, g.dv, g.skv),
                &p,
                (g.skv, 1),
                vh,
                (g.dv, 1),
                o,
                g.dv,
                false,
            );
        });
    out
}

fn bwd<T: Float>(q: &[T], k: &[T], v: &[T], dout: &[T], g: &AttnGeom) -> (Vec<T>, Vec<T>, Vec<T>) {
    let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..g.bh)
        .into_par_iter()
        .map(|h| {
            let qh = &q[h * g.sq * g.d..][..g.sq * g.d];
            let kh = &k[h * g.skv * g.d..][..g.skv * g.d];
            let vh = &v[h * g.skv * g.dv..][..g.skv * g.dv];
            let doh = &dout[h * g.sq * g.dv..][..g.sq * g.dv];
            let p = probs(qh, kh, g);
            // dV = P^T dO
            let mut dv = vec![T::zero(); g.skv * g.dv];
            gemm_strided(
                (g.skv, g.dv, g.sq),
                &p,
                (1, g.skv),
                doh,
                (g.dv, 1),
                &mut dv,
                g.dv,
                false,
            );
            // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)) * scale
            let mut ds = vec![T::zero(); g.sq * g.skv];
            gemm_strided(
                (g.sq, g.skv, g.dv),
                doh,
                (g.dv, 1),
                vh,
                (1, g.dv),
                &mut ds,
                g.skv,
                false,
            );
            let scale = T::of(g.scale);
            for (prow, drow) in p.chunks(g.skv).zip(ds.chunks_mut(g.skv)) {
                let dot: f64 = prow
                    .iter()
                    .zip(drow.iter())
                    .map(|(&a, &b)| (a * b).as_f64())
                    .sum();
                let dot = T::of(dot);
                for (d, &pp) in drow.iter_mut().zip(prow) {
                    *d = pp * (*d - dot) * scale;
                }
            }
            let mut dq = vec![T::zero(); g.sq * g.d];
            gemm_strided(
                (g.sq, g.d, g.skv),
                &ds,
                (g.skv, 1),
                kh,
                (g.d, 1),
                &mut dq,
                g.d,
                false,
            );
            let mut dk = vec![T::zero(); g.skv * g.d];
            gemm_strided(
                (g.skv, g.d, g.sq),
                &ds,
                (1, g.skv),
                qh,
                (g.d, 1),
                &mut dk,
                g.d,
                false,
            );
            (dq, dk, dv)
        })
        .collect();
    let mut dq = Vec::with_capacity(g.bh * g.sq * g.d);
    let mut dk = Vec::with_capacity(g.bh * g.skv * g.d);
    let mut dv = Vec::with_capacity(g.bh * g.skv * g.dv);
    for (a, b, c) in per_head {
        dq.extend(a);
        dk.extend(b);
        dv.extend(c);
    }
    (dq, dk, dv)
}

type Operand<'a> = (&'a CpuStorage, &'a Layout);

pub fn sdpa(q: Operand, k: Operand, v: Operand, g: &AttnGeom) -> Result<CpuStorage> {
    let want = q.0.dtype();
    Ok(
        match (
            q.0.floats(q.1, "sdpa")?,
            k.0.floats(k.1, "sdpa")?,
            v.0.floats(v.1, "sdpa")?,
        ) {
            (FloatData::F32(q), FloatData::F32(k), FloatData::F32(v)) => {
                CpuStorage::from_f32(fwd(&q, &k, &v, g), want)
            }
            (FloatData::F64(q), FloatData::F64(k), FloatData::F64(v)) => {
                CpuStorage::F64(fwd(&q, &k, &v, g))
            }
            _ => {
                return Err(Error::DTypeMismatch {
                    op: "sdpa",
                    lhs: want,
                    rhs: k.0.dtype(),
                })
            }
        },
    )
}

/// (dq, dk, dv) given the upstream gradient of the output.
pub fn sdpa_bwd(
    q: Operand,
    k: Operand,
    v: Operand,
    dout: Operand,
    g: &AttnGeom,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    let want = q.0.dtype();
    fn fl<'a>(o: Operand<'a>) -> Result<FloatData<'a>> {
        o.0.floats(o.1, "sdpa_bwd")
    }
    Ok(match (fl(q)?, fl(k)?, fl(v)?, fl(dout)?) {
        (FloatData::F32(q), FloatData::F32(k), FloatData::F32(v), FloatData::F32(d)) => {
            let (a, b, c) = bwd(&q, &k, &v, &d, g);
            (
                CpuStorage::from_f32(a, want),
                CpuStorage::from_f32(b, want),
                CpuStorage::from_f32(c, want),
            )
        }
        (FloatData::F64(q), FloatData::F64(k), FloatData::F64(v), FloatData::F64(d)) => {
            let (a, b, c) = bwd(&q, &k, &v, &d, g);
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c))
        }
        _ => {
            return Err(Error::DTypeMismatch {
                op: "sdpa_bwd",
                lhs: want,
                rhs: dout.0.dtype(),
            })
        }
    })
}
