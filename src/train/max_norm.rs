//! kohya's max-norm regularization of LoRA weights (sd-scripts `--scale_weight_norms`,
//! `LoRANetwork.apply_max_norm_regularization`): after each optimizer step, every adapter whose
//! update matrix `W = (alpha / r) B A` has a Frobenius norm above the bound has both of its
//! factors scaled by the same root, so `W` lands on the bound. A K-StyleLoRA adapter is bounded
//! the same way on its A and B; its gates, which modulate `W` per sample, are left alone.

use crate::autograd::no_grad;
use crate::{Result, Tensor};

/// What one step's regularization did, as kohya reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaxNormReport {
    /// Adapters whose factors were scaled ("Keys Scaled").
    pub keys_scaled: usize,
    /// The mean and the largest of every adapter's `||W||` after scaling ("Average key norm").
    pub mean_norm: f64,
    pub max_norm: f64,
}

/// kohya's factor for an adapter whose `||W||` is `norm`: `min(n, max) / n` with `n` the norm
/// floored at `max / 2` (the floor changes nothing below the bound: the factor is then 1).
pub fn max_norm_ratio(norm: f64, max: f64) -> f64 {
    let n = norm.max(max / 2.0);
    n.min(max) / n
}

/// `||scale * B A||_F` of each `(A (r, in), B (out, r), scale)`, computed on their device and
/// read back in one transfer. A convolution's factors (r, in, kh, kw) and (out, r, 1, 1) count
/// as (r, in kh kw) and (out, r): kohya's conv-composed update `sum_r up[o, r] down[r, ...]` is
/// that product, reshaped.
pub fn weight_norms(pairs: &[(Tensor, Tensor, f64)]) -> Result<Vec<f64>> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    no_grad(|| {
        let squares = pairs
            .iter()
            .map(|(a, b, scale)| {
                let a = a.reshape((a.dims()[0], a.elem_count() / a.dims()[0].max(1)))?;
                let b = b.reshape((b.dims()[0], b.elem_count() / b.dims()[0].max(1)))?;
                let w = b.matmul(&a)?.scale(*scale)?; // (out, in [kh kw])
                w.mul(&w)?.sum_all()?.reshape(1)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&squares, 0)?
            .to_vec_f64()?
            .into_iter()
            .map(f64::sqrt)
            .collect())
    })
}

/// Each adapter's factor (the square root of kohya's ratio scales A and B alike) and the step's
/// report, for norms `norms` against the bound `max`.
pub fn regularize(norms: &[f64], max: f64) -> (Vec<f64>, MaxNormReport) {
    let ratios: Vec<f64> = norms.iter().map(|&n| max_norm_ratio(n, max)).collect();
    let scaled: Vec<f64> = norms.iter().zip(&ratios).map(|(n, r)| n * r).collect();
    let report = MaxNormReport {
        keys_scaled: ratios.iter().filter(|&&r| r != 1.0).count(),
        mean_norm: scaled.iter().sum::<f64>() / scaled.len().max(1) as f64,
        max_norm: scaled.iter().cloned().fold(0.0, f64::max),
    };
    (ratios, report)
}

/// The optimizer factors of the adapters at `slots` ((A's slot, B's slot) each) for kohya's
/// `ratios`: the root of each ratio that is not 1, on both of its factors.
pub fn slot_factors(slots: &[(usize, usize)], ratios: &[f64]) -> Vec<(usize, f64)> {
    slots
        .iter()
        .zip(ratios)
        .filter(|(_, &r)| r != 1.0)
        .flat_map(|(&(a, b), r)| [(a, r.sqrt()), (b, r.sqrt())])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_bound_the_norm_and_leave_small_ones() {
        assert_eq!(max_norm_ratio(0.1, 1.0), 1.0);
        assert_eq!(max_norm_ratio(0.7, 1.0), 1.0);
        assert_eq!(max_norm_ratio(1.0, 1.0), 1.0);
        assert!((max_norm_ratio(4.0, 1.0) - 0.25).abs() < 1e-15);
        let (ratios, report) = regularize(&[0.1, 4.0, 2.0], 1.0);
        assert_eq!(ratios[0], 1.0);
        assert_eq!(report.keys_scaled, 2);
        assert!((report.max_norm - 1.0).abs() < 1e-15);
        assert!((report.mean_norm - 2.1 / 3.0).abs() < 1e-15);
    }
}
