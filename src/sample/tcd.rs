//! Trajectory consistency distillation's sampler, as diffusers' `TCDScheduler` runs it: the
//! few-step sampler of TCD-distilled models and of TCD-LoRA (usually 4-8 steps at low guidance).
//!
//! It steps on LCM's distillation schedule (`lcm::distillation_timesteps`). At timestep
//! `t` with next timestep `t'` (0 after the last), the model output gives `x0` and `eps`, which are
//! re-mixed at the intermediate timestep `s = floor((1 - gamma) t')`:
//! `x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps`. With `gamma` (diffusers' `eta`, the paper's
//! stochasticity) above 0 every step but the last then adds fresh noise to reach `t'`:
//! `x' = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z`; at `gamma` 0 (`s = t'`)
//! and at the last step `x' = x_s`, so a run ends at `t' = 0`, not at the clean `x0`.
//!
//! `s` is computed as diffusers computes it, `(1 - gamma)` rounded to float32 times the float32
//! timestep, floored (at gamma 0.3 and t' = 90 that is 63, where float64 gives 62); the other
//! coefficients are float32 from the float32 table.

use super::lcm::distillation_timesteps;
use super::schedule::Prediction;
use super::{Noise, NoiseStream, Sampler, SchedulerConfig};
use crate::{Error, Result, Tensor};

/// TCD's default gamma (the `eta` of `TCDScheduler.step` and the TCD authors' examples).
pub const DEFAULT_GAMMA: f64 = 0.3;

pub struct Tcd {
    timesteps: Vec<f64>,
    /// The whole-number timesteps, then 0 (the target of the last step).
    steps: Vec<usize>,
    alphas_cumprod: Vec<f32>,
    gamma: f64,
    noise: NoiseStream,
    prediction: Prediction,
}

impl Tcd {
    /// TCD over `steps` steps at stochasticity `gamma` (0 to 1); its step noise from `noise`.
    pub fn new(config: &SchedulerConfig, steps: usize, gamma: f64, noise: &Noise) -> Result<Tcd> {
        if !(0.0..=1.0).contains(&gamma) {
            return Err(Error::Config(format!(
                "TCD's gamma (diffusers' eta) must be between 0 and 1, got {gamma}"
            )));
        }
        let mut ts = distillation_timesteps(config, steps, "TCD")?;
        let timesteps = ts.iter().map(|&t| t as f64).collect();
        ts.push(0);
        Ok(Tcd {
            timesteps,
            steps: ts,
            alphas_cumprod: config.alphas_cumprod_f32(),
            gamma,
            noise: NoiseStream::new(noise),
            prediction: config.prediction,
        })
    }

    /// The intermediate timestep `floor((1 - gamma) t)`, in float32 as diffusers computes it.
    fn intermediate(&self, t: usize) -> usize {
        ((1.0 - self.gamma) as f32 * t as f32).floor() as usize
    }
}

impl Sampler for Tcd {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        super::vp_add_noise(x0, noise, self.alphas_cumprod[self.steps[index]])
    }

    fn step(&mut self, i: usize, x: &Tensor, out: &Tensor) -> Result<Tensor> {
        let (t, t_next) = (self.steps[i], self.steps[i + 1]);
        let s = self.intermediate(t_next);
        let ac = &self.alphas_cumprod;
        let (a_t, a_next, a_s) = (ac[t], ac[t_next], ac[s]);
        let (alpha, sigma) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let x0 = self.prediction.x0_vp(x, out, alpha, sigma)?; // (B, C, H, W)
        let eps = match self.prediction {
            Prediction::Epsilon => out.clone(),
            Prediction::V => self.prediction.eps_vp(x, out, alpha, sigma)?,
        };
        let x_s = x0
            .scale(a_s.sqrt() as f64)?
            .add(&eps.scale((1.0 - a_s).sqrt() as f64)?)?;
        if self.gamma == 0.0 || i + 1 == self.timesteps.len() {
            return Ok(x_s);
        }
        let z = self.noise.next_like(x)?;
        let ratio = a_next / a_s;
        x_s.scale(ratio.sqrt() as f64)?
            .add(&z.scale((1.0 - ratio).sqrt() as f64)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The intermediate timesteps diffusers forms: float32 `(1 - gamma) t`, floored. Where
    /// float64 would floor differently (0.7 x 90 is 62.99999999999999 in float64), the expected
    /// values are what `torch.floor((1 - eta) * torch.tensor(t))` gives.
    #[test]
    fn intermediate_timesteps_are_float32() {
        let c = SchedulerConfig::default();
        let tcd = Tcd::new(&c, 4, 0.3, &Noise::default()).unwrap();
        assert_eq!(tcd.intermediate(90), 63);
        assert_eq!(tcd.intermediate(170), 119);
        assert_eq!(tcd.intermediate(0), 0);
        let tcd = Tcd::new(&c, 4, 0.9, &Noise::default()).unwrap();
        assert_eq!(tcd.intermediate(10), 1);
        let tcd = Tcd::new(&c, 4, 0.0, &Noise::default()).unwrap();
        assert_eq!(tcd.intermediate(999), 999);
        assert!(Tcd::new(&c, 4, 1.5, &Noise::default()).is_err());
        assert!(Tcd::new(&c, 51, 0.3, &Noise::default()).is_err());
    }
}
