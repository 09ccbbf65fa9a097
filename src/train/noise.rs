//! kohya's noise shapes for a training visit (sd-scripts' `custom_train_functions` and
//! `train_util.get_noise_noisy_latents_and_timesteps`): the noise offset with its random strength
//! and adaptive scale, and multi-resolution ("pyramid") noise. Both are checked against PyTorch
//! on recorded draws (`tests/fixtures/extra/gen_train_noise.py`, tests/train_noise.rs).
//!
//! kohya shapes a whole batch at once; here each visit is shaped alone (its strength drawn and
//! its pyramid normalised per picture), so a batch computes what the same visits compute one at
//! a time. At batch size 1 the two agree.

use crate::tensor::Rng;
use crate::{DType, Device, Error, Result, Tensor};

/// Where a visit's draws come from: the run's generator, or a replay of a reference's draws.
pub trait Draws {
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64;
    /// Standard normal values of `shape`, an f32 tensor on the CPU.
    fn randn(&mut self, shape: &[usize]) -> Result<Tensor>;
}

impl Draws for Rng {
    fn uniform(&mut self) -> f64 {
        Rng::uniform(self)
    }

    fn randn(&mut self, shape: &[usize]) -> Result<Tensor> {
        Tensor::randn(shape.to_vec(), self, DType::F32, Device::Cpu)
    }
}

/// kohya's `--noise_offset` with `--noise_offset_random_strength` and `--adaptive_noise_scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseOffset {
    pub offset: f64,
    /// The offset times one U[0, 1) draw per visit.
    pub random_strength: bool,
    /// Each channel's offset plus this times |the channel's mean of x0|, floored at 0.
    pub adaptive: Option<f64>,
}

impl NoiseOffset {
    /// `noise` plus the offset, for clean latents `x0` (both (B, C, H, W), same device): with
    /// random strength one uniform draw first, then one N(0, 1) draw `d` per sample and channel;
    /// `noise + s * d` with `s = strength` or, adaptive, `max(0, strength + a |mean_hw x0|)`.
    pub fn apply(&self, noise: &Tensor, x0: &Tensor, draws: &mut impl Draws) -> Result<Tensor> {
        let (b, c, _, _) = x0.dims4()?;
        let strength = match self.random_strength {
            true => draws.uniform() * self.offset,
            false => self.offset,
        };
        let d = draws.randn(&[b, c, 1, 1])?.to_device(noise.device())?; // (B, C, 1, 1)
        let shift = match self.adaptive {
            None => d.scale(strength)?,
            Some(a) => {
                let mean = x0.to_dtype(DType::F32)?.mean_keepdim(&[2, 3])?; // (B, C, 1, 1)
                d.mul(&mean.abs()?.affine(a, strength)?.clamp_min(0.0)?)?
            }
        };
        noise.add(&shift)
    }
}

/// kohya's `--multires_noise_iterations` and `--multires_noise_discount`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Multires {
    pub iterations: usize,
    pub discount: f64,
}

impl Multires {
    /// kohya's `pyramid_noise_like` over `noise` (B, C, H, W): for each level i, r = 2 + 2u (one
    /// uniform draw), then an N(0, 1) draw of (B, C, max(1, int(H / r^i)), max(1, int(W / r^i)))
    /// resized bilinearly to (H, W) and added times discount^i, stopping after a level of side 1;
    /// then the sum over its unbiased standard deviation. On the host in f64; f32 on `noise`'s
    /// device.
    pub fn apply(&self, noise: &Tensor, draws: &mut impl Draws) -> Result<Tensor> {
        let (b, c, h, w) = noise.dims4()?;
        let mut acc = noise.to_vec_f64()?;
        for i in 0..self.iterations {
            let r = 2.0 + 2.0 * draws.uniform();
            // Python's float power and int(), as kohya's code sizes the level.
            let side = |n: usize| ((n as f64 / r.powf(i as f64)) as usize).max(1);
            let (hn, wn) = (side(h), side(w));
            let level = draws.randn(&[b, c, hn, wn])?.to_vec_f64()?;
            add_bilinear(
                &level,
                (hn, wn),
                (h, w),
                self.discount.powf(i as f64),
                &mut acc,
            );
            if hn == 1 || wn == 1 {
                break;
            }
        }
        let n = acc.len() as f64;
        let mean = acc.iter().sum::<f64>() / n;
        let var = acc.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
        if !(var.is_finite() && var > 0.0) {
            return Err(Error::msg(format!(
                "multires noise of {:?} has no spread to normalise",
                noise.dims()
            )));
        }
        let std = var.sqrt();
        let out: Vec<f64> = acc.iter().map(|v| v / std).collect();
        Tensor::from_vec(out, vec![b, c, h, w], Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_device(noise.device())
    }
}

/// Per output index along one axis: the two source indices and the second one's weight, as
/// PyTorch's bilinear resize (align_corners False) reads them: source `max(0, (d + 0.5) n/out -
/// 0.5)`, its floor and the next index (clamped to the edge).
fn taps(n: usize, out: usize) -> Vec<(usize, usize, f64)> {
    let scale = n as f64 / out as f64;
    (0..out)
        .map(|d| {
            let src = (scale * (d as f64 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(n - 1);
            let i1 = if i0 + 1 < n { i0 + 1 } else { i0 };
            (i0, i1, src - i0 as f64)
        })
        .collect()
}

/// `acc += weight * resize(level)`: every (hn, wn) plane of `level` resized bilinearly to (h, w)
/// and added to the matching plane of `acc`.
fn add_bilinear(
    level: &[f64],
    (hn, wn): (usize, usize),
    (h, w): (usize, usize),
    weight: f64,
    acc: &mut [f64],
) {
    let (rows, cols) = (taps(hn, h), taps(wn, w));
    for (src, dst) in level.chunks(hn * wn).zip(acc.chunks_mut(h * w)) {
        for (y, &(y0, y1, ly)) in rows.iter().enumerate() {
            for (x, &(x0, x1, lx)) in cols.iter().enumerate() {
                let at = |yy: usize, xx: usize| src[yy * wn + xx];
                let top = (1.0 - lx) * at(y0, x0) + lx * at(y0, x1);
                let bottom = (1.0 - lx) * at(y1, x0) + lx * at(y1, x1);
                dst[y * w + x] += weight * ((1.0 - ly) * top + ly * bottom);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resize to the same size is a copy, and a 1x1 plane spreads one value everywhere.
    #[test]
    fn bilinear_edges() {
        let src: Vec<f64> = (0..12).map(|v| v as f64).collect();
        let mut acc = vec![0.0; 12];
        add_bilinear(&src, (3, 4), (3, 4), 1.0, &mut acc);
        assert_eq!(acc, src);
        let mut acc = vec![1.0; 6];
        add_bilinear(&[2.5], (1, 1), (2, 3), 2.0, &mut acc);
        assert_eq!(acc, vec![6.0; 6]);
    }
}
