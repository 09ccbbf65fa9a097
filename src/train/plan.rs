//! Where a run puts the UNet's adapters and at what rank: kohya's block-wise learning rates
//! (a block at weight 0 gets none) and block ranks (`--block-dims` and kin; a block at rank 0
//! gets none), both read through the sgm name of each layer.

use super::block_dims::BlockRanks;
use super::config::TrainConfig;
use super::lr_groups::BlockWeights;
use crate::formats::unet_layout::{UnetKeyMap, UnetLayout};
use crate::nn::lora::LoraConfig;
use crate::{Error, Result};

pub struct UnetPlan {
    /// The block-wise learning-rate factors (`--down/mid/up-lr-weight`).
    pub weights: Option<BlockWeights>,
    /// The ranks and alphas per block (`--block-dims` and kin).
    pub ranks: Option<BlockRanks>,
    pub keys: UnetKeyMap,
}

impl UnetPlan {
    /// Resolves both against the model's `layout`, logging what they come to.
    pub fn new(cfg: &TrainConfig, layout: &UnetLayout, log: &mut dyn FnMut(&str)) -> Result<Self> {
        let weights = match cfg.block_lr.is_set() {
            true => {
                let w = cfg.block_lr.resolve(layout)?;
                let all = w.input.iter().chain(&w.middle).chain(&w.output);
                if let (Some(x), Some(_)) = (
                    all.copied().find(|&x| x != 0.0 && x != 1.0),
                    cfg.optimizer.prodigy(),
                ) {
                    return Err(Error::Config(format!(
                        "Prodigy steps every trainable at one rate: block weights can only be 0 \
                         (no adapters) or 1 with it, got {x}"
                    )));
                }
                log(&format!("block-wise learning rates: {}", w.describe()));
                Some(w)
            }
            false => None,
        };
        let ranks = match cfg.block_dims.is_set() {
            true => {
                let r = cfg.block_dims.resolve(layout, cfg.lora, cfg.conv_lora)?;
                log(&r.describe());
                Some(r)
            }
            false => None,
        };
        Ok(UnetPlan {
            weights,
            ranks,
            keys: layout.key_map(),
        })
    }

    /// Whether anything is set per block.
    pub fn per_block(&self) -> bool {
        self.weights.is_some() || self.ranks.is_some()
    }

    /// A layer whose block's learning-rate weight is 0: its adapter is drawn, then dropped, so
    /// that every other draw of the run stays as it was.
    pub fn zeroed(&self, path: &str) -> bool {
        self.weights
            .as_ref()
            .zip(self.keys.module_to_sgm(path))
            .is_some_and(|(w, s)| w.weight(&s) == 0.0)
    }

    /// The rank and alpha of the adapter on the layer at `path` whose frozen weight is `dims`,
    /// `network` where no block rank applies. Rank 0: no adapter, nothing drawn.
    pub fn config(&self, path: &str, dims: &[usize], network: LoraConfig) -> LoraConfig {
        self.ranks
            .as_ref()
            .zip(self.keys.module_to_sgm(path))
            .and_then(|(r, s)| r.config_for(&s, dims))
            .unwrap_or(network)
    }
}
