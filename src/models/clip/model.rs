//! transformers' `CLIPModel` (SDXL.md 7): both towers and their projections, loaded from a HF
//! `clip/` folder (`config.json` with `text_config`/`vision_config`, `model.safetensors` or
//! shards). Top-level keys: `text_model.*`, `vision_model.*`, `text_projection.weight`,
//! `visual_projection.weight`, `logit_scale`.
//!
//! `get_text_features` / `get_image_features` return the projected, *unnormalised* embeddings,
//! as transformers does; similarity metrics normalise them (`crate::eval::metrics`).

use super::config::ClipConfig;
use super::text::ClipTextTransformer;
use super::vision::ClipVisionTransformer;
use crate::formats::diffusers::find_weights;
use crate::formats::WeightFiles;
use crate::nn::{Linear, Weights};
use crate::{DType, Device, Result, Tensor};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct ClipModel {
    pub text_model: ClipTextTransformer,
    pub vision_model: ClipVisionTransformer,
    /// (P, D_text), no bias. Its width is the top-level `projection_dim`, not the one inside
    /// `text_config` (which transformers writes but `CLIPModel` ignores).
    pub text_projection: Linear,
    /// (P, D_vision), no bias.
    pub visual_projection: Linear,
    /// The learned log temperature: `logits = exp(logit_scale) * cos`.
    pub logit_scale: f64,
    pub config: ClipConfig,
}

impl ClipModel {
    pub fn load(vb: &Weights, c: &ClipConfig) -> Result<ClipModel> {
        let p = c.projection_dim;
        Ok(ClipModel {
            text_model: ClipTextTransformer::load(&vb.pp("text_model"), &c.text)?,
            vision_model: ClipVisionTransformer::load(&vb.pp("vision_model"), &c.vision)?,
            text_projection: Linear::load(
                &vb.pp("text_projection"),
                c.text.encoder.hidden_size,
                p,
                false,
            )?,
            visual_projection: Linear::load(
                &vb.pp("visual_projection"),
                c.vision.encoder.hidden_size,
                p,
                false,
            )?,
            logit_scale: vb.get(&[], "logit_scale")?.to_scalar()?,
            config: c.clone(),
        })
    }

    /// A transformers CLIP folder. Fails on tensors the config leaves unused (other than the
    /// `position_ids` buffers older files carry), so a config/weights mismatch cannot load
    /// half a model.
    pub fn from_folder(dir: impl AsRef<Path>, dtype: DType, device: Device) -> Result<ClipModel> {
        let dir = dir.as_ref();
        let config = ClipConfig::from_file(dir.join("config.json"))?;
        let files = WeightFiles::open(find_weights(dir, None)?)?;
        let vb = Weights::from_raw(&files.tensors()?, dir, dtype, device)?;
        let model = ClipModel::load(&vb, &config)?;
        vb.ensure_all_used(|k| k.ends_with("position_ids"))?;
        Ok(model)
    }

    /// Projected text embeddings (B, P) of i64 ids (B, S), pooled at each row's EOS.
    pub fn get_text_features(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, _, pooled) = self.text_model.forward(ids)?; // (B, D_text)
        self.text_projection.forward(&pooled) // (B, P)
    }

    /// Projected image embeddings (B, P) of preprocessed pixels (B, C, H, W).
    pub fn get_image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, pooled) = self.vision_model.forward(pixels)?; // (B, D_vision)
        self.visual_projection.forward(&pooled) // (B, P)
    }
}
