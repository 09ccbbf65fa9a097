//! UniPC (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler` runs it: the B(h) = e^h - 1
//! form ("bh2"), solver_order 1-3, data prediction (`predict_x0`), `lower_order_final`,
//! `disable_corrector`, and a final sigma of zero; on the config's spacing or on Karras sigmas.
//! The schedule is DPM-Solver++'s. diffusers' other two settings, `bh1` and noise prediction,
//! end in NaN with a final sigma of zero (an infinite weight times zero on the last step), so
//! they are refused.
//!
//! Each step first corrects the latents it was given (UniC, from the step before) with the model
//! output just computed on them, then predicts the next latents (UniP) from that corrected sample:
//! - both move along `lambda = log(alpha / sigma)` by `h`; with the data prediction m (x0),
//!   `x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) m_0 - alpha_t B(h) sum_k rho_k D_k`,
//!   where `D_k = (m_k - m_0) / r_k` are differences to earlier outputs at `r_k = (lambda_k -
//!   lambda_0) / h`;
//! - the weights rho solve `R rho = b` with `R[i][k] = r_k^i` and b from the phi functions of
//!   `-h` (for second order the predictor's rho is 1/2; a first-order corrector's is 1/2);
//! - the corrector adds the new output's own difference `D_t = m_t - m_0` with the last rho.
//!
//! The coefficients, and the small linear solves, are float32 as diffusers computes them from its
//! float32 sigma table. The last step has no corrector (there is no model output after it).

use super::dpmpp::{alpha_sigma, lambda};
use super::ramps::Ramp;
use super::schedule::{multistep_schedule, Prediction};
use super::{Sampler, SchedulerConfig};
use crate::{Error, Result, Tensor};

pub struct UniPc {
    order: usize,
    lower_order_final: bool,
    prediction: Prediction,
    disable_corrector: Vec<usize>,
    timesteps: Vec<f64>,
    /// VE sigmas at each timestep, then 0; float32 as diffusers.
    sigmas: Vec<f32>,
    /// The data predictions x0 of the last `order` steps, newest last.
    history: Vec<Tensor>,
    /// The sample the last predictor started from, and the order it ran at.
    last: Option<(Tensor, usize)>,
}

/// The phi-function weights of one UniP or UniC update.
struct Weights {
    /// `e^hh - 1` with `hh = -h`.
    h_phi_1: f32,
    /// B(h) = e^hh - 1 (bh2).
    b_h: f32,
    /// `R rho = b`: rows `r_k^i` over the ratios r (the last ratio is 1).
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

fn weights(h: f32, ratios: &[f32], order: usize) -> Weights {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    let mut rks = ratios.to_vec();
    rks.push(1.0);
    let (mut r, mut b) = (Vec::new(), Vec::new());
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0f64;
    for i in 1..=order {
        r.push(rks.iter().map(|&rk| rk.powi(i as i32 - 1)).collect());
        b.push(h_phi_k * factorial as f32 / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - (1.0 / factorial) as f32;
    }
    Weights { h_phi_1, b_h, r, b }
}

/// Solves the small dense system `a x = b` in float32 by LU with partial pivoting (what
/// `torch.linalg.solve` runs through LAPACK's sgesv).
fn solve_f32(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .expect("non-empty range");
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (v, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0f32; n];
    for row in (0..n).rev() {
        let s: f32 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

impl UniPc {
    pub fn new(config: &SchedulerConfig, steps: usize, ramp: Ramp) -> Result<UniPc> {
        if !config.dpm_unsupported.is_empty() {
            return Err(Error::Config(format!(
                "scheduler config: UniPC is implemented with solver_order 1-3 and a final sigma of \
                 zero; this config asks for {}",
                config.dpm_unsupported.join(", ")
            )));
        }
        // B(h) = h (bh1), or e^h - 1 times sigma_t (noise prediction), is infinite times zero on
        // the last step: diffusers' result is NaN.
        for (refused, what) in [
            (config.unipc_bh1, "solver_type bh1"),
            (!config.unipc_predict_x0, "predict_x0 false"),
        ] {
            if refused {
                return Err(Error::Config(format!(
                    "scheduler config: UniPC with {what} and a final sigma of zero ends in NaN in \
                     diffusers (an infinite weight on the last step); use bh2 with predict_x0"
                )));
            }
        }
        let (timesteps, sigmas) = multistep_schedule(
            config,
            steps,
            ramp,
            [config.euler.sigma_min, config.euler.sigma_max],
            "UniPC",
        )?;
        Ok(UniPc {
            order: config.solver_order,
            prediction: config.prediction,
            lower_order_final: config.lower_order_final,
            disable_corrector: config.unipc_disable_corrector.clone(),
            timesteps,
            sigmas,
            history: Vec::new(),
            last: None,
        })
    }

    /// `D_k = (m_k - m_0) / r_k` for the `order - 1` outputs before the newest, whose sigmas are
    /// `self.sigmas[newest - k]`, and their ratios r_k.
    fn differences(&self, newest: usize, order: usize, h: f32) -> Result<(Vec<Tensor>, Vec<f32>)> {
        let m0 = &self.history[self.history.len() - 1];
        let l0 = lambda(self.sigmas[newest]);
        let (mut ds, mut rks) = (Vec::new(), Vec::new());
        for k in 1..order {
            let rk = (lambda(self.sigmas[newest - k]) - l0) / h;
            let mk = &self.history[self.history.len() - 1 - k];
            ds.push(mk.sub(m0)?.scale((1.0 / rk) as f64)?);
            rks.push(rk);
        }
        Ok((ds, rks))
    }

    /// `(sigma_t / sigma_s) x - alpha_t h_phi_1 m0`: the first-order part shared by UniP and
    /// UniC, and alpha_t.
    fn first_order(&self, x: &Tensor, s: f32, t: f32, w: &Weights) -> Result<(Tensor, f32)> {
        let ((_, sig_s), (a_t, sig_t)) = (alpha_sigma(s), alpha_sigma(t));
        let m0 = &self.history[self.history.len() - 1];
        let x_t = x
            .scale((sig_t / sig_s) as f64)?
            .sub(&m0.scale((a_t * w.h_phi_1) as f64)?)?;
        Ok((x_t, a_t))
    }

    /// UniP from `x` at step `i` (sigma i) to sigma i + 1.
    fn predict(&self, i: usize, x: &Tensor, order: usize) -> Result<Tensor> {
        let (s, t) = (self.sigmas[i], self.sigmas[i + 1]);
        let h = lambda(t) - lambda(s);
        let (ds, rks) = self.differences(i, order, h)?;
        let w = weights(h, &rks, order);
        let (x_t, cm) = self.first_order(x, s, t, &w)?;
        if ds.is_empty() {
            return Ok(x_t);
        }
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            let r = w.r[..order - 1]
                .iter()
                .map(|row| row[..order - 1].to_vec())
                .collect();
            solve_f32(r, w.b[..order - 1].to_vec())
        };
        let mut res = ds[0].scale(rhos[0] as f64)?;
        for (d, &rho) in ds.iter().zip(&rhos).skip(1) {
            res = res.add(&d.scale(rho as f64)?)?;
        }
        x_t.sub(&res.scale((cm * w.b_h) as f64)?)
    }

    /// UniC of `x` (the predictor's result at step `i`) with the new output `m_t`, from the
    /// sample `last` at step i - 1 and the history up to step i - 1.
    fn correct(&self, i: usize, x_last: &Tensor, m_t: &Tensor, order: usize) -> Result<Tensor> {
        let (s, t) = (self.sigmas[i - 1], self.sigmas[i]);
        let h = lambda(t) - lambda(s);
        let (ds, rks) = self.differences(i - 1, order, h)?;
        let w = weights(h, &rks, order);
        let (x_t, cm) = self.first_order(x_last, s, t, &w)?;
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve_f32(w.r.clone(), w.b.clone())
        };
        let m0 = &self.history[self.history.len() - 1];
        let mut res = m_t.sub(m0)?.scale(rhos[order - 1] as f64)?;
        for (d, &rho) in ds.iter().zip(&rhos) {
            res = res.add(&d.scale(rho as f64)?)?;
        }
        x_t.sub(&res.scale((cm * w.b_h) as f64)?)
    }
}

impl Sampler for UniPc {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, index: usize, x0: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[index]);
        x0.scale(a as f64)?.add(&noise.scale(s as f64)?)
    }

    fn step(&mut self, i: usize, x: &Tensor, eps: &Tensor) -> Result<Tensor> {
        let (a, sig) = alpha_sigma(self.sigmas[i]);
        // The data prediction, from the uncorrected sample the model saw.
        let m = self.prediction.x0_vp(x, eps, a, sig)?; // (B, C, H, W)
        let x = match &self.last {
            Some((last, order)) if !self.disable_corrector.contains(&(i - 1)) => {
                self.correct(i, last, &m, *order)?
            }
            _ => x.clone(),
        };
        self.history.push(m);
        if self.history.len() > self.order {
            self.history.remove(0);
        }
        let n = self.timesteps.len();
        let order = if self.lower_order_final {
            self.order.min(n - i)
        } else {
            self.order
        }
        // Warm-up over the steps taken (the history holds one output per step, up to `order`),
        // wherever the run started.
        .min(self.history.len());
        let out = self.predict(i, &x, order)?;
        self.last = Some((x, order));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_solves_match_the_exact_answer() {
        // A permutation is needed (zero first pivot); the answer is exact in float32.
        let a = vec![
            vec![0.0, 1.0, 2.0],
            vec![1.0, 1.0, 1.0],
            vec![4.0, 2.0, 1.0],
        ];
        let x = solve_f32(a, vec![8.0, 6.0, 11.0]);
        assert_eq!(x, vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn first_order_weights_are_the_phi_functions() {
        // b_1 = ((e^hh - 1) / hh - 1) / B(h), with hh = -h and B(h) = e^hh - 1.
        let h = 0.7f32;
        let w = weights(h, &[], 1);
        let hh = -h as f64;
        let want = ((hh.exp_m1() / hh) - 1.0) / hh.exp_m1();
        assert!((w.b[0] as f64 - want).abs() < 1e-6, "{} vs {want}", w.b[0]);
        assert_eq!(w.r, vec![vec![1.0]]);
    }
}
