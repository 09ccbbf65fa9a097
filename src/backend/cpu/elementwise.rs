//! Elementwise ops: unary activations and their derivatives, binary arithmetic on equal shapes
//! (broadcasting arrives as zero strides), affine, clamp, casts, gathers and concatenation.

use super::{gather, CpuStorage};
use crate::tensor::{DType, Float, Layout};
use crate::{Error, Result};
use rayon::prelude::*;

/// Below this many elements rayon's fork/join costs more than it saves.
const PAR_MIN: usize = 1 << 14;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Recip,
    Sqr,
    Abs,
    Sigmoid,
    Silu,
    Tanh,
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`.
    Gelu,
    /// The tanh approximation of GELU.
    GeluTanh,
    /// CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    Relu,
}

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

fn erf<T: Float>(x: T) -> T {
    T::of(libm::erf(x.as_f64()))
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_TANH_C: f64 = 0.044715;
const QUICK_GELU_K: f64 = 1.702;

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Sqr => "sqr",
            UnaryOp::Abs => "abs",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Silu => "silu",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Gelu => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::QuickGelu => "quick_gelu",
            UnaryOp::Relu => "relu",
        }
    }

    #[inline(always)]
    pub fn f<T: Float>(self, x: T) -> T {
        let half = T::of(0.5);
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Recip => x.recip(),
            UnaryOp::Sqr => x * x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sigmoid => sigmoid(x),
            UnaryOp::Silu => x * sigmoid(x),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Gelu => {
                half * x * (T::one() + erf(x * T::of(std::f64::consts::FRAC_1_SQRT_2)))
            }
            UnaryOp::GeluTanh => {
                let inner = T::of(SQRT_2_OVER_PI) * (x + T::of(GELU_TANH_C) * x * x * x);
                half * x * (T::one() + inner.tanh())
            }
            UnaryOp::QuickGelu => x * sigmoid(T::of(QUICK_GELU_K) * x),
            UnaryOp::Relu => x.max(T::zero()),
        }
    }

    /// The derivative f'(x).
    #[inline(always)]
    pub fn df<T: Float>(self, x: T) -> T {
        let one = T::one();
        let half = T::of(0.5);
        match self {
            UnaryOp::Neg => -one,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.recip(),
            UnaryOp::Sqrt => half / x.sqrt(),
            UnaryOp::Recip => -(x * x).recip(),
            UnaryOp::Sqr => x + x,
            UnaryOp::Abs => x.signum() * (if x == T::zero() { T::zero() } else { one }),
            UnaryOp::Sigmoid => {
                let s = sigmoid(x);
                s * (one - s)
            }
            UnaryOp::Silu => {
                let s = sigmoid(x);
                s + x * s * (one - s)
            }
            UnaryOp::Tanh => {
                let t = x.tanh();
                one - t * t
            }
            UnaryOp::Gelu => {
                let cdf = half * (one + erf(x * T::of(std::f64::consts::FRAC_1_SQRT_2)));
                let pdf = (-half * x * x).exp() * T::of(0.398_942_280_401_432_7);
                cdf + x * pdf
            }
            UnaryOp::GeluTanh => {
                let c = T::of(GELU_TANH_C);
                let k = T::of(SQRT_2_OVER_PI);
                let t = (k * (x + c * x * x * x)).tanh();
                half * (one + t) + half * x * (one - t * t) * k * (one + T::of(3.0) * c * x * x)
            }
            UnaryOp::QuickGelu => {
                let k = T::of(QUICK_GELU_K);
                let s = sigmoid(k * x);
                s + k * x * s * (one - s)
            }
            UnaryOp::Relu => {
                if x > T::zero() {
                    one
                } else {
                    T::zero()
                }
            }
        }
    }
}

fn map<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    if x.len() >= PAR_MIN {
        x.par_iter().map(|&v| f(v)).collect()
    } else {
        x.iter().map(|&v| f(v)).collect()
    }
}

fn zip_map<T: Float>(x: &[T], y: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    if x.len() >= PAR_MIN {
        x.par_iter()
            .zip(y.par_iter())
            .map(|(&a, &b)| f(a, b))
            .collect()
    } else {
        x.iter().zip(y.iter()).map(|(&a, &b)| f(a, b)).collect()
    }
}

/// Evaluates `$body` with `$k` bound to the op as a constant: the `match` on the op happens once,
/// not per element, and each loop body is one inlined formula. (A `let` binding is not enough:
/// the loop closure, called deep inside rayon, would load it and dispatch per element.)
macro_rules! per_op {
    ($op:expr, |$k:ident| $body:expr) => {
        match $op {
            UnaryOp::Neg => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Neg;
                $body
            }
            UnaryOp::Exp => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Exp;
                $body
            }
            UnaryOp::Log => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Log;
                $body
            }
            UnaryOp::Sqrt => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Sqrt;
                $body
            }
            UnaryOp::Recip => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Recip;
                $body
            }
            UnaryOp::Sqr => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Sqr;
                $body
            }
            UnaryOp::Abs => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Abs;
                $body
            }
            UnaryOp::Sigmoid => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Sigmoid;
                $body
            }
            UnaryOp::Silu => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Silu;
                $body
            }
            UnaryOp::Tanh => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Tanh;
                $body
            }
            UnaryOp::Gelu => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Gelu;
                $body
            }
            UnaryOp::GeluTanh => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::GeluTanh;
                $body
            }
            UnaryOp::QuickGelu => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::QuickGelu;
                $body
            }
            UnaryOp::Relu => {
                #[allow(non_upper_case_globals)]
                const $k: UnaryOp = UnaryOp::Relu;
                $body
            }
        }
    };
}

pub fn unary(s: &CpuStorage, l: &Layout, op: UnaryOp) -> Result<CpuStorage> {
    Ok(crate::cpu_float_unary!(s, l, op.name(), |x| per_op!(
        op,
        |k| map(&x, |v| k.f(v))
    )))
}

/// dx = dy * f'(x).
pub fn unary_bwd(
    x: &CpuStorage,
    lx: &Layout,
    dy: &CpuStorage,
    ldy: &Layout,
    op: UnaryOp,
) -> Result<CpuStorage> {
    Ok(crate::cpu_float_binary!(
        x,
        lx,
        dy,
        ldy,
        op.name(),
        |x, g| per_op!(op, |k| zip_map(&x, &g, |a, d| d * k.df(a)))
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }

    fn f<T: Float>(self, a: T, b: T) -> T {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
        }
    }
}

/// `a op b` for two layouts of the same logical shape.
pub fn binary(
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    op: BinaryOp,
) -> Result<CpuStorage> {
    Ok(crate::cpu_float_binary!(a, la, b, lb, op.name(), |x, y| {
        zip_map(&x, &y, |p, q| op.f(p, q))
    }))
}

/// `x * mul + add`.
pub fn affine(s: &CpuStorage, l: &Layout, mul: f64, add: f64) -> Result<CpuStorage> {
    fn run<T: Float>(x: &[T], mul: f64, add: f64) -> Vec<T> {
        map(x, |v| v * T::of(mul) + T::of(add))
    }
    Ok(crate::cpu_float_unary!(s, l, "affine", |x| run(
        &x, mul, add
    )))
}

/// `max(x, lo)`; its gradient passes where x > lo.
pub fn clamp_min(s: &CpuStorage, l: &Layout, lo: f64) -> Result<CpuStorage> {
    fn run<T: Float>(x: &[T], lo: f64) -> Vec<T> {
        map(x, |v| v.max(T::of(lo)))
    }
    Ok(crate::cpu_float_unary!(s, l, "clamp_min", |x| run(&x, lo)))
}

pub fn clamp_min_bwd(
    x: &CpuStorage,
    lx: &Layout,
    dy: &CpuStorage,
    ldy: &Layout,
    lo: f64,
) -> Result<CpuStorage> {
    fn run<T: Float>(x: &[T], g: &[T], lo: f64) -> Vec<T> {
        zip_map(x, g, |a, d| if a > T::of(lo) { d } else { T::zero() })
    }
    Ok(crate::cpu_float_binary!(
        x,
        lx,
        dy,
        ldy,
        "clamp_min_bwd",
        |x, g| run(&x, &g, lo)
    ))
}

/// `table[ids]` along dim 0: embedding lookup. `table` is (N, D), ids any shape; out (ids..., D).
pub fn index_select(
    table: &CpuStorage,
    lt: &Layout,
    ids: &CpuStorage,
    li: &Layout,
) -> Result<CpuStorage> {
    let CpuStorage::I64(idv) = ids else {
        return Err(Error::DType {
            op: "index_select",
            dtype: ids.dtype(),
        });
    };
    let idx = gather(idv, li);
    let (n, d) = match lt.dims() {
        [n, d] => (*n, *d),
        _ => {
            return Err(Error::Rank {
                op: "index_select",
                expected: 2,
                got: lt.shape().clone(),
            })
        }
    };
    if let Some(bad) = idx.iter().find(|&&i| i < 0 || i as usize >= n) {
        return Err(Error::msg(format!(
            "index_select: index {bad} out of range for table of {n} rows"
        )));
    }
    fn pick<T: Copy>(t: &[T], idx: &[i64], d: usize) -> Vec<T> {
        idx.iter()
            .flat_map(|&i| t[i as usize * d..(i as usize + 1) * d].iter().copied())
            .collect()
    }
    // `gather` borrows a contiguous table: no copy of a (49408, 1280) embedding per call.
    Ok(match table {
        CpuStorage::F16(t) => CpuStorage::F16(pick(&gather(t, lt), &idx, d)),
        CpuStorage::BF16(t) => CpuStorage::BF16(pick(&gather(t, lt), &idx, d)),
        CpuStorage::F32(t) => CpuStorage::F32(pick(&gather(t, lt), &idx, d)),
        CpuStorage::F64(t) => CpuStorage::F64(pick(&gather(t, lt), &idx, d)),
        CpuStorage::I64(t) => CpuStorage::I64(pick(&gather(t, lt), &idx, d)),
        CpuStorage::F8E4M3(t) => CpuStorage::F8E4M3(pick(&gather(t, lt), &idx, d)),
        CpuStorage::F8E5M2(t) => CpuStorage::F8E5M2(pick(&gather(t, lt), &idx, d)),
        CpuStorage::U8(t) => CpuStorage::U8(pick(&gather(t, lt), &idx, d)),
    })
}

/// Concatenate along `dim`; every input has the same dims except `dim` and the same dtype.
pub fn cat(inputs: &[(&CpuStorage, &Layout)], dim: usize, dtype: DType) -> Result<CpuStorage> {
    fn run<T: Copy>(parts: &[(std::borrow::Cow<'_, [T]>, usize)], outer: usize) -> Vec<T> {
        let total: usize = parts.iter().map(|(p, _)| p.len()).sum();
        let mut out = Vec::with_capacity(total);
        for o in 0..outer {
            for (p, chunk) in parts {
                out.extend_from_slice(&p[o * chunk..(o + 1) * chunk]);
            }
        }
        out
    }
    let outer: usize = inputs[0].1.dims()[..dim].iter().product();
    macro_rules! go {
        ($variant:ident) => {{
            let mut parts = Vec::with_capacity(inputs.len());
            for (s, l) in inputs {
                let CpuStorage::$variant(v) = s else {
                    return Err(Error::DTypeMismatch {
                        op: "cat",
                        lhs: dtype,
                        rhs: s.dtype(),
                    });
                };
                let chunk = l.dims()[dim..].iter().product::<usize>();
                parts.push((gather(v, l), chunk));
            }
            CpuStorage::$variant(run(&parts, outer))
        }};
    }
    Ok(match dtype {
        DType::F16 => go!(F16),
        DType::BF16 => go!(BF16),
        DType::F32 => go!(F32),
        DType::F64 => go!(F64),
        DType::I64 => go!(I64),
        DType::F8E4M3 => go!(F8E4M3),
        DType::F8E5M2 => go!(F8E5M2),
        DType::U8 => go!(U8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivatives_match_central_differences() {
        let ops = [
            UnaryOp::Exp,
            UnaryOp::Log,
            UnaryOp::Sqrt,
            UnaryOp::Recip,
            UnaryOp::Sqr,
            UnaryOp::Sigmoid,
            UnaryOp::Silu,
            UnaryOp::Tanh,
            UnaryOp::Gelu,
            UnaryOp::GeluTanh,
            UnaryOp::QuickGelu,
        ];
        for op in ops {
            for &x in &[0.3f64, 1.7, 2.9] {
                let h = 1e-6;
                let fd = (op.f(x + h) - op.f(x - h)) / (2.0 * h);
                assert!(
                    (fd - op.df(x)).abs() < 1e-7,
                    "{op:?} at {x}: fd {fd} analytic {}",
                    op.df(x)
                );
            }
        }
    }
}
