//! Singlestep DPM-Solver++ ("DPM++ 2S", "DPM++ 3S", their SDE forms and Karras variants), as
//! diffusers' `DPMSolverSinglestepScheduler` runs it with algorithm_type "dpmsolver++" or
//! "sde-dpmsolver++", solver_order 1-3 (midpoint or heun) and a final sigma of zero.
//!
//! Where the multistep solver ([`super::DpmSolverPP`]) extrapolates from earlier steps, this
//! one works in cycles of `order` steps. A cycle's first step is first order and remembers the
//! latents it started from; each later step of the cycle jumps from those remembered latents
//! again, now over the whole cycle so far, using every data prediction the cycle has made:
//! - second order, from `s1` (the cycle's start) to `t`, with the prediction at `s0` between:
//!   `h = lambda_t - lambda_s1`, `r0 = (lambda_s0 - lambda_s1) / h`, `D0 = x0(s1)`,
//!   `D1 = (x0(s0) - x0(s1)) / r0`, weighted as the multistep solver weights its D1
//!   (`-alpha_t (e^-h - 1) / 2` for midpoint, `alpha_t ((e^-h - 1) / h + 1)` for heun);
//! - third order, from `s2`: `D1_0 = (x0(s1) - x0(s2)) / r1` and `D1_1 = (x0(s0) - x0(s2)) / r0`.
//!   Midpoint adds `alpha_t ((e^-h - 1) / h + 1) D1_1`; heun combines them into `D1` and `D2` as
//!   the third-order multistep step does.
//!
//! The orders follow diffusers' `get_order_list`: a final sigma of zero switches
//! `lower_order_final` on, so the cycles are 1, 2(, 3) with the tail shortened and the last step
//! first order (order 2 over 6 steps: 1 2 1 2 1 1; order 3: 1 2 3 1 2 1). A run that starts
//! inside a cycle (img2img) lowers the order until it has the predictions.
//!
//! The timesteps are always `linspace` over the table, rounded, whatever the config's
//! `timestep_spacing` (diffusers' class reads no spacing), or the Karras ramp's. The SDE form
//! draws fresh noise every step. Coefficients are float32 scalars, as diffusers computes them from
//! its float32 sigma table.

use super::dpmpp::{alpha_sigma, axpby, lambda};
use super::ramps::Ramp;
use super::schedule::{multistep_schedule, Prediction};
use super::{Noise, NoiseStream, Sampler, SchedulerConfig, Spacing};
use crate::{Error, Result, Tensor};

pub struct DpmSolverSinglestep {
    /// The order each step runs at when the run started at the schedule's beginning.
    orders: Vec<usize>,
    /// `sde-dpmsolver++`: each step injects fresh noise.
    sde: Option<NoiseStream>,
    /// Heun's weights instead of the midpoint's.
    heun: bool,
    prediction: Prediction,
    timesteps: Vec<f64>,
    /// The VE sigmas sqrt((1 - abar) / abar) at each timestep, then 0; float32 as diffusers.
    sigmas: Vec<f32>,
    /// The data predictions of the last steps (at most the solver order), newest last.
    history: Vec<Tensor>,
    /// The latents the current cycle started from (set by every first-order step).
    start: Option<Tensor>,
    /// Steps taken so far: a run that starts mid-cycle has fewer predictions than its order.
    taken: usize,
    max_order: usize,
}

/// diffusers' `get_order_list` with `lower_order_final` (which a final sigma of zero forces):
/// cycles 1..=order, the tail cut short, the last step first order.
fn order_list(order: usize, steps: usize) -> Vec<usize> {
    let cycles = |cycle: &[usize], times: usize| -> Vec<usize> {
        (0..times).flat_map(|_| cycle.iter().copied()).collect()
    };
    let mut orders = match order {
        3 => match steps % 3 {
            0 => [cycles(&[1, 2, 3], steps / 3 - 1), vec![1, 2, 1]].concat(),
            1 => [cycles(&[1, 2, 3], steps / 3), vec![1]].concat(),
            _ => [cycles(&[1, 2, 3], steps / 3), vec![1, 2]].concat(),
        },
        2 => match steps % 2 {
            0 => [cycles(&[1, 2], steps / 2 - 1), vec![1, 1]].concat(),
            _ => [cycles(&[1, 2], steps / 2), vec![1]].concat(),
        },
        _ => vec![1; steps],
    };
    if let Some(last) = orders.last_mut() {
        *last = 1;
    }
    orders
}

impl DpmSolverSinglestep {
    /// Singlestep DPM-Solver++ of `order` (1-3) with the config's solver type; the SDE form
    /// (`algorithm_type` "sde-dpmsolver++") when `sde_noise` is given.
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        order: usize,
        ramp: Ramp,
        sde_noise: Option<&Noise>,
    ) -> Result<DpmSolverSinglestep> {
        config.refuse_zero_snr("DPMSolverSinglestepScheduler")?;
        if !config.dpm_unsupported.is_empty() {
            return Err(Error::Config(format!(
                "scheduler config: singlestep DPM-Solver++ is implemented as (sde-)dpmsolver++ \
                 of order 1-3 with a final sigma of zero; this config asks for {}",
                config.dpm_unsupported.join(", ")
            )));
        }
        if !(1..=3).contains(&order) {
            return Err(Error::Config(format!(
                "singlestep DPM-Solver++ has orders 1, 2 and 3, not {order}"
            )));
        }
        let linspace = SchedulerConfig {
            spacing: Spacing::Linspace,
            ..config.clone()
        };
        let (timesteps, sigmas) =
            multistep_schedule(&linspace, steps, ramp, [None; 2], "singlestep DPM-Solver++")?;
        Ok(DpmSolverSinglestep {
            orders: order_list(order, steps),
            sde: sde_noise.map(NoiseStream::new),
            heun: config.dpm_heun,
            prediction: config.prediction,
            timesteps,
            sigmas,
            history: Vec::new(),
            start: None,
            taken: 0,
            max_order: order,
        })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Sampler for DpmSolverSinglestep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[index]);
        axpby(a, x0, s, noise)
    }

    fn step(&mut self, i: usize, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (a_s, sig_s) = alpha_sigma(self.sigmas[i]);
        let x0 = self.prediction.x0_vp(x, eps, a_s, sig_s)?;
        self.history.push(x0);
        if self.history.len() > self.max_order {
            self.history.remove(0);
        }
        self.taken += 1;
        // diffusers lowers the order while its ring of predictions has a gap (a mid-cycle start).
        let order = self.orders[i].min(self.taken);
        if order == 1 {
            self.start = Some(x.clone());
        }
        let start = self
            .start
            .as_ref()
            .expect("a first-order step starts every cycle");
        // The cycle's first sigma (s1 for order 2, s2 for order 3) and the step's end.
        let s_b = self.sigmas[i + 1 - order];
        let s_t = self.sigmas[i + 1];
        let ((_, sig_b), (a_t, sig_t)) = (alpha_sigma(s_b), alpha_sigma(s_t));
        let h = lambda(s_t) - lambda(s_b);
        let m = &self.history[self.history.len() - order..]; // oldest (the cycle's first) first
        let r = |k: usize| (lambda(self.sigmas[i + 1 - order + k]) - lambda(s_b)) / h;
        // x' = c_x x_b + c_0 D0 + c_1 D1 (+ c_2 D2) (+ c_z z), diffusers' weights per form.
        let (c_x, c_0, c_1, c_2) = match self.sde {
            None => {
                let em1 = (-h).exp() - 1.0;
                let c_1 = match (order, self.heun) {
                    (2, false) => -0.5 * (a_t * em1),
                    _ => a_t * (em1 / h + 1.0),
                };
                let c_2 = -(a_t * ((em1 + h) / (h * h) - 0.5));
                (sig_t / sig_b, -(a_t * em1), c_1, c_2)
            }
            Some(_) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let c_1 = match (order, self.heun) {
                    (2, false) => 0.5 * (a_t * e2),
                    _ => a_t * (e2 / (-2.0 * h) + 1.0),
                };
                let c_2 = a_t * ((e2 + (-2.0 * h)) / ((-2.0 * h) * (-2.0 * h)) - 0.5);
                (sig_t / sig_b * (-h).exp(), a_t * e2, c_1, c_2)
            }
        };
        let mut out = axpby(c_x, start, c_0, &m[0])?;
        match order {
            1 => {}
            2 => {
                let d1 = m[1].sub(&m[0])?.scale((1.0 / r(1)) as f64)?;
                out = out.add(&d1.scale(c_1 as f64)?)?;
            }
            _ => {
                let (r1, r0) = (r(1), r(2));
                let d1_0 = m[1].sub(&m[0])?.scale((1.0 / r1) as f64)?;
                let d1_1 = m[2].sub(&m[0])?.scale((1.0 / r0) as f64)?;
                if self.heun {
                    let d1 = d1_0
                        .scale(r0 as f64)?
                        .sub(&d1_1.scale(r1 as f64)?)?
                        .scale((1.0 / (r0 - r1)) as f64)?;
                    let d2 = d1_1.sub(&d1_0)?.scale((2.0 / (r0 - r1)) as f64)?;
                    out = out.add(&d1.scale(c_1 as f64)?)?;
                    out = out.add(&d2.scale(c_2 as f64)?)?;
                } else {
                    out = out.add(&d1_1.scale(c_1 as f64)?)?;
                }
            }
        }
        if let Some(noise) = &mut self.sde {
            let z = noise.next_like(x)?;
            let e2 = 1.0 - (-2.0 * h).exp();
            out = out.add(&z.scale((sig_t * e2.sqrt()) as f64)?)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::SafeTensorsFile;

    /// The timesteps (exact) and float32 sigmas of every singlestep reference, built from the
    /// config each stored (linspace whatever its spacing says; Karras where it asks).
    #[test]
    fn schedules_match_the_diffusers_references() {
        let dir = crate::test_fixtures::tiny().join("../extra");
        for (file, order) in [
            ("pipeline_dpmpp_2s.safetensors", 2),
            ("pipeline_dpmpp_2s_karras.safetensors", 2),
            ("pipeline_dpmpp_2s_sde_karras.safetensors", 2),
            ("pipeline_dpmpp_3s.safetensors", 3),
            ("pipeline_dpmpp_3s_heun.safetensors", 3),
        ] {
            let f = SafeTensorsFile::open(dir.join(file)).unwrap();
            let config = SchedulerConfig::from_json_text(
                f.meta_str("scheduler_config").unwrap(),
                std::path::Path::new(file),
            )
            .unwrap();
            assert_eq!(
                config.class,
                super::super::SchedulerClass::DpmSolverSinglestep
            );
            assert_eq!(config.solver_order, order);
            let steps: usize = f.metadata()["steps"].parse().unwrap();
            let s = DpmSolverSinglestep::new(&config, steps, order, config.ramp, None).unwrap();
            crate::test_fixtures::assert_schedule(&f, file, s.timesteps(), s.sigmas());
        }
    }

    /// Zero-SNR betas are refused: diffusers' singlestep class has no `rescale_betas_zero_snr`
    /// and would silently run the plain schedule.
    #[test]
    fn zero_snr_is_refused() {
        let config = SchedulerConfig {
            zero_snr: true,
            ..SchedulerConfig::default()
        };
        let e = DpmSolverSinglestep::new(&config, 6, 2, Ramp::Spaced, None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("rescale_betas_zero_snr"), "{e}");
    }

    /// diffusers' order lists, as `get_order_list` gives them with `lower_order_final` and a
    /// final sigma of zero (written out from its code for each residue of the step count).
    #[test]
    fn order_lists_follow_diffusers() {
        assert_eq!(order_list(2, 6), [1, 2, 1, 2, 1, 1]);
        assert_eq!(order_list(2, 5), [1, 2, 1, 2, 1]);
        assert_eq!(order_list(2, 2), [1, 1]);
        assert_eq!(order_list(2, 1), [1]);
        assert_eq!(order_list(3, 6), [1, 2, 3, 1, 2, 1]);
        assert_eq!(order_list(3, 7), [1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(order_list(3, 8), [1, 2, 3, 1, 2, 3, 1, 1]);
        assert_eq!(order_list(3, 3), [1, 2, 1]);
        assert_eq!(order_list(3, 2), [1, 1]);
        assert_eq!(order_list(3, 1), [1]);
        assert_eq!(order_list(1, 3), [1, 1, 1]);
        for order in 1..=3 {
            for steps in 1..40 {
                assert_eq!(order_list(order, steps).len(), steps, "{order} {steps}");
            }
        }
    }
}
