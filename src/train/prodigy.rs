//! Prodigy (Mishchenko and Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
//! Learner"), as prodigyopt 1.1.2 implements it and kohya's `--optimizer_type Prodigy` runs it:
//! AdamW whose step size d is estimated from the run itself, so `--lr` stays 1.
//!
//! Each step (`dlr = d * lr * bias correction`, d the estimate before the step):
//!
//! - first pass over the flat buffers: m <- b1 m + d (1 - b1) g, v <- b2 v + d^2 (1 - b2) g^2,
//!   s <- b3 s + (d / d0) dlr g (with `safeguard_warmup`, (d / d0) d g), summing g (p0 - p) and
//!   |s|;
//! - on the host: d's numerator decays by b3 and gains (d / d0) dlr sum g (p0 - p); the new
//!   estimate is d_coef * numerator / sum |s|; d becomes the largest estimate so far, at most
//!   `growth_rate` times the old d;
//! - second pass: p <- p - wd dlr p - dlr m / (sqrt(v) + d eps), with the new d in the denominator.
//!
//! prodigyopt skips every group whose rate is 0, and returns before d and the weights when sum
//! |s| is 0: a step at rate 0 (the start of a warm-up) changes nothing, not even k. Trainables at
//! rate 0 while others train (a frozen group, `--text-encoder-lr 0`) keep no state, take no share
//! in d and no weight decay, as kohya leaves a group at rate 0 out of the optimizer (prodigyopt
//! itself would still decay it at the others' rate). Every other trainable must step at the one
//! rate.

use super::optimizer_args::key_values;
use crate::backend::cpu::optim::{AdamW, ProdigyBuffers, ProdigyMoments};
use crate::backend::ops;
use crate::{DType, Error, Result, Tensor};
use std::ops::Range;

/// prodigyopt's settings (kohya passes them as `--optimizer_args key=value`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProdigyConfig {
    pub d0: f64,
    pub d_coef: f64,
    /// s's decay; the square root of AdamW's beta2 when None.
    pub beta3: Option<f64>,
    pub growth_rate: f64,
    pub use_bias_correction: bool,
    pub safeguard_warmup: bool,
}

impl Default for ProdigyConfig {
    fn default() -> Self {
        ProdigyConfig {
            d0: 1e-6,
            d_coef: 1.0,
            beta3: None,
            growth_rate: f64::INFINITY,
            use_bias_correction: false,
            safeguard_warmup: false,
        }
    }
}

/// A Python bool of `--optimizer-args` (`True`, `False`; 1 and 0 too), as kohya's values are
/// Python literals.
pub(super) fn parse_flag(key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(Error::Config(format!(
            "--optimizer-args {key}: `{value}` is not True or False"
        ))),
    }
}

impl ProdigyConfig {
    /// kohya's `--optimizer_args` spelling: `d0=1e-6 d_coef=2 use_bias_correction=True ...`.
    /// AdamW's own knobs (betas, eps, weight_decay) are split off first (`train::optimizer_args`);
    /// prodigyopt's `decouple` is always on (kohya's recipes keep it), so `decouple=False` is
    /// refused.
    pub fn parse(args: &[String]) -> Result<ProdigyConfig> {
        let mut c = ProdigyConfig::default();
        for (key, value) in key_values(args)? {
            let number = || -> Result<f64> {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| !v.is_nan())
                    .ok_or_else(|| {
                        Error::Config(format!("--optimizer-args {key}: `{value}` is not a number"))
                    })
            };
            let flag = || parse_flag(key, value);
            match key {
                "d0" => c.d0 = number()?,
                "d_coef" => c.d_coef = number()?,
                "beta3" => c.beta3 = Some(number()?),
                "growth_rate" => c.growth_rate = number()?,
                "use_bias_correction" => c.use_bias_correction = flag()?,
                "safeguard_warmup" => c.safeguard_warmup = flag()?,
                "decouple" if flag()? => {}
                "decouple" => {
                    return Err(Error::Config(
                        "--optimizer-args decouple=False (weight decay inside the gradient) is \
                         not supported: Prodigy here decouples it, as kohya's recipes do"
                            .into(),
                    ))
                }
                other => {
                    return Err(Error::Config(format!(
                        "--optimizer-args: Prodigy has no setting `{other}` (d0, d_coef, beta3, \
                         growth_rate, use_bias_correction, safeguard_warmup)"
                    )))
                }
            }
        }
        c.check()?;
        Ok(c)
    }

    pub fn check(&self) -> Result<()> {
        if !(self.d0.is_finite() && self.d0 > 0.0) {
            return Err(Error::Config(format!(
                "Prodigy's d0 must be a positive number, got {}",
                self.d0
            )));
        }
        if !(self.d_coef.is_finite() && self.d_coef > 0.0) {
            return Err(Error::Config(format!(
                "Prodigy's d_coef must be a positive number, got {}",
                self.d_coef
            )));
        }
        if let Some(b) = self.beta3 {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::Config(format!(
                    "Prodigy's beta3 is a decay from 0 up to (not including) 1, got {b}"
                )));
            }
        }
        if self.growth_rate.is_nan() || self.growth_rate < 1.0 {
            return Err(Error::Config(format!(
                "Prodigy's growth_rate must be 1 or more (inf: unbounded), got {}",
                self.growth_rate
            )));
        }
        Ok(())
    }

    /// For the adapter's recorded settings.
    pub fn describe(&self) -> String {
        format!(
            "prodigy d0={} d_coef={} beta3={} growth_rate={} use_bias_correction={} safeguard_warmup={}",
            self.d0,
            self.d_coef,
            self.beta3.map_or("sqrt(beta2)".into(), |b| b.to_string()),
            self.growth_rate,
            self.use_bias_correction,
            self.safeguard_warmup
        )
    }
}

/// Prodigy's state besides AdamW's: s and the starting values p0 (flat, in the optimizer's slot
/// layout) and the running scalars.
#[derive(Clone, Debug)]
pub struct ProdigyState {
    pub config: ProdigyConfig,
    pub s: Tensor,
    pub p0: Tensor,
    pub d: f64,
    pub d_max: f64,
    pub d_numerator: f64,
    /// Steps that moved the weights (prodigyopt's k, for the bias correction).
    pub k: u64,
}

/// The scalars as a checkpoint stores them.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProdigyScalars {
    pub d: f64,
    pub d_max: f64,
    pub d_numerator: f64,
    pub k: u64,
}

impl ProdigyState {
    /// A fresh state from `p0`, a copy of the masters: s = 0, d = d_max = d0.
    pub fn new(config: ProdigyConfig, p0: Tensor) -> Result<ProdigyState> {
        Ok(ProdigyState {
            config,
            s: Tensor::zeros(p0.elem_count(), DType::F32, p0.device())?,
            p0,
            d: config.d0,
            d_max: config.d0,
            d_numerator: 0.0,
            k: 0,
        })
    }

    pub fn scalars(&self) -> ProdigyScalars {
        ProdigyScalars {
            d: self.d,
            d_max: self.d_max,
            d_numerator: self.d_numerator,
            k: self.k,
        }
    }

    pub fn set_scalars(&mut self, s: ProdigyScalars) {
        (self.d, self.d_max, self.d_numerator, self.k) = (s.d, s.d_max, s.d_numerator, s.k);
    }

    /// One step at learning rate `lr` over the element ranges `runs` of the flat buffers (the
    /// trainables whose rate is not 0), with gradient `grad_scale * grad`. Returns whether the
    /// weights moved.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        hyper: &AdamW,
        master: &Tensor,
        m: &Tensor,
        v: &Tensor,
        grad: &Tensor,
        grad_scale: f32,
        lr: f64,
        runs: &[Range<usize>],
    ) -> Result<bool> {
        let c = self.config;
        let beta3 = c.beta3.unwrap_or(hyper.beta2.sqrt());
        let bias_correction = match c.use_bias_correction {
            true => {
                let k = (self.k + 1) as i32;
                (1.0 - hyper.beta2.powi(k)).sqrt() / (1.0 - hyper.beta1.powi(k))
            }
            false => 1.0,
        };
        let d = self.d;
        let dlr = d * lr * bias_correction;
        let moments = ProdigyMoments {
            beta1: hyper.beta1,
            beta2: hyper.beta2,
            beta3,
            d,
            s_coef: (d / c.d0) * if c.safeguard_warmup { d } else { dlr },
        };
        let (num, den) = {
            let (p, p0) = (master.storage(), self.p0.storage());
            let (mut mm, mut vv, mut ss) = (m.storage_mut(), v.storage_mut(), self.s.storage_mut());
            let buffers = ProdigyBuffers {
                p: &*p,
                p0: &*p0,
                m: &mut *mm,
                v: &mut *vv,
                s: &mut *ss,
            };
            ops::prodigy_moments(&moments, buffers, &grad.storage(), grad_scale, runs)?
        };
        if den == 0.0 || lr == 0.0 {
            return Ok(false);
        }
        let numerator = self.d_numerator * beta3 + (d / c.d0) * dlr * num;
        let d_hat = c.d_coef * numerator / den;
        let mut d_new = d;
        if d == c.d0 {
            d_new = d_new.max(d_hat);
        }
        self.d_max = self.d_max.max(d_hat);
        d_new = self.d_max.min(d_new * c.growth_rate);
        if !d_new.is_finite() {
            return Err(Error::msg(format!(
                "Prodigy's d became {d_new} at its step {}: check the data and --lr",
                self.k + 1
            )));
        }
        self.d_numerator = numerator;
        self.d = d_new;
        ops::prodigy_update(
            &mut master.storage_mut(),
            &m.storage(),
            &v.storage(),
            [dlr, hyper.weight_decay, d_new * hyper.eps],
            runs,
        )?;
        self.k += 1;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::ProdigyConfig;

    /// kohya's `--optimizer_args` spelling (Python's True / False, inf), and what it refuses.
    #[test]
    fn kohya_optimizer_args_parse() {
        let args = [
            "d0=1e-5",
            "d_coef=2",
            "beta3=0.99",
            "growth_rate=inf",
            "use_bias_correction=True",
            "safeguard_warmup=False",
            "decouple=True",
        ]
        .map(String::from);
        let want = ProdigyConfig {
            d0: 1e-5,
            d_coef: 2.0,
            beta3: Some(0.99),
            growth_rate: f64::INFINITY,
            use_bias_correction: true,
            safeguard_warmup: false,
        };
        assert_eq!(ProdigyConfig::parse(&args).unwrap(), want);
        assert_eq!(ProdigyConfig::parse(&[]).unwrap(), ProdigyConfig::default());
        for bad in [
            "d0",
            "d0=x",
            "d0=-1",
            "beta3=1",
            "growth_rate=0.9",
            "use_bias_correction=yes",
            "eps=1e-8",
            "decouple=False",
            "slice_p=2",
        ] {
            assert!(ProdigyConfig::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
