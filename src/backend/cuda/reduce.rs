//! Reductions on CUDA (kernels/reduce.cu): sum over any dims, max with arg-max over one dim, and
//! softmax over the last dim. The kernels reduce the last dim of a contiguous (rows, n) view, so
//! other dims are first moved last by a strided copy (one extra pass; reductions here are small
//! next to the matrix products around them).

use std::sync::Arc;

use super::elementwise::{cast_index, contiguous, copy_strided};
use super::{check_dtype, float_tn, i32_arg, same_device, CudaDevice, CudaStorage};
use crate::tensor::{DType, Layout, Shape};
use crate::{Error, Result};

/// One block per row, 256 threads (docs/KERNELS.md).
fn rows_launch<'a>(
    dev: &'a CudaDevice,
    symbol: String,
    rows: usize,
    op: &'static str,
) -> Result<(super::device::Launch<'a>, u32)> {
    let r = i32_arg(rows, "rows", op)?;
    Ok((dev.launch("reduce", symbol)?, r as u32))
}

/// `perm` puts the dims in `reduced` last (others keep their order), and the (rows, n) split.
fn moved_last(l: &Layout, reduced: &[usize]) -> (Vec<usize>, usize, usize) {
    let rank = l.dims().len();
    let mut perm: Vec<usize> = (0..rank).filter(|d| !reduced.contains(d)).collect();
    perm.extend((0..rank).filter(|d| reduced.contains(d)));
    let n: usize = reduced.iter().map(|&d| l.dims()[d]).product();
    let rows = l.shape().elem_count() / n.max(1);
    (perm, rows, n)
}

/// Sum over `dims`, keeping them as size 1. Output contiguous.
pub fn sum_keepdim(s: &CudaStorage, l: &Layout, dims: &[usize]) -> Result<CudaStorage> {
    let rank = l.dims().len();
    if let Some(&d) = dims.iter().find(|&&d| d >= rank) {
        return Err(Error::DimOutOfRange {
            op: "sum",
            dim: d,
            shape: l.shape().clone(),
        });
    }
    let mut reduced: Vec<usize> = dims.to_vec();
    reduced.sort_unstable();
    reduced.dedup();
    let (perm, rows, n) = moved_last(l, &reduced);
    let dev = s.dev();
    if n == 1 || rows == 0 {
        return copy_strided(s, l);
    }
    let x = copy_strided(s, &l.permute(&perm)?)?; // (rows, n)
    let out = CudaStorage::alloc(dev, s.dtype(), rows)?;
    let (launch, grid) = rows_launch(
        dev,
        format!("reduce_sum_fwd_{}", float_tn(s.dtype(), "sum")?),
        rows,
        "sum",
    )?;
    launch
        .arg(x.ptr())
        .arg(out.ptr())
        .arg(grid as i32)
        .arg(i32_arg(n, "reduced length", "sum")?)
        .run((grid, 1, 1), (256, 1, 1), 0)?;
    Ok(out)
}

/// Max over `dim` (kept) and the i64 index of the first maximum.
pub fn max_keepdim(s: &CudaStorage, l: &Layout, dim: usize) -> Result<(CudaStorage, CudaStorage)> {
    let n = l.shape().dim(dim)?;
    if n == 0 {
        return Err(Error::BadShape {
            op: "max",
            msg: format!("empty dim {dim}"),
            shape: l.shape().clone(),
        });
    }
    let (perm, rows, _) = moved_last(l, &[dim]);
    let dev = s.dev();
    let x = copy_strided(s, &l.permute(&perm)?)?;
    let vals = CudaStorage::alloc(dev, s.dtype(), rows)?;
    let idx32 = CudaStorage::alloc(dev, DType::F32, rows)?; // i32 indices, 4 bytes each
    let (launch, grid) = rows_launch(
        dev,
        format!("reduce_max_fwd_{}", float_tn(s.dtype(), "max")?),
        rows,
        "max",
    )?;
    launch
        .arg(x.ptr())
        .arg(vals.ptr())
        .arg(idx32.ptr())
        .arg(grid as i32)
        .arg(i32_arg(n, "dim", "max")?)
        .run((grid, 1, 1), (256, 1, 1), 0)?;
    Ok((vals, cast_index(&idx32, true)?))
}

/// Gradient of max over `dim`: dy scattered to the arg-max positions of a tensor of `shape`.
pub fn max_bwd(
    dy: &CudaStorage,
    ldy: &Layout,
    argmax: &CudaStorage,
    la: &Layout,
    shape: &Shape,
    dim: usize,
) -> Result<CudaStorage> {
    let dev = same_device(dy, argmax, "max_bwd")?;
    if argmax.dtype() != DType::I64 {
        return Err(Error::DType {
            op: "max_bwd",
            dtype: argmax.dtype(),
        });
    }
    let n = shape.dim(dim)?;
    let full = Layout::contiguous(shape.clone());
    let (perm, rows, _) = moved_last(&full, &[dim]);
    let g = contiguous(dy, ldy)?;
    let idx = cast_index(&copy_strided(argmax, la)?, false)?;
    let dxp = CudaStorage::alloc(dev, dy.dtype(), rows * n)?; // permuted (..., n)
    dev.launch(
        "reduce",
        format!("reduce_max_bwd_{}", float_tn(dy.dtype(), "max_bwd")?),
    )?
    .arg(g.ptr())
    .arg(idx.ptr())
    .arg(dxp.ptr())
    .arg(i32_arg(rows, "rows", "max_bwd")?)
    .arg(i32_arg(n, "dim", "max_bwd")?)
    .run_gs(rows * n)?;
    // Undo the permutation: the permuted buffer viewed through the inverse permutation.
    let pshape: Vec<usize> = perm.iter().map(|&p| shape.dims()[p]).collect();
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    copy_strided(&dxp, &Layout::contiguous(pshape).permute(&inv)?)
}

fn softmax_rows(l: &Layout, op: &'static str) -> Result<(usize, usize)> {
    let n = *l.dims().last().ok_or(Error::Rank {
        op,
        expected: 1,
        got: l.shape().clone(),
    })?;
    Ok((l.shape().elem_count() / n.max(1), n))
}

pub fn softmax_last(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let (rows, n) = softmax_rows(l, "softmax")?;
    let dev = s.dev();
    let out = CudaStorage::alloc(dev, s.dtype(), rows * n)?;
    if n == 0 || rows == 0 {
        return Ok(out);
    }
    let x = contiguous(s, l)?;
    softmax_fwd_raw(dev, s.dtype(), (x.ptr(), out.ptr()), rows, n, None)?;
    Ok(out)
}

/// Row softmax of a contiguous (rows, n) buffer into another (attention's plain composition).
pub fn softmax_fwd_raw(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    (x, y): (u64, u64),
    rows: usize,
    n: usize,
    causal_sq: Option<usize>,
) -> Result<()> {
    let (launch, grid) = rows_launch(
        dev,
        format!("reduce_softmax_fwd_{}", float_tn(dtype, "softmax")?),
        rows,
        "softmax",
    )?;
    launch
        .arg(x)
        .arg(y)
        .arg(grid as i32)
        .arg(i32_arg(n, "n", "softmax")?)
        .arg(i32_arg(causal_sq.unwrap_or(0), "Sq", "softmax")?)
        .run((grid, 1, 1), (256, 1, 1), 0)
}

/// dx = y (dy - sum(y dy)) of contiguous (rows, n) buffers.
pub fn softmax_bwd_raw(
    dev: &Arc<CudaDevice>,
    dtype: DType,
    (y, dy, dx): (u64, u64, u64),
    rows: usize,
    n: usize,
) -> Result<()> {
    let (launch, grid) = rows_launch(
        dev,
        format!("reduce_softmax_bwd_{}", float_tn(dtype, "softmax_bwd")?),
        rows,
        "softmax_bwd",
    )?;
    launch
        .arg(y)
        .arg(dy)
        .arg(dx)
        .arg(grid as i32)
        .arg(i32_arg(n, "n", "softmax_bwd")?)
        .run((grid, 1, 1), (256, 1, 1), 0)
}

pub fn softmax_last_bwd(
    y: &CudaStorage,
    ly: &Layout,
    dy: &CudaStorage,
    ldy: &Layout,
) -> Result<CudaStorage> {
    let dev = same_device(y, dy, "softmax_bwd")?;
    check_dtype(y.dtype(), dy.dtype(), "softmax_bwd")?;
    let (rows, n) = softmax_rows(ly, "softmax_bwd")?;
    let out = CudaStorage::alloc(dev, y.dtype(), rows * n)?;
    if n == 0 || rows == 0 {
        return Ok(out);
    }
    let (yc, gc) = (contiguous(y, ly)?, contiguous(dy, ldy)?);
    softmax_bwd_raw(dev, y.dtype(), (yc.ptr(), gc.ptr(), out.ptr()), rows, n)?;
    Ok(out)
}

/// Column sums of a contiguous f32 (rows, n) into `y` (n), deterministic (reduce_colsum).
pub fn colsum_f32(
    dev: &CudaDevice,
    x: u64,
    y: u64,
    rows: usize,
    n: usize,
    accumulate: bool,
) -> Result<()> {
    let grid = n.div_ceil(32) as u32;
    dev.launch("reduce", "reduce_colsum_fwd_f32".to_owned())?
        .arg(x)
        .arg(y)
        .arg(i32_arg(rows, "rows", "colsum")?)
        .arg(i32_arg(n, "n", "colsum")?)
        .arg(accumulate as i32)
        .run((grid, 1, 1), (32, 8, 1), 0)
}
