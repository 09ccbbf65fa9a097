//! Batched matrix multiply through the `gemm` crate, reading strided operands in place (a
//! transposed weight costs no copy). f16/bf16 widen to f32 first: `gemm` has no bf16.

use super::CpuStorage;
use crate::tensor::{DType, Float, Layout, Shape};
use crate::{Error, Result};
use rayon::prelude::*;

/// One operand: its elements, and for each batch the offset of its (rows, cols) matrix.
struct Operand<'a, T> {
    data: &'a [T],
    batch_offsets: Vec<usize>,
    row_stride: isize,
    col_stride: isize,
}

fn operand<'a, T>(data: &'a [T], l: &Layout) -> Operand<'a, T> {
    let r = l.dims().len();
    let batch = Layout::new(
        Shape::from(&l.dims()[..r - 2]),
        l.strides()[..r - 2].to_vec(),
        l.offset(),
    );
    Operand {
        data,
        batch_offsets: batch.offsets().collect(),
        row_stride: l.strides()[r - 2] as isize,
        col_stride: l.strides()[r - 1] as isize,
    }
}

fn run<T: Float>(a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Vec<T> {
    let r = la.dims().len();
    let (m, k, n) = (la.dims()[r - 2], la.dims()[r - 1], lb.dims()[r - 1]);
    let (oa, ob) = (operand(a, la), operand(b, lb));
    let batches = oa.batch_offsets.len();
    let mut out = vec![T::zero(); batches * m * n];
    if m * n == 0 {
        return out;
    }
    let one = |dst: &mut [T], i: usize, par: gemm::Parallelism| {
        if k == 0 {
            return;
        }
        // SAFETY: every pointer addresses `m x k`, `k x n` and `m x n` elements inside the slices,
        // as the layouts were validated by the tensor layer; dst is exclusively borrowed.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                oa.data.as_ptr().add(oa.batch_offsets[i]),
                oa.col_stride,
                oa.row_stride,
                ob.data.as_ptr().add(ob.batch_offsets[i]),
                ob.col_stride,
                ob.row_stride,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                par,
            )
        }
    };
    // Many small matrices (attention heads): one per task. Few big ones: let gemm split each.
    if batches >= rayon::current_num_threads() && m * n * k < (1 << 21) {
        out.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, dst)| one(dst, i, gemm::Parallelism::None));
    } else {
        let par = if m * n * k >= (1 << 15) {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        out.chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, dst)| one(dst, i, par));
    }
    out
}

/// `a @ b` for layouts (..., M, K) and (..., K, N) with identical batch dims (broadcast batch dims
/// arrive as zero strides). Output is contiguous (..., M, N).
pub fn matmul(a: &CpuStorage, la: &Layout, b: &CpuStorage, lb: &Layout) -> Result<CpuStorage> {
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
    Ok(match (a, b) {
        (CpuStorage::F32(x), CpuStorage::F32(y)) => CpuStorage::F32(run(x, la, y, lb)),
        (CpuStorage::F64(x), CpuStorage::F64(y)) => CpuStorage::F64(run(x, la, y, lb)),
        (x, y) if x.dtype() == y.dtype() && matches!(x.dtype(), DType::F16 | DType::BF16) => {
            let (wx, wy) = (x.to_dtype(la, DType::F32), y.to_dtype(lb, DType::F32));
            let (CpuStorage::F32(wx), CpuStorage::F32(wy)) = (wx, wy) else {
                unreachable!()
            };
            let (cla, clb) = (
                Layout::contiguous(la.shape().clone()),
                Layout::contiguous(lb.shape().clone()),
            );
            CpuStorage::from_f32(run(&wx, &cla, &wy, &clb), x.dtype())
        }
        (x, y) if x.dtype() != y.dtype() => {
            return Err(Error::DTypeMismatch {
                op: "matmul",
                lhs: x.dtype(),
                rhs: y.dtype(),
            })
        }
        (x, _) => {
            return Err(Error::DType {
                op: "matmul",
                dtype: x.dtype(),
            })
        }
    })
}

/// `out (m x n) (+)= a (m x k) @ b (k x n)` on raw strided slices (row stride, col stride per
/// operand; `out` has row stride `out_rs` and unit column stride). The building block of conv.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided<T: Float>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    out: &mut [T],
    out_rs: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        out.len() >= (m - 1) * out_rs + n,
        "gemm_strided: output slice too short"
    );
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                out[r * out_rs..r * out_rs + n]
                    .iter_mut()
                    .for_each(|v| *v = T::zero());
            }
        }
        return;
    }
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs && b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    let par = if m * n * k >= (1 << 15) {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every address the strides can reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_operands_match_naive() {
        // a: (2, 3, 4) contiguous; b: (2, 4, 5) given as the transpose of a (2, 5, 4) buffer.
        let a: Vec<f64> = (0..24).map(|i| (i as f64 * 0.37).sin()).collect();
        let bt: Vec<f64> = (0..40).map(|i| (i as f64 * 0.11).cos()).collect();
        let la = Layout::contiguous((2, 3, 4));
        let lb = Layout::contiguous((2, 5, 4)).permute(&[0, 2, 1]).unwrap();
        let CpuStorage::F64(out) = matmul(
            &CpuStorage::F64(a.clone()),
            &la,
            &CpuStorage::F64(bt.clone()),
            &lb,
        )
        .unwrap() else {
            panic!()
        };
        for bi in 0..2 {
            for i in 0..3 {
                for j in 0..5 {
                    let want: f64 = (0..4)
                        .map(|p| a[bi * 12 + i * 4 + p] * bt[bi * 20 + j * 4 + p])
                        .sum();
                    assert!((out[bi * 15 + i * 5 + j] - want).abs() < 1e-12);
                }
            }
        }
    }
}
