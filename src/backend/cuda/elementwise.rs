//! Elementwise family on CUDA (kernels/elementwise.cu): unary ops and their derivatives,
//! broadcasting binary ops, affine, clamp, casts, strided copies, concatenation and row gathers.
//! Every output is a fresh contiguous buffer; forward inputs are read through their strides.

use super::{cast_tn, check_dtype, float_tn, same_device, strided_args, tn, CudaStorage};
use crate::backend::cpu::elementwise::{BinaryOp, UnaryOp};
use crate::tensor::{DType, Layout};
use crate::{Error, Result};

/// A contiguous view of an operand: its own pointer when it already is contiguous, else a copy.
pub struct Contig {
    ptr: u64,
    _owned: Option<CudaStorage>,
}

impl Contig {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// `(s, l)` as one contiguous run of `l.elem_count()` elements.
pub fn contiguous(s: &CudaStorage, l: &Layout) -> Result<Contig> {
    if l.is_contiguous() {
        return Ok(Contig {
            ptr: s.ptr_at(l.offset()),
            _owned: None,
        });
    }
    let c = copy_strided(s, l)?;
    Ok(Contig {
        ptr: c.ptr(),
        _owned: Some(c),
    })
}

/// Strided -> contiguous copy, bit exact, any storage dtype.
pub fn copy_strided(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = s.dev();
    let n = l.shape().elem_count();
    let out = CudaStorage::alloc(dev, s.dtype(), n)?;
    let (dims, st) = strided_args(&[l], "copy")?;
    dev.launch(
        "elementwise",
        format!("elementwise_copy_fwd_{}", tn(s.dtype(), "copy")?),
    )?
    .arg(n as i64)
    .arg(dims)
    .arg(st[0])
    .arg(s.ptr_at(l.offset()))
    .arg(out.ptr())
    .run_gs(n)?;
    Ok(out)
}

/// Cast (and make contiguous). Float <-> float runs on the device; casts to or from i64 (token
/// ids, a few hundred elements) go through the host, where the CPU oracle defines them.
pub fn to_dtype(s: &CudaStorage, l: &Layout, dtype: DType) -> Result<CudaStorage> {
    if dtype == s.dtype() {
        return copy_strided(s, l);
    }
    let dev = s.dev();
    if s.dtype() == DType::I64 || dtype == DType::I64 || dtype == DType::F64 {
        let host =
            super::super::to_host(s, l)?.to_dtype(&Layout::contiguous(l.shape().clone()), dtype);
        return super::super::from_host(dev, &host);
    }
    let n = l.shape().elem_count();
    let out = CudaStorage::alloc(dev, dtype, n)?;
    let (dims, st) = strided_args(&[l], "to_dtype")?;
    dev.launch(
        "elementwise",
        format!(
            "elementwise_cast_fwd_{}_{}",
            cast_tn(s.dtype(), "to_dtype")?,
            cast_tn(dtype, "to_dtype")?
        ),
    )?
    .arg(n as i64)
    .arg(dims)
    .arg(st[0])
    .arg(s.ptr_at(l.offset()))
    .arg(out.ptr())
    .run_gs(n)?;
    Ok(out)
}

pub fn unary(s: &CudaStorage, l: &Layout, op: UnaryOp) -> Result<CudaStorage> {
    let dev = s.dev();
    let n = l.shape().elem_count();
    let out = CudaStorage::alloc(dev, s.dtype(), n)?;
    let (dims, st) = strided_args(&[l], op.name())?;
    dev.launch(
        "elementwise",
        format!(
            "elementwise_{}_fwd_{}",
            op.name(),
            float_tn(s.dtype(), op.name())?
        ),
    )?
    .arg(n as i64)
    .arg(dims)
    .arg(st[0])
    .arg(s.ptr_at(l.offset()))
    .arg(out.ptr())
    .run_gs(n)?;
    Ok(out)
}

/// dx = dy * f'(x); the kernel takes contiguous operands.
pub fn unary_bwd(
    x: &CudaStorage,
    lx: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    op: UnaryOp,
) -> Result<CudaStorage> {
    let dev = same_device(x, dy, op.name())?;
    check_dtype(x.dtype(), dy.dtype(), op.name())?;
    let n = lx.shape().elem_count();
    let (xc, gc) = (contiguous(x, lx)?, contiguous(dy, ldy)?);
    let out = CudaStorage::alloc(dev, x.dtype(), n)?;
    dev.launch(
        "elementwise",
        format!(
            "elementwise_{}_bwd_{}",
            op.name(),
            float_tn(x.dtype(), op.name())?
        ),
    )?
    .arg(n as i64)
    .arg(xc.ptr())
    .arg(gc.ptr())
    .arg(out.ptr())
    .run_gs(n)?;
    Ok(out)
}

/// `a op b` for two layouts of the same logical shape (broadcast dims have stride 0).
pub fn binary(
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    op: BinaryOp,
) -> Result<CudaStorage> {
    let dev = same_device(a, b, op.name())?;
    check_dtype(a.dtype(), b.dtype(), op.name())?;
    let n = la.shape().elem_count();
    let out = CudaStorage::alloc(dev, a.dtype(), n)?;
    let (dims, st) = strided_args(&[la, lb], op.name())?;
    dev.launch(
        "elementwise",
        format!(
            "elementwise_{}_fwd_{}",
            op.name(),
            float_tn(a.dtype(), op.name())?
        ),
    )?
    .arg(n as i64)
    .arg(dims)
    .arg(st[0])
    .arg(st[1])
    .arg(a.ptr_at(la.offset()))
    .arg(b.ptr_at(lb.offset()))
    .arg(out.ptr())
    .run_gs(n)?;
    Ok(out)
}

/// `x * mul + add`, computed as one f32 fma per element.
pub fn affine(s: &CudaStorage, l: &Layout, mul: f64, add: f64) -> Result<CudaStorage> {
    let dev = s.dev();
    let n = l.shape().elem_count();
    let out = CudaStorage::alloc(dev, s.dtype(), n)?;
    let (dims, st) = strided_args(&[l], "affine")?;
    dev.launch(
        "elementwise",
        format!("elementwise_affine_fwd_{}", float_tn(s.dtype(), "affine")?),
    )?
    .arg(n as i64)
    .arg(dims)
    .arg(st[0])
    .arg(s.ptr_at(l.offset()))
    .arg(out.ptr())
    .arg(mul as f32)
    .arg(add as f32)
    .run_gs(n)?;
    Ok(out)
}

pub fn clamp_min(s: &CudaStorage, l: &Layout, lo: f64) -> Result<CudaStorage> {
    let dev = s.dev();
    let n = l.shape().elem_count();
    let out = CudaStorage::alloc(dev, s.dtype(), n)?;
    let (dims, st) = strided_args(&[l], "clamp_min")?;
    dev.launch(
        "elementwise",
        format!(
            "elementwise_clamp_min_fwd_{}",
            float_tn(s.dtype(), "clamp_min")?
        ),
    )?
    .arg(n as i64)
    .arg(dims)
    .arg(st[0])
    .arg(s.ptr_at(l.offset()))
    .arg(out.ptr())
    .arg(lo as f32)
    .run_gs(n)?;
    Ok(out)
}

pub fn clamp_min_bwd(
    x: &CudaStorage,
    lx: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
    lo: f64,
) -> Result<CudaStorage> {
    let dev = same_device(x, dy, "clamp_min_bwd")?;
    check_dtype(x.dtype(), dy.dtype(), "clamp_min_bwd")?;
    let n = lx.shape().elem_count();
    let (xc, gc) = (contiguous(x, lx)?, contiguous(dy, ldy)?);
    let out = CudaStorage::alloc(dev, x.dtype(), n)?;
    dev.launch(
        "elementwise",
        format!(
            "elementwise_clamp_min_bwd_{}",
            float_tn(x.dtype(), "clamp_min_bwd")?
        ),
    )?
    .arg(n as i64)
    .arg(xc.ptr())
    .arg(gc.ptr())
    .arg(out.ptr())
    .arg(lo as f32)
    .run_gs(n)?;
    Ok(out)
}

/// Every element set to `value` (rounded to the dtype in the kernel).
pub fn fill(
    dev: &std::sync::Arc<super::CudaDevice>,
    dtype: DType,
    n: usize,
    value: f64,
) -> Result<CudaStorage> {
    let out = CudaStorage::alloc(dev, dtype, n)?;
    dev.launch(
        "elementwise",
        format!("elementwise_fill_fwd_{}", float_tn(dtype, "fill")?),
    )?
    .arg(n as i64)
    .arg(out.ptr())
    .arg(value as f32)
    .run_gs(n)?;
    Ok(out)
}

/// LoRA network dropout's keep mask, 0 or 1 in `dtype`: `seeds.len() x per_sample` elements,
/// sample s's from its visit seed `seeds[s]` (i64 on the device, at `seeds_ptr`) and the
/// module's `salt`, kept where the counter stream's top 53 bits reach `threshold` (see
/// `nn::lora_dropout::entry_kept`, the CPU's definition).
pub fn dropout_mask(
    dev: &std::sync::Arc<super::CudaDevice>,
    dtype: DType,
    seeds_ptr: u64,
    samples: usize,
    per_sample: usize,
    salt: u64,
    threshold: u64,
) -> Result<CudaStorage> {
    let n = samples * per_sample;
    let out = CudaStorage::alloc(dev, dtype, n)?;
    dev.launch(
        "elementwise",
        format!(
            "elementwise_dropout_mask_fwd_{}",
            float_tn(dtype, "dropout_mask")?
        ),
    )?
    .arg(n as i64)
    .arg(per_sample.max(1) as i64)
    .arg(seeds_ptr)
    .arg(salt)
    .arg(threshold)
    .arg(out.ptr())
    .run_gs(n)?;
    Ok(out)
}

/// `table[ids]` along dim 0. The ids are checked on the host first (they are a few hundred token
/// ids), so a bad id is an error naming it rather than an out-of-bounds read.
pub fn index_select(
    table: &CudaStorage,
    lt: &Layout,
    ids: &[i64],
    ids_dev: Option<(&CudaStorage, &Layout)>,
) -> Result<CudaStorage> {
    let dev = table.dev();
    let (rows, d) = match lt.dims() {
        &[r, d] => (r, d),
        _ => {
            return Err(Error::Rank {
                op: "index_select",
                expected: 2,
                got: lt.shape().clone(),
            })
        }
    };
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= rows) {
        return Err(Error::msg(format!(
            "index_select: index {bad} out of range for table of {rows} rows"
        )));
    }
    let t = contiguous(table, lt)?;
    let uploaded;
    let ids_ptr = match ids_dev {
        Some((s, l)) if l.is_contiguous() => s.ptr_at(l.offset()),
        _ => {
            uploaded =
                super::super::from_host(dev, &crate::backend::cpu::CpuStorage::I64(ids.to_vec()))?;
            uploaded.ptr()
        }
    };
    let n = ids.len() * d;
    let out = CudaStorage::alloc(dev, table.dtype(), n)?;
    dev.launch(
        "elementwise",
        format!(
            "elementwise_index_select_fwd_{}",
            tn(table.dtype(), "index_select")?
        ),
    )?
    .arg(n as i64)
    .arg(t.ptr())
    .arg(ids_ptr)
    .arg(out.ptr())
    .arg(d as i64)
    .run_gs(n)?;
    Ok(out)
}

/// Concatenation along `dim`: each part is made contiguous and written into its column band of
/// the (outer, total) output by one launch.
pub fn cat(inputs: &[(&CudaStorage, &Layout)], dim: usize, dtype: DType) -> Result<CudaStorage> {
    let first = inputs
        .first()
        .ok_or_else(|| Error::msg("cat: no inputs"))?
        .0;
    let dev = first.dev();
    let outer: usize = inputs[0].1.dims()[..dim].iter().product();
    let chunks: Vec<usize> = inputs
        .iter()
        .map(|(_, l)| l.dims()[dim..].iter().product())
        .collect();
    let total: usize = chunks.iter().sum();
    let out = CudaStorage::alloc(dev, dtype, outer * total)?;
    let mut offset = 0;
    for ((s, l), &chunk) in inputs.iter().zip(&chunks) {
        same_device(first, s, "cat")?;
        check_dtype(dtype, s.dtype(), "cat")?;
        let c = contiguous(s, l)?;
        let n = outer * chunk;
        dev.launch(
            "elementwise",
            format!("elementwise_cat_fwd_{}", tn(dtype, "cat")?),
        )?
        .arg(n as i64)
        .arg(c.ptr())
        .arg(out.ptr())
        .arg(chunk.max(1) as i64)
        .arg(total as i64)
        .arg(offset as i64)
        .run_gs(n)?;
        offset += chunk;
    }
    Ok(out)
}

/// i32 arg-max indices (reduce kernels) widened to the i64 tensors carry, and back.
pub fn cast_index(s: &CudaStorage, to_i64: bool) -> Result<CudaStorage> {
    let dev = s.dev();
    let n = s.len();
    // i32 buffers are tracked as F32-sized storage: the same 4 bytes per element.
    let (dtype, sym) = if to_i64 {
        (DType::I64, "elementwise_cast_fwd_i32_i64")
    } else {
        (DType::F32, "elementwise_cast_fwd_i64_i32")
    };
    let out = CudaStorage::alloc(dev, dtype, n)?;
    dev.launch("elementwise", sym.to_owned())?
        .arg(n as i64)
        .arg(s.ptr())
        .arg(out.ptr())
        .run_gs(n)?;
    Ok(out)
}
