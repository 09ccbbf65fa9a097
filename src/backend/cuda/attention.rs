//! Scaled dot-product attention on CUDA (kernels/attention.cu): flash attention forward saving the
//! log-sum-exp, and its backward (prep, dK/dV, dQ), both on tensor cores for bf16. Shapes the kernels
//! do not cover (head dims outside {16, 32, 40, 64, 80}, Dv != D, f16; the VAE's single 512-wide
//! head) take the plain composition: S = scale Q K^T by cuBLAS, a row softmax, O = P V.

use std::sync::Arc;

use super::elementwise::contiguous;
use super::gemm::{gemm, Mat};
use super::reduce::{softmax_bwd_raw, softmax_fwd_raw};
use super::{float_tn, i32_arg, CudaDevice, CudaStorage};
use crate::backend::cpu::attention::AttnGeom;
use crate::tensor::{DType, Layout};
use crate::Result;

type Operand<'a> = (&'a CudaStorage, &'a Layout);

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// Flash attention where the kernels cover the shape, else the composition.
    Auto,
    /// The plain composition (the baseline flash attention is measured against).
    Composed,
}

const FLASH_HDS: [usize; 5] = [16, 32, 40, 64, 80];

fn flash_ok(dtype: DType, g: &AttnGeom) -> bool {
    matches!(dtype, DType::F32 | DType::BF16)
        && g.d == g.dv
        && FLASH_HDS.contains(&g.d)
        && g.bh <= 65535
}

/// Contiguous with a 16-byte aligned start (the bf16 kernels load tiles as uint4).
struct Packed {
    ptr: u64,
    _keep: Option<CudaStorage>,
    _view: super::elementwise::Contig,
}

fn packed(s: &CudaStorage, l: &Layout) -> Result<Packed> {
    let c = contiguous(s, l)?;
    if c.ptr() % 16 == 0 {
        return Ok(Packed {
            ptr: c.ptr(),
            _keep: None,
            _view: c,
        });
    }
    let copy = super::elementwise::copy_strided(s, l)?;
    Ok(Packed {
        ptr: copy.ptr(),
        _keep: Some(copy),
        _view: c,
    })
}

fn check(q: Operand, k: Operand, v: Operand, op: &'static str) -> Result<DType> {
    let dtype = q.0.dtype();
    for (s, _) in [k, v] {
        super::same_device(q.0, s, op)?;
        super::check_dtype(dtype, s.dtype(), op)?;
    }
    Ok(dtype)
}

fn flash_fwd(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    (q, k, v, o, lse): (u64, u64, u64, u64, u64),
    g: &AttnGeom,
) -> Result<()> {
    // Query rows per block and threads per block, as kernels/attention.cu fixes them.
    let (bq, threads, t) = match dtype {
        DType::BF16 => (128, 256, "bf16"),
        _ => (32, 128, "f32"),
    };
    dev.launch("attention", format!("attention_flash_fwd_{t}_hd{}", g.d))?
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(o)
        .arg(lse)
        .arg(i32_arg(g.sq, "Sq", "sdpa")?)
        .arg(i32_arg(g.skv, "Skv", "sdpa")?)
        .arg(g.scale as f32)
        .arg(g.causal as i32)
        .run(
            (g.sq.div_ceil(bq) as u32, g.bh as u32, 1),
            (threads, 1, 1),
            0,
        )
}

/// P = softmax(scale Q K^T) into a fresh (BH, Sq, Skv) buffer, causally masked when asked.
fn probs(dev: &Arc<CudaDevice>, dtype: DType, q: u64, k: u64, g: &AttnGeom) -> Result<CudaStorage> {
    // Separate score and probability buffers: the softmax kernel's pointers are __restrict__.
    let s = dev.alloc(dtype, g.bh * g.sq * g.skv)?;
    let p = CudaStorage::alloc(dev, dtype, g.bh * g.sq * g.skv)?;
    let qm = Mat::contiguous(q, g.sq, g.d);
    let kt = Mat::contiguous(k, g.skv, g.d).t();
    gemm(
        dev,
        "sdpa",
        dtype,
        qm,
        kt,
        (s.ptr(), dtype, g.skv, g.sq * g.skv),
        g.bh,
        g.scale as f32,
        0.0,
    )?;
    let causal = g.causal.then_some(g.sq);
    softmax_fwd_raw(dev, dtype, (s.ptr(), p.ptr()), g.bh * g.sq, g.skv, causal)?;
    Ok(p)
}

/// What a flash forward leaves for its backward: the output O (BH, Sq, D) and the log-sum-exp of
/// each query row's scaled scores (BH * Sq, f32), so the backward need not run the forward again.
#[derive(Clone, Copy)]
pub struct Saved<'a> {
    pub out: Operand<'a>,
    pub lse: &'a CudaStorage,
}

/// The attention output, and the log-sum-exp rows when `keep_lse` and the flash kernels ran
/// (`None` on the composition, whose backward recomputes the probabilities).
pub fn sdpa(
    q: Operand,
    k: Operand,
    v: Operand,
    g: &AttnGeom,
    keep_lse: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    sdpa_with(q, k, v, g, AttnKernel::Auto, keep_lse)
}

pub fn sdpa_with(
    q: Operand,
    k: Operand,
    v: Operand,
    g: &AttnGeom,
    which: AttnKernel,
    keep_lse: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let dtype = check(q, k, v, "sdpa")?;
    float_tn(dtype, "sdpa")?;
    let dev = q.0.dev();
    let out = CudaStorage::alloc(dev, dtype, g.bh * g.sq * g.dv)?;
    if out.is_empty() {
        return Ok((out, None));
    }
    let (qp, kp, vp) = (packed(q.0, q.1)?, packed(k.0, k.1)?, packed(v.0, v.1)?);
    if which == AttnKernel::Auto && flash_ok(dtype, g) {
        let lse = match keep_lse {
            true => Some(CudaStorage::alloc(dev, DType::F32, g.bh * g.sq)?),
            false => None,
        };
        let lse_ptr = lse.as_ref().map_or(0, |l| l.ptr());
        flash_fwd(dev, dtype, (qp.ptr, kp.ptr, vp.ptr, out.ptr(), lse_ptr), g)?;
        return Ok((out, lse));
    }
    let p = probs(dev, dtype, qp.ptr, kp.ptr, g)?;
    let pm = Mat::contiguous(p.ptr(), g.sq, g.skv);
    let vm = Mat::contiguous(vp.ptr, g.skv, g.dv);
    gemm(
        dev,
        "sdpa",
        dtype,
        pm,
        vm,
        (out.ptr(), dtype, g.dv, g.sq * g.dv),
        g.bh,
        1.0,
        0.0,
    )?;
    Ok((out, None))
}

pub fn sdpa_bwd(
    q: Operand,
    k: Operand,
    v: Operand,
    dout: Operand,
    g: &AttnGeom,
    saved: Option<Saved>,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    sdpa_bwd_with(q, k, v, dout, g, AttnKernel::Auto, saved)
}

/// (dq, dk, dv). The flash path takes O and the LSE from `saved` (what [`sdpa`] kept), else runs
/// the forward once more to get them.
pub fn sdpa_bwd_with(
    q: Operand,
    k: Operand,
    v: Operand,
    dout: Operand,
    g: &AttnGeom,
    which: AttnKernel,
    saved: Option<Saved>,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let dtype = check(q, k, v, "sdpa_bwd")?;
    super::same_device(q.0, dout.0, "sdpa_bwd")?;
    super::check_dtype(dtype, dout.0.dtype(), "sdpa_bwd")?;
    let t = float_tn(dtype, "sdpa_bwd")?;
    let dev = q.0.dev();
    let dq = CudaStorage::alloc(dev, dtype, g.bh * g.sq * g.d)?;
    let dk = CudaStorage::alloc(dev, dtype, g.bh * g.skv * g.d)?;
    let dv = CudaStorage::alloc(dev, dtype, g.bh * g.skv * g.dv)?;
    if g.bh * g.sq * g.skv == 0 {
        return Ok((dq, dk, dv));
    }
    let (qp, kp, vp, dop) = (
        packed(q.0, q.1)?,
        packed(k.0, k.1)?,
        packed(v.0, v.1)?,
        packed(dout.0, dout.1)?,
    );
    let (sq, skv) = (
        i32_arg(g.sq, "Sq", "sdpa_bwd")?,
        i32_arg(g.skv, "Skv", "sdpa_bwd")?,
    );
    if which == AttnKernel::Auto && flash_ok(dtype, g) {
        let rows = g.bh * g.sq;
        // Keys (dK/dV) or queries (dQ) per block: 64 on the bf16 tensor-core kernels.
        let bwd_tile = if dtype == DType::BF16 { 64 } else { 32 };
        let dvec = dev.alloc(DType::F32, rows)?;
        // Either the forward's O and LSE, or a fresh forward's (kept alive to the end).
        let (kept, fresh);
        let (o_ptr, lse_ptr) = match saved {
            Some(s) => {
                super::same_device(q.0, s.out.0, "sdpa_bwd")?;
                super::check_dtype(dtype, s.out.0.dtype(), "sdpa_bwd")?;
                super::check_dtype(DType::F32, s.lse.dtype(), "sdpa_bwd")?;
                if s.out.1.shape().elem_count() != rows * g.d || s.lse.len() != rows {
                    return Err(crate::Error::msg(format!(
                        "sdpa_bwd: the saved output ({} values) and log-sum-exp ({} rows) do not \
                         match {rows} query rows of head dim {}",
                        s.out.1.shape().elem_count(),
                        s.lse.len(),
                        g.d
                    )));
                }
                kept = packed(s.out.0, s.out.1)?;
                (kept.ptr, s.lse.ptr())
            }
            None => {
                let o = dev.alloc(dtype, rows * g.d)?;
                let lse = dev.alloc(DType::F32, rows)?;
                flash_fwd(dev, dtype, (qp.ptr, kp.ptr, vp.ptr, o.ptr(), lse.ptr()), g)?;
                fresh = (o, lse);
                (fresh.0.ptr(), fresh.1.ptr())
            }
        };
        dev.launch("attention", format!("attention_flash_prep_bwd_{t}"))?
            .arg(o_ptr)
            .arg(dop.ptr)
            .arg(dvec.ptr())
            .arg(rows as i64)
            .arg(g.d as i32)
            .run((rows.div_ceil(4) as u32, 1, 1), (128, 1, 1), 0)?;
        dev.launch(
            "attention",
            format!("attention_flash_dkdv_bwd_{t}_hd{}", g.d),
        )?
        .arg(qp.ptr)
        .arg(kp.ptr)
        .arg(vp.ptr)
        .arg(dop.ptr)
        .arg(lse_ptr)
        .arg(dvec.ptr())
        .arg(dk.ptr())
        .arg(dv.ptr())
        .arg(sq)
        .arg(skv)
        .arg(g.scale as f32)
        .arg(g.causal as i32)
        .run(
            (g.skv.div_ceil(bwd_tile) as u32, g.bh as u32, 1),
            (128, 1, 1),
            0,
        )?;
        dev.launch("attention", format!("attention_flash_dq_bwd_{t}_hd{}", g.d))?
            .arg(qp.ptr)
            .arg(kp.ptr)
            .arg(vp.ptr)
            .arg(dop.ptr)
            .arg(lse_ptr)
            .arg(dvec.ptr())
            .arg(dq.ptr())
            .arg(sq)
            .arg(skv)
            .arg(g.scale as f32)
            .arg(g.causal as i32)
            .run(
                (g.sq.div_ceil(bwd_tile) as u32, g.bh as u32, 1),
                (128, 1, 1),
                0,
            )?;
        return Ok((dq, dk, dv));
    }
    let (sq, skv, d, dvd, bh) = (g.sq, g.skv, g.d, g.dv, g.bh);
    let p = probs(dev, dtype, qp.ptr, kp.ptr, g)?;
    let pm = Mat::contiguous(p.ptr(), sq, skv);
    let dom = Mat::contiguous(dop.ptr, sq, dvd);
    // dV = P^T dO
    gemm(
        dev,
        "sdpa_bwd",
        dtype,
        pm.t(),
        dom,
        (dv.ptr(), dtype, dvd, skv * dvd),
        bh,
        1.0,
        0.0,
    )?;
    // dP = dO V^T, then dS = P (dP - rowsum(P dP)): the softmax backward.
    let dp = dev.alloc(dtype, bh * sq * skv)?;
    let ds = CudaStorage::alloc(dev, dtype, bh * sq * skv)?;
    let vt = Mat::contiguous(vp.ptr, skv, dvd).t();
    gemm(
        dev,
        "sdpa_bwd",
        dtype,
        dom,
        vt,
        (dp.ptr(), dtype, skv, sq * skv),
        bh,
        1.0,
        0.0,
    )?;
    softmax_bwd_raw(dev, dtype, (p.ptr(), dp.ptr(), ds.ptr()), bh * sq, skv)?;
    let dsm = Mat::contiguous(ds.ptr(), sq, skv);
    let (alpha, qm, km) = (
        g.scale as f32,
        Mat::contiguous(qp.ptr, sq, d),
        Mat::contiguous(kp.ptr, skv, d),
    );
    // dQ = scale dS K, dK = scale dS^T Q
    gemm(
        dev,
        "sdpa_bwd",
        dtype,
        dsm,
        km,
        (dq.ptr(), dtype, d, sq * d),
        bh,
        alpha,
        0.0,
    )?;
    gemm(
        dev,
        "sdpa_bwd",
        dtype,
        dsm.t(),
        qm,
        (dk.ptr(), dtype, d, skv * d),
        bh,
        alpha,
        0.0,
    )?;
    Ok((dq, dk, dv))
}
