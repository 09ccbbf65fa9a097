//! The 8-bit optimizers against bitsandbytes 0.50.2 (`tests/fixtures/extra/gen_adamw8bit.py`,
//! `gen_lion8bit.py`: its float32 update with nearest-code requantization): five float32
//! parameters (three of 4096 elements or more with 8-bit moments, one of them starting at zero as
//! lora_up does and one ending in a partial block; two small ones with f32 moments) stepped
//! through the optimizer the trainer runs, `Optimizer::step_rates` with the AdamW8bit or Lion8bit
//! rule, under a schedule of rates. Cases: `plain` (weight decay 0.5, so the order of decay and
//! step shows), `groups` (two parameters at 4x the rate, interleaved with the others as LoRA+'s
//! lora_up, other betas) and `small` (min_8bit_size 16: a 28-element tensor quantized as one
//! partial block). One element never gets a gradient (Lion: sgn(0) = 0 keeps it where the decay
//! puts it; the closest any other sign's argument comes to 0 is 6.4e-6 of the terms it sums, far
//! above an f32 rounding). Rows: the dynamic maps bit for bit, each step's update as one vector,
//! and the final state: the placement, the dequantized moments, the absmax per block, and the
//! codes: every one as bitsandbytes chose it on the CPU (measured: 0 of 86,096 and of 43,048
//! differ), at most one in a thousand on CUDA, whose f32 arithmetic may put a moment on the other
//! side of a midpoint.

use super::optim_steps::{check_schedule, host, json, start};
use super::{Checker, Ctx, Row};
use crate::backend::cpu::optim::{dynamic_map, AdamW, BLOCK_8BIT};
use crate::tensor::SafeTensorsFile;
use crate::train::adamw8bit::{EightBitConfig, Place};
use crate::train::optim::Optimizer;
use crate::{Device, Error, Result, Tensor};

/// AdamW8bit: two moments (`m` with the signed map, `v` with the unsigned one).
pub fn adamw8bit(ctx: &Ctx) -> Result<Vec<Row>> {
    eight_bit(ctx, "adamw8bit", true)
}

/// Lion8bit: one moment.
pub fn lion8bit(ctx: &Ctx) -> Result<Vec<Row>> {
    eight_bit(ctx, "lion8bit", false)
}

fn eight_bit(ctx: &Ctx, name: &str, two: bool) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference(&format!("../../extra/{name}.safetensors")))?;
    let mut chk = Checker::new(name);
    let maps = [("qmap_signed", true), ("qmap_unsigned", false)];
    for (key, signed) in &maps[..1 + two as usize] {
        let theirs = f.tensor(key)?.to_vec_f32()?;
        let ours = dynamic_map(*signed);
        let off = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits());
        let n = off.count();
        let row = format!("{key} (bitsandbytes' create_dynamic_map)");
        chk.check_exact(&row, n == 0, n as f64);
    }
    let shapes: Vec<Vec<usize>> = json(&f, "shapes")?;
    let (mut codes, mut flipped) = (0usize, 0usize);
    for case in ["plain", "groups", "small"] {
        let lrs: Vec<f64> = json(&f, &format!("{case}.lrs"))?;
        let mults: Vec<f64> = json(&f, &format!("{case}.mults"))?;
        let eight: Vec<bool> = json(&f, &format!("{case}.eight_bit"))?;
        let kw: serde_json::Value = json(&f, &format!("{case}.kwargs"))?;
        let num = |k: &str| kw[k].as_f64().unwrap_or(f64::NAN);
        let hyper = AdamW {
            lr: lrs[0],
            beta1: kw["betas"][0].as_f64().unwrap_or(f64::NAN),
            beta2: kw["betas"][1].as_f64().unwrap_or(f64::NAN),
            eps: num("eps"),
            weight_decay: num("weight_decay"),
        };
        let config = EightBitConfig {
            min_8bit_size: kw["min_8bit_size"].as_u64().unwrap_or(4096) as usize,
        };
        let (params, mut reference) = start(ctx, &f, case, shapes.len())?;
        let mut opt = Optimizer::new(hyper, &params)?.with_8bit(config, two)?;
        let q = opt
            .quantized()
            .ok_or_else(|| Error::msg("no 8-bit state"))?;
        let placed: Vec<bool> = q
            .places
            .iter()
            .map(|p| matches!(p, Place::Bytes { .. }))
            .collect();
        let wrong = placed.iter().zip(&eight).filter(|(a, b)| a != b).count();
        let row = format!("{case} placement {eight:?}");
        chk.check_exact(&row, wrong == 0, wrong as f64);
        let run = (&mut opt, &params[..], &mut reference[..]);
        check_schedule(&mut chk, ctx, &f, case, &lrs, &mults, run)?;
        if !two && opt.v.elem_count() != 0 {
            return Err(Error::msg("Lion8bit kept a second moment"));
        }
        let q = opt
            .quantized()
            .ok_or_else(|| Error::msg("no 8-bit state"))?;
        let moments = q.host_moments(&opt.slots, &opt.m, &opt.v)?;
        for (i, slot) in opt.slots.clone().iter().enumerate() {
            let n = slot.len;
            let [values, m, v] = opt.slot_state(slot)?;
            let key = |k: &str| format!("{case}.{k}.{i}");
            let mut ours = vec![("m", m, 1)];
            if two {
                ours.push(("v", v, 2));
            }
            if eight[i] {
                for (kind, t) in moments[i].clone().named() {
                    let k = key(&kind.replace('q', "state"));
                    let theirs = f.tensor(&k)?;
                    match kind.starts_with('q') {
                        true => {
                            let (t, theirs) = (t.to_vec_f64()?, theirs.to_vec_f64()?);
                            codes += n;
                            flipped += t.iter().zip(&theirs).filter(|(a, b)| a != b).count();
                        }
                        false => chk.check(&k, &t, &theirs, ctx.grad)?,
                    }
                }
            }
            for (kind, t, k) in ours {
                let theirs = match eight[i] {
                    true => dequantize(&f, case, i, k)?,
                    false => f.tensor(&key(&format!("state{k}")))?.reshape(n)?,
                };
                chk.check(&key(kind), &t, &theirs, ctx.grad)?;
            }
            let last = format!("{case}.after.{}.{i}", lrs.len() - 1);
            let theirs = f.tensor(&last)?;
            chk.check(&last, &values, &theirs.reshape(n)?, ctx.forward)?;
        }
    }
    println!("{name}: {flipped} of {codes} final codes differ from bitsandbytes'");
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

/// bitsandbytes' moment `state<k>` of parameter `i` dequantized with its own map and absmax.
fn dequantize(f: &SafeTensorsFile, case: &str, i: usize, k: usize) -> Result<Tensor> {
    let codes = f.tensor(&format!("{case}.state{k}.{i}"))?.to_vec_f64()?;
    let absmax = f.tensor(&format!("{case}.absmax{k}.{i}"))?.to_vec_f64()?;
    let map = f
        .tensor(if k == 1 {
            "qmap_signed"
        } else {
            "qmap_unsigned"
        })?
        .to_vec_f64()?;
    let values: Vec<f64> = codes
        .iter()
        .enumerate()
        .map(|(j, &c)| map[c as usize] * absmax[j / BLOCK_8BIT])
        .collect();
    host(values)
}
