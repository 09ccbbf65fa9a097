//! The training objective: the noise schedule and loss target of the model (its scheduler
//! config), kohya's per-sample loss weights and per-element loss, and what each allows.

use super::config::TrainConfig;
use crate::sample::model_files::ModelFiles;
use crate::sample::schedule::{Huber, HuberSchedule, LossType, Prediction};
use crate::sample::TrainSchedule;
use crate::{Error, Result};

/// The schedule a run trains on, with the run's loss weights and loss type; what the model's
/// objective does not allow (SNR weights on EDM, the v-prediction scales on the other
/// prediction) is refused by name.
pub(super) fn train_schedule(
    cfg: &TrainConfig,
    files: &ModelFiles,
    log: &mut dyn FnMut(&str),
) -> Result<TrainSchedule> {
    // The loss targets what the model predicts (epsilon, KSTYLE.md; or v) on the schedule
    // it was trained with, zero terminal SNR included.
    let mut schedule = TrainSchedule::for_model(&files.scheduler()?)
        .map_err(|e| Error::Config(format!("{}: {e}", cfg.model.display())))?;
    schedule.min_snr_gamma = cfg.min_snr_gamma;
    schedule.debiased = cfg.debiased;
    schedule.scale_v_pred = cfg.scale_v_pred_loss;
    schedule.v_pred_like = cfg.v_pred_like_loss;
    schedule.loss_type = cfg.loss_type;
    schedule.huber = huber_settings(cfg)?;
    let n = schedule.len();
    let (lo, hi) = (cfg.min_timestep.unwrap_or(0), cfg.max_timestep.unwrap_or(n));
    if lo >= hi || hi > n {
        return Err(Error::Config(format!(
            "--min-timestep {lo} / --max-timestep {hi}: timesteps are drawn from [min, max), \
             which must be a non-empty part of the model's {n}"
        )));
    }
    if let Some(edm) = &schedule.edm {
        if schedule.weighted() {
            return Err(Error::Config(format!(
                "{}: --min-snr-gamma, --debiased-estimation-loss, \
                 --scale-v-pred-loss-like-noise-pred and --v-pred-like-loss weight by the DDPM \
                 schedule's SNR; an EDM model trains on EDM sigmas, unweighted (as diffusers' \
                 EDM-style training)",
                cfg.model.display()
            )));
        }
        if cfg.loss_type != LossType::L2 {
            return Err(Error::Config(format!(
                "{}: an EDM model trains on the MSE of its preconditioned x0 estimate (as \
                 diffusers' EDM-style training); --loss-type {} is for DDPM models",
                cfg.model.display(),
                cfg.loss_type.name()
            )));
        }
        log(&format!(
            "objective: EDM (sigmas {} to {}, sigma_data {}, {} prediction preconditioned to x0)",
            edm.config.sigma_min,
            edm.config.sigma_max,
            edm.config.sigma_data,
            match schedule.prediction {
                Prediction::Epsilon => "epsilon",
                Prediction::V => "v",
            }
        ));
    } else if schedule.prediction != Prediction::Epsilon {
        log("objective: v-prediction (the model's scheduler config)");
    }
    // kohya's rules: the scale is for v-prediction, the v-like term for epsilon.
    let model = cfg.model.display();
    if cfg.scale_v_pred_loss && schedule.prediction != Prediction::V {
        return Err(Error::Config(format!(
            "{model}: --scale-v-pred-loss-like-noise-pred scales a v-prediction model's \
             loss to epsilon's; this model predicts epsilon (try --v-pred-like-loss)"
        )));
    }
    if cfg.v_pred_like_loss.is_some() && schedule.prediction != Prediction::Epsilon {
        return Err(Error::Config(format!(
            "{model}: --v-pred-like-loss adds a v-prediction-like loss to an epsilon model's; \
             this model predicts v (try --scale-v-pred-loss-like-noise-pred)"
        )));
    }
    Ok(schedule)
}

/// The Huber threshold's settings: kohya's defaults where not given. Settings the loss would not
/// read are refused, not ignored.
fn huber_settings(cfg: &TrainConfig) -> Result<Huber> {
    let given = cfg.huber_schedule.is_some() || cfg.huber_c.is_some() || cfg.huber_scale.is_some();
    if given && !cfg.loss_type.uses_threshold() {
        return Err(Error::Config(format!(
            "--huber-schedule, --huber-c and --huber-scale set the threshold of --loss-type huber \
             or smooth-l1, not {}",
            cfg.loss_type.name()
        )));
    }
    let d = Huber::default();
    let h = Huber {
        schedule: cfg.huber_schedule.unwrap_or(d.schedule),
        c: cfg.huber_c.unwrap_or(d.c),
        scale: cfg.huber_scale.unwrap_or(d.scale),
    };
    if !(h.c.is_finite() && h.c > 0.0) {
        return Err(Error::Config(format!(
            "--huber-c must be a positive number, got {}",
            h.c
        )));
    }
    if !(h.scale.is_finite() && h.scale > 0.0) {
        return Err(Error::Config(format!(
            "--huber-scale must be a positive number, got {}",
            h.scale
        )));
    }
    if h.schedule == HuberSchedule::Snr && cfg.huber_scale.is_some() {
        return Err(Error::Config(
            "--huber-scale scales the constant and exponential schedules; the snr schedule has \
             no scale (as kohya's)"
                .into(),
        ));
    }
    Ok(h)
}
