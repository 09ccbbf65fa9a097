//! Layer norm (last dim) and group norm (N, C, spatial...) on CUDA (kernels/norm.cu), forward and
//! backward, group norm optionally fused with SiLU. Parameter gradients come from deterministic
//! per-chunk partials folded by `reduce_colsum` into one f32 `[dbeta | dgamma]` buffer.
//!
//! The backend contract's backward receives x (not the saved statistics), so it reruns the
//! forward into a scratch output to get mean/rstd: one extra read and write of x, which the
//! autograd side can drop once it keeps the statistics.

use std::sync::Arc;

use super::elementwise::{contiguous, to_dtype, Contig};
use super::reduce::colsum_f32;
use super::{check_dtype, float_tn, i32_arg, same_device, CudaDevice, CudaStorage};
use crate::tensor::{DType, Layout};
use crate::{Error, Result};

/// Group norm apply tile (`KS_GN_TILE` in norm.cu): part of the launch contract.
const GN_TILE: usize = 4096;

type Operand<'a> = (&'a CudaStorage, &'a Layout);

/// What one call normalises.
enum Plan {
    /// rows x n, over the last dim.
    Layer { rows: usize, n: usize },
    /// (N, C, HW) in G groups.
    Group {
        n: usize,
        c: usize,
        hw: usize,
        g: usize,
    },
}

impl Plan {
    fn new(l: &Layout, groups: Option<usize>, op: &'static str) -> Result<(Plan, usize)> {
        let dims = l.dims();
        match groups {
            None => {
                let n = *dims.last().ok_or(Error::Rank {
                    op,
                    expected: 1,
                    got: l.shape().clone(),
                })?;
                Ok((
                    Plan::Layer {
                        rows: l.shape().elem_count() / n.max(1),
                        n,
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
                if n * g > 65535 || n > 65535 {
                    return Err(Error::BadShape {
                        op,
                        msg: "N x groups exceeds the kernels' grid.y limit of 65535".into(),
                        shape: l.shape().clone(),
                    });
                }
                Ok((
                    Plan::Group {
                        n,
                        c,
                        hw: dims[2..].iter().product(),
                        g,
                    },
                    c,
                ))
            }
        }
    }
}

/// An affine parameter in x's dtype, contiguous (cast when it came in another dtype).
struct Param {
    _cast: Option<CudaStorage>,
    contig: Option<Contig>,
}

impl Param {
    fn new(
        p: Option<Operand>,
        x: &CudaStorage,
        channels: usize,
        op: &'static str,
    ) -> Result<Param> {
        let Some((s, l)) = p else {
            return Ok(Param {
                _cast: None,
                contig: None,
            });
        };
        same_device(x, s, op)?;
        if l.shape().elem_count() != channels {
            return Err(Error::BadShape {
                op,
                msg: format!("affine parameter must have {channels} elements"),
                shape: l.shape().clone(),
            });
        }
        if s.dtype() == x.dtype() {
            return Ok(Param {
                _cast: None,
                contig: Some(contiguous(s, l)?),
            });
        }
        let c = to_dtype(s, l, x.dtype())?;
        let contig = contiguous(&c, &Layout::contiguous(channels))?;
        Ok(Param {
            _cast: Some(c),
            contig: Some(contig),
        })
    }
    fn ptr(&self) -> u64 {
        self.contig.as_ref().map_or(0, |c| c.ptr())
    }
}

/// Forward into `y`, writing mean/rstd when given (f32, rows or N*G).
fn forward(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    plan: &Plan,
    (x, gamma, beta, y): (u64, u64, u64, u64),
    stats: Option<(u64, u64)>,
    eps: f64,
    silu: bool,
) -> Result<()> {
    let t = float_tn(dtype, "norm")?;
    let (mean, rstd) = stats.unwrap_or((0, 0));
    match *plan {
        Plan::Layer { rows, n } => {
            let grid = i32_arg(rows, "rows", "layer_norm")?;
            dev.launch("norm", format!("norm_layernorm_fwd_{t}"))?
                .arg(x)
                .arg(gamma)
                .arg(beta)
                .arg(y)
                .arg(mean)
                .arg(rstd)
                .arg(grid)
                .arg(i32_arg(n, "n", "layer_norm")?)
                .arg(eps as f32)
                .run((grid as u32, 1, 1), (256, 1, 1), 0)
        }
        Plan::Group { n, c, hw, g } => {
            let partial = dev.alloc(DType::F32, n * 2 * c)?;
            let (ni, ci) = (n as i32, i32_arg(c, "C", "group_norm")?);
            let hwi = i32_arg(hw, "HW", "group_norm")?;
            dev.launch("norm", format!("norm_groupnorm_stats_fwd_{t}"))?
                .arg(x)
                .arg(partial.ptr())
                .arg(ni)
                .arg(ci)
                .arg(hwi)
                .run((c as u32, n as u32, 1), (256, 1, 1), 0)?;
            let tiles = ((c / g) * hw).div_ceil(GN_TILE).max(1);
            dev.launch("norm", format!("norm_groupnorm_fwd_{t}"))?
                .arg(x)
                .arg(gamma)
                .arg(beta)
                .arg(y)
                .arg(mean)
                .arg(rstd)
                .arg(partial.ptr())
                .arg(ni)
                .arg(ci)
                .arg(hwi)
                .arg(g as i32)
                .arg(eps as f32)
                .arg(silu as i32)
                .run((tiles as u32, (n * g) as u32, 1), (256, 1, 1), 0)
        }
    }
}

/// Layer norm (`groups = None`) or group norm, optionally followed by SiLU (group norm only).
pub fn norm(
    x: &CudaStorage,
    lx: &Layout,
    w: Option<Operand>,
    b: Option<Operand>,
    groups: Option<usize>,
    eps: f64,
    silu: bool,
) -> Result<CudaStorage> {
    let op = if groups.is_some() {
        "group_norm"
    } else {
        "layer_norm"
    };
    let (plan, channels) = Plan::new(lx, groups, op)?;
    let dev = x.dev();
    let (gw, gb) = (
        Param::new(w, x, channels, op)?,
        Param::new(b, x, channels, op)?,
    );
    let xc = contiguous(x, lx)?;
    let n = lx.shape().elem_count();
    let y = CudaStorage::alloc(dev, x.dtype(), n)?;
    if n == 0 {
        return Ok(y);
    }
    forward(
        dev,
        x.dtype(),
        &plan,
        (xc.ptr(), gw.ptr(), gb.ptr(), y.ptr()),
        None,
        eps,
        silu,
    )?;
    Ok(y)
}

/// (dx, dweight, dbias); the parameter gradients come back in x's dtype, shape (C,). `b` is only
/// read by the fused SiLU backward (the SiLU derivative needs the pre-activation).
#[allow(clippy::too_many_arguments)]
pub fn norm_bwd(
    x: &CudaStorage,
    lx: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    w: Option<Operand>,
    b: Option<Operand>,
    groups: Option<usize>,
    eps: f64,
    silu: bool,
) -> Result<(CudaStorage, CudaStorage, CudaStorage)> {
    let op = if groups.is_some() {
        "group_norm_bwd"
    } else {
        "layer_norm_bwd"
    };
    let dev = same_device(x, dy, op)?;
    check_dtype(x.dtype(), dy.dtype(), op)?;
    let (plan, channels) = Plan::new(lx, groups, op)?;
    let gw = Param::new(w, x, channels, op)?;
    let gb = if silu {
        Param::new(b, x, channels, op)?
    } else {
        Param::new(None, x, channels, op)?
    };
    let t = float_tn(x.dtype(), op)?;
    let (xc, gc) = (contiguous(x, lx)?, contiguous(dy, ldy)?);
    let total = lx.shape().elem_count();
    let dx = CudaStorage::alloc(dev, x.dtype(), total)?;
    let sums = CudaStorage::zeros(dev, DType::F32, 2 * channels)?; // [dbeta | dgamma]
    let nstats = match plan {
        Plan::Layer { rows, .. } => rows,
        Plan::Group { n, g, .. } => n * g,
    };
    if total > 0 {
        let (mean, rstd) = (
            dev.alloc(DType::F32, nstats)?,
            dev.alloc(DType::F32, nstats)?,
        );
        let scratch = dev.alloc(x.dtype(), total)?;
        forward(
            dev,
            x.dtype(),
            &plan,
            (xc.ptr(), gw.ptr(), gb.ptr(), scratch.ptr()),
            Some((mean.ptr(), rstd.ptr())),
            eps,
            silu,
        )?;
        drop(scratch);
        match plan {
            Plan::Layer { rows, n } => {
                let (ri, ni) = (rows as i32, i32_arg(n, "n", op)?);
                dev.launch("norm", format!("norm_layernorm_bwd_{t}"))?
                    .arg(xc.ptr())
                    .arg(gw.ptr())
                    .arg(gc.ptr())
                    .arg(mean.ptr())
                    .arg(rstd.ptr())
                    .arg(dx.ptr())
                    .arg(ri)
                    .arg(ni)
                    .run((rows as u32, 1, 1), (256, 1, 1), 0)?;
                // Chunks so that the params kernel fills ~4 blocks per SM (docs/KERNELS.md).
                let cols = n.div_ceil(32);
                let sms = dev.sm_count() as usize;
                let chunks = (4 * sms).div_ceil(cols).clamp(1, rows);
                let rpc = rows.div_ceil(chunks);
                let chunks = rows.div_ceil(rpc);
                let partial = dev.alloc(DType::F32, chunks * 2 * n)?;
                dev.launch("norm", format!("norm_layernorm_params_bwd_{t}"))?
                    .arg(xc.ptr())
                    .arg(gc.ptr())
                    .arg(mean.ptr())
                    .arg(rstd.ptr())
                    .arg(partial.ptr())
                    .arg(ri)
                    .arg(ni)
                    .arg(rpc as i32)
                    .run((cols as u32, chunks as u32, 1), (32, 8, 1), 0)?;
                colsum_f32(dev, partial.ptr(), sums.ptr(), chunks, 2 * n, false)?;
            }
            Plan::Group { n, c, hw, g } => {
                let partial = dev.alloc(DType::F32, n * 2 * c)?;
                let (ni, ci, hwi, gi) = (n as i32, c as i32, i32_arg(hw, "HW", op)?, g as i32);
                dev.launch("norm", format!("norm_groupnorm_stats_bwd_{t}"))?
                    .arg(xc.ptr())
                    .arg(gc.ptr())
                    .arg(gw.ptr())
                    .arg(gb.ptr())
                    .arg(mean.ptr())
                    .arg(rstd.ptr())
                    .arg(partial.ptr())
                    .arg(ni)
                    .arg(ci)
                    .arg(hwi)
                    .arg(gi)
                    .arg(silu as i32)
                    .run((c as u32, n as u32, 1), (256, 1, 1), 0)?;
                let tiles = ((c / g) * hw).div_ceil(GN_TILE).max(1);
                dev.launch("norm", format!("norm_groupnorm_bwd_{t}"))?
                    .arg(xc.ptr())
                    .arg(gc.ptr())
                    .arg(gw.ptr())
                    .arg(gb.ptr())
                    .arg(mean.ptr())
                    .arg(rstd.ptr())
                    .arg(partial.ptr())
                    .arg(dx.ptr())
                    .arg(ni)
                    .arg(ci)
                    .arg(hwi)
                    .arg(gi)
                    .arg(silu as i32)
                    .run((tiles as u32, (n * g) as u32, 1), (256, 1, 1), 0)?;
                colsum_f32(dev, partial.ptr(), sums.ptr(), n, 2 * c, false)?;
            }
        }
    }
    let part = |offset: usize| {
        to_dtype(
            &sums,
            &Layout::new(channels.into(), vec![1], offset),
            x.dtype(),
        )
    };
    let db = part(0)?;
    let dw = part(channels)?;
    Ok((dx, dw, db))
}
