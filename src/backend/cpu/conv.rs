//! Spatial ops on NCHW tensors: conv2d (im2col + gemm, forward, input- and weight-gradient),
//! nearest upsampling, average/max pooling and adaptive average pooling.

use super::matmul::gemm_strided;
use super::CpuStorage;
use crate::tensor::{Float, Layout};
use crate::{Error, Result};
use rayon::prelude::*;

/// Geometry of one conv2d: input (N, C, H, W), weight (K, C, R, S).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub r: usize,
    pub s: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeom {
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.padding - self.r) / self.stride + 1,
            (self.w + 2 * self.padding - self.s) / self.stride + 1,
        )
    }

    fn is_pointwise(&self) -> bool {
        self.r == 1 && self.s == 1 && self.stride == 1 && self.padding == 0
    }

    /// Output rows per im2col chunk, so the column buffer stays near 32 MiB of f32 at 1024².
    fn rows_per_chunk(&self) -> usize {
        let (oh, ow) = self.out_hw();
        let per_row = self.c * self.r * self.s * ow;
        ((8 << 20) / per_row.max(1)).clamp(1, oh.max(1))
    }
}

/// Column matrix (C*R*S, rows*OW) for output rows [r0, r0+rows) of one image.
fn im2col<T: Float>(x: &[T], g: &ConvGeom, r0: usize, rows: usize) -> Vec<T> {
    let (_, ow) = g.out_hw();
    let ncol = rows * ow;
    let mut cols = vec![T::zero(); g.c * g.r * g.s * ncol];
    cols.par_chunks_mut(ncol)
        .enumerate()
        .for_each(|(row, dst)| {
            let (ci, kr, ks) = (row / (g.r * g.s), (row / g.s) % g.r, row % g.s);
            for oy in 0..rows {
                let iy = ((r0 + oy) * g.stride + kr) as isize - g.padding as isize;
                if iy < 0 || iy >= g.h as isize {
                    continue;
                }
                let src = &x[(ci * g.h + iy as usize) * g.w..][..g.w];
                for ox in 0..ow {
                    let ix = (ox * g.stride + ks) as isize - g.padding as isize;
                    if ix >= 0 && ix < g.w as isize {
                        dst[oy * ow + ox] = src[ix as usize];
                    }
                }
            }
        });
    cols
}

/// Scatter-add a column matrix back onto one image's input gradient.
fn col2im<T: Float>(cols: &[T], dx: &mut [T], g: &ConvGeom, r0: usize, rows: usize) {
    let (_, ow) = g.out_hw();
    let ncol = rows * ow;
    dx.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(ci, plane)| {
            for kr in 0..g.r {
                for ks in 0..g.s {
                    let src = &cols[((ci * g.r + kr) * g.s + ks) * ncol..][..ncol];
                    for oy in 0..rows {
                        let iy = ((r0 + oy) * g.stride + kr) as isize - g.padding as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        for ox in 0..ow {
                            let ix = (ox * g.stride + ks) as isize - g.padding as isize;
                            if ix >= 0 && ix < g.w as isize {
                                plane[iy as usize * g.w + ix as usize] += src[oy * ow + ox];
                            }
                        }
                    }
                }
            }
        });
}

fn conv_fwd<T: Float>(x: &[T], wt: &[T], g: &ConvGeom) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let ckk = g.c * g.r * g.s;
    let mut out = vec![T::zero(); g.n * g.k * oh * ow];
    for (n, o) in out.chunks_mut(g.k * oh * ow).enumerate() {
        let xn = &x[n * g.c * g.h * g.w..][..g.c * g.h * g.w];
        if g.is_pointwise() {
            gemm_strided(
                (g.k, oh * ow, ckk),
                wt,
                (ckk, 1),
                xn,
                (oh * ow, 1),
                o,
                oh * ow,
                false,
            );
            continue;
        }
        let step = g.rows_per_chunk();
        for r0 in (0..oh).step_by(step) {
            let rows = step.min(oh - r0);
            let cols = im2col(xn, g, r0, rows);
            gemm_strided(
                (g.k, rows * ow, ckk),
                wt,
                (ckk, 1),
                &cols,
                (rows * ow, 1),
                &mut o[r0 * ow..],
                oh * ow,
                false,
            );
        }
    }
    out
}

fn conv_bwd_input<T: Float>(dy: &[T], wt: &[T], g: &ConvGeom) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let ckk = g.c * g.r * g.s;
    let mut dx = vec![T::zero(); g.n * g.c * g.h * g.w];
    for (n, d) in dx.chunks_mut(g.c * g.h * g.w).enumerate() {
        let dyn_ = &dy[n * g.k * oh * ow..][..g.k * oh * ow];
        if g.is_pointwise() {
            // dx (C, HW) = W^T (C, K) @ dy (K, HW)
            gemm_strided(
                (g.c, oh * ow, g.k),
                wt,
                (1, ckk),
                dyn_,
                (oh * ow, 1),
                d,
                oh * ow,
                false,
            );
            continue;
        }
        let step = g.rows_per_chunk();
        for r0 in (0..oh).step_by(step) {
            let rows = step.min(oh - r0);
            let mut cols = vec![T::zero(); ckk * rows * ow];
            gemm_strided(
                (ckk, rows * ow, g.k),
                wt,
                (1, ckk),
                &dyn_[r0 * ow..],
                (oh * ow, 1),
                &mut cols,
                rows * ow,
                false,
            );
            col2im(&cols, d, g, r0, rows);
        }
    }
    dx
}

fn conv_bwd_weight<T: Float>(x: &[T], dy: &[T], g: &ConvGeom) -> Vec<T> {
    let (oh, ow) = g.out_hw();
    let ckk = g.c * g.r * g.s;
    let mut dw = vec![T::zero(); g.k * ckk];
    for n in 0..g.n {
        let xn = &x[n * g.c * g.h * g.w..][..g.c * g.h * g.w];
        let dyn_ = &dy[n * g.k * oh * ow..][..g.k * oh * ow];
        let step = if g.is_pointwise() {
            oh
        } else {
            g.rows_per_chunk()
        };
        for r0 in (0..oh).step_by(step) {
            let rows = step.min(oh - r0);
            let cols = if g.is_pointwise() {
                xn.to_vec()
            } else {
                im2col(xn, g, r0, rows)
            };
            // dW (K, CKK) += dy (K, rows*OW) @ cols^T (rows*OW, CKK)
            gemm_strided(
                (g.k, ckk, rows * ow),
                &dyn_[r0 * ow..],
                (oh * ow, 1),
                &cols,
                (1, rows * ow),
                &mut dw,
                ckk,
                true,
            );
        }
    }
    dw
}

pub fn conv2d(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    g: &ConvGeom,
) -> Result<CpuStorage> {
    Ok(crate::cpu_float_binary!(x, lx, w, lw, "conv2d", |x, w| {
        conv_fwd(&x, &w, g)
    }))
}

pub fn conv2d_bwd_input(
    dy: &CpuStorage,
    ldy: &Layout,
    w: &CpuStorage,
    lw: &Layout,
    g: &ConvGeom,
) -> Result<CpuStorage> {
    Ok(crate::cpu_float_binary!(
        dy,
        ldy,
        w,
        lw,
        "conv2d_bwd_input",
        |d, w| conv_bwd_input(&d, &w, g)
    ))
}

pub fn conv2d_bwd_weight(
    x: &CpuStorage,
    lx: &Layout,
    dy: &CpuStorage,
    ldy: &Layout,
    g: &ConvGeom,
) -> Result<CpuStorage> {
    Ok(crate::cpu_float_binary!(
        x,
        lx,
        dy,
        ldy,
        "conv2d_bwd_weight",
        |x, d| conv_bwd_weight(&x, &d, g)
    ))
}

fn dims4(l: &Layout, op: &'static str) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        _ => Err(Error::Rank {
            op,
            expected: 4,
            got: l.shape().clone(),
        }),
    }
}

/// Nearest-neighbour upsampling by an integer factor.
pub fn upsample_nearest(x: &CpuStorage, l: &Layout, f: usize) -> Result<CpuStorage> {
    let (n, c, h, w) = dims4(l, "upsample_nearest")?;
    fn run<T: Float>(x: &[T], planes: usize, h: usize, w: usize, f: usize) -> Vec<T> {
        let mut out = vec![T::zero(); planes * h * f * w * f];
        out.par_chunks_mut(h * f * w * f)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, p)| {
                for y in 0..h * f {
                    for xo in 0..w * f {
                        o[y * w * f + xo] = p[(y / f) * w + xo / f];
                    }
                }
            });
        out
    }
    Ok(crate::cpu_float_unary!(x, l, "upsample_nearest", |v| run(
        &v,
        n * c,
        h,
        w,
        f
    )))
}

/// Gradient of nearest upsampling: each input pixel sums its f x f block.
pub fn upsample_nearest_bwd(dy: &CpuStorage, l: &Layout, f: usize) -> Result<CpuStorage> {
    let (n, c, oh, ow) = dims4(l, "upsample_nearest_bwd")?;
    let (h, w) = (oh / f, ow / f);
    fn run<T: Float>(g: &[T], planes: usize, h: usize, w: usize, f: usize) -> Vec<T> {
        let mut out = vec![T::zero(); planes * h * w];
        out.par_chunks_mut(h * w)
            .zip(g.par_chunks(h * f * w * f))
            .for_each(|(o, p)| {
                for y in 0..h * f {
                    for x in 0..w * f {
                        o[(y / f) * w + x / f] += p[y * w * f + x];
                    }
                }
            });
        out
    }
    Ok(crate::cpu_float_unary!(
        dy,
        l,
        "upsample_nearest_bwd",
        |v| run(&v, n * c, h, w, f)
    ))
}

/// PyTorch's adaptive pooling windows: [floor(i*in/out), ceil((i+1)*in/out)).
pub fn adaptive_window(i: usize, input: usize, output: usize) -> (usize, usize) {
    (i * input / output, ((i + 1) * input).div_ceil(output))
}

/// Average pooling with explicit windows per output row/column (covers plain and adaptive pools).
fn pool_avg<T: Float>(
    x: &[T],
    planes: usize,
    (h, w): (usize, usize),
    rows: &[(usize, usize)],
    cols: &[(usize, usize)],
) -> Vec<T> {
    let (oh, ow) = (rows.len(), cols.len());
    let mut out = vec![T::zero(); planes * oh * ow];
    out.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each(|(o, p)| {
            for (oy, &(y0, y1)) in rows.iter().enumerate() {
                for (ox, &(x0, x1)) in cols.iter().enumerate() {
                    let mut acc = 0f64;
                    for y in y0..y1 {
                        for xx in x0..x1 {
                            acc += p[y * w + xx].as_f64();
                        }
                    }
                    o[oy * ow + ox] = T::of(acc / ((y1 - y0) * (x1 - x0)) as f64);
                }
            }
        });
    out
}

fn pool_avg_bwd<T: Float>(
    g: &[T],
    planes: usize,
    (h, w): (usize, usize),
    rows: &[(usize, usize)],
    cols: &[(usize, usize)],
) -> Vec<T> {
    let (oh, ow) = (rows.len(), cols.len());
    let mut out = vec![T::zero(); planes * h * w];
    out.par_chunks_mut(h * w)
        .zip(g.par_chunks(oh * ow))
        .for_each(|(o, p)| {
            for (oy, &(y0, y1)) in rows.iter().enumerate() {
                for (ox, &(x0, x1)) in cols.iter().enumerate() {
                    let v = p[oy * ow + ox] / T::of(((y1 - y0) * (x1 - x0)) as f64);
                    for y in y0..y1 {
                        for xx in x0..x1 {
                            o[y * w + xx] += v;
                        }
                    }
                }
            }
        });
    out
}

/// Windows of a pool: adaptive when `kernel` is None, else (kernel, stride) without padding.
pub fn pool_windows(
    input: usize,
    output: usize,
    kernel: Option<(usize, usize)>,
) -> Vec<(usize, usize)> {
    (0..output)
        .map(|i| match kernel {
            None => adaptive_window(i, input, output),
            Some((k, s)) => (i * s, i * s + k),
        })
        .collect()
}

pub fn avg_pool(
    x: &CpuStorage,
    l: &Layout,
    out_hw: (usize, usize),
    kernel: Option<(usize, usize)>,
) -> Result<CpuStorage> {
    let (n, c, h, w) = dims4(l, "avg_pool2d")?;
    let rows = pool_windows(h, out_hw.0, kernel);
    let cols = pool_windows(w, out_hw.1, kernel);
    Ok(crate::cpu_float_unary!(x, l, "avg_pool2d", |v| pool_avg(
        &v,
        n * c,
        (h, w),
        &rows,
        &cols
    )))
}

pub fn avg_pool_bwd(
    dy: &CpuStorage,
    l: &Layout,
    in_hw: (usize, usize),
    kernel: Option<(usize, usize)>,
) -> Result<CpuStorage> {
    let (n, c, oh, ow) = dims4(l, "avg_pool2d_bwd")?;
    let rows = pool_windows(in_hw.0, oh, kernel);
    let cols = pool_windows(in_hw.1, ow, kernel);
    Ok(crate::cpu_float_unary!(dy, l, "avg_pool2d_bwd", |v| {
        pool_avg_bwd(&v, n * c, in_hw, &rows, &cols)
    }))
}

/// Max pooling (forward only: LPIPS' AlexNet needs it, nothing trains through it).
pub fn max_pool(x: &CpuStorage, l: &Layout, kernel: usize, stride: usize) -> Result<CpuStorage> {
    let (n, c, h, w) = dims4(l, "max_pool2d")?;
    if h < kernel || w < kernel {
        return Err(Error::BadShape {
            op: "max_pool2d",
            msg: format!("kernel {kernel} larger than input"),
            shape: l.shape().clone(),
        });
    }
    let (oh, ow) = ((h - kernel) / stride + 1, (w - kernel) / stride + 1);
    fn run<T: Float>(
        x: &[T],
        planes: usize,
        (h, w): (usize, usize),
        (oh, ow): (usize, usize),
        k: usize,
        s: usize,
    ) -> Vec<T> {
        let mut out = vec![T::zero(); planes * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, p)| {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut m = T::neg_infinity();
                        for y in oy * s..oy * s + k {
                            for xx in ox * s..ox * s + k {
                                m = m.max(p[y * w + xx]);
                            }
                        }
                        o[oy * ow + ox] = m;
                    }
                }
            });
        out
    }
    Ok(crate::cpu_float_unary!(x, l, "max_pool2d", |v| run(
        &v,
        n * c,
        (h, w),
        (oh, ow),
        kernel,
        stride
    )))
}
