//! Layer norm (over the last dim) and group norm (NCHW), forward and backward. Statistics
//! accumulate in f64; the backward recomputes them from the saved input.

use super::{lane_sum, CpuStorage, FloatData};
use crate::tensor::{Float, Layout};
use crate::{Error, Result};
use rayon::prelude::*;

/// An optional affine parameter (weight or bias) converted to the compute type.
fn param<T: Float>(p: Option<(&CpuStorage, &Layout)>) -> Option<Vec<T>> {
    p.map(|(s, l)| s.to_f64_vec(l).into_iter().map(T::of).collect())
}

/// Mean and 1/sqrt(var + eps) of a slice (biased variance, as PyTorch normalises), two passes.
fn stats<T: Float>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = lane_sum(x, x, |v, _| v.as_f64()) / n;
    let var = lane_sum(x, x, |v, _| (v.as_f64() - mean).powi(2)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Normalise `groups` consecutive chunks of each of `rows` rows; chunk element `j` uses the
/// affine channel `j / per_channel`.
struct Plan {
    rows: usize,
    chunk: usize,
    per_channel: usize,
    eps: f64,
}

fn norm_fwd<T: Float>(x: &[T], w: Option<&[T]>, b: Option<&[T]>, p: &Plan) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    let chunks_per_row = x.len() / p.rows / p.chunk;
    let channels = chunks_per_row * p.chunk / p.per_channel;
    // The affine parameters once in f64, absent ones as 1 and 0: no branch in the inner loops.
    let wf: Vec<f64> = (0..channels)
        .map(|c| w.map_or(1.0, |w| w[c].as_f64()))
        .collect();
    let bf: Vec<f64> = (0..channels)
        .map(|c| b.map_or(0.0, |b| b[c].as_f64()))
        .collect();
    y.par_chunks_mut(p.chunk)
        .zip(x.par_chunks(p.chunk))
        .enumerate()
        .for_each(|(ci, (yo, xi))| {
            let (mean, rstd) = stats(xi, p.eps);
            let ch0 = (ci % chunks_per_row) * p.chunk / p.per_channel;
            if p.per_channel == 1 {
                // Layer norm: one affine pair per element.
                let (wc, bc) = (&wf[ch0..ch0 + p.chunk], &bf[ch0..ch0 + p.chunk]);
                for (((o, &v), &ww), &bb) in yo.iter_mut().zip(xi).zip(wc).zip(bc) {
                    *o = T::of((v.as_f64() - mean) * rstd * ww + bb);
                }
                return;
            }
            // Group norm: channel blocks of `per_channel` pixels share one scale and shift, which
            // keeps integer division out of the inner loop.
            for (c, (yb, xb)) in yo
                .chunks_mut(p.per_channel)
                .zip(xi.chunks(p.per_channel))
                .enumerate()
            {
                let scale = rstd * wf[ch0 + c];
                let shift = bf[ch0 + c] - mean * scale;
                for (o, &v) in yb.iter_mut().zip(xb) {
                    *o = T::of(v.as_f64() * scale + shift);
                }
            }
        });
    y
}

/// Returns (dx, dweight, dbias); the parameter gradients are summed over rows.
fn norm_bwd<T: Float>(
    x: &[T],
    dy: &[T],
    w: Option<&[T]>,
    p: &Plan,
    channels: usize,
) -> (Vec<T>, Vec<f64>, Vec<f64>) {
    let chunks_per_row = x.len() / p.rows / p.chunk;
    let wf: Vec<f64> = (0..channels)
        .map(|c| w.map_or(1.0, |w| w[c].as_f64()))
        .collect();
    let pc = p.per_channel;
    let mut dx = vec![T::zero(); x.len()];
    let per_chunk: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(p.chunk)
        .zip(x.par_chunks(p.chunk).zip(dy.par_chunks(p.chunk)))
        .enumerate()
        .map(|(ci, (dxo, (xi, gi)))| {
            let (mean, rstd) = stats(xi, p.eps);
            let ch0 = (ci % chunks_per_row) * p.chunk / pc;
            let wc = &wf[ch0..ch0 + p.chunk / pc];
            let n = xi.len() as f64;
            // With g = dy * w and xhat = (x - mean) * rstd:
            //   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dw += dy * xhat,  db += dy.
            let (dw, db, sum_g, sum_gx);
            if pc == 1 {
                // Layer norm: an affine pair per element.
                let xhat = |v: T| (v.as_f64() - mean) * rstd;
                db = gi.iter().map(|d| d.as_f64()).collect::<Vec<f64>>();
                dw = xi
                    .iter()
                    .zip(gi)
                    .map(|(&v, d)| d.as_f64() * xhat(v))
                    .collect::<Vec<f64>>();
                sum_g = lane_sum(&db, wc, |d, w| d * w);
                sum_gx = lane_sum(&dw, wc, |dxh, w| dxh * w);
                for (((o, &v), &d), &ww) in dxo.iter_mut().zip(xi).zip(gi).zip(wc) {
                    let g = d.as_f64() * ww;
                    *o = T::of(rstd * (g - sum_g / n - xhat(v) * sum_gx / n));
                }
            } else {
                // Group norm: channel blocks of `pc` pixels share w, so the sums are per block.
                let blocks = xi.chunks(pc).zip(gi.chunks(pc));
                let (bw, bb): (Vec<f64>, Vec<f64>) = blocks
                    .map(|(xb, gb)| {
                        let s_dxh = lane_sum(xb, gb, |v, d| d.as_f64() * (v.as_f64() - mean));
                        (s_dxh * rstd, lane_sum(gb, gb, |d, _| d.as_f64()))
                    })
                    .unzip();
                sum_g = lane_sum(&bb, wc, |d, w| d * w);
                sum_gx = lane_sum(&bw, wc, |dxh, w| dxh * w);
                (dw, db) = (bw, bb);
                for (((ob, xb), gb), &ww) in dxo
                    .chunks_mut(pc)
                    .zip(xi.chunks(pc))
                    .zip(gi.chunks(pc))
                    .zip(wc)
                {
                    // rstd * (d*w - sum_g/n - (x - mean)*rstd*sum_gx/n) as a*d + b*x + c.
                    let (a, b) = (rstd * ww, -rstd * rstd * sum_gx / n);
                    let c = -rstd * sum_g / n - b * mean;
                    for ((o, &v), &d) in ob.iter_mut().zip(xb).zip(gb) {
                        *o = T::of(a * d.as_f64() + b * v.as_f64() + c);
                    }
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0f64; channels], vec![0f64; channels]);
    for (ci, (cw, cb)) in per_chunk.iter().enumerate() {
        let ch0 = (ci % chunks_per_row) * p.chunk / pc;
        for (c, (a, b)) in cw.iter().zip(cb).enumerate() {
            dw[ch0 + c] += a;
            db[ch0 + c] += b;
        }
    }
    (dx, dw, db)
}

fn plan(l: &Layout, groups: Option<usize>, eps: f64, op: &'static str) -> Result<(Plan, usize)> {
    let dims = l.dims();
    match groups {
        None => {
            let n = *dims.last().ok_or(Error::Rank {
                op,
                expected: 1,
                got: l.shape().clone(),
            })?;
            let rows = l.shape().elem_count() / n.max(1);
            Ok((
                Plan {
                    rows,
                    chunk: n,
                    per_channel: 1,
                    eps,
                },
                n,
            ))
        }
        Some(g) => {
            if dims.len() < 2 || g == 0 || dims[1] % g != 0 {
                return Err(Error::BadShape {
                    op,
                    msg: format!("{g} groups need (N, C, ...) with C divisible by it"),
                    shape: l.shape().clone(),
                });
            }
            let (n, c) = (dims[0], dims[1]);
            let spatial: usize = dims[2..].iter().product();
            Ok((
                Plan {
                    rows: n,
                    chunk: c / g * spatial,
                    per_channel: spatial,
                    eps,
                },
                c,
            ))
        }
    }
}

fn check_param(p: Option<(&CpuStorage, &Layout)>, channels: usize, op: &'static str) -> Result<()> {
    match p {
        Some((_, l)) if l.shape().elem_count() != channels => Err(Error::BadShape {
            op,
            msg: format!("affine parameter must have {channels} elements"),
            shape: l.shape().clone(),
        }),
        _ => Ok(()),
    }
}

/// Layer norm over the last dim (`groups = None`) or group norm over (C/G, spatial...) chunks.
pub fn norm(
    x: &CpuStorage,
    lx: &Layout,
    w: Option<(&CpuStorage, &Layout)>,
    b: Option<(&CpuStorage, &Layout)>,
    groups: Option<usize>,
    eps: f64,
) -> Result<CpuStorage> {
    let op = if groups.is_some() {
        "group_norm"
    } else {
        "layer_norm"
    };
    let (p, channels) = plan(lx, groups, eps, op)?;
    check_param(w, channels, op)?;
    check_param(b, channels, op)?;
    let want = x.dtype();
    Ok(match x.floats(lx, op)? {
        FloatData::F32(v) => {
            let (w, b) = (param::<f32>(w), param::<f32>(b));
            CpuStorage::from_f32(norm_fwd(&v, w.as_deref(), b.as_deref(), &p), want)
        }
        FloatData::F64(v) => {
            let (w, b) = (param::<f64>(w), param::<f64>(b));
            CpuStorage::F64(norm_fwd(&v, w.as_deref(), b.as_deref(), &p))
        }
    })
}

/// (dx, dweight, dbias) of [`norm`]; the parameter gradients come back in x's dtype, shape (C,).
pub fn norm_backward(
    x: &CpuStorage,
    lx: &Layout,
    dy: &CpuStorage,
    ldy: &Layout,
    w: Option<(&CpuStorage, &Layout)>,
    groups: Option<usize>,
    eps: f64,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    let op = if groups.is_some() {
        "group_norm_bwd"
    } else {
        "layer_norm_bwd"
    };
    let (p, channels) = plan(lx, groups, eps, op)?;
    let want = x.dtype();
    let back = |v: Vec<f64>| CpuStorage::F64(v).to_dtype(&Layout::contiguous(channels), want);
    Ok(match (x.floats(lx, op)?, dy.floats(ldy, op)?) {
        (FloatData::F32(xv), FloatData::F32(g)) => {
            let w = param::<f32>(w);
            let (dx, dw, db) = norm_bwd(&xv, &g, w.as_deref(), &p, channels);
            (CpuStorage::from_f32(dx, want), back(dw), back(db))
        }
        (FloatData::F64(xv), FloatData::F64(g)) => {
            let w = param::<f64>(w);
            let (dx, dw, db) = norm_bwd(&xv, &g, w.as_deref(), &p, channels);
            (CpuStorage::F64(dx), back(dw), back(db))
        }
        _ => {
            return Err(Error::DTypeMismatch {
                op,
                lhs: x.dtype(),
                rhs: dy.dtype(),
            })
        }
    })
}
