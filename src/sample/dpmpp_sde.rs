//! DPM-Solver++ (stochastic, second order): "DPM++ SDE" in A1111 and ComfyUI, as diffusers'
//! `DPMSolverSDEScheduler` runs it (k-diffusion's `sample_dpmpp_sde`, r = 1/2, eta 1): two UNet
//! evaluations a step except the last.
//!
//! In log-sigma time `t = -log sigma`, step k goes from `t_k` to `t_(k+1)` through the midpoint
//! `t_m = t_k + (t_(k+1) - t_k) / 2`. Each half is an ancestral DPM-Solver++(1) step from the
//! step's start: to `sigma_down` of the target with `x0` from the current evaluation, then
//! `sigma_up` of Brownian noise. The first evaluation (at `t_k`) goes to the midpoint, the second
//! (at the midpoint) redoes the whole step. The last step is Euler's to sigma 0. Scalars are
//! float32, as diffusers computes them.
//!
//! The noise is a Brownian motion W in sigma, queried as `(W(s_k) - W(b)) / sqrt(s_k - b)` over
//! `[b, s_k]` for `b` the midpoint's sigma, then the next sigma. diffusers samples W with torchsde
//! (a Brownian interval seeded apart from the pipeline's generator, which no other program can
//! replay); here it is sampled exactly from two N(0, 1) draws a step: the first answer is `z1`,
//! the second `(z1 sqrt(d1) + z2 sqrt(d2)) / sqrt(d1 + d2)` with `d1 = s_k - s_m` and
//! `d2 = s_m - s_(k+1)`: the increment over the whole interval given the one over its first part.
//! Steps cover disjoint intervals, so their draws are independent. The reference replays the
//! same construction (`gen_samplers.py`).

use super::euler::{ve_init_noise_sigma, ve_input_scale};
use super::schedule::{sigma_schedule, sigma_to_t, Prediction, SigmaSchedule};
use super::{Noise, NoiseStream, Sampler, SchedulerConfig};
use crate::{Result, Tensor};

pub struct DpmPPSde {
    timesteps: Vec<f64>,
    /// Per step k: `s_k` (float32), with a final 0.
    sigmas: Vec<f32>,
    init_sigma: f64,
    prediction: Prediction,
    noise: NoiseStream,
    /// After a first evaluation: the sample it started from and its noise draw `z1`.
    pending: Option<(Tensor, Tensor)>,
}

impl DpmPPSde {
    pub fn new(config: &SchedulerConfig, steps: usize, noise: &Noise) -> Result<DpmPPSde> {
        config.refuse_zero_snr("DPMSolverSDEScheduler")?;
        let SigmaSchedule {
            mut timesteps,
            mut sigmas,
            log_table,
        } = sigma_schedule(config, steps, true)?;
        if let Some(ramp) = config
            .ramp
            .sigmas(sigmas[sigmas.len() - 1], sigmas[0], steps)
        {
            timesteps = ramp.iter().map(|&s| sigma_to_t(s, &log_table)).collect();
            sigmas = ramp;
        }
        // The midpoints' timesteps, from the float64 sigmas (`_second_order_timesteps`).
        let mut all = Vec::with_capacity(2 * steps - 1);
        for k in 0..steps {
            all.push(timesteps[k]);
            if k + 1 < steps {
                let (t0, t1) = (-sigmas[k].ln(), -sigmas[k + 1].ln());
                let mid = (-(t0 + (t1 - t0) * 0.5)).exp();
                all.push(sigma_to_t(mid, &log_table));
            }
        }
        let mut sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        let as_f64: Vec<f64> = sigmas.iter().map(|&s| s as f64).collect();
        Ok(DpmPPSde {
            timesteps: all,
            init_sigma: ve_init_noise_sigma(&as_f64, config.spacing),
            sigmas,
            prediction: config.prediction,
            noise: NoiseStream::new(noise),
            pending: None,
        })
    }

    /// Step k's log-sigma times in float32: start, midpoint, end.
    fn times(&self, k: usize) -> (f32, f32, f32) {
        let (t, t_next) = (-self.sigmas[k].ln(), -self.sigmas[k + 1].ln());
        (t, t + (t_next - t) * 0.5, t_next)
    }

    /// The ancestral DPM-Solver++(1) move from `x` at log-sigma `t` towards `t_to` with `x0`:
    /// the deterministic part and `sigma_up`.
    fn ancestral(x: &Tensor, x0: &Tensor, t: f32, t_to: f32) -> Result<(Tensor, f32)> {
        let (from, to) = ((-t).exp(), (-t_to).exp());
        let up = to.min((to * to * (from * from - to * to) / (from * from)).sqrt());
        let down = (to * to - up * up).sqrt();
        let t_down = -down.ln();
        let ratio = (-t_down).exp() / (-t).exp();
        let prev = x
            .scale(ratio as f64)?
            .sub(&x0.scale((t - t_down).exp_m1() as f64)?)?;
        Ok((prev, up))
    }
}

impl Sampler for DpmPPSde {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn input_scale(&self, i: usize) -> f64 {
        let k = i / 2;
        if i % 2 == 0 {
            ve_input_scale(self.sigmas[k] as f64)
        } else {
            ve_input_scale((-self.times(k).1).exp() as f64)
        }
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
        let (sigma, next) = (self.sigmas[k], self.sigmas[k + 1]);
        let (t, t_mid, t_next) = self.times(k);
        match self.pending.take() {
            None if next == 0.0 => {
                let x0 = self.prediction.x0_ve(x, out, sigma)?;
                let d = x.sub(&x0)?.scale(1.0 / sigma as f64)?;
                x.add(&d.scale(-sigma as f64)?)
            }
            None => {
                let x0 = self.prediction.x0_ve(x, out, sigma)?;
                let (prev, up) = Self::ancestral(x, &x0, t, t_mid)?;
                let z1 = self.noise.next_like(x)?;
                let prev = prev.add(&z1.scale(up as f64)?)?;
                self.pending = Some((x.clone(), z1));
                Ok(prev)
            }
            Some((start, z1)) => {
                let x0 = self.prediction.x0_ve(x, out, (-t_mid).exp())?;
                let (prev, up) = Self::ancestral(&start, &x0, t, t_next)?;
                let z2 = self.noise.next_like(x)?;
                // The Brownian increment over [s_(k+1), s_k] given the one over [s_m, s_k].
                let (s, m, e) = (
                    (-t).exp() as f64,
                    (-t_mid).exp() as f64,
                    (-t_next).exp() as f64,
                );
                let (d1, d2) = (s - m, m - e);
                let w = z1
                    .scale(d1.sqrt())?
                    .add(&z2.scale(d2.sqrt())?)?
                    .scale(1.0 / (d1 + d2).sqrt())?;
                prev.add(&w.scale(up as f64)?)
            }
        }
    }
}
