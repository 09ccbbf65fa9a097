//! DPM-Solver-2 on Euler's sigmas ("DPM2" and "DPM2 a" in A1111 and ComfyUI), as diffusers'
//! `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler` run it: two UNet evaluations
//! a step except the last.
//!
//! Step k goes from sigma `s_k` towards `s_(k+1)` (ancestral: towards `sigma_down`, then adds
//! noise of `sigma_up`, as Euler ancestral computes them). Its first evaluation, at `s_k`, takes
//! an Euler step to the geometric mean `m_k` of the two ends and remembers where it started; the
//! second evaluation, at `m_k`, takes the whole step from that start with its own slope
//! `(x - x0) / m_k`. The midpoint is `exp(lerp(log a, log b, 1/2))` in float32, as diffusers
//! computes it (PyTorch's lerp at weight 1/2 is `b - (b - a) / 2`). The last step has only its
//! first evaluation, whose midpoint is 0: an Euler step to the end.
//!
//! The UNet sees `t_0, t(m_0), t_1, t(m_1), ..., t_(n-1)`, the midpoints' timesteps interpolated
//! in float32 on the log-sigma table. With Karras sigmas the whole-step timesteps are rounded.

use super::euler::{ve_init_noise_sigma, ve_input_scale};
use super::ramps::Ramp;
use super::schedule::{sigma_schedule, sigma_to_t, sigma_to_t_f32, Prediction, SigmaSchedule};
use super::{Noise, NoiseStream, Sampler, SchedulerConfig};
use crate::{Result, Tensor};

pub struct Kdpm2 {
    timesteps: Vec<f64>,
    /// Per step k: `s_k` (float32), with a final 0.
    sigmas: Vec<f32>,
    /// Per step k: the midpoint `m_k`, 0 for the last step.
    mids: Vec<f32>,
    /// Per step k (ancestral only): where the deterministic part ends and the noise added.
    down_up: Option<Vec<(f32, f32)>>,
    init_sigma: f64,
    prediction: Prediction,
    noise: NoiseStream,
    /// After a first evaluation: the sample it started from.
    start: Option<Tensor>,
}

/// PyTorch's float32 `a.log().lerp(b.log(), 0.5).exp()`.
fn geometric_mid(a: f32, b: f32) -> f32 {
    let (la, lb) = (a.ln(), b.ln());
    (lb - (lb - la) * 0.5).exp()
}

impl Kdpm2 {
    /// DPM2; with `ancestral` Some(noise), DPM2 ancestral drawing its noise from it.
    pub fn new(config: &SchedulerConfig, steps: usize, ancestral: Option<&Noise>) -> Result<Kdpm2> {
        config.refuse_zero_snr("KDPM2DiscreteScheduler")?;
        let SigmaSchedule {
            timesteps: mut whole,
            sigmas: mut spaced,
            log_table,
        } = sigma_schedule(config, steps, false)?;
        if let Some(ramp) = config
            .ramp
            .sigmas(spaced[spaced.len() - 1], spaced[0], steps)
        {
            // Karras' timesteps are rounded; the other ramps' stay fractional.
            whole = ramp
                .iter()
                .map(|&s| match config.ramp {
                    Ramp::Karras => sigma_to_t(s, &log_table).round_ties_even(),
                    _ => sigma_to_t(s, &log_table),
                })
                .collect();
            spaced = ramp;
        }
        let mut sigmas: Vec<f32> = spaced.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        let down_up = ancestral.map(|_| {
            (0..steps)
                .map(|k| {
                    let (s0, s1) = (sigmas[k], sigmas[k + 1]);
                    let up = (s1 * s1 * (s0 * s0 - s1 * s1) / (s0 * s0)).sqrt();
                    let down = if k + 1 == steps {
                        0.0
                    } else {
                        (s1 * s1 - up * up).sqrt()
                    };
                    (down, up)
                })
                .collect::<Vec<_>>()
        });
        let mids: Vec<f32> = (0..steps)
            .map(|k| match &down_up {
                _ if k + 1 == steps => 0.0,
                Some(du) => geometric_mid(sigmas[k], du[k].0),
                None => geometric_mid(sigmas[k + 1], sigmas[k]),
            })
            .collect();
        let mut timesteps = Vec::with_capacity(2 * steps - 1);
        for k in 0..steps {
            // float32 timesteps unless a ramp made them float64 (the UNet casts to float32).
            timesteps.push(if config.ramp != Ramp::Spaced {
                whole[k]
            } else {
                whole[k] as f32 as f64
            });
            if k + 1 < steps {
                timesteps.push(sigma_to_t_f32(mids[k], &log_table));
            }
        }
        let spaced_f32: Vec<f64> = sigmas.iter().map(|&s| s as f64).collect();
        Ok(Kdpm2 {
            timesteps,
            init_sigma: ve_init_noise_sigma(&spaced_f32, config.spacing),
            sigmas,
            mids,
            down_up,
            prediction: config.prediction,
            noise: NoiseStream::new(ancestral.unwrap_or(&Noise::Seed(0))),
            start: None,
        })
    }
}

impl Sampler for Kdpm2 {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn input_scale(&self, i: usize) -> f64 {
        let k = i / 2;
        ve_input_scale(if i % 2 == 0 {
            self.sigmas[k]
        } else {
            self.mids[k]
        } as f64)
    }

    /// Two evaluations a step, as Heun.
    fn order(&self) -> usize {
        2
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        // diffusers' interleaved sigmas hold s_k at 2k and s_(k+1) at 2k + 1.
        super::ve_add_noise(x0, noise, self.sigmas[index.div_ceil(2)])
    }

    fn step(&mut self, i: usize, x: &Tensor, out: &Tensor) -> Result<Tensor> {
        let k = i / 2;
        let (sigma, mid) = (self.sigmas[k], self.mids[k]);
        match self.start.take() {
            None => {
                let x0 = self.prediction.x0_ve(x, out, sigma)?;
                let d = x.sub(&x0)?.scale(1.0 / sigma as f64)?;
                self.start = Some(x.clone());
                x.add(&d.scale((mid - sigma) as f64)?)
            }
            Some(start) => {
                let x0 = self.prediction.x0_ve(x, out, mid)?;
                let d = x.sub(&x0)?.scale(1.0 / mid as f64)?;
                match &self.down_up {
                    None => start.add(&d.scale((self.sigmas[k + 1] - sigma) as f64)?),
                    Some(du) => {
                        let (down, up) = du[k];
                        let prev = start.add(&d.scale((down - sigma) as f64)?)?;
                        let noise = self.noise.next_like(x)?;
                        prev.add(&noise.scale(up as f64)?)
                    }
                }
            }
        }
    }
}
