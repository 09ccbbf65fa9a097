//! The per-element training loss kohya offers (`--loss_type`) and the Huber threshold's
//! schedule (`--huber_schedule`, `--huber_c`, `--huber_scale`); [`super::TrainSchedule`]
//! evaluates them per timestep.

/// kohya's `--loss_type`: the per-element loss between the prediction and its target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossType {
    /// `d^2` (the MSE; KSTYLE.md's loss).
    #[default]
    L2,
    /// `|d|`.
    L1,
    /// Pseudo-Huber, `2 c (sqrt(d^2 + c^2) - c)`: quadratic near 0, linear (slope 2c) beyond c.
    Huber,
    /// `2 (sqrt(d^2 + c^2) - c)`: the Huber loss without its factor c.
    SmoothL1,
}

impl LossType {
    pub fn name(self) -> &'static str {
        match self {
            LossType::L2 => "l2",
            LossType::L1 => "l1",
            LossType::Huber => "huber",
            LossType::SmoothL1 => "smooth_l1",
        }
    }

    /// Whether it reads the Huber threshold c.
    pub fn uses_threshold(self) -> bool {
        matches!(self, LossType::Huber | LossType::SmoothL1)
    }
}

/// kohya's `--huber_schedule`: how the Huber threshold c moves with the timestep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HuberSchedule {
    /// `c * scale` at every timestep.
    Constant,
    /// `c^(t / N) * scale`: `scale` at t = 0 down to `c * scale` at t = N.
    Exponential,
    /// `(1 - c) / (1 + sigma_t)^2 + c` with `sigma_t = sqrt((1 - ab_t) / ab_t)`: near 1 where
    /// the input is clean, c where it is noise. kohya applies no scale here.
    #[default]
    Snr,
}

impl HuberSchedule {
    pub fn name(self) -> &'static str {
        match self {
            HuberSchedule::Constant => "constant",
            HuberSchedule::Exponential => "exponential",
            HuberSchedule::Snr => "snr",
        }
    }
}

/// The Huber threshold's schedule and settings (kohya's `--huber_schedule`, `--huber_c`,
/// `--huber_scale`; defaults snr, 0.1, 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Huber {
    pub schedule: HuberSchedule,
    pub c: f64,
    pub scale: f64,
}

impl Default for Huber {
    fn default() -> Self {
        Huber {
            schedule: HuberSchedule::Snr,
            c: 0.1,
            scale: 1.0,
        }
    }
}
