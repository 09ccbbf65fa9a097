//! LPIPS (Zhang et al. 2018) with the AlexNet backbone and the lpips 0.1 linear heads
//! (SDXL.md 9; LP `lpips/lpips.py`, `pretrained_networks.py`).
//!
//! Weights come from one safetensors file holding the `lpips.LPIPS(net="alex")` state dict:
//! `net.slice{1..5}.{0,3,6,8,10}.{weight,bias}` (torchvision AlexNet `features` indices),
//! `lin{0..4}.model.1.weight` (1, C, 1, 1) (the same heads also appear as `lins.{k}.…`), and
//! the scaling buffers `scaling_layer.shift/scale` (1, 3, 1, 1). docs/LPIPS.md shows how to write
//! it. The backbone uses max pooling, which has no backward rule: LPIPS here is an evaluation
//! metric, not a training loss.

use crate::nn::{Conv2d, Weights};
use crate::tensor::ConvParams;
use crate::{DType, Device, Error, Result, Tensor};
use std::path::Path;

/// lpips' `normalize_tensor` epsilon, added to the channel norm outside the square root.
pub const LPIPS_EPS: f64 = 1e-10;

/// One AlexNet conv and whether a max pool (3, stride 2) precedes it.
struct AlexConv {
    index: usize,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    pool_before: bool,
}

/// torchvision AlexNet `features`, cut where lpips taps it: each conv + ReLU ends a slice.
#[rustfmt::skip] // one row per conv reads as the architecture table of SDXL.md 9.2
const ALEX: [AlexConv; 5] = [
    AlexConv { index: 0, c_in: 3, c_out: 64, kernel: 11, stride: 4, padding: 2, pool_before: false },
    AlexConv { index: 3, c_in: 64, c_out: 192, kernel: 5, stride: 1, padding: 2, pool_before: true },
    AlexConv { index: 6, c_in: 192, c_out: 384, kernel: 3, stride: 1, padding: 1, pool_before: true },
    AlexConv { index: 8, c_in: 384, c_out: 256, kernel: 3, stride: 1, padding: 1, pool_before: false },
    AlexConv { index: 10, c_in: 256, c_out: 256, kernel: 3, stride: 1, padding: 1, pool_before: false },
];

/// The LPIPS metric: scaling layer, AlexNet taps, unit-normalised squared differences, 1x1
/// linear heads, spatial mean, sum over the five layers.
#[derive(Clone, Debug)]
pub struct Lpips {
    /// (1, 3, 1, 1): `x' = (x - shift) / scale` maps [-1, 1] input to ImageNet statistics.
    pub shift: Tensor,
    pub scale: Tensor,
    /// `features.{0,3,6,8,10}` in tap order.
    pub convs: Vec<Conv2d>,
    /// `lin{k}.model.1.weight`, (1, C_k, 1, 1), no bias.
    pub lins: Vec<Tensor>,
}

impl Lpips {
    pub fn load(vb: &Weights) -> Result<Lpips> {
        let convs = ALEX
            .iter()
            .enumerate()
            .map(|(k, a)| {
                let p = ConvParams {
                    stride: a.stride,
                    padding: a.padding,
                };
                let w = vb.pp(format!("net.slice{}", k + 1)).pp(a.index);
                Conv2d::load(&w, a.c_in, a.c_out, a.kernel, p)
            })
            .collect::<Result<Vec<_>>>()?;
        let lins = ALEX
            .iter()
            .enumerate()
            .map(|(k, a)| {
                // `lin{k}` and `lins.{k}` are the same modules registered twice by lpips.
                let name = format!("lin{k}.model.1.weight");
                let alt = format!("lins.{k}.model.1.weight");
                let key = if vb.contains(&name) || !vb.contains(&alt) {
                    name
                } else {
                    alt
                };
                vb.get(&[1, a.c_out, 1, 1], &key)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Lpips {
            shift: vb.get(&[1, 3, 1, 1], "scaling_layer.shift")?,
            scale: vb.get(&[1, 3, 1, 1], "scaling_layer.scale")?,
            convs,
            lins,
        })
    }

    /// Loads the whole file in f32 and refuses tensors it does not know (a VGG or SqueezeNet
    /// LPIPS file, say).
    pub fn from_file(path: impl AsRef<Path>, device: Device) -> Result<Lpips> {
        let vb = Weights::from_files(&[path.as_ref()], DType::F32, device)?;
        let lpips = Lpips::load(&vb)?;
        vb.ensure_all_used(|k| k.starts_with("lins."))?;
        Ok(lpips)
    }

    /// The five post-ReLU feature maps of the scaled input.
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x.sub(&self.shift)?.div(&self.scale)?; // (N, 3, H, W)
        let mut taps = Vec::with_capacity(ALEX.len());
        for (a, conv) in ALEX.iter().zip(&self.convs) {
            if a.pool_before {
                h = h.max_pool2d(3, 2)?; // (N, C, (H-3)/2+1, (W-3)/2+1)
            }
            h = conv.forward(&h)?.relu()?; // (N, Ck, Hk, Wk)
            taps.push(h.clone());
        }
        Ok(taps)
    }

    /// Distance between image pairs in [-1, 1], both (N, 3, H, W): one value per pair, (N).
    pub fn distance(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (n, c, _, _) = a.dims4()?;
        if a.dims() != b.dims() || c != 3 {
            return Err(Error::ShapeMismatch {
                op: "lpips",
                lhs: a.shape().clone(),
                rhs: b.shape().clone(),
            });
        }
        let a = a.to_dtype(self.shift.dtype())?;
        let b = b.to_dtype(self.shift.dtype())?;
        // Both images through the backbone in one batch; the convs never mix samples.
        let both = Tensor::cat(&[a, b], 0)?; // (2N, 3, H, W)
        let mut total: Option<Tensor> = None;
        for (f, lin) in self.features(&both)?.iter().zip(&self.lins) {
            let f = unit_normalize(f)?; // (2N, Ck, Hk, Wk)
            let diff = f.narrow(0, 0, n)?.sub(&f.narrow(0, n, n)?)?.sqr()?; // (N, Ck, Hk, Wk)
            let d = diff.conv2d(lin, None, ConvParams::default())?; // (N, 1, Hk, Wk)
            let d = d.mean(&[1, 2, 3])?; // (N)
            total = Some(match total {
                Some(t) => t.add(&d)?,
                None => d,
            });
        }
        total.ok_or_else(|| Error::msg("lpips: no layers"))
    }
}

/// lpips' `normalize_tensor`: `f / (sqrt(sum_c f^2) + eps)`. Unlike `normalize_l2` (which clamps
/// the norm at eps) the epsilon is always added, which shifts every value by ~1e-10 relative.
fn unit_normalize(f: &Tensor) -> Result<Tensor> {
    let norm = f.sqr()?.sum_keepdim(&[1])?.sqrt()?.add_scalar(LPIPS_EPS)?; // (N, 1, H, W)
    f.div(&norm)
}
