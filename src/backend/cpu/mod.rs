//! The CPU backend: the reference oracle. Plain loops, f32 accumulation (f64 when asked),
//! parallel with rayon where it is free. f16/bf16 inputs are widened to f32, computed, and
//! narrowed back, so every dtype gives the f32 answer rounded once.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod lora;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod reduce;

use crate::tensor::float8::{F8E4M3, F8E5M2};
use crate::tensor::{DType, Element, Layout};
use crate::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::borrow::Cow;

/// Casts at least this long run on every core.
const CAST_PAR_MIN: usize = 1 << 16;

#[derive(Clone, Debug)]
pub enum CpuStorage {
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    /// float8 storage (frozen weights); ops other than casts and copies refuse it.
    F8E4M3(Vec<F8E4M3>),
    F8E5M2(Vec<F8E5M2>),
    /// Bytes (8-bit optimizer codes); ops other than copies refuse them.
    U8(Vec<u8>),
}

/// Contiguous float data ready for a generic kernel.
pub enum FloatData<'a> {
    F32(Cow<'a, [f32]>),
    F64(Cow<'a, [f64]>),
}

/// `Σ f(a_i, b_i)` over two equal-length slices with eight independent f64 accumulators. A single
/// running sum is a serial chain held to one add per FP-add latency; eight lanes let the loop
/// vectorise (3x on the norms, 1.4x on softmax here). The order differs from a left-to-right sum only below f64
/// rounding, far under the f32 the results are stored in.
pub(crate) fn lane_sum<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl Fn(A, B) -> f64) -> f64 {
    const L: usize = 8;
    let mut acc = [0f64; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..L {
            acc[i] += f(x[i], y[i]);
        }
    }
    let tail: f64 = ar.iter().zip(br).map(|(&x, &y)| f(x, y)).sum();
    acc.iter().sum::<f64>() + tail
}

/// Copy the elements a layout addresses into a fresh contiguous vector (or borrow them when they
/// already are contiguous).
pub fn gather<'a, T: Copy>(data: &'a [T], layout: &Layout) -> Cow<'a, [T]> {
    match layout.contiguous_range() {
        Some((a, b)) => Cow::Borrowed(&data[a..b]),
        None => Cow::Owned(layout.offsets().map(|o| data[o]).collect()),
    }
}

fn widen<T: Element>(data: &[T], layout: &Layout) -> Vec<f32> {
    layout.offsets().map(|o| data[o].to_f64() as f32).collect()
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::F8E4M3(_) => DType::F8E4M3,
            CpuStorage::F8E5M2(_) => DType::F8E5M2,
            CpuStorage::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            CpuStorage::I64(v) => v.len(),
            CpuStorage::F8E4M3(v) => v.len(),
            CpuStorage::F8E5M2(v) => v.len(),
            CpuStorage::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many float8 elements sit at the type's largest magnitude or beyond it (NaN, inf):
    /// where a value too large for the type ends up (e4m3fn saturates, e5m2 overflows to inf).
    /// 0 for every other dtype.
    pub fn float8_at_limit(&self) -> usize {
        match self {
            // e4m3fn: 0x7e is 448, 0x7f NaN.
            CpuStorage::F8E4M3(v) => v.iter().filter(|x| x.0 & 0x7f >= 0x7e).count(),
            // e5m2: 0x7b is 57344, then inf and NaN.
            CpuStorage::F8E5M2(v) => v.iter().filter(|x| x.0 & 0x7f >= 0x7b).count(),
            _ => 0,
        }
    }

    /// The elements of `layout` as contiguous f32 or f64 (f16/bf16 widen to f32).
    pub fn floats(&self, layout: &Layout, op: &'static str) -> Result<FloatData<'_>> {
        Ok(match self {
            CpuStorage::F32(v) => FloatData::F32(gather(v, layout)),
            CpuStorage::F64(v) => FloatData::F64(gather(v, layout)),
            CpuStorage::F16(v) => FloatData::F32(Cow::Owned(widen(v, layout))),
            CpuStorage::BF16(v) => FloatData::F32(Cow::Owned(widen(v, layout))),
            CpuStorage::I64(_)
            | CpuStorage::F8E4M3(_)
            | CpuStorage::F8E5M2(_)
            | CpuStorage::U8(_) => {
                return Err(Error::DType {
                    op,
                    dtype: self.dtype(),
                })
            }
        })
    }

    pub fn from_f32(v: Vec<f32>, dtype: DType) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(v),
            DType::F16 => CpuStorage::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F64 => CpuStorage::F64(v.iter().map(|&x| x as f64).collect()),
            DType::I64 => CpuStorage::I64(v.iter().map(|&x| x as i64).collect()),
            DType::F8E4M3 => CpuStorage::F8E4M3(v.iter().map(|&x| F8E4M3::from_f32(x)).collect()),
            DType::F8E5M2 => CpuStorage::F8E5M2(v.iter().map(|&x| F8E5M2::from_f32(x)).collect()),
            DType::U8 => CpuStorage::U8(v.iter().map(|&x| x as u8).collect()),
        }
    }

    /// Contiguous copy of the addressed elements, same dtype.
    pub fn copy_strided(&self, layout: &Layout) -> CpuStorage {
        match self {
            CpuStorage::F16(v) => CpuStorage::F16(gather(v, layout).into_owned()),
            CpuStorage::BF16(v) => CpuStorage::BF16(gather(v, layout).into_owned()),
            CpuStorage::F32(v) => CpuStorage::F32(gather(v, layout).into_owned()),
            CpuStorage::F64(v) => CpuStorage::F64(gather(v, layout).into_owned()),
            CpuStorage::I64(v) => CpuStorage::I64(gather(v, layout).into_owned()),
            CpuStorage::F8E4M3(v) => CpuStorage::F8E4M3(gather(v, layout).into_owned()),
            CpuStorage::F8E5M2(v) => CpuStorage::F8E5M2(gather(v, layout).into_owned()),
            CpuStorage::U8(v) => CpuStorage::U8(gather(v, layout).into_owned()),
        }
    }

    /// A copy of the addressed elements in `dtype`, each rounded once (through f64, which holds
    /// every value of every float dtype exactly). Contiguous data is converted in parallel: loading a
    /// checkpoint in another dtype (bf16 to f32, or to float8 with `--weight-dtype`) casts
    /// billions of values.
    pub fn to_dtype(&self, layout: &Layout, dtype: DType) -> CpuStorage {
        fn conv<S: Element, D: Element>(v: &[S], l: &Layout) -> Vec<D> {
            match l.contiguous_range() {
                Some((start, end)) if end - start >= CAST_PAR_MIN => v[start..end]
                    .par_iter()
                    .map(|x| D::from_f64(x.to_f64()))
                    .collect(),
                _ => l.offsets().map(|o| D::from_f64(v[o].to_f64())).collect(),
            }
        }
        macro_rules! to {
            ($v:expr) => {
                match dtype {
                    DType::F16 => CpuStorage::F16(conv($v, layout)),
                    DType::BF16 => CpuStorage::BF16(conv($v, layout)),
                    DType::F32 => CpuStorage::F32(conv($v, layout)),
                    DType::F64 => CpuStorage::F64(conv($v, layout)),
                    DType::I64 => CpuStorage::I64(conv($v, layout)),
                    DType::F8E4M3 => CpuStorage::F8E4M3(conv($v, layout)),
                    DType::F8E5M2 => CpuStorage::F8E5M2(conv($v, layout)),
                    DType::U8 => CpuStorage::U8(conv($v, layout)),
                }
            };
        }
        match self {
            CpuStorage::F16(v) => to!(v),
            CpuStorage::BF16(v) => to!(v),
            CpuStorage::F32(v) => to!(v),
            CpuStorage::F64(v) => to!(v),
            CpuStorage::I64(v) => to!(v),
            CpuStorage::F8E4M3(v) => to!(v),
            CpuStorage::F8E5M2(v) => to!(v),
            CpuStorage::U8(v) => to!(v),
        }
    }

    /// Every addressed element as f64 (reading results out, tests).
    pub fn to_f64_vec(&self, layout: &Layout) -> Vec<f64> {
        fn conv<S: Element>(v: &[S], l: &Layout) -> Vec<f64> {
            l.offsets().map(|o| v[o].to_f64()).collect()
        }
        match self {
            CpuStorage::F16(v) => conv(v, layout),
            CpuStorage::BF16(v) => conv(v, layout),
            CpuStorage::F32(v) => conv(v, layout),
            CpuStorage::F64(v) => conv(v, layout),
            CpuStorage::I64(v) => conv(v, layout),
            CpuStorage::F8E4M3(v) => conv(v, layout),
            CpuStorage::F8E5M2(v) => conv(v, layout),
            CpuStorage::U8(v) => conv(v, layout),
        }
    }

    /// The addressed elements as i64: integer storage exactly (all 64 bits), float storage cast
    /// as `as i64` casts (toward zero).
    pub fn to_i64_vec(&self, layout: &Layout) -> Vec<i64> {
        match self {
            CpuStorage::I64(v) => layout.offsets().map(|o| v[o]).collect(),
            _ => self
                .to_f64_vec(layout)
                .into_iter()
                .map(|v| v as i64)
                .collect(),
        }
    }

    /// Raw little-endian bytes of the addressed elements (safetensors writing).
    pub fn to_bytes(&self, layout: &Layout) -> Vec<u8> {
        match self.copy_strided(layout) {
            CpuStorage::F16(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::BF16(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::F32(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::F64(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::I64(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::F8E4M3(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::F8E5M2(v) => bytemuck::cast_slice(&v).to_vec(),
            CpuStorage::U8(v) => v,
        }
    }
}

/// Run a generic kernel `$f::<T>(&[T], ...) -> Vec<T>` on one float input and return storage of
/// the input's dtype.
#[macro_export]
macro_rules! cpu_float_unary {
    ($s:expr, $l:expr, $op:expr, |$x:ident| $body:expr) => {{
        let want = $s.dtype();
        match $s.floats($l, $op)? {
            $crate::backend::cpu::FloatData::F32($x) => {
                $crate::backend::cpu::CpuStorage::from_f32($body, want)
            }
            $crate::backend::cpu::FloatData::F64($x) => {
                $crate::backend::cpu::CpuStorage::F64($body)
            }
        }
    }};
}

/// Same as [`cpu_float_unary`] for two inputs of the same dtype.
#[macro_export]
macro_rules! cpu_float_binary {
    ($a:expr, $la:expr, $b:expr, $lb:expr, $op:expr, |$x:ident, $y:ident| $body:expr) => {{
        let want = $a.dtype();
        if want != $b.dtype() {
            return Err($crate::Error::DTypeMismatch {
                op: $op,
                lhs: want,
                rhs: $b.dtype(),
            });
        }
        match ($a.floats($la, $op)?, $b.floats($lb, $op)?) {
            (
                $crate::backend::cpu::FloatData::F32($x),
                $crate::backend::cpu::FloatData::F32($y),
            ) => $crate::backend::cpu::CpuStorage::from_f32($body, want),
            (
                $crate::backend::cpu::FloatData::F64($x),
                $crate::backend::cpu::FloatData::F64($y),
            ) => $crate::backend::cpu::CpuStorage::F64($body),
            _ => unreachable!("same dtype widens the same way"),
        }
    }};
}
