//! DEIS ("deis" in ComfyUI), as diffusers' `DEISMultistepScheduler` runs it: the log-rho
//! multistep solver of order 1-3 (Zhang and Chen 2022) on the VP latents, in the noise
//! prediction. With `rho = sigma / alpha` (the VE sigma), each step integrates the Lagrange
//! polynomial through the last `order` noise predictions exactly in log rho:
//! - first order: `x' = (alpha_t / alpha_s) x - sigma_t (e^h - 1) eps`, h the lambda step;
//! - orders 2 and 3: `x' = alpha_t (x / alpha_s + sum_k c_k eps_k)`, with diffusers' closed forms
//!   of the integrals `c_k` in log rho.
//!
//! Noise predictions pass through x0 as diffusers converts them (`eps = (x - alpha x0) / sigma`).
//! Unlike DPM-Solver++ the schedule ends at the table's smallest sigma (on Karras sigmas, the
//! ramp's last repeated), so the last step is not forced to first order: only runs under 15
//! steps (with `lower_order_final`) lower their order over the last two steps.

use super::dpmpp::alpha_sigma;
use super::ramps::Ramp;
use super::schedule::{multistep_schedule, Prediction};
use super::{Sampler, SchedulerConfig};
use crate::{Error, Result, Tensor};

pub struct Deis {
    order: usize,
    lower_order_final: bool,
    prediction: Prediction,
    timesteps: Vec<f64>,
    /// steps + 1 float32 VE sigmas; the last is the table's smallest, not 0.
    sigmas: Vec<f32>,
    /// The noise predictions of the last `order - 1` steps, newest last.
    history: Vec<Tensor>,
    /// Steps taken so far (diffusers' `lower_order_nums`, uncapped).
    taken: usize,
}

impl Deis {
    pub fn new(config: &SchedulerConfig, steps: usize, ramp: Ramp) -> Result<Deis> {
        config.refuse_zero_snr("DEISMultistepScheduler")?;
        if !config.dpm_unsupported.is_empty() {
            return Err(Error::Config(format!(
                "scheduler config: DEIS is implemented as log-rho deis of order 1-3; this config \
                 asks for {}",
                config.dpm_unsupported.join(", ")
            )));
        }
        if !(1..=3).contains(&config.solver_order) {
            return Err(Error::Config(format!(
                "DEIS has orders 1, 2 and 3, not {}",
                config.solver_order
            )));
        }
        let (timesteps, mut sigmas) = multistep_schedule(config, steps, ramp, [None; 2], "DEIS")?;
        // The final 0 of the DPM schedule becomes the table's smallest sigma, or the ramp's last.
        let n = sigmas.len();
        sigmas[n - 1] = if ramp != Ramp::Spaced {
            sigmas[n - 2]
        } else {
            let a0 = config.sigma_alphas_cumprod_f32()[0];
            ((1.0 - a0) / a0).sqrt()
        };
        Ok(Deis {
            order: config.solver_order,
            lower_order_final: config.lower_order_final,
            prediction: config.prediction,
            timesteps,
            sigmas,
            history: Vec::new(),
            taken: 0,
        })
    }

    /// The order step `i` runs at: the warm-up over the steps taken, and for runs under 15
    /// steps first order at the last step and at most second at the one before.
    fn order_at(&self, i: usize) -> usize {
        let n = self.timesteps.len();
        let short = self.lower_order_final && n < 15;
        if self.order == 1 || self.taken == 0 || (short && i + 1 == n) {
            1
        } else if self.order == 2 || self.taken == 1 || (short && i + 2 == n) {
            2
        } else {
            3
        }
    }
}

/// diffusers' second-order integral: `t (log t - log c - 1) / (log b - log c)`.
fn ind2(t: f64, b: f64, c: f64) -> f64 {
    t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln())
}

/// diffusers' third-order integral.
fn ind3(t: f64, b: f64, c: f64, d: f64) -> f64 {
    let (lt, lc, ld) = (t.ln(), c.ln(), d.ln());
    let num = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
    num / ((b.ln() - lc) * (b.ln() - ld))
}

impl Sampler for Deis {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[index]);
        x0.scale(a as f64)?.add(&noise.scale(s as f64)?)
    }

    fn step(&mut self, i: usize, x: &Tensor, out: &Tensor) -> Result<Tensor> {
        let (s_s, s_t) = (self.sigmas[i], self.sigmas[i + 1]);
        let ((a_s, sig_s), (a_t, sig_t)) = (alpha_sigma(s_s), alpha_sigma(s_t));
        let x0 = self.prediction.x0_vp(x, out, a_s, sig_s)?;
        let m0 = x.sub(&x0.scale(a_s as f64)?)?.scale(1.0 / sig_s as f64)?; // (B, C, H, W)
        let order = self.order_at(i);
        let rho = |k: usize| {
            let (a, s) = alpha_sigma(self.sigmas[k]);
            (s / a) as f64
        };
        let out = match (order, self.history.as_slice()) {
            (1, _) => {
                let lambda = |a: f32, s: f32| a.ln() - s.ln();
                let h = lambda(a_t, sig_t) - lambda(a_s, sig_s);
                x.scale((a_t / a_s) as f64)?
                    .sub(&m0.scale((sig_t * (h.exp() - 1.0)) as f64)?)?
            }
            (2, [.., m1]) => {
                let (rt, r0, r1) = (rho(i + 1), rho(i), rho(i - 1));
                let c0 = ind2(rt, r0, r1) - ind2(r0, r0, r1);
                let c1 = ind2(rt, r1, r0) - ind2(r0, r1, r0);
                x.scale(1.0 / a_s as f64)?
                    .add(&m0.scale(c0)?)?
                    .add(&m1.scale(c1)?)?
                    .scale(a_t as f64)?
            }
            (3, [.., m2, m1]) => {
                let (rt, r0, r1, r2) = (rho(i + 1), rho(i), rho(i - 1), rho(i - 2));
                let c0 = ind3(rt, r0, r1, r2) - ind3(r0, r0, r1, r2);
                let c1 = ind3(rt, r1, r2, r0) - ind3(r0, r1, r2, r0);
                let c2 = ind3(rt, r2, r0, r1) - ind3(r0, r2, r0, r1);
                x.scale(1.0 / a_s as f64)?
                    .add(&m0.scale(c0)?)?
                    .add(&m1.scale(c1)?)?
                    .add(&m2.scale(c2)?)?
                    .scale(a_t as f64)?
            }
            _ => unreachable!("order_at never exceeds the history"),
        };
        self.taken += 1;
        if self.order > 1 {
            self.history.push(m0);
            if self.history.len() > self.order - 1 {
                self.history.remove(0);
            }
        }
        Ok(out)
    }
}
