//! Element types. f16/bf16 are storage types: the CPU backend computes them in f32. The float8
//! types only store (frozen weights, `--weight-dtype`): GEMMs and convolutions widen them first.

use super::float8::{F8E4M3, F8E5M2};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    BF16,
    F32,
    F64,
    /// Token ids and other integer indices.
    I64,
    /// `torch.float8_e4m3fn`, storage only.
    F8E4M3,
    /// `torch.float8_e5m2`, storage only.
    F8E5M2,
    /// Bytes: 8-bit optimizer codes (`torch.uint8`), storage only.
    U8,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F8E4M3 | DType::F8E5M2 | DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::I64 | DType::U8)
    }

    /// A type tensors can be stored in but no arithmetic op takes (float8, bytes).
    pub fn is_storage_only(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F8E5M2 | DType::U8)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
            DType::U8 => "u8",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "f32" | "fp32" | "float32" | "float" => DType::F32,
            "f64" | "fp64" | "float64" | "double" => DType::F64,
            "i64" | "int64" => DType::I64,
            "u8" | "uint8" => DType::U8,
            "f8e4m3" | "fp8-e4m3fn" | "float8_e4m3fn" | "fp8_e4m3fn" | "e4m3" => DType::F8E4M3,
            "f8e5m2" | "fp8-e5m2" | "float8_e5m2" | "fp8_e5m2" | "e5m2" => DType::F8E5M2,
            _ => return None,
        })
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A float type the CPU backend computes in (f32, f64). Kernels are written once, generic over it.
pub trait Float:
    num_traits::Float
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::ops::SubAssign
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    const DTYPE: DType;
    /// A constant or accumulated value in this type.
    fn of(v: f64) -> Self;
    /// Widen to f64 for accumulation.
    fn as_f64(self) -> f64;
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    fn of(v: f64) -> Self {
        v as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    const DTYPE: DType = DType::F64;
    fn of(v: f64) -> Self {
        v
    }
    fn as_f64(self) -> f64 {
        self
    }
}

/// Conversion of every element type to and from f64, used by casts and by constructors.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $d:expr, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
        }
    };
}

// 16-bit floats round through f32, as PyTorch's `Half(float)` / `BFloat16(float)` constructors
// do. This is also the only correct path for f32 values: half 2.7's `bf16::from_f64` drops the
// low 32 bits of the f64 before rounding, so an f32 just above a rounding tie (0x3f808001) came
// out rounded down (found by the bit-exact cast check of `gpu-parity`).
element!(
    f16,
    DType::F16,
    |x: f16| x.to_f64(),
    |v: f64| f16::from_f32(v as f32)
);
element!(bf16, DType::BF16, |x: bf16| x.to_f64(), |v: f64| {
    bf16::from_f32(v as f32)
});
element!(f32, DType::F32, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, DType::F64, |x: f64| x, |v: f64| v);
element!(i64, DType::I64, |x: i64| x as f64, |v: f64| v as i64);
element!(u8, DType::U8, |x: u8| x as f64, |v: f64| v as u8);
// float8 rounds through f32 too: PyTorch has no double -> float8 conversion of its own.
element!(
    F8E4M3,
    DType::F8E4M3,
    |x: F8E4M3| x.to_f32() as f64,
    |v: f64| F8E4M3::from_f32(v as f32)
);
element!(
    F8E5M2,
    DType::F8E5M2,
    |x: F8E5M2| x.to_f32() as f64,
    |v: f64| F8E5M2::from_f32(v as f32)
);
