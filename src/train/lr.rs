//! Learning-rate schedules: the ones diffusers' `get_scheduler` builds (and kohya's scripts call),
//! by their formulas, so a run with `--lr-schedule cosine --warmup 100` follows the same rates as
//! the PyTorch trainers. Those step a `LambdaLR` after each optimizer step, so optimizer step n
//! (1-based) uses the lambda of n - 1: with warm-up the first step runs at rate 0, as theirs do.
//! `tests/fixtures/extra/lr_schedules.safetensors` holds their rates.

use crate::{Error, Result};

/// The shape of the schedule after warm-up (diffusers' `SchedulerType` names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrShape {
    /// The base rate throughout; takes no warm-up.
    Constant,
    ConstantWithWarmup,
    /// Down to 0 at the last step.
    Linear,
    /// Half a cosine period down to 0 at the last step.
    Cosine,
    /// `cycles` cosine decays, each restarting at the base rate, 0 from the last step on.
    CosineWithRestarts {
        cycles: u64,
    },
    /// From the base rate to `lr_end` (diffusers' 1e-7) as (1 - progress)^power.
    Polynomial {
        power: f64,
    },
}

/// diffusers' `lr_end` of the polynomial schedule (`get_scheduler` does not expose it).
pub const POLYNOMIAL_LR_END: f64 = 1e-7;

/// A schedule: a shape after `warmup` steps of linear ramp from 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub shape: LrShape,
    pub warmup: u64,
}

impl LrSchedule {
    pub const CONSTANT: LrSchedule = LrSchedule {
        shape: LrShape::Constant,
        warmup: 0,
    };

    /// diffusers' name of the shape (recorded in the adapter's settings).
    pub fn name(&self) -> String {
        match self.shape {
            LrShape::Constant => "constant".into(),
            LrShape::ConstantWithWarmup => "constant_with_warmup".into(),
            LrShape::Linear => "linear".into(),
            LrShape::Cosine => "cosine".into(),
            LrShape::CosineWithRestarts { cycles } => format!("cosine_with_restarts({cycles})"),
            LrShape::Polynomial { power } => format!("polynomial({power})"),
        }
    }

    /// Refuses settings the schedule would ignore or that diffusers refuses: warm-up on the
    /// constant shape, zero restart cycles, a non-finite power, a base rate not above the
    /// polynomial's end rate.
    pub fn check(&self, lr: f64) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        match self.shape {
            LrShape::Constant if self.warmup > 0 => bad(format!(
                "--warmup {} needs a schedule that warms up: --lr-schedule constant-with-warmup \
                 (or linear, cosine, cosine-with-restarts, polynomial)",
                self.warmup
            )),
            LrShape::CosineWithRestarts { cycles: 0 } => {
                bad("--lr-cycles must be at least 1".into())
            }
            LrShape::Polynomial { power } if !power.is_finite() => {
                bad(format!("--lr-power must be a finite number, got {power}"))
            }
            LrShape::Polynomial { .. } if lr <= POLYNOMIAL_LR_END => bad(format!(
                "the polynomial schedule decays to {POLYNOMIAL_LR_END}: --lr must be above it, \
                 got {lr}"
            )),
            _ => Ok(()),
        }
    }

    /// The multiplier on the base rate `lr` for 1-based optimizer step `step` of a run of
    /// `total` steps (LambdaLR's lambda at `step - 1`).
    pub fn factor(&self, step: u64, total: u64, lr: f64) -> f64 {
        let k = step.saturating_sub(1);
        let warmup = self.warmup;
        if self.shape != LrShape::Constant && k < warmup {
            return k as f64 / warmup.max(1) as f64;
        }
        // Progress through the decay, 0 at the end of warm-up and 1 at `total`.
        let progress = (k as f64 - warmup as f64) / total.saturating_sub(warmup).max(1) as f64;
        match self.shape {
            LrShape::Constant | LrShape::ConstantWithWarmup => 1.0,
            LrShape::Linear => {
                let left = (total as f64 - k as f64) / total.saturating_sub(warmup).max(1) as f64;
                left.max(0.0)
            }
            LrShape::Cosine => {
                let cycles = 0.5;
                (0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos())).max(0.0)
            }
            LrShape::CosineWithRestarts { cycles } => {
                if progress >= 1.0 {
                    return 0.0;
                }
                let phase = (cycles as f64 * progress) % 1.0;
                (0.5 * (1.0 + (std::f64::consts::PI * phase).cos())).max(0.0)
            }
            LrShape::Polynomial { power } => {
                let end = POLYNOMIAL_LR_END;
                if k > total {
                    return end / lr;
                }
                // diffusers divides by zero here (total == warmup); the ramp has ended at 1.
                let decay_steps = total.saturating_sub(warmup).max(1) as f64;
                let remaining = 1.0 - (k as f64 - warmup as f64) / decay_steps;
                ((lr - end) * remaining.powf(power) + end) / lr
            }
        }
    }
}
