//! `--memory-budget`: fit a run to a memory limit by measuring, not guessing. Everything that
//! stays resident (frozen weights, the adapter, the optimizer state, the cached examples) is
//! counted as it is; then one probe step (forward, backward, gradient accumulation) on the
//! largest example runs under each gradient-checkpointing policy, fastest first, and the first
//! whose peak fits is used. The probe uses its own random numbers, so the run (and `--resume`)
//! is unchanged by it. On CUDA the counts are the caching allocator's (every tensor, workspace
//! and scratch block; the CUDA context itself, about 0.5 GiB, is outside them); on the CPU they
//! are the tensors' storage.

use super::batch::stack;
use super::data::Role;
use super::examples::Example;
use super::optim::GradAccumulator;
use super::trainer::Trainer;
use crate::models::unet::CheckpointPolicy;
use crate::tensor::memory::{memory_use, reset_peak};
use crate::tensor::Rng;
use crate::{DType, Device, Error, Result, Tensor};

/// What the planner measured and chose.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub budget: u64,
    /// Bytes held before a step: weights, adapter, optimizer state, cached examples.
    pub resident: u64,
    /// (policy, peak bytes of one probe step or None when the device ran out) in the order tried.
    pub probes: Vec<(CheckpointPolicy, Option<u64>)>,
    pub chosen: CheckpointPolicy,
}

/// Bytes as GiB (two decimals) from 1 GiB up, else as MiB (one decimal).
pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

pub fn policy_name(p: CheckpointPolicy) -> String {
    match p {
        CheckpointPolicy::None => "none".into(),
        CheckpointPolicy::EveryBlock => "blocks".into(),
        CheckpointPolicy::EveryNth(n) => n.to_string(),
    }
}

/// Policies from fastest to leanest: none, every other transformer block, every block.
pub const AUTO_POLICIES: [CheckpointPolicy; 3] = [
    CheckpointPolicy::None,
    CheckpointPolicy::EveryNth(2),
    CheckpointPolicy::EveryBlock,
];

/// A CUDA allocation that failed: the device is full, which for the planner means "does not fit".
fn out_of_memory(e: &Error) -> bool {
    matches!(e, Error::Cuda { op, .. } if op.starts_with("alloc"))
}

impl Trainer {
    /// Measure and choose (see the module docs). `policies` are tried in order; the first whose
    /// probe peak fits `budget` is set on the UNet. None fitting is an error naming the numbers.
    pub fn plan_memory(
        &mut self,
        budget: u64,
        policies: &[CheckpointPolicy],
    ) -> Result<MemoryPlan> {
        let device = self.cfg.device;
        let resident = memory_use(device)?.in_use as u64;
        let over = |what: String| {
            Error::Config(format!(
                "--memory-budget {} cannot hold this run on {device}: {what}; a smaller \
                 --resolution, --dtype bf16, --weight-dtype fp8-e4m3fn, a lower --rank or \
                 --optimizer adamw8bit need less",
                human(budget)
            ))
        };
        if resident > budget {
            return Err(over(format!(
                "the weights, adapter, optimizer state and cached examples alone take {}",
                human(resident)
            )));
        }
        let mut probes = Vec::new();
        for &policy in policies {
            self.unet.checkpoint = policy;
            // Dropout's masked update keeps more for the backward than the fused one.
            let dropout = !self.cfg.lora_dropout.is_off();
            if dropout {
                let b = self.largest_batch()?.batch_size;
                self.set_dropout(Some(&vec![0x5eed; b]))?;
            }
            let probe = self.probe_step();
            if dropout {
                self.set_dropout(None)?;
            }
            let peak = match probe {
                Ok(p) => Some(p),
                Err(e) if out_of_memory(&e) => None,
                Err(e) => return Err(e),
            };
            probes.push((policy, peak));
            if peak.is_some_and(|p| p <= budget) {
                reset_peak(device)?;
                return Ok(MemoryPlan {
                    budget,
                    resident,
                    probes,
                    chosen: policy,
                });
            }
        }
        let tried: Vec<String> = probes
            .iter()
            .map(|(p, peak)| {
                format!(
                    "checkpointing {} peaks at {}",
                    policy_name(*p),
                    peak.map_or("beyond what the device holds".into(), human)
                )
            })
            .collect();
        Err(over(format!(
            "{} resident, and one step {}",
            human(resident),
            tried.join(", ")
        )))
    }

    /// Peak bytes of one micro-batch of `--batch-size` copies of the largest example: forward,
    /// backward and the gradient sum, as `step` does them, with the trainer's own state
    /// untouched.
    /// The example of the largest batch: the most latent elements times its dataset's batch
    /// size.
    fn largest_batch(&self) -> Result<&Example> {
        self.examples
            .iter()
            .max_by_key(|e| e.mean.elem_count() * e.batch_size)
            .ok_or_else(|| Error::Config("no training examples".into()))
    }

    fn probe_step(&self) -> Result<u64> {
        let device = self.cfg.device;
        // Probed as a style picture, with the cultural term, even when the largest is a
        // regularization picture (which trains without it).
        let ex = Example {
            role: Role::Style,
            ..self.largest_batch()?.clone()
        };
        let ex = &ex;
        reset_peak(device)?;
        {
            let params = self.params();
            let mut acc = GradAccumulator::new(&self.optimizer)?;
            let schedule = self.schedule.clone();
            let mut rng = Rng::new(0x5eed);
            let b = ex.batch_size;
            let x0 = self.latent_config.scale_latents(&ex.mean)?; // (1, 4, h, w)
            let x0 = stack(vec![x0; b])?; // (B, 4, h, w)
            let noise = Tensor::randn(x0.dims().to_vec(), &mut rng, DType::F32, device)?;
            let t = vec![schedule.len() / 2; b];
            let noise = (&noise).into();
            // A visit's window is encoded before its step, so the encode's peak counts too.
            if let Some(vae) = &self.live_vae {
                let largest = self.examples.iter().filter_map(|e| e.live.as_ref());
                if let Some(c) = largest.max_by_key(|c| c.place.bucket.0 * c.place.bucket.1) {
                    let (w, h) = c.place.bucket;
                    let img = Tensor::zeros((1, 3, h, w), DType::F32, device)?;
                    crate::autograd::no_grad(|| vae.encode(&img))?;
                }
            }
            let batch = vec![ex; b];
            let texts = vec![&ex.text; b];
            self.micro_batch(
                &batch,
                &texts,
                (&x0, noise, &t),
                &schedule,
                &params,
                &mut acc,
            )?;
        }
        if let Device::Cuda(i) = device {
            crate::backend::cuda::device(i)?.synchronize()?;
        }
        Ok(memory_use(device)?.peak as u64)
    }
}

/// Parses a byte count: a plain number of bytes, or one with a unit (`24GiB`, `24G`, `512MiB`,
/// `1.5T`; K/M/G/T count in powers of 1024, as GPU memory is quoted).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (try 24GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        u => return Err(format!("`{s}`: unknown unit `{u}` (B, KiB, MiB, GiB, TiB)")),
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` is not a usable memory size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_powers_of_1024() {
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("24g"), Ok(24 << 30));
        assert_eq!(parse_bytes("1.5 GB"), Ok(3 << 29));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
    }
}
