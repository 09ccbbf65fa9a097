//! `UNet2DConditionModel` as diffusers builds it for SDXL, with every size taken from
//! `unet/config.json` (SDXL.md 1). Modules mirror the diffusers key tree; the attention
//! projections are [`AdaptedLinear`]s that adapters attach to by module path.
//!
//! - [`config`]: the config as data and the per-block plan both loading and counting walk.
//! - [`embeddings`], [`resnet`], [`transformer`], [`blocks`]: the modules.
//! - [`load`]: diffusers folders and single files, with kohya LoRAs merged in ([`lora_merge`]).

pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod flops;
pub mod load;
pub mod lora_merge;
pub mod resnet;
pub mod transformer;

pub use config::UNetConfig;
pub use lora_merge::{KohyaLoraFile, MergeReport};
pub use transformer::CheckpointPolicy;

use crate::nn::lora::{Adaptable, AdaptableRef, AdaptedLinear, LoraAdapter};
use crate::nn::{Conv2d, GroupNorm, Linear, Weights};
use crate::tensor::ConvParams;
use crate::{DType, Error, Result, Tensor};
use blocks::{BlockInputs, DownBlock, MidBlock, UpBlock};
use embeddings::ConditioningEmbedding;
use transformer::BlockCounter;

/// The transformer linears and the conv group of one UNet, borrowed together.
type SplitAdaptable<'a> = (
    Vec<(String, &'a mut AdaptedLinear)>,
    Vec<(String, Adaptable<'a>)>,
);

/// (name, shape) of every parameter, in the order the modules would load them.
#[derive(Clone, Debug, Default)]
pub struct ParamShapes(pub Vec<(String, Vec<usize>)>);

impl ParamShapes {
    fn push(&mut self, name: String, shape: Vec<usize>) {
        self.0.push((name, shape));
    }
    fn linear(&mut self, p: &str, d_in: usize, d_out: usize, bias: bool) {
        self.push(format!("{p}.weight"), vec![d_out, d_in]);
        if bias {
            self.push(format!("{p}.bias"), vec![d_out]);
        }
    }
    /// Every UNet conv has a bias.
    fn conv(&mut self, p: &str, c_in: usize, c_out: usize, k: usize) {
        self.push(format!("{p}.weight"), vec![c_out, c_in, k, k]);
        self.push(format!("{p}.bias"), vec![c_out]);
    }
    /// GroupNorm and LayerNorm: per-channel weight and bias.
    fn norm(&mut self, p: &str, c: usize) {
        self.push(format!("{p}.weight"), vec![c]);
        self.push(format!("{p}.bias"), vec![c]);
    }
    pub fn count(&self) -> usize {
        self.0
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// Every parameter of a UNet config without allocating it (memory plans, sanity checks).
pub fn param_shapes(cfg: &UNetConfig) -> ParamShapes {
    let mut out = ParamShapes::default();
    let plan = cfg.plan();
    let (c0, n) = (cfg.block_out_channels[0], cfg.levels());
    out.conv("conv_in", cfg.in_channels, c0, cfg.conv_in_kernel);
    ConditioningEmbedding::shapes(&mut out, cfg);
    for (i, p) in plan.down.iter().enumerate() {
        DownBlock::shapes(&mut out, &format!("down_blocks.{i}"), cfg, p);
    }
    if let Some(m) = &plan.mid {
        MidBlock::shapes(&mut out, cfg, m);
    }
    for (i, p) in plan.up.iter().enumerate() {
        UpBlock::shapes(&mut out, &format!("up_blocks.{i}"), cfg, p);
    }
    debug_assert!(n > 0);
    out.norm("conv_norm_out", c0);
    out.conv("conv_out", c0, cfg.out_channels, cfg.conv_out_kernel);
    out
}

/// The exact parameter count of a UNet config (2,567,463,684 for SDXL base).
pub fn param_count(cfg: &UNetConfig) -> usize {
    param_shapes(cfg).count()
}

/// A conv whose bias is required: every UNet conv has one, and `Conv2d::load` treats a missing
/// bias as "no bias", which would hide a truncated checkpoint.
pub(crate) fn conv_with_bias(
    vb: &Weights,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    params: ConvParams,
) -> Result<Conv2d> {
    Ok(Conv2d {
        weight: vb.get_matrix(&[c_out, c_in, kernel, kernel], "weight")?,
        bias: Some(vb.get(&[c_out], "bias")?),
        params,
    })
}

fn same_padding(k: usize) -> ConvParams {
    ConvParams {
        stride: 1,
        padding: k / 2,
    }
}

#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub embedding: ConditioningEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// Run-time knob: which transformer blocks are gradient-checkpointed in training.
    pub checkpoint: CheckpointPolicy,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` (diffusers key names). Missing or mis-shaped tensors are an
    /// error naming the key; callers check for unused ones with `vb.ensure_all_used`.
    pub fn load(vb: &Weights, cfg: &UNetConfig) -> Result<UNet2DConditionModel> {
        let plan = cfg.plan();
        let c0 = cfg.block_out_channels[0];
        let conv_in = conv_with_bias(
            &vb.pp("conv_in"),
            cfg.in_channels,
            c0,
            cfg.conv_in_kernel,
            same_padding(cfg.conv_in_kernel),
        )?;
        let embedding = ConditioningEmbedding::load(vb, cfg)?;
        let down_blocks = plan
            .down
            .iter()
            .enumerate()
            .map(|(i, p)| DownBlock::load(&vb.pp("down_blocks").pp(i), cfg, p))
            .collect::<Result<Vec<_>>>()?;
        let mid_block = match &plan.mid {
            Some(m) => Some(MidBlock::load(&vb.pp("mid_block"), cfg, m)?),
            None => None,
        };
        let up_blocks = plan
            .up
            .iter()
            .enumerate()
            .map(|(i, p)| UpBlock::load(&vb.pp("up_blocks").pp(i), cfg, p))
            .collect::<Result<Vec<_>>>()?;
        Ok(UNet2DConditionModel {
            config: cfg.clone(),
            conv_in,
            embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                c0,
                cfg.norm_eps,
            )?,
            conv_out: conv_with_bias(
                &vb.pp("conv_out"),
                c0,
                cfg.out_channels,
                cfg.conv_out_kernel,
                same_padding(cfg.conv_out_kernel),
            )?,
            checkpoint: CheckpointPolicy::None,
        })
    }

    /// The dtype the model computes in: its biases'. Linear and convolution weights may be
    /// stored narrower (float8, `--weight-dtype`) and are widened per use.
    pub fn dtype(&self) -> DType {
        match &self.conv_in.bias {
            Some(b) => b.dtype(),
            None => self.conv_in.weight.dtype(),
        }
    }

    /// SDXL call: sample (B, Cin, H, W), timestep (B,) or a scalar, encoder_hidden_states
    /// (B, T, Dc), text_embeds (B, Dp) pooled text, time_ids (B, 6) -> eps (B, Cout, H, W).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(
            sample,
            timestep,
            encoder_hidden_states,
            Some((text_embeds, time_ids)),
        )
    }

    /// As [`Self::forward`], with the added conditioning optional (configs without text_time).
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (b, c, _, _) = sample.dims4()?;
        let dtype = self.dtype();
        if c != self.config.in_channels {
            return Err(Error::bad_shape(
                "unet",
                format!(
                    "sample has {c} channels, the model takes {}",
                    self.config.in_channels
                ),
                sample.dims(),
            ));
        }
        let (bc, _, _) = encoder_hidden_states.dims3()?;
        if bc != b {
            return Err(Error::ShapeMismatch {
                op: "unet (sample vs encoder_hidden_states batch)",
                lhs: sample.shape().clone(),
                rhs: encoder_hidden_states.shape().clone(),
            });
        }
        let timestep = match timestep.elem_count() {
            // A single timestep applies to the whole batch, as diffusers broadcasts it.
            1 => timestep.reshape(1)?.broadcast_as(&crate::Shape::from(b))?,
            n if n == b && timestep.rank() == 1 => timestep.clone(),
            _ => {
                return Err(Error::bad_shape(
                    "unet",
                    format!("timestep must be a scalar or ({b},)"),
                    timestep.dims(),
                ))
            }
        }; // (B,)
        let temb = self.embedding.forward(&timestep, added, dtype)?; // (B, D)
        let context = encoder_hidden_states.to_dtype(dtype)?; // (B, T, Dc)
        let inp = BlockInputs {
            temb: &temb,
            context: &context,
        };
        let mut ckpt = BlockCounter {
            policy: self.checkpoint,
            next: 0,
        };
        let mut x = sample.to_dtype(dtype)?; // (B, Cin, H, W)
        if self.config.center_input_sample {
            x = x.affine(2.0, -1.0)?;
        }
        let mut h = self.conv_in.forward(&x)?; // (B, C0, H, W)
        let mut skips = vec![h.clone()];
        for blk in &self.down_blocks {
            h = blk.forward(&h, &inp, &mut skips, &mut ckpt)?; // (B, C, H/2^i, W/2^i)
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &inp, &mut ckpt)?; // (B, Ctop, h, w)
        }
        for blk in &self.up_blocks {
            let n = blk.resnets.len();
            // The upsampler targets the size of the skip the next block pops first. diffusers
            // only passes that size when H or W is not a multiple of 2^upsamplers; otherwise it
            // is exactly twice the input, so passing it always gives the same result.
            let upsample_to = match skips.len().checked_sub(n + 1) {
                Some(i) if blk.upsampler.is_some() => {
                    let (_, _, sh, sw) = skips[i].dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            h = blk.forward(&h, &inp, &mut skips, upsample_to, &mut ckpt)?; // (B, C, H', W')
        }
        let h = self.conv_norm_out.forward(&h)?.silu()?; // (B, C0, H, W)
        self.conv_out.forward(&h) // (B, Cout, H, W)
    }

    /// Every linear of every spatial transformer (proj_in, each block's to_q, to_k, to_v,
    /// to_out.0 of attn1 and attn2, ff.net.0.proj, ff.net.2, then proj_out) by diffusers module
    /// path, in PyTorch's `named_modules` order: what an adapter can wrap.
    pub fn adaptable_linears(&self) -> Vec<(String, &AdaptedLinear)> {
        let mut out = Vec::new();
        for (i, b) in self.down_blocks.iter().enumerate() {
            blocks::linears(&b.attentions, &format!("down_blocks.{i}"), &mut out);
        }
        if let Some(m) = &self.mid_block {
            m.attention.linears("mid_block.attentions.0", &mut out);
        }
        for (i, b) in self.up_blocks.iter().enumerate() {
            blocks::linears(&b.attentions, &format!("up_blocks.{i}"), &mut out);
        }
        out
    }

    pub fn adaptable_linears_mut(&mut self) -> Vec<(String, &mut AdaptedLinear)> {
        let mut out = Vec::new();
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            blocks::linears_mut(&mut b.attentions, &format!("down_blocks.{i}"), &mut out);
        }
        if let Some(m) = &mut self.mid_block {
            m.attention.linears_mut("mid_block.attentions.0", &mut out);
        }
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            blocks::linears_mut(&mut b.attentions, &format!("up_blocks.{i}"), &mut out);
        }
        out
    }

    /// What kohya's conv LoRA (sd-scripts `--network_args conv_dim=N`) adds to the transformer
    /// linears: every child of a `ResnetBlock2D` (`conv1`, `time_emb_proj`, `conv2`,
    /// `conv_shortcut`), `Downsample2D` and `Upsample2D` (`conv`), down blocks, the mid block,
    /// then up blocks.
    pub fn conv_group_mut(&mut self) -> Vec<(String, Adaptable<'_>)> {
        let mut out = Vec::new();
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            let ds = b
                .downsampler
                .as_mut()
                .map(|d| ("downsamplers", &mut d.conv));
            blocks::conv_group_mut(&mut b.resnets, ds, &format!("down_blocks.{i}"), &mut out);
        }
        if let Some(m) = &mut self.mid_block {
            blocks::conv_group_mut(&mut m.resnets, None, "mid_block", &mut out);
        }
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            let us = b.upsampler.as_mut().map(|u| ("upsamplers", &mut u.conv));
            blocks::conv_group_mut(&mut b.resnets, us, &format!("up_blocks.{i}"), &mut out);
        }
        out
    }

    /// [`UNet2DConditionModel::conv_group_mut`], read-only.
    pub fn conv_group(&self) -> Vec<AdaptableRef<'_>> {
        let mut out = Vec::new();
        for (i, b) in self.down_blocks.iter().enumerate() {
            let ds = b.downsampler.as_ref().map(|d| ("downsamplers", &d.conv));
            blocks::conv_group(&b.resnets, ds, &format!("down_blocks.{i}"), &mut out);
        }
        if let Some(m) = &self.mid_block {
            blocks::conv_group(&m.resnets, None, "mid_block", &mut out);
        }
        for (i, b) in self.up_blocks.iter().enumerate() {
            let us = b.upsampler.as_ref().map(|u| ("upsamplers", &u.conv));
            blocks::conv_group(&b.resnets, us, &format!("up_blocks.{i}"), &mut out);
        }
        out
    }

    /// Every layer an adapter can wrap: the transformer linears, then the conv group.
    pub fn adaptable_mut(&mut self) -> Vec<(String, Adaptable<'_>)> {
        let (linears, convs) = self.split_adaptable();
        linears
            .into_iter()
            .map(|(p, l)| (p, Adaptable::Linear(l)))
            .chain(convs)
            .collect()
    }

    /// [`UNet2DConditionModel::adaptable_mut`], read-only.
    pub fn adaptable(&self) -> Vec<AdaptableRef<'_>> {
        let mut out: Vec<AdaptableRef<'_>> = self
            .adaptable_linears()
            .into_iter()
            .map(|(p, l)| AdaptableRef::linear(p, l))
            .collect();
        out.extend(self.conv_group());
        out
    }

    /// The transformer linears and the conv group, borrowed apart.
    fn split_adaptable(&mut self) -> SplitAdaptable<'_> {
        let mut linears = Vec::new();
        let mut convs = Vec::new();
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            let p = format!("down_blocks.{i}");
            blocks::linears_mut(&mut b.attentions, &p, &mut linears);
            let ds = b
                .downsampler
                .as_mut()
                .map(|d| ("downsamplers", &mut d.conv));
            blocks::conv_group_mut(&mut b.resnets, ds, &p, &mut convs);
        }
        if let Some(m) = &mut self.mid_block {
            m.attention
                .linears_mut("mid_block.attentions.0", &mut linears);
            blocks::conv_group_mut(&mut m.resnets, None, "mid_block", &mut convs);
        }
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            let p = format!("up_blocks.{i}");
            blocks::linears_mut(&mut b.attentions, &p, &mut linears);
            let us = b.upsampler.as_mut().map(|u| ("upsamplers", &mut u.conv));
            blocks::conv_group_mut(&mut b.resnets, us, &p, &mut convs);
        }
        (linears, convs)
    }

    /// Attaches `make(path)`'s adapter to every layer of [`UNet2DConditionModel::adaptable_mut`]
    /// it returns one for, each checked against its layer's shape; returns how many.
    pub fn attach_all(
        &mut self,
        mut make: impl FnMut(&str) -> Result<Option<LoraAdapter>>,
    ) -> Result<usize> {
        let mut n = 0;
        for (path, mut slot) in self.adaptable_mut() {
            if let Some(a) = make(&path)? {
                slot.set_adapter(a)
                    .map_err(|e| Error::Config(format!("adapter module `{path}`: {e}")))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Attaches `make(path, base)`'s adapter to every projection it returns one for (in
    /// `named_modules` order, so seeded initialisation matches the reference); returns how many.
    pub fn attach_adapters(
        &mut self,
        mut make: impl FnMut(&str, &Linear) -> Result<Option<LoraAdapter>>,
    ) -> Result<usize> {
        let mut n = 0;
        for (path, lin) in self.adaptable_linears_mut() {
            if let Some(a) = make(&path, &lin.base)? {
                lin.set_adapter(a)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Trainable adapter tensors as `<module path>.<lora_A|lora_B|attn_mlp.0.weight|...>`, the
    /// transformer linears' then the conv group's.
    pub fn adapter_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for layer in self.adaptable() {
            if let Some(a) = layer.adapter {
                let path = &layer.path;
                out.extend(
                    a.named()
                        .into_iter()
                        .map(|(n, t)| (format!("{path}.{n}"), t)),
                );
            }
        }
        out
    }
}
