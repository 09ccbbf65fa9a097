//! The training schedule: the model's betas in float64 (`kstyle_ref.alphas_cumprod`), what the
//! UNet predicts, kohya's per-sample loss weights and per-element loss, and EDM-style training.

use super::edm::EdmConfig;
use super::schedule::{
    rescale_zero_terminal_snr_f64, Huber, HuberSchedule, LossType, Prediction, SchedulerConfig,
};
use crate::{Error, Result};

/// The training schedule in float64 (`kstyle_ref.alphas_cumprod`) and what the UNet predicts.
#[derive(Clone, Debug)]
pub struct TrainSchedule {
    pub alphas_cumprod: Vec<f64>,
    /// The loss target: epsilon, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (diffusers'
    /// `get_velocity`).
    pub prediction: Prediction,
    /// Min-SNR loss weighting (Hang et al. 2023; diffusers' `--snr_gamma`, kohya's
    /// `--min_snr_gamma`): each sample's diffusion loss is scaled by [`Self::loss_weight`].
    pub min_snr_gamma: Option<f64>,
    /// kohya's `--debiased_estimation_loss` (Yu et al. 2024): each sample's loss also times
    /// `1 / sqrt(SNR)` (epsilon) or `1 / (SNR + 1)` (v), SNR capped at 1000.
    pub debiased: bool,
    /// kohya's `--scale_v_pred_loss_like_noise_pred` (v-prediction): each sample's loss also
    /// times `s = SNR / (SNR + 1)`, SNR capped at 1000, which turns v's loss into epsilon's scale.
    pub scale_v_pred: bool,
    /// kohya's `--v_pred_like_loss k` (epsilon): each sample's loss also times `1 + k / s`, adding
    /// k times the loss v-prediction would weigh it with.
    pub v_pred_like: Option<f64>,
    /// The per-element loss (kohya's `--loss_type`) and, for Huber and smooth L1, its threshold.
    pub loss_type: LossType,
    pub huber: Huber,
    /// EDM models (Playground v2.5, CosXL): the sigmas training draws from, in place of the
    /// DDPM betas (`alphas_cumprod` is then empty).
    pub edm: Option<EdmTrain>,
}

/// EDM-style training (diffusers' train_dreambooth_lora_sdxl.py on a model whose scheduler is an
/// EDM one, through `EDMEulerScheduler` of its config): an index drawn uniformly below
/// `num_train_timesteps` picks sigma from the scheduler's training ramp; the UNet sees
/// `c_in (x0 + sigma eps)` at timestep `log(sigma) / 4` and the loss compares its
/// preconditioned data prediction with x0, unweighted.
#[derive(Clone, Debug)]
pub struct EdmTrain {
    pub config: EdmConfig,
    /// `EDMEulerScheduler.sigmas` at construction: `num_train_timesteps + 1` values from
    /// sigma_max down to sigma_min (float64 ramp `arange(n + 1) / n` for Karras, float32 for
    /// the exponential one, cast to float32); draws never reach the last.
    pub sigmas: Vec<f32>,
}

impl EdmTrain {
    pub fn new(config: EdmConfig, num_train_timesteps: usize) -> Result<EdmTrain> {
        Ok(EdmTrain {
            config,
            sigmas: config.sigmas(num_train_timesteps + 1, true)?,
        })
    }

    /// `scheduler.timesteps[i]`: `log(sigma_i) / 4` in float32.
    pub fn timestep(&self, i: usize) -> f64 {
        EdmConfig::c_noise(self.sigmas[i])
    }
}

impl TrainSchedule {
    /// The schedule a model was trained on, from its scheduler config: the scaled-linear betas,
    /// rescaled to zero terminal SNR when the config says so, and its prediction type.
    /// Epsilon prediction on zero-SNR betas is refused: at the last timestep the noisy latent is
    /// pure noise, and the clean latent the cultural loss needs is undefined (Lin et al. 2023
    /// pair zero SNR with v-prediction).
    pub fn for_model(cfg: &SchedulerConfig) -> Result<TrainSchedule> {
        if let Some(edm) = cfg.edm {
            return Ok(TrainSchedule {
                alphas_cumprod: Vec::new(),
                prediction: cfg.prediction,
                min_snr_gamma: None,
                debiased: false,
                scale_v_pred: false,
                v_pred_like: None,
                loss_type: LossType::L2,
                huber: Huber::default(),
                edm: Some(EdmTrain::new(edm, cfg.num_train_timesteps)?),
            });
        }
        if cfg.zero_snr && cfg.prediction == Prediction::Epsilon {
            return Err(Error::Config(
                "rescale_betas_zero_snr with prediction_type epsilon cannot be trained: at the \
                 last timestep the input is pure noise and epsilon gives no clean latent"
                    .into(),
            ));
        }
        let mut s =
            TrainSchedule::scaled_linear(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end);
        if cfg.zero_snr {
            s.alphas_cumprod = rescale_zero_terminal_snr_f64(&s.alphas_cumprod);
        }
        s.prediction = cfg.prediction;
        Ok(s)
    }

    pub fn scaled_linear(n: usize, beta_start: f64, beta_end: f64) -> TrainSchedule {
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let mut acc = 1.0;
        let alphas_cumprod = (0..n)
            .map(|i| {
                let t = if n == 1 {
                    a
                } else {
                    a + (b - a) * i as f64 / (n - 1) as f64
                };
                acc *= 1.0 - t * t;
                acc
            })
            .collect();
        TrainSchedule {
            alphas_cumprod,
            prediction: Prediction::Epsilon,
            min_snr_gamma: None,
            debiased: false,
            scale_v_pred: false,
            v_pred_like: None,
            loss_type: LossType::L2,
            huber: Huber::default(),
            edm: None,
        }
    }

    /// The signal-to-noise ratio `ab / (1 - ab)` at timestep `t`.
    pub fn snr(&self, t: usize) -> f64 {
        let ab = self.alphas_cumprod[t];
        ab / (1.0 - ab)
    }

    /// The weight of a sample's loss at timestep `t`, the product of kohya's weights in its
    /// order: the min-SNR weight, `min(snr, gamma) / snr` for epsilon and `min(snr, gamma) /
    /// (snr + 1)` for v (0 at zero SNR); with `scale_v_pred` times `s = snr / (snr + 1)`; with
    /// `v_pred_like` k times `1 + k / s`; with `debiased` the debiased-estimation weight (s and
    /// the debiased weight on the SNR capped at 1000). 1 when none is on.
    pub fn loss_weight(&self, t: usize) -> f64 {
        let snr = self.snr(t);
        let min_snr = match (self.min_snr_gamma, self.prediction) {
            (None, _) => 1.0,
            (Some(gamma), Prediction::Epsilon) => snr.min(gamma) / snr,
            (Some(gamma), Prediction::V) => snr.min(gamma) / (snr + 1.0),
        };
        // kohya caps the SNR at 1000 (it is infinite at t = 0 of a schedule that starts clean).
        let capped = snr.min(1000.0);
        let s = capped / (capped + 1.0);
        let scale_v = match self.scale_v_pred {
            true => s,
            false => 1.0,
        };
        let v_like = self.v_pred_like.map_or(1.0, |k| 1.0 + k / s);
        let debiased = match (self.debiased, self.prediction) {
            (false, _) => 1.0,
            (true, Prediction::Epsilon) => 1.0 / capped.sqrt(),
            (true, Prediction::V) => 1.0 / (capped + 1.0),
        };
        min_snr * scale_v * v_like * debiased
    }

    /// Whether samples are weighted ([`Self::loss_weight`] is not 1 everywhere).
    pub fn weighted(&self) -> bool {
        self.min_snr_gamma.is_some()
            || self.debiased
            || self.scale_v_pred
            || self.v_pred_like.is_some()
    }

    /// Turns every per-sample weight off (the validation loss's plain MSE).
    pub fn unweighted(mut self) -> TrainSchedule {
        self.min_snr_gamma = None;
        self.debiased = false;
        self.scale_v_pred = false;
        self.v_pred_like = None;
        self
    }

    /// The Huber threshold c at timestep `t` (see [`HuberSchedule`]).
    pub fn huber_c(&self, t: usize) -> f64 {
        let Huber { schedule, c, scale } = self.huber;
        match schedule {
            HuberSchedule::Constant => c * scale,
            HuberSchedule::Exponential => (c.ln() * t as f64 / self.len() as f64).exp() * scale,
            HuberSchedule::Snr => {
                let ab = self.alphas_cumprod[t];
                let sigma = ((1.0 - ab) / ab).sqrt();
                (1.0 - c) / (1.0 + sigma).powi(2) + c
            }
        }
    }

    /// SDXL's: 1000 steps from 0.00085 to 0.012.
    pub fn sdxl() -> TrainSchedule {
        TrainSchedule::scaled_linear(1000, 0.00085, 0.012)
    }

    /// How many timesteps (or EDM sigma indices) training draws from.
    pub fn len(&self) -> usize {
        match &self.edm {
            Some(e) => e.sigmas.len() - 1,
            None => self.alphas_cumprod.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
