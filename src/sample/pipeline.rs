//! The SDXL text-to-image pipeline with diffusers' semantics (SDXL.md Appendix A): two text
//! encoders, zero negative embeddings when no negative prompt is given, time ids, classifier-free
//! guidance as one batch [uncond; cond], Euler or DDIM, and an f32 VAE decode.

use super::{Ddim, EulerDiscrete, Sampler, SchedulerConfig};
use crate::formats::adapter::Adapter;
use crate::formats::diffusers::{DiffusersFolder, ModelIndex};
use crate::formats::kohya::ModuleIndex;
use crate::formats::single_file::{self, VaeLayout};
use crate::formats::MappedFile;
use crate::models::clip::config::ClipTextConfig;
use crate::models::clip::text::{token_ids, ClipTextModel};
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::models::unet::lora_merge::KohyaLoraFile;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};
use crate::models::vae::{config::VaeConfig, AutoencoderKL};
use crate::nn::Weights;
use crate::tensor::Rng;
use crate::{DType, Device, Error, Result, Tensor};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    Euler,
    Ddim,
}

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
    pub device: Device,
    /// LoRA files with multipliers: kohya files merge into the weights, kstyle adapter files
    /// attach live (their gates run every step).
    pub loras: Vec<(PathBuf, f64)>,
}

pub struct SdxlPipeline {
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub text_encoder_2: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
    pub force_zeros_for_empty_prompt: bool,
    pub device: Device,
    pub dtype: DType,
    /// The live adapters attached at load (diagnostics and the CLI's summary).
    pub adapters: Vec<PathBuf>,
}

/// Per-prompt conditioning: context (B, 77, D1 + D2) and pooled text embeds (B, P).
#[derive(Clone, Debug)]
pub struct PromptEmbeds {
    pub context: Tensor,
    pub pooled: Tensor,
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    /// `None` with `force_zeros_for_empty_prompt` gives zero negative embeddings.
    pub negative: Option<String>,
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub sampler: SamplerKind,
}

fn load_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.into(),
        msg: e.to_string(),
    })
}

impl SdxlPipeline {
    pub fn load(opts: &LoadOptions) -> Result<SdxlPipeline> {
        let (kohya, adapters): (Vec<_>, Vec<_>) = {
            let mut k = Vec::new();
            let mut a = Vec::new();
            for (p, m) in &opts.loras {
                if Adapter::is_adapter_file(p)? {
                    a.push((p.clone(), *m));
                } else {
                    k.push(KohyaLoraFile::new(p, *m));
                }
            }
            (k, a)
        };
        let mut pipe = if opts.model.is_dir() {
            Self::load_folder(opts, &kohya)?
        } else {
            Self::load_single_file(opts, &kohya)?
        };
        for (path, m) in adapters {
            pipe.attach_adapter(&path, m)?;
        }
        Ok(pipe)
    }

    fn load_folder(opts: &LoadOptions, kohya: &[KohyaLoraFile]) -> Result<SdxlPipeline> {
        let root = &opts.model;
        let folder = DiffusersFolder::open(root)?;
        let te1 = ClipTextModel::from_diffusers(&folder, "text_encoder", opts.dtype, opts.device)?;
        let te2 =
            ClipTextModel::from_diffusers(&folder, "text_encoder_2", opts.dtype, opts.device)?;
        let unet =
            UNet2DConditionModel::from_diffusers(root, kohya, opts.dtype, opts.device)?.model;
        let vae = AutoencoderKL::from_diffusers(&folder, DType::F32, opts.device)?;
        Self::assemble(root, &folder.index, te1, te2, unet, vae, opts)
    }

    fn load_single_file(opts: &LoadOptions, kohya: &[KohyaLoraFile]) -> Result<SdxlPipeline> {
        let config_dir = match &opts.config {
            Some(d) => d.clone(),
            None => {
                crate::models::presets::materialize_sdxl_base(&crate::models::presets::cache_dir())?
            }
        };
        let index = ModelIndex::from_file(config_dir.join("model_index.json"))?;
        let unet_cfg = UNetConfig::from_file(config_dir.join("unet/config.json"))?;
        let vae_cfg = VaeConfig::from_file(config_dir.join("vae/config.json"))?;
        let te1_cfg =
            ClipTextConfig::from_json(&load_json(&config_dir.join("text_encoder/config.json"))?)?;
        let te2_cfg =
            ClipTextConfig::from_json(&load_json(&config_dir.join("text_encoder_2/config.json"))?)?;
        let path = &opts.model;
        let file = MappedFile::open(path)?;
        let split = single_file::convert_file(
            &file,
            &unet_cfg.layout(),
            VaeLayout {
                levels: vae_cfg.block_out_channels.len(),
            },
        )?;
        let vb1 = Weights::from_raw(&split.text_encoder, path.clone(), opts.dtype, opts.device)?;
        let te1 = ClipTextModel::load(&vb1, &te1_cfg)?;
        vb1.ensure_all_used(|_| false)?;
        let vb2 = Weights::from_raw(&split.text_encoder_2, path.clone(), opts.dtype, opts.device)?;
        let te2 = ClipTextModel::load_with_projection(&vb2, &te2_cfg)?;
        vb2.ensure_all_used(|_| false)?;
        let vbv = Weights::from_raw(&split.vae, path.clone(), DType::F32, opts.device)?;
        let vae = AutoencoderKL::load(&vbv, vae_cfg)?;
        vbv.ensure_all_used(|_| false)?;
        drop(split);
        let unet = UNet2DConditionModel::from_single_file(
            path,
            &unet_cfg,
            kohya,
            opts.dtype,
            opts.device,
        )?
        .model;
        Self::assemble(&config_dir, &index, te1, te2, unet, vae, opts)
    }

    fn assemble(
        root: &Path,
        index: &ModelIndex,
        text_encoder: ClipTextModel,
        text_encoder_2: ClipTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        opts: &LoadOptions,
    ) -> Result<SdxlPipeline> {
        let scheduler_path = root.join("scheduler/scheduler_config.json");
        let scheduler = if scheduler_path.exists() {
            SchedulerConfig::from_file(&scheduler_path)?
        } else {
            SchedulerConfig::default()
        };
        let force_zeros = index
            .options
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        Ok(SdxlPipeline {
            tokenizer: ClipTokenizer::from_folder(root.join("tokenizer"))?,
            tokenizer_2: ClipTokenizer::from_folder(root.join("tokenizer_2"))?,
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            scheduler,
            force_zeros_for_empty_prompt: force_zeros,
            device: opts.device,
            dtype: opts.dtype,
            adapters: Vec::new(),
        })
    }

    /// The kohya naming index of this UNet (adapter files, exports).
    pub fn module_index(&self) -> ModuleIndex {
        unet_module_index(&self.unet)
    }

    /// Attach a kstyle adapter file's LoRA modules (live, gates included) scaled by `multiplier`.
    pub fn attach_adapter(&mut self, path: &Path, multiplier: f64) -> Result<()> {
        let adapter = Adapter::load(path, &self.module_index(), self.device)?;
        let mut by_path: std::collections::HashMap<String, crate::nn::lora::LoraAdapter> =
            adapter.modules.into_iter().collect();
        let n = self.unet.attach_adapters(|p, _| {
            Ok(match by_path.remove(p) {
                Some(mut a) => {
                    a.b = a.b.scale(multiplier)?.detach();
                    a.a = a.a.detach();
                    Some(a)
                }
                None => None,
            })
        })?;
        if !by_path.is_empty() || n == 0 {
            return Err(Error::file(
                path,
                format!(
                    "{} adapter modules match no attention projection of this UNet",
                    by_path.len()
                ),
            ));
        }
        self.adapters.push(path.to_path_buf());
        Ok(())
    }

    /// Both encoders on `prompts`: context = concat(TE1 penultimate, TE2 penultimate), pooled =
    /// TE2's projected pooled output.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbeds> {
        let ids1 = token_ids(&self.tokenizer.encode_batch(prompts)?, self.device)?; // (B, 77)
        let ids2 = token_ids(&self.tokenizer_2.encode_batch(prompts)?, self.device)?; // (B, 77)
        let o1 = self.text_encoder.forward(&ids1)?;
        let o2 = self.text_encoder_2.forward(&ids2)?;
        let context = Tensor::cat(&[o1.penultimate().clone(), o2.penultimate().clone()], 2)?; // (B, 77, D1 + D2)
        let pooled = o2
            .text_embeds
            .ok_or_else(|| Error::Config("text_encoder_2 has no text projection".into()))?; // (B, P)
        Ok(PromptEmbeds { context, pooled })
    }

    fn negative_embeds(&self, req: &Request, positive: &PromptEmbeds) -> Result<PromptEmbeds> {
        match &req.negative {
            None if self.force_zeros_for_empty_prompt => Ok(PromptEmbeds {
                context: positive.context.zeros_like()?,
                pooled: positive.pooled.zeros_like()?,
            }),
            neg => self.encode_prompts(&[neg.clone().unwrap_or_default()]),
        }
    }

    /// `[H, W, 0, 0, H, W]`: original size, crop top-left, target size (SDXL.md 1.4).
    pub fn time_ids(&self, width: usize, height: usize) -> Result<Tensor> {
        let (h, w) = (height as f64, width as f64);
        Tensor::from_vec(vec![h, w, 0.0, 0.0, h, w], (1, 6), Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(self.device)
    }

    /// Initial latents (1, 4, H/8, W/8) from a seed (our generator, not torch's: images for a
    /// seed differ from diffusers'; pass `--latents` for bit-exact comparisons).
    pub fn initial_latents(&self, width: usize, height: usize, seed: u64) -> Result<Tensor> {
        let c = self.unet.config.in_channels;
        Tensor::randn(
            (1, c, height / 8, width / 8),
            &mut Rng::new(seed),
            DType::F32,
            self.device,
        )
    }

    /// Run the sampler from unscaled N(0,1) latents to final latents; `progress(i, n)` is called
    /// after every step.
    pub fn denoise(
        &self,
        req: &Request,
        init: &Tensor,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Tensor> {
        if req.width % 8 != 0 || req.height % 8 != 0 || req.width == 0 || req.height == 0 {
            return Err(Error::Config(format!(
                "width and height must be positive multiples of 8, got {}x{}",
                req.width, req.height
            )));
        }
        let (_, c, lh, lw) = init.dims4()?;
        if (c, lh * 8, lw * 8) != (self.unet.config.in_channels, req.height, req.width) {
            return Err(Error::bad_shape(
                "generate",
                format!(
                    "initial latents must be (B, {}, {}, {}) for {}x{}",
                    self.unet.config.in_channels,
                    req.height / 8,
                    req.width / 8,
                    req.width,
                    req.height
                ),
                init.dims(),
            ));
        }
        let sampler: Box<dyn Sampler> = match req.sampler {
            SamplerKind::Euler => Box::new(EulerDiscrete::new(&self.scheduler, req.steps)?),
            SamplerKind::Ddim => Box::new(Ddim::new(&self.scheduler, req.steps)?),
        };
        let positive = self.encode_prompts(std::slice::from_ref(&req.prompt))?;
        let cfg = req.guidance > 1.0;
        let time_ids = self.time_ids(req.width, req.height)?; // (1, 6)
        let (context, pooled, time_ids) = if cfg {
            let negative = self.negative_embeds(req, &positive)?;
            (
                Tensor::cat(&[negative.context, positive.context], 0)?, // (2, 77, Dc)
                Tensor::cat(&[negative.pooled, positive.pooled], 0)?,   // (2, P)
                Tensor::cat(&[time_ids.clone(), time_ids], 0)?,         // (2, 6)
            )
        } else {
            (positive.context, positive.pooled, time_ids)
        };
        let mut x = init
            .to_dtype(DType::F32)?
            .scale(sampler.init_noise_sigma())?; // (1, 4, h, w)
        let n = sampler.timesteps().len();
        for i in 0..n {
            let t = Tensor::scalar(sampler.timesteps()[i], DType::F32, self.device)?;
            let x_in = x.scale(sampler.input_scale(i))?;
            let x_in = if cfg {
                Tensor::cat(&[x_in.clone(), x_in], 0)?
            } else {
                x_in
            }; // (B, 4, h, w)
            let eps = self
                .unet
                .forward(&x_in, &t, &context, &pooled, &time_ids)?
                .to_dtype(DType::F32)?;
            let eps = if cfg {
                let (uncond, cond) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
                uncond.add(&cond.sub(&uncond)?.scale(req.guidance)?)?
            } else {
                eps
            };
            x = sampler.step(i, &x, &eps)?;
            progress(i + 1, n);
        }
        Ok(x)
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
        crate::autograd::no_grad(|| {
            let latents = self.denoise(req, init, progress)?;
            self.decode(&latents)
        })
    }
}

/// The kohya naming index of a UNet's own modules.
pub fn unet_module_index(unet: &UNet2DConditionModel) -> ModuleIndex {
    let shapes = crate::models::unet::param_shapes(&unet.config);
    ModuleIndex::unet(
        shapes.0.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
        &unet.config.layout(),
    )
}
