//! The gated low-rank update on CUDA (kernels/lora.cu). The rank-r projections z = h A^T and
//! du = d_out B are cuBLAS GEMMs with f32 output; one kernel gates the f32 codes and expands them
//! back to full width onto the frozen layer's output (forward) or into d_h (backward). d_A / d_B
//! are split-row outer products finished by a deterministic column sum; then the gate gradients.

use super::elementwise::{contiguous, Contig};
use super::gemm::{gemm, Mat};
use super::reduce::colsum_f32;
use super::{check_dtype, float_tn, i32_arg, same_device, CudaStorage};
use crate::backend::cpu::lora::{LoraGeom, LoraGrads};
use crate::tensor::{DType, Layout};
use crate::{Error, Result};

type Operand<'a> = (&'a CudaStorage, &'a Layout);

/// The kernels hold up to 64 rank channels per row in shared memory.
pub const MAX_RANK: usize = 64;
/// Rows per tile of the outer-product kernel.
const ROWS_PER_BLOCK: usize = 32;

/// Optional gates: w_down (B, r), w_up (B, r), a (B).
#[derive(Clone, Copy, Default)]
pub struct Gates<'a> {
    pub w_down: Option<Operand<'a>>,
    pub w_up: Option<Operand<'a>>,
    pub a: Option<Operand<'a>>,
}

/// Contiguous operands, checked against the geometry and h's dtype and device.
struct Inputs {
    keep: Vec<Contig>,
}

impl Inputs {
    fn add(&mut self, h: &CudaStorage, o: Option<Operand>, n: usize, what: &str) -> Result<u64> {
        let Some((s, l)) = o else { return Ok(0) };
        same_device(h, s, "lora")?;
        check_dtype(h.dtype(), s.dtype(), "lora")?;
        if l.shape().elem_count() != n {
            return Err(Error::BadShape {
                op: "lora",
                msg: format!("{what} must have {n} elements"),
                shape: l.shape().clone(),
            });
        }
        let c = contiguous(s, l)?;
        let p = c.ptr();
        self.keep.push(c);
        Ok(p)
    }
}

struct Ptrs {
    h: u64,
    a: u64,
    b: u64,
    wd: u64,
    wu: u64,
    al: u64,
}

fn prepare(
    inp: &mut Inputs,
    h: Operand,
    a: Operand,
    b: Operand,
    gates: Gates,
    g: &LoraGeom,
) -> Result<Ptrs> {
    if g.rank == 0 || g.rank > MAX_RANK {
        return Err(Error::msg(format!(
            "lora: rank {} outside 1..={MAX_RANK} for the CUDA kernels",
            g.rank
        )));
    }
    let (hs, r, bsz) = (h.0, g.rank, g.batch);
    Ok(Ptrs {
        h: inp.add(hs, Some(h), g.rows() * g.d_in, "h")?,
        a: inp.add(hs, Some(a), r * g.d_in, "A")?,
        b: inp.add(hs, Some(b), g.d_out * r, "B")?,
        wd: inp.add(hs, gates.w_down, bsz * r, "w_down")?,
        wu: inp.add(hs, gates.w_up, bsz * r, "w_up")?,
        al: inp.add(hs, gates.a, bsz, "a")?,
    })
}

/// `(rows, r)` f32 codes `X M` for a contiguous `(rows, k)` X and `(k, r)` M (or its transpose).
fn project(h: &CudaStorage, x: u64, m: Mat, rows: usize, k: usize) -> Result<CudaStorage> {
    let dev = h.dev();
    let r = m.cols;
    let out = CudaStorage::alloc(dev, DType::F32, rows * r)?;
    let x = Mat::contiguous(x, rows, k);
    gemm(
        dev,
        "lora",
        h.dtype(),
        x,
        m,
        (out.ptr(), DType::F32, r, 0),
        1,
        1.0,
        0.0,
    )?;
    Ok(out)
}

/// `y = (base or 0) + (l * g) N^T` with `N(o, k) = n[o * no + k * nk]`, `(rows, d)` contiguous.
#[allow(clippy::too_many_arguments)]
fn expand(
    h: &CudaStorage,
    p: &Ptrs,
    l: u64,
    (n, no, nk): (u64, usize, usize),
    base: u64,
    y: u64,
    d: usize,
    g: &LoraGeom,
) -> Result<()> {
    let dev = h.dev();
    dev.launch(
        "lora",
        format!("lora_expand_fwd_{}", float_tn(h.dtype(), "lora")?),
    )?
    .arg(l)
    .arg(n)
    .arg(no as i64)
    .arg(nk as i64)
    .arg(p.wd)
    .arg(p.wu)
    .arg(p.al)
    .arg(base)
    .arg(y)
    .arg(i32_arg(g.seq, "S", "lora")?)
    .arg(i32_arg(d, "D", "lora")?)
    .arg(g.rank as i32)
    .arg(g.scale as f32)
    .arg(g.rows() as i64)
    .run_gs(g.rows() * d.div_ceil(8))
}

/// z = h A^T, (rows, r) f32.
fn codes(h: &CudaStorage, p: &Ptrs, g: &LoraGeom) -> Result<CudaStorage> {
    let a_t = Mat::contiguous(p.a, g.rank, g.d_in).t();
    project(h, p.h, a_t, g.rows(), g.d_in)
}

/// `base + ((h A^T) * g) B^T`, (B*S, Dout) contiguous.
pub fn lora_fwd(
    h: Operand,
    a: Operand,
    b: Operand,
    gates: Gates,
    base: Option<Operand>,
    g: &LoraGeom,
) -> Result<CudaStorage> {
    let mut inp = Inputs { keep: Vec::new() };
    let p = prepare(&mut inp, h, a, b, gates, g)?;
    let base = inp.add(h.0, base, g.rows() * g.d_out, "base")?;
    let out = CudaStorage::alloc(h.0.dev(), h.0.dtype(), g.rows() * g.d_out)?;
    if g.rows() > 0 {
        let z = codes(h.0, &p, g)?;
        let b = (p.b, g.rank, 1);
        expand(h.0, &p, z.ptr(), b, base, out.ptr(), g.d_out, g)?;
    }
    Ok(out)
}

/// One split-row outer product into f32 `dst` (r x D, or D x r with `transpose`).
#[allow(clippy::too_many_arguments)]
fn outer(
    h: &CudaStorage,
    p: &Ptrs,
    l: u64,
    r_ptr: u64,
    d: usize,
    transpose: bool,
    dst: &CudaStorage,
    g: &LoraGeom,
) -> Result<()> {
    let dev = h.dev();
    let rows = g.rows();
    let cols = d.div_ceil(64);
    // ~2 blocks per SM (docs/KERNELS.md); never more splits than 32-row tiles.
    let splits = (2 * dev.sm_count() as usize)
        .div_ceil(cols)
        .clamp(1, rows.div_ceil(ROWS_PER_BLOCK).max(1));
    let rps = rows.div_ceil(splits).max(1);
    let splits = rows.div_ceil(rps).max(1);
    let partial = dev.alloc(DType::F32, splits * g.rank * d)?;
    dev.launch(
        "lora",
        format!("lora_outer_bwd_{}", float_tn(h.dtype(), "lora_bwd")?),
    )?
    .arg(l)
    .arg(r_ptr)
    .arg(p.wd)
    .arg(p.wu)
    .arg(p.al)
    .arg(partial.ptr())
    .arg(g.seq as i32)
    .arg(i32_arg(d, "D", "lora_bwd")?)
    .arg(g.rank as i32)
    .arg(g.scale as f32)
    .arg(rows as i64)
    .arg(i32_arg(rps, "rows per split", "lora_bwd")?)
    .arg(transpose as i32)
    .run((cols as u32, splits as u32, 1), (256, 1, 1), 0)?;
    colsum_f32(dev, partial.ptr(), dst.ptr(), splits, g.rank * d, false)
}

/// Every gradient: d_h (h's dtype), d_A (r, Din) and d_B (Dout, r) in f32, gate gradients.
pub fn lora_bwd(
    h: Operand,
    a: Operand,
    b: Operand,
    gates: Gates,
    d_out: Operand,
    g: &LoraGeom,
) -> Result<LoraGrads<CudaStorage>> {
    let mut inp = Inputs { keep: Vec::new() };
    let p = prepare(&mut inp, h, a, b, gates, g)?;
    let dop = inp.add(h.0, Some(d_out), g.rows() * g.d_out, "d_out")?;
    let (hs, rows, r) = (h.0, g.rows(), g.rank);
    let dev = hs.dev();
    let t = float_tn(hs.dtype(), "lora_bwd")?;
    let d_h = CudaStorage::alloc(dev, hs.dtype(), rows * g.d_in)?;
    let d_a = CudaStorage::zeros(dev, DType::F32, r * g.d_in)?;
    let d_b = CudaStorage::zeros(dev, DType::F32, g.d_out * r)?;
    let alloc_gate = |given: u64, n: usize| -> Result<Option<CudaStorage>> {
        (given != 0)
            .then(|| CudaStorage::zeros(dev, hs.dtype(), n))
            .transpose()
    };
    let d_wd = alloc_gate(p.wd, g.batch * r)?;
    let d_wu = alloc_gate(p.wu, g.batch * r)?;
    let d_al = alloc_gate(p.al, g.batch)?;
    if rows == 0 {
        return Ok(LoraGrads {
            d_h,
            d_a,
            d_b,
            d_w_down: d_wd,
            d_w_up: d_wu,
            d_alpha: d_al,
        });
    }
    // z = h A^T and du = d_out B, ungated, f32; d_h = (du * g) A.
    let z = codes(hs, &p, g)?;
    let du = project(hs, dop, Mat::contiguous(p.b, g.d_out, r), rows, g.d_out)?;
    expand(hs, &p, du.ptr(), (p.a, 1, g.d_in), 0, d_h.ptr(), g.d_in, g)?;
    outer(hs, &p, du.ptr(), p.h, g.d_in, false, &d_a, g)?;
    outer(hs, &p, z.ptr(), dop, g.d_out, true, &d_b, g)?;
    if d_wd.is_some() || d_wu.is_some() || d_al.is_some() {
        let ptr = |s: &Option<CudaStorage>| s.as_ref().map_or(0, |s| s.ptr());
        dev.launch("lora", format!("lora_gates_bwd_{t}"))?
            .arg(du.ptr())
            .arg(z.ptr())
            .arg(p.wd)
            .arg(p.wu)
            .arg(p.al)
            .arg(ptr(&d_wd))
            .arg(ptr(&d_wu))
            .arg(ptr(&d_al))
            .arg(g.seq as i32)
            .arg(r as i32)
            .arg(g.scale as f32)
            .run((g.batch as u32, 1, 1), (256, 1, 1), 0)?;
    }
    Ok(LoraGrads {
        d_h,
        d_a,
        d_b,
        d_w_down: d_wd,
        d_w_up: d_wu,
        d_alpha: d_al,
    })
}
