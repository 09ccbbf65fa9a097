//! Ranks and alphas per UNet block: kohya's `block_dims`, `block_alphas`, `conv_block_dims` and
//! `conv_block_alphas` network arguments (sd-scripts networks/lora.py, `get_block_dims_and_alphas`
//! and, for SDXL, `get_block_index`). One value per block in kohya's SDXL numbering: 0 the time
//! embedding, then `input_blocks.0..`, the middle block's parts, `output_blocks.0..` and last
//! `out`: 1 + 9 + 3 + 9 + 1 = 23 for SDXL (the first and last hold no adapters but are counted,
//! as kohya counts them). Here the counts come from the model's layout, as for the block-wise
//! learning rates (the tiny model has fewer blocks).
//!
//! Linears and 1x1 convolutions take `block_dims` / `block_alphas`; the 3x3 convolutions of the
//! conv group (`--conv-dim`) take `conv_block_dims` / `conv_block_alphas`. A list left out is the
//! network's value in every block (`--rank`, `--alpha`, `--conv-dim`, `--conv-alpha`). A block
//! at rank 0 gets no adapters, as in kohya.

use super::config::ConvLora;
use super::lr_groups::block_counts;
use crate::formats::unet_layout::UnetLayout;
use crate::nn::lora::LoraConfig;
use crate::{Error, Result};

/// The four lists as given on the command line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockDims {
    pub dims: Option<Vec<usize>>,
    pub alphas: Option<Vec<f64>>,
    pub conv_dims: Option<Vec<usize>>,
    pub conv_alphas: Option<Vec<f64>>,
}

/// The canonical text of a list (the adapter's recorded settings), `none` when absent.
pub fn describe<T: ToString>(list: &Option<Vec<T>>) -> String {
    match list {
        None => "none".into(),
        Some(v) => v.iter().map(T::to_string).collect::<Vec<_>>().join(","),
    }
}

fn parse_list<T: std::str::FromStr>(flag: &str, text: &str, what: &str) -> Result<Vec<T>> {
    text.split(',')
        .map(|s| {
            s.trim().parse::<T>().map_err(|_| {
                Error::Config(format!(
                    "{flag} `{text}`: `{}` is not {what} (one value per block, comma-separated)",
                    s.trim()
                ))
            })
        })
        .collect()
}

impl BlockDims {
    /// kohya's spelling: comma-separated ranks, every one given.
    pub fn parse_dims(flag: &str, text: &str) -> Result<Vec<usize>> {
        parse_list(flag, text, "a rank (a whole number, 0 for no adapters)")
    }

    /// Comma-separated alphas, finite.
    pub fn parse_alphas(flag: &str, text: &str) -> Result<Vec<f64>> {
        let v: Vec<f64> = parse_list(flag, text, "a number")?;
        match v.iter().find(|a| !a.is_finite()) {
            Some(a) => Err(Error::Config(format!("{flag} `{text}`: {a} is not finite"))),
            None => Ok(v),
        }
    }

    pub fn is_set(&self) -> bool {
        self.dims.is_some()
            || self.alphas.is_some()
            || self.conv_dims.is_some()
            || self.conv_alphas.is_some()
    }

    /// The per-block configurations for `layout`, the network's `lora` filling what is not
    /// given. Every list must have a value for each block, as kohya asks.
    pub fn resolve(
        &self,
        layout: &UnetLayout,
        lora: LoraConfig,
        conv: Option<ConvLora>,
    ) -> Result<BlockRanks> {
        let (n_in, n_mid, n_out) = block_counts(layout);
        let n = 1 + n_in + n_mid + n_out + 1;
        let sized = |flag: &str, len: Option<usize>| match len {
            Some(len) if len != n => Err(Error::Config(format!(
                "{flag} has {len} values; this UNet has {n} blocks in kohya's numbering (the time \
                 embedding, {n_in} input blocks, {n_mid} middle-block parts, {n_out} output blocks \
                 and out; SDXL has 23)"
            ))),
            _ => Ok(()),
        };
        sized("--block-dims", self.dims.as_ref().map(Vec::len))?;
        sized("--block-alphas", self.alphas.as_ref().map(Vec::len))?;
        sized("--conv-block-dims", self.conv_dims.as_ref().map(Vec::len))?;
        sized(
            "--conv-block-alphas",
            self.conv_alphas.as_ref().map(Vec::len),
        )?;
        let configs = |dims: &Option<Vec<usize>>, alphas: &Option<Vec<f64>>, rank, alpha| {
            (0..n)
                .map(|i| LoraConfig {
                    rank: dims.as_ref().map_or(rank, |d| d[i]),
                    alpha: alphas.as_ref().map_or(alpha, |a| a[i]),
                    ..lora
                })
                .collect::<Vec<_>>()
        };
        Ok(BlockRanks {
            n_in,
            n_mid,
            linear: configs(&self.dims, &self.alphas, lora.rank, lora.alpha),
            conv: conv.map(|c| configs(&self.conv_dims, &self.conv_alphas, c.dim, c.alpha)),
        })
    }
}

/// A configuration per block (see [`BlockDims::resolve`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockRanks {
    n_in: usize,
    n_mid: usize,
    linear: Vec<LoraConfig>,
    /// The 3x3 convolutions' (with `--conv-dim`).
    conv: Option<Vec<LoraConfig>>,
}

impl BlockRanks {
    /// kohya's block index of an sgm name: 1 + i for `input_blocks.i`, then the middle block's
    /// parts and the output blocks; None outside them (nothing adaptable lies there).
    fn index(&self, sgm: &str) -> Option<usize> {
        let mut parts = sgm.split('.');
        let first = match parts.next()? {
            "input_blocks" => 1,
            "middle_block" => 1 + self.n_in,
            "output_blocks" => 1 + self.n_in + self.n_mid,
            _ => return None,
        };
        let i = first + parts.next()?.parse::<usize>().ok()?;
        (i < self.linear.len()).then_some(i)
    }

    /// The configuration of the adapter on the layer at `sgm` whose frozen weight is `dims`:
    /// a 3x3 (any non-1x1) convolution takes the conv lists, everything else the linear ones.
    /// A rank of 0 means no adapter; None when the name lies in no block.
    pub fn config_for(&self, sgm: &str, dims: &[usize]) -> Option<LoraConfig> {
        let i = self.index(sgm)?;
        match (dims, &self.conv) {
            ([_, _, kh, kw], Some(conv)) if (*kh, *kw) != (1, 1) => Some(conv[i]),
            _ => Some(self.linear[i]),
        }
    }

    /// For the log: the ranks (and alphas) per block, input / middle / output.
    pub fn describe(&self) -> String {
        let part = |v: &[LoraConfig]| {
            let (i, m) = (1 + self.n_in, 1 + self.n_in + self.n_mid);
            let fmt = |s: &[LoraConfig]| {
                s.iter()
                    .map(|c| format!("{}/{}", c.rank, c.alpha))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            format!(
                "input_blocks [{}], middle_block [{}], output_blocks [{}]",
                fmt(&v[1..i]),
                fmt(&v[i..m]),
                fmt(&v[m..v.len() - 1])
            )
        };
        match &self.conv {
            None => format!("rank/alpha per block: {}", part(&self.linear)),
            Some(c) => format!(
                "rank/alpha per block: {}; 3x3 convolutions: {}",
                part(&self.linear),
                part(c)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl() -> UnetLayout {
        UnetLayout::sdxl_base()
    }

    fn lora() -> LoraConfig {
        LoraConfig {
            rank: 8,
            alpha: 4.0,
            ..LoraConfig::default()
        }
    }

    /// kohya's SDXL numbering (sd-scripts' get_block_index): input_blocks.i is 1 + i,
    /// middle_block.i 10 + i, output_blocks.i 13 + i, 23 values in all.
    #[test]
    fn sdxl_blocks_follow_kohyas_numbering() {
        let dims: Vec<usize> = (0..23).collect();
        let alphas: Vec<f64> = (0..23).map(|i| i as f64 / 2.0).collect();
        let b = BlockDims {
            dims: Some(dims),
            alphas: Some(alphas),
            ..BlockDims::default()
        };
        let r = b.resolve(&sdxl(), lora(), None).unwrap();
        let lin = [1280, 1280];
        let rank = |sgm: &str| r.config_for(sgm, &lin).map(|c| (c.rank, c.alpha));
        assert_eq!(rank("input_blocks.4.1.proj_in"), Some((5, 2.5)));
        assert_eq!(rank("input_blocks.0.0"), Some((1, 0.5)));
        assert_eq!(rank("middle_block.1.proj_out"), Some((11, 5.5)));
        assert_eq!(rank("output_blocks.0.1.proj_in"), Some((13, 6.5)));
        assert_eq!(rank("output_blocks.8.0.out_layers.3"), Some((21, 10.5)));
        assert_eq!(rank("time_embed.0"), None);
        assert_eq!(rank("out.2"), None);
        // Through the diffusers names the trainer holds.
        let keys = sdxl().key_map();
        let sgm = |p: &str| keys.module_to_sgm(p).unwrap();
        let at = |p: &str| rank(&sgm(p)).unwrap().0;
        assert_eq!(
            at("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            5
        );
        assert_eq!(
            at("down_blocks.2.attentions.1.transformer_blocks.3.ff.net.2"),
            9
        );
        assert_eq!(
            at("mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
            11
        );
        assert_eq!(at("up_blocks.0.attentions.2.proj_out"), 15);
        assert_eq!(at("up_blocks.1.attentions.0.proj_in"), 16);
        // No conv group: a 3x3 convolution's name still gets the linear lists.
        assert_eq!(
            r.config_for("input_blocks.1.0.in_layers.2", &[320, 320, 3, 3])
                .unwrap()
                .rank,
            2
        );
    }

    #[test]
    fn conv_lists_take_the_3x3_convolutions_only() {
        let b = BlockDims {
            conv_dims: Some(vec![3; 23]),
            ..BlockDims::default()
        };
        let conv = ConvLora {
            dim: 16,
            alpha: 1.0,
        };
        let r = b.resolve(&sdxl(), lora(), Some(conv)).unwrap();
        let c3 = r
            .config_for("input_blocks.1.0.in_layers.2", &[320, 320, 3, 3])
            .unwrap();
        assert_eq!((c3.rank, c3.alpha), (3, 1.0));
        let c1 = r
            .config_for("input_blocks.4.0.skip_connection", &[640, 320, 1, 1])
            .unwrap();
        assert_eq!((c1.rank, c1.alpha), (8, 4.0));
        // Without conv lists, --conv-dim everywhere.
        let r = BlockDims::default()
            .resolve(&sdxl(), lora(), Some(conv))
            .unwrap();
        let c3 = r
            .config_for("output_blocks.2.2.conv", &[1280, 1280, 3, 3])
            .unwrap();
        assert_eq!((c3.rank, c3.alpha), (16, 1.0));
    }

    #[test]
    fn wrong_counts_and_values_are_refused() {
        let b = BlockDims {
            dims: Some(vec![4; 22]),
            ..BlockDims::default()
        };
        let e = b.resolve(&sdxl(), lora(), None).unwrap_err().to_string();
        assert!(
            e.contains("--block-dims has 22 values") && e.contains("23"),
            "{e}"
        );
        let e = BlockDims::parse_dims("--block-dims", "4,4,x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`x`"), "{e}");
        assert!(BlockDims::parse_dims("--block-dims", "4,-1").is_err());
        assert!(BlockDims::parse_alphas("--block-alphas", "1,inf").is_err());
        assert_eq!(
            BlockDims::parse_alphas("--block-alphas", " 1, 2.5").unwrap(),
            vec![1.0, 2.5]
        );
    }
}
