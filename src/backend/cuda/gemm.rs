//! Matrix products through cuBLAS (`cublasGemmStridedBatchedEx`): f32, bf16 and f16 operands
//! with f32 accumulation (CUBLAS_COMPUTE_32F: plain f32 for f32 inputs, no TF32, so f32 results
//! stay within the oracle's tight tolerance). Operands are read in place when their strides allow
//! (a transposed weight is a transpose flag, a broadcast batch dim a zero stride).
//!
//! cuBLAS is column-major; a row-major `C = A B` is computed as the column-major `C^T = B^T A^T`,
//! which only swaps the operand order: no data moves.

use cudarc::cublas::{result as br, sys as bs};

use super::elementwise::contiguous;
use super::emu::GemmCall;
use super::{check_dtype, same_device, CudaDevice, CudaStorage};
use crate::tensor::{DType, Layout};
use crate::{Error, Result};

/// One row-major operand: (rows x cols) matrices `batch_stride` elements apart, element (i, j)
/// at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub ptr: u64,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
    pub batch_stride: usize,
}

impl Mat {
    /// A contiguous (rows, cols) matrix per batch.
    pub fn contiguous(ptr: u64, rows: usize, cols: usize) -> Mat {
        Mat {
            ptr,
            rows,
            cols,
            rs: cols,
            cs: 1,
            batch_stride: rows * cols,
        }
    }

    /// The transposed view of the same memory.
    pub fn t(self) -> Mat {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// How cuBLAS reads this operand as the column-major transpose: (transpose flag, leading
    /// dimension), or None when neither stride is unit (the caller copies it first).
    fn blas_view(&self) -> Option<(bool, usize)> {
        let (r, c) = (self.rows.max(1), self.cols.max(1));
        // Row-major with unit column stride is the column-major transpose as stored: no flag.
        if self.cs == 1 || self.cols == 1 {
            let ld = if self.rows == 1 { c } else { self.rs };
            if ld >= c {
                return Some((false, ld));
            }
        }
        if self.rs == 1 || self.rows == 1 {
            let ld = if self.cols == 1 { r } else { self.cs };
            if ld >= r {
                return Some((true, ld));
            }
        }
        None
    }
}

pub fn blas_dtype(dtype: DType, op: &'static str) -> Result<bs::cudaDataType> {
    Ok(match dtype {
        DType::F32 => bs::cudaDataType::CUDA_R_32F,
        DType::BF16 => bs::cudaDataType::CUDA_R_16BF,
        DType::F16 => bs::cudaDataType::CUDA_R_16F,
        d => return Err(Error::DType { op, dtype: d }),
    })
}

/// `C[i] = alpha * A[i] B[i] + beta * C[i]` for `batch` problems. C is row-major (m, n) with row
/// stride `ldc` and `c_batch_stride` between problems, of dtype `c_dtype` (f32 lets 16-bit
/// inputs accumulate across calls without rounding in between).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    dev: &CudaDevice,
    op: &'static str,
    ab_dtype: DType,
    a: Mat,
    b: Mat,
    (c_ptr, c_dtype, ldc, c_batch_stride): (u64, DType, usize, usize),
    batch: usize,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k {
        return Err(Error::msg(format!(
            "{op}: gemm inner dims differ ({m}x{k} by {}x{n})",
            b.rows
        )));
    }
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let (tb, ldb) = b
        .blas_view()
        .ok_or_else(|| Error::msg(format!("{op}: operand B has no unit stride")))?;
    let (ta, lda) = a
        .blas_view()
        .ok_or_else(|| Error::msg(format!("{op}: operand A has no unit stride")))?;
    let flag = |t: bool| {
        if t {
            bs::cublasOperation_t::CUBLAS_OP_T
        } else {
            bs::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let int = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::msg(format!("{op}: {what} = {v} exceeds cuBLAS's int")))
    };
    let ab = blas_dtype(ab_dtype, op)?;
    let cd = blas_dtype(c_dtype, op)?;
    if let Some(emu) = dev.emulator() {
        // The same column-major call as below, in cuBLAS's terms.
        return emu.gemm(&GemmCall {
            trans_a: tb,
            trans_b: ta,
            m: n,
            n: m,
            k: k.max(1),
            alpha,
            a: b.ptr,
            a_dtype: ab_dtype,
            lda: ldb,
            stride_a: b.batch_stride,
            b: a.ptr,
            b_dtype: ab_dtype,
            ldb: lda,
            stride_b: a.batch_stride,
            beta,
            c: c_ptr,
            c_dtype,
            ldc,
            stride_c: c_batch_stride,
            batch,
            bias: 0,
        });
    }
    dev.bind()?;
    let (nn, mm, kk) = (int(n, "n")?, int(m, "m")?, int(k.max(1), "k")?);
    let (ldb, lda, ldc, nb) = (
        int(ldb, "ldb")?,
        int(lda, "lda")?,
        int(ldc, "ldc")?,
        int(batch, "batch")?,
    );
    dev.span(
        || format!("cublas gemm ({op}, {ab_dtype})"),
        || {
            // SAFETY: every pointer addresses live device memory of the sizes the dims and
            // strides describe (checked by the callers' layouts); alpha/beta are host f32 as
            // COMPUTE_32F expects.
            unsafe {
                br::gemm_strided_batched_ex(
                    dev.blas_handle(),
                    flag(tb),
                    flag(ta),
                    nn,
                    mm,
                    kk,
                    &alpha as *const f32 as *const _,
                    b.ptr as *const _,
                    ab,
                    ldb,
                    b.batch_stride as i64,
                    a.ptr as *const _,
                    ab,
                    lda,
                    a.batch_stride as i64,
                    &beta as *const f32 as *const _,
                    c_ptr as *mut _,
                    cd,
                    ldc,
                    c_batch_stride as i64,
                    nb,
                    bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    bs::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )
            }
            .map_err(|e| Error::cuda(format!("{op} (cuBLAS gemm {m}x{n}x{k}, batch {batch})"), e))
        },
    )
}

/// Batch dims of a layout as (count, stride) when they walk memory with one stride.
fn batch_of(l: &Layout) -> Option<(usize, usize)> {
    let r = l.dims().len();
    let (dims, strides) = (&l.dims()[..r - 2], &l.strides()[..r - 2]);
    let count: usize = dims.iter().product();
    let live: Vec<(usize, usize)> = dims
        .iter()
        .zip(strides)
        .filter(|(&d, _)| d != 1)
        .map(|(&d, &s)| (d, s))
        .collect();
    for w in live.windows(2) {
        if w[0].1 != w[1].1 * w[1].0 {
            return None;
        }
    }
    Some((count, live.last().map_or(0, |&(_, s)| s)))
}

fn mat_of(s: &CudaStorage, l: &Layout) -> Option<Mat> {
    let r = l.dims().len();
    let (count, bstride) = batch_of(l)?;
    let m = Mat {
        ptr: s.ptr_at(l.offset()),
        rows: l.dims()[r - 2],
        cols: l.dims()[r - 1],
        rs: l.strides()[r - 2],
        cs: l.strides()[r - 1],
        batch_stride: if count <= 1 { 0 } else { bstride },
    };
    m.blas_view().map(|_| m)
}

/// `a @ b` for (..., M, K) and (..., K, N) layouts with identical batch dims; output contiguous.
pub fn matmul(a: &CudaStorage, la: &Layout, b: &CudaStorage, lb: &Layout) -> Result<CudaStorage> {
    let dev = same_device(a, b, "matmul")?;
    check_dtype(a.dtype(), b.dtype(), "matmul")?;
    let (ra, rb) = (la.dims().len(), lb.dims().len());
    if ra < 2
        || ra != rb
        || la.dims()[..ra - 2] != lb.dims()[..rb - 2]
        || la.dims()[ra - 1] != lb.dims()[rb - 2]
    {
        return Err(Error::ShapeMismatch {
            op: "matmul",
            lhs: la.shape().clone(),
            rhs: lb.shape().clone(),
        });
    }
    let (m, k, n) = (la.dims()[ra - 2], la.dims()[ra - 1], lb.dims()[rb - 1]);
    let batch: usize = la.dims()[..ra - 2].iter().product();
    let out = CudaStorage::alloc(dev, a.dtype(), batch * m * n)?;
    if k == 0 {
        return super::elementwise::fill(dev, a.dtype(), batch * m * n, 0.0);
    }
    // Operands whose strides cuBLAS cannot express are copied to contiguous first.
    let (ca, cb);
    let ma = match mat_of(a, la) {
        Some(m) => m,
        None => {
            ca = contiguous(a, la)?;
            Mat::contiguous(ca.ptr(), m, k)
        }
    };
    let mb = match mat_of(b, lb) {
        Some(m) => m,
        None => {
            cb = contiguous(b, lb)?;
            Mat::contiguous(cb.ptr(), k, n)
        }
    };
    gemm(
        dev,
        "matmul",
        a.dtype(),
        ma,
        mb,
        (out.ptr(), a.dtype(), n, m * n),
        batch,
        1.0,
        0.0,
    )?;
    Ok(out)
}
