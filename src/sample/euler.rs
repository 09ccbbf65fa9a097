//! Euler discrete sampling as diffusers' `EulerDiscreteScheduler` does it (s_churn 0, linear
//! sigma interpolation, a final sigma of zero, optionally Karras sigmas):
//! x <- x + eps * (sigma_{i+1} - sigma_i).

use super::ramps::Ramp;
use super::schedule::{sigma_schedule, sigma_to_t, Prediction, SigmaSchedule, Spacing};
use super::{Noise, NoiseStream, Sampler, SchedulerConfig};
use crate::{Error, Result, Tensor};

/// The UNet input scale of VE latents at `sigma`: diffusers divides by (sigma^2 + 1)^0.5
/// computed on a float32 sigma.
pub(crate) fn ve_input_scale(sigma: f64) -> f64 {
    let s = sigma as f32;
    1.0 / (s * s + 1.0).sqrt() as f64
}

/// `init_noise_sigma` of the sigma-table schedulers: the largest sigma, or sqrt(sigma^2 + 1) of
/// it (float32) under `leading` spacing.
pub(crate) fn ve_init_noise_sigma(sigmas: &[f64], spacing: Spacing) -> f64 {
    let max = sigmas.iter().cloned().fold(0.0, f64::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => {
            let m = max as f32;
            (m * m + 1.0).sqrt() as f64
        }
    }
}

pub struct EulerDiscrete {
    timesteps: Vec<f64>,
    /// steps + 1 values, the last one 0.
    sigmas: Vec<f64>,
    init_sigma: f64,
    prediction: Prediction,
}

impl EulerDiscrete {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<EulerDiscrete> {
        let SigmaSchedule {
            timesteps,
            mut sigmas,
            log_table,
        } = sigma_schedule(config, steps, false)?;
        // The UNet sees float32 timesteps (fractional for `linspace` spacing).
        let mut timesteps: Vec<f64> = timesteps.iter().map(|&t| t as f32 as f64).collect();
        let extras = config.euler;
        if extras.continuous {
            return Err(Error::Config(
                "scheduler config: EulerDiscreteScheduler with timestep_type \"continuous\" (the \
                 UNet sees 0.25 log sigma) is not implemented; an EDM model's folder names \
                 EDMEulerScheduler"
                    .into(),
            ));
        }
        let (lo, hi) = (
            extras.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]),
            extras.sigma_max.unwrap_or(sigmas[0]),
        );
        if let Some(ramp) = config.ramp.sigmas(lo, hi, steps) {
            // A ramp spans the spaced sigmas (not the whole table, unlike DPM++), and each
            // sigma's timestep stays fractional.
            timesteps = ramp
                .iter()
                .map(|&s| sigma_to_t(s, &log_table) as f32 as f64)
                .collect();
            sigmas = ramp;
        }
        let mut sigmas: Vec<f64> = sigmas.iter().map(|&s| s as f32 as f64).collect();
        // final_sigmas_type: 0, or the table's smallest sigma in float32.
        sigmas.push(match extras.final_sigma_min {
            true => {
                let a0 = config.sigma_alphas_cumprod_f32()[0];
                ((1.0 - a0) / a0).sqrt() as f64
            }
            false => 0.0,
        });
        let init_sigma = ve_init_noise_sigma(&sigmas, config.spacing);
        Ok(EulerDiscrete {
            timesteps,
            sigmas,
            init_sigma,
            prediction: config.prediction,
        })
    }

    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Sampler for EulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn input_scale(&self, i: usize) -> f64 {
        ve_input_scale(self.sigmas[i])
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        super::ve_add_noise(x0, noise, self.sigmas[index] as f32)
    }

    fn step(&mut self, i: usize, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        // x0 = x - sigma eps; d = (x - x0) / sigma = eps; the two forms differ only in rounding,
        // and diffusers computes through x0, so do the same.
        let sigma = self.sigmas[i];
        let x0 = self.prediction.x0_ve(x, eps, sigma as f32)?;
        let d = x.sub(&x0)?.scale(1.0 / sigma)?;
        x.add(&d.scale(self.sigmas[i + 1] - sigma)?)
    }
}

/// Euler ancestral ("Euler a"), as diffusers' `EulerAncestralDiscreteScheduler`: Euler's
/// schedule (never Karras sigmas: that scheduler has no such option), each step going down to
/// `sigma_down` and adding fresh noise of `sigma_up`, with
/// `sigma_up = sqrt(s1^2 (s0^2 - s1^2) / s0^2)` and `sigma_down = sqrt(s1^2 - sigma_up^2)`,
/// in float32 as diffusers computes them.
pub struct EulerAncestral {
    euler: EulerDiscrete,
    noise: NoiseStream,
}

impl EulerAncestral {
    pub fn new(config: &SchedulerConfig, steps: usize, noise: &Noise) -> Result<EulerAncestral> {
        let plain = SchedulerConfig {
            ramp: Ramp::Spaced,
            ..config.without_euler_extras()
        };
        Ok(EulerAncestral {
            euler: EulerDiscrete::new(&plain, steps)?,
            noise: NoiseStream::new(noise),
        })
    }
}

impl Sampler for EulerAncestral {
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

    fn step(&mut self, i: usize, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (s0, s1) = (self.euler.sigmas[i] as f32, self.euler.sigmas[i + 1] as f32);
        let up = (s1 * s1 * (s0 * s0 - s1 * s1) / (s0 * s0)).sqrt();
        let down = (s1 * s1 - up * up).sqrt();
        let x0 = self.euler.prediction.x0_ve(x, eps, s0)?;
        let d = x.sub(&x0)?.scale(1.0 / s0 as f64)?;
        let prev = x.add(&d.scale((down - s0) as f64)?)?;
        let noise = self.noise.next_like(x)?;
        prev.add(&noise.scale(up as f64)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SafeTensorsFile;

    #[test]
    fn timesteps_and_sigmas_match_the_pipeline_reference() {
        let dir = crate::test_fixtures::tiny();
        let f = SafeTensorsFile::open(dir.join("reference/pipeline.safetensors")).unwrap();
        let steps: usize = f.metadata()["steps"].parse().unwrap();
        let cfg =
            SchedulerConfig::from_file(&dir.join("sdxl/scheduler/scheduler_config.json")).unwrap();
        let e = EulerDiscrete::new(&cfg, steps).unwrap();
        assert_eq!(
            e.timesteps(),
            f.tensor("timesteps")
                .unwrap()
                .to_vec_f64()
                .unwrap()
                .as_slice()
        );
        let want = f.tensor("sigmas").unwrap().to_vec_f64().unwrap();
        assert_eq!(want.len(), e.sigmas().len());
        for (a, b) in e.sigmas().iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "sigma {a} vs reference {b}"
            );
        }
    }
}
