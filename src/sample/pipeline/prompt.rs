//! The text side of [`SdxlPipeline`]: textual-inversion embeddings, clip skip, and the prompt and
//! negative-prompt embeddings both text encoders give a request.

use std::collections::HashMap;

use super::{Request, Schedule, SdxlPipeline, StepPrompts};
use crate::models::clip::text::{token_ids, ClipTextModel, ClipTextOutput};
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::sample::prompt_syntax::{
    self, comfy, editing, Chunk, Emphasis, PromptStyle, CHUNK_TOKENS,
};
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
    ///
    /// With [`PromptStyle::A1111`] or [`PromptStyle::Comfy`] the prompts are read as A1111 or
    /// ComfyUI reads them instead (see [`crate::sample::prompt_syntax`]): context
    /// (B, 77 n, D1 + D2) for prompts of n chunks each.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<PromptEmbeds> {
        if self.prompt_style != PromptStyle::Diffusers {
            let each = prompts
                .iter()
                .map(|p| self.encode_chunked(p))
                .collect::<Result<Vec<_>>>()?;
            return join_prompts(each);
        }
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
        let layer = |o: &ClipTextOutput| self.context_layer(o);
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

    /// Selects how prompts are read: diffusers' way (the default) or A1111's.
    pub fn set_prompt_style(&mut self, style: PromptStyle) {
        self.prompt_style = style;
    }

    pub fn prompt_style(&self) -> PromptStyle {
        self.prompt_style
    }

    /// One prompt A1111's or ComfyUI's way: its chunks through each encoder (the first
    /// tokenizer's and tokenizer_2's chunks must pair up, as both join the two encoders' states
    /// per token), the weights applied per chunk, the chunks joined along the sequence; pooled
    /// from text_encoder_2's first chunk.
    fn encode_chunked(&self, prompt: &str) -> Result<PromptEmbeds> {
        let style = self.prompt_style;
        let (fragments, backtrack, emphasis) = match style {
            PromptStyle::A1111 {
                emphasis,
                comma_backtrack,
            } => {
                let expanded = self.tokenizer_2.expand_added_tokens(prompt)?;
                let f = prompt_syntax::fragments(&expanded, emphasis)?;
                (f, comma_backtrack, emphasis)
            }
            _ => (comfy::parse(prompt), 0, Emphasis::Original),
        };
        let mut unknown = Vec::new();
        // (chunks, per-token states (n, 77, D), the empty prompt's states (1, 77, D) for
        // ComfyUI's weights, the encoder output).
        let mut encode = |tok: &ClipTokenizer, te: &ClipTextModel| -> Result<Encoded> {
            let chunks = match style {
                PromptStyle::Comfy => {
                    let runs = tok.embedding_runs(&self.embeddings);
                    let named: Vec<comfy::NamedRun> = self
                        .embeddings
                        .iter()
                        .zip(runs)
                        .map(|(name, (first, vectors))| comfy::NamedRun {
                            name,
                            first,
                            vectors,
                        })
                        .collect();
                    comfy::chunks(tok, &fragments, &named, &mut unknown)?
                }
                _ => {
                    let runs = tok.embedding_runs(&self.embeddings);
                    prompt_syntax::chunks(tok, &fragments, backtrack, &runs)?
                }
            };
            let weighted = chunks
                .iter()
                .any(|c| c.multipliers.iter().any(|&m| m != 1.0));
            let mut rows: Vec<&Chunk> = chunks.iter().collect();
            let empty = comfy::empty_chunk(tok);
            let with_empty = style == PromptStyle::Comfy && weighted;
            if with_empty {
                rows.push(&empty);
            }
            let ids: Vec<i64> = rows
                .iter()
                .flat_map(|c| c.ids.iter().map(|&t| i64::from(t)))
                .collect();
            let ids = Tensor::from_vec(ids, (rows.len(), CHUNK_TOKENS + 2), self.device)?;
            let out = te.forward(&ids)?;
            let z = self.context_layer(&out)?;
            let n = chunks.len();
            let empty = with_empty.then(|| z.narrow(0, n, 1)).transpose()?;
            Ok(Encoded {
                states: z.narrow(0, 0, n)?,
                chunks,
                empty,
                out,
            })
        };
        let e2 = encode(&self.tokenizer_2, &self.text_encoder_2)?;
        let e1 = match (&self.tokenizer, &self.text_encoder) {
            (Some(tok), Some(te)) => Some(encode(tok, te)?),
            _ => None,
        };
        if !unknown.is_empty() {
            eprintln!(
                "warning: no loaded embedding is called {}; left out of the prompt, as ComfyUI \
                 leaves it out (load one with --embedding FILE[:NAME])",
                unknown.join(", ")
            );
        }
        let n = e2.chunks.len();
        let states = |e: &Encoded| -> Result<Tensor> {
            let z = match &e.empty {
                Some(empty) => comfy_weights(&e.states, empty, &e.chunks)?,
                None if style == PromptStyle::Comfy => e.states.clone(),
                None => emphasize(&e.states, &e.chunks, emphasis)?,
            };
            let d = z.dims3()?.2;
            z.reshape((1, n * (CHUNK_TOKENS + 2), d))
        };
        let context_2 = states(&e2)?;
        let context = match &e1 {
            Some(e1) => {
                if e1.chunks.len() != n {
                    return Err(Error::Config(format!(
                        "prompt {prompt:?}: the two tokenizers cut it into {} and {n} chunks of \
                         {CHUNK_TOKENS} tokens; their states cannot be joined",
                        e1.chunks.len()
                    )));
                }
                Tensor::cat(&[states(e1)?, context_2], 2)? // (1, 77 n, D1 + D2)
            }
            None => context_2,
        };
        let pooled = e2
            .out
            .text_embeds
            .ok_or_else(|| Error::Config("text_encoder_2 has no text projection".into()))?
            .narrow(0, 0, 1)?; // (1, P)
        Ok(PromptEmbeds { context, pooled })
    }

    /// The per-token context layer of one encoder output: `hidden_states[-(clip_skip + 2)]`.
    fn context_layer(&self, o: &ClipTextOutput) -> Result<Tensor> {
        o.from_end(1 + self.clip_skip).cloned().ok_or_else(|| {
            Error::Config(format!(
                "clip skip {} reaches past the text encoder's embeddings",
                self.clip_skip
            ))
        })
    }

    /// The prompt's and the negative's embeddings over the UNet evaluations of `req`'s run. Read
    /// A1111's way ([`PromptStyle::A1111`]), the prompt is split at `AND` into weighted parts
    /// and each part and the negative are scheduled over the sampler's evaluations (`steps`, twice
    /// that for second-order samplers: A1111's `total_steps`), each distinct text encoded once;
    /// the negative is then also encoded where the prompt has weighted parts (A1111 guides
    /// against it whatever the scale). Read any other way, as [`SdxlPipeline::request_embeds`].
    pub fn request_prompts(&self, req: &Request) -> Result<StepPrompts> {
        if !matches!(self.prompt_style, PromptStyle::A1111 { .. }) {
            let (positive, negative) = self.request_embeds(req)?;
            return Ok(StepPrompts::fixed(&positive, negative.as_ref()));
        }
        let steps = req.steps * super::build_sampler(&self.scheduler, req)?.order();
        let mut encoded: HashMap<String, PromptEmbeds> = HashMap::new();
        let mut scheduled = |text: &str| -> Result<Schedule> {
            let entries = editing::schedule(text, steps)?
                .into_iter()
                .map(|(end, text)| {
                    if let Some(e) = encoded.get(&text) {
                        return Ok((end, e.clone()));
                    }
                    let e = self.encode_prompts(std::slice::from_ref(&text))?;
                    encoded.insert(text, e.clone());
                    Ok((end, e))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Schedule(entries))
        };
        let parts = editing::composable(&req.prompt)
            .into_iter()
            .map(|p| Ok((p.weight, scheduled(&p.text)?)))
            .collect::<Result<Vec<_>>>()?;
        let plain = matches!(parts.as_slice(), [(w, _)] if *w == 1.0);
        if req.guidance <= 1.0 && plain {
            return Ok(StepPrompts {
                parts,
                negative: None,
            });
        }
        let negative = match &req.negative {
            None if self.force_zeros_for_empty_prompt => {
                let first = &parts[0].1 .0[0].1;
                Schedule::fixed(PromptEmbeds {
                    context: first.context.zeros_like()?,
                    pooled: first.pooled.zeros_like()?,
                })
            }
            neg => scheduled(neg.as_deref().unwrap_or_default())?,
        };
        Ok(StepPrompts {
            parts,
            negative: Some(negative),
        })
    }

    /// The prompt's embeddings, and the negative's when `req` guides (guidance above 1), each
    /// encoded whole: no prompt editing or `AND` (see [`SdxlPipeline::request_prompts`]).
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

/// A1111's emphasis on one encoder's chunk states `z` (n, 77, D): each chunk times its weights
/// per token and, for [`Emphasis::Original`], rescaled to the chunk's mean before.
fn emphasize(z: &Tensor, chunks: &[Chunk], emphasis: Emphasis) -> Result<Tensor> {
    if matches!(emphasis, Emphasis::Ignore | Emphasis::None) {
        return Ok(z.clone());
    }
    let rows = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let zi = z.narrow(0, i, 1)?; // (1, 77, D)
            let m = Tensor::from_vec(
                c.multipliers.clone(),
                (1, c.multipliers.len(), 1),
                z.device(),
            )?
            .to_dtype(z.dtype())?;
            let weighted = zi.mul(&m)?;
            if emphasis != Emphasis::Original {
                return Ok(weighted);
            }
            let before = zi.mean_all()?.to_scalar()?;
            let after = weighted.mean_all()?.to_scalar()?;
            weighted.scale(before / after)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&rows, 0)
}

/// One encoder's pass over a prompt's chunks.
struct Encoded {
    chunks: Vec<Chunk>,
    /// The context layer's states of the chunks: (n, 77, D).
    states: Tensor,
    /// ComfyUI's weights: the empty prompt's states (1, 77, D), encoded with the chunks.
    empty: Option<Tensor>,
    out: ClipTextOutput,
}

/// ComfyUI's weights on one encoder's chunk states `z` (n, 77, D): where a token's weight w is
/// not 1 its state becomes `empty + (z - empty) w`, with the empty prompt's state at the same
/// position; the other states are kept bit for bit.
fn comfy_weights(z: &Tensor, empty: &Tensor, chunks: &[Chunk]) -> Result<Tensor> {
    let (n, s, _) = z.dims3()?;
    let w: Vec<f32> = chunks.iter().flat_map(|c| c.multipliers.clone()).collect();
    let mask: Vec<f32> = w.iter().map(|&m| f32::from(m != 1.0)).collect();
    let w = Tensor::from_vec(w, (n, s, 1), z.device())?.to_dtype(z.dtype())?;
    let mask = Tensor::from_vec(mask, (n, s, 1), z.device())?.to_dtype(z.dtype())?;
    let blended = z.sub(empty)?.mul(&w)?.add(empty)?;
    // mask 1: blended * 1 + z * 0; mask 0: blended * 0 + z * 1, exactly z.
    blended.mul(&mask)?.add(&z.mul(&mask.affine(-1.0, 1.0)?)?)
}

/// Per-prompt embeddings (1, 77 n_i, D) as one batch. Prompts of different chunk counts are
/// refused together (A1111 would fill the shorter ones with empty chunks); the pipeline encodes
/// the prompt and the negative prompt each on its own.
fn join_prompts(each: Vec<PromptEmbeds>) -> Result<PromptEmbeds> {
    if each.len() == 1 {
        return Ok(each.into_iter().next().expect("one prompt"));
    }
    let lens: Vec<usize> = each.iter().map(|e| e.context.dims()[1]).collect();
    if lens.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::Config(format!(
            "prompts of different chunk counts (contexts of {lens:?} tokens) cannot share a batch"
        )));
    }
    let contexts: Vec<Tensor> = each.iter().map(|e| e.context.clone()).collect();
    let pooled: Vec<Tensor> = each.iter().map(|e| e.pooled.clone()).collect();
    Ok(PromptEmbeds {
        context: Tensor::cat(&contexts, 0)?,
        pooled: Tensor::cat(&pooled, 0)?,
    })
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
