//! Prodigy against prodigyopt 1.1.2 (`tests/fixtures/extra/gen_prodigy.py`, float64 from
//! float32 starting values and gradients): five parameters (one starting at zero, as lora_up
//! does) stepped through the optimizer the trainer runs, `Optimizer::step_rates` with Prodigy's
//! state, under a schedule of learning rates. Cases: `plain` (kohya's usual recipe), `warmup`
//! (a first step at rate 0, bias correction, the safeguard, beta3, d_coef and a growth cap) and
//! `frozen` (two parameters left out, as kohya leaves out a group at rate 0). Each step's update (as one vector, since the
//! values themselves are dominated by where they started) and d; the final moments, s, values and
//! d's numerator.

use super::optim_steps::{check_step, host, json, start};
use super::{Checker, Ctx, Row};
use crate::backend::cpu::optim::AdamW;
use crate::tensor::SafeTensorsFile;
use crate::train::optim::Optimizer;
use crate::train::prodigy::ProdigyConfig;
use crate::{Error, Result};

pub fn prodigy(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/prodigy.safetensors"))?;
    let mut chk = Checker::new("prodigy");
    let shapes: Vec<Vec<usize>> = json(&f, "shapes")?;
    for case in ["plain", "warmup", "frozen"] {
        let lrs: Vec<f64> = json(&f, &format!("{case}.lrs"))?;
        let kw: serde_json::Value = json(&f, &format!("{case}.kwargs"))?;
        let frozen: Vec<usize> = json(&f, &format!("{case}.frozen"))?;
        let num = |k: &str, default: f64| kw.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
        let flag = |k: &str| kw.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        let betas = |i: usize| kw["betas"][i].as_f64().unwrap_or(f64::NAN);
        let hyper = AdamW {
            lr: 1.0,
            beta1: betas(0),
            beta2: betas(1),
            eps: num("eps", 1e-8),
            weight_decay: num("weight_decay", 0.0),
        };
        let config = ProdigyConfig {
            d0: num("d0", 1e-6),
            d_coef: num("d_coef", 1.0),
            beta3: kw.get("beta3").and_then(|v| v.as_f64()),
            growth_rate: num("growth_rate", f64::INFINITY),
            use_bias_correction: flag("use_bias_correction"),
            safeguard_warmup: flag("safeguard_warmup"),
        };
        let (params, mut reference) = start(ctx, &f, case, shapes.len())?;
        let mut opt = Optimizer::new(hyper, &params)?.with_prodigy(config)?;
        for (step, &lr) in lrs.iter().enumerate() {
            let rates: Vec<f64> = (0..shapes.len())
                .map(|i| if frozen.contains(&i) { 0.0 } else { lr })
                .collect();
            check_step(
                &mut chk,
                ctx,
                &f,
                case,
                step,
                &mut opt,
                &params,
                &rates,
                &mut reference,
            )?;
            let d = opt.prodigy().map_or(f64::NAN, |p| p.d);
            chk.check(
                &format!("{case} step {step} d"),
                &host(vec![d])?,
                &f.tensor(&format!("{case}.d.{step}"))?,
                ctx.forward,
            )?;
        }
        let state = opt
            .prodigy()
            .cloned()
            .ok_or_else(|| Error::msg("the optimizer lost its Prodigy state"))?;
        for (i, slot) in opt.slots.clone().iter().enumerate() {
            let [values, m, v] = opt.slot_state(slot)?;
            let s = state.s.narrow(0, slot.offset, slot.len)?;
            for (kind, ours) in [("exp_avg", m), ("exp_avg_sq", v), ("s", s)] {
                let key = format!("{case}.{kind}.{i}");
                if f.contains(&key) {
                    let theirs = f.tensor(&key)?;
                    let n = theirs.elem_count();
                    chk.check(&key, &ours, &theirs.reshape(n)?, ctx.grad)?;
                } else {
                    // A frozen parameter: no state kept for it.
                    let moved = ours.to_vec_f64()?.iter().filter(|&&x| x != 0.0).count();
                    chk.check_exact(
                        &format!("{key} (frozen: none kept)"),
                        moved == 0,
                        moved as f64,
                    );
                }
            }
            let last = format!("{case}.after.{}.{i}", lrs.len() - 1);
            let theirs = f.tensor(&last)?;
            let n = theirs.elem_count();
            chk.check(&last, &values, &theirs.reshape(n)?, ctx.forward)?;
        }
        chk.check(
            &format!("{case}.d_numerator"),
            &host(vec![state.d_numerator])?,
            &f.tensor(&format!("{case}.d_numerator"))?,
            ctx.forward,
        )?;
    }
    Ok(chk.rows)
}
