//! Whole training steps on the tiny UNet: the losses, the gradient of every trainable tensor, and
//! one AdamW update, for K-StyleLoRA (gated + cultural loss) and plain LoRA.

use super::{max_norm, Checker, Ctx, Row};
use crate::backend::cpu::optim::AdamW;
use crate::models::unet::UNet2DConditionModel;
use crate::nn::lora::{LoraAdapter, LoraConfig};
use crate::nn::Linear;
use crate::sample::TrainSchedule;
use crate::tensor::{Rng, SafeTensorsFile};
use crate::train::cultural::CulturalLoss;
use crate::train::optim::Optimizer;
use crate::train::step::{training_loss, Conditioning};
use crate::{DType, Error, Result, Tensor};

pub fn train_step_kstyle(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_step_kstyle")
}

pub fn train_step_lora(ctx: &Ctx) -> Result<Vec<Row>> {
    train_step(ctx, "train_step_lora")
}

fn train_step(ctx: &Ctx, case: &str) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference(&format!("{case}.safetensors")))?;
    let text = |k: &str| f.meta_str(k).map(String::from);
    let num = |k: &str| f.meta_f64(k);
    let load =
        |k: &str| -> Result<Tensor> { f.tensor(k)?.to_dtype(DType::F32)?.to_device(ctx.device) };
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
    let mut unet =
        UNet2DConditionModel::from_diffusers(ctx.dir.join("sdxl"), &[], DType::F32, ctx.device)?
            .model;
    let mut rng = Rng::new(0);
    unet.attach_adapters(|path, base| {
        if !targets.iter().any(|t| path.ends_with(&format!(".{t}"))) {
            return Ok(None);
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
        params.extend(
            c.named()
                .into_iter()
                .map(|(n, t)| (format!("cultural.{n}"), t)),
        );
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
    let (context, pooled, time_ids) = (
        load("encoder_hidden_states")?,
        load("text_embeds")?,
        load("time_ids")?,
    );
    let losses = training_loss(
        &unet,
        cultural.as_ref().map(|c| (c, lambda)),
        &TrainSchedule::sdxl(),
        &load("x0")?,
        &load("noise")?,
        &t,
        &Conditioning {
            context: &context,
            pooled: &pooled,
            time_ids: &time_ids,
        },
    )?;
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
    for (name, p) in &params {
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
    let betas: Vec<f64> = text("betas")?
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    let hyper = AdamW {
        lr: num("lr")?,
        beta1: betas.first().copied().unwrap_or(0.9),
        beta2: betas.get(1).copied().unwrap_or(0.999),
        eps: num("adam_eps")?,
        weight_decay: num("weight_decay")?,
    };
    let before: Vec<Vec<f64>> = params
        .iter()
        .map(|(_, p)| p.to_vec_f64())
        .collect::<Result<_>>()?;
    let mut opt = Optimizer::new(hyper, &params)?;
    let grad = Tensor::cat(&flat, 0)?;
    opt.step(&params, &grad, 1.0, hyper.lr)?;
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
