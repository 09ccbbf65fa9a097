//! AdamW over one flat f32 buffer on CUDA (kernels/optim.cu), and the squared norm used for
//! gradient clipping.

use super::device::Launch;
use super::{CudaDevice, CudaStorage};
use crate::backend::cpu::optim::{
    AdafactorStep, AdamW, FactorSlot, LionStep, LrRun, Moments8, ProdigyBuffers, ProdigyMoments,
    Rule8, Slot8, State, BLOCK_8BIT,
};
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

/// One AdamW step at 1-based `t` with gradient `grad_scale * g`, in place, over the element
/// ranges of the four flat f32 buffers that `runs` lists, each at its own learning rate (`h.lr`
/// is not read): a whole optimizer state at one rate, or parameter groups. Bounds are checked by
/// the caller and again here. One run is one grid-stride launch; several are one launch over a
/// table of pieces, however many runs there are. The kernel's bf16 copy of the weights is not
/// used (0).
pub fn adamw_step_runs(
    h: &AdamW,
    t: u64,
    s: State<'_, CudaStorage>,
    g: &CudaStorage,
    grad_scale: f32,
    runs: &[LrRun],
) -> Result<()> {
    let State { p, m, v } = s;
    for (what, b) in [("p", &*p), ("g", g), ("m", &*m), ("v", &*v)] {
        let outside = runs
            .iter()
            .find(|r| r.range.end > b.len() || r.range.start > r.range.end);
        if b.dtype() != DType::F32 || outside.is_some() {
            return Err(Error::msg(format!(
                "adamw_step: {what} ({} {}) has no elements {:?}",
                b.len(),
                b.dtype(),
                outside.map(|r| &r.range)
            )));
        }
    }
    if t == 0 {
        return Err(Error::msg("adamw_step: steps count from 1"));
    }
    let dev = p.dev().clone();
    let params = |lr: f64| AdamWParams::new(&AdamW { lr, ..*h }, t, grad_scale);
    if let [run] = runs {
        let (range, n) = (&run.range, run.range.len());
        if n == 0 {
            return Ok(());
        }
        return dev
            .launch("optim", "optim_adamw_step_f32".to_owned())?
            .arg(p.ptr_at(range.start))
            .arg(g.ptr_at(range.start))
            .arg(m.ptr_at(range.start))
            .arg(v.ptr_at(range.start))
            .arg(0u64)
            .arg(n as i64)
            .arg(params(run.lr))
            .run_gs(n);
    }
    let table = rate_pieces(runs);
    launch_pieces(&dev, "optim_adamw_pieces_step_f32", &table, |l| {
        l.arg(p.ptr())
            .arg(g.ptr())
            .arg(m.ptr())
            .arg(v.ptr())
            .arg(params(0.0))
    })
}

/// The `RatePiece` table of optim.cu: every run cut into pieces of at most `PIECE` elements,
/// each as (offset, len, the rate's f64 bits).
fn rate_pieces(runs: &[LrRun]) -> Vec<i64> {
    let mut table = Vec::new();
    for run in runs {
        let mut at = run.range.start;
        while at < run.range.end {
            let n = PIECE.min(run.range.end - at);
            table.extend([at as i64, n as i64, run.lr.to_bits() as i64]);
            at += n;
        }
    }
    table
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

/// One launch of optim.cu's `symbol` with one 256-thread block per piece of `table` (three
/// i64 a piece: a `Piece` or a `RatePiece`), uploaded here: the table's device address is the
/// first argument, `args` appends the rest. An empty table launches nothing.
fn launch_pieces<'d>(
    dev: &'d std::sync::Arc<CudaDevice>,
    symbol: &str,
    table: &[i64],
    args: impl FnOnce(Launch<'d>) -> Launch<'d>,
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
    args(dev.launch("optim", symbol.to_owned())?.arg(t.ptr())).run((grid, 1, 1), (256, 1, 1), 0)
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
    let table = pieces(parts, 4);
    launch_pieces(flat.dev(), "optim_gather_add_fwd_f32", &table, |l| {
        l.arg(flat.ptr())
    })
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
        launch_pieces(flat.dev(), &symbol, &table, |l| l.arg(flat.ptr()))?;
    }
    Ok(())
}

/// `struct ProdigyParams` of optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ProdigyParams {
    beta1: f32,
    beta2: f32,
    beta3: f32,
    d: f32,
    s_coef: f32,
    grad_scale: f32,
}

/// `struct ProdigyUpdate` of optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ProdigyUpdate {
    dlr: f32,
    weight_decay: f32,
    d_eps: f32,
}

/// The piece table of `ranges` (the rate column unused).
fn range_pieces(ranges: &[std::ops::Range<usize>]) -> Vec<i64> {
    let runs: Vec<LrRun> = ranges
        .iter()
        .map(|r| LrRun {
            range: r.clone(),
            lr: 1.0,
        })
        .collect();
    rate_pieces(&runs)
}

/// Every buffer is f32 and holds every element of `ranges`.
fn check_f32(
    op: &str,
    bufs: &[(&str, &CudaStorage)],
    ranges: &[std::ops::Range<usize>],
) -> Result<()> {
    for (what, b) in bufs {
        let outside = ranges.iter().find(|r| r.end > b.len() || r.start > r.end);
        if b.dtype() != DType::F32 || outside.is_some() {
            return Err(Error::msg(format!(
                "{op}: {what} ({} {}) has no elements {:?}",
                b.len(),
                b.dtype(),
                outside
            )));
        }
    }
    Ok(())
}

/// Prodigy's first pass over `ranges` (see `train::prodigy`): one launch, one (num, den) pair
/// per block read back and summed in f64.
pub fn prodigy_moments(
    h: &ProdigyMoments,
    b: ProdigyBuffers<'_, CudaStorage>,
    g: &CudaStorage,
    grad_scale: f32,
    ranges: &[std::ops::Range<usize>],
) -> Result<(f64, f64)> {
    let ProdigyBuffers { p, p0, m, v, s } = b;
    check_f32(
        "prodigy_moments",
        &[("p", p), ("p0", p0), ("g", g), ("m", m), ("v", v), ("s", s)],
        ranges,
    )?;
    let table = range_pieces(ranges);
    let count = table.len() / 3;
    if count == 0 {
        return Ok((0.0, 0.0));
    }
    let dev = p.dev().clone();
    let partial = dev.alloc(DType::F32, 2 * count)?;
    launch_pieces(&dev, "optim_prodigy_moments_step_f32", &table, |l| {
        l.arg(p.ptr())
            .arg(p0.ptr())
            .arg(g.ptr())
            .arg(m.ptr())
            .arg(v.ptr())
            .arg(s.ptr())
            .arg(partial.ptr())
            .arg(ProdigyParams {
                beta1: h.beta1 as f32,
                beta2: h.beta2 as f32,
                beta3: h.beta3 as f32,
                d: h.d as f32,
                s_coef: h.s_coef as f32,
                grad_scale,
            })
    })?;
    let mut sums = vec![0f32; 2 * count];
    dev.download(partial.ptr(), &mut sums)?;
    let num = sums.iter().step_by(2).map(|&x| x as f64).sum();
    let den = sums.iter().skip(1).step_by(2).map(|&x| x as f64).sum();
    Ok((num, den))
}

/// Prodigy's second pass over `ranges`: p <- p - wd dlr p - dlr m / (sqrt(v) + d_eps).
pub fn prodigy_update(
    p: &mut CudaStorage,
    m: &CudaStorage,
    v: &CudaStorage,
    step: [f64; 3],
    ranges: &[std::ops::Range<usize>],
) -> Result<()> {
    check_f32("prodigy_update", &[("p", p), ("m", m), ("v", v)], ranges)?;
    let table = range_pieces(ranges);
    let [dlr, weight_decay, d_eps] = step;
    launch_pieces(p.dev(), "optim_prodigy_update_step_f32", &table, |l| {
        l.arg(p.ptr()).arg(m.ptr()).arg(v.ptr()).arg(ProdigyUpdate {
            dlr: dlr as f32,
            weight_decay: weight_decay as f32,
            d_eps: d_eps as f32,
        })
    })
}

/// `struct LionParams` of optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct LionParams {
    beta1: f32,
    beta2: f32,
    weight_decay: f32,
    grad_scale: f32,
}

/// One Lion step over the element ranges `runs` lists, each at its own rate: one launch over a
/// table of pieces, however many runs there are.
pub fn lion_step_runs(
    h: &LionStep,
    p: &mut CudaStorage,
    m: &mut CudaStorage,
    g: &CudaStorage,
    grad_scale: f32,
    runs: &[LrRun],
) -> Result<()> {
    let ranges: Vec<std::ops::Range<usize>> = runs.iter().map(|r| r.range.clone()).collect();
    check_f32("lion_step", &[("p", p), ("m", m), ("g", g)], &ranges)?;
    let table = rate_pieces(runs);
    launch_pieces(p.dev(), "optim_lion_step_f32", &table, |l| {
        l.arg(p.ptr()).arg(g.ptr()).arg(m.ptr()).arg(LionParams {
            beta1: h.beta1 as f32,
            beta2: h.beta2 as f32,
            weight_decay: h.weight_decay as f32,
            grad_scale,
        })
    })
}

/// `struct AdafactorParams` of optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdafactorParams {
    eps1: f32,
    eps2: f32,
    clip: f32,
    beta2t: f32,
    beta1: f32,
    weight_decay: f32,
    grad_scale: f32,
    scale_parameter: i32,
    first_moment: i32,
}

/// One Adafactor step: one launch of a block per non-empty slot, the slot table (offset, len,
/// lead, rows, cols, state, rate) uploaded once. The caller checked the bounds.
pub fn adafactor_step(
    h: &AdafactorStep,
    p: &mut CudaStorage,
    m: &mut CudaStorage,
    v: &mut CudaStorage,
    g: &CudaStorage,
    grad_scale: f32,
    slots: &[FactorSlot],
) -> Result<()> {
    let mut table: Vec<i64> = Vec::with_capacity(7 * slots.len());
    for s in slots.iter().filter(|s| s.len > 0) {
        table.extend([s.offset, s.len, s.lead, s.rows, s.cols, s.state].map(|x| x as i64));
        table.push(s.rate.to_bits() as i64);
    }
    let count = table.len() / 7;
    if count == 0 {
        return Ok(());
    }
    let dev = p.dev().clone();
    let slots_dev = dev.upload(DType::I64, &table)?;
    dev.launch("optim", "optim_adafactor_step_f32".to_owned())?
        .arg(slots_dev.ptr())
        .arg(p.ptr())
        .arg(g.ptr())
        .arg(m.ptr())
        .arg(v.ptr())
        .arg(AdafactorParams {
            eps1: h.eps1 as f32,
            eps2: h.eps2 as f32,
            clip: h.clip_threshold as f32,
            beta2t: h.beta2t as f32,
            beta1: h.beta1.unwrap_or(0.0) as f32,
            weight_decay: h.weight_decay as f32,
            grad_scale,
            scale_parameter: h.scale_parameter as i32,
            first_moment: h.beta1.is_some() as i32,
        })
        .run((count as u32, 1, 1), (256, 1, 1), 0)
}

/// `struct AdamW8bitParams` of optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdamW8bitParams {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    grad_scale: f32,
    count: i32,
}

/// `struct Lion8bitParams` of optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Lion8bitParams {
    beta1: f32,
    beta2: f32,
    weight_decay: f32,
    grad_scale: f32,
    count: i32,
}

/// One step with 8-bit moments (see `train::adamw8bit`): one launch of a block per 256-element
/// chunk of every slot, the slot table (offset, len, state, block or -1, first chunk, rate)
/// uploaded once. The caller checked the bounds.
#[allow(clippy::too_many_arguments)]
pub fn step_8bit(
    rule: &Rule8,
    maps: &CudaStorage,
    p: &mut CudaStorage,
    s: Moments8<'_, CudaStorage, CudaStorage>,
    g: &CudaStorage,
    grad_scale: f32,
    slots: &[Slot8],
) -> Result<()> {
    let mut table: Vec<i64> = Vec::with_capacity(6 * slots.len());
    let mut chunks = 0usize;
    for slot in slots.iter().filter(|s| s.len > 0) {
        let block = slot.block.map_or(-1, |b| b as i64);
        table.extend([
            slot.offset as i64,
            slot.len as i64,
            slot.state as i64,
            block,
        ]);
        table.extend([chunks as i64, slot.lr.to_bits() as i64]);
        chunks += slot.len.div_ceil(BLOCK_8BIT);
    }
    if chunks == 0 {
        return Ok(());
    }
    let dev = p.dev().clone();
    let slots_dev = dev.upload(DType::I64, &table)?;
    let count = (table.len() / 6) as i32;
    let grid = ((chunks as u32, 1, 1), (BLOCK_8BIT as u32, 1, 1), 0);
    match *rule {
        Rule8::AdamW { h, t } => {
            let a = AdamWParams::new(&h, t, grad_scale);
            dev.launch("optim", "optim_adamw8bit_step_f32".to_owned())?
                .arg(slots_dev.ptr())
                .arg(maps.ptr())
                .arg(p.ptr())
                .arg(g.ptr())
                .arg(s.m.ptr())
                .arg(s.v.ptr())
                .arg(s.q1.ptr())
                .arg(s.q2.ptr())
                .arg(s.absmax1.ptr())
                .arg(s.absmax2.ptr())
                .arg(AdamW8bitParams {
                    beta1: a.beta1,
                    beta2: a.beta2,
                    eps: a.eps,
                    weight_decay: a.weight_decay,
                    bias_correction1: a.bias_correction1,
                    bias_correction2: a.bias_correction2,
                    grad_scale,
                    count,
                })
                .run(grid.0, grid.1, grid.2)
        }
        Rule8::Lion(h) => dev
            .launch("optim", "optim_lion8bit_step_f32".to_owned())?
            .arg(slots_dev.ptr())
            .arg(maps.ptr())
            .arg(p.ptr())
            .arg(g.ptr())
            .arg(s.m.ptr())
            .arg(s.q1.ptr())
            .arg(s.absmax1.ptr())
            .arg(Lion8bitParams {
                beta1: h.beta1 as f32,
                beta2: h.beta2 as f32,
                weight_decay: h.weight_decay as f32,
                grad_scale,
                count,
            })
            .run(grid.0, grid.1, grid.2),
    }
}
