//! AdamW (or Prodigy, or Lion) over named trainable tensors, with f32 master copies and moments,
//! plus the gradient accumulator that sums micro-batch gradients before a step. The state is one flat f32 buffer
//! per quantity on the training device, every trainable packed back to back in slot order, so a
//! step is a fixed handful of passes however many tensors the adapter has: one multi-tensor add
//! per micro-batch, one AdamW sweep, and one multi-tensor copy of the new values into the
//! trainables (on CUDA, launches; nothing crosses to the host).

use super::adafactor::{AdafactorConfig, Factored};
use super::adamw8bit::{EightBitConfig, Place, Quantized, SlotMoments};
use super::lion::LionConfig;
use super::prodigy::{ProdigyConfig, ProdigyState};
use crate::autograd::GradStore;
use crate::backend::cpu::optim::{
    AdamW, LionStep, LrRun, Moments8, Rule8, Slot8, State, BLOCK_8BIT,
};
use crate::backend::ops;
use crate::{DType, Device, Error, Result, Tensor};
use std::collections::HashSet;

/// Where one trainable's values sit in the flat buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub offset: usize,
    pub len: usize,
}

/// The update rule an [`Optimizer`] runs over its flat buffers.
#[derive(Clone, Debug)]
pub enum Rule {
    AdamW,
    /// Prodigy's estimate of the step size and its buffers (see `train::prodigy`).
    Prodigy(ProdigyState),
    /// Lion (see `train::lion`): the masters and m only, `v` empty.
    Lion(LionConfig),
    /// AdamW with 8-bit moments (see `train::adamw8bit`): `m` and `v` hold the f32 moments of
    /// the small trainables only.
    AdamW8bit(Box<Quantized>),
    /// Lion with its moment in 8 bits: `m` holds the small trainables' f32 moment, `v` empty.
    Lion8bit(Box<Quantized>),
    /// Adafactor (see `train::adafactor`): `m` the first moment (empty without beta1), `v` the
    /// row and column means (or whole second moments) where the placements put them.
    Adafactor(Box<Factored>),
}

impl Rule {
    /// The name `--optimizer` takes and checkpoints record.
    pub fn name(&self) -> &'static str {
        match self {
            Rule::AdamW => "adamw",
            Rule::Prodigy(_) => "prodigy",
            Rule::Lion(_) => "lion",
            Rule::AdamW8bit(_) => "adamw8bit",
            Rule::Lion8bit(_) => "lion8bit",
            Rule::Adafactor(_) => "adafactor",
        }
    }
}

/// The optimizer a run asks for (`--optimizer`), with its own settings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum OptimizerKind {
    #[default]
    AdamW,
    /// kohya's `--optimizer_type Prodigy` (prodigyopt).
    Prodigy(ProdigyConfig),
    /// kohya's `--optimizer_type Lion` (lion-pytorch).
    Lion(LionConfig),
    /// kohya's `--optimizer_type AdamW8bit` (bitsandbytes).
    AdamW8bit(EightBitConfig),
    /// kohya's `--optimizer_type Lion8bit` (bitsandbytes).
    Lion8bit(EightBitConfig),
    /// kohya's `--optimizer_type AdaFactor` (transformers).
    Adafactor(AdafactorConfig),
}

impl OptimizerKind {
    /// The name `--optimizer` takes and checkpoints record.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::Prodigy(_) => "prodigy",
            OptimizerKind::Lion(_) => "lion",
            OptimizerKind::AdamW8bit(_) => "adamw8bit",
            OptimizerKind::Lion8bit(_) => "lion8bit",
            OptimizerKind::Adafactor(_) => "adafactor",
        }
    }

    /// The name and settings, for the adapter's recorded settings and the log.
    pub fn describe(&self) -> String {
        match self {
            OptimizerKind::AdamW => "adamw".into(),
            OptimizerKind::Prodigy(p) => p.describe(),
            OptimizerKind::Lion(l) => l.describe(),
            OptimizerKind::AdamW8bit(q) | OptimizerKind::Lion8bit(q) => q.describe(self.name()),
            OptimizerKind::Adafactor(c) => c.describe(),
        }
    }

    pub fn prodigy(&self) -> Option<ProdigyConfig> {
        match self {
            OptimizerKind::Prodigy(p) => Some(*p),
            _ => None,
        }
    }

    /// Fresh state of this kind for `params`.
    pub fn build(&self, hyper: AdamW, params: &[(String, Tensor)]) -> Result<Optimizer> {
        let opt = Optimizer::new(hyper, params)?;
        match *self {
            OptimizerKind::AdamW => Ok(opt),
            OptimizerKind::Prodigy(p) => opt.with_prodigy(p),
            OptimizerKind::Lion(l) => opt.with_lion(l),
            OptimizerKind::AdamW8bit(q) => opt.with_8bit(q, true),
            OptimizerKind::Lion8bit(q) => opt.with_8bit(q, false),
            OptimizerKind::Adafactor(c) => {
                let shapes: Vec<Vec<usize>> =
                    params.iter().map(|(_, t)| t.dims().to_vec()).collect();
                opt.with_adafactor(c, &shapes)
            }
        }
    }
}

/// Optimizer state for a fixed, ordered list of trainables.
#[derive(Clone, Debug)]
pub struct Optimizer {
    /// The rate (`--lr`, the starting rate of a schedule), betas, epsilon and weight decay; Lion
    /// reads all but epsilon, Prodigy all.
    pub hyper: AdamW,
    /// Steps taken so far (the next step is `step + 1`).
    pub step: u64,
    pub slots: Vec<Slot>,
    /// (N,) f32 master values, slot after slot.
    pub master: Tensor,
    /// (N,) f32 first and second moments; Lion keeps no second moment (`v` holds 0 values).
    pub m: Tensor,
    pub v: Tensor,
    pub rule: Rule,
}

/// The device all `params` live on, after checking that each can be written in place by the
/// optimizer: a float tensor that is the whole of its own storage (no view, no sharing).
fn check_trainables(params: &[(String, Tensor)]) -> Result<Device> {
    let device = params.first().map(|(_, t)| t.device()).unwrap_or_default();
    let mut storages = HashSet::new();
    for (name, t) in params {
        if t.device() != device {
            return Err(Error::msg(format!(
                "optimizer: `{name}` is on {}, the first trainable on {device}",
                t.device()
            )));
        }
        if !t.dtype().is_float() {
            return Err(Error::DType {
                op: "optimizer (trainables are float)",
                dtype: t.dtype(),
            });
        }
        let whole = t.layout().is_contiguous()
            && t.layout().offset() == 0
            && t.storage().len() == t.elem_count();
        if !whole || !storages.insert(t.storage_id()) {
            return Err(Error::msg(format!(
                "optimizer: `{name}` {:?} is a view or shares its storage; trainables must own theirs",
                t.dims()
            )));
        }
    }
    Ok(device)
}

/// `parts` back to back as one (N,) f32 tensor on `device` (an empty one for no parts), with no
/// autograd history even when the parts are trainables.
pub(crate) fn concat(parts: &[Tensor], device: Device) -> Result<Tensor> {
    if parts.is_empty() {
        return Tensor::zeros(0, DType::F32, device);
    }
    crate::autograd::no_grad(|| {
        let flat: Vec<Tensor> = parts
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.reshape(t.elem_count()))
            .collect::<Result<_>>()?;
        Tensor::cat(&flat, 0)?.to_device(device)
    })
}

impl Optimizer {
    /// Fresh state for `params`: their values as the masters, zero moments.
    pub fn new(hyper: AdamW, params: &[(String, Tensor)]) -> Result<Optimizer> {
        let device = check_trainables(params)?;
        let mut slots = Vec::with_capacity(params.len());
        let mut offset = 0;
        for (name, t) in params {
            let len = t.elem_count();
            slots.push(Slot {
                name: name.clone(),
                offset,
                len,
            });
            offset += len;
        }
        let values: Vec<Tensor> = params.iter().map(|(_, t)| t.clone()).collect();
        Ok(Optimizer {
            hyper,
            step: 0,
            slots,
            master: concat(&values, device)?,
            m: Tensor::zeros(offset, DType::F32, device)?,
            v: Tensor::zeros(offset, DType::F32, device)?,
            rule: Rule::AdamW,
        })
    }

    /// The same trainables stepped by Prodigy (see `train::prodigy`): AdamW's betas, epsilon and
    /// weight decay, d estimated from the run, the masters as they stand now its starting point.
    pub fn with_prodigy(mut self, config: ProdigyConfig) -> Result<Optimizer> {
        let p0 = concat(&[self.master.clone()], self.master.device())?;
        self.rule = Rule::Prodigy(ProdigyState::new(config, p0)?);
        Ok(self)
    }

    /// The same trainables stepped by Lion (see `train::lion`): `hyper`'s betas and weight
    /// decay, no second moment.
    pub fn with_lion(mut self, config: LionConfig) -> Result<Optimizer> {
        self.v = Tensor::zeros(0, DType::F32, self.master.device())?;
        self.rule = Rule::Lion(config);
        Ok(self)
    }

    /// The 8-bit state, when the rule keeps one (AdamW8bit, Lion8bit).
    pub fn quantized(&self) -> Option<&Quantized> {
        match &self.rule {
            Rule::AdamW8bit(q) | Rule::Lion8bit(q) => Some(q),
            _ => None,
        }
    }

    /// Prodigy's state, when it is the rule.
    pub fn prodigy(&self) -> Option<&ProdigyState> {
        match &self.rule {
            Rule::Prodigy(p) => Some(p),
            _ => None,
        }
    }

    /// State read back per trainable (a checkpoint): `(name, master, m, v)`, each flat f32 of
    /// the trainable's length, packed in the order given; `v` may be empty for every slot (no
    /// second moment: Lion's state). The rule is AdamW's until one is set.
    pub fn from_parts(
        hyper: AdamW,
        step: u64,
        parts: Vec<(String, Tensor, Tensor, Tensor)>,
        device: Device,
    ) -> Result<Optimizer> {
        let mut slots = Vec::with_capacity(parts.len());
        let (mut masters, mut ms, mut vs) = (vec![], vec![], vec![]);
        let mut offset = 0;
        let no_v = parts.iter().all(|(.., v)| v.elem_count() == 0);
        for (name, master, m, v) in parts {
            let len = master.elem_count();
            if m.elem_count() != len || (v.elem_count() != len && !no_v) {
                return Err(Error::msg(format!(
                    "optimizer slot `{name}`: {len} master values but {} and {} moments",
                    m.elem_count(),
                    v.elem_count()
                )));
            }
            slots.push(Slot { name, offset, len });
            offset += len;
            masters.push(master);
            ms.push(m);
            vs.push(v);
        }
        Ok(Optimizer {
            hyper,
            step,
            slots,
            master: concat(&masters, device)?,
            m: concat(&ms, device)?,
            v: match no_v {
                true => Tensor::zeros(0, DType::F32, device)?,
                false => concat(&vs, device)?,
            },
            rule: Rule::AdamW,
        })
    }

    /// Bytes of optimizer state on the training device: the masters, the moments (codes and
    /// absmax when they are 8-bit), Prodigy's s and p0.
    pub fn state_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let mut total = bytes(&self.master) + bytes(&self.m) + bytes(&self.v);
        match &self.rule {
            Rule::AdamW8bit(q) | Rule::Lion8bit(q) => {
                total += [&q.q1, &q.q2, &q.absmax1, &q.absmax2, &q.maps]
                    .into_iter()
                    .map(bytes)
                    .sum::<usize>()
            }
            Rule::Prodigy(p) => total += bytes(&p.s) + bytes(&p.p0),
            Rule::AdamW | Rule::Lion(_) | Rule::Adafactor(_) => {}
        }
        total
    }

    /// Values held across all slots.
    pub fn len(&self) -> usize {
        self.master.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One slot's `(master, m, v)` as views of the flat buffers (`v` empty when the rule keeps
    /// no second moment; with 8-bit moments, `m` and `v` dequantized on the host).
    pub fn slot_state(&self, slot: &Slot) -> Result<[Tensor; 3]> {
        if let Some(q) = self.quantized() {
            let i = self
                .slots
                .iter()
                .position(|s| s == slot)
                .ok_or_else(|| Error::msg(format!("optimizer has no slot `{}`", slot.name)))?;
            let n = slot.len;
            let moments = match q.places[i] {
                Place::Float { offset } => SlotMoments::Float {
                    m: self.m.narrow(0, offset, n)?,
                    v: match q.two {
                        true => Some(self.v.narrow(0, offset, n)?),
                        false => None,
                    },
                },
                Place::Bytes { offset, block } => {
                    let blocks = n.div_ceil(BLOCK_8BIT);
                    SlotMoments::Bytes {
                        q1: q.q1.narrow(0, offset, n)?,
                        absmax1: q.absmax1.narrow(0, block, blocks)?,
                        second: match q.two {
                            true => Some((
                                q.q2.narrow(0, offset, n)?,
                                q.absmax2.narrow(0, block, blocks)?,
                            )),
                            false => None,
                        },
                    }
                }
            };
            let (m, v) = moments.values()?;
            let device = self.master.device();
            let v = match v {
                Some(v) => v.to_device(device)?,
                None => Tensor::zeros(0, DType::F32, device)?,
            };
            return Ok([
                self.master.narrow(0, slot.offset, slot.len)?,
                m.to_device(device)?,
                v,
            ]);
        }
        let v = match self.v.elem_count() {
            0 => self.v.clone(),
            _ => self.v.narrow(0, slot.offset, slot.len)?,
        };
        Ok([
            self.master.narrow(0, slot.offset, slot.len)?,
            self.m.narrow(0, slot.offset, slot.len)?,
            v,
        ])
    }

    /// One slot's f32 master values, a view of the flat buffer.
    pub fn slot_master(&self, slot: &Slot) -> Result<Tensor> {
        self.master.narrow(0, slot.offset, slot.len)
    }

    /// Put the slots in the order of `params` (a resumed run lists its trainables in model order).
    pub fn align_to(&mut self, params: &[(String, Tensor)]) -> Result<()> {
        let device = check_trainables(params)?;
        if let Some(f) = self.adafactor() {
            let config = f.config;
            let mut by_name: std::collections::HashMap<&str, usize> = self
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name.as_str(), i))
                .collect();
            let mut parts = Vec::with_capacity(params.len());
            for (name, t) in params {
                let i = by_name.remove(name.as_str()).ok_or_else(|| {
                    Error::msg(format!("optimizer state has no slot for `{name}`"))
                })?;
                parts.push((
                    name.clone(),
                    t.dims().to_vec(),
                    self.adafactor_slot_state(i)?,
                ));
            }
            if let Some(extra) = by_name.keys().next() {
                return Err(Error::msg(format!(
                    "optimizer state has a slot `{extra}` for no parameter of this run"
                )));
            }
            *self = Optimizer::from_adafactor(self.hyper, self.step, config, parts, device)?;
            return Ok(());
        }
        if let Some(q) = self.quantized() {
            let host = q.host_moments(&self.slots, &self.m, &self.v)?;
            let mut by_name: std::collections::HashMap<&str, (&Slot, SlotMoments)> = self
                .slots
                .iter()
                .zip(host)
                .map(|(s, mom)| (s.name.as_str(), (s, mom)))
                .collect();
            let mut parts = Vec::with_capacity(params.len());
            for (name, t) in params {
                let (slot, mom) = by_name.remove(name.as_str()).ok_or_else(|| {
                    Error::msg(format!("optimizer state has no slot for `{name}`"))
                })?;
                if slot.len != t.elem_count() {
                    return Err(Error::msg(format!(
                        "optimizer slot `{name}` has {} values, the parameter {}",
                        slot.len,
                        t.elem_count()
                    )));
                }
                let master = self.master.narrow(0, slot.offset, slot.len)?;
                parts.push((name.clone(), master, mom));
            }
            if let Some(extra) = by_name.keys().next() {
                return Err(Error::msg(format!(
                    "optimizer state has a slot `{extra}` for no parameter of this run"
                )));
            }
            let (config, two) = (q.config, q.two);
            *self = Optimizer::from_parts8(self.hyper, self.step, config, two, parts, device)?;
            return Ok(());
        }
        let mut by_name: std::collections::HashMap<&str, &Slot> =
            self.slots.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut parts = Vec::with_capacity(params.len());
        let (mut s, mut p0) = (Vec::new(), Vec::new());
        for (name, t) in params {
            let slot = by_name
                .remove(name.as_str())
                .ok_or_else(|| Error::msg(format!("optimizer state has no slot for `{name}`")))?;
            if slot.len != t.elem_count() {
                return Err(Error::msg(format!(
                    "optimizer slot `{name}` has {} values, the parameter {}",
                    slot.len,
                    t.elem_count()
                )));
            }
            let [master, m, v] = self.slot_state(slot)?;
            parts.push((name.clone(), master, m, v));
            if let Some(pr) = self.prodigy() {
                s.push(pr.s.narrow(0, slot.offset, slot.len)?);
                p0.push(pr.p0.narrow(0, slot.offset, slot.len)?);
            }
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(Error::msg(format!(
                "optimizer state has a slot `{extra}` for no parameter of this run"
            )));
        }
        let rule = match std::mem::replace(&mut self.rule, Rule::AdamW) {
            Rule::Prodigy(pr) => Rule::Prodigy(ProdigyState {
                s: concat(&s, device)?,
                p0: concat(&p0, device)?,
                ..pr
            }),
            other => other,
        };
        *self = Optimizer::from_parts(self.hyper, self.step, parts, device)?;
        self.rule = rule;
        Ok(())
    }

    /// Apply one step with learning rate `lr` to the gradient `grad_scale * grad_sum` (a flat
    /// (N,) f32 tensor in slot order, as [`GradAccumulator`] holds it), then write the new
    /// values into `params` in place.
    pub fn step(
        &mut self,
        params: &[(String, Tensor)],
        grad_sum: &Tensor,
        grad_scale: f32,
        lr: f64,
    ) -> Result<()> {
        let rates = vec![lr; self.slots.len()];
        self.step_rates(params, grad_sum, grad_scale, &rates)
    }

    /// [`Optimizer::step`] with a learning rate per slot, as PyTorch's AdamW steps parameter
    /// groups: each slot moves at its own rate, its decoupled weight decay included. Slots of
    /// equal rate that follow each other form one run; interleaved groups (LoRA+'s lora_up
    /// beside every lora_down) cost one launch on CUDA all the same.
    pub fn step_rates(
        &mut self,
        params: &[(String, Tensor)],
        grad_sum: &Tensor,
        grad_scale: f32,
        rates: &[f64],
    ) -> Result<()> {
        if rates.len() != self.slots.len() {
            return Err(Error::msg(format!(
                "optimizer: {} learning rates for {} slots",
                rates.len(),
                self.slots.len()
            )));
        }
        let aligned = params.len() == self.slots.len()
            && params
                .iter()
                .zip(&self.slots)
                .all(|((name, t), s)| *name == s.name && t.elem_count() == s.len);
        if !aligned {
            return Err(Error::msg(format!(
                "optimizer: {} params do not match its {} slots (names and sizes, in order)",
                params.len(),
                self.slots.len()
            )));
        }
        let whole = grad_sum.layout().is_contiguous()
            && grad_sum.layout().offset() == 0
            && grad_sum.storage().len() == self.len();
        if grad_sum.dtype() != DType::F32 || !whole {
            return Err(Error::msg(format!(
                "optimizer: the gradient must be one flat f32 buffer of {} values, got {} {:?}",
                self.len(),
                grad_sum.dtype(),
                grad_sum.dims()
            )));
        }
        let mut runs: Vec<LrRun> = Vec::new();
        for (slot, &lr) in self.slots.iter().zip(rates) {
            let range = slot.offset..slot.offset + slot.len;
            match runs.last_mut() {
                Some(last) if last.lr == lr && last.range.end == range.start => {
                    last.range.end = range.end
                }
                _ => runs.push(LrRun { range, lr }),
            }
        }
        if let Rule::Lion(config) = &self.rule {
            let h = LionStep {
                beta1: self.hyper.beta1,
                beta2: self.hyper.beta2,
                weight_decay: config.decay(self.hyper.weight_decay, self.hyper.lr),
            };
            self.step += 1;
            ops::lion_step_runs(
                &h,
                &mut self.master.storage_mut(),
                &mut self.m.storage_mut(),
                &grad_sum.storage(),
                grad_scale,
                &runs,
            )?;
            return self.write_params(params);
        }
        if let Some(q) = self.quantized() {
            let table: Vec<Slot8> = self
                .slots
                .iter()
                .zip(&q.places)
                .zip(rates)
                .map(|((slot, place), &lr)| {
                    let (state, block) = match *place {
                        Place::Float { offset } => (offset, None),
                        Place::Bytes { offset, block } => (offset, Some(block)),
                    };
                    Slot8 {
                        offset: slot.offset,
                        len: slot.len,
                        state,
                        block,
                        lr,
                    }
                })
                .collect();
            let rule = match q.two {
                true => Rule8::AdamW {
                    h: self.hyper,
                    t: self.step + 1,
                },
                false => Rule8::Lion(LionStep {
                    beta1: self.hyper.beta1,
                    beta2: self.hyper.beta2,
                    weight_decay: self.hyper.weight_decay,
                }),
            };
            ops::step_8bit(
                &rule,
                &q.maps.storage(),
                &mut self.master.storage_mut(),
                Moments8 {
                    m: &mut self.m.storage_mut(),
                    v: &mut self.v.storage_mut(),
                    q1: &mut q.q1.storage_mut(),
                    q2: &mut q.q2.storage_mut(),
                    absmax1: &mut q.absmax1.storage_mut(),
                    absmax2: &mut q.absmax2.storage_mut(),
                },
                &grad_sum.storage(),
                grad_scale,
                &table,
            )?;
            self.step += 1;
            return self.write_params(params);
        }
        if let Some(f) = self.adafactor() {
            let t = self.step + 1;
            let table = f.table(&self.slots, rates, t);
            let h = f.config.step(t, self.hyper.weight_decay);
            ops::adafactor_step(
                &h,
                &mut self.master.storage_mut(),
                &mut self.m.storage_mut(),
                &mut self.v.storage_mut(),
                &grad_sum.storage(),
                grad_scale,
                &table,
            )?;
            self.step = t;
            return self.write_params(params);
        }
        if let Rule::Prodigy(pr) = &mut self.rule {
            // prodigyopt steps every group at one rate, or 0 (a frozen group).
            let lr = rates.iter().copied().fold(0.0, f64::max);
            if let Some(r) = rates.iter().find(|&&r| r != 0.0 && r != lr) {
                return Err(Error::msg(format!(
                    "Prodigy steps every trainable at one learning rate (or 0): {r} beside {lr}"
                )));
            }
            let live: Vec<std::ops::Range<usize>> = runs
                .iter()
                .filter(|r| r.lr != 0.0)
                .map(|r| r.range.clone())
                .collect();
            self.step += 1;
            let (master, m, v) = (&self.master, &self.m, &self.v);
            pr.step(&self.hyper, master, m, v, grad_sum, grad_scale, lr, &live)?;
            return self.write_params(params);
        }
        self.step += 1;
        {
            let state = State {
                p: &mut *self.master.storage_mut(),
                m: &mut *self.m.storage_mut(),
                v: &mut *self.v.storage_mut(),
            };
            let g = grad_sum.storage();
            ops::adamw_step_runs(&self.hyper, self.step, state, &g, grad_scale, &runs)?;
        }
        self.write_params(params)
    }

    /// Multiplies the masters of the slots `factors` names (slot index, factor), as PyTorch's
    /// in-place `*=` on a parameter, then rewrites `params` (in slot order) from the masters.
    /// The moments are left as they are.
    pub fn scale_slots(
        &mut self,
        params: &[(String, Tensor)],
        factors: &[(usize, f64)],
    ) -> Result<()> {
        let by_slot: std::collections::HashMap<usize, f64> = factors.iter().copied().collect();
        if let Some(i) = by_slot.keys().find(|&&i| i >= self.slots.len()) {
            return Err(Error::msg(format!(
                "optimizer: no slot {i} of {}",
                self.slots.len()
            )));
        }
        let parts = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let values = self.master.narrow(0, s.offset, s.len)?;
                match by_slot.get(&i) {
                    Some(&f) => values.scale(f),
                    None => Ok(values),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        self.master = concat(&parts, self.master.device())?;
        self.write_params(params)
    }

    /// Overwrites each of `params` (in slot order) with its master values, rounded to its dtype.
    fn write_params(&self, params: &[(String, Tensor)]) -> Result<()> {
        // check_trainables (at construction) guarantees distinct storages: no guard waits on another.
        let mut guards: Vec<_> = params.iter().map(|(_, t)| t.storage_mut()).collect();
        let mut targets: Vec<_> = guards
            .iter_mut()
            .zip(&self.slots)
            .map(|(g, s)| (&mut **g, s.offset))
            .collect();
        ops::scatter(&self.master.storage(), &mut targets)
    }
}

/// Sums gradients over micro-batches into one flat f32 buffer laid out like the optimizer's
/// slots; a missing gradient counts as zero.
#[derive(Clone, Debug)]
pub struct GradAccumulator {
    /// (N,) f32 sums.
    pub sum: Tensor,
    offsets: Vec<usize>,
    pub count: usize,
}

impl GradAccumulator {
    pub fn new(opt: &Optimizer) -> Result<GradAccumulator> {
        Ok(GradAccumulator {
            sum: Tensor::zeros(opt.len(), DType::F32, opt.master.device())?,
            offsets: opt.slots.iter().map(|s| s.offset).collect(),
            count: 0,
        })
    }

    /// Add one micro-batch's gradients (`params` in the optimizer's slot order).
    pub fn add(&mut self, params: &[(String, Tensor)], grads: &GradStore) -> Result<()> {
        if params.len() != self.offsets.len() {
            return Err(Error::msg(format!(
                "gradient accumulator: {} params for {} slots",
                params.len(),
                self.offsets.len()
            )));
        }
        let mut parts = Vec::with_capacity(params.len());
        for ((name, t), &offset) in params.iter().zip(&self.offsets) {
            if let Some(g) = grads.get(t) {
                if g.elem_count() != t.elem_count() {
                    return Err(Error::msg(format!(
                        "gradient of `{name}` is {:?}, the parameter {:?}",
                        g.dims(),
                        t.dims()
                    )));
                }
                // Contiguous f32 (the usual case) is the gradient itself: no copy before the add.
                parts.push((g.to_dtype(DType::F32)?.contiguous()?, offset));
            }
        }
        let guards: Vec<_> = parts.iter().map(|(g, _)| g.storage()).collect();
        let args: Vec<_> = guards
            .iter()
            .zip(&parts)
            .map(|(s, (g, off))| ((&**s, g.layout()), *off))
            .collect();
        ops::gather_add(&mut self.sum.storage_mut(), &args)?;
        self.count += 1;
        Ok(())
    }

    /// The factor that turns the sum into the mean over the micro-batches added.
    pub fn mean_scale(&self) -> f32 {
        1.0 / self.count.max(1) as f32
    }

    /// The global L2 norm of the mean gradient: every trainable together, as
    /// `torch.nn.utils.clip_grad_norm_` measures it (one reduction; on CUDA, one scalar read).
    pub fn mean_norm(&self) -> Result<f64> {
        let sq = ops::sqnorm(&self.sum.storage())?;
        Ok(self.mean_scale() as f64 * sq.sqrt())
    }

    /// The mean gradient's norm, and the scale [`Optimizer::step`] applies to the sum: the
    /// mean's, times [`clip_factor`] when clipping to `max_norm`.
    pub fn clipped(&self, max_norm: Option<f64>) -> Result<Clipped> {
        let norm = self.mean_norm()?;
        let factor = max_norm.map_or(1.0, |max| clip_factor(norm, max));
        Ok(Clipped {
            norm,
            scale: (self.mean_scale() as f64 * factor) as f32,
        })
    }
}

/// A step's gradient measured and, where asked, clipped (see [`GradAccumulator::clipped`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Clipped {
    /// The global norm of the mean gradient, before clipping.
    pub norm: f64,
    /// The factor the optimizer applies to the accumulated sum.
    pub scale: f32,
}

/// The factor `torch.nn.utils.clip_grad_norm_` scales gradients of global norm `norm` by to clip
/// them to `max_norm`: `max_norm / (norm + 1e-6)`, at most 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::optim::adamw_step;

    fn vars(sizes: &[usize], seed: u64) -> Vec<(String, Tensor)> {
        let mut rng = crate::tensor::Rng::new(seed);
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let t = Tensor::randn(n, &mut rng, DType::F32, Device::Cpu).unwrap();
                (format!("p{i}"), t.var().unwrap())
            })
            .collect()
    }

    /// Two micro-batches, one of which has no gradient for `p1`: the flat step must equal the
    /// oracle applied tensor by tensor to the mean gradients, and land in the tensors themselves.
    #[test]
    fn flat_step_matches_the_per_tensor_oracle() {
        let params = vars(&[5, 3, 4097], 1);
        let mut opt = Optimizer::new(AdamW::default(), &params).unwrap();
        assert!(
            !opt.master.tracks(),
            "the master copy must not hold autograd history"
        );
        let mut acc = GradAccumulator::new(&opt).unwrap();
        let grads1: Vec<Tensor> = vars(&[5, 3, 4097], 2).into_iter().map(|(_, t)| t).collect();
        let grads2: Vec<Tensor> = vars(&[5, 3, 4097], 3).into_iter().map(|(_, t)| t).collect();
        for (skip, gs) in [(None, &grads1), (Some(1), &grads2)] {
            let mut store = GradStore::default();
            for (i, ((_, p), g)) in params.iter().zip(gs.iter()).enumerate() {
                if skip != Some(i) {
                    store.insert(p.id(), g.clone());
                }
            }
            acc.add(&params, &store).unwrap();
        }
        let before: Vec<Vec<f32>> = params
            .iter()
            .map(|(_, p)| p.to_vec_f32().unwrap())
            .collect();
        for step in 1..=2 {
            opt.step(&params, &acc.sum, acc.mean_scale(), 1e-2).unwrap();
            assert_eq!(opt.step, step);
        }
        let h = AdamW {
            lr: 1e-2,
            ..AdamW::default()
        };
        for (i, (_, p)) in params.iter().enumerate() {
            let g1 = grads1[i].to_vec_f32().unwrap();
            let g2 = grads2[i].to_vec_f32().unwrap();
            let sum: Vec<f32> = if i == 1 {
                g1
            } else {
                g1.iter().zip(&g2).map(|(a, b)| a + b).collect()
            };
            let mut want = before[i].clone();
            let (mut m, mut v) = (vec![0.0; want.len()], vec![0.0; want.len()]);
            for t in 1..=2 {
                let s = State {
                    p: &mut want[..],
                    m: &mut m[..],
                    v: &mut v[..],
                };
                adamw_step(&h, t, s, &sum, 0.5);
            }
            assert_eq!(p.to_vec_f32().unwrap(), want, "p{i}");
        }
    }

    /// Interleaved rates (LoRA+'s pattern: one rate, another, the first again, then a run of
    /// two equal ones): each slot moves as the oracle moves it at its own rate; a rate list
    /// that does not cover the slots is refused.
    #[test]
    fn each_slot_steps_at_its_own_rate() {
        let sizes = [5, 3, 7, 2, 4];
        let rates = [1e-2, 3e-3, 1e-2, 5e-4, 5e-4];
        let params = vars(&sizes, 6);
        let grads: Vec<Tensor> = vars(&sizes, 7).into_iter().map(|(_, t)| t).collect();
        let mut opt = Optimizer::new(AdamW::default(), &params).unwrap();
        let mut store = GradStore::default();
        for ((_, p), g) in params.iter().zip(&grads) {
            store.insert(p.id(), g.clone());
        }
        let mut acc = GradAccumulator::new(&opt).unwrap();
        acc.add(&params, &store).unwrap();
        let before: Vec<Vec<f32>> = params
            .iter()
            .map(|(_, p)| p.to_vec_f32().unwrap())
            .collect();
        let err = opt
            .step_rates(&params, &acc.sum, 1.0, &rates[..2])
            .unwrap_err();
        assert!(
            err.to_string().contains("2 learning rates for 5 slots"),
            "{err}"
        );
        opt.step_rates(&params, &acc.sum, 1.0, &rates).unwrap();
        for (i, (_, p)) in params.iter().enumerate() {
            let h = AdamW {
                lr: rates[i],
                ..AdamW::default()
            };
            let mut want = before[i].clone();
            let (mut m, mut v) = (vec![0.0; want.len()], vec![0.0; want.len()]);
            let s = State {
                p: &mut want[..],
                m: &mut m[..],
                v: &mut v[..],
            };
            adamw_step(&h, 1, s, &grads[i].to_vec_f32().unwrap(), 1.0);
            assert_eq!(p.to_vec_f32().unwrap(), want, "p{i}");
        }
    }

    /// The norm is the mean gradient's, over every slot together; clipping scales the sum so
    /// the mean gradient's norm becomes the bound (PyTorch's 1e-6 aside), and a bound above the
    /// norm leaves the mean's scale exactly.
    #[test]
    fn clipping_bounds_the_mean_gradients_global_norm() {
        let params = vars(&[3, 5], 8);
        let opt = Optimizer::new(AdamW::default(), &params).unwrap();
        let mut acc = GradAccumulator::new(&opt).unwrap();
        let mut sum = [0f64; 8];
        for seed in [9, 10] {
            let mut store = GradStore::default();
            let grads = vars(&[3, 5], seed);
            for ((_, p), (_, g)) in params.iter().zip(&grads) {
                store.insert(p.id(), g.clone());
            }
            let flat: Vec<f32> = grads
                .iter()
                .flat_map(|(_, g)| g.to_vec_f32().unwrap())
                .collect();
            for (s, g) in sum.iter_mut().zip(flat) {
                *s += g as f64;
            }
            acc.add(&params, &store).unwrap();
        }
        let want = sum
            .iter()
            .map(|s| (s / 2.0) * (s / 2.0))
            .sum::<f64>()
            .sqrt();
        let free = acc.clipped(None).unwrap();
        assert!(
            (free.norm - want).abs() <= 1e-6 * want,
            "{} vs {want}",
            free.norm
        );
        assert_eq!(free.scale, 0.5);
        assert_eq!(acc.clipped(Some(2.0 * want)).unwrap().scale, 0.5);
        let tight = acc.clipped(Some(want / 4.0)).unwrap();
        assert_eq!(tight.norm, free.norm);
        let clipped_norm = tight.scale as f64 / 0.5 * free.norm;
        assert!(
            (clipped_norm - want / 4.0).abs() <= 1e-5 * want,
            "{clipped_norm} vs {}",
            want / 4.0
        );
        assert_eq!(clip_factor(1.0, 3.0), 1.0);
        assert_eq!(clip_factor(4.0, 1.0), 1.0 / (4.0 + 1e-6));
    }

    #[test]
    fn trainables_must_own_their_storage() {
        let params = vars(&[6], 4);
        let view = params[0].1.narrow(0, 1, 3).unwrap();
        let err = Optimizer::new(AdamW::default(), &[("v".into(), view)]).unwrap_err();
        assert!(err.to_string().contains("`v`"), "{err}");
        let twice = vec![params[0].clone(), ("again".into(), params[0].1.clone())];
        let err = Optimizer::new(AdamW::default(), &twice).unwrap_err();
        assert!(err.to_string().contains("`again`"), "{err}");
    }

    #[test]
    fn resumed_slots_follow_the_run_order() {
        let params = vars(&[2, 7, 1], 5);
        let opt = Optimizer::new(AdamW::default(), &params).unwrap();
        let mut reordered = opt.clone();
        let swapped = vec![params[2].clone(), params[0].clone(), params[1].clone()];
        reordered.align_to(&swapped).unwrap();
        let names: Vec<&str> = reordered.slots.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["p2", "p0", "p1"]);
        for (slot, (_, t)) in reordered.slots.iter().zip(&swapped) {
            let [master, ..] = reordered.slot_state(slot).unwrap();
            assert_eq!(master.to_vec_f32().unwrap(), t.to_vec_f32().unwrap());
        }
        let err = reordered.align_to(&params[..2]).unwrap_err();
        assert!(err.to_string().contains("p2"), "{err}");
    }
}
