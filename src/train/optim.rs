//! AdamW over named trainable tensors, with f32 master copies and moments, plus the gradient
//! accumulator that sums micro-batch gradients before a step. All of it lives on the training
//! device as flat f32 tensors, one per trainable: on CUDA a step is one `optim_adamw_step_f32`
//! launch per tensor and nothing crosses to the host.

use crate::autograd::GradStore;
use crate::backend::cpu::optim::AdamW;
use crate::backend::ops;
use crate::{DType, Error, Result, Tensor};

/// One trainable tensor's optimizer slot: flat (N,) f32 tensors on the parameter's device.
#[derive(Clone, Debug)]
pub struct Slot {
    pub name: String,
    pub master: Tensor,
    pub m: Tensor,
    pub v: Tensor,
}

/// A flat f32 copy of `t` in storage of its own (the optimizer updates it in place).
fn flat_f32(t: &Tensor) -> Result<Tensor> {
    let c = t.to_dtype(DType::F32)?;
    let owned = c.storage().copy_strided(c.layout())?;
    Ok(Tensor::from_storage(owned, t.elem_count(), None))
}

impl Slot {
    /// A fresh slot for `t`: its values as the master copy, zero moments.
    pub fn new(name: &str, t: &Tensor) -> Result<Slot> {
        let n = t.elem_count();
        Ok(Slot {
            name: name.to_owned(),
            master: flat_f32(t)?,
            m: Tensor::zeros(n, DType::F32, t.device())?,
            v: Tensor::zeros(n, DType::F32, t.device())?,
        })
    }
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
            .map(|(name, t)| Slot::new(name, t))
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
            if slot.master.elem_count() != t.elem_count() {
                return Err(Error::msg(format!(
                    "optimizer slot `{name}` has {} values, the parameter {}",
                    slot.master.elem_count(),
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

    /// Apply one step with learning rate `lr` to the mean gradients `grads` (one flat f32 tensor
    /// per slot, on the slot's device), writing the new values into `params` in place.
    pub fn step(&mut self, params: &[(String, Tensor)], grads: &[Tensor], lr: f64) -> Result<()> {
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
            if slot.name != *name || g.elem_count() != slot.master.elem_count() {
                return Err(Error::msg(format!(
                    "optimizer: slot `{}` does not match parameter `{name}`",
                    slot.name
                )));
            }
            ops::adamw_step(
                &hyper,
                self.step,
                &mut slot.master.storage_mut(),
                &g.storage(),
                &mut slot.m.storage_mut(),
                &mut slot.v.storage_mut(),
            )?;
            t.set(&slot.master.reshape(t.dims().to_vec())?)?;
        }
        Ok(())
    }
}

/// Sums gradients over micro-batches on the parameters' device; a missing gradient counts as zero.
#[derive(Clone, Debug)]
pub struct GradAccumulator {
    /// Flat f32 sums, one per parameter.
    pub sums: Vec<Tensor>,
    pub count: usize,
}

impl GradAccumulator {
    pub fn new(params: &[(String, Tensor)]) -> Result<GradAccumulator> {
        Ok(GradAccumulator {
            sums: params
                .iter()
                .map(|(_, t)| Tensor::zeros(t.elem_count(), DType::F32, t.device()))
                .collect::<Result<_>>()?,
            count: 0,
        })
    }

    pub fn add(&mut self, params: &[(String, Tensor)], grads: &GradStore) -> Result<()> {
        for (sum, (_, t)) in self.sums.iter_mut().zip(params) {
            if let Some(g) = grads.get(t) {
                // A view when the gradient is contiguous f32 (the usual case): no copy before the add.
                let g = g.to_dtype(DType::F32)?.reshape(t.elem_count())?;
                *sum = sum.add(&g)?;
            }
        }
        self.count += 1;
        Ok(())
    }

    /// The mean gradient over the accumulated micro-batches, and a reset accumulator.
    pub fn take_mean(&mut self) -> Result<Vec<Tensor>> {
        let n = self.count.max(1) as f64;
        let mut out = Vec::with_capacity(self.sums.len());
        // One divisor per device, not one upload per tensor.
        let mut divisor: Option<Tensor> = None;
        for s in &mut self.sums {
            let d = match &divisor {
                Some(d) if d.device() == s.device() => d.clone(),
                _ => Tensor::full(n, 1usize, DType::F32, s.device())?,
            };
            out.push(s.div(&d)?);
            divisor = Some(d);
            *s = s.zeros_like()?;
        }
        self.count = 0;
        Ok(out)
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
