//! The single-layer cases: one gated LoRA linear (and its plain twin), and the cultural loss.

use super::{max_norm, Checker, Ctx, Row};
use crate::backend::cpu::optim::AdamW;
use crate::nn::lora::{Gates, LoraAdapter, LoraConfig, Mlp};
use crate::nn::lora_dropout::DropoutMasks;
use crate::nn::Linear;
use crate::tensor::SafeTensorsFile;
use crate::train::cultural::CulturalLoss;
use crate::train::max_norm::{regularize, slot_factors, weight_norms};
use crate::train::optim::Optimizer;
use crate::{DType, Device, Error, Result, Tensor};

fn load(f: &SafeTensorsFile, name: &str, ctx: &Ctx) -> Result<Tensor> {
    f.tensor(name)?.to_dtype(DType::F32)?.to_device(ctx.device)
}

fn linear(f: &SafeTensorsFile, prefix: &str, ctx: &Ctx) -> Result<Linear> {
    let bias = format!("{prefix}.bias");
    Ok(Linear {
        weight: load(f, &format!("{prefix}.weight"), ctx)?.var()?,
        bias: if f.contains(&bias) {
            Some(load(f, &bias, ctx)?.var()?)
        } else {
            None
        },
    })
}

fn mlp(f: &SafeTensorsFile, prefix: &str, ctx: &Ctx) -> Result<Mlp> {
    Ok(Mlp {
        fc0: linear(f, &format!("{prefix}.0"), ctx)?,
        fc2: linear(f, &format!("{prefix}.2"), ctx)?,
    })
}

/// The adapter (variables) and frozen base of layer `tag` (`gated` or `plain`) of
/// gated_lora_layer.safetensors.
fn layer(f: &SafeTensorsFile, tag: &str, ctx: &Ctx) -> Result<(LoraAdapter, Linear)> {
    let concepts = load(f, "concepts", ctx)?;
    let p = |n: &str| format!("{tag}.param.{n}");
    let a = load(f, &p("lora_A"), ctx)?;
    let config = LoraConfig {
        rank: a.dims()[0],
        alpha: f.meta_f64("alpha")?,
        guidance: f.meta_f64("guidance")?,
        gate_hidden: f.meta_f64("gate_hidden")? as usize,
        mod_hidden: f.meta_f64("mod_hidden")? as usize,
    };
    let gates = if tag == "gated" {
        Some(Gates {
            attn_mlp: mlp(f, &p("attn_mlp"), ctx)?,
            proj: linear(f, &p("proj"), ctx)?,
            down_mlp: mlp(f, &p("down_mlp"), ctx)?,
            up_mlp: mlp(f, &p("up_mlp"), ctx)?,
            gate_mlp: mlp(f, &p("gate_mlp"), ctx)?,
        })
    } else {
        None
    };
    let adapter = LoraAdapter {
        a: a.var()?,
        b: load(f, &p("lora_B"), ctx)?.var()?,
        config,
        concepts: gates.as_ref().map(|_| concepts.clone()),
        gates,
        recorder: None,
        dropout: None,
        lycoris: None,
        dora: None,
    };
    // The frozen base: plain tensors, never variables.
    let base = Linear {
        weight: load(f, &p("base.weight"), ctx)?,
        bias: Some(load(f, &p("base.bias"), ctx)?),
    };
    Ok((adapter, base))
}

pub fn gated_lora_layer(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("gated_lora_layer.safetensors"))?;
    let mut chk = Checker::new("gated_lora_layer");
    let grad_floor = max_norm(&f, "gated.grad.")?.max(max_norm(&f, "plain.grad.")?);
    let grad_tol = ctx.grad.grad_with_floor(grad_floor);
    for tag in ["gated", "plain"] {
        let (adapter, base) = layer(&f, tag, ctx)?;
        let h = load(&f, &format!("{tag}.h"), ctx)?.var()?;
        let up = load(&f, &format!("{tag}.upstream"), ctx)?;
        let y = base.forward(&h)?.add(&adapter.delta(&h)?)?;
        chk.check(
            &format!("{tag}.y"),
            &y,
            &f.tensor(&format!("{tag}.y"))?,
            ctx.forward,
        )?;
        if let Some(g) = adapter.gate_values(&h)? {
            chk.check(
                "gated.gate.down",
                &g.down,
                &f.tensor("gated.gate.down")?,
                ctx.forward,
            )?;
            chk.check(
                "gated.gate.up",
                &g.up,
                &f.tensor("gated.gate.up")?,
                ctx.forward,
            )?;
            chk.check(
                "gated.gate.alpha",
                &g.alpha,
                &f.tensor("gated.gate.alpha")?,
                ctx.forward,
            )?;
        }
        let grads = y.mul(&up)?.sum_all()?.backward()?;
        let gh = grads
            .get(&h)
            .ok_or_else(|| Error::Backward("no gradient for h".into()))?;
        chk.check(
            &format!("{tag}.grad.h"),
            gh,
            &f.tensor(&format!("{tag}.grad.h"))?,
            grad_tol,
        )?;
        for (name, t) in adapter.named() {
            let key = format!("{tag}.grad.{name}");
            let g = grads
                .get(&t)
                .ok_or_else(|| Error::Backward(format!("no gradient for {name}")))?;
            chk.check(&key, g, &f.tensor(&key)?, grad_tol)?;
        }
        if grads.get(&base.weight).is_some() {
            return Err(Error::Backward(
                "a frozen base weight received a gradient".into(),
            ));
        }
    }
    Ok(chk.rows)
}

/// kohya's LoRA dropouts on the gated and plain layers with the masks the reference drew
/// (`tests/fixtures/extra/gen_lora_dropout.py`): network dropout's entries, rank dropout, module
/// dropout and all three, each through `apply_masked`, the path training takes; the output and
/// the gradients of h and every adapter tensor.
pub fn lora_dropout(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/lora_dropout.safetensors"))?;
    let layers = SafeTensorsFile::open(ctx.reference("gated_lora_layer.safetensors"))?;
    let mut chk = Checker::new("lora_dropout");
    let cases: Vec<String> = f.meta_str("cases")?.split(',').map(String::from).collect();
    for tag in ["gated", "plain"] {
        let (adapter, base) = layer(&layers, tag, ctx)?;
        let up = load(&layers, &format!("{tag}.upstream"), ctx)?;
        for case in &cases {
            let key = |n: &str| format!("{tag}.{case}.{n}");
            let mask = |n: &str| -> Result<Option<Tensor>> {
                let k = key(&format!("mask.{n}"));
                f.contains(&k).then(|| load(&f, &k, ctx)).transpose()
            };
            let h = load(&layers, &format!("{tag}.h"), ctx)?.var()?;
            let (b, _, _) = h.dims3()?;
            let r = adapter.config.rank;
            let module = mask("module")?.map(|m| m.reshape((b, 1))).transpose()?;
            let rows = match (mask("rank")?, module) {
                (Some(rank), Some(m)) => Some(rank.mul(&m)?),
                (Some(rank), None) => Some(rank),
                (None, Some(m)) => Some(m.broadcast_as(&(b, r).into())?.contiguous()?),
                (None, None) => None,
            };
            let (p, p_rank) = (
                f.meta_f64(&format!("{case}.p"))?,
                f.meta_f64(&format!("{case}.p_rank"))?,
            );
            let masks = DropoutMasks {
                rows,
                entries: mask("entries")?,
                scale: 1.0 / ((1.0 - p) * (1.0 - p_rank)),
            };
            let y = adapter.apply_masked(&h, Some(&base.forward(&h)?), &masks)?;
            chk.check(&key("y"), &y, &f.tensor(&key("y"))?, ctx.forward)?;
            let grad_tol = ctx
                .grad
                .grad_with_floor(max_norm(&f, &format!("{tag}.{case}.grad."))?);
            let grads = y.mul(&up)?.sum_all()?.backward()?;
            let gh = grads
                .get(&h)
                .ok_or_else(|| Error::Backward("no gradient for h".into()))?;
            chk.check(&key("grad.h"), gh, &f.tensor(&key("grad.h"))?, grad_tol)?;
            for (name, t) in adapter.named() {
                let k = key(&format!("grad.{name}"));
                let g = grads
                    .get(&t)
                    .ok_or_else(|| Error::Backward(format!("no gradient for {name}")))?;
                chk.check(&k, g, &f.tensor(&k)?, grad_tol)?;
            }
        }
    }
    Ok(chk.rows)
}

/// kohya's max-norm regularization (`tests/fixtures/extra/gen_max_norm.py`) on five adapters'
/// factors, through what training runs: `weight_norms` on the factors, `regularize`, and the
/// optimizer's `scale_slots` writing the scaled factors back into the trainables.
pub fn max_norm_regularization(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/max_norm.safetensors"))?;
    let mut chk = Checker::new("max_norm");
    let bound = f.meta_f64("max_norm")?;
    let n = f.meta_f64("modules")? as usize;
    let (mut params, mut pairs, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let a = load(&f, &format!("m{i}.lora_A"), ctx)?.var()?;
        let b = load(&f, &format!("m{i}.lora_B"), ctx)?.var()?;
        let scale = f.meta_f64(&format!("m{i}.alpha"))? / a.dims()[0] as f64;
        pairs.push((a.clone(), b.clone(), scale));
        slots.push((2 * i, 2 * i + 1));
        params.push((format!("m{i}.lora_A"), a));
        params.push((format!("m{i}.lora_B"), b));
    }
    let norms = weight_norms(&pairs)?;
    let (ratios, report) = regularize(&norms, bound);
    let host = |v: Vec<f64>| {
        let len = v.len();
        Tensor::from_vec(v, len, Device::Cpu)
    };
    let scaled = norms.iter().zip(&ratios).map(|(n, r)| n * r).collect();
    chk.check("norms", &host(scaled)?, &f.tensor("norms")?, ctx.forward)?;
    chk.check(
        "ratios",
        &host(ratios.clone())?,
        &f.tensor("ratios")?,
        ctx.forward,
    )?;
    let summary = vec![report.keys_scaled as f64, report.mean_norm, report.max_norm];
    chk.check("report", &host(summary)?, &f.tensor("report")?, ctx.forward)?;
    let mut opt = Optimizer::new(AdamW::default(), &params)?;
    opt.scale_slots(&params, &slot_factors(&slots, &ratios))?;
    for (name, t) in &params {
        let key = name.replacen('.', ".scaled.", 1);
        chk.check(&key, t, &f.tensor(&key)?, ctx.forward)?;
    }
    Ok(chk.rows)
}

pub fn cultural_loss(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("cultural_loss.safetensors"))?;
    let mut chk = Checker::new("cultural_loss");
    let grad_tol = ctx.grad.grad_with_floor(max_norm(&f, "grad.")?);
    let z = load(&f, "z", ctx)?.var()?;
    let (_, c, _, _) = z.dims4()?;
    let proj = linear(&f, "proj", ctx)?;
    let pool = f.meta_f64("pool")? as usize;
    if proj.in_features() != c * pool * pool {
        return Err(Error::file(
            f.path(),
            format!(
                "proj.weight {:?} does not take C*P*P = {}",
                proj.weight.dims(),
                c * pool * pool
            ),
        ));
    }
    let loss_fn = CulturalLoss {
        proj,
        pool,
        concepts: load(&f, "concepts", ctx)?,
        tau: f.meta_f64("tau")?,
    };
    let loss = loss_fn.forward(&z)?;
    chk.check("loss", &loss, &f.tensor("loss")?, ctx.forward)?;
    let grads = loss.backward()?;
    let gz = grads
        .get(&z)
        .ok_or_else(|| Error::Backward("no gradient for z".into()))?;
    chk.check("grad.z", gz, &f.tensor("grad.z")?, grad_tol)?;
    for (name, t) in loss_fn.named() {
        let key = format!("grad.{name}");
        let g = grads
            .get(&t)
            .ok_or_else(|| Error::Backward(format!("no gradient for {name}")))?;
        chk.check(&key, g, &f.tensor(&key)?, grad_tol)?;
    }
    Ok(chk.rows)
}
