//! The value choices of `kstyle train`'s flags (method, algorithm, optimizer, learning-rate
//! schedule, loss type, Huber schedule, checkpointing, targets) and what they map to.

use kstyle::models::unet::CheckpointPolicy;
use kstyle::sample::schedule::{HuberSchedule, LossType};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum AlgoArg {
    #[value(alias = "LoRA")]
    Lora,
    #[value(alias = "LoHa")]
    Loha,
    #[value(alias = "LoKr")]
    Lokr,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum MethodArg {
    Kstyle,
    Lora,
    LoraCsl,
    Gating,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerArg {
    #[value(name = "adamw", alias = "AdamW")]
    AdamW,
    #[value(name = "prodigy", alias = "Prodigy")]
    Prodigy,
    #[value(name = "lion", alias = "Lion")]
    Lion,
    /// bitsandbytes' paged variant has the same arithmetic (it pages its state to host memory
    /// under pressure; kstyle keeps it on the device), so its name is accepted.
    #[value(name = "adamw8bit", aliases = ["AdamW8bit", "PagedAdamW8bit", "pagedadamw8bit"])]
    AdamW8bit,
    #[value(name = "lion8bit", aliases = ["Lion8bit", "PagedLion8bit", "pagedlion8bit"])]
    Lion8bit,
    #[value(name = "adafactor", aliases = ["AdaFactor", "Adafactor"])]
    Adafactor,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LrArg {
    Constant,
    #[value(alias = "constant_with_warmup")]
    ConstantWithWarmup,
    Linear,
    Cosine,
    #[value(alias = "cosine_with_restarts")]
    CosineWithRestarts,
    Polynomial,
}

pub(super) fn checkpoint_policy(s: &str) -> anyhow::Result<Option<CheckpointPolicy>> {
    Ok(Some(match s {
        "auto" => return Ok(None),
        "none" => CheckpointPolicy::None,
        "blocks" => CheckpointPolicy::EveryBlock,
        n => CheckpointPolicy::EveryNth(n.parse().map_err(|_| {
            anyhow::anyhow!("--checkpointing takes auto, none, blocks or a number, got `{n}`")
        })?),
    }))
}

/// `--loss-type`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LossTypeArg {
    L2,
    L1,
    Huber,
    #[value(alias = "smooth_l1")]
    SmoothL1,
}

impl From<LossTypeArg> for LossType {
    fn from(a: LossTypeArg) -> LossType {
        match a {
            LossTypeArg::L2 => LossType::L2,
            LossTypeArg::L1 => LossType::L1,
            LossTypeArg::Huber => LossType::Huber,
            LossTypeArg::SmoothL1 => LossType::SmoothL1,
        }
    }
}

/// `--huber-schedule`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum HuberScheduleArg {
    Constant,
    Exponential,
    Snr,
}

impl From<HuberScheduleArg> for HuberSchedule {
    fn from(a: HuberScheduleArg) -> HuberSchedule {
        match a {
            HuberScheduleArg::Constant => HuberSchedule::Constant,
            HuberScheduleArg::Exponential => HuberSchedule::Exponential,
            HuberScheduleArg::Snr => HuberSchedule::Snr,
        }
    }
}

/// `--targets` with `all` spelled out: every linear of the UNet's spatial transformers, in the
/// order a block holds them.
pub(super) fn expand_targets(targets: &[String]) -> Vec<String> {
    const ALL: [&str; 8] = [
        "proj_in",
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "proj_out",
    ];
    let mut out: Vec<String> = Vec::new();
    for t in targets {
        let add: Vec<String> = match t.trim() {
            "all" => ALL.iter().map(|s| s.to_string()).collect(),
            other => vec![other.to_string()],
        };
        for a in add {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}
