//! Linear multistep ("LMS" in A1111 and ComfyUI), as diffusers' `LMSDiscreteScheduler` runs it
//! in the SDXL pipelines (order 4): Euler's sigmas and UNet inputs, and each step
//! `x <- x + sum_k c_k d_(i-k)` over the slopes `d = (x - x0) / sigma` of the last (up to) four
//! steps, where `c_k` integrates the Lagrange basis polynomial of node `sigma_(i-k)` (over the
//! nodes `sigma_i .. sigma_(i-order+1)`) from `sigma_i` to `sigma_(i+1)`.
//!
//! diffusers integrates with `scipy.integrate.quad` on float32 evaluations of the polynomial;
//! here a three-point Gauss-Legendre rule integrates it exactly (degree at most 3) in float64,
//! which differs from quad by the float32 rounding of the integrand (about 1e-7 relative).
//!
//! The order grows with the step index, not with the slopes kept: a run started part-way
//! (img2img) pairs the first slopes with the leading coefficients of a higher-order rule, as
//! diffusers does (`order = min(step_index + 1, 4)`, then `zip` with the slopes it has).

use super::euler::EulerDiscrete;
use super::schedule::Prediction;
use super::{Sampler, SchedulerConfig};
use crate::{Result, Tensor};
use std::collections::VecDeque;

/// The order diffusers' SDXL pipelines step LMS with (`step`'s default).
const ORDER: usize = 4;

pub struct Lms {
    /// Euler's schedule, UNet inputs and noising: LMSDiscreteScheduler builds the same.
    euler: EulerDiscrete,
    prediction: Prediction,
    /// The latest slopes, newest first.
    slopes: VecDeque<Tensor>,
}

impl Lms {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Lms> {
        config.refuse_zero_snr("LMSDiscreteScheduler")?;
        Ok(Lms {
            euler: EulerDiscrete::new(&config.without_euler_extras(), steps)?,
            prediction: config.prediction,
            slopes: VecDeque::new(),
        })
    }
}

/// The coefficients of step `i` over `sigmas` with `order` nodes: entry k belongs to the slope
/// of step i - k.
fn coefficients(sigmas: &[f64], i: usize, order: usize) -> Vec<f64> {
    let nodes: Vec<f64> = (0..order).map(|k| sigmas[i - k]).collect();
    (0..order)
        .map(|k| {
            let basis = |tau: f64| {
                (0..order)
                    .filter(|&j| j != k)
                    .map(|j| (tau - nodes[j]) / (nodes[k] - nodes[j]))
                    .product::<f64>()
            };
            gauss_legendre_3(basis, sigmas[i], sigmas[i + 1])
        })
        .collect()
}

/// The integral of `f` from `a` to `b` by three-point Gauss-Legendre: exact up to degree 5.
fn gauss_legendre_3(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    let x = (3.0f64 / 5.0).sqrt() * half;
    half * (5.0 * f(mid - x) + 8.0 * f(mid) + 5.0 * f(mid + x)) / 9.0
}

impl Sampler for Lms {
    fn timesteps(&self) -> &[f64] {
        self.euler.timesteps()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.euler.init_noise_sigma()
    }

    fn input_scale(&self, i: usize) -> f64 {
        self.euler.input_scale(i)
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.euler.add_noise(index, x0, noise)
    }

    fn step(&mut self, i: usize, x: &Tensor, out: &Tensor) -> Result<Tensor> {
        let sigma = self.euler.sigmas()[i];
        let x0 = self.prediction.x0_ve(x, out, sigma as f32)?;
        self.slopes.push_front(x.sub(&x0)?.scale(1.0 / sigma)?);
        self.slopes.truncate(ORDER);
        let order = (i + 1).min(ORDER);
        let mut prev = x.clone();
        for (c, d) in coefficients(self.euler.sigmas(), i, order)
            .iter()
            .zip(&self.slopes)
        {
            prev = prev.add(&d.scale(*c)?)?;
        }
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_integrate_the_lagrange_basis() {
        // The basis polynomials sum to 1, so the coefficients sum to the step's length; a
        // first-order step is Euler's.
        let sigmas = [14.6, 7.1, 3.3, 1.2, 0.4, 0.0];
        assert_eq!(coefficients(&sigmas, 0, 1), vec![7.1 - 14.6]);
        for (i, order) in [(1, 2), (2, 3), (3, 4), (4, 4)] {
            let c = coefficients(&sigmas, i, order);
            let sum: f64 = c.iter().sum();
            let len = sigmas[i + 1] - sigmas[i];
            assert!((sum - len).abs() < 1e-12, "step {i}: {sum} vs {len}");
        }
        // Order 2 by hand: the slope line through (s1, d1), (s0, d0) integrated over [s1, s2].
        let (s0, s1, s2) = (14.6f64, 7.1, 3.3);
        let c0 = ((s2 - s0).powi(2) - (s1 - s0).powi(2)) / (2.0 * (s1 - s0));
        let c = coefficients(&sigmas, 1, 2);
        assert!((c[0] - c0).abs() < 1e-12, "{} vs {c0}", c[0]);
    }
}
