//! DoRA, weight-decomposed LoRA (`--dora-wd`: LyCORIS' `dora_wd=True`, lycoris-lora 4.1.3's
//! `LoConModule` with `weight_decompose=True`, its default `wd_on_out`; on `--algo loha` / `lokr`
//! its `LohaModule` / `LokrModule` with the same epilogue, DoHa / DoKr): the update is merged
//! into the frozen weight and each output row of the sum is rescaled to a trained magnitude,
//!
//! ```text
//! W' = (W + dW) · m / (‖W + dW‖_row + eps)      dW = B A · alpha / r (LoRA; shaped like W)
//! y  = base(x) + op(x, W' − W)                   op: the layer's linear or convolution
//! ```
//!
//! with m (out, 1[, 1, 1]) starting at the row norms of W (so W' = W while B is zero) and eps
//! f32's machine epsilon (LyCORIS takes the magnitude's dtype's). The norm is not detached: the
//! gradient flows through it, as in LyCORIS. The sum is formed in f32 whatever the compute
//! dtype (W + dW would round small updates away in bf16), and `op(x, W')` replaces
//! `base(x) + op(x, W' − W)` where nothing is lost by it (f32 throughout, no per-sample mask,
//! strength 1: [`LoraAdapter::merged_weight`]).
//! At strength s ≠ 1 (`--lora FILE:s`) the layer runs `base(x) + s · op(x, W' − W)`, which is
//! what ComfyUI and kstyle's loader make of a `dora_scale` file merged at s.

use super::lora::LoraAdapter;
use crate::tensor::ConvParams;
use crate::{DType, Error, Result, Tensor};

/// A DoRA adapter's magnitude and the strength it runs at.
#[derive(Clone, Debug)]
pub struct Dora {
    /// `dora_scale` (out, 1) for a linear, (out, 1, 1, 1) for a convolution.
    pub magnitude: Tensor,
    /// 1 in training; the `--lora FILE:s` strength in inference.
    pub strength: f64,
}

/// LyCORIS' eps in f32, the dtype its magnitude trains in.
const EPS: f64 = f32::EPSILON as f64;

/// The norm of each output row of `w` (out, ..), shaped (out, 1, ..) like the magnitude.
fn row_norms(w: &Tensor) -> Result<Tensor> {
    let out = w.dims()[0];
    let mut dims = vec![1; w.rank()];
    dims[0] = out;
    w.reshape((out, w.elem_count() / out.max(1)))?
        .sqr()?
        .sum_keepdim(&[1])?
        .sqrt()?
        .reshape(dims)
}

impl LoraAdapter {
    /// Turns this LoRA adapter into DoRA on the frozen weight `base`: the magnitude starts at
    /// `base`'s row norms, in f32, trainable.
    pub fn with_dora(mut self, base: &Tensor) -> Result<LoraAdapter> {
        if self.gates.is_some() {
            return Err(Error::msg("DoRA wraps a plain LoRA, LoHa or LoKr adapter"));
        }
        let magnitude = row_norms(&base.detach().to_dtype(DType::F32)?)?.var()?;
        self.dora = Some(Dora {
            magnitude,
            strength: 1.0,
        });
        Ok(self)
    }

    /// Sets the magnitude to the row norms of `base + dW` for the adapter's present update, so
    /// that W' is W + dW (to eps): a DoRA run continuing a plain LoRA, LoHa or LoKr starts where
    /// that adapter is, as PEFT's DoRA layer takes its magnitude from the weight with the LoRA
    /// update already in it.
    pub fn dora_from_update(&mut self, base: &Tensor) -> Result<()> {
        let magnitude = crate::autograd::no_grad(|| {
            let merged = base
                .detach()
                .to_dtype(DType::F32)?
                .add(&self.lora_weight_f32(base.dims())?)?;
            row_norms(&merged)
        })?
        .var()?;
        match &mut self.dora {
            Some(d) => d.magnitude = magnitude,
            None => return Err(Error::msg("dora_from_update without DoRA")),
        }
        Ok(())
    }

    /// dW in f32, shaped like the frozen weight `shape`: LoRA's B A · alpha / r (lora_up
    /// (out, r[, 1, 1]) times lora_down (r, in[, kh, kw]) flattened), or LoHa's / LoKr's update
    /// ([`LoraAdapter::lycoris_weight`]).
    fn lora_weight_f32(&self, shape: &[usize]) -> Result<Tensor> {
        if self.lycoris.is_some() {
            return self
                .lycoris_weight()?
                .to_dtype(DType::F32)?
                .reshape(shape.to_vec());
        }
        let r = self.config.rank;
        let (a, b) = (self.a.to_dtype(DType::F32)?, self.b.to_dtype(DType::F32)?);
        let down = a.reshape((r, a.elem_count() / r.max(1)))?;
        let up = b.reshape((b.dims()[0], r))?;
        up.matmul(&down)?
            .scale(self.config.alpha / r as f64)?
            .reshape(shape.to_vec())
    }

    /// W' = (W + dW) · m / (‖W + dW‖_row + eps) in f32 for the frozen weight `base`; None
    /// without DoRA.
    pub fn dora_weight(&self, base: &Tensor) -> Result<Option<Tensor>> {
        let Some(d) = &self.dora else {
            return Ok(None);
        };
        let merged = base
            .detach()
            .to_dtype(DType::F32)?
            .add(&self.lora_weight_f32(base.dims())?)?;
        let scale = d
            .magnitude
            .to_dtype(DType::F32)?
            .div(&row_norms(&merged)?.add_scalar(EPS)?)?;
        merged.mul(&scale).map(Some)
    }

    /// `base + s · op(x, W' − W)` for the frozen `weight`, its output `base` on `x` (a linear's
    /// input (.., D_in) with `conv` None, or a convolution's (B, C_in, H, W)), and the strength
    /// s, under LoRA dropout with the module mask ([`LoraAdapter::drop_modules`]).
    pub(super) fn apply_dora(
        &self,
        x: &Tensor,
        weight: &Tensor,
        base: &Tensor,
        conv: Option<ConvParams>,
    ) -> Result<Tensor> {
        let (Some(d), Some(w)) = (&self.dora, self.dora_weight(weight)?) else {
            return Err(Error::msg("apply_dora without DoRA"));
        };
        let delta = w.sub(&weight.detach().to_dtype(DType::F32)?)?; // f32, like W
        let delta = delta.scale(d.strength)?.to_dtype(x.dtype())?;
        let dh = match conv {
            Some(p) => x.conv2d(&delta, None, p)?, // (B, C_out, H', W')
            None => x.linear(&delta, None)?,       // (.., D_out)
        };
        base.add(&self.drop_modules(dh)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::lora::LoraConfig;
    use crate::tensor::Rng;
    use crate::Device;

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().to_vec_f64().unwrap()
    }

    fn dora(dims: &[usize], seed: u64) -> (LoraAdapter, Tensor) {
        let mut rng = Rng::new(seed);
        let config = LoraConfig {
            rank: 3,
            alpha: 2.0,
            ..LoraConfig::default()
        };
        let base = Tensor::randn(dims.to_vec(), &mut rng, DType::F32, Device::Cpu).unwrap();
        let mut a =
            LoraAdapter::init_plain(dims, config, &mut rng, DType::F32, Device::Cpu).unwrap();
        a.b = Tensor::randn(a.b.dims().to_vec(), &mut rng, DType::F32, Device::Cpu)
            .unwrap()
            .scale(0.1)
            .unwrap();
        (a.with_dora(&base).unwrap(), base)
    }

    /// With B zero the decomposed weight is the frozen one (m starts at its row norms).
    #[test]
    fn a_fresh_dora_adapter_leaves_the_weight_as_it_was() {
        let mut rng = Rng::new(1);
        let base = Tensor::randn(vec![5, 7], &mut rng, DType::F32, Device::Cpu).unwrap();
        let a = LoraAdapter::init_plain(
            &[5, 7],
            LoraConfig::default(),
            &mut rng,
            DType::F32,
            Device::Cpu,
        )
        .unwrap()
        .with_dora(&base)
        .unwrap();
        let w = a.dora_weight(&base).unwrap().unwrap();
        for (x, y) in values(&w).iter().zip(values(&base)) {
            assert!((x - y).abs() < 1e-6 * (1.0 + y.abs()), "{x} {y}");
        }
    }

    /// Each output row of W' has norm m (up to eps), along W + dW, for a linear and a conv.
    #[test]
    fn every_row_takes_its_magnitude() {
        for dims in [vec![4, 6], vec![4, 3, 3, 3]] {
            let (mut a, base) = dora(&dims, 2);
            let m: Vec<f64> = (0..4).map(|i| 0.5 + i as f64).collect();
            let mut mdims = vec![1; dims.len()];
            mdims[0] = 4;
            a.dora.as_mut().unwrap().magnitude = Tensor::from_vec(
                m.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
                mdims,
                Device::Cpu,
            )
            .unwrap();
            let w = values(&a.dora_weight(&base).unwrap().unwrap());
            let dw = values(&a.lora_weight_f32(&dims).unwrap());
            let merged: Vec<f64> = values(&base).iter().zip(&dw).map(|(x, d)| x + d).collect();
            let n = w.len() / 4;
            for o in 0..4 {
                let row = &w[o * n..(o + 1) * n];
                let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
                assert!((norm - m[o]).abs() < 1e-5, "{dims:?} row {o}: {norm}");
                let src = &merged[o * n..(o + 1) * n];
                let k = row[0] / src[0];
                assert!(row.iter().zip(src).all(|(r, s)| (r - k * s).abs() < 1e-5));
            }
        }
    }

    /// The merged op (f32, strength 1, no mask) and base + s op(x, W' - W) agree.
    #[test]
    fn the_merged_forward_matches_base_plus_the_delta() {
        let (a, base) = dora(&[6, 5], 3);
        let mut rng = Rng::new(9);
        let x = Tensor::randn(vec![2, 4, 5], &mut rng, DType::F32, Device::Cpu).unwrap();
        let bias = Tensor::randn(vec![6], &mut rng, DType::F32, Device::Cpu).unwrap();
        let w = a.merged_weight(&base, DType::F32).unwrap().unwrap();
        let merged = values(&x.linear(&w, Some(&bias)).unwrap());
        let y0 = x.linear(&base, Some(&bias)).unwrap();
        let full = values(&a.apply_dora(&x, &base, &y0, None).unwrap());
        let mut half = a.clone();
        half.dora.as_mut().unwrap().strength = 0.5;
        assert!(half.merged_weight(&base, DType::F32).unwrap().is_none());
        let y_half = values(&half.apply_dora(&x, &base, &y0, None).unwrap());
        for (((m, f), h), b) in merged.iter().zip(&full).zip(&y_half).zip(values(&y0)) {
            assert!((m - f).abs() < 1e-5, "{m} {f}");
            assert!((h - (b + 0.5 * (m - b))).abs() < 1e-5, "{m} {h} {b}");
        }
    }
}
