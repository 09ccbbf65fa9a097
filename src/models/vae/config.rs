//! The architecture of a diffusers `AutoencoderKL`, read from its `config.json` (SDXL.md 3.1).
//! Only the fields that change the module tree or the numbers are kept (sample_size sets the
//! tile size of tiled decoding and encoding); the rest (force_upcast) are pipeline hints that the
//! model itself never reads. `latents_mean` and
//! `latents_std` are kept: the SDXL pipelines normalise latents with them per channel.

use crate::{Error, Result, Tensor};
use serde::Deserialize;
use std::path::Path;

/// GroupNorm epsilon of every VAE norm (SDXL.md 3.2, pitfall C.3: not the UNet's 1e-5).
pub const VAE_NORM_EPS: f64 = 1e-6;

/// The logvar clamp of diffusers' `DiagonalGaussianDistribution`.
pub const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "unit")]
    pub scaling_factor: f64,
    /// Added after dividing by `scaling_factor` on decode (SD3/Flux); `null` for SDXL.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics (SDXL-architecture models such as Playground v2.5 ship
    /// them; `null` or absent for SDXL base): the pipelines decode `z * std / scaling + mean`
    /// and encode `(z - mean) * scaling / std`, and then ignore `shift_factor`.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// The picture side the VAE was trained at: the tile side of tiled decoding and encoding
    /// ([`super::AutoencoderKL::tiling`]). A `[height, width]` list reads as its first entry, as
    /// diffusers does.
    #[serde(default = "thirty_two", deserialize_with = "side_or_pair")]
    pub sample_size: usize,
}

fn side_or_pair<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Side {
        One(usize),
        Pair(Vec<usize>),
    }
    match Side::deserialize(d)? {
        Side::One(s) => Ok(s),
        Side::Pair(p) => p
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("sample_size is an empty list")),
    }
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn unit() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}

impl VaeConfig {
    /// `latents_mean` and `latents_std` as (1, C, 1, 1) tensors like `like`, when the config has
    /// both (the SDXL pipelines use them only together).
    pub fn latent_stats(&self, like: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let (Some(mean), Some(std)) = (&self.latents_mean, &self.latents_std) else {
            return Ok(None);
        };
        let t = |v: &[f64]| -> Result<Tensor> {
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Tensor::from_vec(v, (1, self.latent_channels, 1, 1), crate::Device::Cpu)?
                .to_dtype(like.dtype())?
                .to_device(like.device())
        };
        Ok(Some((t(mean)?, t(std)?)))
    }

    /// A VAE latent `z` as the UNet sees it: `(z - latents_mean) * scaling_factor / latents_std`
    /// when the config has the statistics, else `(z - shift_factor) * scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        match self.latent_stats(z)? {
            Some((mean, std)) => z.sub(&mean)?.scale(self.scaling_factor)?.div(&std),
            None => z.affine(
                self.scaling_factor,
                -self.shift_factor.unwrap_or(0.0) * self.scaling_factor,
            ),
        }
    }

    /// The SDXL base VAE (HUB `vae/config.json` of stabilityai/stable-diffusion-xl-base-1.0).
    pub fn sdxl() -> VaeConfig {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.13025,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            act_fn: "silu".into(),
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            sample_size: 1024,
        }
    }

    /// Parse and validate a config.json value (as returned by `Weights::from_component`).
    pub fn from_json(value: &serde_json::Value) -> Result<VaeConfig> {
        let cfg: VaeConfig = serde_json::from_value(value.clone())
            .map_err(|e| Error::Config(format!("vae config.json: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<VaeConfig> {
        let path = path.as_ref();
        let value: serde_json::Value = crate::formats::python_json::read_file(path)?;
        VaeConfig::from_json(&value).map_err(|e| Error::file(path, e.to_string()))
    }

    /// Rejects configs this implementation would silently compute wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("vae: {m}")));
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.act_fn != "silu" {
            return bad(format!(
                "act_fn `{}` is not supported (only silu)",
                self.act_fn
            ));
        }
        let kinds_ok = |v: &[String], kind: &str| {
            (v.is_empty() || v.len() == levels) && v.iter().all(|t| t == kind)
        };
        if !kinds_ok(&self.down_block_types, "DownEncoderBlock2D")
            || !kinds_ok(&self.up_block_types, "UpDecoderBlock2D")
        {
            return bad(format!(
                "block types {:?} / {:?}: expected {levels} DownEncoderBlock2D / UpDecoderBlock2D",
                self.down_block_types, self.up_block_types
            ));
        }
        let g = self.norm_num_groups;
        if g == 0
            || self
                .block_out_channels
                .iter()
                .any(|&c| c == 0 || c % g != 0)
        {
            return bad(format!(
                "norm_num_groups {g} does not divide every block_out_channels {:?}",
                self.block_out_channels
            ));
        }
        if [
            self.in_channels,
            self.out_channels,
            self.latent_channels,
            self.layers_per_block,
        ]
        .contains(&0)
        {
            return bad("zero channels or layers".into());
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return bad(format!("scaling_factor {}", self.scaling_factor));
        }
        for (name, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(v) = v {
                if v.len() != self.latent_channels || v.iter().any(|x| !x.is_finite()) {
                    return bad(format!(
                        "{name} must hold {} finite values (latent_channels), got {v:?}",
                        self.latent_channels
                    ));
                }
            }
        }
        if self.latents_std.as_ref().is_some_and(|s| s.contains(&0.0)) {
            return bad("latents_std has a zero".into());
        }
        Ok(())
    }

    /// Spatial factor between image and latents: one halving per downsampler.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Width of the deepest level, where the mid blocks run.
    pub fn mid_channels(&self) -> usize {
        *self.block_out_channels.last().unwrap_or(&0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tiny_and_full_size_configs() {
        let tiny = crate::test_fixtures::tiny();
        let c = VaeConfig::from_file(tiny.join("sdxl/vae/config.json")).unwrap();
        assert_eq!(c.block_out_channels, vec![16, 16, 32, 32]);
        assert_eq!((c.norm_num_groups, c.shift_factor), (8, None));
        assert_eq!(c.downscale_factor(), 8);
        let full = VaeConfig::from_file(tiny.join("sdxl_base_configs/vae/config.json")).unwrap();
        assert_eq!(full, VaeConfig::sdxl());
    }

    #[test]
    fn rejects_groups_that_do_not_divide() {
        let mut c = VaeConfig::sdxl();
        c.norm_num_groups = 24;
        assert!(c.validate().is_err());
    }
}
