//! AdamW over one flat f32 buffer on CUDA (kernels/optim.cu), and the squared norm used for
//! gradient clipping.

use super::{CudaDevice, CudaStorage};
use crate::backend::cpu::optim::{AdamW, State};
use crate::tensor::DType;
use crate::{Error, Result};

/// `struct AdamWParams` of optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AdamWParams {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub bias_correction1: f32,
    pub bias_correction2: f32,
    pub grad_scale: f32,
}

impl AdamWParams {
    /// Bias corrections in f64 on the host, as the kernel contract asks (t >= 1).
    pub fn new(h: &AdamW, t: u64, grad_scale: f32) -> Self {
        AdamWParams {
            lr: h.lr as f32,
            beta1: h.beta1 as f32,
            beta2: h.beta2 as f32,
            eps: h.eps as f32,
            weight_decay: h.weight_decay as f32,
            bias_correction1: (1.0 - h.beta1.powi(t as i32)) as f32,
            bias_correction2: (1.0 - h.beta2.powi(t as i32)) as f32,
            grad_scale,
        }
    }
}

/// One AdamW step at 1-based `t` with gradient `grad_scale * g`, in place, over the elements
/// `range` of the four flat f32 buffers (bounds checked by the caller and again here): a whole
/// optimizer state, or one parameter group of it. The kernel's bf16 copy of the weights is not
/// used (0).
pub fn adamw_step_range(
    h: &AdamW,
    t: u64,
    s: State<'_, CudaStorage>,
    g: &CudaStorage,
    grad_scale: f32,
    range: std::ops::Range<usize>,
) -> Result<()> {
    let State { p, m, v } = s;
    for (what, b) in [("p", &*p), ("g", g), ("m", &*m), ("v", &*v)] {
        if b.dtype() != DType::F32 || range.end > b.len() || range.start > range.end {
            return Err(Error::msg(format!(
                "adamw_step: {what} ({} {}) has no elements {range:?}",
                b.len(),
                b.dtype()
            )));
        }
    }
    if t == 0 {
        return Err(Error::msg("adamw_step: steps count from 1"));
    }
    let n = range.len();
    if n == 0 {
        return Ok(());
    }
    let dev = p.dev().clone();
    dev.launch("optim", "optim_adamw_step_f32".to_owned())?
        .arg(p.ptr_at(range.start))
        .arg(g.ptr_at(range.start))
        .arg(m.ptr_at(range.start))
        .arg(v.ptr_at(range.start))
        .arg(0u64)
        .arg(n as i64)
        .arg(AdamWParams::new(h, t, grad_scale))
        .run_gs(n)
}

/// Sum of squares of a flat f32 buffer (read back to the host).
pub fn sqnorm(dev: &std::sync::Arc<CudaDevice>, x: &CudaStorage) -> Result<f64> {
    let n = x.len();
    let grid = n.div_ceil(256).clamp(1, 1024);
    let partial = dev.alloc(DType::F32, grid)?;
    let out = dev.alloc(DType::F32, 1)?;
    dev.launch("optim", "optim_sqnorm_fwd_f32".to_owned())?
        .arg(x.ptr())
        .arg(partial.ptr())
        .arg(n as i64)
        .run((grid as u32, 1, 1), (256, 1, 1), 0)?;
    dev.launch("reduce", "reduce_sum_fwd_f32".to_owned())?
        .arg(partial.ptr())
        .arg(out.ptr())
        .arg(1i32)
        .arg(grid as i32)
        .run((1, 1, 1), (256, 1, 1), 0)?;
    let mut v = [0f32];
    dev.download(out.ptr(), &mut v)?;
    Ok(v[0] as f64)
}

/// Elements one block of a multi-tensor pass handles: 16 per thread of a 256-thread block, so
/// a large tensor still spreads over many blocks and a small one costs one.
const PIECE: usize = 4096;

/// The `Piece` table of optim.cu for `(address, flat offset, len)` parts, each cut to `PIECE`.
fn pieces(parts: &[(u64, usize, usize)], elem_bytes: usize) -> Vec<i64> {
    let mut table = Vec::new();
    for &(ptr, offset, len) in parts {
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done);
            table.push((ptr + (done * elem_bytes) as u64) as i64);
            table.push((offset + done) as i64);
            table.push(n as i64);
            done += n;
        }
    }
    table
}

/// Launch one multi-tensor pass: one block per piece, the table uploaded once.
fn run_pieces(
    dev: &std::sync::Arc<CudaDevice>,
    symbol: String,
    table: &[i64],
    flat: u64,
) -> Result<()> {
    let count = table.len() / 3;
    if count == 0 {
        return Ok(());
    }
    let grid = u32::try_from(count)
        .map_err(|_| Error::msg(format!("{symbol}: {count} pieces exceed one grid")))?;
    // The table is released right after the launch; the pool hands its block out again only to
    // later work on the same stream, which runs after this kernel.
    let t = dev.upload(DType::I64, table)?;
    dev.launch("optim", symbol)?
        .arg(t.ptr())
        .arg(flat)
        .run((grid, 1, 1), (256, 1, 1), 0)
}

/// `flat[offset .. offset + len] += part` for every `(part address, offset, len)`: contiguous f32
/// parts on `flat`'s device, in one launch.
pub fn gather_add(flat: &mut CudaStorage, parts: &[(u64, usize, usize)]) -> Result<()> {
    if flat.dtype() != DType::F32 {
        return Err(Error::msg("gather_add: the flat buffer must be f32"));
    }
    if let Some(&(_, off, len)) = parts.iter().find(|(_, o, l)| o + l > flat.len()) {
        return Err(Error::msg(format!(
            "gather_add: part [{off}, {}) lies outside the {}-element flat buffer",
            off + len,
            flat.len()
        )));
    }
    let dev = flat.dev().clone();
    run_pieces(
        &dev,
        "optim_gather_add_fwd_f32".to_owned(),
        &pieces(parts, 4),
        flat.ptr(),
    )
}

/// Every `(target, offset)` receives `flat[offset .. offset + target.len()]`, rounded to the
/// target's dtype, in one launch per target dtype. Targets are whole storages (written in place).
pub fn scatter(flat: &CudaStorage, targets: &[(&CudaStorage, usize)]) -> Result<()> {
    if flat.dtype() != DType::F32 {
        return Err(Error::msg("scatter: the flat buffer must be f32"));
    }
    if let Some((t, _)) = targets
        .iter()
        .find(|(t, _)| !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16))
    {
        return Err(Error::msg(format!(
            "scatter: a {} target (trainables are f32, bf16 or f16)",
            t.dtype()
        )));
    }
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let parts: Vec<(u64, usize, usize)> = targets
            .iter()
            .filter(|(t, _)| t.dtype() == dtype)
            .map(|(t, off)| (t.ptr(), *off, t.len()))
            .collect();
        if let Some(&(_, off, len)) = parts.iter().find(|(_, o, l)| o + l > flat.len()) {
            return Err(Error::msg(format!(
                "scatter: target [{off}, {}) lies outside the {}-element flat buffer",
                off + len,
                flat.len()
            )));
        }
        let table = pieces(&parts, dtype.size_in_bytes());
        let symbol = format!("optim_scatter_fwd_{}", dtype.name());
        run_pieces(flat.dev(), symbol, &table, flat.ptr())?;
    }
    Ok(())
}
