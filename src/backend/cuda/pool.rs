//! The fused spatial-attention pooling on CUDA (kernels/pool.cu): one read of h for the forward,
//! one more for d_h and d_logits.

use std::sync::Arc;

use super::elementwise::contiguous;
use super::{check_dtype, float_tn, i32_arg, same_device, CudaStorage};
use crate::tensor::{DType, Layout};
use crate::{Error, Result};

type Operand<'a> = (&'a CudaStorage, &'a Layout);

fn dims(h: Operand, logits: Operand) -> Result<(usize, usize, usize)> {
    same_device(h.0, logits.0, "spatial_pool")?;
    check_dtype(h.0.dtype(), logits.0.dtype(), "spatial_pool")?;
    match h.1.dims() {
        [b, s, d] if logits.1.shape().elem_count() == b * s => Ok((*b, *s, *d)),
        [_, _, _] => Err(Error::ShapeMismatch {
            op: "spatial_pool",
            lhs: h.1.shape().clone(),
            rhs: logits.1.shape().clone(),
        }),
        _ => Err(Error::Rank {
            op: "spatial_pool",
            expected: 3,
            got: h.1.shape().clone(),
        }),
    }
}

/// Forward into `h_c`, saving (h_att, argmax, sum_w) when their pointers are non-zero. Whole rows
/// per block when the (batch, 32-channel) blocks fill the device twice over; else the rows are
/// split across blocks (at least 64 each) and a second kernel combines the partials.
fn fwd(
    h: u64,
    logits: u64,
    h_c: u64,
    saved: (u64, u64, u64),
    dtype: DType,
    (b, s, d): (usize, usize, usize),
    dev: &Arc<super::CudaDevice>,
) -> Result<()> {
    let tn = float_tn(dtype, "spatial_pool")?;
    let (bi, si, di) = (
        i32_arg(b, "B", "spatial_pool")?,
        i32_arg(s, "S", "spatial_pool")?,
        i32_arg(d, "D", "spatial_pool")?,
    );
    let blocks = d.div_ceil(32) * b;
    let target = 2 * dev.sm_count() as usize;
    let want = if blocks >= target {
        1
    } else {
        target.div_ceil(blocks).min(s.div_ceil(64)).max(1)
    };
    let rows_per_split = s.div_ceil(want).max(1);
    let splits = s.div_ceil(rows_per_split).max(1);
    if splits == 1 {
        return dev
            .launch("pool", format!("pool_spatial_fwd_{tn}"))?
            .arg(h)
            .arg(logits)
            .arg(h_c)
            .arg(saved.0)
            .arg(saved.1)
            .arg(saved.2)
            .arg(bi)
            .arg(si)
            .arg(di)
            .run((d.div_ceil(32) as u32, b as u32, 1), (32, 8, 1), 0);
    }
    let n = splits * b * d;
    let (num, max) = (dev.alloc(DType::F32, n)?, dev.alloc(DType::F32, n)?);
    let arg = dev.alloc(DType::F32, n)?; // i32, 4 bytes each
    let w = dev.alloc(DType::F32, splits * b)?;
    dev.launch("pool", format!("pool_spatial_part_fwd_{tn}"))?
        .arg(h)
        .arg(logits)
        .arg(num.ptr())
        .arg(max.ptr())
        .arg(arg.ptr())
        .arg(w.ptr())
        .arg(bi)
        .arg(si)
        .arg(di)
        .arg(rows_per_split as i32)
        .run(
            (d.div_ceil(32) as u32, b as u32, splits as u32),
            (32, 8, 1),
            0,
        )?;
    dev.launch("pool", format!("pool_spatial_combine_fwd_{tn}"))?
        .arg(num.ptr())
        .arg(max.ptr())
        .arg(arg.ptr())
        .arg(w.ptr())
        .arg(h_c)
        .arg(saved.0)
        .arg(saved.1)
        .arg(saved.2)
        .arg(bi)
        .arg(di)
        .arg(splits as i32)
        .run_gs(b * d)
}

/// h_c (B, D).
pub fn spatial_fwd(h: Operand, logits: Operand) -> Result<CudaStorage> {
    let (b, s, d) = dims(h, logits)?;
    let dev = h.0.dev();
    let (hc, lc) = (contiguous(h.0, h.1)?, contiguous(logits.0, logits.1)?);
    let out = CudaStorage::alloc(dev, h.0.dtype(), b * d)?;
    if b * d > 0 {
        fwd(
            hc.ptr(),
            lc.ptr(),
            out.ptr(),
            (0, 0, 0),
            h.0.dtype(),
            (b, s, d),
            dev,
        )?;
    }
    Ok(out)
}

/// (d_h (B, S, D), d_logits (B, S)); reruns the forward for its saved statistics.
pub fn spatial_bwd(
    h: Operand,
    logits: Operand,
    d_hc: Operand,
) -> Result<(CudaStorage, CudaStorage)> {
    let (b, s, d) = dims(h, logits)?;
    same_device(h.0, d_hc.0, "spatial_pool_bwd")?;
    check_dtype(h.0.dtype(), d_hc.0.dtype(), "spatial_pool_bwd")?;
    let dev = h.0.dev();
    let dtype = h.0.dtype();
    let (hc, lc, gc) = (
        contiguous(h.0, h.1)?,
        contiguous(logits.0, logits.1)?,
        contiguous(d_hc.0, d_hc.1)?,
    );
    let d_h = CudaStorage::alloc(dev, dtype, b * s * d)?;
    let d_l = CudaStorage::alloc(dev, dtype, b * s)?;
    if b * s * d == 0 {
        return Ok((d_h, d_l));
    }
    let scratch = dev.alloc(dtype, b * d)?;
    let h_att = dev.alloc(DType::F32, b * d)?;
    let argmax = dev.alloc(DType::F32, b * d)?; // i32, 4 bytes each
    let sum_w = dev.alloc(DType::F32, b)?;
    fwd(
        hc.ptr(),
        lc.ptr(),
        scratch.ptr(),
        (h_att.ptr(), argmax.ptr(), sum_w.ptr()),
        dtype,
        (b, s, d),
        dev,
    )?;
    dev.launch(
        "pool",
        format!("pool_spatial_bwd_{}", float_tn(dtype, "spatial_pool_bwd")?),
    )?
    .arg(hc.ptr())
    .arg(lc.ptr())
    .arg(gc.ptr())
    .arg(h_att.ptr())
    .arg(argmax.ptr())
    .arg(sum_w.ptr())
    .arg(d_h.ptr())
    .arg(d_l.ptr())
    .arg(b as i32)
    .arg(s as i32)
    .arg(d as i32)
    .arg(0i32)
    .run(((b * s).div_ceil(8) as u32, 1, 1), (256, 1, 1), 0)?;
    Ok((d_h, d_l))
}
