//! LyCORIS' LoHa (`--network_module lycoris.kohya --network_args algo=loha`): the update of a
//! frozen layer is the weight `dW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`, a Hadamard product of
//! two rank-r products, so a rank r reaches rank r² at the parameter count of a rank-2r LoRA.
//! The definition is lycoris-lora 4.1.3's `LohaModule` (without Tucker factors, its default):
//! the forward builds dW and runs the layer's own op with it, `y = base(x) + op(x, dW)`, op a
//! linear or the base convolution (stride, padding) on dW shaped like the base weight.
//!
//! A LoHa adapter is a [`LoraAdapter`] whose `a` / `b` are the first pair (`hada_w1_b`,
//! `hada_w1_a`) and whose [`Hadamard`] holds the second, so the optimizers, checkpoints, mixed
//! precision and the per-sample module dropout treat it as any other adapter.

use super::lora::{LoraAdapter, LoraConfig};
use crate::tensor::{ConvParams, Rng};
use crate::{DType, Device, Error, Result, Tensor};

/// LyCORIS' names of a LoHa adapter's trainables, in `LohaModule`'s parameter order.
pub const LOHA_NAMES: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

/// LoHa's second factor pair and the frozen weight's shape, which dW takes.
#[derive(Clone, Debug)]
pub struct Hadamard {
    /// `hada_w2_b`: (r, in · kh · kw).
    pub down: Tensor,
    /// `hada_w2_a`: (out, r).
    pub up: Tensor,
    /// The frozen weight's dims: (out, in) or (out, in, kh, kw).
    pub shape: Vec<usize>,
}

impl LoraAdapter {
    /// A fresh LoHa adapter for a frozen weight of `dims` ((out, in) or (out, in, kh, kw)),
    /// initialised as `LohaModule.__init__`: w1_b and w2_b N(0, 1), w1_a N(0, 0.1), w2_a zero
    /// (so dW starts at zero), drawn in that order.
    pub fn init_loha(
        dims: &[usize],
        config: LoraConfig,
        rng: &mut Rng,
        dtype: DType,
        device: Device,
    ) -> Result<LoraAdapter> {
        let (out, fan_in) = match *dims {
            [out, d_in] => (out, d_in),
            [out, c_in, kh, kw] => (out, c_in * kh * kw),
            _ => {
                return Err(Error::msg(format!(
                    "LoHa wraps a linear or a 2-d convolution, not a weight of shape {dims:?}"
                )))
            }
        };
        let r = config.rank;
        let w1_b = Tensor::randn((r, fan_in), rng, dtype, device)?.var()?;
        let w1_a = Tensor::randn((out, r), rng, dtype, device)?
            .scale(0.1)?
            .var()?;
        let w2_b = Tensor::randn((r, fan_in), rng, dtype, device)?.var()?;
        let w2_a = Tensor::zeros((out, r), dtype, device)?.var()?;
        Ok(LoraAdapter {
            a: w1_b,
            b: w1_a,
            config,
            gates: None,
            concepts: None,
            recorder: None,
            dropout: None,
            hada: Some(Hadamard {
                down: w2_b,
                up: w2_a,
                shape: dims.to_vec(),
            }),
        })
    }

    pub fn is_loha(&self) -> bool {
        self.hada.is_some()
    }

    /// LoHa's update weight `(w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r`, shaped like the frozen
    /// weight; an error for other adapters.
    pub fn loha_weight(&self) -> Result<Tensor> {
        let h = self
            .hada
            .as_ref()
            .ok_or_else(|| Error::msg("loha_weight of an adapter that is not LoHa"))?;
        let scale = self.config.alpha / self.config.rank as f64;
        self.b
            .matmul(&self.a)?
            .mul(&h.up.matmul(&h.down)?)?
            .scale(scale)?
            .reshape(h.shape.clone())
    }

    /// The frozen weight plus dW, when the layer can run once with it rather than twice (the
    /// base, then dW), which halves the layer's forward and input-gradient work: f32 weights
    /// and input (in bf16 / f16 the sum would round small updates away), no LoRA dropout (a
    /// picture's mask does not merge). None otherwise, and for LoRA.
    pub fn merged_weight(&self, base: &Tensor, input: DType) -> Result<Option<Tensor>> {
        let f32 = [input, base.dtype(), self.a.dtype()]
            .iter()
            .all(|&d| d == DType::F32);
        if self.hada.is_none() || self.dropout.is_some() || !f32 {
            return Ok(None);
        }
        base.add(&self.loha_weight()?).map(Some)
    }

    /// `base + op(x, dW)` for a linear's input (.., D_in) (`conv` None) or a convolution's
    /// (B, C_in, H, W). Under LoRA dropout, the module mask drops a sample's whole update (the
    /// network and rank dropouts are refused for LoHa before training starts).
    pub(super) fn apply_loha(
        &self,
        x: &Tensor,
        base: Option<&Tensor>,
        conv: Option<ConvParams>,
    ) -> Result<Tensor> {
        let w = self.loha_weight()?;
        let mut dh = match conv {
            Some(p) => x.conv2d(&w, None, p)?, // (B, C_out, H', W')
            None => x.matmul(&w.t()?)?,        // (.., D_out)
        };
        if let Some(draw) = &self.dropout {
            let b = dh.dims()[0];
            draw.check_batch(b)?;
            let masks = draw.masks(1, 1, dh.dtype(), dh.device())?;
            if let Some(rows) = masks.rows {
                let mut dims = vec![1; dh.rank()];
                dims[0] = b;
                dh = dh.mul(&rows.reshape(dims)?)?;
            }
        }
        match base {
            Some(y) => y.add(&dh),
            None => Ok(dh),
        }
    }

    /// Whether this adapter's factors fit a frozen weight of `dims`: LoRA's A (r, in) and B
    /// (out, r) on a linear, lora_down (r, in, kh, kw) and lora_up (out, r, 1, 1) on a
    /// convolution, LoHa's pairs (out, r) x (r, in · kh · kw) on either.
    pub fn fits(&self, dims: &[usize]) -> bool {
        let r = self.config.rank;
        if let Some(h) = &self.hada {
            let (out, fan_in) = (dims[0], dims[1..].iter().product::<usize>());
            return h.shape == dims
                && self.a.dims() == [r, fan_in]
                && self.b.dims() == [out, r]
                && h.down.dims() == [r, fan_in]
                && h.up.dims() == [out, r];
        }
        match *dims {
            [out, d_in] => self.a.dims() == [r, d_in] && self.b.dims() == [out, r],
            [out, c_in, kh, kw] => {
                self.a.dims() == [r, c_in, kh, kw] && self.b.dims() == [out, r, 1, 1]
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loha(dims: &[usize], seed: u64) -> LoraAdapter {
        let config = LoraConfig {
            rank: 3,
            alpha: 2.0,
            ..LoraConfig::default()
        };
        let mut a =
            LoraAdapter::init_loha(dims, config, &mut Rng::new(seed), DType::F32, Device::Cpu)
                .unwrap();
        a.assign(|name, d| {
            let seed = name.bytes().map(u64::from).sum();
            Tensor::randn(d.to_vec(), &mut Rng::new(seed), DType::F32, Device::Cpu)
        })
        .unwrap();
        a
    }

    /// A fresh LoHa adapter changes nothing (w2_a is zero), and its update weight is the
    /// Hadamard product of the two pairs' products times alpha / r, entry by entry.
    #[test]
    fn the_update_weight_is_the_scaled_hadamard_product() {
        let fresh = LoraAdapter::init_loha(
            &[5, 4],
            LoraConfig::default(),
            &mut Rng::new(1),
            DType::F32,
            Device::Cpu,
        )
        .unwrap();
        let w = fresh.loha_weight().unwrap().to_vec_f64().unwrap();
        assert!(w.iter().all(|&v| v == 0.0));
        let a = loha(&[5, 4], 2);
        let h = a.hada.as_ref().unwrap();
        let m = |t: &Tensor| t.to_vec_f64().unwrap();
        let (w1a, w1b, w2a, w2b) = (m(&a.b), m(&a.a), m(&h.up), m(&h.down));
        let w = m(&a.loha_weight().unwrap());
        for o in 0..5 {
            for i in 0..4 {
                let p1: f64 = (0..3).map(|k| w1a[o * 3 + k] * w1b[k * 4 + i]).sum();
                let p2: f64 = (0..3).map(|k| w2a[o * 3 + k] * w2b[k * 4 + i]).sum();
                let want = p1 * p2 * 2.0 / 3.0;
                assert!((w[o * 4 + i] - want).abs() < 1e-5 * want.abs().max(1.0));
            }
        }
    }

    /// The merged forward (one linear with W + dW) and the separate one (the base, then dW, as
    /// under dropout or bf16) give the same output and the same factor gradients.
    #[test]
    fn the_merged_forward_matches_the_separate_one() {
        use crate::nn::lora::AdaptedLinear;
        use crate::nn::Linear;
        let a = loha(&[6, 5], 6);
        let rnd = |d: &[usize], s| {
            Tensor::randn(d.to_vec(), &mut Rng::new(s), DType::F32, Device::Cpu).unwrap()
        };
        let mut layer = AdaptedLinear::new(Linear {
            weight: rnd(&[6, 5], 11),
            bias: Some(rnd(&[6], 12)),
        });
        layer.set_adapter(a.clone()).unwrap();
        let h = rnd(&[2, 3, 5], 13);
        assert!(a
            .merged_weight(&layer.base.weight, DType::F32)
            .unwrap()
            .is_some());
        let merged = layer.forward(&h).unwrap();
        let separate = a.apply(&h, Some(&layer.base.forward(&h).unwrap())).unwrap();
        let grads = |y: &Tensor| {
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            a.named()
                .iter()
                .map(|(_, t)| g.get(t).unwrap().to_vec_f64().unwrap())
                .collect::<Vec<_>>()
        };
        let close = |x: &[f64], y: &[f64]| {
            x.iter()
                .zip(y)
                .all(|(p, q)| (p - q).abs() <= 1e-4 * q.abs().max(1.0))
        };
        assert!(close(
            &merged.to_vec_f64().unwrap(),
            &separate.to_vec_f64().unwrap()
        ));
        for (m, s) in grads(&merged).iter().zip(&grads(&separate)) {
            assert!(close(m, s), "{m:?} vs {s:?}");
        }
    }

    /// On a convolution the update is the base convolution run with dW: the same as adding dW
    /// to the frozen weight.
    #[test]
    fn a_conv_update_is_the_convolution_with_the_update_weight() {
        let a = loha(&[6, 2, 3, 3], 4);
        let x = Tensor::randn((2, 2, 5, 5), &mut Rng::new(9), DType::F32, Device::Cpu).unwrap();
        let w = Tensor::randn((6, 2, 3, 3), &mut Rng::new(8), DType::F32, Device::Cpu).unwrap();
        let p = ConvParams {
            stride: 2,
            padding: 1,
        };
        let base = x.conv2d(&w, None, p).unwrap();
        let got = a.apply_conv(&x, Some(&base), p).unwrap();
        let merged = x
            .conv2d(&w.add(&a.loha_weight().unwrap()).unwrap(), None, p)
            .unwrap();
        let (g, m) = (got.to_vec_f64().unwrap(), merged.to_vec_f64().unwrap());
        assert_eq!(got.dims(), [2, 6, 3, 3]);
        for (g, m) in g.iter().zip(&m) {
            assert!((g - m).abs() < 1e-4 * m.abs().max(1.0), "{g} vs {m}");
        }
        assert!(a.fits(&[6, 2, 3, 3]) && !a.fits(&[6, 2, 1, 1]) && !a.fits(&[6, 18]));
    }
}
