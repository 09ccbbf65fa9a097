//! The text encoders of a run that trains them (`--train-text-encoder`): which of their linears
//! get a plain LoRA adapter, SDXL's conditioning computed on the tape, and captions as token ids.

use crate::models::clip::text::{token_ids, ClipTextModel};
use crate::models::clip::tokenizer::ClipTokenizer;
use crate::nn::lora::{AdaptedLinear, LoraAdapter};
use crate::sample::model_files::ModelFiles;
use crate::{Device, Error, Result, Tensor};

/// The text-encoder linears that get an adapter: every layer's attention and MLP linears, but
/// for `text_encoder` not its last layer, whose output SDXL never reads (the context is the
/// penultimate state, and only `text_encoder_2` is pooled), so its adapter would get no
/// gradient. `layer` is the index of the layer in a model of `layers`.
pub fn text_encoder_trains(component: &str, layer: usize, layers: usize) -> bool {
    component == "text_encoder_2" || layer + 1 < layers
}

/// The layer index of a text-encoder module path (`text_model.encoder.layers.N.…`).
pub fn text_layer(path: &str) -> Option<usize> {
    path.strip_prefix("text_model.encoder.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// SDXL's conditioning from two text encoders and their token ids (B, 77): the context
/// cat(penultimate states), (B, 77, Dc), and text_encoder_2's projected pooled embedding, (B, P).
/// Ids of n windows of 77 per row (B, n · 77; kohya's `--max_token_length`, see
/// [`crate::models::clip::tokenizer::ClipTokenizer::encode_chunked`]) run as B · n rows; each
/// row's states are then joined as sd-scripts' `SdxlTextEncodingStrategy` joins them: the first
/// window's BOS state, every window's 75 content states, the last window's last state, so the
/// context is (B, 75 n + 2, Dc); the pooled embedding is the first window's.
///
/// With `weights` (kohya's `--weighted_captions`: each tokenizer's (B, 75 n + 2) token weights,
/// see [`weighted_caption_ids`]), each encoder's joined states are multiplied by its weights per
/// token, as sd-scripts' `encode_tokens_with_weights` multiplies them (no rescaling); the pooled
/// embedding is not weighted.
pub(super) fn sdxl_conditioning(
    te1: &ClipTextModel,
    te2: &ClipTextModel,
    ids_1: &Tensor,
    ids_2: &Tensor,
    weights: Option<&(Tensor, Tensor)>,
) -> Result<(Tensor, Tensor)> {
    let window = te2.config().max_position_embeddings;
    let (b, cols) = ids_2.dims2()?;
    let n = cols / window.max(1);
    let weigh = |states: Tensor, w: Option<&Tensor>| -> Result<Tensor> {
        let Some(w) = w else {
            return Ok(states);
        };
        let (b, s) = w.dims2()?;
        states.mul(&w.reshape((b, s, 1))?.to_dtype(states.dtype())?)
    };
    let (w1, w2) = (weights.map(|w| &w.0), weights.map(|w| &w.1));
    if n <= 1 || ids_1.dims2()? != (b, cols) || cols % window != 0 {
        let o1 = te1.forward(ids_1)?;
        let o2 = te2.forward(ids_2)?;
        let context = Tensor::cat(
            &[
                weigh(o1.penultimate().clone(), w1)?,
                weigh(o2.penultimate().clone(), w2)?,
            ],
            2,
        )?; // (B, 77, Dc)
        let pooled = o2
            .text_embeds
            .ok_or_else(|| Error::Config("text_encoder_2 has no projection".into()))?; // (B, P)
        return Ok((context, pooled));
    }
    let o1 = te1.forward(&ids_1.reshape((b * n, window))?)?;
    let o2 = te2.forward(&ids_2.reshape((b * n, window))?)?;
    let join = |states: &Tensor| -> Result<Tensor> {
        let d = states.dims()[2];
        let s = states.reshape((b, n * window, d))?;
        let mut parts = vec![s.narrow(1, 0, 1)?];
        for c in 0..n {
            parts.push(s.narrow(1, c * window + 1, window - 2)?);
        }
        parts.push(s.narrow(1, n * window - 1, 1)?);
        Tensor::cat(&parts, 1) // (B, 75 n + 2, D)
    };
    let context = Tensor::cat(
        &[
            weigh(join(o1.penultimate())?, w1)?,
            weigh(join(o2.penultimate())?, w2)?,
        ],
        2,
    )?;
    let pooled = o2
        .text_embeds
        .ok_or_else(|| Error::Config("text_encoder_2 has no projection".into()))?; // (B n, P)
    let p = pooled.dims()[1];
    let pooled = pooled
        .reshape((b, n, p))?
        .narrow(1, 0, 1)?
        .reshape((b, p))?;
    Ok((context, pooled))
}

/// The two text encoders of a run that trains them, with their adapters.
pub struct TextEncoders {
    pub te1: ClipTextModel,
    pub te2: ClipTextModel,
}

impl TextEncoders {
    /// SDXL's conditioning of token ids (B, 77) each (or (B, 77 n): `sdxl_conditioning`): the
    /// context cat(penultimate states), (B, 77, Dc), and text_encoder_2's projected pooled
    /// embedding, (B, P). On the tape.
    pub fn encode(
        &self,
        ids_1: &Tensor,
        ids_2: &Tensor,
        weights: Option<&(Tensor, Tensor)>,
    ) -> Result<(Tensor, Tensor)> {
        sdxl_conditioning(&self.te1, &self.te2, ids_1, ids_2, weights)
    }

    /// Both encoders' linears with their module paths under `text_encoder.` / `text_encoder_2.`.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear)> {
        let mut out = Vec::new();
        for (prefix, m) in [
            ("text_encoder", &mut self.te1),
            ("text_encoder_2", &mut self.te2),
        ] {
            for (path, lin) in m.adapted_linears_mut() {
                out.push((format!("{prefix}.{path}"), lin));
            }
        }
        out
    }

    /// The adapters as (module path, adapter), in model order.
    pub(super) fn adapters(&self) -> Vec<(String, LoraAdapter)> {
        let mut out = Vec::new();
        for (prefix, m) in [("text_encoder", &self.te1), ("text_encoder_2", &self.te2)] {
            for (path, lin) in m.adapted_linears() {
                if let Some(a) = &lin.adapter {
                    out.push((format!("{prefix}.{path}"), a.clone()));
                }
            }
        }
        out
    }

    /// The adapters' trainable tensors as `text_encoder.<module>.lora_A`, ….
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut p = self.te1.adapter_parameters("text_encoder.");
        p.extend(self.te2.adapter_parameters("text_encoder_2."));
        p
    }
}

/// Token ids (1, 77 · chunks) of `caption` for each tokenizer: as the pipeline pads them (one
/// chunk), or in kohya's `--max_token_length` windows; with `weighted`, kohya's
/// `--weighted_captions` ids and each tokenizer's token weights (see [`weighted_caption_ids`]).
pub(super) fn caption_ids(
    files: &ModelFiles,
    caption: &str,
    chunks: usize,
    weighted: bool,
    device: Device,
) -> Result<CaptionIds> {
    let (tok1, tok2) = files.tokenizers()?;
    let tok1 = tok1.ok_or_else(|| {
        Error::Config("the model has no tokenizer: it cannot train text_encoder".into())
    })?;
    tokenized(&tok1, &tok2, &[caption], chunks, weighted, device)
}

/// Both tokenizers' ids (B, 77 · chunks) of `captions`, and with `weighted` their token weights
/// (B, 75 · chunks + 2).
pub(super) type CaptionIds = (Tensor, Tensor, Option<(Tensor, Tensor)>);

/// [`caption_ids`] for a batch of captions with the tokenizers at hand.
pub(super) fn tokenized(
    tok1: &ClipTokenizer,
    tok2: &ClipTokenizer,
    captions: &[&str],
    chunks: usize,
    weighted: bool,
    device: Device,
) -> Result<CaptionIds> {
    if !weighted {
        let prompts: Vec<&str> = captions.to_vec();
        return Ok((
            token_ids(&tok1.encode_chunked(&prompts, chunks)?, device)?,
            token_ids(&tok2.encode_chunked(&prompts, chunks)?, device)?,
            None,
        ));
    }
    let (ids_1, w1) = weighted_caption_ids(tok1, captions, chunks, device)?;
    let (ids_2, w2) = weighted_caption_ids(tok2, captions, chunks, device)?;
    Ok((ids_1, ids_2, Some((w1, w2))))
}

/// kohya's `--weighted_captions` (sd-scripts' `TokenizeStrategy._get_weighted_input_ids`): each
/// caption's A1111-style weights (`(word:1.2)`, `(word)`, `[word]`; `BREAK` is text) with each
/// run tokenized on its own, the tokens cut at `75 · chunks`, then cut into windows as
/// [`ClipTokenizer::windows`] cuts them: ids (B, 77 · chunks), and the weight of every state of
/// the joined context (B, 75 · chunks + 2): 1 for BOS and the last state and for the padding.
pub fn weighted_caption_ids(
    tok: &ClipTokenizer,
    captions: &[&str],
    chunks: usize,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let limit = 75 * chunks.max(1);
    let mut contents = Vec::with_capacity(captions.len());
    let mut weights = Vec::with_capacity(captions.len() * (limit + 2));
    for caption in captions {
        let mut ids = Vec::new();
        let mut w = Vec::new();
        for f in crate::sample::prompt_syntax::parse_attention_kohya(caption)? {
            let t = tok.content_ids(&f.text)?;
            w.extend(std::iter::repeat_n(f.weight as f32, t.len()));
            ids.extend(t);
        }
        ids.truncate(limit);
        w.truncate(limit);
        weights.push(1.0f32);
        weights.extend_from_slice(&w);
        weights.resize(weights.len() + limit + 1 - w.len(), 1.0);
        contents.push(ids);
    }
    let b = captions.len();
    Ok((
        token_ids(&tok.windows(&contents, chunks)?, device)?,
        Tensor::from_vec(weights, (b, limit + 2), device)?,
    ))
}
