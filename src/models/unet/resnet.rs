//! `ResnetBlock2D` with additive time conditioning, and the stride-2 / nearest-x2 resamplers
//! (SDXL.md 1.5, 1.7).

use super::{conv_with_bias, ParamShapes};
use crate::nn::lora::{Adaptable, AdaptableRef, AdaptedConv2d, AdaptedLinear};
use crate::nn::{GroupNorm, Linear, Weights};
use crate::tensor::ConvParams;
use crate::{Error, Result, Tensor};

const SAME_3X3: ConvParams = ConvParams {
    stride: 1,
    padding: 1,
};

/// Sizes of one resnet.
#[derive(Clone, Copy, Debug)]
pub struct ResnetDims {
    pub c_in: usize,
    pub c_out: usize,
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: AdaptedConv2d,
    pub time_emb_proj: AdaptedLinear,
    pub norm2: GroupNorm,
    pub conv2: AdaptedConv2d,
    /// 1x1 projection of the input when the width changes.
    pub conv_shortcut: Option<AdaptedConv2d>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(vb: &Weights, d: ResnetDims) -> Result<ResnetBlock2D> {
        let conv_shortcut = if d.c_in != d.c_out {
            Some(AdaptedConv2d::new(conv_with_bias(
                &vb.pp("conv_shortcut"),
                d.c_in,
                d.c_out,
                1,
                ConvParams::default(),
            )?))
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(&vb.pp("norm1"), d.groups, d.c_in, d.eps)?,
            conv1: AdaptedConv2d::new(conv_with_bias(
                &vb.pp("conv1"),
                d.c_in,
                d.c_out,
                3,
                SAME_3X3,
            )?),
            time_emb_proj: AdaptedLinear::new(Linear::load(
                &vb.pp("time_emb_proj"),
                d.temb,
                d.c_out,
                true,
            )?),
            norm2: GroupNorm::load(&vb.pp("norm2"), d.groups, d.c_out, d.eps)?,
            conv2: AdaptedConv2d::new(conv_with_bias(
                &vb.pp("conv2"),
                d.c_out,
                d.c_out,
                3,
                SAME_3X3,
            )?),
            conv_shortcut,
            output_scale_factor: d.output_scale_factor,
        })
    }

    pub fn shapes(out: &mut ParamShapes, p: &str, d: ResnetDims) {
        out.norm(&format!("{p}.norm1"), d.c_in);
        out.conv(&format!("{p}.conv1"), d.c_in, d.c_out, 3);
        out.linear(&format!("{p}.time_emb_proj"), d.temb, d.c_out, true);
        out.norm(&format!("{p}.norm2"), d.c_out);
        out.conv(&format!("{p}.conv2"), d.c_out, d.c_out, 3);
        if d.c_in != d.c_out {
            out.conv(&format!("{p}.conv_shortcut"), d.c_in, d.c_out, 1);
        }
    }

    /// What kohya's conv LoRA wraps in a resnet, in `named_modules` order (`conv1`,
    /// `time_emb_proj`, `conv2`, `conv_shortcut`), under `p`.
    pub fn adaptable_mut<'a>(&'a mut self, p: &str, out: &mut Vec<(String, Adaptable<'a>)>) {
        out.push((format!("{p}.conv1"), Adaptable::Conv(&mut self.conv1)));
        out.push((
            format!("{p}.time_emb_proj"),
            Adaptable::Linear(&mut self.time_emb_proj),
        ));
        out.push((format!("{p}.conv2"), Adaptable::Conv(&mut self.conv2)));
        if let Some(c) = &mut self.conv_shortcut {
            out.push((format!("{p}.conv_shortcut"), Adaptable::Conv(c)));
        }
    }

    /// [`ResnetBlock2D::adaptable_mut`]'s layers as (path, adapter, base weight).
    pub fn adaptable<'a>(&'a self, p: &str, out: &mut Vec<AdaptableRef<'a>>) {
        out.push(AdaptableRef::conv(format!("{p}.conv1"), &self.conv1));
        out.push(AdaptableRef::linear(
            format!("{p}.time_emb_proj"),
            &self.time_emb_proj,
        ));
        out.push(AdaptableRef::conv(format!("{p}.conv2"), &self.conv2));
        if let Some(c) = &self.conv_shortcut {
            out.push(AdaptableRef::conv(format!("{p}.conv_shortcut"), c));
        }
    }

    /// x (B, Cin, H, W), temb (B, D) -> (B, Cout, H, W).
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?; // (B, Cout, H, W)
        let t = self.time_emb_proj.forward(&temb.silu()?)?; // (B, Cout)
        let (b, c) = t.dims2()?;
        // The time embedding joins after conv1 and before norm2 ("default" scale-shift mode).
        let h = h.add(&t.reshape((b, c, 1, 1))?)?; // (B, Cout, H, W)
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?; // (B, Cout, H, W)
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?, // (B, Cout, H, W)
            None => x.clone(),
        };
        let y = shortcut.add(&h)?; // (B, Cout, H, W)
        if self.output_scale_factor == 1.0 {
            Ok(y)
        } else {
            y.scale(1.0 / self.output_scale_factor)
        }
    }
}

/// 3x3 stride-2 convolution: H -> floor((H + 2p - 3) / 2) + 1 (ceil(H / 2) for p = 1).
#[derive(Clone, Debug)]
pub struct Downsample2D {
    pub conv: AdaptedConv2d,
}

impl Downsample2D {
    pub fn load(vb: &Weights, channels: usize, padding: usize) -> Result<Downsample2D> {
        let params = ConvParams { stride: 2, padding };
        Ok(Downsample2D {
            conv: AdaptedConv2d::new(conv_with_bias(
                &vb.pp("conv"),
                channels,
                channels,
                3,
                params,
            )?),
        })
    }

    pub fn shapes(out: &mut ParamShapes, p: &str, channels: usize) {
        out.conv(&format!("{p}.conv"), channels, channels, 3);
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x) // (B, C, ceil(H/2), ceil(W/2))
    }
}

/// Nearest-neighbour upsampling to `size` (twice the input unless the caller passes the skip
/// connection's size), then a 3x3 convolution.
#[derive(Clone, Debug)]
pub struct Upsample2D {
    pub conv: AdaptedConv2d,
}

impl Upsample2D {
    pub fn load(vb: &Weights, channels: usize) -> Result<Upsample2D> {
        Ok(Upsample2D {
            conv: AdaptedConv2d::new(conv_with_bias(
                &vb.pp("conv"),
                channels,
                channels,
                3,
                SAME_3X3,
            )?),
        })
    }

    pub fn shapes(out: &mut ParamShapes, p: &str, channels: usize) {
        out.conv(&format!("{p}.conv"), channels, channels, 3);
    }

    /// x (B, C, H, W) -> (B, C, size.0, size.1), default (2H, 2W).
    ///
    /// diffusers passes the skip's size when the latent is not a multiple of 2^upsamplers
    /// (`forward_upsample_size`), and PyTorch's nearest rule picks source index
    /// floor(dst * in / out). The down path halves with ceil, so every target is 2H or 2H - 1;
    /// for 2H - 1 that rule gives floor(dst / 2) too (dst * H / (2H - 1) stays below
    /// floor(dst / 2) + 1 for dst < 2H - 1), which is x2 upsampling cropped to the target.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let up = x.upsample_nearest2d(2)?; // (B, C, 2H, 2W)
        let up = match size {
            None => up,
            Some((th, tw)) => {
                let fits = |t: usize, s: usize| t == 2 * s || (t + 1 == 2 * s && t > 0);
                if !fits(th, h) || !fits(tw, w) {
                    return Err(Error::bad_shape(
                        "upsample",
                        format!("target size ({th}, {tw}) is not twice the input, or one less"),
                        x.dims(),
                    ));
                }
                up.narrow(2, 0, th)?.narrow(3, 0, tw)? // (B, C, th, tw)
            }
        };
        self.conv.forward(&up) // (B, C, H', W')
    }
}
