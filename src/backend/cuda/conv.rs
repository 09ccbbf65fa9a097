//! Spatial ops on CUDA (kernels/conv.cu): conv2d as im2col + one strided-batched cuBLAS GEMM per
//! chunk of images (forward, input gradient through col2im, weight gradient accumulated in f32),
//! nearest upsampling, average / adaptive average / max pooling.

use std::sync::Arc;

use super::elementwise::{contiguous, to_dtype};
use super::gemm::{gemm, Mat};
use super::{check_dtype, float_tn, i32_arg, same_device, CudaDevice, CudaStorage};
use crate::backend::cpu::conv::ConvGeom;
use crate::tensor::{DType, Layout};
use crate::{Error, Result};

/// `struct ConvGeom` of conv.cu (14 x i32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KGeom {
    pub n: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub kh: i32,
    pub kw: i32,
    pub sh: i32,
    pub sw: i32,
    pub ph: i32,
    pub pw: i32,
    pub dh: i32,
    pub dw: i32,
    pub oh: i32,
    pub ow: i32,
}

fn kgeom(g: &ConvGeom, images: usize) -> Result<KGeom> {
    let (oh, ow) = g.out_hw();
    let i = |v: usize, what: &str| i32_arg(v, what, "conv2d");
    Ok(KGeom {
        n: i(images, "N")?,
        c: i(g.c, "C")?,
        h: i(g.h, "H")?,
        w: i(g.w, "W")?,
        kh: i(g.r, "KH")?,
        kw: i(g.s, "KW")?,
        sh: i(g.stride, "stride")?,
        sw: i(g.stride, "stride")?,
        ph: i(g.padding, "padding")?,
        pw: i(g.padding, "padding")?,
        dh: 1,
        dw: 1,
        oh: i(oh, "OH")?,
        ow: i(ow, "OW")?,
    })
}

fn is_pointwise(g: &ConvGeom) -> bool {
    g.r == 1 && g.s == 1 && g.stride == 1 && g.padding == 0
}

/// Images per im2col chunk: the column buffer stays near 256 MiB (SDXL's 3x3 convs at 128x128
/// latents take ~95 MB per bf16 image), so batches never multiply it.
fn images_per_chunk(g: &ConvGeom, dtype: DType) -> usize {
    let (oh, ow) = g.out_hw();
    let per_image = g.c * g.r * g.s * oh * ow * dtype.size_in_bytes();
    ((256usize << 20) / per_image.max(1)).clamp(1, g.n.max(1))
}

fn im2col(dev: &CudaDevice, t: &str, x: u64, col: u64, kg: KGeom, n: usize) -> Result<()> {
    dev.launch("conv", format!("conv_im2col_fwd_{t}"))?
        .arg(x)
        .arg(col)
        .arg(kg)
        .run_gs(n)
}

pub fn conv2d(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    g: &ConvGeom,
) -> Result<CudaStorage> {
    let dev = same_device(x, w, "conv2d")?;
    check_dtype(x.dtype(), w.dtype(), "conv2d")?;
    let t = float_tn(x.dtype(), "conv2d")?;
    let (oh, ow) = g.out_hw();
    let (p, ckk, chw) = (oh * ow, g.c * g.r * g.s, g.c * g.h * g.w);
    let (xc, wc) = (contiguous(x, lx)?, contiguous(w, lw)?);
    let out = CudaStorage::alloc(dev, x.dtype(), g.n * g.k * p)?;
    let wm = Mat {
        batch_stride: 0,
        ..Mat::contiguous(wc.ptr(), g.k, ckk)
    };
    let es = x.dtype().size_in_bytes() as u64;
    if is_pointwise(g) {
        let xm = Mat::contiguous(xc.ptr(), g.c, p);
        return gemm(
            dev,
            "conv2d",
            x.dtype(),
            wm,
            xm,
            (out.ptr(), x.dtype(), p, g.k * p),
            g.n,
            1.0,
            0.0,
        )
        .map(|_| out);
    }
    let step = images_per_chunk(g, x.dtype());
    let col = dev.alloc(x.dtype(), step * ckk * p)?;
    for n0 in (0..g.n).step_by(step) {
        let nb = step.min(g.n - n0);
        im2col(
            dev,
            t,
            xc.ptr() + (n0 * chw) as u64 * es,
            col.ptr(),
            kgeom(g, nb)?,
            nb * ckk * p,
        )?;
        let cm = Mat::contiguous(col.ptr(), ckk, p);
        let dst = out.ptr() + (n0 * g.k * p) as u64 * es;
        gemm(
            dev,
            "conv2d",
            x.dtype(),
            wm,
            cm,
            (dst, x.dtype(), p, g.k * p),
            nb,
            1.0,
            0.0,
        )?;
    }
    Ok(out)
}

pub fn conv2d_bwd_input(
    dy: &CudaStorage,
    ldy: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    g: &ConvGeom,
) -> Result<CudaStorage> {
    let dev = same_device(dy, w, "conv2d_bwd_input")?;
    check_dtype(dy.dtype(), w.dtype(), "conv2d_bwd_input")?;
    let t = float_tn(dy.dtype(), "conv2d_bwd_input")?;
    let (oh, ow) = g.out_hw();
    let (p, ckk, chw) = (oh * ow, g.c * g.r * g.s, g.c * g.h * g.w);
    let (gc, wc) = (contiguous(dy, ldy)?, contiguous(w, lw)?);
    let dx = CudaStorage::alloc(dev, dy.dtype(), g.n * chw)?;
    // W^T (CKK, K) as a transposed view of the (K, CKK) weight.
    let wt = Mat {
        batch_stride: 0,
        ..Mat::contiguous(wc.ptr(), g.k, ckk).t()
    };
    let es = dy.dtype().size_in_bytes() as u64;
    let dym = Mat::contiguous(gc.ptr(), g.k, p);
    if is_pointwise(g) {
        gemm(
            dev,
            "conv2d_bwd_input",
            dy.dtype(),
            wt,
            dym,
            (dx.ptr(), dy.dtype(), p, chw),
            g.n,
            1.0,
            0.0,
        )?;
        return Ok(dx);
    }
    let step = images_per_chunk(g, dy.dtype());
    let dcol = dev.alloc(dy.dtype(), step * ckk * p)?;
    for n0 in (0..g.n).step_by(step) {
        let nb = step.min(g.n - n0);
        let src = Mat {
            ptr: gc.ptr() + (n0 * g.k * p) as u64 * es,
            ..dym
        };
        gemm(
            dev,
            "conv2d_bwd_input",
            dy.dtype(),
            wt,
            src,
            (dcol.ptr(), dy.dtype(), p, ckk * p),
            nb,
            1.0,
            0.0,
        )?;
        dev.launch("conv", format!("conv_im2col_bwd_{t}"))?
            .arg(dcol.ptr())
            .arg(dx.ptr() + (n0 * chw) as u64 * es)
            .arg(kgeom(g, nb)?)
            .run_gs(nb * chw)?;
    }
    Ok(dx)
}

/// dW (K, C, R, S) = `sum_n dy[n] col[n]^T`, accumulated in f32 across images and rounded once.
pub fn conv2d_bwd_weight(
    x: &CudaStorage,
    lx: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    g: &ConvGeom,
) -> Result<CudaStorage> {
    let dev = same_device(x, dy, "conv2d_bwd_weight")?;
    check_dtype(x.dtype(), dy.dtype(), "conv2d_bwd_weight")?;
    let t = float_tn(x.dtype(), "conv2d_bwd_weight")?;
    let (oh, ow) = g.out_hw();
    let (p, ckk, chw) = (oh * ow, g.c * g.r * g.s, g.c * g.h * g.w);
    let (xc, gc) = (contiguous(x, lx)?, contiguous(dy, ldy)?);
    let dw = CudaStorage::zeros(dev, DType::F32, g.k * ckk)?;
    let es = x.dtype().size_in_bytes() as u64;
    let pointwise = is_pointwise(g);
    let step = if pointwise {
        g.n.max(1)
    } else {
        images_per_chunk(g, x.dtype())
    };
    let col = if pointwise {
        None
    } else {
        Some(dev.alloc(x.dtype(), step * ckk * p)?)
    };
    for n0 in (0..g.n).step_by(step) {
        let nb = step.min(g.n - n0);
        let base = match &col {
            Some(col) => {
                im2col(
                    dev,
                    t,
                    xc.ptr() + (n0 * chw) as u64 * es,
                    col.ptr(),
                    kgeom(g, nb)?,
                    nb * ckk * p,
                )?;
                col.ptr()
            }
            None => xc.ptr() + (n0 * chw) as u64 * es,
        };
        for i in 0..nb {
            let a = Mat::contiguous(gc.ptr() + ((n0 + i) * g.k * p) as u64 * es, g.k, p);
            let b = Mat::contiguous(base + (i * ckk * p) as u64 * es, ckk, p).t();
            gemm(
                dev,
                "conv2d_bwd_weight",
                x.dtype(),
                a,
                b,
                (dw.ptr(), DType::F32, ckk, 0),
                1,
                1.0,
                1.0,
            )?;
        }
    }
    if x.dtype() == DType::F32 {
        return Ok(dw);
    }
    to_dtype(&dw, &Layout::contiguous(g.k * ckk), x.dtype())
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

/// A (NC, H, W) -> (NC, H', W') launch of a plain-int conv kernel.
fn planes(
    dev: &Arc<CudaDevice>,
    symbol: String,
    (x, y): (u64, u64),
    ints: &[usize],
    n_threads: usize,
    op: &'static str,
) -> Result<()> {
    let mut l = dev.launch("conv", symbol)?.arg(x).arg(y);
    for &v in ints {
        l = l.arg(i32_arg(v, "size", op)?);
    }
    l.run_gs(n_threads)
}

pub fn upsample_nearest(x: &CudaStorage, l: &Layout, f: usize) -> Result<CudaStorage> {
    let (n, c, h, w) = dims4(l, "upsample_nearest")?;
    let dev = x.dev();
    let xc = contiguous(x, l)?;
    let out = CudaStorage::alloc(dev, x.dtype(), n * c * h * f * w * f)?;
    let sym = format!(
        "conv_upsample_fwd_{}",
        float_tn(x.dtype(), "upsample_nearest")?
    );
    planes(
        dev,
        sym,
        (xc.ptr(), out.ptr()),
        &[n * c, h, w, f],
        out.len(),
        "upsample_nearest",
    )?;
    Ok(out)
}

pub fn upsample_nearest_bwd(dy: &CudaStorage, l: &Layout, f: usize) -> Result<CudaStorage> {
    let (n, c, oh, ow) = dims4(l, "upsample_nearest_bwd")?;
    let (h, w) = (oh / f, ow / f);
    let dev = dy.dev();
    let gc = contiguous(dy, l)?;
    let out = CudaStorage::alloc(dev, dy.dtype(), n * c * h * w)?;
    let sym = format!(
        "conv_upsample_bwd_{}",
        float_tn(dy.dtype(), "upsample_nearest_bwd")?
    );
    planes(
        dev,
        sym,
        (gc.ptr(), out.ptr()),
        &[n * c, h, w, f],
        out.len(),
        "upsample_nearest_bwd",
    )?;
    Ok(out)
}

/// Pool geometry: square kernel and stride, no padding.
fn pool_geom(
    n: usize,
    c: usize,
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    k: usize,
    s: usize,
) -> Result<KGeom> {
    let g = ConvGeom {
        n,
        c,
        h,
        w,
        k: c,
        r: k,
        s: k,
        stride: s,
        padding: 0,
    };
    Ok(KGeom {
        oh: i32_arg(oh, "OH", "pool")?,
        ow: i32_arg(ow, "OW", "pool")?,
        ..kgeom(&g, n)?
    })
}

pub fn avg_pool(
    x: &CudaStorage,
    l: &Layout,
    out_hw: (usize, usize),
    kernel: Option<(usize, usize)>,
) -> Result<CudaStorage> {
    let (n, c, h, w) = dims4(l, "avg_pool2d")?;
    let dev = x.dev();
    let t = float_tn(x.dtype(), "avg_pool2d")?;
    let xc = contiguous(x, l)?;
    let out = CudaStorage::alloc(dev, x.dtype(), n * c * out_hw.0 * out_hw.1)?;
    match kernel {
        Some((k, s)) => dev
            .launch("conv", format!("conv_avgpool_fwd_{t}"))?
            .arg(xc.ptr())
            .arg(out.ptr())
            .arg(pool_geom(n, c, (h, w), out_hw, k, s)?)
            .run_gs(out.len())?,
        None => planes(
            dev,
            format!("conv_adaptive_avgpool_fwd_{t}"),
            (xc.ptr(), out.ptr()),
            &[n * c, h, w, out_hw.0, out_hw.1],
            out.len(),
            "adaptive_avg_pool2d",
        )?,
    }
    Ok(out)
}

pub fn avg_pool_bwd(
    dy: &CudaStorage,
    l: &Layout,
    in_hw: (usize, usize),
    kernel: Option<(usize, usize)>,
) -> Result<CudaStorage> {
    let (n, c, oh, ow) = dims4(l, "avg_pool2d_bwd")?;
    let dev = dy.dev();
    let t = float_tn(dy.dtype(), "avg_pool2d_bwd")?;
    let gc = contiguous(dy, l)?;
    let out = CudaStorage::alloc(dev, dy.dtype(), n * c * in_hw.0 * in_hw.1)?;
    match kernel {
        Some((k, s)) => dev
            .launch("conv", format!("conv_avgpool_bwd_{t}"))?
            .arg(gc.ptr())
            .arg(out.ptr())
            .arg(pool_geom(n, c, in_hw, (oh, ow), k, s)?)
            .run_gs(out.len())?,
        None => planes(
            dev,
            format!("conv_adaptive_avgpool_bwd_{t}"),
            (gc.ptr(), out.ptr()),
            &[n * c, in_hw.0, in_hw.1, oh, ow],
            out.len(),
            "adaptive_avg_pool2d_bwd",
        )?,
    }
    Ok(out)
}

pub fn max_pool(x: &CudaStorage, l: &Layout, kernel: usize, stride: usize) -> Result<CudaStorage> {
    let (n, c, h, w) = dims4(l, "max_pool2d")?;
    if h < kernel || w < kernel || stride == 0 {
        return Err(Error::BadShape {
            op: "max_pool2d",
            msg: format!("kernel {kernel} stride {stride}"),
            shape: l.shape().clone(),
        });
    }
    let (oh, ow) = ((h - kernel) / stride + 1, (w - kernel) / stride + 1);
    let dev = x.dev();
    let xc = contiguous(x, l)?;
    let out = CudaStorage::alloc(dev, x.dtype(), n * c * oh * ow)?;
    dev.launch(
        "conv",
        format!("conv_maxpool_fwd_{}", float_tn(x.dtype(), "max_pool2d")?),
    )?
    .arg(xc.ptr())
    .arg(out.ptr())
    .arg(pool_geom(n, c, (h, w), (oh, ow), kernel, stride)?)
    .run_gs(out.len())?;
    Ok(out)
}
