//! EDM models: Karras et al. 2022's preconditioned parametrisation, as Playground v2.5 (epsilon,
//! sigma_data 0.5) and CosXL-style v-prediction models use it, and as diffusers'
//! `EDMEulerScheduler` and `EDMDPMSolverMultistepScheduler` run it.
//!
//! The latents are VE (`x = x0 + sigma eps`, initial noise `sqrt(sigma_max^2 + 1)`). The UNet sees
//! `c_in x` with `c_in = 1 / sqrt(sigma^2 + sigma_data^2)` at timestep
//! `c_noise = log(sigma) / 4`, and its output becomes the data prediction
//! `c_skip x + c_out out`, with `c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)` and
//! `c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2)` (minus for v-prediction). The
//! sigmas run from `sigma_max` to `sigma_min` on Karras et al.'s rho ramp (or evenly in log
//! sigma), then 0. Scalars are float32, as diffusers computes them.

use super::schedule::Prediction;
use super::Sampler;
use crate::{Error, Result, Tensor};

/// Playground v2.5's scheduler, as diffusers' single-file loader writes it for a checkpoint with
/// `edm_mean` / `edm_std` (`loaders/single_file_utils.py`).
pub const PLAYGROUND_SCHEDULER: &str = r#"{
  "_class_name": "EDMDPMSolverMultistepScheduler",
  "algorithm_type": "dpmsolver++",
  "dynamic_thresholding_ratio": 0.995,
  "euler_at_final": false,
  "final_sigmas_type": "zero",
  "lower_order_final": true,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "rho": 7.0,
  "sample_max_value": 1.0,
  "sigma_data": 0.5,
  "sigma_max": 80.0,
  "sigma_min": 0.002,
  "solver_order": 2,
  "solver_type": "midpoint",
  "thresholding": false
}"#;

/// The EDM settings of a scheduler config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EdmConfig {
    pub sigma_min: f64,
    pub sigma_max: f64,
    pub sigma_data: f64,
    pub rho: f64,
    /// `sigma_schedule` "exponential": evenly spaced in log sigma (else Karras' rho ramp).
    pub exponential: bool,
}

impl EdmConfig {
    /// Playground v2.5's (and diffusers' defaults): sigma 0.002 to 80, sigma_data 0.5, rho 7.
    pub fn playground() -> EdmConfig {
        EdmConfig {
            sigma_min: 0.002,
            sigma_max: 80.0,
            sigma_data: 0.5,
            rho: 7.0,
            exponential: false,
        }
    }

    /// The `steps` sigmas of a run, largest first (the final 0 not included), float32.
    /// `ramp_f64`: the ramp is built in float64 and cast (EDMEulerScheduler), rather than in
    /// float32 throughout (EDMDPMSolverMultistepScheduler).
    pub(crate) fn sigmas(&self, steps: usize, ramp_f64: bool) -> Result<Vec<f32>> {
        if steps == 0 {
            return Err(Error::Config("steps must be at least 1".into()));
        }
        let (lo, hi) = (self.sigma_min, self.sigma_max);
        if self.exponential {
            // torch.linspace(log lo, log hi, n).exp().flip(0), in float32.
            let (a, b) = (lo.ln() as f32, hi.ln() as f32);
            return Ok((0..steps)
                .rev()
                .map(|i| super::schedule::linspace_f32(a, b, steps, i).exp())
                .collect());
        }
        let (lo_r, hi_r) = (lo.powf(1.0 / self.rho), hi.powf(1.0 / self.rho));
        Ok((0..steps)
            .map(|i| {
                if ramp_f64 {
                    let r = super::schedule::linspace_f64(0.0, 1.0, steps, i);
                    (hi_r + r * (lo_r - hi_r)).powf(self.rho) as f32
                } else {
                    let r = super::schedule::linspace_f32(0.0, 1.0, steps, i);
                    (hi_r as f32 + r * (lo_r - hi_r) as f32).powf(self.rho as f32)
                }
            })
            .collect())
    }

    /// The initial noise scale: sqrt(sigma_max^2 + 1).
    pub fn init_noise_sigma(&self) -> f64 {
        (self.sigma_max * self.sigma_max + 1.0).sqrt()
    }

    /// `c_in` at `sigma`.
    pub(crate) fn c_in(&self, sigma: f32) -> f64 {
        let sd = self.sigma_data as f32;
        (1.0 / (sigma * sigma + sd * sd).sqrt()) as f64
    }

    /// The timestep the UNet sees at `sigma`: log(sigma) / 4.
    pub(crate) fn c_noise(sigma: f32) -> f64 {
        (0.25 * sigma.ln()) as f64
    }

    /// `(c_skip, c_out)` at `sigma`: the data prediction is `c_skip x + c_out out`.
    pub(crate) fn c_skip_out(&self, prediction: Prediction, sigma: f32) -> (f64, f64) {
        let sd = self.sigma_data as f32;
        let d = sigma * sigma + sd * sd;
        let c_skip = sd * sd / d;
        let c_out = sigma * sd / d.sqrt();
        let c_out = match prediction {
            Prediction::Epsilon => c_out,
            Prediction::V => -c_out,
        };
        (c_skip as f64, c_out as f64)
    }

    /// The data prediction from the model output `out` at `sigma`.
    pub(crate) fn denoised(
        &self,
        prediction: Prediction,
        x: &Tensor,
        out: &Tensor,
        sigma: f32,
    ) -> Result<Tensor> {
        let (c_skip, c_out) = self.c_skip_out(prediction, sigma);
        x.scale(c_skip)?.add(&out.scale(c_out)?)
    }
}

/// Euler on EDM sigmas, as `EDMEulerScheduler` (s_churn 0): `x <- x + d (sigma' - sigma)` with
/// `d = (x - x0) / sigma`.
pub struct EdmEuler {
    edm: EdmConfig,
    prediction: Prediction,
    timesteps: Vec<f64>,
    /// steps + 1 values, the last 0.
    sigmas: Vec<f32>,
}

impl EdmEuler {
    pub fn new(edm: EdmConfig, prediction: Prediction, steps: usize) -> Result<EdmEuler> {
        let mut sigmas = edm.sigmas(steps, true)?;
        let timesteps = sigmas.iter().map(|&s| EdmConfig::c_noise(s)).collect();
        sigmas.push(0.0);
        Ok(EdmEuler {
            edm,
            prediction,
            timesteps,
            sigmas,
        })
    }
}

impl Sampler for EdmEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.edm.init_noise_sigma()
    }

    fn input_scale(&self, i: usize) -> f64 {
        self.edm.c_in(self.sigmas[i])
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        super::ve_add_noise(x0, noise, self.sigmas[index])
    }

    fn step(&mut self, i: usize, x: &Tensor, out: &Tensor) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = self.edm.denoised(self.prediction, x, out, sigma)?;
        let d = x.sub(&x0)?.scale(1.0 / sigma as f64)?;
        x.add(&d.scale((next - sigma) as f64)?)
    }
}
