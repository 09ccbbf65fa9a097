//! CLIP architecture configs as plain data, read from transformers' `config.json` files: a
//! `CLIPTextConfig` (SDXL's `text_encoder/` and `text_encoder_2/`), a `CLIPVisionConfig`, and a
//! `CLIPConfig` that nests both (`clip/config.json`). Missing keys take transformers' defaults,
//! which are the ViT-B/32 sizes (SDXL.md 7.1).

use crate::{Error, Result, Tensor};
use serde_json::Value;
use std::path::Path;

/// The MLP activation named by `hidden_act`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP, SDXL's first text encoder.
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP bigG, SDXL's second text encoder.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Activation> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => Err(Error::Config(format!(
                "hidden_act {other:?} is not supported (quick_gelu, gelu, gelu_new)"
            ))),
        }
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x.quick_gelu(),
            Activation::Gelu => x.gelu(),
            Activation::GeluTanh => x.gelu_tanh(),
        }
    }
}

/// The transformer stack shared by both towers.
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl EncoderConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn validate(&self, what: &str) -> Result<()> {
        let c = self;
        if c.hidden_size == 0 || c.intermediate_size == 0 || c.num_hidden_layers == 0 {
            return Err(Error::Config(format!(
                "{what}: hidden_size, intermediate_size and num_hidden_layers must be positive"
            )));
        }
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            return Err(Error::Config(format!(
                "{what}: hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        if c.layer_norm_eps.is_nan() || c.layer_norm_eps <= 0.0 {
            return Err(Error::Config(format!(
                "{what}: layer_norm_eps must be positive"
            )));
        }
        Ok(())
    }
}

/// `CLIPTextConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub encoder: EncoderConfig,
    /// Width of `text_projection` in `CLIPTextModelWithProjection` (a `CLIPModel` uses its own
    /// top-level `projection_dim` instead).
    pub projection_dim: usize,
    /// Decides the pooling rule (`tokenizer::eos_position`): 2 means legacy argmax.
    pub eos_token_id: u32,
}

/// `CLIPVisionConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub encoder: EncoderConfig,
}

impl ClipVisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Positions: one per patch plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// `CLIPConfig`: both towers and the shared embedding width.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
}

/// Reads typed fields with a default, failing (instead of defaulting) on a wrong JSON type.
struct Fields<'a> {
    json: &'a Value,
    what: &'a str,
}

impl Fields<'_> {
    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                Error::Config(format!(
                    "{}: `{key}` = {v} is not an unsigned integer",
                    self.what
                ))
            }),
        }
    }
    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::Config(format!("{}: `{key}` = {v} is not a number", self.what))
            }),
        }
    }
    fn str(&self, key: &str, default: &str) -> Result<String> {
        match self.json.get(key) {
            None | Some(Value::Null) => Ok(default.to_string()),
            Some(v) => v.as_str().map(String::from).ok_or_else(|| {
                Error::Config(format!("{}: `{key}` = {v} is not a string", self.what))
            }),
        }
    }

    /// The encoder fields, with transformers' defaults for the given tower.
    fn encoder(&self, hidden: usize, inter: usize, heads: usize) -> Result<EncoderConfig> {
        let c = EncoderConfig {
            hidden_size: self.usize("hidden_size", hidden)?,
            intermediate_size: self.usize("intermediate_size", inter)?,
            num_hidden_layers: self.usize("num_hidden_layers", 12)?,
            num_attention_heads: self.usize("num_attention_heads", heads)?,
            hidden_act: Activation::from_name(&self.str("hidden_act", "quick_gelu")?)?,
            layer_norm_eps: self.f64("layer_norm_eps", 1e-5)?,
        };
        c.validate(self.what)?;
        Ok(c)
    }
}

impl ClipTextConfig {
    pub fn from_json(json: &Value) -> Result<ClipTextConfig> {
        let f = Fields {
            json,
            what: "text config",
        };
        let eos = f.usize("eos_token_id", 49407)?;
        let c = ClipTextConfig {
            vocab_size: f.usize("vocab_size", 49408)?,
            max_position_embeddings: f.usize("max_position_embeddings", 77)?,
            encoder: f.encoder(512, 2048, 8)?,
            projection_dim: f.usize("projection_dim", 512)?,
            eos_token_id: u32::try_from(eos)
                .map_err(|_| Error::Config(format!("text config: eos_token_id {eos} too large")))?,
        };
        if c.vocab_size == 0 || c.max_position_embeddings == 0 || c.projection_dim == 0 {
            return Err(Error::Config(
                "text config: vocab_size, max_position_embeddings and projection_dim must be positive"
                    .into(),
            ));
        }
        Ok(c)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<ClipTextConfig> {
        ClipTextConfig::from_json(
            &crate::formats::python_json::read_file::<serde_json::Value>(path.as_ref())?,
        )
    }
}

impl ClipVisionConfig {
    pub fn from_json(json: &Value) -> Result<ClipVisionConfig> {
        let f = Fields {
            json,
            what: "vision config",
        };
        let c = ClipVisionConfig {
            image_size: f.usize("image_size", 224)?,
            patch_size: f.usize("patch_size", 32)?,
            num_channels: f.usize("num_channels", 3)?,
            encoder: f.encoder(768, 3072, 12)?,
        };
        if c.patch_size == 0 || c.num_channels == 0 || c.image_size % c.patch_size != 0 {
            return Err(Error::Config(format!(
                "vision config: image_size {} must be a positive multiple of patch_size {}",
                c.image_size, c.patch_size
            )));
        }
        Ok(c)
    }
}

impl ClipConfig {
    pub fn from_json(json: &Value) -> Result<ClipConfig> {
        let f = Fields {
            json,
            what: "clip config",
        };
        let null = Value::Null;
        let c = ClipConfig {
            text: ClipTextConfig::from_json(json.get("text_config").unwrap_or(&null))?,
            vision: ClipVisionConfig::from_json(json.get("vision_config").unwrap_or(&null))?,
            projection_dim: f.usize("projection_dim", 512)?,
        };
        if c.projection_dim == 0 {
            return Err(Error::Config(
                "clip config: projection_dim must be positive".into(),
            ));
        }
        Ok(c)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<ClipConfig> {
        ClipConfig::from_json(
            &crate::formats::python_json::read_file::<serde_json::Value>(path.as_ref())?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_vit_b32_and_bad_values_are_errors() {
        let c = ClipConfig::from_json(&serde_json::json!({})).unwrap();
        assert_eq!(c.text.encoder.hidden_size, 512);
        assert_eq!(c.vision.num_positions(), 50);
        assert_eq!(c.projection_dim, 512);
        let bad = serde_json::json!({"hidden_size": 30, "num_attention_heads": 4});
        assert!(ClipTextConfig::from_json(&bad).is_err());
        let act = serde_json::json!({"hidden_act": "swish"});
        assert!(ClipTextConfig::from_json(&act).is_err());
        let ty = serde_json::json!({"hidden_size": "32"});
        assert!(ClipTextConfig::from_json(&ty).is_err());
    }
}
