//! `kstyle generate`: text to image, image to image with `--image`, or inpainting with `--image`
//! and `--mask`, with an SDXL checkpoint,
//! any number of LoRA files (kohya files merge at load, kstyle adapters run live with their
//! gates), several seeds per call.

use super::DeviceArg;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kstyle::formats::textual_inversion::TextualInversion;
use kstyle::image::io::{chw_to_rgb, save_png};
use kstyle::sample::mask_crop::{crop, crop_region, fill_resize, overlay};
use kstyle::sample::model_files::ModelFiles;
use kstyle::sample::pipeline::{
    check_clip_skip, image_input, image_input_size, mask_input, masked_image, skipped_steps,
    Inpaint, LoadOptions, MicroConditioning, Request, SdxlPipeline, Start,
};
use kstyle::sample::prompt_syntax::PromptStyle;
use kstyle::tensor::{Rng, SafeTensorsFile};
use kstyle::{DType, Tensor};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod choices;
use choices::prompt_style;
pub use choices::{DTypeArg, EmphasisArg, PromptStyleArg, SamplerArg, SigmasArg, WeightDTypeArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A diffusers SDXL folder or an original-layout single .safetensors file.
    #[arg(long)]
    pub model: PathBuf,
    /// Architecture folder for a single-file model (default: the built-in SDXL base, or the
    /// built-in SDXL refiner for a refiner file).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A VAE to use instead of the model's own, for decoding (and encoding --image): a single
    /// file (`sdxl_vae.safetensors` as A1111 and ComfyUI take it, a checkpoint's VAE, or a
    /// diffusers-named file) read with the model's VAE config, or a diffusers VAE folder with
    /// its own config. The refiner gets it too.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Negative prompt; without one, SDXL's zero negative embeddings are used.
    #[arg(long)]
    pub negative: Option<String>,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (off at 1 or below).
    #[arg(long, default_value_t = 5.0)]
    pub cfg: f64,
    /// diffusers' guidance_rescale, 0 to 1 (0: off; 0.7 is the usual choice for zero-SNR
    /// v-prediction models).
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// Image width (default 1024; with --image, the image's width rounded down to a multiple of
    /// 8).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height (default 1024; with --image, the image's height rounded down to a multiple
    /// of 8).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image to image: start from this picture (PNG, JPEG, WebP, ...), resized with Lanczos to
    /// the output size when it differs, encoded by the VAE and noised to the level where the
    /// last --strength of the steps begins (diffusers' SDXL img2img pipeline).
    #[arg(long, conflicts_with = "latents")]
    pub image: Option<PathBuf>,
    /// Inpainting, with --image: a mask picture, white (luma 128 and above) where the picture is
    /// repainted and black where it is kept; resized to the output size like the picture. A
    /// 4-channel model puts the kept region back after every step; an inpainting model (a
    /// 9-channel UNet) sees the mask and the masked picture (diffusers' SDXL inpaint pipeline).
    /// Not with --refiner: the refiner's steps would repaint the kept region.
    #[arg(long, requires = "image", conflicts_with = "refiner")]
    pub mask: Option<PathBuf>,
    /// With --mask: inpaint only the masked region, as diffusers' `padding_mask_crop` (A1111's
    /// "only masked" with its padding): the box around the mask's nonzero pixels, grown by PAD
    /// pixels and widened to the output aspect, is cut from picture and mask and resized to the
    /// output size (aspect kept, the rest filled from the edges); the result is resized back into
    /// the box and composited over the untouched picture through the mask, so the saved PNG has
    /// the picture's own size. Picture and mask must be the same size.
    #[arg(long, value_name = "PAD", requires = "mask")]
    pub mask_crop: Option<usize>,
    /// With --mask: blur the mask first, as diffusers' `mask_processor.blur(mask, RADIUS)`
    /// (Pillow's GaussianBlur): soft edges for the --mask-crop composite, and a slightly grown
    /// or shrunk repainted region (the pipeline binarises the mask at half grey).
    #[arg(
        long,
        value_name = "RADIUS",
        requires = "mask",
        allow_negative_numbers = true
    )]
    pub mask_blur: Option<f32>,
    /// With --image: how much of the schedule runs, 0 to 1 (floor(steps x strength) steps; 1
    /// repaints from full noise level, low values keep the picture). diffusers' defaults: 0.3,
    /// and 0.9999 with --mask (at 1, inpainting starts from noise alone).
    #[arg(long, requires = "image")]
    pub strength: Option<f64>,
    /// An SDXL refiner (a diffusers folder or `sd_xl_refiner_1.0.safetensors`; or any SDXL
    /// model) to finish each image: the model runs until --refiner-switch of the schedule, then
    /// the refiner continues from its latents with the same sampler and steps (diffusers'
    /// denoising_end / denoising_start).
    #[arg(long)]
    pub refiner: Option<PathBuf>,
    /// Architecture folder for a single-file --refiner (default: the built-in SDXL refiner, or
    /// the built-in SDXL base for a base file).
    #[arg(long, requires = "refiner")]
    pub refiner_config: Option<PathBuf>,
    /// With --refiner: the fraction of the schedule the first model runs, between 0 and 1.
    #[arg(long, requires = "refiner", default_value_t = 0.8)]
    pub refiner_switch: f64,
    /// With --refiner: a LoRA (kohya, PEFT/diffusers, LyCORIS) or kstyle adapter file for the
    /// refiner, FILE[:SCALE] (repeatable). --lora applies to the first model only.
    #[arg(long = "refiner-lora", requires = "refiner")]
    pub refiner_loras: Vec<String>,
    /// SDXL size conditioning: the original size the picture claims, WIDTHxHEIGHT (default: the
    /// output size). Larger than the output asks for detail, smaller for a blurrier look.
    #[arg(long, value_parser = size_arg)]
    pub original_size: Option<(usize, usize)>,
    /// SDXL crop conditioning: the crop's top-left corner, TOP,LEFT in pixels (default 0,0: an
    /// uncropped, centred subject).
    #[arg(long, value_parser = corner_arg)]
    pub crop_top_left: Option<(usize, usize)>,
    /// SDXL target-size conditioning, WIDTHxHEIGHT (default: the output size).
    #[arg(long, value_parser = size_arg)]
    pub target_size: Option<(usize, usize)>,
    /// Size conditioning of the negative batch (e.g. 512x512 to steer away from low
    /// resolution). Text to image uses the negative sizes only when both
    /// --negative-original-size and --negative-target-size are given, as diffusers does.
    #[arg(long, value_parser = size_arg)]
    pub negative_original_size: Option<(usize, usize)>,
    #[arg(long, value_parser = corner_arg)]
    pub negative_crop_top_left: Option<(usize, usize)>,
    #[arg(long, value_parser = size_arg)]
    pub negative_target_size: Option<(usize, usize)>,
    /// A refiner's aesthetic-score conditioning of the prompt and of the negative batch
    /// (diffusers' defaults 6 and 2.5).
    #[arg(long, default_value_t = 6.0)]
    pub aesthetic_score: f64,
    #[arg(long, default_value_t = 2.5)]
    pub negative_aesthetic_score: f64,
    /// Seeds (repeatable or comma separated); one image each.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub seed: Vec<u64>,
    /// LoRA or kstyle adapter file with an optional multiplier, FILE[:SCALE] (repeatable).
    #[arg(long = "lora")]
    pub loras: Vec<String>,
    /// A textual-inversion embedding, SDXL's `clip_l` / `clip_g` safetensors file, as
    /// FILE[:NAME] (repeatable): prompts and negative prompts use it by NAME, the file stem by
    /// default. The refiner gets it too (its `clip_g` rows).
    #[arg(long = "embedding")]
    pub embeddings: Vec<String>,
    /// diffusers' `clip_skip`: the per-token text context comes from N layers before SDXL's
    /// penultimate one, of both text encoders (the pooled embedding stays the last layer's); 0,
    /// the default, is SDXL's own. Applied to the negative prompt and the refiner too.
    #[arg(long, default_value_t = 0)]
    pub clip_skip: usize,
    /// How --prompt and --negative are read. `diffusers`: as diffusers' SDXL pipelines read
    /// them, the text as written, cut at 75 tokens. `a1111`: as A1111 (stable-diffusion-webui)
    /// reads them: `(word)` x1.1, `[word]` /1.1, `(word:1.5)`, nested, `\(` for a literal
    /// bracket; `BREAK` starts a new chunk; any length, in chunks of 75 tokens encoded one by one
    /// and joined (a prompt and a negative prompt of different lengths then take one UNet pass
    /// each, as A1111 runs them). Prompt editing: `[from:to:when]`, `[to:when]`, `[from::when]`
    /// (`when` a step, or a fraction of the steps with a `.`), `[a|b]` alternating every step;
    /// `a AND b :0.5` guides with each part at its weight. `comfy`: as ComfyUI's CLIPTextEncode reads them: `(word)` x1.1, `(word:1.5)`
    /// (an explicit weight replaces the enclosing one), `\(` literal, square brackets are text;
    /// any length, words moved whole to the next 75-token chunk (split if 8 tokens or more);
    /// a weighted token's state is drawn from the empty prompt's, `empty + (state - empty) w`;
    /// `embedding:NAME` names an --embedding. Applies to the refiner too.
    #[arg(long, value_enum, default_value = "diffusers")]
    pub prompt_style: PromptStyleArg,
    /// With --prompt-style a1111: how weights reach the text encoders' output (A1111's
    /// "Emphasis mode"): `original` (the default: the states times the weights, rescaled to each
    /// chunk's mean), `no-norm` (not rescaled), `ignore` (brackets parsed away, weights not
    /// applied), `none` (brackets are text).
    #[arg(long, value_enum)]
    pub emphasis: Option<EmphasisArg>,
    /// With --prompt-style a1111: A1111's "prompt word wrap length limit": when a chunk fills up
    /// and its last comma is at most this many tokens back, the words after the comma start the
    /// next chunk (0: off). Default 20.
    #[arg(long)]
    pub comma_backtrack: Option<usize>,
    /// diffusers' `enable_vae_tiling()`: decode (and encode --image) in overlapping tiles of the
    /// VAE's sample_size, blended together, so that large pictures fit in memory. Slightly
    /// different numbers from untiled decoding.
    #[arg(long)]
    pub vae_tiling: bool,
    /// Initial latents (unscaled N(0,1), shape (1, 4, H/8, W/8)) from a safetensors file, taken
    /// from its `init_latents` tensor or its only tensor; overrides the seed.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// `auto`: the sampler the model's scheduler config names, as diffusers runs it.
    #[arg(long, value_enum, default_value = "auto")]
    pub sampler: SamplerArg,
    /// The sigmas the sampler steps on, as diffusers' `use_karras_sigmas`,
    /// `use_exponential_sigmas` and `use_beta_sigmas` (ComfyUI's "karras", "exponential" and
    /// "beta" schedulers): `config` (the default) keeps what the sampler name and the model's
    /// scheduler config say. For Euler, DPM++ (2M, 3M, 2S, 3S, SDE), UniPC, DEIS, Heun, LMS and
    /// DPM2.
    #[arg(long, value_enum, default_value = "config")]
    pub sigmas: SigmasArg,
    /// diffusers' `eta`, 0 to 1, for DDIM and TCD: how much fresh noise each step mixes in
    /// (0 is deterministic). DDIM's defaults to 0; TCD's (its gamma) to 0.3, the TCD authors'
    /// setting. With --sampler ddim or tcd, or auto on a model whose scheduler is one of them.
    #[arg(long)]
    pub eta: Option<f64>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Compute dtype of the text encoders and the UNet (the VAE always decodes in f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Store the UNet's Linear and convolution weights (all but 0.06% of its parameters)
    /// in one byte each, rounded as PyTorch rounds, and widen each to --dtype for its GEMM:
    /// SDXL's UNet then holds 2.6 GB instead of 5.1 GB (bf16). Pictures change slightly, as
    /// with any fp8 checkpoint. Default: the weights are held in --dtype.
    #[arg(long, value_enum)]
    pub weight_dtype: Option<WeightDTypeArg>,
    /// Output PNG; with several seeds, `-<seed>` is added before the extension.
    #[arg(long)]
    pub out: PathBuf,
}

/// `WIDTHxHEIGHT` as (height, width), diffusers' order.
fn size_arg(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("expected WIDTHxHEIGHT in pixels, e.g. 1024x768, got `{s}`");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h) = (
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    );
    if w == 0 || h == 0 {
        return Err(bad());
    }
    Ok((h, w))
}

/// `TOP,LEFT` as (top, left).
fn corner_arg(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("expected TOP,LEFT in pixels, e.g. 0,64, got `{s}`");
    let (t, l) = s.split_once(',').ok_or_else(bad)?;
    Ok((
        t.trim().parse().map_err(|_| bad())?,
        l.trim().parse().map_err(|_| bad())?,
    ))
}

/// `FILE[:NAME]`: an existing file as it is, else split at the last colon.
fn parse_embedding(s: &str) -> (PathBuf, Option<String>) {
    match s.rsplit_once(':') {
        Some((path, name)) if !Path::new(s).exists() && !name.contains('/') => {
            (PathBuf::from(path), Some(name.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

/// `FILE[:SCALE]`; a colon followed by something that is not a number stays part of the path.
pub fn parse_lora(s: &str) -> anyhow::Result<(PathBuf, f64)> {
    if let Some((path, scale)) = s.rsplit_once(':') {
        if let Ok(v) = scale.parse::<f64>() {
            return Ok((PathBuf::from(path), v));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}

fn load_latents(path: &Path) -> anyhow::Result<Tensor> {
    let f = SafeTensorsFile::open(path)?;
    let names: Vec<&str> = f.names().collect();
    let name = if f.contains("init_latents") {
        "init_latents"
    } else if names.len() == 1 {
        names[0]
    } else {
        anyhow::bail!(
            "{}: no `init_latents` tensor and more than one tensor in the file",
            path.display()
        );
    };
    Ok(f.tensor(name)?.to_dtype(DType::F32)?)
}

fn output_path(out: &Path, seed: u64, many: bool) -> PathBuf {
    if !many {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    out.with_file_name(format!("{stem}-{seed}.png"))
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&a.guidance_rescale) {
        anyhow::bail!(
            "--guidance-rescale must be between 0 and 1, got {}",
            a.guidance_rescale
        );
    }
    if a.refiner.is_some() && !(a.refiner_switch > 0.0 && a.refiner_switch < 1.0) {
        anyhow::bail!(
            "--refiner-switch must lie strictly between 0 and 1, got {}",
            a.refiner_switch
        );
    }
    let style = prompt_style(&a)?;
    let strength = a
        .strength
        .unwrap_or(if a.mask.is_some() { 0.9999 } else { 0.3 });
    // The input pictures first: a bad file fails before any model loads.
    let mask_picture = a
        .mask
        .as_deref()
        .map(kstyle::image::io::load_rgb_upright)
        .transpose()?;
    let mask_picture = match (mask_picture, a.mask_blur) {
        (Some(m), Some(radius)) => {
            Some(kstyle::image::blur::gaussian_blur_rgb(&m, radius).context("--mask-blur")?)
        }
        (m, _) => m,
    };
    let input = match &a.image {
        Some(path) => {
            let img = kstyle::image::io::load_rgb_upright(path)?;
            skipped_steps(a.steps, strength).with_context(|| format!("--strength {strength}"))?;
            let (w, h) = image_input_size(&img).with_context(|| path.display().to_string())?;
            let (w, h) = (a.width.unwrap_or(w), a.height.unwrap_or(h));
            Some((img, w, h))
        }
        None => None,
    };
    let (width, height) = match &input {
        Some((_, w, h)) => (*w, *h),
        None => (a.width.unwrap_or(1024), a.height.unwrap_or(1024)),
    };
    // --mask-crop: the region's picture and mask stand in for the whole ones; the originals come
    // back for the composite.
    let cropped = match (a.mask_crop, &input, &mask_picture) {
        (Some(pad), Some((img, w, h)), Some(mask)) => {
            let (image_path, mask_path) = (a.image.as_deref(), a.mask.as_deref());
            let blurred = a
                .mask_blur
                .map_or(String::new(), |r| format!(" (after --mask-blur {r})"));
            let names = || {
                format!(
                    "--image {} and --mask {}{blurred}",
                    image_path.map_or(String::new(), |p| p.display().to_string()),
                    mask_path.map_or(String::new(), |p| p.display().to_string())
                )
            };
            if img.dimensions() != mask.dimensions() {
                anyhow::bail!(
                    "--mask-crop needs picture and mask of one size: {} are {}x{} and {}x{}",
                    names(),
                    img.width(),
                    img.height(),
                    mask.width(),
                    mask.height()
                );
            }
            let region = crop_region(mask, *w, *h, pad).with_context(names)?;
            eprintln!(
                "--mask-crop {pad}: inpainting the {region} region of the {}x{} picture at {w}x{h}",
                img.width(),
                img.height()
            );
            let fill = |p: &image::RgbImage| fill_resize(&crop(p, region), *w, *h);
            Some((
                region,
                fill(img).with_context(names)?,
                fill(mask).with_context(names)?,
            ))
        }
        _ => None,
    };
    if let Some(eta) = a.eta {
        if !(0.0..=1.0).contains(&eta) {
            anyhow::bail!("--eta must be between 0 and 1, got {eta}");
        }
        if !matches!(
            a.sampler,
            SamplerArg::Ddim | SamplerArg::Tcd | SamplerArg::Auto
        ) {
            anyhow::bail!("--eta applies to DDIM and TCD: use --sampler ddim or tcd");
        }
    }
    if width == 0 || height == 0 || width % 8 != 0 || height % 8 != 0 {
        anyhow::bail!("--width and --height must be positive multiples of 8, got {width}x{height}");
    }
    let loras = a
        .loras
        .iter()
        .map(|s| parse_lora(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let refiner_loras = a
        .refiner_loras
        .iter()
        .map(|s| parse_lora(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let device = a.device.device();
    let dtype = a.dtype.dtype();
    let weight_dtype = a.weight_dtype.map(WeightDTypeArg::dtype);
    // The refiner loads only after the base run; check it, its LoRAs and the VAE now, so that a
    // wrong file fails before the base run rather than after it.
    let refiner_opts = a.refiner.as_ref().map(|path| LoadOptions {
        model: path.clone(),
        config: a.refiner_config.clone(),
        dtype,
        weight_dtype,
        device,
        loras: refiner_loras,
        vae: a.vae.clone(),
    });
    if let Some(r) = &refiner_opts {
        SdxlPipeline::check_files(r)
            .with_context(|| format!("checking the refiner {}", r.model.display()))?;
        let files = ModelFiles::resolve(&r.model, r.config.as_deref())?;
        check_clip_skip(a.clip_skip, &files.text_encoder_layers()?)
            .with_context(|| format!("--clip-skip for the refiner {}", r.model.display()))?;
    }
    let opts = LoadOptions {
        model: a.model.clone(),
        config: a.config.clone(),
        dtype,
        weight_dtype,
        device,
        loras,
        vae: a.vae.clone(),
    };
    eprintln!(
        "kstyle generate: model {} | {}x{} | {} steps {:?} | cfg {} | {dtype}{} on {device} | {} LoRA file(s)",
        a.model.display(),
        width,
        height,
        a.steps,
        a.sampler,
        a.cfg,
        weight_dtype.map_or(String::new(), |w| format!(" (UNet weights {w})")),
        opts.loras.len()
    );
    let embeddings = a
        .embeddings
        .iter()
        .map(|s| {
            let (path, name) = parse_embedding(s);
            TextualInversion::load(&path, name.as_deref())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut pipe =
        SdxlPipeline::load(&opts).with_context(|| format!("loading {}", a.model.display()))?;
    if let Some(vae) = &a.vae {
        eprintln!(
            "vae: {} (scaling factor {})",
            vae.display(),
            pipe.vae.config.scaling_factor
        );
    }
    pipe.set_clip_skip(a.clip_skip).context("--clip-skip")?;
    pipe.set_prompt_style(style);
    pipe.vae.tiling = a.vae_tiling;
    for ti in &embeddings {
        pipe.add_embedding(ti)?;
        eprintln!(
            "embedding: {} ({} vector(s)) from {}",
            ti.name,
            ti.vectors(),
            ti.path.display()
        );
    }
    for (flag, text) in [
        ("--prompt", Some(&a.prompt)),
        ("--negative", a.negative.as_ref()),
    ] {
        if style != PromptStyle::Diffusers {
            break;
        }
        if let Some(cut) = text.map(|t| pipe.truncated(t)).transpose()?.flatten() {
            eprintln!(
                "warning: {flag} is longer than CLIP's 77 tokens; the end is dropped, as in \
                 diffusers: \"{cut}\""
            );
        }
    }
    let req = Request {
        prompt: a.prompt.clone(),
        negative: a.negative.clone(),
        steps: a.steps,
        guidance: a.cfg,
        guidance_rescale: a.guidance_rescale,
        width,
        height,
        sampler: a.sampler.kind(),
        noise: kstyle::sample::Noise::default(),
        denoising_end: a.refiner.as_ref().map(|_| a.refiner_switch),
        micro: MicroConditioning {
            original_size: a.original_size,
            crop_top_left: a.crop_top_left.unwrap_or((0, 0)),
            target_size: a.target_size,
            negative_original_size: a.negative_original_size,
            negative_crop_top_left: a.negative_crop_top_left.unwrap_or((0, 0)),
            negative_target_size: a.negative_target_size,
            aesthetic_score: a.aesthetic_score,
            negative_aesthetic_score: a.negative_aesthetic_score,
        },
    };
    // `auto` names a sampler now, so an unsupported scheduler fails before any step runs.
    let sampler = req.sampler.resolve(&pipe.scheduler)?;
    let sampler = match a.sigmas {
        SigmasArg::Config => sampler,
        s => sampler.with_sigmas(s.sigmas(), &pipe.scheduler)?,
    };
    let sampler = match a.eta {
        Some(eta) => sampler.with_eta(eta, &pipe.scheduler).context("--eta")?,
        None => sampler,
    };
    let model_kind = match (pipe.scheduler.prediction, pipe.scheduler.zero_snr) {
        (kstyle::sample::schedule::Prediction::Epsilon, false) => "",
        (kstyle::sample::schedule::Prediction::Epsilon, true) => " (zero-SNR schedule)",
        (kstyle::sample::schedule::Prediction::V, false) => " (v-prediction)",
        (kstyle::sample::schedule::Prediction::V, true) => " (v-prediction, zero-SNR schedule)",
    };
    eprintln!("sampler: {}{model_kind}", sampler.describe(&pipe.scheduler));
    let req = Request { sampler, ..req };
    let image = match (&input, &a.image) {
        (Some((img, w, h)), Some(path)) => {
            let run = a.steps - skipped_steps(a.steps, strength)?;
            eprintln!(
                "{}: {} ({}x{}) at {w}x{h}, strength {strength}: the last {run} of {} steps",
                if a.mask.is_some() {
                    "inpaint"
                } else {
                    "img2img"
                },
                path.display(),
                img.width(),
                img.height(),
                a.steps
            );
            let img = cropped.as_ref().map_or(img, |(_, img, _)| img);
            Some(image_input(img, *w, *h, device)?)
        }
        _ => None,
    };
    // (latent mask, masked picture) for inpainting.
    let masks = match (&mask_picture, &image) {
        (Some(m), Some(img)) => {
            let m = cropped.as_ref().map_or(m, |(_, _, m)| m);
            let (pixels, latent) = mask_input(m, width, height, device)?;
            let masked = masked_image(img, &pixels)?;
            Some((latent, masked))
        }
        _ => None,
    };
    let nine_channels = pipe.unet.config.in_channels != pipe.vae.config.latent_channels;
    if nine_channels && masks.is_none() {
        anyhow::bail!(
            "{}: its UNet takes {} input channels (an inpainting model); give --image and --mask",
            a.model.display(),
            pipe.unet.config.in_channels
        );
    }
    let given = a.latents.as_deref().map(load_latents).transpose()?;
    let seeds = if given.is_some() {
        vec![a.seed[0]]
    } else {
        a.seed.clone()
    };
    // With a refiner: each seed's latents at the switch, finished after the loop.
    let mut handed = Vec::new();
    for &seed in &seeds {
        // img2img and inpainting draw the VAE's latent sample, the noise mixed in, then the
        // masked picture's sample from the seed (the order diffusers' pipelines draw them in).
        let img2img = match &image {
            Some(img) => {
                let mut rng = Rng::new(seed);
                let shape = (1, pipe.vae.config.latent_channels, height / 8, width / 8);
                let sample = Tensor::randn(shape, &mut rng, DType::F32, device)?;
                let latents = pipe.encode_image(img, Some(&sample))?;
                let noise = Tensor::randn(shape, &mut rng, DType::F32, device)?;
                let masked = match &masks {
                    Some((_, masked)) if nine_channels => {
                        let sample = Tensor::randn(shape, &mut rng, DType::F32, device)?;
                        Some(pipe.encode_image(masked, Some(&sample))?)
                    }
                    _ => None,
                };
                Some((latents, noise, masked))
            }
            None => None,
        };
        let init;
        let start = match &img2img {
            Some((latents, noise, masked)) => Start::Image {
                latents,
                noise,
                strength,
                inpaint: masks.as_ref().map(|(mask, _)| Inpaint {
                    mask,
                    masked: masked.as_ref(),
                }),
            },
            None => {
                init = match &given {
                    Some(t) => t.to_device(device)?,
                    None => pipe.initial_latents(width, height, seed)?,
                };
                Start::Noise(&init)
            }
        };
        let bar = ProgressBar::new(a.steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps, {elapsed} (eta {eta})",
            )?
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("seed {seed}"));
        // Ancestral samplers draw their step noise from the image's seed too (its own stream).
        let req = Request {
            noise: kstyle::sample::Noise::for_seed(seed),
            ..req.clone()
        };
        // Heun, DPM2 and DPM++ SDE evaluate the UNet 2 x steps - 1 times: the bar counts
        // evaluations.
        let progress = |i: usize, n: usize| {
            bar.set_length(n as u64);
            bar.set_position(i as u64)
        };
        if a.refiner.is_some() {
            let latents = kstyle::autograd::no_grad(|| pipe.denoise_from(&req, start, progress))?;
            handed.push((seed, latents));
            bar.finish_and_clear();
            continue;
        }
        let image = pipe.generate_from(&req, start, progress)?;
        bar.finish_and_clear();
        match (&cropped, &input, &mask_picture) {
            (Some((region, _, _)), Some((original, _, _)), Some(mask)) => {
                let generated = tensor_rgb(&image)?;
                let composed = overlay(original, mask, &generated, *region)?;
                save_rgb(&a.out, seed, seeds.len() > 1, &composed)?;
            }
            _ => save_image(&a.out, seed, seeds.len() > 1, &image)?,
        }
    }
    let Some(refiner_opts) = &refiner_opts else {
        return Ok(ExitCode::SUCCESS);
    };
    let refiner_path = &refiner_opts.model;
    // The refiner finishes every seed's latents; the first model is dropped first so that both
    // are never resident at once.
    drop(pipe);
    let mut refiner = SdxlPipeline::load(refiner_opts)
        .with_context(|| format!("loading the refiner {}", refiner_path.display()))?;
    refiner.vae.tiling = a.vae_tiling;
    refiner.set_prompt_style(style);
    refiner
        .set_clip_skip(a.clip_skip)
        .with_context(|| format!("--clip-skip for the refiner {}", refiner_path.display()))?;
    for ti in &embeddings {
        refiner
            .add_embedding(ti)
            .with_context(|| format!("the refiner {}", refiner_path.display()))?;
    }
    eprintln!(
        "refiner: {} from {} of the schedule | {} LoRA file(s)",
        refiner_path.display(),
        a.refiner_switch,
        a.refiner_loras.len()
    );
    for (seed, latents) in handed {
        let req = Request {
            noise: kstyle::sample::Noise::for_refiner_seed(seed),
            denoising_end: None,
            ..req.clone()
        };
        let start = Start::Latents {
            latents: &latents,
            denoising_start: a.refiner_switch,
        };
        let image = refiner.generate_from(&req, start, |_, _| {})?;
        save_image(&a.out, seed, seeds.len() > 1, &image)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The first image of `image` (B, 3, H, W) in [0, 1] as 8-bit RGB (diffusers' rounding).
fn tensor_rgb(image: &Tensor) -> anyhow::Result<image::RgbImage> {
    let (_, c, h, w) = image.dims4()?;
    Ok(chw_to_rgb(&image.narrow(0, 0, 1)?.to_vec_f32()?, c, h, w)?)
}

/// Writes the first image of `image` (B, 3, H, W) in [0, 1] to the seed's output path and
/// prints the path.
fn save_image(out: &Path, seed: u64, many: bool, image: &Tensor) -> anyhow::Result<()> {
    save_rgb(out, seed, many, &tensor_rgb(image)?)
}

/// Writes `img` to the seed's output path and prints the path.
fn save_rgb(out: &Path, seed: u64, many: bool, img: &image::RgbImage) -> anyhow::Result<()> {
    let path = output_path(out, seed, many);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    save_png(&path, img)?;
    println!("{}", path.display());
    Ok(())
}
