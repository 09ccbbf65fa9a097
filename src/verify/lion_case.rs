//! Lion against lion-pytorch 0.2.5 (`tests/fixtures/extra/gen_lion.py`, float64 from float32
//! starting values and gradients): five parameters (one starting at zero, as lora_up does; one
//! element never given a gradient, so sgn(0) keeps it still) stepped through the optimizer the
//! trainer runs, `Optimizer::step_rates` with the Lion rule, under a schedule of rates. Cases:
//! `plain` (lion-pytorch's betas, weight decay 0.5), `groups` (two parameters at 4x the rate,
//! interleaved with the others as LoRA+'s lora_up, other betas) and `decoupled`
//! (decoupled_weight_decay, the decay divided by the starting rate). Each step's update as one
//! vector, the final moment and values.

use super::optim_steps::{check_schedule, json, start};
use super::{Checker, Ctx, Row};
use crate::backend::cpu::optim::AdamW;
use crate::tensor::SafeTensorsFile;
use crate::train::lion::LionConfig;
use crate::train::optim::Optimizer;
use crate::{Error, Result};

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
        let (params, mut reference) = start(ctx, &f, case, shapes.len())?;
        let mut opt = Optimizer::new(hyper, &params)?.with_lion(config)?;
        let run = (&mut opt, &params[..], &mut reference[..]);
        check_schedule(&mut chk, ctx, &f, case, &lrs, &mults, run)?;
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
