//! The building blocks of diffusers' `Encoder`/`Decoder` (DIF `autoencoders/vae.py`,
//! `unet_2d_blocks.py`, `resnet.py`), each loading from its own key subtree.

use super::config::VAE_NORM_EPS;
use crate::nn::{Conv2d, GroupNorm, Linear, Weights};
use crate::tensor::ConvParams;
use crate::{Result, Tensor};

const SAME_3X3: ConvParams = ConvParams {
    stride: 1,
    padding: 1,
};

/// `ResnetBlock2D` without a time embedding: GN, SiLU, conv3x3, GN, SiLU, conv3x3, plus the input
/// (through a 1x1 `conv_shortcut` when the width changes). Output scale factor is 1 in the VAE.
#[derive(Clone, Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn load(vb: &Weights, c_in: usize, c_out: usize, groups: usize) -> Result<ResnetBlock> {
        let conv_shortcut = if c_in != c_out {
            Some(Conv2d::load(
                &vb.pp("conv_shortcut"),
                c_in,
                c_out,
                1,
                ConvParams::default(),
            )?)
        } else {
            None
        };
        Ok(ResnetBlock {
            norm1: GroupNorm::load(&vb.pp("norm1"), groups, c_in, VAE_NORM_EPS)?,
            conv1: Conv2d::load(&vb.pp("conv1"), c_in, c_out, 3, SAME_3X3)?,
            norm2: GroupNorm::load(&vb.pp("norm2"), groups, c_out, VAE_NORM_EPS)?,
            conv2: Conv2d::load(&vb.pp("conv2"), c_out, c_out, 3, SAME_3X3)?,
            conv_shortcut,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?; // (B, Cout, H, W)
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?; // (B, Cout, H, W)
        match &self.conv_shortcut {
            Some(sc) => sc.forward(x)?.add(&h), // (B, Cout, H, W)
            None => x.add(&h),
        }
    }
}

/// The mid-block `Attention`: one head over all H*W positions, width C, GroupNorm on the input,
/// biased q/k/v/out projections, softmax scale C^-1/2, residual add. diffusers builds it with
/// `upcast_softmax`; the f32 default here already softmaxes in f32.
#[derive(Clone, Debug)]
pub struct SpatialSelfAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl SpatialSelfAttention {
    /// Keys are the modern `to_q/to_k/to_v/to_out.0` Linear names; the formats layer maps the
    /// pre-0.17 names and the 1x1-conv kernels onto them (`formats::diffusers::normalize_vae`).
    pub fn load(vb: &Weights, channels: usize, groups: usize) -> Result<SpatialSelfAttention> {
        let lin = |name: &str| Linear::load(&vb.pp(name), channels, channels, true);
        Ok(SpatialSelfAttention {
            group_norm: GroupNorm::load(&vb.pp("group_norm"), groups, channels, VAE_NORM_EPS)?,
            to_q: lin("to_q")?,
            to_k: lin("to_k")?,
            to_v: lin("to_v")?,
            to_out: lin("to_out.0")?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?; // (B, S, C) with S = H*W
        let head = |l: &Linear| l.forward(&tokens)?.unsqueeze(1); // (B, 1, S, C)
        let (q, k, v) = (head(&self.to_q)?, head(&self.to_k)?, head(&self.to_v)?);
        let o = Tensor::sdpa(&q, &k, &v, 1.0 / (c as f64).sqrt(), false)?.squeeze(1)?; // (B, S, C)
        let o = self.to_out.forward(&o)?; // (B, S, C)
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?; // (B, C, H, W)
        o.add(x)
    }
}

/// `UNetMidBlock2D` with one layer and no time embedding: resnet, attention (optional, from
/// `mid_block_add_attention`), resnet, all at the deepest width.
#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: [ResnetBlock; 2],
    pub attention: Option<SpatialSelfAttention>,
}

impl MidBlock {
    pub fn load(vb: &Weights, channels: usize, groups: usize, attention: bool) -> Result<MidBlock> {
        let r = vb.pp("resnets");
        let attention = if attention {
            let a = vb.pp("attentions").pp(0);
            Some(SpatialSelfAttention::load(&a, channels, groups)?)
        } else {
            None
        };
        Ok(MidBlock {
            resnets: [
                ResnetBlock::load(&r.pp(0), channels, channels, groups)?,
                ResnetBlock::load(&r.pp(1), channels, channels, groups)?,
            ],
            attention,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x)?; // (B, C, H, W)
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h)
    }
}

/// Zero-pad one row at the bottom and one column at the right: diffusers' VAE `Downsample2D`
/// (padding=0 branch) pads (0, 1, 0, 1) before a 3x3 stride-2 conv without padding. Symmetric
/// conv padding cannot express this (it would shift every window by one pixel), so the zeros are
/// concatenated; the copy is small next to the conv and needs no new primitive.
pub fn pad_right_bottom(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let row = Tensor::zeros((b, c, 1, w), x.dtype(), x.device())?;
    let x = Tensor::cat(&[x.clone(), row], 2)?; // (B, C, H+1, W)
    let col = Tensor::zeros((b, c, h + 1, 1), x.dtype(), x.device())?;
    Tensor::cat(&[x, col], 3) // (B, C, H+1, W+1)
}

/// `DownEncoderBlock2D`: resnets, then (except at the deepest level) the asymmetric-pad
/// stride-2 downsampler `downsamplers.0.conv`.
#[derive(Clone, Debug)]
pub struct DownEncoderBlock {
    pub resnets: Vec<ResnetBlock>,
    pub downsampler: Option<Conv2d>,
}

impl DownEncoderBlock {
    pub fn load(
        vb: &Weights,
        c_in: usize,
        c_out: usize,
        layers: usize,
        groups: usize,
        downsample: bool,
    ) -> Result<DownEncoderBlock> {
        let resnets = (0..layers)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                ResnetBlock::load(&vb.pp("resnets").pp(i), c, c_out, groups)
            })
            .collect::<Result<Vec<_>>>()?;
        let downsampler = if downsample {
            let p = ConvParams {
                stride: 2,
                padding: 0,
            };
            let d = vb.pp("downsamplers").pp(0).pp("conv");
            Some(Conv2d::load(&d, c_out, c_out, 3, p)?)
        } else {
            None
        };
        Ok(DownEncoderBlock {
            resnets,
            downsampler,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?; // (B, Cout, H, W)
        }
        match &self.downsampler {
            Some(conv) => conv.forward(&pad_right_bottom(&h)?), // (B, Cout, H/2, W/2) rounded down
            None => Ok(h),
        }
    }
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then (except at the last level) nearest
/// x2 upsampling and a 3x3 conv `upsamplers.0.conv`.
#[derive(Clone, Debug)]
pub struct UpDecoderBlock {
    pub resnets: Vec<ResnetBlock>,
    pub upsampler: Option<Conv2d>,
}

impl UpDecoderBlock {
    pub fn load(
        vb: &Weights,
        c_in: usize,
        c_out: usize,
        layers: usize,
        groups: usize,
        upsample: bool,
    ) -> Result<UpDecoderBlock> {
        let resnets = (0..layers)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                ResnetBlock::load(&vb.pp("resnets").pp(i), c, c_out, groups)
            })
            .collect::<Result<Vec<_>>>()?;
        let upsampler = if upsample {
            let u = vb.pp("upsamplers").pp(0).pp("conv");
            Some(Conv2d::load(&u, c_out, c_out, 3, SAME_3X3)?)
        } else {
            None
        };
        Ok(UpDecoderBlock { resnets, upsampler })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?; // (B, Cout, H, W)
        }
        match &self.upsampler {
            Some(conv) => conv.forward(&h.upsample_nearest2d(2)?), // (B, Cout, 2H, 2W)
            None => Ok(h),
        }
    }
}
