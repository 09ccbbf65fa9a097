//! The whole text-to-image run: tokenizers, both encoders, Euler with CFG over the UNet, and the
//! VAE decode, from the reference's own initial latents.

use super::{Checker, Ctx, Row};
use crate::sample::pipeline::{LoadOptions, Request, SamplerKind, SdxlPipeline, Sigmas};
use crate::sample::{EulerDiscrete, Sampler};
use crate::tensor::SafeTensorsFile;
use crate::tolerance::Tolerance;
use crate::{DType, Result, Tensor};

/// The fixtures folder's pipeline in f32 on the context's device.
pub(super) fn tiny_pipeline(ctx: &Ctx) -> Result<SdxlPipeline> {
    SdxlPipeline::load(&LoadOptions {
        model: ctx.dir.join("sdxl"),
        config: None,
        dtype: DType::F32,
        weight_dtype: None,
        device: ctx.device,
        loras: vec![],
        vae: None,
    })
}

pub fn pipeline(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(ctx.reference("pipeline.safetensors"))?;
    let text = |k: &str| f.meta_str(k).map(String::from);
    let num = |k: &str| f.meta_f64(k);
    let negative = text("negative_prompt")?;
    let req = Request {
        prompt: text("prompt")?,
        // The fixtures write "" for "no negative prompt" (zero embeddings).
        negative: (!negative.is_empty()).then_some(negative),
        steps: num("steps")? as usize,
        guidance: num("guidance_scale")?,
        guidance_rescale: 0.0,
        width: num("width")? as usize,
        height: num("height")? as usize,
        sampler: SamplerKind::Euler(Sigmas::Config),
        noise: crate::sample::Noise::default(),
        denoising_end: None,
        micro: Default::default(),
    };
    let pipe = tiny_pipeline(ctx)?;
    let mut chk = Checker::new("pipeline");
    let euler = EulerDiscrete::new(&pipe.scheduler, req.steps)?;
    let ts = Tensor::from_slice(
        euler.timesteps(),
        euler.timesteps().len(),
        crate::Device::Cpu,
    )?;
    chk.check(
        "timesteps",
        &ts,
        &f.tensor("timesteps")?,
        Tolerance { rel: 0.0, abs: 0.0 },
    )?;
    let sig = Tensor::from_slice(euler.sigmas(), euler.sigmas().len(), crate::Device::Cpu)?;
    chk.check("sigmas", &sig, &f.tensor("sigmas")?, ctx.forward)?;
    let init = f
        .tensor("init_latents")?
        .to_dtype(DType::F32)?
        .to_device(ctx.device)?;
    let latents = crate::autograd::no_grad(|| pipe.denoise(&req, &init, |_, _| {}))?;
    let pipeline_tol = Tolerance {
        rel: Tolerance::F32_PIPELINE.rel.max(ctx.forward.rel),
        abs: 0.0,
    };
    chk.check(
        "final_latents",
        &latents,
        &f.tensor("final_latents")?,
        ctx.forward,
    )?;
    let image = crate::autograd::no_grad(|| pipe.decode(&latents))?;
    chk.check("image", &image, &f.tensor("image")?, pipeline_tol)?;
    Ok(chk.rows)
}
