//! DDIM as diffusers' `DDIMScheduler` runs it, including its `clip_sample` clamp of the predicted
//! x0: deterministic at eta 0 (the default), and with the pipeline's `eta` above 0 each step
//! (the last included) adds fresh noise of standard deviation `eta sqrt(var)`,
//! `var = (1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)`, taking it out of the direction
//! term: `x' = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std z` (float32
//! coefficients, as diffusers computes them from its float32 table).

use super::schedule::Prediction;
use super::{Noise, NoiseStream, Sampler, SchedulerConfig};
use crate::{Error, Result, Tensor};

pub struct Ddim {
    timesteps: Vec<f64>,
    /// alpha_cumprod at each timestep and at the step after it.
    alphas: Vec<(f64, f64)>,
    /// The predicted x0 is clamped to ±this (`clip_sample`).
    clip: Option<f64>,
    prediction: Prediction,
    /// eta above 0, and where its noise comes from.
    eta: Option<(f32, NoiseStream)>,
}

impl Ddim {
    /// Deterministic DDIM (eta 0).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Ddim> {
        Self::with_eta(config, steps, 0.0, &Noise::default())
    }

    /// DDIM at `eta` (0 to 1; diffusers accepts more, which only makes the noise larger), its
    /// step noise from `noise` when eta is above 0.
    pub fn with_eta(
        config: &SchedulerConfig,
        steps: usize,
        eta: f64,
        noise: &Noise,
    ) -> Result<Ddim> {
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(Error::Config(format!(
                "DDIM's eta must be 0 or more, got {eta}"
            )));
        }
        let ac = config.alphas_cumprod_f32();
        let ts = config.timesteps(steps)?;
        // diffusers indexes its table with these; past its end it fails, and so does this.
        if let Some(&t) = ts.iter().find(|&&t| t >= ac.len()) {
            return Err(crate::Error::Config(format!(
                "DDIM timestep {t} outside the {}-step schedule ({steps} steps, steps_offset {})",
                ac.len(),
                config.steps_offset
            )));
        }
        let ratio = config.num_train_timesteps / steps;
        let last = if config.set_alpha_to_one {
            1.0
        } else {
            ac[0] as f64
        };
        let alphas = ts
            .iter()
            .map(|&t| {
                let prev = t as i64 - ratio as i64;
                let a_prev = if prev >= 0 {
                    ac[prev as usize] as f64
                } else {
                    last
                };
                (ac[t.min(ac.len() - 1)] as f64, a_prev)
            })
            .collect();
        Ok(Ddim {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            alphas,
            clip: config.clip_sample,
            prediction: config.prediction,
            eta: (eta > 0.0).then(|| (eta as f32, NoiseStream::new(noise))),
        })
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        super::vp_add_noise(x0, noise, self.alphas[index].0 as f32)
    }

    fn step(&mut self, i: usize, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (a, a_prev) = self.alphas[i];
        let (x0, eps) = match self.prediction {
            Prediction::Epsilon => (
                x.sub(&eps.scale((1.0 - a).sqrt())?)?
                    .scale(1.0 / a.sqrt())?,
                eps.clone(),
            ),
            Prediction::V => {
                // float32 square roots of the float32 table, as diffusers takes them.
                let (sa, sb) = ((a as f32).sqrt(), (1.0 - a as f32).sqrt());
                let v = eps;
                (
                    Prediction::V.x0_vp(x, v, sa, sb)?,
                    Prediction::V.eps_vp(x, v, sa, sb)?,
                )
            }
        };
        // diffusers keeps epsilon as predicted when it clamps x0 (use_clipped_model_output off).
        let x0 = match self.clip {
            Some(r) => x0.clamp_min(-r)?.scale(-1.0)?.clamp_min(-r)?.scale(-1.0)?,
            None => x0,
        };
        let Some((eta, noise)) = &mut self.eta else {
            return x0
                .scale(a_prev.sqrt())?
                .add(&eps.scale((1.0 - a_prev).sqrt())?);
        };
        let (a, a_prev) = (a as f32, a_prev as f32);
        let variance = ((1.0 - a_prev) / (1.0 - a)) * (1.0 - a / a_prev);
        let std = *eta * variance.sqrt();
        let z = noise.next_like(x)?;
        x0.scale(a_prev.sqrt() as f64)?
            .add(&eps.scale((1.0 - a_prev - std * std).sqrt() as f64)?)?
            .add(&z.scale(std as f64)?)
    }
}
