//! Heun's second-order method on Euler's sigmas, as diffusers' `HeunDiscreteScheduler` runs it
//! ("Heun" in A1111 and ComfyUI): two UNet evaluations per step except the last.
//!
//! The timesteps interleave: `t0, t1, t1, t2, t2, ..., t_{n-1}, t_{n-1}` (2n - 1 evaluations),
//! with the sigmas `s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0`. A first-order evaluation at sigma s
//! takes the Euler step to the next sigma s' with slope `d = (x - x0) / s` and remembers it; the
//! following evaluation, at s', averages its own slope `(x' - x0') / s'` with the remembered one
//! and redoes the step from the remembered sample. The last step (to sigma 0) is Euler's alone.

use super::euler::{ve_input_scale, EulerDiscrete};
use super::schedule::Prediction;
use super::{Sampler, SchedulerConfig};
use crate::{Result, Tensor};

pub struct Heun {
    timesteps: Vec<f64>,
    /// The interleaved sigmas (float32 values), 2n long, the last 0.
    sigmas: Vec<f64>,
    init_sigma: f64,
    prediction: Prediction,
    /// x0's clamp (`clip_sample`, off when absent as in HeunDiscreteScheduler).
    clip: Option<f64>,
    /// After a first-order evaluation: its slope, its step and the sample it started from.
    pending: Option<(Tensor, f64, Tensor)>,
}

impl Heun {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Heun> {
        config.refuse_zero_snr("HeunDiscreteScheduler")?;
        let euler = EulerDiscrete::new(&config.without_euler_extras(), steps)?;
        let (ts, s) = (euler.timesteps(), euler.sigmas());
        let mut timesteps = vec![ts[0]];
        let mut sigmas = vec![s[0]];
        for (&t, &sigma) in ts[1..].iter().zip(&s[1..s.len() - 1]) {
            timesteps.extend([t, t]);
            sigmas.extend([sigma, sigma]);
        }
        sigmas.push(0.0);
        Ok(Heun {
            timesteps,
            sigmas,
            init_sigma: euler.init_noise_sigma(),
            prediction: config.prediction,
            clip: config.clip_sample_opt_in,
            pending: None,
        })
    }
}

impl Heun {
    /// The interleaved sigmas, the last 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }
}

impl Sampler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn input_scale(&self, i: usize) -> f64 {
        ve_input_scale(self.sigmas[i])
    }

    /// Two evaluations a step: skipping steps skips twice as many evaluations, and a run started
    /// part-way begins on a first-order evaluation (diffusers' `t_start * order`).
    fn order(&self) -> usize {
        2
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        super::ve_add_noise(x0, noise, self.sigmas[index] as f32)
    }

    fn step(&mut self, i: usize, x: &Tensor, out: &Tensor) -> Result<Tensor> {
        let clamp = |x0: Tensor| -> Result<Tensor> {
            match self.clip {
                Some(r) => x0.clamp_min(-r)?.scale(-1.0)?.clamp_min(-r)?.scale(-1.0),
                None => Ok(x0),
            }
        };
        match self.pending.take() {
            None => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = clamp(self.prediction.x0_ve(x, out, sigma as f32)?)?;
                let d = x.sub(&x0)?.scale(1.0 / sigma)?;
                // float32, as diffusers subtracts its float32 sigmas.
                let dt = (next as f32 - sigma as f32) as f64;
                let prev = x.add(&d.scale(dt)?)?;
                self.pending = Some((d, dt, x.clone()));
                Ok(prev)
            }
            Some((d_prev, dt, start)) => {
                let sigma = self.sigmas[i];
                let x0 = clamp(self.prediction.x0_ve(x, out, sigma as f32)?)?;
                let d = x.sub(&x0)?.scale(1.0 / sigma)?;
                let d = d_prev.add(&d)?.scale(0.5)?;
                start.add(&d.scale(dt)?)
            }
        }
    }
}
