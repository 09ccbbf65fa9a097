//! DDIM with eta = 0 (deterministic), as diffusers' `DDIMScheduler` with the same schedule,
//! including its `clip_sample` clamp of the predicted x0.

use super::schedule::Prediction;
use super::{Sampler, SchedulerConfig};
use crate::{Result, Tensor};

pub struct Ddim {
    timesteps: Vec<f64>,
    /// alpha_cumprod at each timestep and at the step after it.
    alphas: Vec<(f64, f64)>,
    /// The predicted x0 is clamped to ±this (`clip_sample`).
    clip: Option<f64>,
    prediction: Prediction,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Ddim> {
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
        x0.scale(a_prev.sqrt())?
            .add(&eps.scale((1.0 - a_prev).sqrt())?)
    }
}
