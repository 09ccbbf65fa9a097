//! Reductions: sum over any set of dims, max over one dim with its arg-max, and softmax over the
//! last dim. Sums accumulate in f64 so the oracle's error does not grow with the reduced length.

use super::{lane_sum, CpuStorage};
use crate::tensor::{Float, Layout, Shape};
use crate::{Error, Result};
use rayon::prelude::*;

/// Sum over `dims`, keeping them as size 1. Output contiguous.
pub fn sum_keepdim(s: &CpuStorage, l: &Layout, dims: &[usize]) -> Result<CpuStorage> {
    let rank = l.dims().len();
    if let Some(&d) = dims.iter().find(|&&d| d >= rank) {
        return Err(Error::DimOutOfRange {
            op: "sum",
            dim: d,
            shape: l.shape().clone(),
        });
    }
    let out_dims: Vec<usize> = l
        .dims()
        .iter()
        .enumerate()
        .map(|(i, &d)| if dims.contains(&i) { 1 } else { d })
        .collect();
    let out_shape = Shape::from(out_dims);
    // Each input element lands at the output offset given by the output's strides with 0 on the
    // reduced dims: walk that "scatter layout" in step with the input.
    let mut scatter = out_shape.contiguous_strides();
    for &d in dims {
        scatter[d] = 0;
    }
    let scatter = Layout::new(l.shape().clone(), scatter, 0);
    fn run<T: Float>(x: &[T], scatter: &Layout, n_out: usize) -> Vec<T> {
        let mut acc = vec![0f64; n_out];
        for (&v, o) in x.iter().zip(scatter.offsets()) {
            acc[o] += v.as_f64();
        }
        acc.into_iter().map(T::of).collect()
    }
    let n_out = out_shape.elem_count();
    Ok(crate::cpu_float_unary!(s, l, "sum", |x| run(
        &x, &scatter, n_out
    )))
}

/// Max over `dim` (kept as size 1) and the index of the first maximum.
pub fn max_keepdim(s: &CpuStorage, l: &Layout, dim: usize) -> Result<(CpuStorage, Vec<i64>)> {
    let shape = l.shape();
    let n = shape.dim(dim)?;
    if n == 0 {
        return Err(Error::BadShape {
            op: "max",
            msg: format!("empty dim {dim}"),
            shape: shape.clone(),
        });
    }
    let (outer, inner) = shape.outer_inner(dim);
    fn run<T: Float>(x: &[T], outer: usize, n: usize, inner: usize) -> (Vec<T>, Vec<i64>) {
        let mut vals = vec![T::zero(); outer * inner];
        let mut idx = vec![0i64; outer * inner];
        for o in 0..outer {
            for i in 0..inner {
                let base = o * n * inner + i;
                let (mut best, mut arg) = (x[base], 0);
                for j in 1..n {
                    let v = x[base + j * inner];
                    // NaN propagates like torch.amax: once seen it stays the maximum.
                    if v > best || (v.is_nan() && !best.is_nan()) {
                        best = v;
                        arg = j;
                    }
                }
                vals[o * inner + i] = best;
                idx[o * inner + i] = arg as i64;
            }
        }
        (vals, idx)
    }
    let want = s.dtype();
    Ok(match s.floats(l, "max")? {
        super::FloatData::F32(x) => {
            let (v, i) = run(&x, outer, n, inner);
            (CpuStorage::from_f32(v, want), i)
        }
        super::FloatData::F64(x) => {
            let (v, i) = run(&x, outer, n, inner);
            (CpuStorage::F64(v), i)
        }
    })
}

/// Gradient of max over `dim`: `dy` (outer, 1, inner) scattered to the arg-max positions of a
/// tensor of `shape`.
pub fn max_bwd(
    dy: &CpuStorage,
    ldy: &Layout,
    argmax: &[i64],
    shape: &Shape,
    dim: usize,
) -> Result<CpuStorage> {
    let n = shape.dim(dim)?;
    let (outer, inner) = shape.outer_inner(dim);
    fn run<T: Float>(g: &[T], argmax: &[i64], outer: usize, n: usize, inner: usize) -> Vec<T> {
        let mut dx = vec![T::zero(); outer * n * inner];
        for o in 0..outer {
            for i in 0..inner {
                let j = argmax[o * inner + i] as usize;
                dx[o * n * inner + j * inner + i] = g[o * inner + i];
            }
        }
        dx
    }
    Ok(crate::cpu_float_unary!(dy, ldy, "max_bwd", |g| run(
        &g, argmax, outer, n, inner
    )))
}

/// Softmax over the last dim, max-subtracted.
pub fn softmax_last(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    let n = *l.dims().last().ok_or(Error::Rank {
        op: "softmax",
        expected: 1,
        got: l.shape().clone(),
    })?;
    fn run<T: Float>(x: &[T], n: usize) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        if n == 0 {
            return out;
        }
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, r)| {
                // Eight running maxima, as lane_sum does for sums: no serial max chain.
                let mut lanes = [T::neg_infinity(); 8];
                let chunks = r.chunks_exact(8);
                let tail = chunks
                    .remainder()
                    .iter()
                    .fold(T::neg_infinity(), |a, &b| a.max(b));
                for c in chunks {
                    for i in 0..8 {
                        lanes[i] = lanes[i].max(c[i]);
                    }
                }
                let m = lanes.iter().fold(tail, |a, &b| a.max(b));
                for (oi, &ri) in o.iter_mut().zip(r) {
                    *oi = (ri - m).exp();
                }
                let sum = lane_sum(o, o, |v, _| v.as_f64());
                let inv = T::of(1.0 / sum);
                o.iter_mut().for_each(|v| *v *= inv);
            });
        out
    }
    Ok(crate::cpu_float_unary!(s, l, "softmax", |x| run(&x, n)))
}

/// dx = y * (dy - sum(y * dy)) over the last dim.
pub fn softmax_last_bwd(
    y: &CpuStorage,
    ly: &Layout,
    dy: &CpuStorage,
    ldy: &Layout,
) -> Result<CpuStorage> {
    let n = *ly.dims().last().unwrap_or(&1);
    fn run<T: Float>(y: &[T], g: &[T], n: usize) -> Vec<T> {
        let mut out = vec![T::zero(); y.len()];
        if n == 0 {
            return out;
        }
        out.par_chunks_mut(n)
            .zip(y.par_chunks(n).zip(g.par_chunks(n)))
            .for_each(|(o, (yr, gr))| {
                let dot = lane_sum(yr, gr, |a, b| (a * b).as_f64());
                let dot = T::of(dot);
                for ((oi, &a), &b) in o.iter_mut().zip(yr).zip(gr) {
                    *oi = a * (b - dot);
                }
            });
        out
    }
    Ok(crate::cpu_float_binary!(
        y,
        ly,
        dy,
        ldy,
        "softmax_bwd",
        |y, g| run(&y, &g, n)
    ))
}
