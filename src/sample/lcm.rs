//! The latent consistency sampler, as diffusers' `LCMScheduler` runs it: the few-step sampler of
//! LCM-distilled models and of LCM-LoRA (usually 4-8 steps at guidance 1-2).
//!
//! Its timesteps come from the distillation schedule: `original_inference_steps` (50) evenly
//! spaced timesteps `k (j + 1) - 1` with `k = T / 50`, largest first, of which `steps` are taken
//! at evenly spaced indices. Each step predicts x0 from epsilon, applies the consistency boundary
//! condition `denoised = c_out x0 + c_skip x` with `c_skip = s^2 / (u^2 + s^2)`,
//! `c_out = u / sqrt(u^2 + s^2)` (`u` = timestep × `timestep_scaling`, `s` = 0.5), and re-noises
//! the result to the next timestep with fresh noise; the last step returns `denoised` itself.
//! The coefficients are float32 as diffusers computes them.

use super::schedule::Prediction;
use super::{Noise, NoiseStream, Sampler, SchedulerConfig};
use crate::{Error, Result, Tensor};

pub struct Lcm {
    timesteps: Vec<f64>,
    /// alpha_cumprod (float32) at each timestep and at the next one (the same at the last).
    alphas: Vec<(f32, f32)>,
    /// (c_skip, c_out) at each timestep.
    scalings: Vec<(f32, f32)>,
    clip: Option<f64>,
    noise: NoiseStream,
    prediction: Prediction,
}

/// The distillation schedule LCMScheduler and TCDScheduler share: `original_inference_steps`
/// evenly spaced timesteps `k (j + 1) - 1` with `k = T / original`, largest first, of which
/// `steps` are taken at the indices `floor(linspace(0, original, steps, endpoint=False))`.
/// `what` names the sampler in errors.
pub(crate) fn distillation_timesteps(
    config: &SchedulerConfig,
    steps: usize,
    what: &str,
) -> Result<Vec<usize>> {
    let n = config.num_train_timesteps;
    let original = config.lcm_original_steps;
    if original == 0 || original > n {
        return Err(Error::Config(format!(
            "{what}: original_inference_steps {original} must be in 1..={n}"
        )));
    }
    if steps == 0 || steps > original {
        return Err(Error::Config(format!(
            "{what} takes 1 to {original} steps (its config's original_inference_steps), got \
             {steps}"
        )));
    }
    let k = n / original;
    let origin: Vec<usize> = (1..=original).rev().map(|j| j * k - 1).collect();
    Ok((0..steps)
        .map(|i| origin[(i as f64 * (original as f64 / steps as f64)).floor() as usize])
        .collect())
}

impl Lcm {
    pub fn new(config: &SchedulerConfig, steps: usize, noise: &Noise) -> Result<Lcm> {
        let timesteps = distillation_timesteps(config, steps, "LCM")?;
        let ac = config.alphas_cumprod_f32();
        let alphas = (0..steps)
            .map(|i| {
                let next = timesteps.get(i + 1).copied().unwrap_or(timesteps[i]);
                (ac[timesteps[i]], ac[next])
            })
            .collect();
        let sigma_data = 0.5f32;
        let scalings = timesteps
            .iter()
            .map(|&t| {
                let u = (t as f64 * config.lcm_timestep_scaling) as f32;
                let c_skip = sigma_data * sigma_data / (u * u + sigma_data * sigma_data);
                let c_out = u / (u * u + sigma_data * sigma_data).sqrt();
                (c_skip, c_out)
            })
            .collect();
        Ok(Lcm {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            alphas,
            scalings,
            clip: config.clip_sample_opt_in,
            noise: NoiseStream::new(noise),
            prediction: config.prediction,
        })
    }
}

impl Sampler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        super::vp_add_noise(x0, noise, self.alphas[index].0)
    }

    fn step(&mut self, i: usize, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (a, a_next) = self.alphas[i];
        let (c_skip, c_out) = self.scalings[i];
        let x0 = self.prediction.x0_vp(x, eps, a.sqrt(), (1.0 - a).sqrt())?; // (B, C, H, W)
        let x0 = match self.clip {
            Some(r) => x0.clamp_min(-r)?.scale(-1.0)?.clamp_min(-r)?.scale(-1.0)?,
            None => x0,
        };
        let denoised = x0.scale(c_out as f64)?.add(&x.scale(c_skip as f64)?)?;
        if i + 1 == self.timesteps.len() {
            return Ok(denoised);
        }
        let z = self.noise.next_like(x)?;
        denoised
            .scale(a_next.sqrt() as f64)?
            .add(&z.scale((1.0 - a_next).sqrt() as f64)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timesteps diffusers' `LCMScheduler().set_timesteps(n)` gives for n = 4, 1 and 7.
    #[test]
    fn timesteps_follow_the_distillation_schedule() {
        let c = SchedulerConfig::default();
        let lcm = Lcm::new(&c, 4, &Noise::default()).unwrap();
        assert_eq!(lcm.timesteps(), [999.0, 759.0, 499.0, 259.0]);
        let one = Lcm::new(&c, 1, &Noise::default()).unwrap();
        assert_eq!(one.timesteps(), [999.0]);
        let seven = Lcm::new(&c, 7, &Noise::default()).unwrap();
        assert_eq!(
            seven.timesteps(),
            [999.0, 859.0, 719.0, 579.0, 439.0, 299.0, 159.0]
        );
        assert!(Lcm::new(&c, 51, &Noise::default()).is_err());
        assert!(Lcm::new(&c, 0, &Noise::default()).is_err());
    }
}
