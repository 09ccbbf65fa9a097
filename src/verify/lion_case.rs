//! Lion against lion-pytorch 0.2.5 (`tests/fixtures/extra/gen_lion.py`, float64 from float32
//! starting values and gradients): five parameters (one starting at zero, as lora_up does; one
//! element never given a gradient, so sgn(0) keeps it still) stepped through the optimizer the
//! trainer runs, `Optimizer::step_rates` with the Lion rule, under a schedule of rates. Cases:
//! `plain` (lion-pytorch's betas, weight decay 0.5), `groups` (two parameters at 4x the rate,
//! interleaved with the others as LoRA+'s lora_up, other betas) and `decoupled`
//! (decoupled_weight_decay, the decay divided by the starting rate). Each step's update as one
//! vector, the final moment and values.

use super::{Checker, Ctx, Row};
use crate::backend::cpu::optim::AdamW;
use crate::tensor::SafeTensorsFile;
use crate::train::lion::LionConfig;
use crate::train::optim::Optimizer;
use crate::{DType, Device, Error, Result, Tensor};

fn json<T: serde::de::DeserializeOwned>(f: &SafeTensorsFile, key: &str) -> Result<T> {
    serde_json::from_str(f.meta_str(key)?).map_err(|e| Error::Json {
        path: f.path().into(),
        msg: format!("metadata `{key}`: {e}"),
    })
}

fn host(v: Vec<f64>) -> Result<Tensor> {
    let n = v.len();
    Tensor::from_vec(v, n, Device::Cpu)
}

pub fn lion(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/lion.safetensors"))?;
    let mut chk = Checker::new("lion");
    let shapes: Vec<Vec<usize>> = json(&f, "shapes")?;
    for case in ["plain", "groups", "decoupled"] {
        let lr0: f64 = json(&f, &format!("{case}.lr0"))?;
        let lrs: Vec<f64> = json(&f, &format!("{case}.lrs"))?;
        let mults: Vec<f64> = json(&f, &format!("{case}.mults"))?;
        let kw: serde_json::Value = json(&f, &format!("{case}.kwargs"))?;
        let betas = |i: usize| kw["betas"][i].as_f64().unwrap_or(f64::NAN);
        let hyper = AdamW {
            lr: lr0,
            beta1: betas(0),
            beta2: betas(1),
            eps: f64::NAN,
            weight_decay: kw["weight_decay"].as_f64().unwrap_or(0.0),
        };
        let config = LionConfig {
            decoupled_weight_decay: kw
                .get("decoupled_weight_decay")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        let load = |k: &str| -> Result<Tensor> {
            f.tensor(k)?.to_dtype(DType::F32)?.to_device(ctx.device)
        };
        let params: Vec<(String, Tensor)> = (0..shapes.len())
            .map(|i| Ok((format!("p{i}"), load(&format!("{case}.p.{i}"))?.var()?)))
            .collect::<Result<_>>()?;
        let mut opt = Optimizer::new(hyper, &params)?.with_lion(config)?;
        let mut reference: Vec<Vec<f64>> = (0..shapes.len())
            .map(|i| f.tensor(&format!("{case}.p.{i}"))?.to_vec_f64())
            .collect::<Result<_>>()?;
        for (step, &lr) in lrs.iter().enumerate() {
            let before: Vec<Vec<f64>> = params
                .iter()
                .map(|(_, p)| p.to_vec_f64())
                .collect::<Result<_>>()?;
            let grads: Vec<Tensor> = (0..shapes.len())
                .map(|i| {
                    let g = load(&format!("{case}.g.{step}.{i}"))?;
                    let n = g.elem_count();
                    g.reshape(n)
                })
                .collect::<Result<_>>()?;
            let rates: Vec<f64> = mults.iter().map(|m| lr * m).collect();
            opt.step_rates(&params, &Tensor::cat(&grads, 0)?, 1.0, &rates)?;
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for (i, (_, p)) in params.iter().enumerate() {
                let after = f
                    .tensor(&format!("{case}.after.{step}.{i}"))?
                    .to_vec_f64()?;
                ours.extend(p.to_vec_f64()?.iter().zip(&before[i]).map(|(a, b)| a - b));
                theirs.extend(after.iter().zip(&reference[i]).map(|(a, b)| a - b));
                reference[i] = after;
            }
            chk.check(
                &format!("{case} step {step} update (every parameter, as one vector)"),
                &host(ours)?,
                &host(theirs)?,
                ctx.grad,
            )?;
        }
        if opt.v.elem_count() != 0 {
            return Err(Error::msg("Lion kept a second moment"));
        }
        for (i, slot) in opt.slots.clone().iter().enumerate() {
            let [values, m, _] = opt.slot_state(slot)?;
            let key = format!("{case}.exp_avg.{i}");
            let theirs = f.tensor(&key)?;
            let n = theirs.elem_count();
            chk.check(&key, &m, &theirs.reshape(n)?, ctx.grad)?;
            let last = format!("{case}.after.{}.{i}", lrs.len() - 1);
            let theirs = f.tensor(&last)?;
            chk.check(&last, &values, &theirs.reshape(n)?, ctx.forward)?;
        }
    }
    Ok(chk.rows)
}
