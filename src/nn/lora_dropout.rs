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
//! batches of one train (identical to kohya at batch size 1). The masks are drawn from those
//! seeds whenever the forward runs, so a checkpointed segment's recompute sees the same masks,
//! and CPU and CUDA runs draw the same ones: the rank and module masks (B x r values) on the
//! host, the network-dropout mask (B x S x r, activation-sized) where the activation lives, from
//! a counter-based stream ([`entry_kept`]) that a GPU kernel computes element by element, so no
//! activation-sized mask crosses from the host.

use crate::backend::Storage;
use crate::tensor::Rng;
use crate::{DType, Device, Error, Result, Tensor};

/// SplitMix64's output function (Steele, Lea and Flood 2014): the mix applied to a state.
fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64's state increment.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The keep threshold of drop probability `p` on 53-bit draws: a draw u / 2^53 >= p exactly when
/// u >= ceil(p 2^53) (p 2^53 is exact in f64).
pub fn keep_threshold(p: f64) -> u64 {
    (p * (1u64 << 53) as f64).ceil() as u64
}

/// Whether network dropout keeps element `j` of a sample's `h A^T` (row-major over (S, r)) in
/// the module salted `salt`, for the visit seeded `seed`: the (j + 1)-th output of SplitMix64
/// started at `splitmix(seed ^ salt)`, its top 53 bits at or above `threshold`. The GPU's
/// `elementwise_dropout_mask_fwd` computes the same bits.
pub fn entry_kept(seed: u64, salt: u64, j: u64, threshold: u64) -> bool {
    let key = splitmix(seed ^ salt);
    let u = splitmix(key.wrapping_add(j.wrapping_add(1).wrapping_mul(GOLDEN)));
    u >> 11 >= threshold
}

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
#[derive(Clone, Debug)]
pub struct DropoutDraw {
    pub config: LoraDropout,
    /// Each sample's seed of this module's rank and module draws.
    pub seeds: Vec<u64>,
    /// Each sample's visit seed and this module's salt: the network-dropout streams.
    pub visit_seeds: Vec<u64>,
    pub salt: u64,
    /// `visit_seeds` on the run's GPU (i64, (B,)), uploaded once per micro-batch and shared by
    /// every module's draw (see [`DropoutDraw::with_device_seeds`]); None on the CPU.
    pub device_seeds: Option<Tensor>,
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
            visit_seeds: visit_seeds.to_vec(),
            salt,
            device_seeds: None,
        }
    }

    /// The visit seeds already on the GPU (i64, (B,)), for network-dropout masks made there.
    pub fn with_device_seeds(self, seeds: Option<Tensor>) -> DropoutDraw {
        DropoutDraw {
            device_seeds: seeds,
            ..self
        }
    }

    /// The network-dropout keep mask, 0 or 1, (B, `n`): on a GPU written by its kernel from the
    /// device seeds, else computed here; the same bits either way.
    fn entry_mask(&self, n: usize, p: f64, dtype: DType, device: Device) -> Result<Tensor> {
        let b = self.visit_seeds.len();
        let threshold = keep_threshold(p);
        let float = matches!(dtype, DType::F32 | DType::BF16 | DType::F16);
        if let (Device::Cuda(i), Some(seeds), true) = (device, &self.device_seeds, float) {
            if seeds.elem_count() != b || seeds.dtype() != DType::I64 {
                return Err(Error::msg(format!(
                    "LoRA dropout: {} device seeds ({:?}) for a batch of {b}",
                    seeds.elem_count(),
                    seeds.dtype()
                )));
            }
            let dev = crate::backend::cuda::device(i)?;
            let guard = seeds.storage();
            let Storage::Cuda(s) = &*guard else {
                return Err(Error::msg("LoRA dropout: device seeds are not on the GPU"));
            };
            let ptr = s.ptr_at(seeds.layout().offset());
            let out = crate::backend::cuda::elementwise::dropout_mask(
                &dev, dtype, ptr, b, n, self.salt, threshold,
            )?;
            return Ok(Tensor::from_storage(Storage::Cuda(out), (b, n), None));
        }
        let mut mask = Vec::with_capacity(b * n);
        for &seed in &self.visit_seeds {
            mask.extend(
                (0..n as u64)
                    .map(|j| f32::from(u8::from(entry_kept(seed, self.salt, j, threshold)))),
            );
        }
        Tensor::from_vec(mask, (b, n), device)?.to_dtype(dtype)
    }

    /// The masks of a forward on `h A^T` of shape (B, `seq`, `rank`), B = the number of seeds.
    /// Each sample draws its row mask from its own seed, in this order: the module's draw, one
    /// per rank (each only when that dropout is on); the entries come from [`entry_kept`].
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
        for &seed in &self.seeds {
            let mut rng = Rng::new(seed);
            let kept = c.module.is_none_or(|p| rng.uniform() >= p);
            if rows_on {
                for _ in 0..rank {
                    let rank_kept = c.rank.is_none_or(|p| rng.uniform() > p);
                    rows.push(f32::from(u8::from(kept && rank_kept)));
                }
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
                Some(p) => Some(
                    self.entry_mask(seq * rank, p, dtype, device)?
                        .reshape((b, seq, rank))?,
                ),
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

    /// p = 0 keeps every entry, p = 1 none; the threshold is exact at 53 bits.
    #[test]
    fn entry_thresholds_are_exact() {
        assert_eq!(keep_threshold(0.0), 0);
        assert_eq!(keep_threshold(1.0), 1 << 53);
        assert_eq!(keep_threshold(0.5), 1 << 52);
        // 0.1 * 2^53 = 900719925474099.2, so draws from 900719925474100 up are kept.
        assert_eq!(keep_threshold(0.1), 900_719_925_474_100);
        for j in 0..1000 {
            assert!(entry_kept(9, 3, j, keep_threshold(0.0)));
            assert!(!entry_kept(9, 3, j, keep_threshold(1.0)));
        }
        // Streams differ by seed, salt and element.
        let stream = |seed, salt| -> Vec<bool> {
            (0..64)
                .map(|j| entry_kept(seed, salt, j, keep_threshold(0.5)))
                .collect()
        };
        assert_ne!(stream(1, 2), stream(2, 2));
        assert_ne!(stream(1, 2), stream(1, 3));
    }

    #[test]
    fn module_dropout_zeroes_whole_rows() {
        let config = LoraDropout {
            dropout: None,
            rank: None,
            module: Some(0.5),
        };
        let seeds: Vec<u64> = (0..64).collect();
        let m = DropoutDraw::for_module(config, &seeds, 0)
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
