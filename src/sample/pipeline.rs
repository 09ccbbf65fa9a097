//! The SDXL text-to-image pipeline with diffusers' semantics (SDXL.md Appendix A): two text
//! encoders, zero negative embeddings when no negative prompt is given, time ids, classifier-free
//! guidance as one batch [uncond; cond], the samplers of this module, and an f32 VAE decode.

pub use super::image_input::{image_input, image_input_size, mask_input, masked_image};
use super::model_files::ModelFiles;
use super::prompt_syntax::PromptStyle;
use super::sampler_kind::build_sampler;
pub use super::sampler_kind::{SamplerKind, Sigmas};
use super::{Noise, Sampler, SchedulerConfig};
use crate::formats::adapter::{text_encoder_part, Adapter};
use crate::formats::kohya::ModuleIndex;
use crate::models::clip::text::ClipTextModel;
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::models::unet::lora_merge::{check_kohya, KohyaLoraFile};
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::nn::weights::Precision;
use crate::tensor::Rng;
use crate::{DType, Device, Error, Result, Tensor};
use std::path::{Path, PathBuf};

mod guidance;
mod prompt;
use guidance::Conditioning;
pub use guidance::{guidance_batch, Schedule, StepPrompts};
pub use prompt::{check_clip_skip, PromptEmbeds};

/// How to load a pipeline.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// A diffusers folder, or an original-layout single `.safetensors` file.
    pub model: PathBuf,
    /// Architecture folder for a single file (a diffusers folder without weights); the
    /// built-in SDXL base config when absent.
    pub config: Option<PathBuf>,
    /// Compute dtype of the UNet and text encoders (the VAE always runs in f32).
    pub dtype: DType,
    /// A float8 storage type for the UNet's Linear and convolution weights (`--weight-dtype`);
    /// None holds them in `dtype`.
    pub weight_dtype: Option<DType>,
    pub device: Device,
    /// LoRA files with multipliers: kohya files merge into the weights, kstyle adapter files
    /// attach live (their gates run every step).
    pub loras: Vec<(PathBuf, f64)>,
    /// A VAE that replaces the model's own (a VAE folder or file, see
    /// [`ModelFiles::with_vae`]).
    pub vae: Option<PathBuf>,
}

pub struct SdxlPipeline {
    /// The first tokenizer and text encoder: absent from a refiner, whose context is
    /// text_encoder_2's alone.
    pub tokenizer: Option<ClipTokenizer>,
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder: Option<ClipTextModel>,
    pub text_encoder_2: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
    pub force_zeros_for_empty_prompt: bool,
    pub device: Device,
    pub dtype: DType,
    /// The live adapters attached at load (diagnostics and the CLI's summary).
    pub adapters: Vec<PathBuf>,
    /// Textual-inversion embeddings added with [`SdxlPipeline::add_embedding`], by name.
    pub embeddings: Vec<String>,
    /// Layers skipped before SDXL's penultimate one in the per-token context (diffusers'
    /// `clip_skip`); 0 is SDXL's own. Set with [`SdxlPipeline::set_clip_skip`].
    clip_skip: usize,
    /// How prompts are read (set with [`SdxlPipeline::set_prompt_style`]).
    prompt_style: PromptStyle,
}

/// Where sampling starts.
#[derive(Clone, Copy, Debug)]
pub enum Start<'a> {
    /// Text to image: unscaled N(0, 1) latents (1, C, H/8, W/8), scaled by the sampler's initial
    /// noise sigma.
    Noise(&'a Tensor),
    /// Image to image, as diffusers' SDXL img2img pipeline: the image's scaled latents
    /// (1, C, H/8, W/8) are noised with `noise` (same shape) to the step where the last
    /// `strength` (0 to 1) of the schedule begins, and only those steps run: of `steps`,
    /// `floor(steps x strength)`.
    ///
    /// With `inpaint`, as diffusers' SDXL inpainting pipeline instead: at strength 1 the run
    /// starts from `noise` alone (scaled by the initial noise sigma), and the mask decides what
    /// is repainted (see [`Inpaint`]).
    Image {
        latents: &'a Tensor,
        noise: &'a Tensor,
        strength: f64,
        inpaint: Option<Inpaint<'a>>,
    },
    /// A second model finishing partly denoised latents (1, C, H/8, W/8), as diffusers' img2img
    /// pipeline with `denoising_start` and latents for its image: no noise is added, and the
    /// run takes the schedule's timesteps below `T (1 - denoising_start)` (for Heun an odd
    /// count, so it never starts between an evaluation and its correction).
    Latents {
        latents: &'a Tensor,
        denoising_start: f64,
    },
}

/// What inpainting adds to an image start.
///
/// The latents come from [`SdxlPipeline::encode_image`], which applies a VAE's `latents_mean` /
/// `latents_std` when its config has them. diffusers' inpainting pipeline scales by
/// `scaling_factor` alone there (its img2img pipeline applies them); SDXL base and the SDXL
/// inpainting models ship no statistics, so the two agree on them.
#[derive(Clone, Copy, Debug)]
pub struct Inpaint<'a> {
    /// (1, 1, H/8, W/8), 1 where the picture is repainted and 0 where it is kept (from
    /// [`mask_input`]). With a 4-channel UNet the kept region is put back after every step,
    /// noised to the next step's level (the image's own latents after the last).
    pub mask: &'a Tensor,
    /// The masked picture's scaled latents (1, C, H/8, W/8): with the mask, the extra input
    /// channels of inpainting UNets (4 + 1 + 4 = 9), which then repaint on their own. `None`
    /// for 4-channel UNets.
    pub masked: Option<&'a Tensor>,
}

impl Start<'_> {
    /// The latents that fix the generation's shape.
    fn shape_source(&self) -> &Tensor {
        match self {
            Start::Noise(t) => t,
            Start::Image { latents, .. } | Start::Latents { latents, .. } => latents,
        }
    }
}

/// diffusers' `denoising_start` / `denoising_end` cut: the timestep `round(T - fraction T)`
/// (Python's round, ties to even). The fraction must lie strictly between 0 and 1 (diffusers
/// ignores other values silently; here they are errors). EDM models have no such timesteps (theirs
/// are log sigmas), so a handover is refused for them.
fn cutoff_timestep(what: &str, fraction: f64, scheduler: &SchedulerConfig) -> Result<f64> {
    if scheduler.edm.is_some() {
        return Err(Error::Config(format!(
            "{what} (a base + refiner handover) cuts the schedule at a DDPM timestep, which an EDM \
             model's log-sigma timesteps do not have; generate without the refiner"
        )));
    }
    let num_train_timesteps = scheduler.num_train_timesteps;
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::Config(format!(
            "{what} must lie strictly between 0 and 1, got {fraction}"
        )));
    }
    let t = num_train_timesteps as f64;
    Ok((t - fraction * t).round_ties_even())
}

/// SDXL's micro-conditioning, as diffusers' pipelines take it: sizes are (height, width) and
/// crop corners (top, left), in pixels. Unset sizes are the generation's own.
#[derive(Clone, Debug, PartialEq)]
pub struct MicroConditioning {
    pub original_size: Option<(usize, usize)>,
    pub crop_top_left: (usize, usize),
    pub target_size: Option<(usize, usize)>,
    pub negative_original_size: Option<(usize, usize)>,
    pub negative_crop_top_left: (usize, usize),
    pub negative_target_size: Option<(usize, usize)>,
    /// A refiner's (five time ids) aesthetic scores.
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
}

impl Default for MicroConditioning {
    /// diffusers' defaults: no crop, aesthetic scores 6 and 2.5.
    fn default() -> Self {
        MicroConditioning {
            original_size: None,
            crop_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crop_top_left: (0, 0),
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

/// How many of `steps` an img2img run of `strength` skips, as diffusers' `get_timesteps`:
/// `steps - min(floor(steps x strength), steps)` (the product in f64, as Python takes it).
/// Errors when no step would run, or the strength is outside 0 to 1.
pub fn skipped_steps(steps: usize, strength: f64) -> Result<usize> {
    if !(0.0..=1.0).contains(&strength) {
        return Err(Error::Config(format!(
            "strength must be between 0 and 1, got {strength}"
        )));
    }
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        return Err(Error::Config(format!(
            "strength {strength} of {steps} steps runs no step (floor(steps x strength) is 0): \
             raise the strength or the steps"
        )));
    }
    Ok(steps - run)
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    /// `None` with `force_zeros_for_empty_prompt` gives zero negative embeddings.
    pub negative: Option<String>,
    pub steps: usize,
    pub guidance: f64,
    /// diffusers' `guidance_rescale` (0 is off): the guided output is pulled toward the
    /// conditional output's standard deviation (Lin et al. 2023), for zero-SNR models.
    pub guidance_rescale: f64,
    pub width: usize,
    pub height: usize,
    pub sampler: SamplerKind,
    /// The per-step noise of ancestral samplers (the others ignore it).
    pub noise: Noise,
    /// diffusers' `denoising_end` (0 to 1, exclusive): stop where the timesteps fall below
    /// `T (1 - end)` and return the still noisy latents, for a second model to finish with
    /// [`Start::Latents`] (SDXL's base + refiner "ensemble of experts").
    pub denoising_end: Option<f64>,
    /// SDXL's size, crop and aesthetic-score conditioning.
    pub micro: MicroConditioning,
}

impl SdxlPipeline {
    pub fn load(opts: &LoadOptions) -> Result<SdxlPipeline> {
        let mut kohya = Vec::new();
        let mut adapters = Vec::new();
        for (p, m) in &opts.loras {
            if Adapter::is_adapter_file(p)? {
                adapters.push((p.clone(), *m));
            } else {
                kohya.push(KohyaLoraFile::new(p, *m));
            }
        }
        let files =
            ModelFiles::resolve(&opts.model, opts.config.as_deref())?.with_vae(opts.vae.clone())?;
        let load = || -> Result<SdxlPipeline> {
            // A VAE from elsewhere loads first: a wrong `--vae` fails before the large
            // components load.
            let early_vae = match &files.vae {
                Some(_) => Some(files.vae(opts.device)?),
                None => None,
            };
            let (text_encoder, text_encoder_2) =
                files.text_encoders(&kohya, opts.dtype, opts.device)?;
            let (tokenizer, tokenizer_2) = files.tokenizers()?;
            Ok(SdxlPipeline {
                tokenizer,
                tokenizer_2,
                text_encoder,
                text_encoder_2,
                unet: files.unet(
                    &kohya,
                    Precision {
                        compute: opts.dtype,
                        matrices: opts.weight_dtype,
                    },
                    opts.device,
                )?,
                vae: match early_vae {
                    Some(vae) => vae,
                    None => files.vae(opts.device)?,
                },
                scheduler: files.scheduler()?,
                force_zeros_for_empty_prompt: files.force_zeros_for_empty_prompt()?,
                device: opts.device,
                dtype: opts.dtype,
                adapters: Vec::new(),
                embeddings: Vec::new(),
                clip_skip: 0,
                prompt_style: PromptStyle::Diffusers,
            })
        };
        let mut pipe = load().map_err(|e| files.explain(e))?;
        for (path, m) in adapters {
            pipe.attach_adapter(&path, m)?;
        }
        Ok(pipe)
    }

    /// Checks the model `opts` names and its LoRA-family files against each other without
    /// loading any weight: the model resolves and its UNet config reads, and every name, factor
    /// shape and scale a load would check is checked from the configs and the files' headers
    /// (an adapter's names and factor shapes too). A VAE named in `opts` is loaded (on the CPU;
    /// it is small) and checked against the model. `generate` runs this on the refiner before
    /// the base model runs, so a wrong refiner, refiner LoRA or VAE fails in seconds, not after
    /// the base pass.
    pub fn check_files(opts: &LoadOptions) -> Result<()> {
        let files =
            ModelFiles::resolve(&opts.model, opts.config.as_deref())?.with_vae(opts.vae.clone())?;
        let check = || -> Result<()> {
            let cfg = files.unet_config()?;
            for (path, m) in &opts.loras {
                if Adapter::is_adapter_file(path)? {
                    check_adapter(path, &unet_index_for(&cfg), &files.text_encoder_indexes()?)?;
                } else {
                    check_kohya(
                        unet_index_for(&cfg),
                        files.text_encoder_indexes()?,
                        &KohyaLoraFile::new(path, *m),
                    )?;
                }
            }
            if files.vae.is_some() {
                files.vae(Device::Cpu)?;
            }
            Ok(())
        };
        check().map_err(|e| files.explain(e))
    }

    /// The kohya naming index of this UNet (adapter files, exports).
    pub fn module_index(&self) -> ModuleIndex {
        unet_module_index(&self.unet)
    }

    /// Attach a kstyle adapter file's LoRA modules (live, gates included) scaled by `multiplier`:
    /// the UNet's, and the text encoders' when it trained them.
    pub fn attach_adapter(&mut self, path: &Path, multiplier: f64) -> Result<()> {
        let adapter = Adapter::load(path, &self.module_index(), self.device)?;
        let (text, unet): (Vec<_>, Vec<_>) = adapter
            .modules
            .into_iter()
            .partition(|(p, _)| text_encoder_part(p).is_some());
        for (component, encoder) in [
            ("text_encoder", self.text_encoder.as_mut()),
            ("text_encoder_2", Some(&mut self.text_encoder_2)),
        ] {
            let prefix = format!("{component}.");
            let mut mine: std::collections::HashMap<&str, &crate::nn::lora::LoraAdapter> = text
                .iter()
                .filter_map(|(p, a)| p.strip_prefix(&prefix).map(|inner| (inner, a)))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let Some(encoder) = encoder else {
                return Err(Error::file(
                    path,
                    format!(
                        "the adapter holds LoRA for {component}, which this model does not have \
                         (a refiner has text_encoder_2 alone)"
                    ),
                ));
            };
            let (dtype, m) = (self.dtype, multiplier);
            encoder.attach_adapters(|p, _| match mine.remove(p) {
                Some(a) => a.frozen(dtype, m).map(Some),
                None => Ok(None),
            })?;
            if let Some(p) = mine.keys().next() {
                return Err(Error::file(
                    path,
                    format!("module `{prefix}{p}` names no linear of {component}"),
                ));
            }
        }
        let mut by_path: std::collections::HashMap<String, crate::nn::lora::LoraAdapter> =
            unet.into_iter().collect();
        let n = self.unet.attach_all(|p| {
            Ok(match by_path.remove(p) {
                Some(a) => Some(a.frozen(self.dtype, multiplier)?),
                None => None,
            })
        })?;
        if !by_path.is_empty() || (n == 0 && text.is_empty()) {
            return Err(Error::file(
                path,
                format!(
                    "{} adapter modules match no layer of this UNet an adapter wraps (the \
                     transformers' linears, the resnets' and resamplers' layers)",
                    by_path.len()
                ),
            ));
        }
        self.adapters.push(path.to_path_buf());
        Ok(())
    }

    /// Initial latents (1, 4, H/8, W/8) from a seed (our generator, not torch's: images for a
    /// seed differ from diffusers'; pass `--latents` for bit-exact comparisons).
    pub fn initial_latents(&self, width: usize, height: usize, seed: u64) -> Result<Tensor> {
        let c = self.vae.config.latent_channels;
        Tensor::randn(
            (1, c, height / 8, width / 8),
            &mut Rng::new(seed),
            DType::F32,
            self.device,
        )
    }

    /// An image (1, 3, H, W) in [-1, 1] to the scaled latents the UNet sees, through the f32
    /// VAE encoder: the latent distribution's mean, or with `sample_noise` (N(0, 1), latent
    /// shaped) a draw `mean + exp(logvar / 2) noise`, as diffusers' img2img pipeline samples it.
    pub fn encode_image(&self, image: &Tensor, sample_noise: Option<&Tensor>) -> Result<Tensor> {
        crate::autograd::no_grad(|| {
            let image = image.to_dtype(DType::F32)?.to_device(self.device)?;
            let (mean, logvar) = self.vae.encode(&image)?; // (1, L, H/8, W/8) each
            let z = match sample_noise {
                None => mean,
                Some(n) => {
                    if n.dims() != mean.dims() {
                        return Err(Error::bad_shape(
                            "encode_image",
                            format!("sample noise shaped like the latents {:?}", mean.dims()),
                            n.dims(),
                        ));
                    }
                    let n = n.to_dtype(DType::F32)?.to_device(self.device)?;
                    mean.add(&logvar.scale(0.5)?.exp()?.mul(&n)?)?
                }
            };
            self.vae.scale_latents(&z)
        })
    }

    /// Run the sampler from unscaled N(0,1) latents to final latents; `progress(i, n)` is called
    /// after every step.
    pub fn denoise(
        &self,
        req: &Request,
        init: &Tensor,
        progress: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        self.denoise_from(req, Start::Noise(init), progress)
    }

    /// Run the sampler from `start` (text to image, or image to image) to final latents;
    /// `progress(i, n)` is called after every UNet evaluation.
    pub fn denoise_from(
        &self,
        req: &Request,
        start: Start,
        progress: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        let prompts = self.request_prompts(req)?;
        denoise_prompts(&self.unet, &self.scheduler, req, &prompts, start, progress)
    }

    /// Latents -> image (B, 3, H, W) in [0, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let img = self.vae.decode_scaled(&latents.to_dtype(DType::F32)?)?; // (B, 3, H, W) in [-1, 1]
        img.affine(0.5, 0.5)?
            .clamp_min(0.0)?
            .neg()?
            .clamp_min(-1.0)?
            .neg()
    }

    /// The whole run: prompt to image in [0, 1].
    pub fn generate(
        &self,
        req: &Request,
        init: &Tensor,
        progress: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        self.generate_from(req, Start::Noise(init), progress)
    }

    /// The whole run from `start`: prompt (and image) to image in [0, 1].
    pub fn generate_from(
        &self,
        req: &Request,
        start: Start,
        progress: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        crate::autograd::no_grad(|| {
            let latents = self.denoise_from(req, start, progress)?;
            self.decode(&latents)
        })
    }
}

/// Where an img2img run of `strength` starts: the image's scaled `latents` noised with `noise`
/// to the level of its first step under `req`'s sampler and steps.
pub fn start_latents(
    scheduler: &SchedulerConfig,
    req: &Request,
    latents: &Tensor,
    noise: &Tensor,
    strength: f64,
) -> Result<Tensor> {
    let sampler = build_sampler(scheduler, req)?;
    img2img_start(sampler.as_ref(), req, latents, noise, strength).map(|(_, x)| x)
}

/// The first step's index and the noised latents it starts from.
fn img2img_start(
    sampler: &dyn Sampler,
    req: &Request,
    latents: &Tensor,
    noise: &Tensor,
    strength: f64,
) -> Result<(usize, Tensor)> {
    if noise.dims() != latents.dims() {
        return Err(Error::bad_shape(
            "img2img",
            format!("noise shaped like the image latents {:?}", latents.dims()),
            noise.dims(),
        ));
    }
    let first = sampler.first_index(skipped_steps(req.steps, strength)?);
    let x0 = latents.to_dtype(DType::F32)?;
    let noise = noise.to_dtype(DType::F32)?.to_device(latents.device())?;
    Ok((first, sampler.add_noise(first, &x0, &noise)?))
}

/// The kohya naming index of a UNet's own modules.
pub fn unet_module_index(unet: &UNet2DConditionModel) -> ModuleIndex {
    unet_index_for(&unet.config)
}

/// The kohya naming index of a UNet architecture, from its config alone (no weights).
pub fn unet_index_for(cfg: &crate::models::unet::UNetConfig) -> ModuleIndex {
    let shapes = crate::models::unet::param_shapes(cfg);
    ModuleIndex::unet(
        shapes.0.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
        &cfg.layout(),
    )
}

/// An adapter file's modules against a UNet's index and the text encoders' (`text_encoders`,
/// [`ModelFiles::text_encoder_indexes`]): each names a Linear of them, with factors of that
/// Linear's shape (what [`SdxlPipeline::attach_adapter`] would refuse, without a model).
fn check_adapter(path: &Path, index: &ModuleIndex, text_encoders: &[ModuleIndex]) -> Result<()> {
    let adapter = Adapter::load(path, index, Device::Cpu)?;
    for (module, a) in &adapter.modules {
        let (index, inner) = match text_encoder_part(module) {
            Some((c, inner)) => match text_encoders.iter().find(|i| i.component() == c) {
                Some(i) => (i, inner),
                None => {
                    return Err(Error::file(
                        path,
                        format!(
                            "the adapter holds LoRA for {}, which this model does not have",
                            c.diffusers_name()
                        ),
                    ))
                }
            },
            None => (index, module.as_str()),
        };
        let fits = index.weight_shape(inner).is_some_and(|dims| a.fits(dims));
        if !fits {
            return Err(Error::file(
                path,
                format!(
                    "module `{module}`: factors {:?} and {:?} do not fit its weight {:?}",
                    a.a.dims(),
                    a.b.dims(),
                    index.weight_shape(module)
                ),
            ));
        }
    }
    Ok(())
}

/// The sampling loop on precomputed prompt embeddings (the trainer samples with its live UNet and
/// cached embeddings through this) from unscaled N(0, 1) latents. `negative` switches
/// classifier-free guidance on.
pub fn denoise(
    unet: &UNet2DConditionModel,
    scheduler: &SchedulerConfig,
    req: &Request,
    positive: &PromptEmbeds,
    negative: Option<&PromptEmbeds>,
    init: &Tensor,
    progress: impl FnMut(usize, usize),
) -> Result<Tensor> {
    denoise_from(
        unet,
        scheduler,
        req,
        positive,
        negative,
        Start::Noise(init),
        progress,
    )
}

/// [`denoise`] from either start: text to image or image to image.
pub fn denoise_from(
    unet: &UNet2DConditionModel,
    scheduler: &SchedulerConfig,
    req: &Request,
    positive: &PromptEmbeds,
    negative: Option<&PromptEmbeds>,
    start: Start,
    progress: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let prompts = StepPrompts::fixed(positive, negative);
    denoise_prompts(unet, scheduler, req, &prompts, start, progress)
}

/// [`denoise_from`] with prompts that may change between UNet evaluations and have several
/// weighted parts (A1111's prompt editing and `AND`, see [`StepPrompts`]). Evaluations count
/// from the run's first: from 0 for text to image and image to image (A1111 counts an img2img
/// run's own steps), from the schedule's start for [`Start::Latents`] (a refiner continues the
/// base model's count).
pub fn denoise_prompts(
    unet: &UNet2DConditionModel,
    scheduler: &SchedulerConfig,
    req: &Request,
    prompts: &StepPrompts,
    start: Start,
    mut progress: impl FnMut(usize, usize),
) -> Result<Tensor> {
    prompts.check(req)?;
    let init = start.shape_source();
    if req.width % 8 != 0 || req.height % 8 != 0 || req.width == 0 || req.height == 0 {
        return Err(Error::Config(format!(
            "width and height must be positive multiples of 8, got {}x{}",
            req.width, req.height
        )));
    }
    let inpaint = match start {
        Start::Image { inpaint, .. } => inpaint,
        Start::Noise(_) | Start::Latents { .. } => None,
    };
    let (_, c, lh, lw) = init.dims4()?;
    // An inpainting UNet takes the latents, the mask and the masked picture's latents.
    let unet_in = unet.config.in_channels;
    let condition = inpaint.and_then(|p| p.masked.map(|m| (p.mask, m)));
    let latent_c = match condition {
        Some(_) => unet_in.checked_sub(5).filter(|c| 2 * c + 1 == unet_in),
        None => Some(unet_in),
    };
    if condition.is_none() && unet_in == 9 {
        return Err(Error::Config(
            "this UNet takes 9 input channels (an inpainting model): it needs a picture and a \
             mask (--image and --mask)"
                .into(),
        ));
    }
    let Some(latent_c) = latent_c else {
        return Err(Error::Config(format!(
            "an inpainting UNet takes latents, mask and masked-picture latents (2C + 1 input \
             channels); this one takes {unet_in}"
        )));
    };
    if (c, lh * 8, lw * 8) != (latent_c, req.height, req.width) {
        return Err(Error::bad_shape(
            "generate",
            format!(
                "initial latents must be (B, {latent_c}, {}, {}) for {}x{}",
                req.height / 8,
                req.width / 8,
                req.width,
                req.height
            ),
            init.dims(),
        ));
    }
    if let Some(p) = inpaint {
        let want = [1, 1, lh, lw];
        let masked_ok = p.masked.is_none_or(|m| m.dims() == init.dims());
        if p.mask.dims() != want || !masked_ok {
            return Err(Error::bad_shape(
                "inpaint",
                format!(
                    "a mask (1, 1, {lh}, {lw}) and masked-picture latents shaped like {:?}",
                    init.dims()
                ),
                p.mask.dims(),
            ));
        }
    }
    let mut sampler = build_sampler(scheduler, req)?;
    let device = init.device();
    let image_pipeline = !matches!(start, Start::Noise(_));
    let rows = prompts.rows();
    let n = sampler.timesteps().len();
    let (first, mut x) = match start {
        Start::Latents {
            latents,
            denoising_start,
        } => {
            let cut = cutoff_timestep("denoising_start", denoising_start, scheduler)?;
            let mut k = sampler.timesteps().iter().filter(|&&t| t < cut).count();
            if sampler.order() == 2 && k % 2 == 0 {
                k += 1;
            }
            if k == 0 || k > n {
                return Err(Error::Config(format!(
                    "denoising_start {denoising_start} leaves no step of {} to run",
                    req.steps
                )));
            }
            (n - k, latents.to_dtype(DType::F32)?)
        }
        Start::Noise(init) => (
            0,
            init.to_dtype(DType::F32)?
                .scale(sampler.init_noise_sigma())?,
        ),
        Start::Image {
            latents,
            noise,
            strength,
            inpaint,
        } => {
            if inpaint.is_some() && strength == 1.0 {
                // Inpainting at full strength starts from the noise alone.
                let x = noise.to_dtype(DType::F32)?.to_device(device)?;
                (0, x.scale(sampler.init_noise_sigma())?)
            } else {
                img2img_start(sampler.as_ref(), req, latents, noise, strength)?
            }
        }
    };
    // x: (1, C, h, w). The kept region of a 4-channel inpainting run: the picture's latents,
    // the noise and the mask.
    let blend = match (start, inpaint) {
        (Start::Image { latents, noise, .. }, Some(Inpaint { mask, masked: None })) => Some((
            latents.to_dtype(DType::F32)?,
            noise.to_dtype(DType::F32)?.to_device(device)?,
            mask.to_dtype(DType::F32)?,
        )),
        _ => None,
    };
    // The inpainting UNet's extra channels, repeated over the guidance batch.
    let extra = match condition {
        Some((mask, masked)) => {
            let e = Tensor::cat(
                &[mask.to_dtype(DType::F32)?, masked.to_dtype(DType::F32)?],
                1,
            )?; // (1, 1 + C, h, w)
            Some(Tensor::cat(&vec![e; rows], 0)?)
        }
        None => None,
    };
    // denoising_end: the steps whose timesteps are at or above the cut.
    let last = match req.denoising_end {
        Some(end) => {
            let cut = cutoff_timestep("denoising_end", end, scheduler)?;
            let run = sampler.timesteps()[first..]
                .iter()
                .filter(|&&t| t >= cut)
                .count();
            if run == 0 {
                return Err(Error::Config(format!(
                    "denoising_end {end} stops before the first of {} steps",
                    req.steps
                )));
            }
            first + run
        }
        None => n,
    };
    // Evaluations count from the run's first, or from the schedule's start for a refiner.
    let offset = match start {
        Start::Image { .. } => first,
        Start::Noise(_) | Start::Latents { .. } => 0,
    };
    let mut current: Option<(Vec<usize>, Conditioning)> = None;
    for i in first..last {
        let sel = prompts.selection(i - offset);
        if current.as_ref().is_none_or(|(s, _)| *s != sel) {
            let c = Conditioning::new(prompts, &sel, unet, req, image_pipeline, device)?;
            current = Some((sel, c));
        }
        let (_, conditioning) = current.as_ref().expect("built above");
        let t = Tensor::scalar(sampler.timesteps()[i], DType::F32, device)?;
        let x_in = x.scale(sampler.input_scale(i))?;
        let x_in = if rows > 1 {
            Tensor::cat(&vec![x_in; rows], 0)?
        } else {
            x_in
        }; // (B, 4, h, w)
        let x_in = match &extra {
            Some(e) => Tensor::cat(&[x_in, e.clone()], 1)?, // (B, 2C + 1, h, w)
            None => x_in,
        };
        let eps = conditioning.eval(unet, &x_in, &t)?.to_dtype(DType::F32)?;
        let eps = prompts.guide(&eps, req)?;
        x = sampler.step(i, &x, &eps)?;
        if let Some((latents, noise, mask)) = &blend {
            // diffusers: (1 - mask) proper + mask x, with the picture noised to the next step's
            // level (none after the last).
            let proper = if i + 1 < n {
                sampler.add_noise(i + 1, latents, noise)?
            } else {
                latents.clone()
            };
            x = proper.mul(&mask.affine(-1.0, 1.0)?)?.add(&x.mul(mask)?)?;
        }
        progress(i + 1 - first, last - first);
    }
    Ok(x)
}
