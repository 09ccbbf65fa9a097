//! CLIP ViT vision tower (transformers' `CLIPVisionTransformer`, SDXL.md 7.2): patch
//! convolution without bias, a learned class token and position embedding, `pre_layrnorm` (the
//! checkpoint's spelling), the encoder without a mask, and `post_layernorm` on the class token.
//! Keys under `vision_model.`: `embeddings.{class_embedding, patch_embedding.weight,
//! position_embedding.weight}`, `pre_layrnorm`, `encoder.layers.N.*`, `post_layernorm`.

use super::config::ClipVisionConfig;
use super::encoder::ClipEncoder;
use crate::nn::{LayerNorm, Weights};
use crate::tensor::ConvParams;
use crate::{Error, Result, Tensor};

#[derive(Clone, Debug)]
pub struct ClipVisionEmbeddings {
    /// (D)
    pub class_embedding: Tensor,
    /// (D, C, P, P), no bias
    pub patch_embedding: Tensor,
    /// (N + 1, D)
    pub position_embedding: Tensor,
    pub patch_size: usize,
}

impl ClipVisionEmbeddings {
    pub fn load(vb: &Weights, c: &ClipVisionConfig) -> Result<ClipVisionEmbeddings> {
        let (d, p) = (c.encoder.hidden_size, c.patch_size);
        Ok(ClipVisionEmbeddings {
            class_embedding: vb.get(&[d], "class_embedding")?,
            patch_embedding: vb
                .pp("patch_embedding")
                .get(&[d, c.num_channels, p, p], "weight")?,
            position_embedding: vb
                .pp("position_embedding")
                .get(&[c.num_positions(), d], "weight")?,
            patch_size: p,
        })
    }

    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, _, _, _) = pixels.dims4()?;
        let conv = ConvParams {
            stride: self.patch_size,
            padding: 0,
        };
        let patches = pixels.conv2d(&self.patch_embedding, None, conv)?; // (B, D, G, G)
                                                                         // Row-major over the grid, as PyTorch's flatten(2).transpose(1, 2).
        let patches = patches.flatten(2, 3)?.transpose(1, 2)?; // (B, G*G, D)
        let d = self.class_embedding.dim(0)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as(&(b, 1, d).into())?; // (B, 1, D)
        let x = Tensor::cat(&[cls, patches], 1)?; // (B, N + 1, D)
        x.add(&self.position_embedding) // (B, N + 1, D)
    }
}

/// The `vision_model.` subtree.
#[derive(Clone, Debug)]
pub struct ClipVisionTransformer {
    pub embeddings: ClipVisionEmbeddings,
    pub pre_layrnorm: LayerNorm,
    pub encoder: ClipEncoder,
    pub post_layernorm: LayerNorm,
    pub config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    pub fn load(vb: &Weights, c: &ClipVisionConfig) -> Result<ClipVisionTransformer> {
        let (d, eps) = (c.encoder.hidden_size, c.encoder.layer_norm_eps);
        Ok(ClipVisionTransformer {
            embeddings: ClipVisionEmbeddings::load(&vb.pp("embeddings"), c)?,
            pre_layrnorm: LayerNorm::load(&vb.pp("pre_layrnorm"), d, eps)?,
            encoder: ClipEncoder::load(&vb.pp("encoder"), &c.encoder)?,
            post_layernorm: LayerNorm::load(&vb.pp("post_layernorm"), d, eps)?,
            config: c.clone(),
        })
    }

    /// `pixels`: preprocessed (B, C, H, W) at exactly the configured image size (the position
    /// embedding has one row per patch; transformers would interpolate it, which no CLIP
    /// preprocessing here produces a need for). Returns the last hidden state (B, N + 1, D) and
    /// the pooled class token after `post_layernorm` (B, D).
    pub fn forward(&self, pixels: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = pixels.dims4()?;
        let cfg = &self.config;
        if (c, h, w) != (cfg.num_channels, cfg.image_size, cfg.image_size) {
            return Err(Error::BadShape {
                op: "clip_vision",
                msg: format!(
                    "expected pixel values (B, {}, {s}, {s})",
                    cfg.num_channels,
                    s = cfg.image_size
                ),
                shape: pixels.shape().clone(),
            });
        }
        let x = self.embeddings.forward(pixels)?; // (B, N + 1, D)
        let x = self.pre_layrnorm.forward(&x)?; // (B, N + 1, D)
        let last = self.encoder.forward(&x, false)?; // (B, N + 1, D)
        let d = cfg.encoder.hidden_size;
        let cls = last.narrow(1, 0, 1)?.reshape((b, d))?; // (B, D)
        let pooled = self.post_layernorm.forward(&cls)?; // (B, D)
        Ok((last, pooled))
    }
}
