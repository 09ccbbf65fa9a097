//! AdamW8bit against bitsandbytes 0.50.2 (`tests/fixtures/extra/gen_adamw8bit.py`: its float32
//! update with nearest-code requantization): five float32 parameters (three of 4096 elements or
//! more with 8-bit moments, one of them starting at zero as lora_up does and one ending in a
//! partial block; two small ones with f32 moments) stepped through the optimizer the trainer
//! runs, `Optimizer::step_rates` with the 8-bit rule, under a schedule of rates. Cases: `plain`
//! (weight decay 0.5, so the order of decay and step shows), `groups` (two parameters at 4x the
//! rate, interleaved with the others as LoRA+'s lora_up) and `small` (min_8bit_size 16: a
//! 28-element tensor quantized as one partial block). Rows: the dynamic maps bit for bit, each
//! step's update as one vector, and the final state: the placement, the dequantized moments, the
//! absmax per block, and the codes: every one as bitsandbytes chose it on the CPU (measured: 0 of
//! 86,096 differ), at most one in a thousand on CUDA, whose f32 arithmetic may put a moment on
//! the other side of a midpoint.

use super::optim_steps::{check_step, host, json, start};
use super::{Checker, Ctx, Row};
use crate::backend::cpu::optim::{dynamic_map, AdamW, BLOCK_8BIT};
use crate::tensor::SafeTensorsFile;
use crate::train::adamw8bit::{EightBitConfig, Place};
use crate::train::optim::Optimizer;
use crate::{Device, Error, Result, Tensor};

pub fn adamw8bit(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("../../extra/adamw8bit.safetensors"))?;
    let mut chk = Checker::new("adamw8bit");
    for (signed, key) in [(true, "qmap_signed"), (false, "qmap_unsigned")] {
        let theirs = f.tensor(key)?.to_vec_f32()?;
        let ours = dynamic_map(signed);
        let off = ours
            .iter()
            .zip(&theirs)
            .filter(|(a, b)| a.to_bits() != b.to_bits());
        let n = off.count();
        chk.check_exact(
            &format!("{key} (bitsandbytes' create_dynamic_map)"),
            n == 0,
            n as f64,
        );
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
        let mut opt = Optimizer::new(hyper, &params)?.with_8bit(config, true)?;
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
        let q = opt
            .quantized()
            .ok_or_else(|| Error::msg("no 8-bit state"))?;
        let moments = q.host_moments(&opt.slots, &opt.m, &opt.v)?;
        for (i, slot) in opt.slots.clone().iter().enumerate() {
            let n = slot.len;
            let [values, m, v] = opt.slot_state(slot)?;
            let key = |k: &str| format!("{case}.{k}.{i}");
            let (m_ref, v_ref) = match eight[i] {
                false => (f.tensor(&key("state1"))?, f.tensor(&key("state2"))?),
                true => {
                    let named = moments[i].clone().named();
                    for (kind, ours) in &named {
                        let k = key(&kind.replace('q', "state"));
                        let theirs = f.tensor(&k)?;
                        match kind.starts_with('q') {
                            true => {
                                let (ours, theirs) = (ours.to_vec_f64()?, theirs.to_vec_f64()?);
                                codes += n;
                                flipped += ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
                            }
                            false => chk.check(&k, ours, &theirs, ctx.grad)?,
                        }
                    }
                    (dequantize(&f, case, i, 1)?, dequantize(&f, case, i, 2)?)
                }
            };
            chk.check(&key("m"), &m, &m_ref.reshape(n)?, ctx.grad)?;
            chk.check(&key("v"), &v, &v_ref.reshape(n)?, ctx.grad)?;
            let last = format!("{case}.after.{}.{i}", lrs.len() - 1);
            let theirs = f.tensor(&last)?;
            chk.check(&last, &values, &theirs.reshape(n)?, ctx.forward)?;
        }
    }
    println!("adamw8bit: {flipped} of {codes} final codes differ from bitsandbytes'");
    // The CPU oracle picks every code bitsandbytes picks; f32 kernels may land a few on the
    // other side of a midpoint.
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
