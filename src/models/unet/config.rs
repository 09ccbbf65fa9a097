//! The UNet architecture as plain data, read from a diffusers `unet/config.json`
//! (`UNet2DConditionModel`, SDXL.md 1.1), plus the per-block sizes that diffusers derives from it
//! in `__init__`. Both loading and the allocation-free parameter count walk [`UNetConfig::plan`],
//! so the two can never disagree about which blocks exist and how wide they are.

use crate::formats::unet_layout::{MidBlock, UnetLayout};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The `text_time` added conditioning (SDXL.md 1.4).
#[derive(Clone, Debug, PartialEq)]
pub struct TextTimeConfig {
    /// Sinusoid width per time id (`addition_time_embed_dim`, 256 for SDXL).
    pub time_embed_dim: usize,
    /// Input width of `add_embedding.linear_1` (pooled text + 6 sinusoids; 2816 for SDXL).
    pub input_dim: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    /// Resnets per down level; up blocks have one more.
    pub layers_per_block: Vec<usize>,
    /// Whether each down block is `CrossAttnDownBlock2D` (else `DownBlock2D`).
    pub down_attn: Vec<bool>,
    /// Whether each up block is `CrossAttnUpBlock2D` (else `UpBlock2D`), lowest resolution first.
    pub up_attn: Vec<bool>,
    /// `UNetMidBlock2DCrossAttn` present (`mid_block_type: null` builds none).
    pub mid_block: bool,
    /// Transformer depth per down level and layer.
    pub down_depth: Vec<Vec<usize>>,
    /// Transformer depth per up block and layer (diffusers' reversed list unless given).
    pub up_depth: Vec<Vec<usize>>,
    pub mid_depth: usize,
    /// Attention heads per down level. diffusers' `attention_head_dim` is really the number of
    /// heads when `num_attention_heads` is null (SDXL.md 1.1); head size = channels / heads.
    pub heads: Vec<usize>,
    pub cross_attention_dim: Vec<usize>,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// Width of `time_embedding` (`block_out_channels[0] * 4` unless given).
    pub time_embed_dim: usize,
    pub text_time: Option<TextTimeConfig>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub resnet_out_scale_factor: f64,
    pub center_input_sample: bool,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Config(format!("unet config: {}", msg.into()))
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn uint(v: &Value, key: &str, default: Option<usize>) -> Result<usize> {
    match get(v, key) {
        Some(x) => x
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| bad(format!("`{key}` must be a non-negative integer, got {x}"))),
        None => default.ok_or_else(|| bad(format!("`{key}` is missing"))),
    }
}

fn float(v: &Value, key: &str, default: f64) -> Result<f64> {
    match get(v, key) {
        Some(x) => x
            .as_f64()
            .ok_or_else(|| bad(format!("`{key}` must be a number, got {x}"))),
        None => Ok(default),
    }
}

fn boolean(v: &Value, key: &str, default: bool) -> Result<bool> {
    match get(v, key) {
        Some(x) => x
            .as_bool()
            .ok_or_else(|| bad(format!("`{key}` must be a boolean, got {x}"))),
        None => Ok(default),
    }
}

fn string<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    get(v, key).and_then(Value::as_str)
}

/// An int or a per-level list of ints (`layers_per_block`, `attention_head_dim`, ...).
fn per_level(v: &Value, key: &str, levels: usize) -> Result<Option<Vec<usize>>> {
    let Some(x) = get(v, key) else {
        return Ok(None);
    };
    if let Some(n) = x.as_u64() {
        return Ok(Some(vec![n as usize; levels]));
    }
    let list: Option<Vec<usize>> = x
        .as_array()
        .and_then(|a| a.iter().map(|e| e.as_u64().map(|n| n as usize)).collect());
    match list {
        Some(l) if l.len() == levels => Ok(Some(l)),
        _ => Err(bad(format!(
            "`{key}` must be an integer or a list of {levels} integers, got {x}"
        ))),
    }
}

/// `transformer_layers_per_block`: an int, a per-level list, or per-level lists per layer.
fn depths(v: &Value, key: &str, layers: &[usize]) -> Result<Option<Vec<Vec<usize>>>> {
    let Some(x) = get(v, key) else {
        return Ok(None);
    };
    let err = || {
        bad(format!(
            "`{key}` must be an integer, a list of {} integers or of per-layer lists, got {x}",
            layers.len()
        ))
    };
    if let Some(n) = x.as_u64() {
        return Ok(Some(layers.iter().map(|&l| vec![n as usize; l]).collect()));
    }
    let items = x
        .as_array()
        .filter(|a| a.len() == layers.len())
        .ok_or_else(err)?;
    items
        .iter()
        .zip(layers)
        .map(|(e, &l)| match (e.as_u64(), e.as_array()) {
            (Some(n), _) => Ok(vec![n as usize; l]),
            (None, Some(a)) if a.len() == l => a
                .iter()
                .map(|d| d.as_u64().map(|n| n as usize).ok_or_else(err))
                .collect(),
            _ => Err(err()),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Options that would change the architecture away from what this port builds; each must be
/// absent, null or at its default.
fn reject_unsupported(v: &Value) -> Result<()> {
    let must_be_null = [
        "class_embed_type",
        "num_class_embeds",
        "encoder_hid_dim",
        "encoder_hid_dim_type",
        "time_cond_proj_dim",
        "time_embedding_act_fn",
        "timestep_post_act",
        "cross_attention_norm",
    ];
    for k in must_be_null {
        if let Some(x) = get(v, k) {
            return Err(bad(format!("`{k}` = {x} is not supported (only null)")));
        }
    }
    let must_be_false = [
        "only_cross_attention",
        "dual_cross_attention",
        "resnet_skip_time_act",
        "class_embeddings_concat",
        "mid_block_only_cross_attention",
    ];
    for k in must_be_false {
        if boolean(v, k, false).map_err(|_| bad(format!("`{k}` must be false")))? {
            return Err(bad(format!("`{k}` = true is not supported")));
        }
    }
    for (k, want) in [
        ("act_fn", "silu"),
        ("time_embedding_type", "positional"),
        ("resnet_time_scale_shift", "default"),
        ("attention_type", "default"),
    ] {
        if let Some(x) = get(v, k).filter(|x| x.as_str() != Some(want)) {
            return Err(bad(format!(
                "`{k}` = {x} is not supported (only \"{want}\")"
            )));
        }
    }
    Ok(())
}

impl UNetConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<UNetConfig> {
        let path = path.as_ref();
        let v: Value = crate::formats::python_json::read_file(path)?;
        UNetConfig::from_json(&v).map_err(|e| Error::file(path, e.to_string()))
    }

    /// Reads a parsed `config.json`, filling diffusers' defaults for absent keys.
    pub fn from_json(v: &Value) -> Result<UNetConfig> {
        reject_unsupported(v)?;
        let block_out_channels: Vec<usize> = get(v, "block_out_channels")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|e| e.as_u64().map(|n| n as usize)).collect())
            .filter(|c: &Vec<usize>| !c.is_empty() && c.iter().all(|&n| n > 0))
            .ok_or_else(|| {
                bad("`block_out_channels` must be a non-empty list of positive integers")
            })?;
        let levels = block_out_channels.len();
        let types = |key: &str, plain: &str, attn: &str| -> Result<Vec<bool>> {
            let list = get(v, key)
                .and_then(Value::as_array)
                .ok_or_else(|| bad(format!("`{key}` is missing")))?;
            if list.len() != levels {
                return Err(bad(format!(
                    "`{key}` has {} entries for {levels} block_out_channels",
                    list.len()
                )));
            }
            list.iter()
                .map(|t| match t.as_str() {
                    Some(s) if s == plain => Ok(false),
                    Some(s) if s == attn => Ok(true),
                    _ => Err(bad(format!("`{key}`: unsupported block type {t}"))),
                })
                .collect()
        };
        let down_attn = types("down_block_types", "DownBlock2D", "CrossAttnDownBlock2D")?;
        let up_attn = types("up_block_types", "UpBlock2D", "CrossAttnUpBlock2D")?;
        let mid_block = match v.get("mid_block_type") {
            None => true,
            Some(Value::Null) => false,
            Some(x) if x.as_str() == Some("UNetMidBlock2DCrossAttn") => true,
            Some(x) => return Err(bad(format!("unsupported mid_block_type {x}"))),
        };
        let layers_per_block = per_level(v, "layers_per_block", levels)?.unwrap_or(vec![2; levels]);
        let down_depth = depths(v, "transformer_layers_per_block", &layers_per_block)?
            .unwrap_or_else(|| layers_per_block.iter().map(|&l| vec![1; l]).collect());
        let up_layers: Vec<usize> = layers_per_block.iter().rev().map(|l| l + 1).collect();
        let nested = get(v, "transformer_layers_per_block")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(Value::is_array));
        let up_depth = match depths(v, "reverse_transformer_layers_per_block", &up_layers)? {
            Some(d) => d,
            // diffusers refuses per-layer depths without an explicit reverse list.
            None if nested => return Err(bad(
                "per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block",
            )),
            None => down_depth
                .iter()
                .rev()
                .zip(&up_layers)
                .map(|(d, &l)| vec![d.first().copied().unwrap_or(1); l])
                .collect(),
        };
        // diffusers hands the mid block the last level's entry; a per-layer list there means
        // its first layer (the mid block has one transformer).
        let mid_depth = match get(v, "transformer_layers_per_block") {
            Some(x) if x.is_array() => down_depth
                .last()
                .and_then(|d| d.first())
                .copied()
                .unwrap_or(1),
            Some(x) => x.as_u64().unwrap_or(1) as usize,
            None => 1,
        };
        let heads = match per_level(v, "num_attention_heads", levels)? {
            Some(h) => h,
            None => per_level(v, "attention_head_dim", levels)?.unwrap_or(vec![8; levels]),
        };
        if heads.contains(&0) {
            return Err(bad("attention heads must be positive"));
        }
        let cross_attention_dim =
            per_level(v, "cross_attention_dim", levels)?.unwrap_or(vec![1280; levels]);
        let text_time = match string(v, "addition_embed_type") {
            None => None,
            Some("text_time") => Some(TextTimeConfig {
                time_embed_dim: uint(v, "addition_time_embed_dim", None)?,
                input_dim: uint(v, "projection_class_embeddings_input_dim", None)?,
            }),
            Some(other) => {
                return Err(bad(format!(
                    "addition_embed_type `{other}` is not supported"
                )))
            }
        };
        let odd_kernel = |key: &str| -> Result<usize> {
            let k = uint(v, key, Some(3))?;
            if k % 2 == 0 {
                return Err(bad(format!("`{key}` must be odd, got {k}")));
            }
            Ok(k)
        };
        let downsample_padding = uint(v, "downsample_padding", Some(1))?;
        if downsample_padding == 0 {
            // diffusers pads asymmetrically (0, 1, 0, 1) in that case; nothing here uses it.
            return Err(bad("downsample_padding 0 is not supported"));
        }
        let cfg = UNetConfig {
            in_channels: uint(v, "in_channels", Some(4))?,
            out_channels: uint(v, "out_channels", Some(4))?,
            time_embed_dim: uint(v, "time_embedding_dim", Some(block_out_channels[0] * 4))?,
            block_out_channels,
            layers_per_block,
            down_attn,
            up_attn,
            mid_block,
            down_depth,
            up_depth,
            mid_depth,
            heads,
            cross_attention_dim,
            use_linear_projection: boolean(v, "use_linear_projection", false)?,
            norm_num_groups: uint(v, "norm_num_groups", Some(32))?,
            norm_eps: float(v, "norm_eps", 1e-5)?,
            flip_sin_to_cos: boolean(v, "flip_sin_to_cos", true)?,
            freq_shift: float(v, "freq_shift", 0.0)?,
            text_time,
            conv_in_kernel: odd_kernel("conv_in_kernel")?,
            conv_out_kernel: odd_kernel("conv_out_kernel")?,
            downsample_padding,
            mid_block_scale_factor: float(v, "mid_block_scale_factor", 1.0)?,
            resnet_out_scale_factor: float(v, "resnet_out_scale_factor", 1.0)?,
            center_input_sample: boolean(v, "center_input_sample", false)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// stabilityai/stable-diffusion-xl-base-1.0 (SDXL.md 1.1), for single files without a config.
    pub fn sdxl_base() -> UNetConfig {
        let v = serde_json::json!({
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": true,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
            "norm_num_groups": 32,
        });
        UNetConfig::from_json(&v).expect("the SDXL preset is a valid config")
    }

    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    fn validate(&self) -> Result<()> {
        let g = self.norm_num_groups;
        if g == 0 || self.block_out_channels.iter().any(|c| c % g != 0) {
            return Err(bad(format!(
                "norm_num_groups {g} must divide every block_out_channels entry {:?}",
                self.block_out_channels
            )));
        }
        if self.time_embed_dim == 0 || self.block_out_channels[0] % 2 != 0 {
            return Err(bad(
                "the timestep sinusoid needs an even block_out_channels[0]",
            ));
        }
        if self.layers_per_block.contains(&0) {
            return Err(bad("layers_per_block must be positive"));
        }
        Ok(())
    }

    /// The key-layout view used by the single-file converter and the kohya index.
    pub fn layout(&self) -> UnetLayout {
        UnetLayout {
            layers_per_block: self.layers_per_block.clone(),
            down_attn: self.down_attn.clone(),
            up_attn: self.up_attn.clone(),
            mid_block: if self.mid_block {
                MidBlock::CrossAttn
            } else {
                MidBlock::Absent
            },
        }
    }

    /// Per-block sizes as diffusers derives them in `UNet2DConditionModel.__init__`.
    pub fn plan(&self) -> Plan {
        let n = self.levels();
        let boc = &self.block_out_channels;
        let attn = |on: bool, depth: &[usize], heads: usize, cross: usize| {
            on.then(|| AttnPlan {
                depths: depth.to_vec(),
                heads,
                cross_dim: cross,
            })
        };
        let mut down = Vec::new();
        let mut out_ch = boc[0];
        for (i, &level_ch) in boc.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = level_ch;
            let layers = self.layers_per_block[i];
            down.push(DownPlan {
                resnets: (0..layers)
                    .map(|j| (if j == 0 { in_ch } else { out_ch }, out_ch))
                    .collect(),
                attn: attn(
                    self.down_attn[i],
                    &self.down_depth[i],
                    self.heads[i],
                    self.cross_attention_dim[i],
                ),
                downsample: i + 1 < n,
            });
        }
        let top = boc[n - 1];
        let mid = self.mid_block.then(|| MidPlan {
            channels: top,
            attn: AttnPlan {
                depths: vec![self.mid_depth],
                heads: self.heads[n - 1],
                cross_dim: self.cross_attention_dim[n - 1],
            },
        });
        let mut up = Vec::new();
        let mut out_ch = top;
        for i in 0..n {
            let level = n - 1 - i;
            let prev_out = out_ch;
            out_ch = boc[level];
            // The last resnet of a block takes the skip saved before this level's resnets.
            let skip_in = boc[level.saturating_sub(1)];
            let layers = self.layers_per_block[level] + 1;
            up.push(UpPlan {
                resnets: (0..layers)
                    .map(|j| {
                        let skip = if j + 1 == layers { skip_in } else { out_ch };
                        let cur = if j == 0 { prev_out } else { out_ch };
                        (cur + skip, out_ch)
                    })
                    .collect(),
                attn: attn(
                    self.up_attn[i],
                    &self.up_depth[i],
                    self.heads[level],
                    self.cross_attention_dim[level],
                ),
                upsample: i + 1 < n,
            });
        }
        Plan { down, mid, up }
    }
}

/// One transformer stack per resnet of a block.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnPlan {
    /// Transformer depth per layer of the block.
    pub depths: Vec<usize>,
    pub heads: usize,
    pub cross_dim: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DownPlan {
    /// (in, out) channels per resnet.
    pub resnets: Vec<(usize, usize)>,
    pub attn: Option<AttnPlan>,
    pub downsample: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MidPlan {
    pub channels: usize,
    pub attn: AttnPlan,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpPlan {
    /// (in = current + skip, out) channels per resnet.
    pub resnets: Vec<(usize, usize)>,
    pub attn: Option<AttnPlan>,
    pub upsample: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub down: Vec<DownPlan>,
    pub mid: Option<MidPlan>,
    pub up: Vec<UpPlan>,
}
