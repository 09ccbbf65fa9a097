//! Preview pictures during training (`--sample-every` with `--sample-prompt` or a kohya-style
//! `--sample-prompts` file): each prompt through the live adapters with Euler on the model's
//! sigmas, from a fixed seed, so previews of the same prompt compare across steps. A preview is
//! the picture `kstyle generate` makes from the checkpoint of that step with the same settings.

use super::examples::ExampleText;
use super::text::caption_ids;
use super::trainer::Trainer;
use crate::sample::pipeline::{denoise, PromptEmbeds, Request, SamplerKind, Sigmas};
use crate::tensor::Rng;
use crate::{DType, Error, Result, Tensor};
use std::path::{Path, PathBuf};

/// One preview's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplePrompt {
    pub prompt: String,
    /// None: SDXL's zero negative embeddings, as generate without --negative.
    pub negative: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
}

impl SamplePrompt {
    /// A prompt with the run's defaults: square at `resolution`, guidance 5.
    pub fn new(prompt: &str, resolution: usize, steps: usize, seed: u64) -> SamplePrompt {
        SamplePrompt {
            prompt: prompt.to_string(),
            negative: None,
            width: resolution,
            height: resolution,
            steps,
            guidance: 5.0,
            seed,
        }
    }
}

/// A kohya sample-prompt file: one prompt a line, blank lines and `#` comments skipped, each
/// line's options after ` --`: `n` negative prompt, `w` / `h` size, `s` steps, `l` guidance,
/// `d` seed. Other options (kohya's sampler and scheduler switches) are refused, naming the line.
pub fn parse_prompt_file(path: &Path, defaults: &SamplePrompt) -> Result<Vec<SamplePrompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |m: String| Error::file(path, format!("line {}: {m}", n + 1));
        out.push(parse_line(line, defaults).map_err(at)?);
    }
    if out.is_empty() {
        return Err(Error::file(path, "no prompts (one a line)"));
    }
    Ok(out)
}

fn parse_line(line: &str, defaults: &SamplePrompt) -> std::result::Result<SamplePrompt, String> {
    let mut parts = line.split(" --");
    let mut p = SamplePrompt {
        prompt: parts.next().unwrap_or_default().trim().to_string(),
        ..defaults.clone()
    };
    for part in parts {
        let (key, value) = part.trim().split_once(' ').unwrap_or((part.trim(), ""));
        let value = value.trim();
        let number = |what: &str| -> std::result::Result<f64, String> {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("--{key} takes {what}, got `{value}`"))
        };
        let whole = |what: &str| -> std::result::Result<u64, String> {
            value
                .parse::<u64>()
                .map_err(|_| format!("--{key} takes {what}, got `{value}`"))
        };
        match key.to_ascii_lowercase().as_str() {
            "n" => p.negative = Some(value.to_string()),
            "w" => p.width = whole("a width")? as usize,
            "h" => p.height = whole("a height")? as usize,
            "s" => p.steps = whole("a step count")? as usize,
            "l" => p.guidance = number("a guidance scale")?,
            "d" => p.seed = whole("a seed")?,
            _ => {
                return Err(format!(
                    "unknown option --{key} (previews take --n, --w, --h, --s, --l, --d)"
                ))
            }
        }
    }
    if p.prompt.is_empty() || p.prompt.starts_with("--") {
        return Err("no prompt before the options".into());
    }
    if p.width == 0 || p.height == 0 || p.width % 8 != 0 || p.height % 8 != 0 {
        return Err(format!(
            "the size {}x{} is not a positive multiple of 8",
            p.width, p.height
        ));
    }
    if p.steps == 0 {
        return Err("--s must be at least 1".into());
    }
    Ok(p)
}

impl Trainer {
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
            let req = Request {
                prompt: p.prompt.clone(),
                negative: p.negative.clone(),
                steps: p.steps,
                guidance: p.guidance,
                guidance_rescale: 0.0,
                width: p.width,
                height: p.height,
                sampler: SamplerKind::Euler(Sigmas::Config),
                noise: crate::sample::Noise::default(),
                denoising_end: None,
                micro: Default::default(),
            };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_prompt_lines_parse_with_their_options() {
        let d = SamplePrompt::new("", 1024, 20, 7);
        let p = parse_line(
            "a [v] house at dusk --n blurry, low quality --w 768 --h 1344 --s 28 --l 7.5 --d 42",
            &d,
        )
        .unwrap();
        assert_eq!(
            p,
            SamplePrompt {
                prompt: "a [v] house at dusk".into(),
                negative: Some("blurry, low quality".into()),
                width: 768,
                height: 1344,
                steps: 28,
                guidance: 7.5,
                seed: 42,
            }
        );
        assert_eq!(
            parse_line("just a prompt", &d).unwrap(),
            SamplePrompt::new("just a prompt", 1024, 20, 7)
        );
        for (bad, needle) in [
            ("x --w 100", "multiple of 8"),
            ("x --ss euler_a", "unknown option --ss"),
            ("x --l much", "--l takes"),
            ("--w 512", "no prompt"),
            ("x --s 0", "--s"),
        ] {
            let e = parse_line(bad, &d).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
