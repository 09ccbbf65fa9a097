//! Calibrating a gated adapter's gates for export: run the pipeline on a prompt set with a
//! recorder on every gated module and average `a * w_down * w_up` per rank over every UNet call.

use super::pipeline::{Request, SamplerKind, SdxlPipeline, Sigmas};
use crate::nn::lora::GateRecord;
use crate::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Mean effective gate per module path over `prompts`, `steps` sampling steps each.
pub fn calibrate_gates(
    pipe: &mut SdxlPipeline,
    prompts: &[String],
    steps: usize,
    size: usize,
    seed: u64,
) -> Result<HashMap<String, Vec<f64>>> {
    let mut records = HashMap::new();
    for (path, lin) in pipe.unet.adaptable_linears_mut() {
        if let Some(a) = &mut lin.adapter {
            if a.is_gated() {
                let r = Arc::new(Mutex::new(GateRecord::default()));
                a.recorder = Some(r.clone());
                records.insert(path, r);
            }
        }
    }
    for (i, p) in prompts.iter().enumerate() {
        let req = Request {
            prompt: p.clone(),
            negative: None,
            steps,
            guidance: 5.0,
            guidance_rescale: 0.0,
            width: size,
            height: size,
            sampler: SamplerKind::Euler(Sigmas::Config),
            noise: crate::sample::Noise::default(),
            denoising_end: None,
            micro: Default::default(),
        };
        let init = pipe.initial_latents(size, size, seed + i as u64)?;
        crate::autograd::no_grad(|| pipe.denoise(&req, &init, |_, _| {}))?;
    }
    for (_, lin) in pipe.unet.adaptable_linears_mut() {
        if let Some(a) = &mut lin.adapter {
            a.recorder = None;
        }
    }
    Ok(records
        .into_iter()
        .map(|(k, r)| (k, r.lock().unwrap_or_else(|e| e.into_inner()).mean()))
        .collect())
}
