//! AdamW over one flat f32 buffer on CUDA (kernels/optim.cu), and the squared norm used for
//! gradient clipping.

use super::{CudaDevice, CudaStorage};
use crate::backend::cpu::optim::AdamW;
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
    pub fn new(h: &AdamW, t: u64, grad_scale: f64) -> Self {
        AdamWParams {
            lr: h.lr as f32,
            beta1: h.beta1 as f32,
            beta2: h.beta2 as f32,
            eps: h.eps as f32,
            weight_decay: h.weight_decay as f32,
            bias_correction1: (1.0 - h.beta1.powi(t as i32)) as f32,
            bias_correction2: (1.0 - h.beta2.powi(t as i32)) as f32,
            grad_scale: grad_scale as f32,
        }
    }
}

fn f32_buf(s: &CudaStorage, n: usize, what: &str) -> Result<()> {
    if s.dtype() != DType::F32 || s.len() != n {
        return Err(Error::msg(format!(
            "adamw_step: {what} must be {n} f32 elements, got {} {}",
            s.len(),
            s.dtype()
        )));
    }
    Ok(())
}

/// One step at 1-based `t`, in place; `p_bf16` (when given) receives the rounded weights.
pub fn adamw_step(
    h: &AdamW,
    t: u64,
    p: &mut CudaStorage,
    g: &CudaStorage,
    m: &mut CudaStorage,
    v: &mut CudaStorage,
    p_bf16: Option<&mut CudaStorage>,
) -> Result<()> {
    let n = p.len();
    f32_buf(g, n, "g")?;
    f32_buf(m, n, "m")?;
    f32_buf(v, n, "v")?;
    if t == 0 {
        return Err(Error::msg("adamw_step: steps count from 1"));
    }
    let bf = match p_bf16 {
        Some(b) if b.dtype() == DType::BF16 && b.len() == n => b.ptr(),
        Some(_) => return Err(Error::msg("adamw_step: the bf16 copy must match p")),
        None => 0,
    };
    let dev = p.dev().clone();
    dev.launch("optim", "optim_adamw_step_f32".to_owned())?
        .arg(p.ptr())
        .arg(g.ptr())
        .arg(m.ptr())
        .arg(v.ptr())
        .arg(bf)
        .arg(n as i64)
        .arg(AdamWParams::new(h, t, 1.0))
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
