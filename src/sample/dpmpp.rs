//! DPM-Solver++ 2M ("DPM++ 2M" in A1111 and ComfyUI), as diffusers' `DPMSolverMultistepScheduler`
//! runs it with algorithm_type "dpmsolver++", solver_order 2 (midpoint), lower_order_final and a
//! final sigma of zero; optionally on Karras sigmas (`use_karras_sigmas`, rho 7: "DPM++ 2M
//! Karras").
//!
//! The latents stay in the VP parametrisation (initial noise sigma 1, no input scaling). Each step
//! turns epsilon into the data prediction `x0 = (x - sigma_s eps) / alpha_s` and moves along
//! `lambda = log(alpha / sigma)`: the first and last steps are first order,
//! `x' = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) x0`; the others add the linear extrapolation
//! from the previous x0, `D1 = (x0 - x0_prev) h / h_prev`, weighted by `-alpha_t (e^-h - 1) / 2`.
//! The coefficients are float32 scalars, as diffusers computes them from its float32 sigma table.

use super::schedule::{karras_sigmas, linspace, sigma_to_t, Spacing};
use super::{Noise, NoiseStream, Sampler, SchedulerConfig};
use crate::{Error, Result, Tensor};

pub struct DpmSolverPP2M {
    /// `sde-dpmsolver++`: each step injects fresh noise (DPM++ 2M SDE).
    sde: Option<NoiseStream>,
    timesteps: Vec<f64>,
    /// The VE sigmas sqrt((1 - abar) / abar) at each timestep, then 0; float32 as diffusers.
    sigmas: Vec<f32>,
    /// The previous step's data prediction.
    prev_x0: Option<Tensor>,
}

/// (alpha, sigma) of the VP form for a VE sigma, in float32.
fn alpha_sigma(s: f32) -> (f32, f32) {
    let a = 1.0 / (s * s + 1.0).sqrt();
    (a, s * a)
}

/// lambda = log(alpha) - log(sigma); +inf at sigma 0.
fn lambda(s: f32) -> f32 {
    let (a, sg) = alpha_sigma(s);
    a.ln() - sg.ln()
}

impl DpmSolverPP2M {
    pub fn new(config: &SchedulerConfig, steps: usize, karras: bool) -> Result<DpmSolverPP2M> {
        Self::with_noise(config, steps, karras, None)
    }

    /// The SDE form (`algorithm_type` "sde-dpmsolver++") when `sde_noise` is given.
    pub fn with_noise(
        config: &SchedulerConfig,
        steps: usize,
        karras: bool,
        sde_noise: Option<&Noise>,
    ) -> Result<DpmSolverPP2M> {
        if !config.dpm_unsupported.is_empty() {
            return Err(Error::Config(format!(
                "scheduler config: DPM++ 2M is implemented as (sde-)dpmsolver++ order 2 (midpoint, \
                 final sigma zero); this config asks for {}",
                config.dpm_unsupported.join(", ")
            )));
        }
        let n = config.num_train_timesteps;
        if steps == 0 || steps >= n {
            return Err(Error::Config(format!(
                "steps must be in 1..{n} for DPM++ 2M, got {steps}"
            )));
        }
        let table: Vec<f32> = config
            .alphas_cumprod_f32()
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        let (timesteps, mut sigmas): (Vec<f64>, Vec<f32>) = if karras {
            // Karras et al.'s ramp between the table's ends, then each sigma's fractional
            // timestep by interpolation in log sigma, rounded.
            let sig = karras_sigmas(table[0] as f64, table[n - 1] as f64, steps);
            let log_table: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            let ts = sig
                .iter()
                .map(|&s| sigma_to_t(s, &log_table).round_ties_even())
                .collect();
            (ts, sig.iter().map(|&s| s as f32).collect())
        } else {
            let ts: Vec<f64> = match config.spacing {
                Spacing::Linspace => (1..=steps)
                    .rev()
                    .map(|i| linspace((n - 1) as f64, steps + 1, i).round_ties_even())
                    .collect(),
                Spacing::Leading => {
                    let ratio = n / (steps + 1);
                    (1..=steps)
                        .rev()
                        .map(|i| (i * ratio + config.steps_offset) as f64)
                        .collect()
                }
                Spacing::Trailing => {
                    let ratio = n as f64 / steps as f64;
                    (0..steps)
                        .map(|i| (n as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                        .collect()
                }
            };
            if let Some(&t) = ts.iter().find(|&&t| t < 0.0 || t >= n as f64) {
                return Err(Error::Config(format!(
                    "DPM++ 2M timestep {t} outside the {n}-step schedule ({steps} steps, offset {})",
                    config.steps_offset
                )));
            }
            let sig = ts.iter().map(|&t| table[t as usize]).collect();
            (ts, sig)
        };
        sigmas.push(0.0);
        Ok(DpmSolverPP2M {
            sde: sde_noise.map(NoiseStream::new),
            timesteps,
            sigmas,
            prev_x0: None,
        })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Sampler for DpmSolverPP2M {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn input_scale(&self, _i: usize) -> f64 {
        1.0
    }

    fn step(&mut self, i: usize, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (s_s, s_t) = (self.sigmas[i], self.sigmas[i + 1]);
        let ((a_s, sig_s), (a_t, sig_t)) = (alpha_sigma(s_s), alpha_sigma(s_t));
        let x0 = x.sub(&eps.scale(sig_s as f64)?)?.scale(1.0 / a_s as f64)?; // (B, C, H, W)
        let h = lambda(s_t) - lambda(s_s);
        // First order at the start, and at the end: the final sigma is 0 (h infinite).
        let last = i + 1 == self.timesteps.len();
        let d1 = match (&self.prev_x0, last) {
            (Some(prev), false) => {
                let r0 = (lambda(s_s) - lambda(self.sigmas[i - 1])) / h;
                Some(x0.sub(prev)?.scale((1.0 / r0) as f64)?)
            }
            _ => None,
        };
        let out = match &mut self.sde {
            None => {
                // x' = (sig_t / sig_s) x - a_t (e^-h - 1) (x0 + D1 / 2)
                let em1 = a_t * ((-h).exp() - 1.0);
                let first = x
                    .scale((sig_t / sig_s) as f64)?
                    .sub(&x0.scale(em1 as f64)?)?;
                match d1 {
                    Some(d1) => first.sub(&d1.scale((0.5 * em1) as f64)?)?,
                    None => first,
                }
            }
            Some(noise) => {
                // x' = (sig_t / sig_s) e^-h x + a_t (1 - e^-2h) (x0 + D1 / 2)
                //      + sig_t sqrt(1 - e^-2h) z
                let e2 = 1.0 - (-2.0 * h).exp();
                let z = noise.next_like(x)?;
                let first = x
                    .scale((sig_t / sig_s * (-h).exp()) as f64)?
                    .add(&x0.scale((a_t * e2) as f64)?)?;
                let with_d1 = match d1 {
                    Some(d1) => first.add(&d1.scale((0.5 * (a_t * e2)) as f64)?)?,
                    None => first,
                };
                with_d1.add(&z.scale((sig_t * e2.sqrt()) as f64)?)?
            }
        };
        self.prev_x0 = Some(x0);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SafeTensorsFile;

    /// The timesteps (exact) and sigmas (float32) of both references' schedules.
    #[test]
    fn schedules_match_the_diffusers_references() {
        let dir = crate::test_fixtures::tiny().join("../extra");
        let config = SchedulerConfig::from_file(
            &crate::test_fixtures::tiny().join("sdxl/scheduler/scheduler_config.json"),
        )
        .unwrap();
        for (file, karras) in [
            ("pipeline_dpmpp_2m.safetensors", false),
            ("pipeline_dpmpp_2m_karras.safetensors", true),
        ] {
            let f = SafeTensorsFile::open(dir.join(file)).unwrap();
            let steps: usize = f.metadata()["steps"].parse().unwrap();
            let s = DpmSolverPP2M::new(&config, steps, karras).unwrap();
            let want_t = f.tensor("timesteps").unwrap().to_vec_f64().unwrap();
            assert_eq!(s.timesteps(), want_t.as_slice(), "{file}");
            let want_s = f.tensor("sigmas").unwrap().to_vec_f64().unwrap();
            let got_s: Vec<f64> = s.sigmas().iter().map(|&v| v as f64).collect();
            for (g, w) in got_s.iter().zip(&want_s) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs(),
                    "{file}: {got_s:?} vs {want_s:?}"
                );
            }
            assert_eq!(got_s.len(), want_s.len());
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
                for karras in [false, true] {
                    let s = DpmSolverPP2M::new(&config, steps, karras).unwrap();
                    let t = s.timesteps();
                    assert_eq!(t.len(), steps);
                    assert!(t.iter().all(|&v| (0.0..1000.0).contains(&v)), "{t:?}");
                    assert!(t.windows(2).all(|w| w[0] >= w[1]), "{spacing:?} {steps}");
                    assert_eq!(s.sigmas().len(), steps + 1);
                }
            }
        }
        assert!(DpmSolverPP2M::new(&SchedulerConfig::default(), 0, false).is_err());
        assert!(DpmSolverPP2M::new(&SchedulerConfig::default(), 1000, true).is_err());
    }
}
