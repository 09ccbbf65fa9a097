//! Whole training steps on the tiny UNet: the losses, the gradient of every trainable tensor, and
//! one AdamW update, for K-StyleLoRA (gated + cultural loss) and plain LoRA.

use super::{max_norm, Checker, Ctx, Row};
use crate::backend::cpu::optim::AdamW;
use crate::models::unet::UNet2DConditionModel;
use crate::nn::lora::{LoraAdapter, LoraConfig};
use crate::nn::Linear;
use crate::sample::schedule::Prediction;
use crate::sample::{SchedulerConfig, TrainSchedule};
use crate::tensor::{Rng, SafeTensorsFile};
use crate::train::config::ConvLora;
use crate::train::cultural::CulturalLoss;
use crate::train::optim::{GradAccumulator, Optimizer};
use crate::train::step::{training_loss, Conditioning, Losses, StepNoise};
use crate::{DType, Error, Result, Tensor};

pub fn train_step_kstyle(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_step_kstyle", "train_step_kstyle.safetensors")
}

pub fn train_step_lora(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_step_lora", "train_step_lora.safetensors")
}

/// kohya's conv LoRA (`tests/fixtures/extra/gen_train_locon.py`): train_step_lora's step with
/// LoRAModule on every child of the resnets and resamplers as well (3x3 convolutions at rank 2,
/// alpha 1; 1x1 shortcuts and time projections at the network's rank and alpha): the loss,
/// every gradient, AdamW.
pub fn train_locon(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_locon", "../../extra/train_locon.safetensors")
}

/// LyCORIS' LoHa (`tests/fixtures/extra/gen_train_loha.py`): train_step_lora's step with
/// lycoris-lora's `LohaModule` in place of LoRA on the attention projections (rank 4, alpha 4)
/// and on every child of the resnets and resamplers (3x3 convolutions at rank 2, alpha 1): the
/// loss, every gradient of the four Hadamard factors, AdamW.
pub fn train_loha(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_loha", "../../extra/train_loha.safetensors")
}

/// DoRA (`tests/fixtures/extra/gen_train_dora.py`): train_step_lora's step with lycoris-lora's
/// `LoConModule(weight_decompose=True)` on the attention projections (rank 4, alpha 4) and on
/// every child of the resnets and resamplers (3x3 convolutions at rank 2, alpha 1): the loss,
/// every gradient of lora_down, lora_up and the magnitude, AdamW.
pub fn train_dora(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_dora", "../../extra/train_dora.safetensors")
}

/// DoHa (`gen_train_loha.py --dora`): train_loha's modules as lycoris-lora's
/// `LohaModule(weight_decompose=True)`, the same DoRA epilogue on the Hadamard update: the loss,
/// every gradient of the four factors and the magnitude, AdamW.
pub fn train_doha(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_doha", "../../extra/train_doha.safetensors")
}

/// DoKr (`gen_train_lokr.py --dora`): train_lokr's modules as lycoris-lora's
/// `LokrModule(weight_decompose=True)`: the loss, every gradient of the Kronecker factors and the
/// magnitude, AdamW.
pub fn train_dokr(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_dokr", "../../extra/train_dokr.safetensors")
}

/// LyCORIS' LoKr (`tests/fixtures/extra/gen_train_lokr.py`): train_step_lora's step with
/// lycoris-lora's `LokrModule` (factor -1) in place of LoRA on the attention projections (rank 4,
/// alpha 4: whole w2 at scale 1 on the 48- and 64-wide ones) and on every child of the resnets
/// and resamplers (3x3 convolutions at rank 2 alpha 1, w2 as a rank-2 pair): the loss, every
/// gradient, AdamW.
pub fn train_lokr(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_lokr", "../../extra/train_lokr.safetensors")
}

/// Adapters beyond the attention projections (`tests/fixtures/extra/gen_train_targets.py`):
/// plain LoRA on every linear of the spatial transformers (kohya's target set: proj_in, the
/// attention projections, ff.net.0.proj, ff.net.2, proj_out), and K-StyleLoRA with the cultural
/// loss on ff.net.0.proj and proj_out. Each as train_step_*: the losses, every gradient, AdamW.
pub fn train_targets(ctx: &Ctx) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for tag in ["lora", "kstyle"] {
        let file = format!("../../extra/train_targets_{tag}.safetensors");
        rows.extend(train_step(ctx, &format!("train_targets {tag}"), &file)?);
    }
    Ok(rows)
}

/// The tiny UNet with the reference step's adapter and cultural-loss parameters, and the step's
/// inputs.
pub(super) struct Step {
    pub(super) unet: UNet2DConditionModel,
    pub(super) cultural: Option<CulturalLoss>,
    pub(super) lambda: f64,
    pub(super) params: Vec<(String, Tensor)>,
    pub(super) t: Vec<usize>,
    pub(super) x0: Tensor,
    pub(super) noise: Tensor,
    pub(super) context: Tensor,
    pub(super) pooled: Tensor,
    pub(super) time_ids: Tensor,
    /// The diffusion loss's mask (B, 1, h, w), when a case sets one.
    pub(super) loss_mask: Option<Tensor>,
}

impl Step {
    pub(super) fn load(ctx: &Ctx, f: &SafeTensorsFile) -> Result<Step> {
        let text = |k: &str| f.meta_str(k).map(String::from);
        let num = |k: &str| f.meta_f64(k);
        let load = |k: &str| -> Result<Tensor> {
            f.tensor(k)?.to_dtype(DType::F32)?.to_device(ctx.device)
        };
        let gated = text("gated")? == "True";
        let lambda = num("cultural_weight")?;
        let targets: Vec<String> = text("targets")?.split(',').map(str::to_string).collect();
        let concepts = load("concepts")?;
        let config = LoraConfig {
            rank: num("rank")? as usize,
            alpha: num("alpha")?,
            guidance: num("guidance")?,
            gate_hidden: num("gate_hidden")? as usize,
            mod_hidden: num("mod_hidden")? as usize,
        };
        let mut unet = UNet2DConditionModel::from_diffusers(
            ctx.dir.join("sdxl"),
            &[],
            DType::F32,
            ctx.device,
        )?
        .model;
        let mut rng = Rng::new(0);
        // LyCORIS' LoHa or LoKr in place of LoRA on every module (gen_train_loha.py,
        // gen_train_lokr.py), when recorded.
        let algo = f.metadata().get("algo").cloned();
        // DoRA on every module (gen_train_dora.py), when recorded.
        let dora = f.metadata().contains_key("dora");
        let weight_space = |w: &Tensor, config, rng: &mut Rng| {
            let dims = w.dims();
            let a = match algo.as_deref() {
                Some("loha") => LoraAdapter::init_loha(dims, config, rng, DType::F32, ctx.device),
                Some("lokr") => {
                    LoraAdapter::init_lokr(dims, config, -1, rng, DType::F32, ctx.device)
                }
                _ => LoraAdapter::init_plain(dims, config, rng, DType::F32, ctx.device),
            }?;
            match dora {
                true => a.with_dora(w),
                false => Ok(a),
            }
        };
        unet.attach_adapters(|path, base| {
            if !targets.iter().any(|t| path.ends_with(&format!(".{t}"))) {
                return Ok(None);
            }
            if algo.is_some() || dora {
                let mut a = weight_space(&base.weight, config, &mut rng)?;
                a.assign(|name, _| load(&format!("param.{path}.{name}")))?;
                return Ok(Some(a));
            }
            let (d_in, d_out) = (base.in_features(), base.out_features());
            let mut a = LoraAdapter::init(
                d_in,
                d_out,
                config,
                gated.then_some(&concepts),
                &mut rng,
                DType::F32,
                ctx.device,
            )?;
            a.assign(|name, _| load(&format!("param.{path}.{name}")))?;
            Ok(Some(a))
        })?;
        // kohya's conv LoRA on the resnets and resamplers (gen_train_locon.py), when recorded.
        if f.metadata().contains_key("conv_dim") {
            let conv = ConvLora {
                dim: num("conv_dim")? as usize,
                alpha: num("conv_alpha")?,
            };
            for (path, mut layer) in unet.conv_group_mut() {
                let w = layer.base_weight().clone();
                let cfg = conv.config_for(w.dims(), LoraConfig { ..config });
                let mut a = weight_space(&w, cfg, &mut rng)?;
                a.assign(|name, _| load(&format!("param.{path}.{name}")))?;
                layer.set_adapter(a)?;
            }
        }
        let cultural = if lambda > 0.0 {
            let proj = Linear {
                weight: load("param.cultural.proj.weight")?.var()?,
                bias: Some(load("param.cultural.proj.bias")?.var()?),
            };
            Some(CulturalLoss {
                proj,
                pool: num("cultural_pool")? as usize,
                concepts: concepts.clone(),
                tau: 1.0,
            })
        } else {
            None
        };
        let mut params = unet.adapter_parameters();
        if let Some(c) = &cultural {
            params.extend(c.parameters());
        }
        let expected = num("n_params")? as usize;
        if params.len() != expected {
            return Err(Error::msg(format!(
                "{} trainable tensors, the reference has {expected}",
                params.len()
            )));
        }
        let t: Vec<usize> = f
            .tensor("timestep")?
            .to_vec_i64()?
            .into_iter()
            .map(|v| v as usize)
            .collect();
        Ok(Step {
            unet,
            cultural,
            lambda,
            params,
            t,
            x0: load("x0")?,
            noise: load("noise")?,
            context: load("encoder_hidden_states")?,
            pooled: load("text_embeds")?,
            time_ids: load("time_ids")?,
            loss_mask: None,
        })
    }

    pub(super) fn losses(&self, schedule: &TrainSchedule) -> Result<Losses> {
        self.losses_with(schedule, (&self.noise).into())
    }

    /// [`Step::losses`] with the noisy input built from other noise than the target's.
    pub(super) fn losses_with(
        &self,
        schedule: &TrainSchedule,
        noise: StepNoise<'_>,
    ) -> Result<Losses> {
        training_loss(
            &self.unet,
            self.cultural.as_ref().map(|c| (c, self.lambda)),
            schedule,
            &self.x0,
            noise,
            &self.t,
            &Conditioning {
                context: &self.context,
                pooled: &self.pooled,
                time_ids: &self.time_ids,
                loss_mask: self.loss_mask.as_ref(),
            },
        )
    }
}

/// The step of reference `file` (train_step_*'s layout), its rows named `case`.
fn train_step(ctx: &Ctx, case: &str, file: &str) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference(file))?;
    let step = Step::load(ctx, &f)?;
    let params = &step.params;
    let losses = step.losses(&TrainSchedule::sdxl())?;
    let mut chk = Checker::new(case);
    chk.check(
        "loss.diffusion",
        &losses.diffusion,
        &f.tensor("loss.diffusion")?,
        ctx.forward,
    )?;
    if let Some(c) = &losses.cultural {
        chk.check("loss.cultural", c, &f.tensor("loss.cultural")?, ctx.forward)?;
    }
    chk.check(
        "loss.total",
        &losses.total,
        &f.tensor("loss.total")?,
        ctx.forward,
    )?;
    let grads = losses.total.backward()?;
    let grad_tol = ctx.grad.grad_with_floor(max_norm(&f, "grad.")?);
    let mut flat = Vec::with_capacity(params.len());
    for (name, p) in params {
        let g = grads
            .get(p)
            .ok_or_else(|| Error::Backward(format!("no gradient for {name}")))?;
        chk.check(
            &format!("grad.{name}"),
            g,
            &f.tensor(&format!("grad.{name}"))?,
            grad_tol,
        )?;
        flat.push(g.to_dtype(DType::F32)?.reshape(g.elem_count())?);
    }
    let hyper = adamw_from(&f)?;
    let before: Vec<Vec<f64>> = params
        .iter()
        .map(|(_, p)| p.to_vec_f64())
        .collect::<Result<_>>()?;
    let mut opt = Optimizer::new(hyper, params)?;
    let grad = Tensor::cat(&flat, 0)?;
    opt.step(params, &grad, 1.0, hyper.lr)?;
    let adam_tol = ctx.grad.grad_with_floor(max_norm(&f, "after_adamw.")?);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for ((name, p), b) in params.iter().zip(&before) {
        let reference = f.tensor(&format!("after_adamw.{name}"))?;
        chk.check(&format!("after_adamw.{name}"), p, &reference, adam_tol)?;
        ours.extend(p.to_vec_f64()?.iter().zip(b).map(|(a, b)| a - b));
        theirs.extend(reference.to_vec_f64()?.iter().zip(b).map(|(a, b)| a - b));
    }
    // The values above are dominated by the parameters themselves (an update is ~lr of them), so
    // also compare the updates: all of them as one vector, at the gradient tolerance.
    let n = ours.len();
    chk.check(
        "after_adamw (every update, as one vector)",
        &Tensor::from_vec(ours, n, crate::Device::Cpu)?,
        &Tensor::from_vec(theirs, n, crate::Device::Cpu)?,
        ctx.grad,
    )?;
    Ok(chk.rows)
}

/// K-StyleLoRA's step on a v-prediction model (`tests/fixtures/extra/gen_train_vpred.py`):
/// train_step_kstyle's setup with the v target and the x0 it implies, on the zero-terminal-SNR
/// schedule (timestep 999 is pure noise there) and on the plain one. The losses, the rescaled
/// schedule, and the gradients the reference keeps (every LoRA factor, the cultural projection,
/// one module's gates).
pub fn train_vpred(ctx: &Ctx) -> Result<Vec<Row>> {
    let setup = SafeTensorsFile::open(ctx.reference("train_step_kstyle.safetensors"))?;
    let f = SafeTensorsFile::open(ctx.reference("../../extra/train_vpred.safetensors"))?;
    let step = Step::load(ctx, &setup)?;
    let mut chk = Checker::new("train_vpred");
    for (case, zero_snr) in [("zsnr", true), ("plain", false)] {
        let schedule = TrainSchedule::for_model(&SchedulerConfig {
            prediction: Prediction::V,
            zero_snr,
            ..SchedulerConfig::default()
        })?;
        if zero_snr {
            let n = schedule.len();
            chk.check(
                "zsnr.alphas_cumprod",
                &Tensor::from_vec(schedule.alphas_cumprod.clone(), n, crate::Device::Cpu)?,
                &f.tensor("zsnr.alphas_cumprod")?,
                ctx.forward,
            )?;
        }
        let losses = step.losses(&schedule)?;
        check_losses(&mut chk, ctx, &f, &format!("{case}."), &losses)?;
        check_stored_grads(&mut chk, ctx, &f, case, &step, &losses)?;
    }
    Ok(chk.rows)
}

/// A step's losses against `<prefix>loss.diffusion` and `.total`, and `.cultural` where the
/// reference stores one (then the step must have one) or the step has one (then the reference
/// must store it).
pub(super) fn check_losses(
    chk: &mut Checker,
    ctx: &Ctx,
    f: &SafeTensorsFile,
    prefix: &str,
    losses: &Losses,
) -> Result<()> {
    let mut pairs = vec![
        ("loss.diffusion", &losses.diffusion),
        ("loss.total", &losses.total),
    ];
    let key = format!("{prefix}loss.cultural");
    if f.contains(&key) || losses.cultural.is_some() {
        let c = losses.cultural.as_ref().ok_or_else(|| {
            Error::msg(format!(
                "the reference stores {key}; the step has no cultural loss"
            ))
        })?;
        pairs.push(("loss.cultural", c));
    }
    for (name, got) in pairs {
        let name = format!("{prefix}{name}");
        chk.check(&name, got, &f.tensor(&name)?, ctx.forward)?;
    }
    Ok(())
}

/// The AdamW settings a training reference records (`lr`, `betas`, `adam_eps`, `weight_decay`).
pub(super) fn adamw_from(f: &SafeTensorsFile) -> Result<AdamW> {
    let betas: Vec<f64> = f
        .meta_str("betas")?
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    Ok(AdamW {
        lr: f.meta_f64("lr")?,
        beta1: betas.first().copied().unwrap_or(0.9),
        beta2: betas.get(1).copied().unwrap_or(0.999),
        eps: f.meta_f64("adam_eps")?,
        weight_decay: f.meta_f64("weight_decay")?,
    })
}

/// A weighted-loss reference's case: the step of its `<case>.setup` at `<case>.timesteps`, and
/// the schedule of its `<case>.prediction` (with `<case>.zero_snr`).
fn case_step(ctx: &Ctx, f: &SafeTensorsFile, case: &str) -> Result<(Step, TrainSchedule)> {
    let meta = |k: &str| f.meta_str(&format!("{case}.{k}")).map(String::from);
    let setup = SafeTensorsFile::open(ctx.reference(&format!("{}.safetensors", meta("setup")?)))?;
    let mut step = Step::load(ctx, &setup)?;
    step.t = meta("timesteps")?
        .split(',')
        .map(|v| v.parse().map_err(|_| Error::msg(format!("timestep `{v}`"))))
        .collect::<Result<_>>()?;
    let schedule = TrainSchedule::for_model(&SchedulerConfig {
        prediction: match meta("prediction")?.as_str() {
            "v_prediction" => Prediction::V,
            _ => Prediction::Epsilon,
        },
        zero_snr: meta("zero_snr")? == "True",
        ..SchedulerConfig::default()
    })?;
    Ok((step, schedule))
}

/// Min-SNR loss weighting (`tests/fixtures/extra/gen_train_min_snr.py`, gamma 5): plain LoRA on
/// epsilon at timesteps 10 and 500, and K-StyleLoRA on a zero-SNR v-prediction model at 999 and
/// 10. The per-sample weights, the losses and a few gradients.
pub fn train_min_snr(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/train_min_snr.safetensors"))?;
    let gamma = f.meta_f64("gamma")?;
    let mut chk = Checker::new("train_min_snr");
    for case in f.meta_str("cases")?.split(',') {
        let (step, mut schedule) = case_step(ctx, &f, case)?;
        schedule.min_snr_gamma = Some(gamma);
        let weights: Vec<f64> = step.t.iter().map(|&t| schedule.loss_weight(t)).collect();
        let n = weights.len();
        let name = format!("{case}.weights");
        chk.check(
            &name,
            &Tensor::from_vec(weights, n, crate::Device::Cpu)?,
            &f.tensor(&name)?,
            ctx.forward,
        )?;
        let losses = step.losses(&schedule)?;
        check_losses(&mut chk, ctx, &f, &format!("{case}."), &losses)?;
        check_stored_grads(&mut chk, ctx, &f, case, &step, &losses)?;
    }
    Ok(chk.rows)
}

/// kohya's loss types and weights (`tests/fixtures/extra/gen_train_loss_types.py`): Huber on the
/// snr schedule with min-SNR and debiased weights, smooth L1 on the exponential schedule on a
/// zero-SNR v-prediction model, L1 with debiased weights (SNR capped at t = 0), Huber on the
/// constant schedule, the v-prediction scale (zero-SNR v), the v-prediction-like loss
/// (epsilon, with min-SNR) and a loss mask (`--alpha-mask`, area-pooled from a picture-sized
/// mask). The per-sample weights and thresholds, the losses and a few gradients.
pub fn train_loss_types(ctx: &Ctx) -> Result<Vec<Row>> {
    use crate::sample::schedule::{Huber, HuberSchedule, LossType};
    let f = SafeTensorsFile::open(ctx.reference("../../extra/train_loss_types.safetensors"))?;
    let mut chk = Checker::new("train_loss_types");
    for case in f.meta_str("cases")?.split(',') {
        let meta = |k: &str| f.meta_str(&format!("{case}.{k}")).map(String::from);
        let num = |k: &str| f.meta_f64(&format!("{case}.{k}"));
        let (mut step, mut schedule) = case_step(ctx, &f, case)?;
        // A masked case holds its picture-sized mask; the step reads it pooled to the latents.
        let pixels = format!("{case}.pixel_mask");
        if f.contains(&pixels) {
            let m = f.tensor(&pixels)?.to_dtype(DType::F32)?;
            let (b, _, h, w) = m.dims4()?;
            let (_, _, lh, lw) = step.x0.dims4()?;
            let pooled =
                crate::train::data::area_downsample(&m.to_vec_f32()?, (b, h, w), (lh, lw))?;
            step.loss_mask = Some(Tensor::from_vec(pooled, (b, 1, lh, lw), ctx.device)?);
        }
        schedule.min_snr_gamma = match meta("min_snr_gamma")?.as_str() {
            "none" => None,
            _ => Some(num("min_snr_gamma")?),
        };
        schedule.debiased = meta("debiased")? == "True";
        schedule.scale_v_pred = meta("scale_v_pred")? == "True";
        schedule.v_pred_like = match meta("v_pred_like")?.as_str() {
            "none" => None,
            _ => Some(num("v_pred_like")?),
        };
        schedule.loss_type = match meta("loss_type")?.as_str() {
            "l2" => LossType::L2,
            "l1" => LossType::L1,
            "huber" => LossType::Huber,
            "smooth_l1" => LossType::SmoothL1,
            other => return Err(Error::msg(format!("{case}: loss type `{other}`"))),
        };
        schedule.huber = Huber {
            schedule: match meta("huber_schedule")?.as_str() {
                "constant" => HuberSchedule::Constant,
                "exponential" => HuberSchedule::Exponential,
                "snr" => HuberSchedule::Snr,
                other => return Err(Error::msg(format!("{case}: huber schedule `{other}`"))),
            },
            c: num("huber_c")?,
            scale: num("huber_scale")?,
        };
        let per_sample = |v: Vec<f64>| {
            let n = v.len();
            Tensor::from_vec(v, n, crate::Device::Cpu)
        };
        let weights: Vec<f64> = step.t.iter().map(|&t| schedule.loss_weight(t)).collect();
        let name = format!("{case}.weights");
        chk.check(&name, &per_sample(weights)?, &f.tensor(&name)?, ctx.forward)?;
        let name = format!("{case}.huber_c");
        if schedule.loss_type.uses_threshold() {
            let c: Vec<f64> = step.t.iter().map(|&t| schedule.huber_c(t)).collect();
            chk.check(&name, &per_sample(c)?, &f.tensor(&name)?, ctx.forward)?;
        } else if f.contains(&name) {
            return Err(Error::msg(format!(
                "{name} stored for a loss without a threshold"
            )));
        }
        let losses = step.losses(&schedule)?;
        check_losses(&mut chk, ctx, &f, &format!("{case}."), &losses)?;
        check_stored_grads(&mut chk, ctx, &f, case, &step, &losses)?;
    }
    Ok(chk.rows)
}

/// Input perturbation (`tests/fixtures/extra/gen_train_ip_noise.py`, gamma 0.1): plain LoRA on
/// epsilon and K-StyleLoRA on v-prediction, each at its setup's timesteps with the fixture's
/// fixed xi. The noisy input is built from `noise + gamma xi`, the target from `noise`.
pub fn train_ip_noise(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/train_ip_noise.safetensors"))?;
    let gamma = f.meta_f64("gamma")?;
    let mut chk = Checker::new("train_ip_noise");
    for case in f.meta_str("cases")?.split(',') {
        let meta = |k: &str| f.meta_str(&format!("{case}.{k}")).map(String::from);
        let setup =
            SafeTensorsFile::open(ctx.reference(&format!("{}.safetensors", meta("setup")?)))?;
        let step = Step::load(ctx, &setup)?;
        let schedule = TrainSchedule::for_model(&SchedulerConfig {
            prediction: match meta("prediction")?.as_str() {
                "v_prediction" => Prediction::V,
                _ => Prediction::Epsilon,
            },
            ..SchedulerConfig::default()
        })?;
        let xi = f
            .tensor(&format!("{case}.xi"))?
            .to_dtype(DType::F32)?
            .to_device(ctx.device)?;
        let input = step.noise.add(&xi.scale(gamma)?)?; // (B, C, H, W)
        let losses = step.losses_with(
            &schedule,
            StepNoise {
                input: &input,
                target: &step.noise,
            },
        )?;
        check_losses(&mut chk, ctx, &f, &format!("{case}."), &losses)?;
        check_stored_grads(&mut chk, ctx, &f, case, &step, &losses)?;
    }
    Ok(chk.rows)
}

/// Backpropagates `losses.total` and checks every gradient the reference stores under
/// `<case>.grad.<parameter>` (at least one).
pub(super) fn check_stored_grads(
    chk: &mut Checker,
    ctx: &Ctx,
    f: &SafeTensorsFile,
    case: &str,
    step: &Step,
    losses: &Losses,
) -> Result<()> {
    let grads = losses.total.backward()?;
    let prefix = format!("{case}.grad.");
    let tol = ctx.grad.grad_with_floor(max_norm(f, &prefix)?);
    let mut checked = 0;
    for key in f.names().filter(|n| n.starts_with(&prefix)) {
        let name = &key[prefix.len()..];
        let p = step
            .params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .ok_or_else(|| Error::msg(format!("{key} names no trainable tensor")))?;
        let g = grads
            .get(p)
            .ok_or_else(|| Error::Backward(format!("no gradient for {name}")))?;
        chk.check(key, g, &f.tensor(key)?, tol)?;
        checked += 1;
    }
    if checked == 0 {
        return Err(Error::msg(format!(
            "no {prefix}* gradients in the reference"
        )));
    }
    Ok(())
}

/// Global gradient-norm clipping over two steps (`tests/fixtures/extra/gen_train_clip_grad.py`):
/// each case's setup trains at its reference timesteps, then, from the values that step left,
/// at the second step's, clipping to the case's max_norm (the first step clips, the second does
/// not; AdamW's moments carry the clipped gradient into the second update). Each step's loss,
/// norm and clip factor; then the update of one module and of the cultural projection, and the
/// squared norm of the whole update.
pub fn train_clip_grad(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/train_clip_grad.safetensors"))?;
    let mut chk = Checker::new("train_clip_grad");
    let schedule = TrainSchedule::sdxl();
    let cpu = crate::Device::Cpu;
    let vector = |v: Vec<f64>| {
        let n = v.len();
        Tensor::from_vec(v, n, cpu)
    };
    for case in f.meta_str("cases")?.split(',') {
        let meta = |k: &str| f.meta_str(&format!("{case}.{k}")).map(String::from);
        let max = f.meta_f64(&format!("{case}.max_norm"))?;
        let setup =
            SafeTensorsFile::open(ctx.reference(&format!("{}.safetensors", meta("setup")?)))?;
        let mut step = Step::load(ctx, &setup)?;
        let hyper = adamw_from(&setup)?;
        let mut opt = Optimizer::new(hyper, &step.params)?;
        let before: Vec<Vec<f64>> = step
            .params
            .iter()
            .map(|(_, p)| p.to_vec_f64())
            .collect::<Result<_>>()?;
        let (mut losses, mut norms, mut factors) = (vec![], vec![], vec![]);
        for (k, steps) in meta("timesteps")?.split(';').enumerate() {
            step.t = steps
                .split(',')
                .map(|v| v.parse().map_err(|_| Error::msg(format!("timestep `{v}`"))))
                .collect::<Result<_>>()?;
            let l = step.losses(&schedule)?;
            losses.push(l.total.to_scalar()?);
            let grads = l.total.backward()?;
            let prefix = format!("{case}.grad{}.", k + 1);
            let tol = ctx.grad.grad_with_floor(max_norm(&f, &prefix)?);
            for key in f.names().filter(|n| n.starts_with(&prefix)) {
                let name = &key[prefix.len()..];
                let g = step
                    .params
                    .iter()
                    .find(|(n, _)| n == name)
                    .and_then(|(_, p)| grads.get(p))
                    .ok_or_else(|| Error::msg(format!("{key}: no such trainable gradient")))?;
                chk.check(key, g, &f.tensor(key)?, tol)?;
            }
            let mut acc = GradAccumulator::new(&opt)?;
            acc.add(&step.params, &grads)?;
            let clipped = acc.clipped(Some(max))?;
            norms.push(clipped.norm);
            factors.push(clipped.scale as f64 / acc.mean_scale() as f64);
            opt.step(&step.params, &acc.sum, clipped.scale, hyper.lr)?;
        }
        for (name, got) in [("loss.total", losses), ("norm", norms), ("factor", factors)] {
            let name = format!("{case}.{name}");
            chk.check(&name, &vector(got)?, &f.tensor(&name)?, ctx.forward)?;
        }
        // The moments hold the clipped gradients at full precision, tensor by tensor (the second
        // as its root, AdamW's denominator, which spans the gradients' range, not its square,
        // so the tolerance floor over the family means the same as for gradients). The updates
        // are differences of f32 values, which resolve an update of 1e-6 (the spatial MLPs',
        // whose gradients sit below AdamW's epsilon) only to about 1e-2: they are compared as
        // one vector, as train_step compares its updates.
        let root = |t: Tensor| t.sqrt();
        let mut moments = vec![];
        for (what, rooted) in [("exp_avg", false), ("exp_avg_sq", true)] {
            let prefix = format!("{case}.{what}.");
            let mut floor: f64 = 0.0;
            for key in f.names().filter(|n| n.starts_with(&prefix)) {
                let t = f.tensor(key)?;
                let t = if rooted { root(t)? } else { t };
                floor = floor.max(crate::tolerance::l2(&t.to_vec_f64()?));
            }
            moments.push((what, rooted, ctx.grad.grad_with_floor(floor)));
        }
        let (mut sq, mut ours, mut theirs) = (0.0, vec![], vec![]);
        for (((name, p), b), slot) in step.params.iter().zip(&before).zip(&opt.slots) {
            let u: Vec<f64> = p.to_vec_f64()?.iter().zip(b).map(|(a, b)| a - b).collect();
            sq += u.iter().map(|v| v * v).sum::<f64>();
            let key = format!("{case}.update.{name}");
            if !f.contains(&key) {
                continue;
            }
            ours.extend(u);
            theirs.extend(f.tensor(&key)?.to_vec_f64()?);
            let [_, m, v] = opt.slot_state(slot)?;
            for (&(what, rooted, tol), got) in moments.iter().zip([m, v]) {
                let key = format!("{case}.{what}.{name}");
                let (got, want) = (got.reshape(p.dims())?, f.tensor(&key)?);
                match rooted {
                    false => chk.check(&key, &got, &want, tol)?,
                    true => {
                        let key = format!("{case}.sqrt({what}).{name}");
                        chk.check(&key, &root(got)?, &root(want)?, tol)?
                    }
                }
            }
        }
        let stored = f.names().filter(|n| n.contains(".update.")).count();
        if ours.is_empty() || ours.len() != theirs.len() || stored == 0 {
            return Err(Error::msg(format!(
                "{case}: the stored updates do not match the trainable tensors"
            )));
        }
        let name = format!("{case}.update (the stored tensors' updates, as one vector)");
        chk.check(&name, &vector(ours)?, &vector(theirs)?, ctx.grad)?;
        let name = format!("{case}.update_sqnorm");
        chk.check(&name, &vector(vec![sq])?, &f.tensor(&name)?, ctx.grad)?;
    }
    Ok(chk.rows)
}
