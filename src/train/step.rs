//! One training step's loss (KSTYLE.md eq 17): noise the clean latents at the sampled
//! timesteps, predict epsilon (or, for v-prediction models, v) with the adapted UNet, take the
//! MSE against the target, and add lambda times the cultural loss of the predicted clean latents.
//! EDM models (Playground v2.5, CosXL) train EDM-style instead, as diffusers' SDXL LoRA script
//! trains them: sigmas from the scheduler's ramp, preconditioned input and output, the MSE of
//! the data prediction against the clean latents (see [`EdmTrain`]).
//!
//! Input perturbation (kohya's `--ip_noise_gamma`, diffusers' `--input_perturbation`; Ning et al.
//! 2023) builds the noisy latents from `eps + gamma xi` while the target keeps `eps`: the two
//! halves of [`StepNoise`].

use super::cultural::CulturalLoss;
use crate::models::unet::UNet2DConditionModel;
use crate::sample::schedule::EdmTrain;
use crate::sample::schedule::{LossType, Prediction};
use crate::sample::TrainSchedule;
use crate::{DType, Device, Error, Result, Tensor};

/// The conditioning of a batch: context (B, 77, Dc), pooled text (B, P), time ids (B, 6); and
/// the weight of each latent position in its diffusion loss (`--alpha-mask`, `--mask-data`):
/// (B, 1, h, w) in [0, 1], None for all ones.
pub struct Conditioning<'a> {
    pub context: &'a Tensor,
    pub pooled: &'a Tensor,
    pub time_ids: &'a Tensor,
    pub loss_mask: Option<&'a Tensor>,
}

/// `per_element` (B, C, h, w) times the loss mask (B, 1, h, w), as kohya's `apply_masked_loss`
/// before the per-sample mean; unchanged without one.
fn masked(per_element: Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        Some(m) => per_element.mul(&m.to_dtype(per_element.dtype())?),
        None => Ok(per_element),
    }
}

/// The noise of one step: what the noisy input is built from, and what the target (epsilon, or
/// v) is built from. They are the same tensor except under input perturbation.
#[derive(Clone, Copy)]
pub struct StepNoise<'a> {
    pub input: &'a Tensor,
    pub target: &'a Tensor,
}

impl<'a> From<&'a Tensor> for StepNoise<'a> {
    fn from(noise: &'a Tensor) -> StepNoise<'a> {
        StepNoise {
            input: noise,
            target: noise,
        }
    }
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
pub fn training_loss<'a>(
    unet: &UNet2DConditionModel,
    cultural: Option<(&CulturalLoss, f64)>,
    schedule: &TrainSchedule,
    x0: &Tensor,
    noise: impl Into<StepNoise<'a>>,
    t: &[usize],
    cond: &Conditioning<'_>,
) -> Result<Losses> {
    let noise = noise.into();
    if let Some(edm) = &schedule.edm {
        // The data prediction's target is x0 itself: only the input takes the noise.
        let (diffusion, x0_hat) =
            edm_loss(unet, edm, schedule.prediction, x0, noise.input, t, cond)?;
        return combine(cultural, diffusion, || Ok(x0_hat));
    }
    let (zt, sa, s1) = add_noise(x0, noise.input, t, schedule)?;
    let ts: Vec<f64> = t.iter().map(|&v| v as f64).collect();
    let timesteps = Tensor::from_vec(ts, t.len(), Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_device(x0.device())?; // (B,)
    let out = unet
        .forward(&zt, &timesteps, cond.context, cond.pooled, cond.time_ids)?
        .to_dtype(x0.dtype())?; // (B, C, H, W)
    let target = match schedule.prediction {
        Prediction::Epsilon => noise.target.clone(),
        // v = sqrt(ab) eps - sqrt(1 - ab) x0
        Prediction::V => noise.target.mul(&sa)?.sub(&x0.mul(&s1)?)?, // (B, C, H, W)
    };
    let per_element = elementwise_loss(schedule, &out.sub(&target)?, t)?; // (B, C, H, W)
    let per_element = masked(per_element, cond.loss_mask)?;
    let diffusion = match schedule.weighted() {
        false => per_element.mean_all()?,
        true => {
            let w: Vec<f64> = t.iter().map(|&ti| schedule.loss_weight(ti)).collect();
            let w = Tensor::from_vec(w, t.len(), Device::Cpu)?
                .to_dtype(per_element.dtype())?
                .to_device(per_element.device())?; // (B,)
            per_element.mean(&[1, 2, 3])?.mul(&w)?.mean_all()?
        }
    };
    combine(cultural, diffusion, || match schedule.prediction {
        Prediction::Epsilon => zt.sub(&out.mul(&s1)?)?.div(&sa),
        // sqrt(ab) z_t - sqrt(1 - ab) v: defined at zero SNR too, where ab = 0.
        Prediction::V => zt.mul(&sa)?.sub(&out.mul(&s1)?),
    })
}

/// The loss of each element of `diff` = prediction - target (B, C, H, W) at timesteps `t`, as
/// kohya's `conditional_loss` with reduction "none" (see [`LossType`]).
fn elementwise_loss(schedule: &TrainSchedule, diff: &Tensor, t: &[usize]) -> Result<Tensor> {
    match schedule.loss_type {
        LossType::L2 => diff.sqr(),
        LossType::L1 => diff.abs(),
        kind => {
            let c: Vec<f64> = t.iter().map(|&ti| schedule.huber_c(ti)).collect();
            let c = per_sample(&c, diff.dtype(), diff.device())?; // (B, 1, 1, 1)
            let r = diff.sqr()?.add(&c.sqr()?)?.sqrt()?.sub(&c)?; // (B, C, H, W)
            match kind {
                LossType::Huber => r.mul(&c)?.scale(2.0),
                _ => r.scale(2.0),
            }
        }
    }
}

/// `diffusion + lambda * cultural(x0_hat)`, the clean-latent estimate made only when a
/// cultural loss wants it.
fn combine(
    cultural: Option<(&CulturalLoss, f64)>,
    diffusion: Tensor,
    x0_hat: impl FnOnce() -> Result<Tensor>,
) -> Result<Losses> {
    match cultural {
        None => Ok(Losses {
            total: diffusion.clone(),
            diffusion,
            cultural: None,
        }),
        Some((module, lambda)) => {
            let c = module.forward(&x0_hat()?)?; // x0_hat (B, C, H, W)
            let total = diffusion.add(&c.scale(lambda)?)?;
            Ok(Losses {
                diffusion,
                cultural: Some(c),
                total,
            })
        }
    }
}

/// The EDM objective at sigma indices `t`: `x = x0 + sigma eps`, the UNet on `c_in x` at
/// timestep `log(sigma) / 4`, `x0_hat = c_skip x + c_out out`; returns (mse(x0_hat, x0), x0_hat).
fn edm_loss(
    unet: &UNet2DConditionModel,
    edm: &EdmTrain,
    prediction: Prediction,
    x0: &Tensor,
    noise: &Tensor,
    t: &[usize],
    cond: &Conditioning<'_>,
) -> Result<(Tensor, Tensor)> {
    let (b, _, _, _) = x0.dims4()?;
    if t.len() != b || t.iter().any(|&i| i + 1 >= edm.sigmas.len()) {
        return Err(Error::msg(format!(
            "sigma indices {t:?} for a batch of {b} and {} training sigmas",
            edm.sigmas.len() - 1
        )));
    }
    let sig: Vec<f32> = t.iter().map(|&i| edm.sigmas[i]).collect();
    let column = |f: &dyn Fn(f32) -> f64| {
        let v: Vec<f64> = sig.iter().map(|&s| f(s)).collect();
        per_sample(&v, x0.dtype(), x0.device()) // (B, 1, 1, 1)
    };
    let x = x0.add(&noise.mul(&column(&|s| s as f64)?)?)?; // (B, C, H, W)
    let input = x.mul(&column(&|s| edm.config.c_in(s))?)?;
    let ts: Vec<f64> = t.iter().map(|&i| edm.timestep(i)).collect();
    let timesteps = Tensor::from_vec(ts, b, Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_device(x0.device())?; // (B,)
    let out = unet
        .forward(&input, &timesteps, cond.context, cond.pooled, cond.time_ids)?
        .to_dtype(x0.dtype())?; // (B, C, H, W)
    let c_skip = column(&|s| edm.config.c_skip_out(prediction, s).0)?;
    let c_out = column(&|s| edm.config.c_skip_out(prediction, s).1)?;
    let x0_hat = x.mul(&c_skip)?.add(&out.mul(&c_out)?)?; // (B, C, H, W)
    let diffusion = masked(x0_hat.sub(x0)?.sqr()?, cond.loss_mask)?.mean_all()?;
    Ok((diffusion, x0_hat))
}
