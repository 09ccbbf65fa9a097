//! Lion8bit against bitsandbytes 0.50.2 (`tests/fixtures/extra/gen_lion8bit.py`: its float32
//! update with nearest-code requantization): the AdamW8bit case's five parameters and layout
//! (three with their moment in 8 bits, two with an f32 moment), stepped through the optimizer the
//! trainer runs, `Optimizer::step_rates` with the Lion8bit rule. Cases: `plain` (weight decay
//! 0.5), `groups` (two parameters at 4x the rate, interleaved as LoRA+'s lora_up, other betas)
//! and `small` (min_8bit_size 16). One element never gets a gradient, so sgn(0) = 0 keeps it
//! where the decay puts it; the closest any other sign's argument comes to 0 is 6.4e-6 of the
//! terms it sums, far above an f32 rounding. Rows: each step's update as one vector, the final
//! placement, moment, absmax and values, and the codes (as in the `adamw8bit` case: every one on
//! the CPU, at most one in a thousand different on CUDA).

use super::optim_steps::{check_step, host, json, start};
use super::{Checker, Ctx, Row};
use crate::backend::cpu::optim::{AdamW, BLOCK_8BIT};
use crate::tensor::SafeTensorsFile;
use crate::train::adamw8bit::{EightBitConfig, Place};
use crate::train::optim::Optimizer;
use crate::{Device, Error, Result};

pub fn lion8bit(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/lion8bit.safetensors"))?;
    let mut chk = Checker::new("lion8bit");
    let shapes: Vec<Vec<usize>> = json(&f, "shapes")?;
    let map = f.tensor("qmap_signed")?.to_vec_f64()?;
    let (mut codes, mut flipped) = (0usize, 0usize);
    for case in ["plain", "groups", "small"] {
        let lrs: Vec<f64> = json(&f, &format!("{case}.lrs"))?;
        let mults: Vec<f64> = json(&f, &format!("{case}.mults"))?;
        let eight: Vec<bool> = json(&f, &format!("{case}.eight_bit"))?;
        let kw: serde_json::Value = json(&f, &format!("{case}.kwargs"))?;
        let hyper = AdamW {
            lr: lrs[0],
            beta1: kw["betas"][0].as_f64().unwrap_or(f64::NAN),
            beta2: kw["betas"][1].as_f64().unwrap_or(f64::NAN),
            eps: f64::NAN,
            weight_decay: kw["weight_decay"].as_f64().unwrap_or(f64::NAN),
        };
        let config = EightBitConfig {
            min_8bit_size: kw["min_8bit_size"].as_u64().unwrap_or(4096) as usize,
        };
        let (params, mut reference) = start(ctx, &f, case, shapes.len())?;
        let mut opt = Optimizer::new(hyper, &params)?.with_8bit(config, false)?;
        let q = opt
            .quantized()
            .ok_or_else(|| Error::msg("no 8-bit state"))?;
        let placed: Vec<bool> = q
            .places
            .iter()
            .map(|p| matches!(p, Place::Bytes { .. }))
            .collect();
        let wrong = placed.iter().zip(&eight).filter(|(a, b)| a != b).count();
        chk.check_exact(
            &format!("{case} placement {eight:?}"),
            wrong == 0,
            wrong as f64,
        );
        for (step, &lr) in lrs.iter().enumerate() {
            let rates: Vec<f64> = mults.iter().map(|m| lr * m).collect();
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
        }
        if opt.v.elem_count() != 0 {
            return Err(Error::msg("Lion8bit kept a second moment"));
        }
        let q = opt
            .quantized()
            .ok_or_else(|| Error::msg("no 8-bit state"))?;
        let moments = q.host_moments(&opt.slots, &opt.m, &opt.v)?;
        for (i, slot) in opt.slots.clone().iter().enumerate() {
            let n = slot.len;
            let [values, m, _] = opt.slot_state(slot)?;
            let key = |k: &str| format!("{case}.{k}.{i}");
            let m_ref = match eight[i] {
                false => f.tensor(&key("state1"))?.reshape(n)?,
                true => {
                    for (kind, ours) in moments[i].clone().named() {
                        let k = key(&kind.replace('q', "state"));
                        let theirs = f.tensor(&k)?;
                        match kind {
                            "q1" => {
                                let (ours, theirs) = (ours.to_vec_f64()?, theirs.to_vec_f64()?);
                                codes += n;
                                flipped += ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
                            }
                            _ => chk.check(&k, &ours, &theirs, ctx.grad)?,
                        }
                    }
                    let c = f.tensor(&key("state1"))?.to_vec_f64()?;
                    let a = f.tensor(&key("absmax1"))?.to_vec_f64()?;
                    let values: Vec<f64> = c
                        .iter()
                        .enumerate()
                        .map(|(j, &c)| map[c as usize] * a[j / BLOCK_8BIT])
                        .collect();
                    host(values)?
                }
            };
            chk.check(&key("m"), &m, &m_ref, ctx.grad)?;
            let last = format!("{case}.after.{}.{i}", lrs.len() - 1);
            let theirs = f.tensor(&last)?;
            chk.check(&last, &values, &theirs.reshape(n)?, ctx.forward)?;
        }
    }
    println!("lion8bit: {flipped} of {codes} final codes differ from bitsandbytes'");
    let (allowed, limit) = match ctx.device {
        Device::Cpu => (0, "none"),
        Device::Cuda(_) => (codes / 1000, "at most 1e-3"),
    };
    chk.check_exact(
        &format!("codes: {flipped} of {codes} differ from bitsandbytes' ({limit})"),
        flipped <= allowed,
        flipped as f64,
    );
    Ok(chk.rows)
}
