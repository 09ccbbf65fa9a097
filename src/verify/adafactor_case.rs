//! Adafactor against transformers 5.24.0's (`tests/fixtures/extra/gen_adafactor.py`, float64
//! from float32 starting values and gradients): seven parameters (matrices, a conv LoRA's 4-d
//! factor, a vector, one-column and one-row matrices; one starting at zero, as lora_up does; one
//! element never given a gradient) stepped through the optimizer the trainer runs,
//! `Optimizer::step_rates` with the Adafactor rule. Cases: `relative` (transformers' and kohya's
//! defaults: the relative step, the parameter scale), `warmup` (warmup_init), `fixed` (kohya's
//! recommended scale_parameter=False relative_step=False, under a schedule) and `full` (a first
//! moment, weight decay, another clip threshold, decay rate and eps pair, two parameters at 4x
//! the rate). Each step's update as one vector, the final state and values.

use super::optim_steps::{check_schedule, json, start};
use super::{Checker, Ctx, Row};
use crate::backend::cpu::optim::AdamW;
use crate::tensor::SafeTensorsFile;
use crate::train::adafactor::AdafactorConfig;
use crate::train::optim::Optimizer;
use crate::{Error, Result};

pub fn adafactor(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/adafactor.safetensors"))?;
    let mut chk = Checker::new("adafactor");
    let shapes: Vec<Vec<usize>> = json(&f, "shapes")?;
    for case in ["relative", "warmup", "fixed", "full"] {
        let lrs: Vec<Option<f64>> = json(&f, &format!("{case}.lrs"))?;
        let mults: Vec<f64> = json(&f, &format!("{case}.mults"))?;
        let kw: serde_json::Value = json(&f, &format!("{case}.kwargs"))?;
        let num = |k: &str, default: f64| kw.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
        let flag = |k: &str, default: bool| kw.get(k).and_then(|v| v.as_bool()).unwrap_or(default);
        let d = AdafactorConfig::default();
        let config = AdafactorConfig {
            eps: match kw.get("eps") {
                Some(e) => (
                    e[0].as_f64().unwrap_or(f64::NAN),
                    e[1].as_f64().unwrap_or(f64::NAN),
                ),
                None => d.eps,
            },
            clip_threshold: num("clip_threshold", d.clip_threshold),
            decay_rate: num("decay_rate", d.decay_rate),
            beta1: kw.get("beta1").and_then(|v| v.as_f64()),
            scale_parameter: flag("scale_parameter", d.scale_parameter),
            relative_step: flag("relative_step", d.relative_step),
            warmup_init: flag("warmup_init", d.warmup_init),
        };
        config.check()?;
        let hyper = AdamW {
            lr: lrs[0].unwrap_or(f64::NAN),
            beta1: f64::NAN,
            beta2: f64::NAN,
            eps: f64::NAN,
            weight_decay: num("weight_decay", 0.0),
        };
        // The relative step ignores the schedule: any rate but 0 stands for "live".
        let lrs: Vec<f64> = lrs.iter().map(|l| l.unwrap_or(1.0)).collect();
        let (params, mut reference) = start(ctx, &f, case, shapes.len())?;
        let mut opt = Optimizer::new(hyper, &params)?.with_adafactor(config, &shapes)?;
        let run = (&mut opt, &params[..], &mut reference[..]);
        check_schedule(&mut chk, ctx, &f, case, &lrs, &mults, run)?;
        for (i, slot) in opt.slots.clone().iter().enumerate() {
            let state = opt.adafactor_slot_state(i)?;
            let mut named = vec![("after", state.master.clone())];
            named.extend(state.named());
            for (kind, ours) in named {
                let key = match kind {
                    "after" => format!("{case}.after.{}.{i}", lrs.len() - 1),
                    _ => format!("{case}.{kind}.{i}"),
                };
                let theirs = f.tensor(&key)?;
                let n = theirs.elem_count();
                if ours.elem_count() != n {
                    return Err(Error::msg(format!(
                        "{key}: {} values, the reference has {n} ({})",
                        ours.elem_count(),
                        slot.name
                    )));
                }
                let tol = if kind == "after" {
                    ctx.forward
                } else {
                    ctx.grad
                };
                chk.check(&key, &ours, &theirs.reshape(n)?, tol)?;
            }
        }
    }
    Ok(chk.rows)
}
