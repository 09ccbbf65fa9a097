//! Where each UNet block lives in the original (sgm/LDM) layout and in diffusers, computed from
//! the diffusers UNet config rather than a table of SDXL indices: the tiny fixture has SDXL's
//! three levels, other models do not, and a hard-coded table would silently misplace blocks.
//!
//! sgm numbers blocks sequentially: `input_blocks.0` is conv_in, then per level one block per
//! resnet (holding `.0` resnet and `.1` attention) and, except on the last level, one block with
//! the downsampler (`.0.op`). `output_blocks` walks the levels in reverse with one extra resnet
//! per level; the level's last block also holds the upsampler, at sub-index 2 when an attention
//! takes sub-index 1, else at 1. Both directions use the same table, so a kohya export and a
//! single-file import can never disagree.

use super::error::{Error, Result};
use std::path::Path;

/// The part of `unet/config.json` that decides the key layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnetLayout {
    /// Resnets per down level (diffusers allows an int or a per-level list).
    pub layers_per_block: Vec<usize>,
    /// Whether each down block has attentions (`CrossAttnDownBlock2D`, ...).
    pub down_attn: Vec<bool>,
    /// Whether each up block has attentions, in diffusers up-block order (lowest resolution first).
    pub up_attn: Vec<bool>,
    pub mid_block: MidBlock,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MidBlock {
    /// `UNetMidBlock2DCrossAttn`: resnet, attention, resnet (sgm `middle_block.0/1/2`).
    CrossAttn,
    /// `UNetMidBlock2D`: two resnets (sgm `middle_block.0/1`).
    Resnets,
    /// `mid_block_type: null`: diffusers builds no mid block at all.
    Absent,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum IntOrList {
    Int(usize),
    List(Vec<usize>),
}

#[derive(serde::Deserialize)]
struct ConfigJson {
    block_out_channels: Vec<usize>,
    layers_per_block: IntOrList,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    /// Missing means the diffusers default (cross-attention); an explicit `null` means none,
    /// so this stays a raw value to tell the two apart.
    #[serde(default = "default_mid")]
    mid_block_type: serde_json::Value,
}

fn default_mid() -> serde_json::Value {
    serde_json::Value::String("UNetMidBlock2DCrossAttn".into())
}

impl UnetLayout {
    /// stabilityai/stable-diffusion-xl-base-1.0 (SDXL.md 1.1), for single files without a config.
    pub fn sdxl_base() -> Self {
        UnetLayout {
            layers_per_block: vec![2, 2, 2],
            down_attn: vec![false, true, true],
            up_attn: vec![true, true, false],
            mid_block: MidBlock::CrossAttn,
        }
    }

    pub fn from_config_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_config_str(&text).map_err(|msg| match msg {
            ConfigError::Json(m) => Error::Json {
                path: path.to_path_buf(),
                msg: m,
            },
            ConfigError::Invalid(m) => Error::file(path, m),
        })
    }

    fn from_config_str(text: &str) -> std::result::Result<Self, ConfigError> {
        let c: ConfigJson = crate::formats::python_json::parse(text)
            .map_err(|e| ConfigError::Json(e.to_string()))?;
        let levels = c.block_out_channels.len();
        if levels == 0 || c.down_block_types.len() != levels || c.up_block_types.len() != levels {
            return Err(ConfigError::Invalid(format!(
                "block_out_channels ({levels}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
                c.down_block_types.len(),
                c.up_block_types.len()
            )));
        }
        let layers_per_block = match c.layers_per_block {
            IntOrList::Int(n) => vec![n; levels],
            IntOrList::List(v) if v.len() == levels => v,
            IntOrList::List(v) => {
                return Err(ConfigError::Invalid(format!(
                    "layers_per_block has {} entries for {levels} levels",
                    v.len()
                )))
            }
        };
        // "CrossAttnDownBlock2D", "AttnDownBlock2D", ... all carry `attentions.*`.
        let has_attn = |t: &String| t.contains("Attn");
        let mid_block = match &c.mid_block_type {
            serde_json::Value::Null => MidBlock::Absent,
            serde_json::Value::String(t) if t == "UNetMidBlock2DCrossAttn" => MidBlock::CrossAttn,
            serde_json::Value::String(t) if t == "UNetMidBlock2D" => MidBlock::Resnets,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "unsupported mid_block_type {other}"
                )))
            }
        };
        Ok(UnetLayout {
            layers_per_block,
            down_attn: c.down_block_types.iter().map(has_attn).collect(),
            up_attn: c.up_block_types.iter().map(has_attn).collect(),
            mid_block,
        })
    }

    pub fn levels(&self) -> usize {
        self.layers_per_block.len()
    }

    /// Every block of the model as (sgm prefix, diffusers prefix, kind).
    pub fn blocks(&self) -> Vec<Block> {
        let mut b = Vec::new();
        let mut push = |sgm: String, diffusers: String, kind: BlockKind| {
            b.push(Block {
                sgm,
                diffusers,
                kind,
            })
        };
        for (sgm, d) in [
            ("time_embed.0", "time_embedding.linear_1"),
            ("time_embed.2", "time_embedding.linear_2"),
            ("label_emb.0.0", "add_embedding.linear_1"),
            ("label_emb.0.2", "add_embedding.linear_2"),
            ("input_blocks.0.0", "conv_in"),
            ("out.0", "conv_norm_out"),
            ("out.2", "conv_out"),
        ] {
            push(sgm.into(), d.into(), BlockKind::Leaf);
        }
        let levels = self.levels();
        let mut i = 1;
        for level in 0..levels {
            for pos in 0..self.layers_per_block[level] {
                push(
                    format!("input_blocks.{i}.0"),
                    format!("down_blocks.{level}.resnets.{pos}"),
                    BlockKind::Resnet,
                );
                if self.down_attn[level] {
                    push(
                        format!("input_blocks.{i}.1"),
                        format!("down_blocks.{level}.attentions.{pos}"),
                        BlockKind::Transformer,
                    );
                }
                i += 1;
            }
            if level + 1 < levels {
                push(
                    format!("input_blocks.{i}.0.op"),
                    format!("down_blocks.{level}.downsamplers.0.conv"),
                    BlockKind::Leaf,
                );
                i += 1;
            }
        }
        let mid: &[(&str, BlockKind)] = match self.mid_block {
            MidBlock::CrossAttn => &[
                ("resnets.0", BlockKind::Resnet),
                ("attentions.0", BlockKind::Transformer),
                ("resnets.1", BlockKind::Resnet),
            ],
            MidBlock::Resnets => &[
                ("resnets.0", BlockKind::Resnet),
                ("resnets.1", BlockKind::Resnet),
            ],
            MidBlock::Absent => &[],
        };
        for (k, (d, kind)) in mid.iter().enumerate() {
            push(format!("middle_block.{k}"), format!("mid_block.{d}"), *kind);
        }
        let mut o = 0;
        for up in 0..levels {
            // Up block `up` mirrors down level `levels - 1 - up` and has one more resnet.
            let n = self.layers_per_block[levels - 1 - up] + 1;
            for pos in 0..n {
                push(
                    format!("output_blocks.{o}.0"),
                    format!("up_blocks.{up}.resnets.{pos}"),
                    BlockKind::Resnet,
                );
                if self.up_attn[up] {
                    push(
                        format!("output_blocks.{o}.1"),
                        format!("up_blocks.{up}.attentions.{pos}"),
                        BlockKind::Transformer,
                    );
                }
                if pos + 1 == n && up + 1 < levels {
                    let sub = if self.up_attn[up] { 2 } else { 1 };
                    push(
                        format!("output_blocks.{o}.{sub}.conv"),
                        format!("up_blocks.{up}.upsamplers.0.conv"),
                        BlockKind::Leaf,
                    );
                }
                o += 1;
            }
        }
        b
    }

    /// A converter for whole keys or module paths, built once per model.
    pub fn key_map(&self) -> UnetKeyMap {
        UnetKeyMap {
            blocks: self.blocks(),
        }
    }
}

enum ConfigError {
    Json(String),
    Invalid(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Renamed as a whole (`time_embed.0` -> `time_embedding.linear_1`, `...op` -> `...conv`).
    Leaf,
    /// ResnetBlock2D: children renamed by [`RESNET_RENAMES`].
    Resnet,
    /// Transformer2DModel: children are spelled identically in both layouts.
    Transformer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub sgm: String,
    pub diffusers: String,
    pub kind: BlockKind,
}

/// ResnetBlock2D children, (sgm, diffusers) (SDXL.md 5.3).
pub const RESNET_RENAMES: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// Converts UNet keys or module paths between the layouts. Works on anything below a block
/// prefix: `input_blocks.4.1.transformer_blocks.0.attn1.to_q` and `....to_q.weight` alike.
pub struct UnetKeyMap {
    blocks: Vec<Block>,
}

impl UnetKeyMap {
    /// sgm name (without `model.diffusion_model.`) -> diffusers name, `None` if it maps nowhere.
    pub fn to_diffusers(&self, sgm: &str) -> Option<String> {
        self.convert(sgm, true)
    }

    /// diffusers name -> sgm name, `None` if it maps nowhere.
    pub fn to_sgm(&self, diffusers: &str) -> Option<String> {
        self.convert(diffusers, false)
    }

    /// A diffusers module path (`down_blocks.0.resnets.0.conv1`, no parameter name) -> its sgm
    /// module path (`input_blocks.1.0.in_layers.2`), `None` if it maps nowhere.
    pub fn module_to_sgm(&self, module: &str) -> Option<String> {
        let sgm = self.to_sgm(&format!("{module}.weight"))?;
        sgm.strip_suffix(".weight").map(String::from)
    }

    fn convert(&self, name: &str, from_sgm: bool) -> Option<String> {
        // Longest matching prefix, so that a leaf nested below a block index (`input_blocks.3.0.op`
        // below `input_blocks.3.0`) wins if a layout ever has both.
        let mut best: Option<(&Block, &str, &str)> = None;
        for b in &self.blocks {
            let (src, dst) = if from_sgm {
                (&b.sgm, &b.diffusers)
            } else {
                (&b.diffusers, &b.sgm)
            };
            let under = name
                .strip_prefix(src.as_str())
                .is_some_and(|r| r.starts_with('.'));
            if under && best.is_none_or(|(_, s, _)| s.len() < src.len()) {
                best = Some((b, src.as_str(), dst.as_str()));
            }
        }
        let (block, src, dst) = best?;
        let rest = &name[src.len() + 1..];
        let rest = match block.kind {
            BlockKind::Leaf | BlockKind::Transformer => rest.to_string(),
            BlockKind::Resnet => rename_resnet_child(rest, from_sgm)?,
        };
        Some(format!("{dst}.{rest}"))
    }
}

fn rename_resnet_child(rest: &str, from_sgm: bool) -> Option<String> {
    RESNET_RENAMES.iter().find_map(|&(sgm, d)| {
        let (src, dst) = if from_sgm { (sgm, d) } else { (d, sgm) };
        rest.strip_prefix(src)
            .and_then(|r| r.strip_prefix('.'))
            .map(|r| format!("{dst}.{r}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_examples_from_the_spec() {
        let m = UnetLayout::sdxl_base().key_map();
        let cases = [
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "output_blocks.8.0.skip_connection.weight",
                "up_blocks.2.resnets.2.conv_shortcut.weight",
            ),
            (
                "output_blocks.2.2.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.6.0.op.bias",
                "down_blocks.1.downsamplers.0.conv.bias",
            ),
            (
                "middle_block.1.proj_in.weight",
                "mid_block.attentions.0.proj_in.weight",
            ),
            (
                "middle_block.2.emb_layers.1.bias",
                "mid_block.resnets.1.time_emb_proj.bias",
            ),
            ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
            (
                "output_blocks.0.1.transformer_blocks.9.ff.net.2",
                "up_blocks.0.attentions.0.transformer_blocks.9.ff.net.2",
            ),
        ];
        for (sgm, d) in cases {
            assert_eq!(m.to_diffusers(sgm).as_deref(), Some(d), "{sgm}");
            assert_eq!(m.to_sgm(d).as_deref(), Some(sgm), "{d}");
        }
        assert_eq!(
            m.to_diffusers("input_blocks.9.0.op.weight"),
            None,
            "level 2 has no downsampler"
        );
        assert_eq!(
            m.to_diffusers("input_blocks.1.1.proj_in.weight"),
            None,
            "level 0 has no attention"
        );
        assert_eq!(
            m.to_diffusers("input_blocks.1.0.in_layers.1.weight"),
            None,
            "in_layers.1 is the SiLU"
        );
    }

    #[test]
    fn sd15_shaped_layout_puts_upsamplers_at_sub_index_2_only_with_attention() {
        // 4 levels, attention on the first three down levels and the last three up levels.
        let l = UnetLayout {
            layers_per_block: vec![2; 4],
            down_attn: vec![true, true, true, false],
            up_attn: vec![false, true, true, true],
            mid_block: MidBlock::CrossAttn,
        };
        let m = l.key_map();
        assert_eq!(
            m.to_sgm("up_blocks.0.upsamplers.0.conv.weight").as_deref(),
            Some("output_blocks.2.1.conv.weight")
        );
        assert_eq!(
            m.to_sgm("up_blocks.1.upsamplers.0.conv.weight").as_deref(),
            Some("output_blocks.5.2.conv.weight")
        );
        assert_eq!(
            m.to_sgm("down_blocks.2.downsamplers.0.conv.weight")
                .as_deref(),
            Some("input_blocks.9.0.op.weight")
        );
        assert_eq!(
            m.to_sgm("down_blocks.3.resnets.1.conv1.weight").as_deref(),
            Some("input_blocks.11.0.in_layers.2.weight")
        );
        assert_eq!(
            m.to_sgm("up_blocks.3.attentions.2.proj_out.weight")
                .as_deref(),
            Some("output_blocks.11.1.proj_out.weight")
        );
        // Module paths (what adapters are keyed by), resnet children renamed too.
        for (module, sgm) in [
            (
                "down_blocks.3.resnets.1.conv1",
                "input_blocks.11.0.in_layers.2",
            ),
            (
                "down_blocks.3.resnets.1.time_emb_proj",
                "input_blocks.11.0.emb_layers.1",
            ),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
            ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
            (
                "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q",
                "output_blocks.11.1.transformer_blocks.0.attn1.to_q",
            ),
        ] {
            assert_eq!(m.module_to_sgm(module).as_deref(), Some(sgm), "{module}");
        }
        assert_eq!(m.module_to_sgm("nowhere.conv1"), None);
    }

    #[test]
    fn tiny_fixture_config_is_sdxl_shaped() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny/sdxl/unet/config.json"
        );
        assert_eq!(
            UnetLayout::from_config_file(p).unwrap(),
            UnetLayout::sdxl_base()
        );
    }
}
