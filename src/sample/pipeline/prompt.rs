//! The text side of [`SdxlPipeline`]: textual-inversion embeddings, clip skip, and the prompt and
//! negative-prompt embeddings both text encoders give a request.

use super::{Request, SdxlPipeline};
use crate::models::clip::text::{token_ids, ClipTextOutput};
use crate::{Error, Result, Tensor};

/// Per-prompt conditioning: context (B, 77, D1 + D2) and pooled text embeds (B, P).
#[derive(Clone, Debug)]
pub struct PromptEmbeds {
    pub context: Tensor,
    pub pooled: Tensor,
}

impl SdxlPipeline {
    /// Adds a textual-inversion embedding: its `clip_g` rows to text_encoder_2 and, where the
    /// model has a first encoder, its `clip_l` rows to that one, as added tokens named after it
    /// (see [`crate::formats::textual_inversion`]). Prompts may then name it.
    pub fn add_embedding(
        &mut self,
        ti: &crate::formats::textual_inversion::TextualInversion,
    ) -> Result<()> {
        let missing = |key: &str, what: &str| {
            Error::file(
                &ti.path,
                format!("has no `{key}` tensor for {what}, which this model has"),
            )
        };
        let g = ti
            .clip_g
            .as_ref()
            .ok_or_else(|| missing("clip_g", "text_encoder_2"))?;
        let first = match (&self.tokenizer, &self.text_encoder) {
            (Some(_), Some(te)) => {
                let l = ti
                    .clip_l
                    .as_ref()
                    .ok_or_else(|| missing("clip_l", "text_encoder"))?;
                Some((l, te.config().encoder.hidden_size))
            }
            _ => None,
        };
        // Widths are checked before anything is added, so a refusal changes nothing.
        let widths = [
            Some((
                g,
                self.text_encoder_2.config().encoder.hidden_size,
                "clip_g",
            )),
            first.map(|(l, d)| (l, d, "clip_l")),
        ];
        for (rows, d, key) in widths.into_iter().flatten() {
            if rows.dims()[1] != d {
                return Err(Error::file(
                    &ti.path,
                    format!(
                        "`{key}` vectors are {} wide, this model's encoder takes {d}",
                        rows.dims()[1]
                    ),
                ));
            }
        }
        let tokens = ti.tokens();
        if let (Some(tok), Some(te), Some((l, _))) =
            (&mut self.tokenizer, &mut self.text_encoder, first)
        {
            let ids = tok.add_tokens(&tokens)?;
            te.text_model.embeddings.add_token_rows(l, ids[0])?;
        }
        let ids = self.tokenizer_2.add_tokens(&tokens)?;
        self.text_encoder_2
            .text_model
            .embeddings
            .add_token_rows(g, ids[0])?;
        self.embeddings.push(ti.name.clone());
        Ok(())
    }

    /// Takes the per-token context `n` layers before SDXL's penultimate one, from both text
    /// encoders, for the prompt and the negative prompt alike: diffusers' `clip_skip`
    /// (`hidden_states[-(n + 2)]`). The pooled output
    /// stays the last layer's. diffusers 0.42 leaves the negative prompt at the penultimate
    /// layer, so guidance there mixes two layers; kstyle does not copy that. `n` may reach the
    /// embedding output, no further.
    pub fn set_clip_skip(&mut self, n: usize) -> Result<()> {
        let mut layers = vec![self.text_encoder_2.config().encoder.num_hidden_layers];
        if let Some(te) = &self.text_encoder {
            layers.push(te.config().encoder.num_hidden_layers);
        }
        check_clip_skip(n, &layers)?;
        self.clip_skip = n;
        Ok(())
    }

    pub fn clip_skip(&self) -> usize {
        self.clip_skip
    }

    /// What CLIP's 77-token window cuts off the end of `prompt` (after embeddings are spelt out),
    /// as text, or None when it fits: diffusers drops it with a warning, and so do the commands.
    pub fn truncated(&self, prompt: &str) -> Result<Option<String>> {
        // The first tokenizer where there is one: tokenizer_2 pads with "!", an added token that
        // decodes without its word break.
        let tok = self.tokenizer.as_ref().unwrap_or(&self.tokenizer_2);
        tok.cut_off(&tok.expand_added_tokens(prompt)?)
    }

    /// Both encoders on `prompts`: context = concat(TE1 penultimate, TE2 penultimate), or TE2's
    /// alone for a refiner (earlier layers with [`SdxlPipeline::set_clip_skip`]); pooled = TE2's
    /// projected pooled output. Prompts naming a
    /// multi-vector embedding are spelt out first (diffusers' `maybe_convert_prompt`; both
    /// tokenizers hold the same added tokens).
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbeds> {
        let expanded: Vec<String>;
        let prompts = if self.embeddings.is_empty() {
            prompts
        } else {
            expanded = prompts
                .iter()
                .map(|p| self.tokenizer_2.expand_added_tokens(p))
                .collect::<Result<_>>()?;
            &expanded
        };
        let ids2 = token_ids(&self.tokenizer_2.encode_batch(prompts)?, self.device)?; // (B, 77)
        let o2 = self.text_encoder_2.forward(&ids2)?;
        // hidden_states[-(clip_skip + 2)]; set_clip_skip keeps it within the encoders.
        let layer = |o: &ClipTextOutput| -> Result<Tensor> {
            o.from_end(1 + self.clip_skip).cloned().ok_or_else(|| {
                Error::Config(format!(
                    "clip skip {} reaches past the text encoder's embeddings",
                    self.clip_skip
                ))
            })
        };
        let context = match (&self.tokenizer, &self.text_encoder) {
            (Some(tok), Some(te)) => {
                let ids1 = token_ids(&tok.encode_batch(prompts)?, self.device)?; // (B, 77)
                let o1 = te.forward(&ids1)?;
                Tensor::cat(&[layer(&o1)?, layer(&o2)?], 2)? // (B, 77, D1 + D2)
            }
            _ => layer(&o2)?, // (B, 77, D2)
        };
        let pooled = o2
            .text_embeds
            .ok_or_else(|| Error::Config("text_encoder_2 has no text projection".into()))?; // (B, P)
        Ok(PromptEmbeds { context, pooled })
    }

    /// The prompt's embeddings, and the negative's when `req` guides (guidance above 1).
    pub fn request_embeds(&self, req: &Request) -> Result<(PromptEmbeds, Option<PromptEmbeds>)> {
        let positive = self.encode_prompts(std::slice::from_ref(&req.prompt))?;
        let negative = if req.guidance > 1.0 {
            Some(self.negative_embeds(req, &positive)?)
        } else {
            None
        };
        Ok((positive, negative))
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
}

/// Whether clip skip `n` stays within text encoders of `layers` layers: it may reach their
/// embedding output (`n` = layers - 1), no further.
pub fn check_clip_skip(n: usize, layers: &[usize]) -> Result<()> {
    let most = layers.iter().min().copied().unwrap_or(0).saturating_sub(1);
    if n > most {
        return Err(Error::Config(format!(
            "clip skip {n} reaches past the text encoders' embeddings: they have {layers:?} \
             layers, so at most {most}"
        )));
    }
    Ok(())
}
