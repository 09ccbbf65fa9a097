//! One training step's loss (KSTYLE.md eq 17): noise the clean latents at the sampled
//! timesteps, predict epsilon (or, for v-prediction models, v) with the adapted UNet, take the
//! MSE against the target, and add lambda times the cultural loss of the predicted clean latents.

use super::cultural::CulturalLoss;
use crate::models::unet::UNet2DConditionModel;
use crate::sample::schedule::Prediction;
use crate::sample::TrainSchedule;
use crate::{DType, Device, Error, Result, Tensor};

/// The conditioning of a batch: context (B, 77, Dc), pooled text (B, P), time ids (B, 6).
pub struct Conditioning<'a> {
    pub context: &'a Tensor,
    pub pooled: &'a Tensor,
    pub time_ids: &'a Tensor,
}

pub struct Losses {
    pub diffusion: Tensor,
    pub cultural: Option<Tensor>,
    /// `diffusion + lambda * cultural`: the tensor to backpropagate.
    pub total: Tensor,
}

/// A per-sample scalar as a (B, 1, 1, 1) tensor for broadcasting over latents.
fn per_sample(v: &[f64], dtype: DType, device: Device) -> Result<Tensor> {
    Tensor::from_vec(v.to_vec(), (v.len(), 1, 1, 1), Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// `z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`, with the two coefficient tensors.
pub fn add_noise(
    x0: &Tensor,
    noise: &Tensor,
    t: &[usize],
    schedule: &TrainSchedule,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, _, _, _) = x0.dims4()?;
    if t.len() != b || t.iter().any(|&ti| ti >= schedule.len()) {
        return Err(Error::msg(format!(
            "timesteps {t:?} for a batch of {b} and a {}-step schedule",
            schedule.len()
        )));
    }
    let ab: Vec<f64> = t.iter().map(|&ti| schedule.alphas_cumprod[ti]).collect();
    let sa = per_sample(
        &ab.iter().map(|a| a.sqrt()).collect::<Vec<_>>(),
        x0.dtype(),
        x0.device(),
    )?; // (B, 1, 1, 1)
    let s1 = per_sample(
        &ab.iter().map(|a| (1.0 - a).sqrt()).collect::<Vec<_>>(),
        x0.dtype(),
        x0.device(),
    )?; // (B, 1, 1, 1)
    let zt = x0.mul(&sa)?.add(&noise.mul(&s1)?)?; // (B, C, H, W)
    Ok((zt, sa, s1))
}

/// The step loss. `cultural` carries the loss module and its weight lambda.
pub fn training_loss(
    unet: &UNet2DConditionModel,
    cultural: Option<(&CulturalLoss, f64)>,
    schedule: &TrainSchedule,
    x0: &Tensor,
    noise: &Tensor,
    t: &[usize],
    cond: &Conditioning<'_>,
) -> Result<Losses> {
    let (zt, sa, s1) = add_noise(x0, noise, t, schedule)?;
    let ts: Vec<f64> = t.iter().map(|&v| v as f64).collect();
    let timesteps = Tensor::from_vec(ts, t.len(), Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_device(x0.device())?; // (B,)
    let out = unet
        .forward(&zt, &timesteps, cond.context, cond.pooled, cond.time_ids)?
        .to_dtype(x0.dtype())?; // (B, C, H, W)
    let target = match schedule.prediction {
        Prediction::Epsilon => noise.clone(),
        // v = sqrt(ab) eps - sqrt(1 - ab) x0
        Prediction::V => noise.mul(&sa)?.sub(&x0.mul(&s1)?)?, // (B, C, H, W)
    };
    let sq = out.sub(&target)?.sqr()?; // (B, C, H, W)
    let diffusion = match schedule.min_snr_gamma {
        None => sq.mean_all()?,
        Some(_) => {
            let w: Vec<f64> = t.iter().map(|&ti| schedule.loss_weight(ti)).collect();
            let w = Tensor::from_vec(w, t.len(), Device::Cpu)?
                .to_dtype(sq.dtype())?
                .to_device(sq.device())?; // (B,)
            sq.mean(&[1, 2, 3])?.mul(&w)?.mean_all()?
        }
    };
    match cultural {
        None => Ok(Losses {
            total: diffusion.clone(),
            diffusion,
            cultural: None,
        }),
        Some((module, lambda)) => {
            let x0_hat = match schedule.prediction {
                Prediction::Epsilon => zt.sub(&out.mul(&s1)?)?.div(&sa)?,
                // sqrt(ab) z_t - sqrt(1 - ab) v: defined at zero SNR too, where ab = 0.
                Prediction::V => zt.mul(&sa)?.sub(&out.mul(&s1)?)?,
            }; // (B, C, H, W)
            let c = module.forward(&x0_hat)?;
            let total = diffusion.add(&c.scale(lambda)?)?;
            Ok(Losses {
                diffusion,
                cultural: Some(c),
                total,
            })
        }
    }
}
