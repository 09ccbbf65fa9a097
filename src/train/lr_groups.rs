//! Learning rates per trainable, as kohya's `LoRANetwork.prepare_optimizer_params` forms its
//! parameter groups (sd-scripts networks/lora.py): the UNet's adapters at `--lr`, the text
//! encoders' at `--text-encoder-lr`, and on top of those
//!
//! - LoRA+ (`loraplus_lr_ratio`, `loraplus_unet_lr_ratio`, `loraplus_text_encoder_lr_ratio`):
//!   every lora_up (our `lora_B`) steps at the ratio times its part's rate; lora_down, the
//!   K-StyleLoRA gates and the cultural projection keep the plain rate;
//! - block-wise weights for the UNet (`down_lr_weight`, `mid_lr_weight`, `up_lr_weight`,
//!   `block_lr_zero_threshold`): one factor per sgm block, `input_blocks.i`, `middle_block.i`,
//!   `output_blocks.i`, read from the module's sgm name. A block whose weight is 0 gets no
//!   adapters at all (kohya gives it rank 0), so the file holds none of its modules.
//!
//! kohya fixes SDXL's 9 + 3 + 9 blocks; here the counts come from the model's layout (the tiny
//! model has fewer), and the curve presets spread over that many blocks.

use crate::formats::unet_layout::{MidBlock, UnetKeyMap, UnetLayout};
use crate::{Error, Result};

/// kohya's LoRA+ ratios; a part's own ratio wins over the shared one.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoraPlus {
    /// `--loraplus-lr-ratio`: both parts.
    pub ratio: Option<f64>,
    /// `--loraplus-unet-lr-ratio`.
    pub unet: Option<f64>,
    /// `--loraplus-text-encoder-lr-ratio`.
    pub text_encoder: Option<f64>,
}

impl LoraPlus {
    pub fn unet_ratio(&self) -> Option<f64> {
        self.unet.or(self.ratio)
    }

    pub fn text_encoder_ratio(&self) -> Option<f64> {
        self.text_encoder.or(self.ratio)
    }

    pub fn check(&self) -> Result<()> {
        for (flag, r) in [
            ("--loraplus-lr-ratio", self.ratio),
            ("--loraplus-unet-lr-ratio", self.unet),
            ("--loraplus-text-encoder-lr-ratio", self.text_encoder),
        ] {
            if let Some(r) = r {
                if !(r.is_finite() && r > 0.0) {
                    return Err(Error::Config(format!(
                        "{flag} multiplies lora_up's learning rate: a positive number, got {r}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The shapes kohya's `get_block_lr_weight` offers for `down_lr_weight` / `up_lr_weight`,
/// over the blocks of one side, shallow to deep for down (deep to shallow for up, as listed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Curve {
    /// sin(pi/2 * i/(n-1)) for i from n-1 down to 0: 1 at the first block, 0 at the last.
    Cosine,
    /// sin(pi/2 * i/(n-1)) for i from 0: 0 at the first block, 1 at the last.
    Sine,
    /// i/(n-1): 0 to 1.
    Linear,
    /// 1 to 0.
    ReverseLinear,
    /// 0 everywhere.
    Zeros,
}

impl Curve {
    const ALL: [(&'static str, Curve); 5] = [
        ("cosine", Curve::Cosine),
        ("sine", Curve::Sine),
        ("linear", Curve::Linear),
        ("reverse_linear", Curve::ReverseLinear),
        ("zeros", Curve::Zeros),
    ];

    fn values(self, n: usize, base: f64) -> Vec<f64> {
        let span = n.saturating_sub(1).max(1) as f64;
        let quarter = |i: usize| (std::f64::consts::PI * (i as f64 / span) / 2.0).sin();
        (0..n)
            .map(|i| {
                base + match self {
                    Curve::Cosine => quarter(n - 1 - i),
                    Curve::Sine => quarter(i),
                    Curve::Linear => i as f64 / span,
                    Curve::ReverseLinear => (n - 1 - i) as f64 / span,
                    Curve::Zeros => 0.0,
                }
            })
            .collect()
    }
}

/// One side's weights as given: a list, or a curve plus a constant (`cosine+0.25`).
#[derive(Clone, Debug, PartialEq)]
pub enum Weights {
    List(Vec<f64>),
    Curve(Curve, f64),
}

impl Weights {
    /// kohya's spelling: comma-separated numbers (an empty entry is 0), or a curve name with an
    /// optional `+base`. One number alone is a list of one (kohya reads it as an unknown curve).
    pub fn parse(flag: &str, text: &str, curves: bool) -> Result<Weights> {
        let text = text.trim();
        let (name, base) = match text.split_once('+') {
            Some((n, b)) => (n.trim(), Some(b.trim())),
            None => (text, None),
        };
        if let Some(&(_, curve)) = Curve::ALL.iter().find(|(n, _)| *n == name) {
            if !curves {
                return Err(Error::Config(format!(
                    "{flag} takes a list of numbers, not the curve `{name}`"
                )));
            }
            let base = match base {
                None => 0.0,
                Some(b) => b
                    .parse::<f64>()
                    .ok()
                    .filter(|b| b.is_finite())
                    .ok_or_else(|| {
                        Error::Config(format!("{flag} `{text}`: `{b}` after + is not a number"))
                    })?,
            };
            return Ok(Weights::Curve(curve, base));
        }
        let list = text
            .split(',')
            .map(|s| match s.trim() {
                "" => Ok(0.0),
                s => s
                    .parse::<f64>()
                    .ok()
                    .filter(|w| w.is_finite())
                    .ok_or_else(|| {
                        let names: Vec<&str> = Curve::ALL.iter().map(|(n, _)| *n).collect();
                        Error::Config(format!(
                            "{flag} `{text}`: `{s}` is not a number{}",
                            match curves {
                                true => format!(
                                    " (or a curve: {}, with an optional +base)",
                                    names.join(", ")
                                ),
                                false => String::new(),
                            }
                        ))
                    }),
            })
            .collect::<Result<Vec<f64>>>()?;
        Ok(Weights::List(list))
    }

    /// The weights for `n` blocks: a short list is filled with 1 (as kohya fills it), a long
    /// one refused (kohya drops the extra values with a warning).
    fn resolve(&self, flag: &str, n: usize, what: &str) -> Result<Vec<f64>> {
        match self {
            Weights::Curve(c, base) => Ok(c.values(n, *base)),
            Weights::List(v) if v.len() > n => Err(Error::Config(format!(
                "{flag} has {} values; this UNet has {n} {what}",
                v.len()
            ))),
            Weights::List(v) => {
                let mut v = v.clone();
                v.resize(n, 1.0);
                Ok(v)
            }
        }
    }

    /// The text it was parsed from, canonically (the adapter's recorded settings).
    pub fn describe(&self) -> String {
        match self {
            Weights::List(v) => v.iter().map(f64::to_string).collect::<Vec<_>>().join(","),
            Weights::Curve(c, base) => {
                let name = Curve::ALL
                    .iter()
                    .find(|(_, k)| k == c)
                    .map_or("", |(n, _)| n);
                match *base {
                    0.0 => name.to_string(),
                    b => format!("{name}+{b}"),
                }
            }
        }
    }
}

/// kohya's block-wise learning-rate arguments. Sides without weights stay at 1.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockLr {
    pub down: Option<Weights>,
    pub mid: Option<Weights>,
    pub up: Option<Weights>,
    /// Weights at or below this become 0 (their blocks get no adapters).
    pub zero_threshold: f64,
}

impl BlockLr {
    pub fn is_set(&self) -> bool {
        self.down.is_some() || self.mid.is_some() || self.up.is_some()
    }

    /// One factor per block of `layout`; given weights at or below the threshold become 0.
    pub fn resolve(&self, layout: &UnetLayout) -> Result<BlockWeights> {
        let (n_in, n_mid, n_out) = block_counts(layout);
        let side = |w: &Option<Weights>, flag: &str, n: usize, what: &str| -> Result<Vec<f64>> {
            match w {
                None => Ok(vec![1.0; n]),
                Some(w) => Ok(w
                    .resolve(flag, n, what)?
                    .into_iter()
                    .map(|x| if x > self.zero_threshold { x } else { 0.0 })
                    .collect()),
            }
        };
        Ok(BlockWeights {
            input: side(&self.down, "--down-lr-weight", n_in, "input blocks")?,
            middle: side(&self.mid, "--mid-lr-weight", n_mid, "middle-block parts")?,
            output: side(&self.up, "--up-lr-weight", n_out, "output blocks")?,
        })
    }
}

/// sgm block counts: input blocks (conv_in, one per resnet, one per downsampler), the middle
/// block's parts, output blocks (one per resnet, each level one more than it has down).
pub fn block_counts(layout: &UnetLayout) -> (usize, usize, usize) {
    let levels = layout.levels();
    let resnets: usize = layout.layers_per_block.iter().sum();
    let mid = match layout.mid_block {
        MidBlock::CrossAttn => 3,
        MidBlock::Resnets => 2,
        MidBlock::Absent => 0,
    };
    (
        1 + resnets + levels.saturating_sub(1),
        mid,
        resnets + levels,
    )
}

/// A factor per sgm block (see [`BlockLr::resolve`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockWeights {
    pub input: Vec<f64>,
    pub middle: Vec<f64>,
    pub output: Vec<f64>,
}

impl BlockWeights {
    /// The factor of the block an sgm name lies in; 1 outside the three lists (kohya's
    /// time embedding and `out`, which hold no attention).
    pub fn weight(&self, sgm: &str) -> f64 {
        let mut parts = sgm.split('.');
        let list = match parts.next() {
            Some("input_blocks") => &self.input,
            Some("middle_block") => &self.middle,
            Some("output_blocks") => &self.output,
            _ => return 1.0,
        };
        parts
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| list.get(i).copied())
            .unwrap_or(1.0)
    }

    /// For the log: `input [1, 0.5, ...] middle [...] output [...]`.
    pub fn describe(&self) -> String {
        format!(
            "input_blocks {:?}, middle_block {:?}, output_blocks {:?}",
            self.input, self.middle, self.output
        )
    }
}

/// What a slot's learning rate is made of: its part's base rate times a fixed factor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlotRate {
    pub text_encoder: bool,
    pub factor: f64,
}

/// The rate of every trainable in optimizer order: the UNet's adapters and the cultural
/// projection first, the last `n_text` the text encoders'. `keys` maps a UNet name to sgm (for
/// the block weights).
pub fn slot_rates(
    names: &[String],
    n_text: usize,
    plus: &LoraPlus,
    blocks: Option<(&BlockWeights, &UnetKeyMap)>,
) -> Vec<SlotRate> {
    let first_text = names.len().saturating_sub(n_text);
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let text_encoder = i >= first_text;
            let ratio = match text_encoder {
                true => plus.text_encoder_ratio(),
                false => plus.unet_ratio(),
            };
            let up = name.ends_with(".lora_B");
            let mut factor = match (up, ratio) {
                (true, Some(r)) => r,
                _ => 1.0,
            };
            if let (false, Some((w, keys))) = (text_encoder, blocks) {
                if let Some(sgm) = keys.to_sgm(name) {
                    factor *= w.weight(&sgm);
                }
            }
            SlotRate {
                text_encoder,
                factor,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kohya's `get_block_index` for SDXL (sd-scripts networks/lora.py): input_blocks.i is
    /// block 1 + i, middle_block.i 10 + i, output_blocks.i 13 + i; the counts are its 9, 3, 9.
    #[test]
    fn sdxl_blocks_are_kohyas() {
        let layout = UnetLayout::sdxl_base();
        assert_eq!(block_counts(&layout), (9, 3, 9));
        let lr = BlockLr {
            down: Some(Weights::List((1..=9).map(|i| i as f64).collect())),
            mid: Some(Weights::List(vec![10.0, 11.0, 12.0])),
            up: Some(Weights::List((13..=21).map(|i| i as f64).collect())),
            zero_threshold: 0.0,
        };
        let w = lr.resolve(&layout).unwrap();
        let keys = layout.key_map();
        for (diffusers, block) in [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B",
                5.0,
            ),
            (
                "down_blocks.2.attentions.1.transformer_blocks.3.ff.net.2.lora_A",
                9.0,
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A",
                11.0,
            ),
            (
                "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A",
                13.0,
            ),
            ("up_blocks.1.attentions.2.proj_out.lora_B", 18.0),
        ] {
            let sgm = keys.to_sgm(diffusers).unwrap();
            assert_eq!(w.weight(&sgm), block, "{diffusers} -> {sgm}");
        }
        assert_eq!(w.weight("time_embed.0"), 1.0);
    }

    /// The curves over SDXL's nine blocks, by kohya's formulas, with a base added; short lists
    /// filled with 1, long ones refused, weights at the threshold zeroed.
    #[test]
    fn curves_lists_and_the_threshold() {
        let layout = UnetLayout::sdxl_base();
        let resolve = |down: &str, t: f64| {
            BlockLr {
                down: Some(Weights::parse("--down-lr-weight", down, true).unwrap()),
                zero_threshold: t,
                ..BlockLr::default()
            }
            .resolve(&layout)
            .map(|w| w.input)
        };
        let sine = resolve("sine", -1.0).unwrap();
        assert_eq!(sine[0], 0.0);
        assert!((sine[8] - 1.0).abs() < 1e-15);
        assert!((sine[4] - (std::f64::consts::PI / 4.0).sin()).abs() < 1e-15);
        let cosine = resolve("cosine+0.5", -1.0).unwrap();
        assert_eq!(cosine[8], 0.5);
        assert!((cosine[0] - 1.5).abs() < 1e-15);
        assert_eq!(resolve("linear", -1.0).unwrap()[2], 0.25);
        assert_eq!(resolve("reverse_linear", -1.0).unwrap()[2], 0.75);
        assert_eq!(resolve("zeros+0.3", -1.0).unwrap(), vec![0.3; 9]);
        assert_eq!(
            resolve("0.5,,2", 0.0).unwrap(),
            [0.5, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
        );
        assert_eq!(resolve("0.5,0.2,-1", 0.2).unwrap()[..3], [0.5, 0.0, 0.0]);
        let long = resolve(&["1"; 10].join(","), 0.0).unwrap_err();
        assert!(
            long.to_string()
                .contains("10 values; this UNet has 9 input blocks"),
            "{long}"
        );
        for bad in ["cosin", "1,x", "sine+y", "inf"] {
            assert!(
                Weights::parse("--down-lr-weight", bad, true).is_err(),
                "{bad}"
            );
        }
        assert!(Weights::parse("--mid-lr-weight", "sine", false).is_err());
        for text in ["cosine+0.25", "zeros", "1,0.5,0"] {
            let w = Weights::parse("--up-lr-weight", text, true).unwrap();
            assert_eq!(w.describe(), text);
        }
    }

    /// lora_B at the ratio of its part, everything else at 1; the block weight multiplies the
    /// UNet's slots only.
    #[test]
    fn loraplus_and_blocks_combine() {
        let layout = UnetLayout::sdxl_base();
        let keys = layout.key_map();
        let w = BlockLr {
            down: Some(Weights::List(vec![1.0, 1.0, 1.0, 1.0, 0.5])),
            ..BlockLr::default()
        }
        .resolve(&layout)
        .unwrap();
        let names: Vec<String> = [
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.attn_mlp.0.weight",
            "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B",
            "cultural.proj.weight",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B",
        ]
        .map(String::from)
        .to_vec();
        let plus = LoraPlus {
            ratio: Some(16.0),
            text_encoder: Some(4.0),
            ..LoraPlus::default()
        };
        let rates = slot_rates(&names, 2, &plus, Some((&w, &keys)));
        let got: Vec<(bool, f64)> = rates.iter().map(|r| (r.text_encoder, r.factor)).collect();
        assert_eq!(
            got,
            [
                (false, 0.5),
                (false, 8.0),
                (false, 0.5),
                (false, 16.0),
                (false, 1.0),
                (true, 1.0),
                (true, 4.0)
            ]
        );
    }
}
