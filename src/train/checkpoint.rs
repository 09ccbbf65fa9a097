//! Training checkpoints: an adapter file (loadable by `kstyle generate` as is) plus the optimizer
//! moments and masters, the step, the RNG state and the data order, written atomically, so that
//! `--resume` continues bit for bit.

use super::adafactor::{Second, SlotState};
use super::adamw8bit::SlotMoments;
use super::optim::{concat, Optimizer, OptimizerKind, Rule};
use super::prodigy::{ProdigyScalars, ProdigyState};
use crate::backend::cpu::optim::AdamW;
use crate::formats::adapter::Adapter;
use crate::formats::kohya::ModuleIndex;
use crate::tensor::{save_safetensors, Rng, SafeTensorsFile};
use crate::{Device, Error, Result, Tensor};
use std::path::Path;

/// Where the loop stands between two optimizer steps.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// Next batch in `order`.
    pub pos: usize,
    /// This epoch's batches: the shuffled visits of the dataset, grouped (see
    /// `data::epoch_batches`).
    pub order: Vec<Vec<usize>>,
    pub rng: Rng,
}

const OPTIM: &str = "kstyle.optim";
/// Prodigy's running scalars (d, d_max, d_numerator, k) as JSON; present when Prodigy trained.
const PRODIGY: &str = "kstyle.ckpt.prodigy";
/// The optimizer that wrote the state (`adamw`, `prodigy`, `lion`). Checkpoints from before it
/// are AdamW's, or Prodigy's when they hold its scalars.
const RULE: &str = "kstyle.ckpt.optimizer";

pub fn save_checkpoint(
    path: &Path,
    adapter: &Adapter,
    index: &ModuleIndex,
    opt: &Optimizer,
    state: &TrainState,
) -> Result<()> {
    let mut tensors = adapter.file_tensors(index)?;
    if opt.adafactor().is_some() {
        // The masters and each trainable's moments under transformers' state names.
        let host = Optimizer {
            master: opt.master.to_device(Device::Cpu)?,
            m: opt.m.to_device(Device::Cpu)?,
            v: opt.v.to_device(Device::Cpu)?,
            ..opt.clone()
        };
        for (i, s) in host.slots.iter().enumerate() {
            let state = host.adafactor_slot_state(i)?;
            tensors.push((format!("{OPTIM}.master.{}", s.name), state.master.clone()));
            for (kind, t) in state.named() {
                tensors.push((format!("{OPTIM}.{kind}.{}", s.name), t));
            }
        }
    } else if let Some(q) = opt.quantized() {
        // The masters, and each trainable's moments as the step keeps them (codes and absmax
        // for the quantized ones): a resume continues from the same bytes.
        let master = opt.master.to_device(Device::Cpu)?;
        let moments = q.host_moments(&opt.slots, &opt.m, &opt.v)?;
        for (s, mom) in opt.slots.iter().zip(moments) {
            let values = master.narrow(0, s.offset, s.len)?;
            tensors.push((format!("{OPTIM}.master.{}", s.name), values));
            for (kind, t) in mom.named() {
                tensors.push((format!("{OPTIM}.{kind}.{}", s.name), t));
            }
        }
    } else {
        // One download per flat buffer, then per-trainable views of the host copies.
        let host = Optimizer {
            master: opt.master.to_device(Device::Cpu)?,
            m: opt.m.to_device(Device::Cpu)?,
            v: opt.v.to_device(Device::Cpu)?,
            rule: Rule::AdamW,
            ..opt.clone()
        };
        let prodigy = match opt.prodigy() {
            Some(p) => Some((p.s.to_device(Device::Cpu)?, p.p0.to_device(Device::Cpu)?)),
            None => None,
        };
        for s in &host.slots {
            let state = host.slot_state(s)?;
            for (kind, v) in ["master", "m", "v"].into_iter().zip(state) {
                // Lion keeps no second moment.
                if v.elem_count() == s.len {
                    tensors.push((format!("{OPTIM}.{kind}.{}", s.name), v));
                }
            }
            if let Some((sv, p0)) = &prodigy {
                for (kind, t) in [("s", sv), ("p0", p0)] {
                    let v = t.narrow(0, s.offset, s.len)?;
                    tensors.push((format!("{OPTIM}.{kind}.{}", s.name), v));
                }
            }
        }
    }
    let mut meta = adapter.metadata();
    meta.insert(RULE.into(), opt.rule.name().into());
    if let Some(p) = opt.prodigy() {
        let scalars = serde_json::to_string(&p.scalars()).unwrap_or_default();
        meta.insert(PRODIGY.into(), scalars);
    }
    let rng: Vec<String> = state.rng.state().iter().map(|w| w.to_string()).collect();
    meta.insert("kstyle.ckpt.step".into(), state.step.to_string());
    meta.insert("kstyle.ckpt.epoch".into(), state.epoch.to_string());
    meta.insert("kstyle.ckpt.pos".into(), state.pos.to_string());
    meta.insert(
        "kstyle.ckpt.order".into(),
        serde_json::to_string(&state.order).unwrap_or_default(),
    );
    meta.insert("kstyle.ckpt.rng".into(), rng.join(","));
    meta.insert("kstyle.ckpt.optim_step".into(), opt.step.to_string());
    save_safetensors(path, &tensors, Some(meta))
}

/// An epoch's batches as the checkpoint holds them: a list of batches, or (checkpoints written
/// before batches) a flat list of visits, each its own batch.
fn parse_order(text: &str) -> serde_json::Result<Vec<Vec<usize>>> {
    match serde_json::from_str::<Vec<Vec<usize>>>(text) {
        Ok(batches) => Ok(batches),
        Err(e) => match serde_json::from_str::<Vec<usize>>(text) {
            Ok(flat) => Ok(flat.into_iter().map(|i| vec![i]).collect()),
            Err(_) => Err(e),
        },
    }
}

/// The adapter, optimizer and loop state of a checkpoint. `hyper` and `kind` supply the
/// optimizer settings of the resumed run (they are run-time knobs, not state); the checkpoint
/// must come from the same optimizer.
pub fn load_checkpoint(
    path: &Path,
    index: &ModuleIndex,
    device: Device,
    hyper: AdamW,
    kind: OptimizerKind,
) -> Result<(Adapter, Optimizer, TrainState)> {
    let adapter = Adapter::load(path, index, device)?;
    let f = SafeTensorsFile::open(path)?;
    let meta = f.metadata();
    let get = |k: &str| {
        meta.get(k).ok_or_else(|| {
            Error::file(
                path,
                format!("metadata `{k}` missing: an adapter, not a training checkpoint"),
            )
        })
    };
    let int = |k: &str| -> Result<u64> {
        get(k)?
            .parse()
            .map_err(|_| Error::file(path, format!("metadata `{k}` is not an integer")))
    };
    let words: Vec<u64> = get("kstyle.ckpt.rng")?
        .split(',')
        .filter_map(|w| w.parse().ok())
        .collect();
    let rng: [u64; 4] = words
        .try_into()
        .map_err(|_| Error::file(path, "metadata `kstyle.ckpt.rng` is not four integers"))?;
    let order = parse_order(get("kstyle.ckpt.order")?).map_err(|e| Error::Json {
        path: path.into(),
        msg: format!("kstyle.ckpt.order: {e}"),
    })?;
    let state = TrainState {
        step: int("kstyle.ckpt.step")?,
        epoch: int("kstyle.ckpt.epoch")?,
        pos: int("kstyle.ckpt.pos")? as usize,
        order,
        rng: Rng::from_state(rng),
    };
    let scalars = match meta.get(PRODIGY) {
        None => None,
        Some(text) => {
            Some(
                serde_json::from_str::<ProdigyScalars>(text).map_err(|e| Error::Json {
                    path: path.into(),
                    msg: format!("{PRODIGY}: {e}"),
                })?,
            )
        }
    };
    let written = match meta.get(RULE) {
        Some(name) => name.as_str(),
        None if scalars.is_some() => "prodigy",
        None => "adamw",
    };
    if written != kind.name() {
        return Err(Error::file(
            path,
            format!(
                "the checkpoint trained with --optimizer {written}: resume it with \
                 --optimizer {written}, not {}",
                kind.name()
            ),
        ));
    }
    if kind.prodigy().is_some() && scalars.is_none() {
        return Err(Error::file(
            path,
            format!("metadata `{PRODIGY}` missing: Prodigy's d is not in the checkpoint"),
        ));
    }
    let eight = match kind {
        OptimizerKind::AdamW8bit(c) => Some((c, true)),
        OptimizerKind::Lion8bit(c) => Some((c, false)),
        _ => None,
    };
    if let Some((config, two)) = eight {
        let mut parts = Vec::new();
        for (name, _) in adapter.trainables() {
            let key = |kind: &str| format!("{OPTIM}.{kind}.{name}");
            let f32s = |kind: &str| -> Result<Tensor> {
                let t = f.tensor(&key(kind))?;
                let n = t.elem_count();
                t.to_dtype(crate::DType::F32)?.reshape(n)
            };
            let bytes = |kind: &str| -> Result<Tensor> {
                let k = key(kind);
                match f.info(&k) {
                    Some((safetensors::Dtype::U8, _)) => {
                        let b = f.bytes(&k)?.to_vec();
                        let n = b.len();
                        Tensor::from_vec(b, n, Device::Cpu)
                    }
                    Some((d, _)) => Err(Error::file(
                        path,
                        format!("tensor `{k}` is {d:?}; 8-bit optimizer codes are U8"),
                    )),
                    None => Err(Error::file(path, format!("tensor `{k}` missing"))),
                }
            };
            // Each trainable resumes with its moments as written (codes, or f32 for the small).
            let moments = match f.contains(&key("q1")) {
                true => SlotMoments::Bytes {
                    q1: bytes("q1")?,
                    absmax1: f32s("absmax1")?,
                    second: match two {
                        true => Some((bytes("q2")?, f32s("absmax2")?)),
                        false => None,
                    },
                },
                false => SlotMoments::Float {
                    m: f32s("m")?,
                    v: two.then(|| f32s("v")).transpose()?,
                },
            };
            parts.push((name.clone(), f32s("master")?, moments));
        }
        let step = int("kstyle.ckpt.optim_step")?;
        let opt = Optimizer::from_parts8(hyper, step, config, two, parts, device)
            .map_err(|e| Error::file(path, e.to_string()))?;
        return Ok((adapter, opt, state));
    }
    if let OptimizerKind::Adafactor(config) = kind {
        let mut parts = Vec::new();
        for (name, t) in adapter.trainables() {
            let read = |kind: &str| -> Result<Tensor> {
                let t = f.tensor(&format!("{OPTIM}.{kind}.{name}"))?;
                let n = t.elem_count();
                t.to_dtype(crate::DType::F32)?.reshape(n)
            };
            let dims = t.dims().to_vec();
            let state = SlotState {
                master: read("master")?,
                m: config.beta1.map(|_| read("exp_avg")).transpose()?,
                second: match dims.len() >= 2 {
                    true => Second::Factored {
                        row: read("exp_avg_sq_row")?,
                        col: read("exp_avg_sq_col")?,
                    },
                    false => Second::Whole(read("exp_avg_sq")?),
                },
            };
            parts.push((name, dims, state));
        }
        let step = int("kstyle.ckpt.optim_step")?;
        let opt = Optimizer::from_adafactor(hyper, step, config, parts, device)
            .map_err(|e| Error::file(path, e.to_string()))?;
        return Ok((adapter, opt, state));
    }
    let has_v = !matches!(kind, OptimizerKind::Lion(_));
    let mut parts = Vec::new();
    let (mut s, mut p0) = (Vec::new(), Vec::new());
    for (name, _) in adapter.trainables() {
        let read = |kind: &str| -> Result<Tensor> {
            let t = f.tensor(&format!("{OPTIM}.{kind}.{name}"))?;
            let n = t.elem_count();
            t.to_dtype(crate::DType::F32)?.reshape(n)
        };
        let v = match has_v {
            true => read("v")?,
            false => Tensor::zeros(0, crate::DType::F32, Device::Cpu)?,
        };
        parts.push((name.clone(), read("master")?, read("m")?, v));
        if scalars.is_some() {
            s.push(read("s")?);
            p0.push(read("p0")?);
        }
    }
    let mut opt = Optimizer::from_parts(hyper, int("kstyle.ckpt.optim_step")?, parts, device)?;
    match kind {
        // The 8-bit optimizers returned above.
        OptimizerKind::AdamW
        | OptimizerKind::AdamW8bit(_)
        | OptimizerKind::Lion8bit(_)
        | OptimizerKind::Adafactor(_) => {}
        OptimizerKind::Prodigy(config) => {
            let mut state = ProdigyState::new(config, concat(&p0, device)?)?;
            state.s = concat(&s, device)?;
            if let Some(sc) = scalars {
                state.set_scalars(sc);
            }
            opt.rule = Rule::Prodigy(state);
        }
        OptimizerKind::Lion(config) => opt.rule = Rule::Lion(config),
    }
    Ok((adapter, opt, state))
}

#[cfg(test)]
mod tests {
    use super::parse_order;

    /// Batches read back as written; a checkpoint from before batches (a flat list of visits)
    /// reads as batches of one, so it resumes as it would have.
    #[test]
    fn epoch_orders_read_in_both_layouts() {
        assert_eq!(
            parse_order("[[2,0],[1]]").unwrap(),
            vec![vec![2, 0], vec![1]]
        );
        assert_eq!(
            parse_order("[2,0,1]").unwrap(),
            vec![vec![2], vec![0], vec![1]]
        );
        assert_eq!(parse_order("[]").unwrap(), Vec::<Vec<usize>>::new());
        assert!(parse_order("[[1],2]").is_err());
        assert!(parse_order("{}").is_err());
    }
}
