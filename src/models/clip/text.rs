//! CLIP text tower: transformers' `CLIPTextModel` and `CLIPTextModelWithProjection` (SDXL.md 2.1,
//! 2.2, 7.2). Keys: `text_model.embeddings.{token,position}_embedding.weight`,
//! `text_model.encoder.layers.N.*`, `text_model.final_layer_norm`, and for the projected variant
//! `text_projection.weight` (no bias).
//!
//! SDXL reads three things from it: the penultimate hidden state (input of the last layer, no
//! final LayerNorm) of both encoders, and TE2's pooled, projected embedding taken at the first EOS
//! after the final LayerNorm. All hidden states are returned so that a clip-skip setting can
//! pick another one without another forward pass.

use super::config::ClipTextConfig;
use super::encoder::ClipEncoder;
use super::tokenizer::{eos_position, TokenBatch};
use crate::formats::diffusers::DiffusersFolder;
use crate::nn::lora::{AdaptedLinear, LoraAdapter};
use crate::nn::{LayerNorm, Linear, Weights};
use crate::{DType, Device, Error, Result, Tensor};

/// Token plus learned position embeddings (no scaling).
#[derive(Clone, Debug)]
pub struct ClipTextEmbeddings {
    /// (V, D)
    pub token_embedding: Tensor,
    /// (P, D)
    pub position_embedding: Tensor,
}

impl ClipTextEmbeddings {
    pub fn load(vb: &Weights, c: &ClipTextConfig) -> Result<ClipTextEmbeddings> {
        let d = c.encoder.hidden_size;
        Ok(ClipTextEmbeddings {
            token_embedding: vb.pp("token_embedding").get(&[c.vocab_size, d], "weight")?,
            position_embedding: vb
                .pp("position_embedding")
                .get(&[c.max_position_embeddings, d], "weight")?,
        })
    }

    /// Appends `rows` (n, D) to the token table: the embeddings of ids `V .. V + n` (added
    /// tokens). `first_id` is the id the tokenizer gave the first of them, which must be `V`.
    pub fn add_token_rows(&mut self, rows: &Tensor, first_id: u32) -> Result<()> {
        let (v, d) = self.token_embedding.dims2()?;
        let (_, rd) = rows.dims2()?;
        if rd != d {
            return Err(Error::bad_shape(
                "textual inversion",
                format!("vectors {d} wide, as this text encoder's token embeddings"),
                rows.dims(),
            ));
        }
        if first_id as usize != v {
            return Err(Error::Config(format!(
                "the tokenizer gave the first added token id {first_id}, but the text encoder's \
                 table has {v} rows: tokenizer and text encoder do not belong together"
            )));
        }
        let rows = rows
            .to_dtype(self.token_embedding.dtype())?
            .to_device(self.token_embedding.device())?;
        self.token_embedding = Tensor::cat(&[self.token_embedding.clone(), rows], 0)?;
        Ok(())
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, s) = ids.dims2()?;
        let tok = Tensor::embedding(ids, &self.token_embedding)?; // (B, S, D)
        let pos = self.position_embedding.narrow(0, 0, s)?; // (S, D)
        tok.add(&pos) // (B, S, D)
    }
}

/// What one forward pass yields.
#[derive(Clone, Debug)]
pub struct ClipTextOutput {
    /// Embedding output, then every layer's output: `L + 1` tensors of (B, S, D), as
    /// transformers' `hidden_states`.
    pub hidden_states: Vec<Tensor>,
    /// The last layer's output after `final_layer_norm`: (B, S, D).
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at each row's EOS position: (B, D).
    pub pooled: Tensor,
    /// `text_projection(pooled)`: (B, P), only for the projected variant.
    pub text_embeds: Option<Tensor>,
}

impl ClipTextOutput {
    /// `hidden_states[-2]`: the input of the last layer (SDXL's per-token context).
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len() - 2]
    }

    /// `hidden_states[-(k + 1)]`, so `from_end(1)` is the penultimate state; `None` past the
    /// embedding output.
    pub fn from_end(&self, k: usize) -> Option<&Tensor> {
        let n = self.hidden_states.len();
        (k < n).then(|| &self.hidden_states[n - 1 - k])
    }
}

/// The `text_model.` subtree.
#[derive(Clone, Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipTextEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
    pub config: ClipTextConfig,
}

impl ClipTextTransformer {
    pub fn load(vb: &Weights, c: &ClipTextConfig) -> Result<ClipTextTransformer> {
        Ok(ClipTextTransformer {
            embeddings: ClipTextEmbeddings::load(&vb.pp("embeddings"), c)?,
            encoder: ClipEncoder::load(&vb.pp("encoder"), &c.encoder)?,
            final_layer_norm: LayerNorm::load(
                &vb.pp("final_layer_norm"),
                c.encoder.hidden_size,
                c.encoder.layer_norm_eps,
            )?,
            config: c.clone(),
        })
    }

    /// `ids`: i64 (B, S) with S <= max_position_embeddings. Every row needs an EOS (the pooling
    /// position, [`eos_position`] with this config's `eos_token_id`).
    pub fn forward(&self, ids: &Tensor) -> Result<(Vec<Tensor>, Tensor, Tensor)> {
        let (b, s) = ids.dims2()?;
        if ids.dtype() != DType::I64 || s == 0 || s > self.config.max_position_embeddings {
            return Err(Error::BadShape {
                op: "clip_text",
                msg: format!(
                    "input ids must be i64 (B, S) with 0 < S <= {}, got {:?}",
                    self.config.max_position_embeddings,
                    ids.dtype()
                ),
                shape: ids.shape().clone(),
            });
        }
        let x = self.embeddings.forward(ids)?; // (B, S, D)
        let states = self.encoder.forward_all(&x, true)?;
        let last = self.final_layer_norm.forward(&states[states.len() - 1])?; // (B, S, D)
        let positions = eos_positions(ids, self.config.eos_token_id)?;
        let rows = (0..b)
            .map(|i| last.narrow(0, i, 1)?.narrow(1, positions[i], 1))
            .collect::<Result<Vec<_>>>()?;
        let d = self.config.encoder.hidden_size;
        let pooled = Tensor::cat(&rows, 0)?.reshape((b, d))?; // (B, D)
        Ok((states, last, pooled))
    }
}

/// Per row, the pooling position; an error for a row without EOS, where transformers would
/// silently pool at position 0.
fn eos_positions(ids: &Tensor, eos_token_id: u32) -> Result<Vec<usize>> {
    let (b, s) = ids.dims2()?;
    let v = ids.to_vec_i64()?;
    (0..b)
        .map(|i| {
            let row: Vec<u32> = v[i * s..(i + 1) * s]
                .iter()
                .map(|&t| u32::try_from(t).unwrap_or(u32::MAX))
                .collect();
            eos_position(&row, eos_token_id).ok_or_else(|| Error::BadShape {
                op: "clip_text",
                msg: format!("row {i} has no EOS token (id {eos_token_id}) to pool at"),
                shape: ids.shape().clone(),
            })
        })
        .collect()
}

/// A [`TokenBatch`] as the i64 (B, S) tensor the text towers take.
pub fn token_ids(batch: &TokenBatch, device: Device) -> Result<Tensor> {
    let ids: Vec<i64> = batch.ids.iter().map(|&t| i64::from(t)).collect();
    Tensor::from_vec(ids, (batch.batch, batch.seq_len), device)
}

/// `CLIPTextModel` (no projection) or `CLIPTextModelWithProjection`.
#[derive(Clone, Debug)]
pub struct ClipTextModel {
    pub text_model: ClipTextTransformer,
    /// `text_projection`: (P, D), no bias.
    pub text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// `CLIPTextModel`: keys under `text_model.`.
    pub fn load(vb: &Weights, c: &ClipTextConfig) -> Result<ClipTextModel> {
        Ok(ClipTextModel {
            text_model: ClipTextTransformer::load(&vb.pp("text_model"), c)?,
            text_projection: None,
        })
    }

    /// `CLIPTextModelWithProjection`: also `text_projection.weight` (projection_dim, hidden).
    pub fn load_with_projection(vb: &Weights, c: &ClipTextConfig) -> Result<ClipTextModel> {
        let mut m = ClipTextModel::load(vb, c)?;
        let proj = Linear::load(
            &vb.pp("text_projection"),
            c.encoder.hidden_size,
            c.projection_dim,
            false,
        )?;
        m.text_projection = Some(proj);
        Ok(m)
    }

    /// One text-encoder component of a diffusers folder (`text_encoder`, `text_encoder_2`);
    /// the class in `model_index.json` decides whether the projection is loaded. Fails when the
    /// file holds tensors this config does not use (a layer-count mismatch).
    pub fn from_diffusers(
        folder: &DiffusersFolder,
        name: &str,
        dtype: DType,
        device: Device,
    ) -> Result<ClipTextModel> {
        let (vb, json) = Weights::from_component(folder, name, dtype, device)?;
        let config = ClipTextConfig::from_json(&json)?;
        let class = folder
            .index
            .components
            .get(name)
            .map(|(_, c)| c.as_str())
            .unwrap_or_default();
        let model = match class {
            "CLIPTextModelWithProjection" => ClipTextModel::load_with_projection(&vb, &config)?,
            "CLIPTextModel" => ClipTextModel::load(&vb, &config)?,
            other => {
                return Err(Error::Config(format!(
                    "component `{name}` is a {other:?}, not a CLIP text model"
                )))
            }
        };
        vb.ensure_all_used(|_| false)?;
        Ok(model)
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.text_model.config
    }

    /// The linears a LoRA may wrap, in `named_modules` order, under their module paths
    /// (`text_model.encoder.layers.N.self_attn.q_proj`, ..., `.mlp.fc2`).
    pub fn adapted_linears(&self) -> Vec<(String, &AdaptedLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.text_model.encoder.layers.iter().enumerate() {
            for (name, lin) in layer.linears() {
                out.push((format!("text_model.encoder.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    pub fn adapted_linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear)> {
        let mut out = Vec::new();
        for (i, layer) in self.text_model.encoder.layers.iter_mut().enumerate() {
            for (name, lin) in layer.linears_mut() {
                out.push((format!("text_model.encoder.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// Attaches `make(path, base)`'s adapter to every linear it returns one for (in
    /// `named_modules` order); returns how many. Factors must fit the base weight.
    pub fn attach_adapters(
        &mut self,
        mut make: impl FnMut(&str, &Linear) -> Result<Option<LoraAdapter>>,
    ) -> Result<usize> {
        let mut n = 0;
        for (path, lin) in self.adapted_linears_mut() {
            if let Some(a) = make(&path, &lin.base)? {
                lin.set_adapter(a)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Trainable adapter tensors as `<prefix><module path>.<lora_A|lora_B>`.
    pub fn adapter_parameters(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (path, lin) in self.adapted_linears() {
            if let Some(a) = &lin.adapter {
                out.extend(
                    a.named()
                        .into_iter()
                        .map(|(n, t)| (format!("{prefix}{path}.{n}"), t)),
                );
            }
        }
        out
    }

    /// `ids`: i64 (B, S). See [`ClipTextOutput`].
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let (hidden_states, last_hidden_state, pooled) = self.text_model.forward(ids)?;
        let text_embeds = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?), // (B, P)
            None => None,
        };
        Ok(ClipTextOutput {
            hidden_states,
            last_hidden_state,
            pooled,
            text_embeds,
        })
    }
}
