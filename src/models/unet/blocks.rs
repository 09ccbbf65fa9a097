//! The UNet's down, mid and up blocks (`DownBlock2D` / `CrossAttnDownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `UpBlock2D` / `CrossAttnUpBlock2D`) and their skip-connection
//! bookkeeping (SDXL.md 1.8). A block without attention is the same type with no transformers.

use super::config::{AttnPlan, DownPlan, MidPlan, UNetConfig, UpPlan};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetDims, Upsample2D};
use super::transformer::{BlockCounter, Transformer2DModel, TransformerDims};
use super::ParamShapes;
use crate::nn::lora::{Adaptable, AdaptableRef, AdaptedConv2d, AdaptedLinear};
use crate::nn::Weights;
use crate::{Error, Result, Tensor};

/// Everything a block needs besides its input.
pub struct BlockInputs<'a> {
    /// (B, D) time + added conditioning.
    pub temb: &'a Tensor,
    /// (B, T, Dc) text context.
    pub context: &'a Tensor,
}

fn resnet_dims(cfg: &UNetConfig, (c_in, c_out): (usize, usize), scale: f64) -> ResnetDims {
    ResnetDims {
        c_in,
        c_out,
        temb: cfg.time_embed_dim,
        groups: cfg.norm_num_groups,
        eps: cfg.norm_eps,
        output_scale_factor: scale,
    }
}

fn transformer_dims(
    cfg: &UNetConfig,
    a: &AttnPlan,
    channels: usize,
    layer: usize,
) -> TransformerDims {
    TransformerDims {
        channels,
        heads: a.heads,
        depth: a.depths[layer],
        cross_dim: a.cross_dim,
        groups: cfg.norm_num_groups,
        linear_projection: cfg.use_linear_projection,
    }
}

fn check_heads(a: &AttnPlan, channels: usize, block: &str) -> Result<()> {
    if a.heads > channels {
        return Err(Error::Config(format!(
            "unet config: {block} has {} attention heads for {channels} channels",
            a.heads
        )));
    }
    Ok(())
}

/// Resnets (each optionally followed by a transformer) and an optional downsampler.
#[derive(Clone, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock {
    pub fn load(vb: &Weights, cfg: &UNetConfig, p: &DownPlan) -> Result<DownBlock> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for (j, &io) in p.resnets.iter().enumerate() {
            let d = resnet_dims(cfg, io, cfg.resnet_out_scale_factor);
            resnets.push(ResnetBlock2D::load(&vb.pp("resnets").pp(j), d)?);
            if let Some(a) = &p.attn {
                check_heads(a, io.1, vb.prefix())?;
                let td = transformer_dims(cfg, a, io.1, j);
                attentions.push(Transformer2DModel::load(&vb.pp("attentions").pp(j), td)?);
            }
        }
        let downsampler = if p.downsample {
            let c = p.resnets.last().map_or(0, |r| r.1);
            let vb = vb.pp("downsamplers").pp(0);
            Some(Downsample2D::load(&vb, c, cfg.downsample_padding)?)
        } else {
            None
        };
        Ok(DownBlock {
            resnets,
            attentions,
            downsampler,
        })
    }

    pub fn shapes(out: &mut ParamShapes, prefix: &str, cfg: &UNetConfig, p: &DownPlan) {
        for (j, &io) in p.resnets.iter().enumerate() {
            let d = resnet_dims(cfg, io, cfg.resnet_out_scale_factor);
            ResnetBlock2D::shapes(out, &format!("{prefix}.resnets.{j}"), d);
            if let Some(a) = &p.attn {
                let td = transformer_dims(cfg, a, io.1, j);
                Transformer2DModel::shapes(out, &format!("{prefix}.attentions.{j}"), td);
            }
        }
        if p.downsample {
            let c = p.resnets.last().map_or(0, |r| r.1);
            Downsample2D::shapes(out, &format!("{prefix}.downsamplers.0"), c);
        }
    }

    /// Runs the block and pushes every output a later up block concatenates.
    pub fn forward(
        &self,
        x: &Tensor,
        inp: &BlockInputs,
        skips: &mut Vec<Tensor>,
        ckpt: &mut BlockCounter,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, inp.temb)?; // (B, C, H, W)
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, inp.context, ckpt)?; // (B, C, H, W)
            }
            skips.push(h.clone());
        }
        if let Some(ds) = &self.downsampler {
            h = ds.forward(&h)?; // (B, C, ceil(H/2), ceil(W/2))
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// resnet -> transformer -> resnet at the lowest resolution.
#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: [ResnetBlock2D; 2],
    pub attention: Transformer2DModel,
}

impl MidBlock {
    pub fn load(vb: &Weights, cfg: &UNetConfig, p: &MidPlan) -> Result<MidBlock> {
        let c = p.channels;
        let d = resnet_dims(cfg, (c, c), cfg.mid_block_scale_factor);
        check_heads(&p.attn, c, "mid_block")?;
        Ok(MidBlock {
            resnets: [
                ResnetBlock2D::load(&vb.pp("resnets").pp(0), d)?,
                ResnetBlock2D::load(&vb.pp("resnets").pp(1), d)?,
            ],
            attention: Transformer2DModel::load(
                &vb.pp("attentions").pp(0),
                transformer_dims(cfg, &p.attn, c, 0),
            )?,
        })
    }

    pub fn shapes(out: &mut ParamShapes, cfg: &UNetConfig, p: &MidPlan) {
        let c = p.channels;
        let d = resnet_dims(cfg, (c, c), cfg.mid_block_scale_factor);
        ResnetBlock2D::shapes(out, "mid_block.resnets.0", d);
        let td = transformer_dims(cfg, &p.attn, c, 0);
        Transformer2DModel::shapes(out, "mid_block.attentions.0", td);
        ResnetBlock2D::shapes(out, "mid_block.resnets.1", d);
    }

    pub fn forward(
        &self,
        x: &Tensor,
        inp: &BlockInputs,
        ckpt: &mut BlockCounter,
    ) -> Result<Tensor> {
        let h = self.resnets[0].forward(x, inp.temb)?; // (B, C, H, W)
        let h = self.attention.forward(&h, inp.context, ckpt)?; // (B, C, H, W)
        self.resnets[1].forward(&h, inp.temb) // (B, C, H, W)
    }
}

/// Resnets on [current, skip] (each optionally followed by a transformer), then an optional
/// upsampler.
#[derive(Clone, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock {
    pub fn load(vb: &Weights, cfg: &UNetConfig, p: &UpPlan) -> Result<UpBlock> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for (j, &io) in p.resnets.iter().enumerate() {
            let d = resnet_dims(cfg, io, cfg.resnet_out_scale_factor);
            resnets.push(ResnetBlock2D::load(&vb.pp("resnets").pp(j), d)?);
            if let Some(a) = &p.attn {
                check_heads(a, io.1, vb.prefix())?;
                let td = transformer_dims(cfg, a, io.1, j);
                attentions.push(Transformer2DModel::load(&vb.pp("attentions").pp(j), td)?);
            }
        }
        let upsampler = if p.upsample {
            let c = p.resnets.last().map_or(0, |r| r.1);
            Some(Upsample2D::load(&vb.pp("upsamplers").pp(0), c)?)
        } else {
            None
        };
        Ok(UpBlock {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn shapes(out: &mut ParamShapes, prefix: &str, cfg: &UNetConfig, p: &UpPlan) {
        for (j, &io) in p.resnets.iter().enumerate() {
            let d = resnet_dims(cfg, io, cfg.resnet_out_scale_factor);
            ResnetBlock2D::shapes(out, &format!("{prefix}.resnets.{j}"), d);
            if let Some(a) = &p.attn {
                let td = transformer_dims(cfg, a, io.1, j);
                Transformer2DModel::shapes(out, &format!("{prefix}.attentions.{j}"), td);
            }
        }
        if p.upsample {
            let c = p.resnets.last().map_or(0, |r| r.1);
            Upsample2D::shapes(out, &format!("{prefix}.upsamplers.0"), c);
        }
    }

    /// Pops one skip per resnet from the top of the stack; `upsample_to` is the spatial size of
    /// the skip the next block will see first (diffusers' `forward_upsample_size`).
    pub fn forward(
        &self,
        x: &Tensor,
        inp: &BlockInputs,
        skips: &mut Vec<Tensor>,
        upsample_to: Option<(usize, usize)>,
        ckpt: &mut BlockCounter,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| Error::msg("unet: skip-connection stack ran out"))?;
            // Current features first, skip second: this fixes conv1's input-channel order.
            h = Tensor::cat(&[h, skip], 1)?; // (B, C + Cskip, H, W)
            h = resnet.forward(&h, inp.temb)?; // (B, C, H, W)
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, inp.context, ckpt)?; // (B, C, H, W)
            }
        }
        match &self.upsampler {
            Some(us) => us.forward(&h, upsample_to), // (B, C, 2H, 2W) or the skip's size
            None => Ok(h),
        }
    }
}

/// What kohya's conv LoRA wraps in a block under `prefix`: each resnet's layers
/// ([`ResnetBlock2D::adaptable_mut`]), then the resampler's convolution.
pub fn conv_group_mut<'a>(
    resnets: &'a mut [ResnetBlock2D],
    sampler: Option<(&str, &'a mut AdaptedConv2d)>,
    prefix: &str,
    out: &mut Vec<(String, Adaptable<'a>)>,
) {
    for (j, r) in resnets.iter_mut().enumerate() {
        r.adaptable_mut(&format!("{prefix}.resnets.{j}"), out);
    }
    if let Some((name, conv)) = sampler {
        out.push((format!("{prefix}.{name}.0.conv"), Adaptable::Conv(conv)));
    }
}

/// [`conv_group_mut`], read-only.
pub fn conv_group<'a>(
    resnets: &'a [ResnetBlock2D],
    sampler: Option<(&str, &'a AdaptedConv2d)>,
    prefix: &str,
    out: &mut Vec<AdaptableRef<'a>>,
) {
    for (j, r) in resnets.iter().enumerate() {
        r.adaptable(&format!("{prefix}.resnets.{j}"), out);
    }
    if let Some((name, conv)) = sampler {
        out.push(AdaptableRef::conv(format!("{prefix}.{name}.0.conv"), conv));
    }
}

/// The linears of a list of transformers under `prefix.attentions.j`.
pub fn linears_mut<'a>(
    attentions: &'a mut [Transformer2DModel],
    prefix: &str,
    out: &mut Vec<(String, &'a mut AdaptedLinear)>,
) {
    for (j, a) in attentions.iter_mut().enumerate() {
        a.linears_mut(&format!("{prefix}.attentions.{j}"), out);
    }
}

pub fn linears<'a>(
    attentions: &'a [Transformer2DModel],
    prefix: &str,
    out: &mut Vec<(String, &'a AdaptedLinear)>,
) {
    for (j, a) in attentions.iter().enumerate() {
        a.linears(&format!("{prefix}.attentions.{j}"), out);
    }
}
