//! Adafactor (Shazeer and Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory
//! Cost"), as transformers' `Adafactor` implements it and kohya's `--optimizer_type AdaFactor`
//! runs it. A trainable of two dims or more, shape (..., R, C), keeps running means of
//! `g^2 + eps1` over the rows and the columns of its last two dims instead of AdamW's whole second
//! moment (R + C values a matrix instead of R C), and each step:
//!
//! - `beta2t = 1 - t^decay_rate` (the average's weight grows with the step count t);
//! - `row <- beta2t row + (1 - beta2t) mean_c(g^2 + eps1)`, `col` likewise over the rows;
//! - `u = g / sqrt(row / mean_r(row)) / sqrt(col)` (a vector: a whole `v`, `u = g / sqrt(v)`);
//! - `u <- u / max(1, RMS(u) / clip_threshold)`, then times the rate
//!   `lr = rate * max(eps2, RMS(p))` (`scale_parameter`; RMS(p) before the step) where `rate` is
//!   the schedule's (`relative_step=False`) or the relative step `min(1e-2, 1/sqrt(t))`
//!   (`min(1e-6 t, 1/sqrt(t))` with `warmup_init`);
//! - with `beta1`, a first moment `m <- b1 m + (1 - b1) u` becomes the update;
//! - `p <- p - lr wd p - u`.
//!
//! transformers' defaults, which kohya keeps unless told otherwise: relative step and parameter
//! scale on, no first moment, eps (1e-30, 1e-3), clip_threshold 1, decay_rate -0.8, no weight
//! decay. kohya's SDXL guide recommends `scale_parameter=False relative_step=False
//! warmup_init=False` with a fixed `--lr` under `constant_with_warmup`. With the relative step the
//! rate is Adafactor's own: `--lr`, the schedule and per-group rates (LoRA+, `--text-encoder-lr`,
//! block weights) have nothing to act on, so they are refused rather than ignored.
//!
//! The state is the f32 masters, the row and column means (plus one scratch value per matrix
//! for the mean of its row means) or a whole `v` for vectors, and `m` with `beta1`: for a LoRA
//! factor (r, in) that is r + in + 1 values against AdamW's 2 r in.

use super::optim::{concat, Optimizer, Rule, Slot};
use super::optimizer_args::{float, key_values};
use super::prodigy::parse_flag;
use crate::backend::cpu::optim::AdamW;
use crate::backend::cpu::optim::{AdafactorStep, FactorSlot};
use crate::{DType, Device};
use crate::{Error, Result, Tensor};

/// transformers' `Adafactor` settings besides the rate and weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdafactorConfig {
    /// (eps1, eps2): added to g^2; the floor of RMS(p) in the parameter scale.
    pub eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    /// A first moment's beta; None: no first moment.
    pub beta1: Option<f64>,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

impl AdafactorConfig {
    /// kohya's `--optimizer_args` spelling: `scale_parameter=False relative_step=False
    /// warmup_init=False clip_threshold=1.0 decay_rate=-0.8 beta1=0.9 eps=1e-30,1e-3` (the
    /// weight decay is split off first: see `train::optimizer_args`).
    pub fn parse(args: &[String]) -> Result<AdafactorConfig> {
        let mut c = AdafactorConfig::default();
        for (key, value) in key_values(args)? {
            match key {
                "scale_parameter" => c.scale_parameter = parse_flag(key, value)?,
                "relative_step" => c.relative_step = parse_flag(key, value)?,
                "warmup_init" => c.warmup_init = parse_flag(key, value)?,
                "clip_threshold" => c.clip_threshold = float(key, value)?,
                "decay_rate" => c.decay_rate = float(key, value)?,
                "beta1" => {
                    c.beta1 = match value {
                        "None" => None,
                        v => Some(float(key, v)?),
                    }
                }
                "eps" => c.eps = super::optimizer_args::pair(key, value)?,
                other => {
                    return Err(Error::Config(format!(
                        "--optimizer-args: Adafactor has no setting `{other}` (scale_parameter, \
                         relative_step, warmup_init, clip_threshold, decay_rate, beta1, eps, \
                         weight_decay)"
                    )))
                }
            }
        }
        c.check()?;
        Ok(c)
    }

    /// What transformers refuses, and settings no step could use.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("Adafactor: {what}")));
        if self.warmup_init && !self.relative_step {
            return bad(
                "warmup_init=True needs relative_step=True (transformers refuses it too)".into(),
            );
        }
        if !(self.eps.0 >= 0.0 && self.eps.1 >= 0.0) {
            return bad(format!(
                "eps {:?} must be two numbers of at least 0",
                self.eps
            ));
        }
        if self.clip_threshold.is_nan() || self.clip_threshold <= 0.0 {
            return bad(format!(
                "clip_threshold {} must be above 0",
                self.clip_threshold
            ));
        }
        if self.decay_rate.is_nan() || self.decay_rate > 0.0 {
            return bad(format!(
                "decay_rate {} must be at most 0 (beta2t = 1 - t^decay_rate would turn negative)",
                self.decay_rate
            ));
        }
        if let Some(b) = self.beta1.filter(|b| !(0.0..1.0).contains(b)) {
            return bad(format!("beta1 {b} must be in [0, 1)"));
        }
        Ok(())
    }

    /// For the log and the adapter's recorded settings.
    pub fn describe(&self) -> String {
        format!(
            "adafactor scale_parameter={} relative_step={} warmup_init={} clip_threshold={} \
             decay_rate={} beta1={} eps=({:e}, {:e})",
            self.scale_parameter,
            self.relative_step,
            self.warmup_init,
            self.clip_threshold,
            self.decay_rate,
            self.beta1.map_or("None".into(), |b| b.to_string()),
            self.eps.0,
            self.eps.1
        )
    }

    /// The relative step at step `t` (from 1): `min(1e-2, 1/sqrt(t))`, or `min(1e-6 t,
    /// 1/sqrt(t))` with warmup_init.
    pub fn relative_rate(&self, t: u64) -> f64 {
        let t = t as f64;
        let min_step = if self.warmup_init { 1e-6 * t } else { 1e-2 };
        min_step.min(1.0 / t.sqrt())
    }

    /// The settings of step `t` (from 1) with weight decay `wd`.
    pub fn step(&self, t: u64, wd: f64) -> AdafactorStep {
        AdafactorStep {
            eps1: self.eps.0,
            eps2: self.eps.1,
            clip_threshold: self.clip_threshold,
            beta2t: 1.0 - (t as f64).powf(self.decay_rate),
            beta1: self.beta1,
            weight_decay: wd,
            scale_parameter: self.scale_parameter,
        }
    }
}

/// Where one trainable's second moment lives in the flat `v`, and its shape as factored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placement {
    pub lead: usize,
    /// 0 for a vector (a whole second moment).
    pub rows: usize,
    pub cols: usize,
    pub state: usize,
}

impl Placement {
    pub fn factored(&self) -> bool {
        self.rows > 0
    }
}

/// Adafactor's configuration and every trainable's placement.
#[derive(Clone, Debug, PartialEq)]
pub struct Factored {
    pub config: AdafactorConfig,
    pub places: Vec<Placement>,
    /// Values of the flat `v`.
    pub v_len: usize,
}

impl Factored {
    /// The optimizer's log line: the settings, how many trainables are factored, the rate.
    pub fn describe_run(&self, lr: f64, weight_decay: f64) -> String {
        format!(
            "optimizer: {} ({} of {} trainables factored; {}; weight decay {weight_decay})",
            self.config.describe(),
            self.places.iter().filter(|p| p.factored()).count(),
            self.places.len(),
            match self.config.relative_step {
                true => "the relative step sets the rate, --lr is not used".to_string(),
                false => format!("rate --lr {lr}"),
            },
        )
    }

    /// Placements for trainables of shapes `shapes`, in order: two dims or more factored over
    /// the last two (transformers' rule), else whole.
    pub fn new(config: AdafactorConfig, shapes: &[Vec<usize>]) -> Factored {
        let mut places = Vec::with_capacity(shapes.len());
        let mut state = 0;
        for dims in shapes {
            let len: usize = dims.iter().product();
            let place = match dims[..] {
                [.., r, c] => Placement {
                    lead: dims[..dims.len() - 2].iter().product(),
                    rows: r,
                    cols: c,
                    state,
                },
                _ => Placement {
                    lead: 1,
                    rows: 0,
                    cols: 0,
                    state,
                },
            };
            state += match place.factored() {
                true => place.lead * (place.rows + place.cols + 1),
                false => len,
            };
            places.push(place);
        }
        Factored {
            config,
            places,
            v_len: state,
        }
    }

    /// The step's table: each slot with its placement and rate (`rates`, the schedule's per
    /// slot; with the relative step, step `t`'s relative rate for every slot not at 0).
    pub fn table(&self, slots: &[Slot], rates: &[f64], t: u64) -> Vec<FactorSlot> {
        let relative = self.config.relative_rate(t);
        slots
            .iter()
            .zip(&self.places)
            .zip(rates)
            .map(|((s, p), &rate)| FactorSlot {
                offset: s.offset,
                len: s.len,
                lead: p.lead,
                rows: p.rows,
                cols: p.cols,
                state: p.state,
                rate: match self.config.relative_step && rate != 0.0 {
                    true => relative,
                    false => rate,
                },
            })
            .collect()
    }
}

/// One trainable's Adafactor state as a checkpoint holds it: the master, the first moment (with
/// beta1), and the row and column means or the whole second moment.
#[derive(Clone, Debug)]
pub struct SlotState {
    pub master: Tensor,
    pub m: Option<Tensor>,
    pub second: Second,
}

/// A trainable's second moment: factored (rows L R, columns L C) or whole.
#[derive(Clone, Debug)]
pub enum Second {
    Factored { row: Tensor, col: Tensor },
    Whole(Tensor),
}

impl SlotState {
    /// The moments under transformers' state names (`exp_avg_sq_row`, `exp_avg_sq_col` or
    /// `exp_avg_sq`, then `exp_avg`), flat.
    pub fn named(&self) -> Vec<(&'static str, Tensor)> {
        let mut v = match &self.second {
            Second::Factored { row, col } => {
                vec![
                    ("exp_avg_sq_row", row.clone()),
                    ("exp_avg_sq_col", col.clone()),
                ]
            }
            Second::Whole(t) => vec![("exp_avg_sq", t.clone())],
        };
        if let Some(m) = &self.m {
            v.push(("exp_avg", m.clone()));
        }
        v
    }
}

/// Each of `shapes` fits its slot (one shape a slot, as many elements).
fn check_shapes(slots: &[Slot], shapes: &[Vec<usize>]) -> Result<()> {
    let fits = slots.len() == shapes.len()
        && slots
            .iter()
            .zip(shapes)
            .all(|(s, d)| d.iter().product::<usize>() == s.len);
    match fits {
        true => Ok(()),
        false => Err(Error::msg(format!(
            "optimizer: {} shapes for {} slots, or a shape of another size than its slot",
            shapes.len(),
            slots.len()
        ))),
    }
}

/// The Adafactor rule of [`Optimizer`]: its construction, read-back and per-slot state.
impl Optimizer {
    /// The same trainables stepped by Adafactor (see `train::adafactor`) from zero state, each
    /// factored by its shape in `shapes` (one per slot, of the slot's size).
    pub fn with_adafactor(
        mut self,
        config: AdafactorConfig,
        shapes: &[Vec<usize>],
    ) -> Result<Optimizer> {
        config.check()?;
        check_shapes(&self.slots, shapes)?;
        let f = Factored::new(config, shapes);
        let device = self.master.device();
        self.m = Tensor::zeros(
            if config.beta1.is_some() {
                self.len()
            } else {
                0
            },
            DType::F32,
            device,
        )?;
        self.v = Tensor::zeros(f.v_len, DType::F32, device)?;
        self.rule = Rule::Adafactor(Box::new(f));
        Ok(self)
    }

    /// Adafactor's state read back per trainable (a checkpoint, a reordering): `(name, shape,
    /// state)` in the order given.
    pub fn from_adafactor(
        hyper: AdamW,
        step: u64,
        config: AdafactorConfig,
        parts: Vec<(String, Vec<usize>, SlotState)>,
        device: Device,
    ) -> Result<Optimizer> {
        let shapes: Vec<Vec<usize>> = parts.iter().map(|(_, d, _)| d.clone()).collect();
        let f = Factored::new(config, &shapes);
        let (mut slots, mut masters, mut ms, mut vs) = (vec![], vec![], vec![], vec![]);
        let mut offset = 0;
        for ((name, dims, st), place) in parts.into_iter().zip(&f.places) {
            let len = st.master.elem_count();
            let count = |t: &Tensor| t.elem_count();
            let fits = dims.iter().product::<usize>() == len
                && st.m.as_ref().map_or(config.beta1.is_none(), |m| {
                    config.beta1.is_some() && count(m) == len
                })
                && match (&st.second, place.factored()) {
                    (Second::Factored { row, col }, true) => {
                        count(row) == place.lead * place.rows
                            && count(col) == place.lead * place.cols
                    }
                    (Second::Whole(v), false) => count(v) == len,
                    _ => false,
                };
            if !fits {
                return Err(Error::msg(format!(
                    "Adafactor state of `{name}` {dims:?} does not fit its shape (first moment {}, \
                     second moment {:?})",
                    st.m.as_ref().map_or(0, count),
                    st.named().iter().map(|(k, t)| (*k, count(t))).collect::<Vec<_>>()
                )));
            }
            slots.push(Slot { name, offset, len });
            offset += len;
            masters.push(st.master);
            if let Some(m) = st.m {
                ms.push(m);
            }
            match st.second {
                Second::Factored { row, col } => {
                    vs.push(row);
                    vs.push(col);
                    // The scratch row means, rewritten by every step.
                    vs.push(Tensor::zeros(place.lead, DType::F32, Device::Cpu)?);
                }
                Second::Whole(v) => vs.push(v),
            }
        }
        Ok(Optimizer {
            hyper,
            step,
            slots,
            master: concat(&masters, device)?,
            m: concat(&ms, device)?,
            v: concat(&vs, device)?,
            rule: Rule::Adafactor(Box::new(f)),
        })
    }

    /// Adafactor's placements, when it is the rule.
    pub fn adafactor(&self) -> Option<&Factored> {
        match &self.rule {
            Rule::Adafactor(f) => Some(f),
            _ => None,
        }
    }

    /// Slot `i`'s Adafactor state, as views of the flat buffers.
    pub fn adafactor_slot_state(&self, i: usize) -> Result<SlotState> {
        let (f, slot) = match (self.adafactor(), self.slots.get(i)) {
            (Some(f), Some(s)) => (f, s),
            _ => return Err(Error::msg(format!("optimizer: no Adafactor slot {i}"))),
        };
        let p = f.places[i];
        let (at, n) = (slot.offset, slot.len);
        Ok(SlotState {
            master: self.master.narrow(0, at, n)?,
            m: match f.config.beta1 {
                Some(_) => Some(self.m.narrow(0, at, n)?),
                None => None,
            },
            second: match p.factored() {
                true => Second::Factored {
                    row: self.v.narrow(0, p.state, p.lead * p.rows)?,
                    col: self
                        .v
                        .narrow(0, p.state + p.lead * p.rows, p.lead * p.cols)?,
                },
                false => Second::Whole(self.v.narrow(0, p.state, n)?),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_optimizer_args_parse() {
        let args = [
            "scale_parameter=False",
            "relative_step=False",
            "warmup_init=False",
            "beta1=0.9",
            "eps=(1e-20, 1e-2)",
            "clip_threshold=0.5",
            "decay_rate=-0.6",
        ]
        .map(String::from);
        let c = AdafactorConfig::parse(&args).unwrap();
        assert!(!c.scale_parameter && !c.relative_step && !c.warmup_init);
        assert_eq!(
            (c.beta1, c.eps, c.clip_threshold),
            (Some(0.9), (1e-20, 1e-2), 0.5)
        );
        assert_eq!(c.decay_rate, -0.6);
        assert_eq!(
            AdafactorConfig::parse(&[]).unwrap(),
            AdafactorConfig::default()
        );
        let none = AdafactorConfig::parse(&["beta1=None".to_string()]).unwrap();
        assert_eq!(none.beta1, None);
        for bad in [
            "warmup_init=True relative_step=False",
            "relative_step",
            "beta1=1.5",
            "eps=1e-30",
            "decay_rate=0.5",
            "clip_threshold=0",
            "betas=0.9,0.99",
            "lr=1",
        ] {
            let args: Vec<String> = bad.split(' ').map(String::from).collect();
            assert!(AdafactorConfig::parse(&args).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_rates_follow_transformers() {
        let c = AdafactorConfig::default();
        assert_eq!(c.relative_rate(1), 1e-2);
        assert_eq!(c.relative_rate(10_000), 1e-2);
        assert_eq!(c.relative_rate(40_000), 1.0 / 200.0);
        let w = AdafactorConfig {
            warmup_init: true,
            ..c
        };
        assert_eq!(w.relative_rate(3), 3e-6);
        assert!((c.step(1, 0.0).beta2t).abs() < 1e-15);
        assert!((c.step(32, 0.0).beta2t - (1.0 - 32f64.powf(-0.8))).abs() < 1e-15);
    }

    #[test]
    fn placements_factor_the_last_two_dims() {
        let f = Factored::new(
            AdafactorConfig::default(),
            &[vec![4, 7], vec![5], vec![2, 3, 3, 3], vec![6, 1]],
        );
        let p = &f.places;
        assert_eq!((p[0].lead, p[0].rows, p[0].cols, p[0].state), (1, 4, 7, 0));
        assert_eq!((p[1].rows, p[1].state), (0, 12));
        assert_eq!((p[2].lead, p[2].rows, p[2].cols, p[2].state), (6, 3, 3, 17));
        assert_eq!(
            (p[3].lead, p[3].rows, p[3].cols, p[3].state),
            (1, 6, 1, 17 + 42)
        );
        assert_eq!(f.v_len, 17 + 42 + 8);
    }
}
