//! AdamW over named trainable tensors, with f32 master copies and moments, plus the gradient
//! accumulator that sums micro-batch gradients before a step.

use crate::autograd::GradStore;
use crate::backend::cpu::optim::{adamw_step, AdamW};
use crate::{Error, Result, Tensor};

/// One trainable tensor's optimizer slot.
#[derive(Clone, Debug)]
pub struct Slot {
    pub name: String,
    pub master: Vec<f32>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// AdamW state for a fixed, ordered list of trainables.
#[derive(Clone, Debug)]
pub struct Optimizer {
    pub hyper: AdamW,
    /// Steps taken so far (the next step is `step + 1`).
    pub step: u64,
    pub slots: Vec<Slot>,
}

impl Optimizer {
    pub fn new(hyper: AdamW, params: &[(String, Tensor)]) -> Result<Optimizer> {
        let slots = params
            .iter()
            .map(|(name, t)| {
                let master = t.to_vec_f32()?;
                let n = master.len();
                Ok(Slot {
                    name: name.clone(),
                    master,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Optimizer {
            hyper,
            step: 0,
            slots,
        })
    }

    /// Put the slots in the order of `params` (a resumed run lists its trainables in model order).
    pub fn align_to(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        let mut by_name: std::collections::HashMap<String, Slot> =
            self.slots.drain(..).map(|s| (s.name.clone(), s)).collect();
        for (name, t) in params {
            let slot = by_name
                .remove(name)
                .ok_or_else(|| Error::msg(format!("optimizer state has no slot for `{name}`")))?;
            if slot.master.len() != t.elem_count() {
                return Err(Error::msg(format!(
                    "optimizer slot `{name}` has {} values, the parameter {}",
                    slot.master.len(),
                    t.elem_count()
                )));
            }
            self.slots.push(slot);
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(Error::msg(format!(
                "optimizer state has a slot `{extra}` for no parameter of this run"
            )));
        }
        Ok(())
    }

    /// Apply one step with learning rate `lr` to the summed gradients `grads` (one vector per
    /// slot, already averaged), writing the new values into `params` in place.
    pub fn step(&mut self, params: &[(String, Tensor)], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if params.len() != self.slots.len() || grads.len() != self.slots.len() {
            return Err(Error::msg(format!(
                "optimizer: {} slots, {} params, {} gradients",
                self.slots.len(),
                params.len(),
                grads.len()
            )));
        }
        self.step += 1;
        let hyper = AdamW { lr, ..self.hyper };
        for ((slot, (name, t)), g) in self.slots.iter_mut().zip(params).zip(grads) {
            if slot.name != *name || g.len() != slot.master.len() {
                return Err(Error::msg(format!(
                    "optimizer: slot `{}` does not match parameter `{name}`",
                    slot.name
                )));
            }
            adamw_step(
                &hyper,
                self.step,
                &mut slot.master,
                g,
                &mut slot.m,
                &mut slot.v,
            );
            let value = Tensor::from_slice(&slot.master, t.dims().to_vec(), crate::Device::Cpu)?;
            t.set(&value)?;
        }
        Ok(())
    }
}

/// Sums gradients over micro-batches; a missing gradient counts as zero.
#[derive(Clone, Debug)]
pub struct GradAccumulator {
    pub sums: Vec<Vec<f32>>,
    pub count: usize,
}

impl GradAccumulator {
    pub fn new(params: &[(String, Tensor)]) -> GradAccumulator {
        GradAccumulator {
            sums: params
                .iter()
                .map(|(_, t)| vec![0.0; t.elem_count()])
                .collect(),
            count: 0,
        }
    }

    pub fn add(&mut self, params: &[(String, Tensor)], grads: &GradStore) -> Result<()> {
        for (sum, (_, t)) in self.sums.iter_mut().zip(params) {
            if let Some(g) = grads.get(t) {
                for (s, v) in sum.iter_mut().zip(g.to_vec_f32()?) {
                    *s += v;
                }
            }
        }
        self.count += 1;
        Ok(())
    }

    /// The mean gradient over the accumulated micro-batches, and a reset accumulator.
    pub fn take_mean(&mut self) -> Vec<Vec<f32>> {
        let n = self.count.max(1) as f32;
        let out = self
            .sums
            .iter()
            .map(|s| s.iter().map(|v| v / n).collect())
            .collect();
        for s in &mut self.sums {
            s.iter_mut().for_each(|v| *v = 0.0);
        }
        self.count = 0;
        out
    }
}

/// Learning-rate schedule over optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    Constant,
    /// Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at `total`.
    WarmupCosine {
        warmup: u64,
        total: u64,
    },
}

impl LrSchedule {
    /// The multiplier on the base rate for 1-based step `t`.
    pub fn factor(&self, t: u64) -> f64 {
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::WarmupCosine { warmup, total } => {
                if t <= warmup && warmup > 0 {
                    t as f64 / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let progress = ((t - warmup) as f64 / span).min(1.0);
                    0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_shape() {
        let s = LrSchedule::WarmupCosine {
            warmup: 10,
            total: 110,
        };
        assert_eq!(s.factor(5), 0.5);
        assert_eq!(s.factor(10), 1.0);
        assert!((s.factor(60) - 0.5).abs() < 1e-12);
        assert!(s.factor(110).abs() < 1e-12);
        assert_eq!(LrSchedule::Constant.factor(1000), 1.0);
    }
}
