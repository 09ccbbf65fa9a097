//! The validation loss (`--val-data`): held-out pictures that never train, scored with the live
//! adapters on the same draws every time, so the curve moves only when the adapter does. Each
//! picture's posterior mean (no latent sampling) is noised at four fixed points of the schedule,
//! the middles of its quarters, with noise from a fixed seed per (picture, point), and the
//! plain mean squared error of the model's training target is averaged over all of them: no
//! Min-SNR, debiased or v-prediction-scale weights, no alpha mask, no other --loss-type and no
//! cultural term, so runs with different settings compare.

use super::examples::Example;
use super::step::{training_loss, Conditioning};
use super::trainer::Trainer;
use crate::tensor::Rng;
use crate::{DType, Error, Result, Tensor};
use std::io::Write;
use std::path::Path;

/// Noise levels scored per picture.
pub const POINTS: usize = 4;

/// The schedule indices scored: the middles of the schedule's `POINTS` equal parts (125, 375,
/// 625 and 875 of 1000 steps).
pub fn points(len: usize) -> [usize; POINTS] {
    std::array::from_fn(|k| ((2 * k + 1) * len / (2 * POINTS)).min(len.saturating_sub(1)))
}

/// The seed of picture `i`'s noise at point `k`: fixed by the run's seed, independent of the
/// training draws.
fn noise_seed(seed: u64, i: usize, k: usize) -> u64 {
    seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(0x7661_6c00 + (i * POINTS + k) as u64)
}

impl Trainer {
    /// The mean validation loss over the held-out pictures (None without `--val-data`).
    pub fn validation_loss(&self) -> Result<Option<f64>> {
        if self.val_examples.is_empty() {
            return Ok(None);
        }
        // The plain MSE whatever the training loss is: no weights, no other loss type.
        let mut schedule = self.schedule.clone().unweighted();
        schedule.loss_type = crate::sample::schedule::LossType::L2;
        let at = points(schedule.len());
        let mut sum = 0.0;
        crate::autograd::no_grad(|| -> Result<()> {
            for (i, ex) in self.val_examples.iter().enumerate() {
                sum += self.example_loss(ex, i, &at, &schedule)?;
            }
            Ok(())
        })?;
        let n = (self.val_examples.len() * POINTS) as f64;
        let loss = sum / n;
        if !loss.is_finite() {
            return Err(Error::msg(format!(
                "the validation loss became {loss} at step {}",
                self.state.step
            )));
        }
        Ok(Some(loss))
    }

    /// The summed loss of one held-out picture over the points.
    fn example_loss(
        &self,
        ex: &Example,
        i: usize,
        at: &[usize; POINTS],
        schedule: &crate::sample::TrainSchedule,
    ) -> Result<f64> {
        let device = self.cfg.device;
        let x0 = self.latent_config.scale_latents(&ex.mean)?; // (1, 4, h, w)
        let (context, pooled) = self.conditioning(&ex.text)?;
        let cond = Conditioning {
            context: &context,
            pooled: &pooled,
            time_ids: &ex.time_ids,
            loss_mask: None,
        };
        let mut sum = 0.0;
        for (k, &t) in at.iter().enumerate() {
            let mut rng = Rng::new(noise_seed(self.cfg.seed, i, k));
            let noise = Tensor::randn(x0.dims().to_vec(), &mut rng, DType::F32, device)?; // (1, 4, h, w)
            let losses = training_loss(&self.unet, None, schedule, &x0, &noise, &[t], &cond)?;
            sum += losses.diffusion.to_scalar()?;
        }
        Ok(sum)
    }

    /// Appends `step,val_loss` to the validation log (writing its header first when new).
    pub(super) fn log_validation(&self, step: u64, loss: f64) -> Result<()> {
        let path = &self.outputs.val_csv;
        let fresh = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        if fresh {
            writeln!(f, "step,val_loss").map_err(|e| Error::io(path, e))?;
        }
        writeln!(f, "{step},{loss}").map_err(|e| Error::io(path, e))?;
        f.flush().map_err(|e| Error::io(path, e))
    }
}

/// (step, validation loss) pairs of a validation log; none when it does not exist.
pub fn read_val_log(path: &Path) -> Result<Vec<(u64, f64)>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (step, loss) = l.split_once(',')?;
            Some((step.parse().ok()?, loss.parse().ok()?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_the_middles_of_the_schedule_quarters() {
        assert_eq!(points(1000), [125, 375, 625, 875]);
        assert_eq!(points(40), [5, 15, 25, 35]);
        assert_eq!(points(2), [0, 0, 1, 1]);
        let seeds: std::collections::BTreeSet<u64> = (0..3)
            .flat_map(|i| (0..POINTS).map(move |k| noise_seed(7, i, k)))
            .collect();
        assert_eq!(seeds.len(), 3 * POINTS);
    }
}
