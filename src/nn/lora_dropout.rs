//! kohya's LoRA dropouts (sd-scripts `--network_dropout`, and `--network_args rank_dropout=P
//! module_dropout=P`), for training forwards only:
//!
//! - network dropout drops each entry of the low-rank activation `h A^T` with probability p and
//!   rescales what stays by 1 / (1 - p) (`F.dropout`);
//! - rank dropout drops each rank of a sample's update with probability p_rank (kept when a
//!   uniform draw exceeds p_rank, as kohya's mask) and rescales the update by 1 / (1 - p_rank);
//! - module dropout drops a sample's whole update of one module with probability p_module.
//!
//! kohya draws module dropout once per forward, for the whole batch; here every draw is per
//! sample, from a seed the trainer draws per visit, so a batch of B trains what B accumulated
//! batches of one train (identical to kohya at batch size 1). The masks are drawn on the host from
//! those seeds whenever the forward runs, so a checkpointed segment's recompute sees the same
//! masks, and CPU and CUDA runs draw the same ones.

use crate::tensor::Rng;
use crate::{DType, Device, Error, Result, Tensor};

/// The three probabilities, each off (None) or in (0, 1).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoraDropout {
    /// Network dropout: each entry of `h A^T`.
    pub dropout: Option<f64>,
    /// Each rank of a sample's update.
    pub rank: Option<f64>,
    /// A sample's whole update of a module.
    pub module: Option<f64>,
}

impl LoraDropout {
    pub fn is_off(&self) -> bool {
        self.dropout.is_none() && self.rank.is_none() && self.module.is_none()
    }
}

/// One forward's masks, 0 (dropped) or 1 (kept) in the activation's dtype; the rescale of what is
/// kept is the scalar `scale`, applied with the adapter's own.
#[derive(Clone, Debug)]
pub struct DropoutMasks {
    /// (B, r): a sample's rank mask times its module mask.
    pub rows: Option<Tensor>,
    /// (B, S, r): the network-dropout mask of `h A^T`.
    pub entries: Option<Tensor>,
    /// `1 / ((1 - p) (1 - p_rank))` over the dropouts in use.
    pub scale: f64,
}

/// What one training forward of one adapter draws its masks from: the dropouts and a seed per
/// sample of the batch. The trainer sets it around each micro-batch and clears it after.
#[derive(Clone, Debug, PartialEq)]
pub struct DropoutDraw {
    pub config: LoraDropout,
    pub seeds: Vec<u64>,
}

impl DropoutDraw {
    /// The draw of adapter number `module` (its place in the run's adapter order) for visits that
    /// drew `visit_seeds`.
    pub fn for_module(config: LoraDropout, visit_seeds: &[u64], module: usize) -> DropoutDraw {
        let salt = (module as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        DropoutDraw {
            config,
            seeds: visit_seeds
                .iter()
                .map(|&s| Rng::new(s ^ salt).next_u64())
                .collect(),
        }
    }

    /// The masks of a forward on `h A^T` of shape (B, `seq`, `rank`), B = the number of seeds.
    /// Each sample draws from its own seed, in this order: the module's draw, one per rank, one
    /// per entry (each only when that dropout is on).
    pub fn masks(
        &self,
        seq: usize,
        rank: usize,
        dtype: DType,
        device: Device,
    ) -> Result<DropoutMasks> {
        let b = self.seeds.len();
        let c = self.config;
        let rows_on = c.rank.is_some() || c.module.is_some();
        let mut rows = Vec::with_capacity(if rows_on { b * rank } else { 0 });
        let mut entries = Vec::with_capacity(if c.dropout.is_some() {
            b * seq * rank
        } else {
            0
        });
        for &seed in &self.seeds {
            let mut rng = Rng::new(seed);
            let kept = c.module.is_none_or(|p| rng.uniform() >= p);
            if rows_on {
                for _ in 0..rank {
                    let rank_kept = c.rank.is_none_or(|p| rng.uniform() > p);
                    rows.push(f32::from(u8::from(kept && rank_kept)));
                }
            }
            if let Some(p) = c.dropout {
                entries.extend((0..seq * rank).map(|_| f32::from(u8::from(rng.uniform() >= p))));
            }
        }
        let tensor = |v: Vec<f32>, dims: Vec<usize>| -> Result<Tensor> {
            Tensor::from_vec(v, dims, device)?.to_dtype(dtype)
        };
        Ok(DropoutMasks {
            rows: match rows_on {
                true => Some(tensor(rows, vec![b, rank])?),
                false => None,
            },
            entries: match c.dropout {
                Some(_) => Some(tensor(entries, vec![b, seq, rank])?),
                None => None,
            },
            scale: 1.0 / ((1.0 - c.dropout.unwrap_or(0.0)) * (1.0 - c.rank.unwrap_or(0.0))),
        })
    }

    /// Refuses a forward whose batch is not the one the seeds were drawn for.
    pub(super) fn check_batch(&self, b: usize) -> Result<()> {
        match self.seeds.len() == b {
            true => Ok(()),
            false => Err(Error::msg(format!(
                "LoRA dropout drawn for a batch of {}, applied to a batch of {b}",
                self.seeds.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Option<Tensor>) -> Vec<f64> {
        t.as_ref().unwrap().to_vec_f64().unwrap()
    }

    #[test]
    fn masks_keep_at_the_asked_rates_and_repeat() {
        let config = LoraDropout {
            dropout: Some(0.25),
            rank: Some(0.5),
            module: None,
        };
        let draw = DropoutDraw::for_module(config, &[3, 4], 7);
        let m = draw.masks(500, 8, DType::F32, Device::Cpu).unwrap();
        let entries = values(&m.entries);
        assert_eq!(entries.len(), 2 * 500 * 8);
        let kept = entries.iter().sum::<f64>() / entries.len() as f64;
        assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
        assert!(values(&m.rows).iter().all(|&v| v == 0.0 || v == 1.0));
        assert!((m.scale - 1.0 / (0.75 * 0.5)).abs() < 1e-15);
        // The same draw gives the same masks (a recompute); another module other masks.
        let again = draw.masks(500, 8, DType::F32, Device::Cpu).unwrap();
        assert_eq!(values(&again.entries), entries);
        let other = DropoutDraw::for_module(config, &[3, 4], 8)
            .masks(500, 8, DType::F32, Device::Cpu)
            .unwrap();
        assert_ne!(values(&other.entries), entries);
        // Each sample's masks depend on its own seed alone.
        let alone = DropoutDraw::for_module(config, &[4], 7)
            .masks(500, 8, DType::F32, Device::Cpu)
            .unwrap();
        assert_eq!(values(&alone.entries), entries[4000..]);
    }

    #[test]
    fn module_dropout_zeroes_whole_rows() {
        let config = LoraDropout {
            dropout: None,
            rank: None,
            module: Some(0.5),
        };
        let seeds: Vec<u64> = (0..64).collect();
        let m = DropoutDraw { config, seeds }
            .masks(3, 4, DType::F32, Device::Cpu)
            .unwrap();
        assert!(m.entries.is_none());
        assert_eq!(m.scale, 1.0);
        let rows = values(&m.rows);
        let dropped = rows
            .chunks(4)
            .filter(|r| {
                assert!(r.iter().all(|&v| v == r[0]), "a row mixes ranks: {r:?}");
                r[0] == 0.0
            })
            .count();
        assert!((16..=48).contains(&dropped), "{dropped} of 64 dropped");
    }
}
