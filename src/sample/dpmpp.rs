//! DPM-Solver++ ("DPM++ 2M", "DPM++ 3M", their SDE forms and Karras variants in A1111 and
//! ComfyUI), as diffusers' `DPMSolverMultistepScheduler` runs it with algorithm_type
//! "dpmsolver++" or "sde-dpmsolver++", solver_order 1-3 (second order by midpoint or heun) and a
//! final sigma of zero; optionally on Karras sigmas (`use_karras_sigmas`, rho 7).
//!
//! The latents stay in the VP parametrisation (initial noise sigma 1, no input scaling). Each step
//! turns epsilon into the data prediction `x0 = (x - sigma_s eps) / alpha_s` and moves along
//! `lambda = log(alpha / sigma)` by `h`, extrapolating from the previous steps' x0:
//! - first order (the first step, the last, and order 1):
//!   `x' = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0`;
//! - second order adds `D1 = (x0 - x0_prev) h / h_prev`, weighted by `-alpha_t (e^-h - 1) / 2`
//!   (midpoint) or `alpha_t ((e^-h - 1) / h + 1)` (heun);
//! - third order (from the third step, except the last two of runs under 15 steps, with
//!   `lower_order_final`) combines the last three x0 into D1 and D2, weighted by
//!   `alpha_t ((e^-h - 1) / h + 1)` and `-alpha_t ((e^-h - 1 + h) / h^2 - 1/2)`.
//!
//! The SDE form scales x by `e^-h` instead, uses `1 - e^-2h` in the weights and adds
//! `sigma_t sqrt(1 - e^-2h) z` with fresh noise z. The coefficients are float32 scalars, as
//! diffusers computes them from its float32 sigma table.
//!
//! On an EDM model (`EDMDPMSolverMultistepScheduler`) the same steps run on VE latents
//! (alpha 1, sigma the EDM sigma, so lambda = -log sigma), with EDM's sigmas, input scale,
//! timesteps and data prediction ([`super::edm`]).

use super::edm::EdmConfig;
use super::ramps::Ramp;
use super::schedule::{multistep_schedule, Prediction};
use super::{Noise, NoiseStream, Sampler, SchedulerConfig};
use crate::{Error, Result, Tensor};

pub struct DpmSolverPP {
    order: usize,
    /// `sde-dpmsolver++`: each step injects fresh noise.
    sde: Option<NoiseStream>,
    /// Second order by heun's weights instead of the midpoint's.
    heun: bool,
    lower_order_final: bool,
    prediction: Prediction,
    timesteps: Vec<f64>,
    /// The VE sigmas sqrt((1 - abar) / abar) at each timestep, then 0; float32 as diffusers.
    sigmas: Vec<f32>,
    /// The data predictions of the last `order - 1` steps, newest last.
    history: Vec<Tensor>,
    /// Steps taken so far (diffusers' `lower_order_nums`, uncapped): the warm-up counts from the
    /// first step run, not from the schedule's start.
    taken: usize,
    /// An EDM model's parametrisation (VE latents, preconditioned UNet); None for VP models.
    edm: Option<EdmConfig>,
}

/// (alpha, sigma) of the VP form for a VE sigma, in float32.
pub(crate) fn alpha_sigma(s: f32) -> (f32, f32) {
    let a = 1.0 / (s * s + 1.0).sqrt();
    (a, s * a)
}

/// lambda = log(alpha) - log(sigma); +inf at sigma 0.
pub(crate) fn lambda(s: f32) -> f32 {
    let (a, sg) = alpha_sigma(s);
    a.ln() - sg.ln()
}

/// `a * x + b * y` with float32 weights.
pub(crate) fn axpby(a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    x.scale(a as f64)?.add(&y.scale(b as f64)?)
}

impl DpmSolverPP {
    /// Deterministic DPM-Solver++ of `order` (1-3), with the config's second-order solver type.
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        order: usize,
        ramp: Ramp,
    ) -> Result<DpmSolverPP> {
        Self::with_noise(config, steps, order, ramp, None)
    }

    /// The SDE form (`algorithm_type` "sde-dpmsolver++") when `sde_noise` is given.
    pub fn with_noise(
        config: &SchedulerConfig,
        steps: usize,
        order: usize,
        ramp: Ramp,
        sde_noise: Option<&Noise>,
    ) -> Result<DpmSolverPP> {
        if !config.dpm_unsupported.is_empty() {
            return Err(Error::Config(format!(
                "scheduler config: DPM-Solver++ is implemented as (sde-)dpmsolver++ of order 1-3 \
                 with a final sigma of zero; this config asks for {}",
                config.dpm_unsupported.join(", ")
            )));
        }
        if !(1..=3).contains(&order) {
            return Err(Error::Config(format!(
                "DPM-Solver++ has orders 1, 2 and 3, not {order}"
            )));
        }
        let (timesteps, sigmas) = match config.edm {
            None => multistep_schedule(config, steps, ramp, [None; 2], "DPM-Solver++")?,
            Some(edm) => {
                if sde_noise.is_some() && order == 3 {
                    return Err(Error::Config(
                        "EDMDPMSolverMultistepScheduler has no third-order SDE step (diffusers \
                         fails on it); choose dpmpp-2m-sde or dpmpp-3m for this EDM model"
                            .into(),
                    ));
                }
                // `-karras` names ask for Karras' ramp whatever the config's sigma_schedule.
                let edm = EdmConfig {
                    exponential: edm.exponential && ramp != Ramp::Karras,
                    ..edm
                };
                let mut sigmas = edm.sigmas(steps, false)?;
                let timesteps = sigmas.iter().map(|&s| EdmConfig::c_noise(s)).collect();
                sigmas.push(0.0);
                (timesteps, sigmas)
            }
        };
        Ok(DpmSolverPP {
            edm: config.edm.map(|e| EdmConfig {
                exponential: e.exponential && ramp != Ramp::Karras,
                ..e
            }),
            order,
            sde: sde_noise.map(NoiseStream::new),
            heun: config.dpm_heun,
            lower_order_final: config.lower_order_final,
            prediction: config.prediction,
            timesteps,
            sigmas,
            history: Vec::new(),
            taken: 0,
        })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// (alpha, sigma) at VE sigma `s`: the VP form, or (1, s) on an EDM model.
    fn alpha_sigma(&self, s: f32) -> (f32, f32) {
        match self.edm {
            None => alpha_sigma(s),
            Some(_) => (1.0, s),
        }
    }

    /// lambda = log(alpha) - log(sigma) at VE sigma `s`; +inf at sigma 0.
    fn lambda(&self, s: f32) -> f32 {
        match self.edm {
            None => lambda(s),
            Some(_) => -s.ln(),
        }
    }

    /// The order step `i` runs at: diffusers' warm-up from first order over the steps taken,
    /// first order at the schedule's end (the final sigma is zero), and second order one step
    /// before the end of short schedules.
    fn order_at(&self, i: usize) -> usize {
        let n = self.timesteps.len();
        let short = self.lower_order_final && n < 15;
        if self.order == 1 || self.taken == 0 || i + 1 == n {
            1
        } else if self.order == 2 || self.taken == 1 || (short && i + 2 == n) {
            2
        } else {
            3
        }
    }
}

impl Sampler for DpmSolverPP {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.edm.map_or(1.0, |e| e.init_noise_sigma())
    }

    fn input_scale(&self, i: usize) -> f64 {
        self.edm.map_or(1.0, |e| e.c_in(self.sigmas[i]))
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let (a, s) = self.alpha_sigma(self.sigmas[index]);
        axpby(a, x0, s, noise)
    }

    fn step(&mut self, i: usize, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (s_s, s_t) = (self.sigmas[i], self.sigmas[i + 1]);
        let ((a_s, sig_s), (a_t, sig_t)) = (self.alpha_sigma(s_s), self.alpha_sigma(s_t));
        let x0 = match &self.edm {
            None => self.prediction.x0_vp(x, eps, a_s, sig_s)?, // (B, C, H, W)
            Some(edm) => edm.denoised(self.prediction, x, eps, s_s)?,
        };
        let h = self.lambda(s_t) - self.lambda(s_s);
        let order = self.order_at(i);
        // D1 and D2: divided differences of the recent data predictions, in units of h.
        let (d1, d2) = match (order, self.history.as_slice()) {
            (1, _) => (None, None),
            (2, [.., m1]) => {
                let r0 = (self.lambda(s_s) - self.lambda(self.sigmas[i - 1])) / h;
                (Some(x0.sub(m1)?.scale((1.0 / r0) as f64)?), None)
            }
            (3, [.., m2, m1]) => {
                let (l0, l1, l2) = (
                    self.lambda(s_s),
                    self.lambda(self.sigmas[i - 1]),
                    self.lambda(self.sigmas[i - 2]),
                );
                let (r0, r1) = ((l0 - l1) / h, (l1 - l2) / h);
                let d1_0 = x0.sub(m1)?.scale((1.0 / r0) as f64)?;
                let d1_1 = m1.sub(m2)?.scale((1.0 / r1) as f64)?;
                let diff = d1_0.sub(&d1_1)?;
                let d1 = d1_0.add(&diff.scale((r0 / (r0 + r1)) as f64)?)?;
                let d2 = diff.scale((1.0 / (r0 + r1)) as f64)?;
                (Some(d1), Some(d2))
            }
            _ => unreachable!("order_at never exceeds the history"),
        };
        // x' = c_x x + c_0 x0 + c_1 D1 + c_2 D2 (+ c_z z): diffusers' weights per algorithm.
        let out = match &mut self.sde {
            None => {
                let em1 = (-h).exp() - 1.0;
                let c1 = match (order, self.heun) {
                    (2, false) => -0.5 * a_t * em1,
                    _ => a_t * (em1 / h + 1.0),
                };
                let c2 = -(a_t * ((em1 + h) / (h * h) - 0.5));
                let mut out = axpby(sig_t / sig_s, x, -(a_t * em1), &x0)?;
                if let Some(d1) = &d1 {
                    out = out.add(&d1.scale(c1 as f64)?)?;
                }
                if let Some(d2) = &d2 {
                    out = out.add(&d2.scale(c2 as f64)?)?;
                }
                out
            }
            Some(noise) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let c1 = match (order, self.heun) {
                    (2, false) => 0.5 * (a_t * e2),
                    _ => a_t * (e2 / (-2.0 * h) + 1.0),
                };
                let c2 = a_t * ((e2 - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5);
                let z = noise.next_like(x)?;
                let mut out = axpby(sig_t / sig_s * (-h).exp(), x, a_t * e2, &x0)?;
                if let Some(d1) = &d1 {
                    out = out.add(&d1.scale(c1 as f64)?)?;
                }
                if let Some(d2) = &d2 {
                    out = out.add(&d2.scale(c2 as f64)?)?;
                }
                out.add(&z.scale((sig_t * e2.sqrt()) as f64)?)?
            }
        };
        self.taken += 1;
        if self.order > 1 {
            self.history.push(x0);
            if self.history.len() > self.order - 1 {
                self.history.remove(0);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::Spacing;
    use crate::tensor::SafeTensorsFile;

    /// The timesteps (exact) and sigmas (float32) of both references' schedules.
    #[test]
    fn schedules_match_the_diffusers_references() {
        let dir = crate::test_fixtures::tiny().join("../extra");
        let config = SchedulerConfig::from_file(
            &crate::test_fixtures::tiny().join("sdxl/scheduler/scheduler_config.json"),
        )
        .unwrap();
        for (file, ramp) in [
            ("pipeline_dpmpp_2m.safetensors", Ramp::Spaced),
            ("pipeline_dpmpp_2m_karras.safetensors", Ramp::Karras),
            (
                "pipeline_dpmpp_2m_exponential.safetensors",
                Ramp::Exponential,
            ),
            ("pipeline_dpmpp_2m_beta.safetensors", Ramp::Beta),
        ] {
            let f = SafeTensorsFile::open(dir.join(file)).unwrap();
            let steps: usize = f.metadata()["steps"].parse().unwrap();
            let s = DpmSolverPP::new(&config, steps, 2, ramp).unwrap();
            crate::test_fixtures::assert_schedule(&f, file, s.timesteps(), s.sigmas());
        }
    }

    #[test]
    fn every_spacing_gives_in_range_decreasing_timesteps() {
        for spacing in [Spacing::Leading, Spacing::Trailing, Spacing::Linspace] {
            let config = SchedulerConfig {
                spacing,
                ..SchedulerConfig::default()
            };
            for steps in [1, 2, 7, 30, 500] {
                for ramp in [Ramp::Spaced, Ramp::Karras, Ramp::Exponential, Ramp::Beta] {
                    let s = DpmSolverPP::new(&config, steps, 2, ramp).unwrap();
                    let t = s.timesteps();
                    assert_eq!(t.len(), steps);
                    assert!(t.iter().all(|&v| (0.0..1000.0).contains(&v)), "{t:?}");
                    assert!(t.windows(2).all(|w| w[0] >= w[1]), "{spacing:?} {steps}");
                    assert_eq!(s.sigmas().len(), steps + 1);
                }
            }
        }
        assert!(DpmSolverPP::new(&SchedulerConfig::default(), 0, 2, Ramp::Spaced).is_err());
        assert!(DpmSolverPP::new(&SchedulerConfig::default(), 1000, 2, Ramp::Karras).is_err());
    }
}
