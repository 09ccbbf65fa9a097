//! Preview pictures during training (`--sample-every` or `--sample-at-first` with
//! `--sample-prompt` or a kohya sample-prompt file, see `train::sample_prompts`): each prompt
//! through the live adapters with its sampler (Euler on the model's sigmas unless
//! `--sample-sampler` or the prompt names another), from a fixed seed, so previews of the same
//! prompt compare across steps. A preview is the picture `kstyle generate` makes from the
//! checkpoint of that step with the same settings, the stochastic samplers' step noise included.

use super::examples::ExampleText;
use super::text::caption_ids;
use super::trainer::Trainer;
use crate::sample::pipeline::{denoise, PromptEmbeds, Request};
use crate::tensor::Rng;
use crate::{DType, Error, Result, Tensor};
use std::path::PathBuf;

pub use super::sample_prompts::{parse_prompt_file, SamplePrompt};

/// What `kstyle generate` is asked for to make this preview.
fn request(p: &SamplePrompt) -> Request {
    Request {
        prompt: p.prompt.clone(),
        negative: p.negative.clone(),
        steps: p.steps,
        guidance: p.guidance,
        guidance_rescale: 0.0,
        width: p.width,
        height: p.height,
        sampler: p.sampler,
        noise: crate::sample::Noise::for_seed(p.seed),
        denoising_end: None,
        micro: Default::default(),
    }
}

impl Trainer {
    /// Refuses, before the first step, a preview whose sampler the model cannot run (`auto`
    /// on a scheduler kstyle lacks, a sampler EDM models do not have), naming the prompt.
    pub(super) fn check_previews(&self) -> Result<()> {
        if self.cfg.sample_prompts.is_empty() {
            return Ok(());
        }
        let scheduler = self.files.scheduler()?;
        for (i, p) in self.cfg.sample_prompts.iter().enumerate() {
            crate::sample::sampler_kind::build_sampler(&scheduler, &request(p))
                .map_err(|e| Error::Config(format!("preview {} (`{}`): {e}", i + 1, p.prompt)))?;
        }
        Ok(())
    }

    /// Every preview with the live adapters, written as `<stem>.samples/stepNNNNNN.png` (one
    /// prompt) or `stepNNNNNN_II.png` (prompt II of several).
    pub fn sample(&self) -> Result<Vec<PathBuf>> {
        let prompts = &self.cfg.sample_prompts;
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let mut vae = self.files.vae(self.cfg.device)?;
        vae.tiling = self.cfg.vae_tiling;
        std::fs::create_dir_all(&self.outputs.samples)
            .map_err(|e| Error::io(&self.outputs.samples, e))?;
        let mut written = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (embeds, negative) = self.preview_embeds(i, p)?;
            let req = request(p);
            let init = Tensor::randn(
                (1, self.unet.config.in_channels, p.height / 8, p.width / 8),
                &mut Rng::new(p.seed),
                DType::F32,
                self.cfg.device,
            )?;
            let image = crate::autograd::no_grad(|| -> Result<Tensor> {
                let lat = denoise(
                    &self.unet,
                    &self.files.scheduler()?,
                    &req,
                    &embeds,
                    Some(&negative),
                    &init,
                    |_, _| {},
                )?;
                vae.decode_scaled(&lat)?
                    .affine(0.5, 0.5)?
                    .clamp_min(0.0)?
                    .neg()?
                    .clamp_min(-1.0)?
                    .neg()
            })?;
            let name = match prompts.len() {
                1 => format!("step{:06}.png", self.state.step),
                _ => format!("step{:06}_{i:02}.png", self.state.step),
            };
            let path = self.outputs.samples.join(name);
            let (_, c, h, w) = image.dims4()?;
            crate::image::io::save_chw_png(&path, &image.to_vec_f32()?, c, h, w)?;
            written.push(path);
        }
        Ok(written)
    }

    /// Prompt `i`'s embeddings and its negative's (zeros without one): from the cache when the
    /// text encoders are frozen, else encoded by the live ones.
    fn preview_embeds(&self, i: usize, p: &SamplePrompt) -> Result<(PromptEmbeds, PromptEmbeds)> {
        let encode = |text: &str| -> Result<PromptEmbeds> {
            let te = self
                .text_encoders
                .as_ref()
                .ok_or_else(|| Error::msg("a preview prompt has no cached embeddings"))?;
            let (ids_1, ids_2, _) = caption_ids(&self.files, text, 1, false, self.cfg.device)?;
            let (context, pooled) = crate::autograd::no_grad(|| te.encode(&ids_1, &ids_2, None))?;
            Ok(PromptEmbeds {
                context: context.to_dtype(DType::F32)?,
                pooled: pooled.to_dtype(DType::F32)?,
            })
        };
        let cached = |t: &ExampleText| match t {
            ExampleText::Cached { context, pooled } => Some(PromptEmbeds {
                context: context.clone(),
                pooled: pooled.clone(),
            }),
            ExampleText::Tokens { .. } | ExampleText::Caption(_) => None,
        };
        let (prompt, negative) = match self.sample_embeds.get(i) {
            Some((pe, ne)) => (cached(pe), ne.as_ref().and_then(cached)),
            None => (None, None),
        };
        let embeds = match prompt {
            Some(e) => e,
            None => encode(&p.prompt)?,
        };
        let negative = match (&p.negative, negative) {
            (None, _) => PromptEmbeds {
                context: embeds.context.zeros_like()?,
                pooled: embeds.pooled.zeros_like()?,
            },
            (Some(_), Some(e)) => e,
            (Some(n), None) => encode(n)?,
        };
        Ok((embeds, negative))
    }
}
