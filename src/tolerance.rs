//! One comparison type with named presets, matching the fixtures README's contract.

use crate::{Result, Tensor};

/// `||out - ref|| <= rel * ||ref|| + abs`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub rel: f64,
    pub abs: f64,
}

impl Tolerance {
    /// Every f32 forward output against the float64 reference.
    pub const F32_FORWARD: Tolerance = Tolerance {
        rel: 1e-4,
        abs: 0.0,
    };
    /// The whole pipeline image.
    pub const F32_PIPELINE: Tolerance = Tolerance {
        rel: 1e-3,
        abs: 0.0,
    };
    /// Gradients and AdamW results; `abs` is set per file from the largest reference norm.
    pub const F32_GRAD: Tolerance = Tolerance {
        rel: 1e-3,
        abs: 0.0,
    };
    /// bf16 on a GPU: forward outputs.
    pub const BF16_FORWARD: Tolerance = Tolerance {
        rel: 2e-2,
        abs: 0.0,
    };
    /// bf16 on a GPU: gradients.
    pub const BF16_GRAD: Tolerance = Tolerance {
        rel: 5e-2,
        abs: 0.0,
    };

    /// The gradient tolerance with the README's absolute floor `1e-9 * max_k ||ref_k||`.
    pub fn grad_with_floor(self, max_ref_norm: f64) -> Tolerance {
        Tolerance {
            rel: self.rel,
            abs: 1e-9 * max_ref_norm,
        }
    }
}

/// The outcome of one comparison.
#[derive(Clone, Copy, Debug)]
pub struct Comparison {
    /// `||out - ref||`
    pub err: f64,
    pub ref_norm: f64,
    /// The allowed `||out - ref||`.
    pub limit: f64,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.err <= self.limit && self.err.is_finite()
    }

    /// Relative error `||out - ref|| / ||ref||` (absolute when the reference is zero).
    pub fn relative(&self) -> f64 {
        if self.ref_norm > 0.0 {
            self.err / self.ref_norm
        } else {
            self.err
        }
    }
}

pub fn l2(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Compare two tensors of equal shape under a tolerance.
pub fn compare(out: &Tensor, reference: &Tensor, tol: Tolerance) -> Result<Comparison> {
    if out.shape() != reference.shape() {
        return Err(crate::Error::ShapeMismatch {
            op: "compare",
            lhs: out.shape().clone(),
            rhs: reference.shape().clone(),
        });
    }
    let (a, b) = (out.to_vec_f64()?, reference.to_vec_f64()?);
    let diff: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    let (err, ref_norm) = (l2(&diff), l2(&b));
    Ok(Comparison {
        err,
        ref_norm,
        limit: tol.rel * ref_norm + tol.abs,
    })
}
