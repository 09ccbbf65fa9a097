//! The single-layer cases: one gated LoRA linear (and its plain twin), and the cultural loss.

use super::{max_norm, Checker, Ctx, Row};
use crate::nn::lora::{Gates, LoraAdapter, LoraConfig, Mlp};
use crate::nn::Linear;
use crate::tensor::SafeTensorsFile;
use crate::train::cultural::CulturalLoss;
use crate::{DType, Error, Result, Tensor};

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

pub fn gated_lora_layer(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("gated_lora_layer.safetensors"))?;
    let mut chk = Checker::new("gated_lora_layer");
    let grad_floor = max_norm(&f, "gated.grad.")?.max(max_norm(&f, "plain.grad.")?);
    let grad_tol = ctx.grad.grad_with_floor(grad_floor);
    let concepts = load(&f, "concepts", ctx)?;
    for tag in ["gated", "plain"] {
        let p = |n: &str| format!("{tag}.param.{n}");
        let a = load(&f, &p("lora_A"), ctx)?;
        let config = LoraConfig {
            rank: a.dims()[0],
            alpha: f.meta_f64("alpha")?,
            guidance: f.meta_f64("guidance")?,
            gate_hidden: f.meta_f64("gate_hidden")? as usize,
            mod_hidden: f.meta_f64("mod_hidden")? as usize,
        };
        let gates = if tag == "gated" {
            Some(Gates {
                attn_mlp: mlp(&f, &p("attn_mlp"), ctx)?,
                proj: linear(&f, &p("proj"), ctx)?,
                down_mlp: mlp(&f, &p("down_mlp"), ctx)?,
                up_mlp: mlp(&f, &p("up_mlp"), ctx)?,
                gate_mlp: mlp(&f, &p("gate_mlp"), ctx)?,
            })
        } else {
            None
        };
        let adapter = LoraAdapter {
            a: a.var()?,
            b: load(&f, &p("lora_B"), ctx)?.var()?,
            config,
            concepts: gates.as_ref().map(|_| concepts.clone()),
            gates,
            recorder: None,
        };
        // The frozen base: plain tensors, never variables.
        let base = Linear {
            weight: load(&f, &p("base.weight"), ctx)?,
            bias: Some(load(&f, &p("base.bias"), ctx)?),
        };
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
