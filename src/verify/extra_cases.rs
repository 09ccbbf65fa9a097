//! The project's own reference cases, in `extra/` beside the vendored fixtures folder
//! (`tests/fixtures/extra`, made by its `gen_*.py` with the fixtures' pinned PyTorch stack):
//! img2img, inpainting and the base + refiner handover, LyCORIS files against LyCORIS' forward, a diffusers-saved PEFT
//! DoRA LoRA against peft's forward, and `kstyle export`'s files as diffusers loads them. They
//! run on the fixtures folder's own tiny model and reference inputs.

use super::{Checker, Ctx, Row};
use crate::autograd::no_grad;
use crate::models::unet::{KohyaLoraFile, UNet2DConditionModel};
use crate::sample::model_files::ModelFiles;
use crate::sample::pipeline::{MicroConditioning, Request, SamplerKind};
use crate::sample::{Noise, SchedulerConfig};
use crate::tensor::SafeTensorsFile;
use crate::{DType, Result, Tensor};
use std::path::PathBuf;

/// `extra/<file>` beside the fixtures folder, as a path `Ctx::reference` accepts.
pub const EXTRA: &str = "../../extra/";

pub(super) fn extra(ctx: &Ctx, file: &str) -> PathBuf {
    ctx.reference(&format!("{EXTRA}{file}"))
}

/// Runs `req` from `start` on `pipe` and checks the result against `<name>.final_latents`.
fn check_final(
    chk: &mut Checker,
    ctx: &Ctx,
    f: &SafeTensorsFile,
    name: &str,
    pipe: &crate::sample::pipeline::SdxlPipeline,
    req: &Request,
    start: crate::sample::pipeline::Start,
) -> Result<()> {
    let out = no_grad(|| pipe.denoise_from(req, start, |_, _| {}))?;
    let key = format!("{name}.final_latents");
    chk.check(&key, &out, &f.tensor(&key)?, ctx.forward)
}

/// The fixtures' pipeline reference's initial latents (unscaled N(0, 1)), f32 on the case's device:
/// where the pipeline-based extra cases start.
fn reference_init_latents(ctx: &Ctx) -> Result<Tensor> {
    SafeTensorsFile::open(ctx.reference("pipeline.safetensors"))?
        .tensor("init_latents")?
        .to_dtype(DType::F32)?
        .to_device(ctx.device)
}

/// The request a reference file's top-level metadata describes: prompt, negative prompt (empty:
/// none), steps, guidance scale and size; `--sampler auto`, no given noise.
fn meta_request(f: &SafeTensorsFile) -> Result<Request> {
    let negative = f.meta_str("negative_prompt")?;
    Ok(Request {
        prompt: f.meta_str("prompt")?.to_string(),
        negative: (!negative.is_empty()).then(|| negative.to_string()),
        steps: f.meta_f64("steps")? as usize,
        guidance: f.meta_f64("guidance_scale")?,
        guidance_rescale: 0.0,
        width: f.meta_f64("width")? as usize,
        height: f.meta_f64("height")? as usize,
        sampler: SamplerKind::Auto,
        noise: Noise::default(),
        denoising_end: None,
        micro: MicroConditioning::default(),
    })
}

/// A reference case's request: the file's prompt and negative prompt, the case's steps, the
/// given guidance and size, `--sampler auto` (on the scheduler config the caller sets).
pub(super) fn reference_request(
    f: &SafeTensorsFile,
    name: &str,
    guidance: f64,
    (width, height): (usize, usize),
) -> Result<Request> {
    let negative = f.meta_str("negative_prompt")?;
    Ok(Request {
        prompt: f.meta_str("prompt")?.to_string(),
        negative: (!negative.is_empty()).then(|| negative.to_string()),
        steps: f.meta_f64(&format!("{name}.steps"))? as usize,
        guidance,
        guidance_rescale: 0.0,
        width,
        height,
        sampler: SamplerKind::Auto,
        noise: Noise::default(),
        denoising_end: None,
        micro: MicroConditioning::default(),
    })
}

/// The request of one img2img or inpainting reference case `name`: the case's guidance,
/// replaying `step_noise`, with the case's `eta` applied to the sampler `scheduler` names.
fn case_request(
    f: &SafeTensorsFile,
    name: &str,
    size: (usize, usize),
    step_noise: Vec<Tensor>,
    scheduler: &SchedulerConfig,
) -> Result<Request> {
    let guidance = f.meta_f64(&format!("{name}.guidance_scale"))?;
    let req = reference_request(f, name, guidance, size)?;
    // The pipeline's `eta` (`--eta`): DDIM's, TCD's gamma.
    let eta = format!("{name}.eta");
    Ok(Request {
        noise: Noise::Given(step_noise),
        sampler: match f.metadata().contains_key(&eta) {
            true => SamplerKind::Auto
                .resolve(scheduler)?
                .with_eta(f.meta_f64(&eta)?, scheduler)?,
            false => req.sampler,
        },
        ..req
    })
}

/// The request of a handover or micro-conditioning reference case: the file's guidance and size.
fn pipeline_request(
    f: &SafeTensorsFile,
    name: &str,
    denoising_end: Option<f64>,
    micro: MicroConditioning,
) -> Result<Request> {
    let size = (
        f.meta_f64("width")? as usize,
        f.meta_f64("height")? as usize,
    );
    Ok(Request {
        denoising_end,
        micro,
        ..reference_request(f, name, f.meta_f64("guidance_scale")?, size)?
    })
}

/// A reference's stored (H, W, 3) byte picture; `path` names the file in errors.
pub(super) fn stored_rgb(
    f: &SafeTensorsFile,
    name: &str,
    path: &std::path::Path,
) -> Result<image::RgbImage> {
    let t = f.tensor(name)?;
    let (h, w, _) = t.dims3()?;
    let bytes: Vec<u8> = t.to_vec_i64()?.iter().map(|&v| v as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| crate::Error::file(path, format!("{name} is not an (H, W, 3) byte image")))
}

/// diffusers' SDXL img2img pipeline, one run per sampler: the processor's resize of a 100x75
/// image to 96x72, the VAE's sampled latents, `add_noise` at the strength's first step, and the
/// final latents (the runs replay PyTorch's draws).
pub fn img2img(ctx: &Ctx) -> Result<Vec<Row>> {
    use crate::sample::pipeline::{image_input, image_input_size, Start};
    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    let mut chk = Checker::new("img2img");
    let path = extra(ctx, "img2img.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let x =
        |n: &str| -> Result<Tensor> { f.tensor(n)?.to_dtype(DType::F32)?.to_device(ctx.device) };
    let rgb = stored_rgb(&f, "image_u8", &path)?;
    let (width, height) = image_input_size(&rgb)?;
    let input = image_input(&rgb, width, height, ctx.device)?;
    chk.check("image", &input, &f.tensor("image")?, ctx.forward)?;
    let latents = pipe.encode_image(&input, Some(&x("sample_noise")?))?;
    chk.check(
        "image_latents",
        &latents,
        &f.tensor("image_latents")?,
        ctx.forward,
    )?;
    for name in f.meta_str("cases")?.split(',') {
        let key = |k: &str| format!("{name}.{k}");
        pipe.scheduler =
            SchedulerConfig::from_json_text(f.meta_str(&key("scheduler_config"))?, &path)?;
        let step_noise = (0..)
            .map(|i| key(&format!("noise.{i}")))
            .take_while(|n| f.contains(n))
            .map(|n| f.tensor(&n))
            .collect::<Result<Vec<_>>>()?;
        let req = case_request(&f, name, (width, height), step_noise, &pipe.scheduler)?;
        let noise = x(&key("noise"))?;
        let strength = f.meta_f64(&key("strength"))?;
        // The starting latents alone (add_noise at the first step's level), then the whole run.
        let sampler_start = crate::sample::pipeline::start_latents(
            &pipe.scheduler,
            &req,
            &latents,
            &noise,
            strength,
        )?;
        chk.check(
            &key("start_latents"),
            &sampler_start,
            &f.tensor(&key("start_latents"))?,
            ctx.forward,
        )?;
        let start = Start::Image {
            latents: &latents,
            noise: &noise,
            strength,
            inpaint: None,
        };
        check_final(&mut chk, ctx, &f, name, &pipe, &req, start)?;
    }
    Ok(chk.rows)
}

/// The 9-channel inpainting variant of the tiny UNet: its weights with `inpaint.safetensors`'
/// 9-input conv_in (the folder `gen_inpaint.py` builds).
pub(super) fn inpaint9_unet(ctx: &Ctx) -> Result<UNet2DConditionModel> {
    let f = SafeTensorsFile::open(extra(ctx, "inpaint.safetensors"))?;
    let (mut cfg, mut tensors, origin) =
        UNet2DConditionModel::diffusers_tensors(ctx.dir.join("sdxl"))?;
    tensors.insert("conv_in.weight".into(), f.tensor("inpaint_conv_in.weight")?);
    cfg.in_channels = 9;
    UNet2DConditionModel::from_tensors(tensors, origin, &cfg, DType::F32, ctx.device)
}

/// diffusers' SDXL inpainting pipeline: the mask processor (Lanczos, "L", binarised), then per
/// case the whole run with the 4-channel tiny UNet (the kept region blended back every step) or
/// with its 9-channel inpainting variant (mask and masked-picture latents as UNet input), the
/// runs replaying PyTorch's draws.
pub fn inpaint(ctx: &Ctx) -> Result<Vec<Row>> {
    use crate::sample::pipeline::{
        image_input, image_input_size, mask_input, masked_image, Inpaint, Start,
    };
    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    let mut chk = Checker::new("inpaint");
    let path = extra(ctx, "inpaint.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let img2img = extra(ctx, "img2img.safetensors");
    let picture = stored_rgb(&SafeTensorsFile::open(&img2img)?, "image_u8", &img2img)?;
    let (width, height) = image_input_size(&picture)?;
    let input = image_input(&picture, width, height, ctx.device)?;
    let (pixel_mask, mask) = mask_input(
        &stored_rgb(&f, "mask_u8", &path)?,
        width,
        height,
        ctx.device,
    )?;
    chk.check("mask", &pixel_mask, &f.tensor("mask")?, ctx.forward)?;
    let mut other = inpaint9_unet(ctx)?;
    for name in f.meta_str("cases")?.split(',') {
        let key = |k: &str| format!("{name}.{k}");
        pipe.scheduler =
            SchedulerConfig::from_json_text(f.meta_str(&key("scheduler_config"))?, &path)?;
        let mut draws = std::collections::HashMap::new();
        for (i, role) in f.meta_str(&key("roles"))?.split(',').enumerate() {
            draws.insert(role.to_string(), f.tensor(&key(&format!("draw.{i}")))?);
        }
        let draw = |role: &str| draws.get(role).cloned();
        let step_noise: Vec<Tensor> = (0..).map_while(|i| draw(&format!("step.{i}"))).collect();
        let nine = f.meta_str(&key("unet"))? == "inpaint9";
        if nine != (pipe.unet.config.in_channels == 9) {
            std::mem::swap(&mut pipe.unet, &mut other);
        }
        let latents = pipe.encode_image(&input, draw("image_sample").as_ref())?;
        let masked = match nine {
            true => Some(pipe.encode_image(
                &masked_image(&input, &pixel_mask)?,
                draw("masked_sample").as_ref(),
            )?),
            false => None,
        };
        let noise = draw("noise").ok_or_else(|| {
            crate::Error::file(&path, format!("{name}: no draw with the role `noise`"))
        })?;
        let req = case_request(&f, name, (width, height), step_noise, &pipe.scheduler)?;
        let start = Start::Image {
            latents: &latents,
            noise: &noise.to_dtype(DType::F32)?.to_device(ctx.device)?,
            strength: f.meta_f64(&key("strength"))?,
            inpaint: Some(Inpaint {
                mask: &mask,
                masked: masked.as_ref(),
            }),
        };
        check_final(&mut chk, ctx, &f, name, &pipe, &req, start)?;
    }
    Ok(chk.rows)
}

/// The tiny SDXL refiner of `extra/tiny_refiner_unet.safetensors` as a pipeline: the tiny base's
/// text_encoder_2, tokenizer_2, VAE and scheduler, no first text encoder, a UNet taking five time
/// ids, and `force_zeros_for_empty_prompt` off (the released refiner's settings).
pub fn tiny_refiner(ctx: &Ctx) -> Result<crate::sample::pipeline::SdxlPipeline> {
    tiny_refiner_with(ctx, &[])
}

/// [`tiny_refiner`] with kohya-spelled LoRA files merged into its UNet.
fn tiny_refiner_with(
    ctx: &Ctx,
    loras: &[KohyaLoraFile],
) -> Result<crate::sample::pipeline::SdxlPipeline> {
    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    let path = extra(ctx, "tiny_refiner_unet.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let config: serde_json::Value = serde_json::from_str(f.meta_str("config")?)
        .map_err(|e| crate::Error::file(&path, format!("config metadata: {e}")))?;
    let cfg = crate::models::unet::UNetConfig::from_json(&config)
        .map_err(|e| crate::Error::file(&path, e.to_string()))?;
    let mut tensors: std::collections::BTreeMap<String, Tensor> = f
        .names()
        .map(|n| Ok((n.to_string(), f.tensor(n)?)))
        .collect::<Result<_>>()?;
    for lora in loras {
        crate::models::unet::lora_merge::merge_kohya(&mut tensors, &cfg.layout(), lora)?;
    }
    pipe.unet =
        UNet2DConditionModel::from_tensors(tensors, path.clone(), &cfg, DType::F32, ctx.device)?;
    pipe.tokenizer = None;
    pipe.text_encoder = None;
    pipe.force_zeros_for_empty_prompt = false;
    Ok(pipe)
}

/// SDXL's base + refiner "ensemble of experts" as diffusers runs it: the base stops at
/// `denoising_end` and hands its latents to the refiner (or to the base itself as an img2img
/// pipeline), which resumes at `denoising_start` with the same schedule; per sampler.
pub fn refiner(ctx: &Ctx) -> Result<Vec<Row>> {
    use crate::sample::pipeline::Start;
    let mut base = super::pipeline_case::tiny_pipeline(ctx)?;
    let mut refiner = tiny_refiner(ctx)?;
    let mut chk = Checker::new("refiner");
    let path = extra(ctx, "refiner.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let init = reference_init_latents(ctx)?;
    let mut conditioned = false;
    for name in f.meta_str("cases")?.split(',') {
        let key = |k: &str| format!("{name}.{k}");
        let scheduler =
            SchedulerConfig::from_json_text(f.meta_str(&key("scheduler_config"))?, &path)?;
        base.scheduler = scheduler.clone();
        refiner.scheduler = scheduler;
        let split = f.meta_f64(&key("split"))?;
        let req = pipeline_request(&f, name, Some(split), MicroConditioning::default())?;
        let handed = no_grad(|| base.denoise_from(&req, Start::Noise(&init), |_, _| {}))?;
        chk.check(
            &key("base_latents"),
            &handed,
            &f.tensor(&key("base_latents"))?,
            ctx.forward,
        )?;
        let second = match f.meta_str(&key("refiner"))? {
            "base" => &base,
            _ => &refiner,
        };
        let req = Request {
            denoising_end: None,
            ..req
        };
        if !conditioned && std::ptr::eq(second, &refiner) {
            // The refiner's conditioning: text_encoder_2 alone, "" encoded for the negative,
            // aesthetic scores 6 and 2.5 in five time ids.
            conditioned = true;
            let (pos, neg) = no_grad(|| refiner.request_embeds(&req))?;
            let (context, pooled, ids) = crate::sample::pipeline::guidance_batch(
                &refiner.unet,
                &req,
                &pos,
                neg.as_ref(),
                true,
                ctx.device,
            )?;
            for (n, t) in [
                ("refiner_context", context),
                ("refiner_pooled", pooled),
                ("refiner_time_ids", ids),
            ] {
                chk.check(n, &t, &f.tensor(n)?, ctx.forward)?;
            }
        }
        let start = Start::Latents {
            latents: &handed,
            denoising_start: split,
        };
        check_final(&mut chk, ctx, &f, name, second, &req, start)?;
    }
    Ok(chk.rows)
}

/// diffusers' micro-conditioning arguments (a JSON object of `original_size`,
/// `crops_coords_top_left`, `target_size`, their `negative_` forms and the aesthetic scores).
fn micro_from_json(text: &str, path: &std::path::Path) -> Result<MicroConditioning> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| crate::Error::file(path, format!("micro-conditioning metadata: {e}")))?;
    let pair = |k: &str| -> Option<(usize, usize)> {
        let a = v.get(k)?.as_array()?;
        Some((a.first()?.as_u64()? as usize, a.get(1)?.as_u64()? as usize))
    };
    let d = MicroConditioning::default();
    Ok(MicroConditioning {
        original_size: pair("original_size"),
        crop_top_left: pair("crops_coords_top_left").unwrap_or(d.crop_top_left),
        target_size: pair("target_size"),
        negative_original_size: pair("negative_original_size"),
        negative_crop_top_left: pair("negative_crops_coords_top_left")
            .unwrap_or(d.negative_crop_top_left),
        negative_target_size: pair("negative_target_size"),
        aesthetic_score: v["aesthetic_score"].as_f64().unwrap_or(d.aesthetic_score),
        negative_aesthetic_score: v["negative_aesthetic_score"]
            .as_f64()
            .unwrap_or(d.negative_aesthetic_score),
    })
}

/// SDXL's size, crop and aesthetic-score conditioning (`gen_micro_conditioning.py`): the time
/// ids each stage's UNet receives, under text to image's and img2img's rules for the negative
/// batch, and the final latents; text to image, and base + refiner / base + base handovers.
pub fn micro_conditioning(ctx: &Ctx) -> Result<Vec<Row>> {
    use crate::sample::pipeline::{guidance_batch, SdxlPipeline, Start};
    let base = super::pipeline_case::tiny_pipeline(ctx)?;
    let refiner = tiny_refiner(ctx)?;
    let mut chk = Checker::new("micro_conditioning");
    let path = extra(ctx, "micro_conditioning.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let init = reference_init_latents(ctx)?;
    let ids = |chk: &mut Checker, key: &str, pipe: &SdxlPipeline, req: &Request, image| {
        let (pos, neg) = no_grad(|| pipe.request_embeds(req))?;
        let (_, _, t) = guidance_batch(&pipe.unet, req, &pos, neg.as_ref(), image, ctx.device)?;
        chk.check(key, &t, &f.tensor(key)?, ctx.forward)
    };
    for name in f.meta_str("cases")?.split(',') {
        let key = |k: &str| format!("{name}.{k}");
        let second_args = f.meta_str(&key("second_args")).ok();
        let micro = micro_from_json(f.meta_str(&key("args"))?, &path)?;
        let req = pipeline_request(&f, name, second_args.map(|_| 0.5), micro)?;
        ids(&mut chk, &key("time_ids"), &base, &req, false)?;
        let Some(second_args) = second_args else {
            check_final(&mut chk, ctx, &f, name, &base, &req, Start::Noise(&init))?;
            continue;
        };
        let handed = no_grad(|| base.denoise_from(&req, Start::Noise(&init), |_, _| {}))?;
        let second = if name == "refiner" { &refiner } else { &base };
        let req = Request {
            denoising_end: None,
            micro: micro_from_json(second_args, &path)?,
            ..req
        };
        ids(&mut chk, &key("refiner_time_ids"), second, &req, true)?;
        let start = Start::Latents {
            latents: &handed,
            denoising_start: 0.5,
        };
        check_final(&mut chk, ctx, &f, name, second, &req, start)?;
    }
    Ok(chk.rows)
}

/// The UNet with `lora` merged, on the fixtures' UNet reference inputs.
fn unet_with(ctx: &Ctx, lora: KohyaLoraFile) -> Result<Tensor> {
    let loaded = UNet2DConditionModel::from_diffusers(
        ctx.dir.join("sdxl"),
        &[lora],
        DType::F32,
        ctx.device,
    )?;
    let f = SafeTensorsFile::open(ctx.reference("unet.safetensors"))?;
    let x = |n: &str| f.tensor(n)?.to_dtype(DType::F32)?.to_device(ctx.device);
    no_grad(|| {
        loaded.model.forward(
            &x("sample")?,
            &x("timestep")?,
            &x("encoder_hidden_states")?,
            &x("text_embeds")?,
            &x("time_ids")?,
        )
    })
}

/// LyCORIS files (LoHa, LoKr, Tucker forms, LoCon cores, DoRA both ways, full differences)
/// against LyCORIS' own forward at each case's multiplier.
pub fn lora_lycoris(ctx: &Ctx) -> Result<Vec<Row>> {
    let refs = SafeTensorsFile::open(extra(ctx, "lycoris_reference.safetensors"))?;
    let mut chk = Checker::new("lora_lycoris");
    for case in [
        "loha",
        "loha_tucker",
        "lokr",
        "lokr_tucker",
        "locon_tucker",
        "dora_out",
        "dora_in",
        "full",
    ] {
        let m = refs.meta_f64(&format!("{case}.multiplier"))?;
        let lora = KohyaLoraFile::new(extra(ctx, &format!("lycoris_{case}.safetensors")), m);
        let out = unet_with(ctx, lora)?;
        chk.check(
            &format!("{case}.out"),
            &out,
            &refs.tensor(&format!("{case}.out"))?,
            ctx.forward,
        )?;
    }
    Ok(chk.rows)
}

/// A LoRA saved by diffusers (peft DoRA, alpha and rank patterns in its metadata) against
/// peft's forward: the UNet at adapter weights 1 and 0.6, CLIP-L's penultimate state at 1.
pub fn lora_peft(ctx: &Ctx) -> Result<Vec<Row>> {
    let refs = SafeTensorsFile::open(extra(ctx, "peft_reference.safetensors"))?;
    let file = extra(ctx, "peft_dora.safetensors");
    let mut chk = Checker::new("lora_peft");
    for s in [1.0, 0.6] {
        let out = unet_with(ctx, KohyaLoraFile::new(&file, s))?;
        let name = format!("unet.s{s:.1}");
        chk.check(&name, &out, &refs.tensor(&name)?, ctx.forward)?;
    }
    let files = ModelFiles::resolve(&ctx.dir.join("sdxl"), None)?;
    let (te1, _) =
        files.text_encoders(&[KohyaLoraFile::new(&file, 1.0)], DType::F32, ctx.device)?;
    let te1 =
        te1.ok_or_else(|| crate::Error::Config("the tiny model has no text_encoder".into()))?;
    let te = SafeTensorsFile::open(ctx.reference("text_encoders.safetensors"))?;
    let o = no_grad(|| te1.forward(&te.tensor("te1.input_ids")?.to_device(ctx.device)?))?;
    chk.check(
        "te1.s1.0",
        o.penultimate(),
        &refs.tensor("te1.s1.0")?,
        ctx.forward,
    )?;
    Ok(chk.rows)
}

/// `kstyle export`'s kohya and diffusers files, merged here, against diffusers'
/// `load_lora_weights` of the same files: an adapter with text-encoder LoRA, one with kohya's
/// conv LoRA (the resnets' and resamplers' 3x3 and 1x1 convolutions and time projections, which
/// diffusers places as PEFT Conv2d and Linear LoRA layers), and a DoRA adapter with both in
/// diffusers/PEFT layout (PEFT DoRA layers; its magnitudes move the output by 0.36).
pub fn lora_export(ctx: &Ctx) -> Result<Vec<Row>> {
    use crate::sample::pipeline::{LoadOptions, SdxlPipeline};
    let refs = SafeTensorsFile::open(extra(ctx, "export_reference.safetensors"))?;
    let prompt = refs.meta_str("prompt")?.to_string();
    let mut chk = Checker::new("lora_export");
    for fmt in ["kohya", "diffusers", "dora_diffusers"] {
        let file = extra(ctx, &format!("export_{fmt}.safetensors"));
        let out = unet_with(ctx, KohyaLoraFile::new(&file, 1.0))?;
        let name = format!("{fmt}.out");
        chk.check(&name, &out, &refs.tensor(&name)?, ctx.forward)?;
        // The text encoders' part, merged as `generate --lora` merges it.
        let pipe = SdxlPipeline::load(&LoadOptions {
            model: ctx.dir.join("sdxl"),
            config: None,
            dtype: DType::F32,
            weight_dtype: None,
            device: ctx.device,
            loras: vec![(file, 1.0)],
            vae: None,
        })?;
        let e = no_grad(|| pipe.encode_prompts(std::slice::from_ref(&prompt)))?;
        for (key, got) in [
            ("prompt_embeds", &e.context),
            ("pooled_prompt_embeds", &e.pooled),
        ] {
            let name = format!("{fmt}.{key}");
            chk.check(&name, got, &refs.tensor(&name)?, ctx.forward)?;
        }
    }
    for fmt in ["locon_kohya", "locon_diffusers"] {
        let file = extra(ctx, &format!("export_{fmt}.safetensors"));
        let out = unet_with(ctx, KohyaLoraFile::new(&file, 1.0))?;
        let name = format!("{fmt}.out");
        chk.check(&name, &out, &refs.tensor(&name)?, ctx.forward)?;
    }
    Ok(chk.rows)
}

/// The pipeline's decode with per-channel latent statistics in the VAE config (`latents_mean`,
/// `latents_std`): diffusers' image from its own final latents.
pub fn vae_latent_stats(ctx: &Ctx) -> Result<Vec<Row>> {
    let path = extra(ctx, "vae_latent_stats.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    let stats = |key: &str| -> Result<Vec<f64>> {
        serde_json::from_str(f.meta_str(key)?).map_err(|e| crate::Error::Json {
            path: path.clone(),
            msg: format!("{key}: {e}"),
        })
    };
    pipe.vae.config.latents_mean = Some(stats("latents_mean")?);
    pipe.vae.config.latents_std = Some(stats("latents_std")?);
    let latents = f
        .tensor("latents")?
        .to_dtype(DType::F32)?
        .to_device(ctx.device)?;
    let image = no_grad(|| pipe.decode(&latents))?;
    let mut chk = Checker::new("vae_latent_stats");
    chk.check("image", &image, &f.tensor("image")?, ctx.forward)?;
    Ok(chk.rows)
}

/// EDM models (`gen_edm.py`): diffusers' `EDMDPMSolverMultistepScheduler` (Playground v2.5's
/// config; SDE replaying PyTorch's noise; order 3; heun on exponential sigmas) and
/// `EDMEulerScheduler` (also as v-prediction with sigma_data 1), each the whole CFG run with the
/// UNet preconditioned; and img2img from latents, its starting latents and final latents.
pub fn edm(ctx: &Ctx) -> Result<Vec<Row>> {
    use crate::sample::pipeline::Start;
    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    let mut chk = Checker::new("edm");
    let path = extra(ctx, "edm.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let x =
        |n: &str| -> Result<Tensor> { f.tensor(n)?.to_dtype(DType::F32)?.to_device(ctx.device) };
    for name in f.meta_str("cases")?.split(',') {
        let key = |k: &str| format!("{name}.{k}");
        pipe.scheduler =
            SchedulerConfig::from_json_text(f.meta_str(&key("scheduler_config"))?, &path)?;
        let step_noise = (0..)
            .map(|i| key(&format!("noise.{i}")))
            .take_while(|n| f.contains(n))
            .map(|n| f.tensor(&n))
            .collect::<Result<Vec<_>>>()?;
        let mut req = Request {
            noise: Noise::Given(step_noise),
            ..meta_request(&f)?
        };
        let (init, image, noise);
        let start = if f.metadata().contains_key(&key("strength")) {
            let strength = f.meta_f64(&key("strength"))?;
            (image, noise) = (x("image_latents")?, x(&key("noise"))?);
            // img2img takes its size from the picture.
            let (_, _, h, w) = image.dims4()?;
            (req.width, req.height) = (w * 8, h * 8);
            let started = crate::sample::pipeline::start_latents(
                &pipe.scheduler,
                &req,
                &image,
                &noise,
                strength,
            )?;
            let want = f.tensor(&key("start_latents"))?;
            chk.check(&key("start_latents"), &started, &want, ctx.forward)?;
            Start::Image {
                latents: &image,
                noise: &noise,
                strength,
                inpaint: None,
            }
        } else {
            init = x("init_latents")?;
            Start::Noise(&init)
        };
        check_final(&mut chk, ctx, &f, name, &pipe, &req, start)?;
    }
    Ok(chk.rows)
}

/// A kohya LoRA on the refiner (`gen_refiner_lora.py`): the base hands over at 0.3 and the tiny
/// refiner, its 196 modules (attention, projections, feed-forwards, LoCon resnet convolutions)
/// merged at multiplier 0.8, finishes as diffusers' `load_lora_weights` + `set_adapters` runs it.
pub fn refiner_lora(ctx: &Ctx) -> Result<Vec<Row>> {
    use crate::sample::pipeline::Start;
    let mut base = super::pipeline_case::tiny_pipeline(ctx)?;
    let path = extra(ctx, "refiner_lora_reference.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    let lora = KohyaLoraFile::new(
        extra(ctx, "refiner_lora.safetensors"),
        f.meta_f64("multiplier")?,
    );
    let mut refiner = tiny_refiner_with(ctx, &[lora])?;
    let mut chk = Checker::new("refiner_lora");
    let init = reference_init_latents(ctx)?;
    let scheduler = SchedulerConfig::from_json_text(f.meta_str("scheduler_config")?, &path)?;
    base.scheduler = scheduler.clone();
    refiner.scheduler = scheduler;
    let split = f.meta_f64("split")?;
    let req = Request {
        denoising_end: Some(split),
        ..meta_request(&f)?
    };
    let handed = no_grad(|| base.denoise_from(&req, Start::Noise(&init), |_, _| {}))?;
    chk.check(
        "base_latents",
        &handed,
        &f.tensor("base_latents")?,
        ctx.forward,
    )?;
    let req = Request {
        denoising_end: None,
        ..req
    };
    let start = Start::Latents {
        latents: &handed,
        denoising_start: split,
    };
    let out = no_grad(|| refiner.denoise_from(&req, start, |_, _| {}))?;
    chk.check(
        "final_latents",
        &out,
        &f.tensor("final_latents")?,
        ctx.forward,
    )?;
    Ok(chk.rows)
}

/// SDXL textual-inversion embeddings (`gen_textual_inversion.py`): two files (two vectors and
/// one) added to both encoders as diffusers' `load_textual_inversion` adds them; the token ids of
/// the converted prompt and negative prompt (exact: added ids, the multi-vector spelling, the
/// case-blind match), both conditionings, and a 4-step Euler run.
pub fn textual_inversion(ctx: &Ctx) -> Result<Vec<Row>> {
    use crate::formats::textual_inversion::TextualInversion;
    let mut pipe = super::pipeline_case::tiny_pipeline(ctx)?;
    let mut chk = Checker::new("textual_inversion");
    let path = extra(ctx, "textual_inversion.safetensors");
    let f = SafeTensorsFile::open(&path)?;
    for name in ["hanokstyle", "badquality"] {
        let file = extra(ctx, &format!("ti_{name}.safetensors"));
        pipe.add_embedding(&TextualInversion::load(&file, Some(name))?)?;
    }
    let (prompt, negative) = (f.meta_str("prompt")?, f.meta_str("negative_prompt")?);
    for (key, text) in [("", prompt), ("negative_", negative)] {
        let converted = pipe.tokenizer_2.expand_added_tokens(text)?;
        let tokenizers = [pipe.tokenizer.as_ref(), Some(&pipe.tokenizer_2)];
        for (i, tok) in tokenizers.into_iter().enumerate() {
            let tok = tok
                .ok_or_else(|| crate::Error::Config("the tiny model has two tokenizers".into()))?;
            let name = format!("{key}ids_{}", i + 1);
            let got = tok.encode(&converted)?;
            let want = f.tensor(&name)?.to_vec_i64()?;
            let mismatches = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| **g as i64 != **w)
                .count()
                + got.len().abs_diff(want.len());
            chk.check_exact(&name, mismatches == 0, mismatches as f64);
        }
    }
    let req = meta_request(&f)?;
    let (pos, neg) = no_grad(|| pipe.request_embeds(&req))?;
    let neg =
        neg.ok_or_else(|| crate::Error::Config("guidance above 1 has a negative batch".into()))?;
    for (n, t) in [
        ("prompt_embeds", &pos.context),
        ("pooled_prompt_embeds", &pos.pooled),
        ("negative_prompt_embeds", &neg.context),
        ("negative_pooled_prompt_embeds", &neg.pooled),
    ] {
        chk.check(n, t, &f.tensor(n)?, ctx.forward)?;
    }
    let init = reference_init_latents(ctx)?;
    let out = no_grad(|| pipe.denoise(&req, &init, |_, _| {}))?;
    chk.check(
        "final_latents",
        &out,
        &f.tensor("final_latents")?,
        ctx.forward,
    )?;
    Ok(chk.rows)
}

/// A standalone VAE file (`gen_vae_file.py`): the tiny VAE perturbed and saved with the original
/// LDM names, no prefix (`sdxl_vae.safetensors` as A1111 and ComfyUI take it), read with the tiny
/// model's VAE config as `generate --vae` reads it; diffusers' `from_single_file` decode of the
/// reference latents and the encoded mean of the reference image.
pub fn vae_file(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(extra(ctx, "vae_file_reference.safetensors"))?;
    let file = extra(ctx, f.meta_str("vae_file")?);
    let vae = ModelFiles::resolve(&ctx.dir.join("sdxl"), None)?
        .with_vae(Some(file))?
        .vae(ctx.device)?;
    vae_rows(ctx, "vae_file", &f, &vae)
}

/// A VAE reference file's rows: `latents` -> `decoded` (no scaling), `image` -> `encoded_mean`
/// and, where the file has it, `encoded_logvar`.
fn vae_rows(
    ctx: &Ctx,
    case: &str,
    f: &SafeTensorsFile,
    vae: &crate::models::vae::AutoencoderKL,
) -> Result<Vec<Row>> {
    let load = |name: &str| -> Result<Tensor> {
        f.tensor(name)?.to_dtype(DType::F32)?.to_device(ctx.device)
    };
    let mut chk = Checker::new(case);
    let decoded = no_grad(|| vae.decode(&load("latents")?))?;
    chk.check("decoded", &decoded, &f.tensor("decoded")?, ctx.forward)?;
    let (mean, logvar) = no_grad(|| vae.encode(&load("image")?))?;
    let mut rows = vec![("encoded_mean", mean)];
    if f.names().any(|n| n == "encoded_logvar") {
        rows.push(("encoded_logvar", logvar));
    }
    for (name, t) in rows {
        chk.check(name, &t, &f.tensor(name)?, ctx.forward)?;
    }
    Ok(chk.rows)
}

/// diffusers' `clip_skip` (`gen_clip_skip.py`), applied to the prompt and the negative prompt
/// alike: both batches' context and pooled embeddings and the final latents of a 3-step Euler run
/// with clip skip 1 and 2; and the refiner's text_encoder_2-only context with clip skip 1.
pub fn clip_skip(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(extra(ctx, "clip_skip.safetensors"))?;
    let mut base = super::pipeline_case::tiny_pipeline(ctx)?;
    let mut refiner = tiny_refiner(ctx)?;
    let init = reference_init_latents(ctx)?;
    let req = meta_request(&f)?;
    let mut chk = Checker::new("clip_skip");
    for name in f.meta_str("cases")?.split(',') {
        let key = |k: &str| format!("{name}.{k}");
        let skip = f.meta_f64(&key("clip_skip"))? as usize;
        if name.starts_with("refiner") {
            refiner.set_clip_skip(skip)?;
            let e = no_grad(|| refiner.encode_prompts(std::slice::from_ref(&req.prompt)))?;
            chk.check(
                &key("prompt_embeds"),
                &e.context,
                &f.tensor(&key("prompt_embeds"))?,
                ctx.forward,
            )?;
            chk.check(
                &key("pooled_prompt_embeds"),
                &e.pooled,
                &f.tensor(&key("pooled_prompt_embeds"))?,
                ctx.forward,
            )?;
            continue;
        }
        base.set_clip_skip(skip)?;
        let (pos, neg) = no_grad(|| base.request_embeds(&req))?;
        let neg = neg
            .ok_or_else(|| crate::Error::Config("guidance above 1 has a negative batch".into()))?;
        for (n, t) in [
            ("prompt_embeds", &pos.context),
            ("pooled_prompt_embeds", &pos.pooled),
            ("negative_prompt_embeds", &neg.context),
            ("negative_pooled_prompt_embeds", &neg.pooled),
        ] {
            chk.check(&key(n), t, &f.tensor(&key(n))?, ctx.forward)?;
        }
        let start = crate::sample::pipeline::Start::Noise(&init);
        check_final(&mut chk, ctx, &f, name, &base, &req, start)?;
    }
    Ok(chk.rows)
}

/// diffusers' tiled VAE (`gen_vae_tiling.py`, `enable_tiling()` on the tiny VAE: 128-pixel /
/// 16-latent tiles, last tiles narrower than the blend): the decode of latents of 14x20 and the
/// encoded distribution of a 112x160 picture.
pub fn vae_tiling(ctx: &Ctx) -> Result<Vec<Row>> {
    let f = SafeTensorsFile::open(extra(ctx, "vae_tiling.safetensors"))?;
    let mut vae = ModelFiles::resolve(&ctx.dir.join("sdxl"), None)?.vae(ctx.device)?;
    vae.tiling = true;
    vae_rows(ctx, "vae_tiling", &f, &vae)
}
