//! diffusers `AutoencoderKL` (SDXL.md 3): the encoder to a diagonal Gaussian over latents and the
//! decoder back to pixels, for any config of the family (levels, widths, groups, layers).
//!
//! Keys follow the diffusers tree (`encoder.down_blocks.0.resnets.1.conv2.weight`, ...); the
//! single-file (LDM) and pre-0.17 spellings are mapped by `formats` before loading. Run it in f32
//! (the default of [`AutoencoderKL::from_diffusers`]): the SDXL VAE overflows in fp16 (SDXL.md 3.3).

pub mod blocks;
pub mod config;

pub use blocks::{DownEncoderBlock, MidBlock, ResnetBlock, SpatialSelfAttention, UpDecoderBlock};
pub use config::VaeConfig;

use crate::formats::diffusers::DiffusersFolder;
use crate::nn::{Conv2d, GroupNorm, Weights};
use crate::tensor::ConvParams;
use crate::{DType, Device, Error, Result, Tensor};
use config::{LOGVAR_RANGE, VAE_NORM_EPS};

const SAME_3X3: ConvParams = ConvParams {
    stride: 1,
    padding: 1,
};

/// Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, h, w),
/// each spatial size halved (rounding down) per downsampler.
#[derive(Clone, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    pub fn load(vb: &Weights, cfg: &VaeConfig) -> Result<Encoder> {
        let (ch, g) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let last = ch.len() - 1;
        let down_blocks = (0..ch.len())
            .map(|i| {
                let c_in = ch[i.saturating_sub(1)];
                let vb = vb.pp("down_blocks").pp(i);
                DownEncoderBlock::load(&vb, c_in, ch[i], cfg.layers_per_block, g, i != last)
            })
            .collect::<Result<Vec<_>>>()?;
        let mid = cfg.mid_channels();
        Ok(Encoder {
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.in_channels, ch[0], 3, SAME_3X3)?,
            down_blocks,
            mid_block: MidBlock::load(&vb.pp("mid_block"), mid, g, cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, mid, VAE_NORM_EPS)?,
            // double_z: mean and logvar side by side.
            conv_out: Conv2d::load(
                &vb.pp("conv_out"),
                mid,
                2 * cfg.latent_channels,
                3,
                SAME_3X3,
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?; // (B, C0, H, W)
        for block in &self.down_blocks {
            h = block.forward(&h)?; // (B, Ci, Hi, Wi): halved by every downsampler
        }
        let h = self.mid_block.forward(&h)?; // (B, Cmid, h, w)
        let h = self.conv_norm_out.forward(&h)?.silu()?;
        self.conv_out.forward(&h) // (B, 2L, h, w)
    }
}

/// Latents (B, latent_channels, h, w) -> image (B, out_channels, h * 2^(levels-1), ...).
#[derive(Clone, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpDecoderBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    pub fn load(vb: &Weights, cfg: &VaeConfig) -> Result<Decoder> {
        let g = cfg.norm_num_groups;
        // Up blocks walk the widths deepest first: up_blocks.0 is the encoder's last level.
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let last = rev.len() - 1;
        let up_blocks = (0..rev.len())
            .map(|i| {
                let c_in = rev[i.saturating_sub(1)];
                let vb = vb.pp("up_blocks").pp(i);
                UpDecoderBlock::load(&vb, c_in, rev[i], cfg.layers_per_block + 1, g, i != last)
            })
            .collect::<Result<Vec<_>>>()?;
        let (mid, c0) = (rev[0], rev[last]);
        Ok(Decoder {
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.latent_channels, mid, 3, SAME_3X3)?,
            mid_block: MidBlock::load(&vb.pp("mid_block"), mid, g, cfg.mid_block_add_attention)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, c0, VAE_NORM_EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), c0, cfg.out_channels, 3, SAME_3X3)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?; // (B, Cmid, h, w)
        let mut h = self.mid_block.forward(&h)?; // (B, Cmid, h, w)
        for block in &self.up_blocks {
            h = block.forward(&h)?; // (B, Ci, hi, wi): doubled by every upsampler
        }
        let h = self.conv_norm_out.forward(&h)?.silu()?;
        self.conv_out.forward(&h) // (B, out_channels, H, W)
    }
}

/// diffusers' tiled coding (`tiled_decode`, `_tiled_encode`): `x` (B, C, H, W) cut into tiles of
/// `tile` starting every `tile * 3 / 4` (int), each mapped by `f` to a tile of `out_tile`
/// (B, C', h, w); each output tile is blended linearly with its upper then its left neighbour
/// over `out_tile / 4` rows / columns (fewer where a tile is smaller), the neighbours as already
/// blended, and the first `out_tile - out_tile / 4` rows and columns of each are kept.
fn tiled(
    x: &Tensor,
    tile: usize,
    out_tile: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let stride = (tile as f64 * 0.75) as usize;
    let extent = (out_tile as f64 * 0.25) as usize;
    let keep = out_tile - extent;
    let starts = |n: usize| (0..n).step_by(stride.max(1)).collect::<Vec<_>>();
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for &i in &starts(h) {
        let mut row = Vec::new();
        for &j in &starts(w) {
            let t = x
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?;
            row.push(f(&t.contiguous()?)?);
        }
        rows.push(row);
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut t = rows[i][j].clone();
            if i > 0 {
                t = blend(&rows[i - 1][j], &t, extent, 2)?;
            }
            if j > 0 {
                t = blend(&rows[i][j - 1], &t, extent, 3)?;
            }
            rows[i][j] = t;
        }
        let kept = rows[i]
            .iter()
            .map(|t| {
                let (_, _, th, tw) = t.dims4()?;
                t.narrow(2, 0, keep.min(th))?.narrow(3, 0, keep.min(tw))
            })
            .collect::<Result<Vec<_>>>()?;
        out_rows.push(Tensor::cat(&kept, 3)?);
    }
    Tensor::cat(&out_rows, 2)
}

/// diffusers' `blend_v` (`dim` 2) / `blend_h` (`dim` 3): the first `e` rows (columns) of `b`
/// become `a`'s last `e` times `1 - k/e` plus `b`'s own times `k/e`, `e` = `extent` or less
/// where either tile is smaller.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let (na, nb) = (a.dims()[dim], b.dims()[dim]);
    let e = extent.min(na).min(nb);
    if e == 0 {
        return Ok(b.clone());
    }
    let mut shape = vec![1usize; 4];
    shape[dim] = e;
    let ramp: Vec<f32> = (0..e).map(|k| (k as f64 / e as f64) as f32).collect();
    let ramp = Tensor::from_vec(ramp, shape, Device::Cpu)?
        .to_dtype(b.dtype())?
        .to_device(b.device())?;
    let head = b.narrow(dim, 0, e)?;
    let tail = a.narrow(dim, na - e, e)?;
    // tail (1 - r) + head r = tail + (head - tail) r
    let mixed = tail.add(&head.sub(&tail)?.mul(&ramp)?)?;
    match nb > e {
        true => Tensor::cat(&[mixed, b.narrow(dim, e, nb - e)?], dim),
        false => Ok(mixed),
    }
}

/// The whole autoencoder with its optional 1x1 `quant_conv` / `post_quant_conv`.
#[derive(Clone, Debug)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    /// diffusers' `enable_tiling()`: pictures wider or taller than `sample_size` encode, and
    /// latents beyond `sample_size / 2^(levels - 1)` decode, in overlapping tiles blended
    /// together, so memory stays that of one tile whatever the size. The numbers differ from
    /// the untiled ones (each tile sees only itself).
    pub tiling: bool,
}

impl AutoencoderKL {
    /// Loads from a diffusers-keyed weight tree; fails on missing or mis-shaped tensors.
    pub fn load(vb: &Weights, config: VaeConfig) -> Result<AutoencoderKL> {
        config.validate()?;
        let (l, one) = (config.latent_channels, ConvParams::default());
        let quant_conv = config
            .use_quant_conv
            .then(|| Conv2d::load(&vb.pp("quant_conv"), 2 * l, 2 * l, 1, one))
            .transpose()?;
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| Conv2d::load(&vb.pp("post_quant_conv"), l, l, 1, one))
            .transpose()?;
        Ok(AutoencoderKL {
            encoder: Encoder::load(&vb.pp("encoder"), &config)?,
            decoder: Decoder::load(&vb.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv,
            config,
            tiling: false,
        })
    }

    /// The `vae` component of a diffusers pipeline folder. Every tensor in the files must be
    /// used: leftovers mean the config and the checkpoint disagree.
    pub fn from_diffusers(
        folder: &DiffusersFolder,
        dtype: DType,
        device: Device,
    ) -> Result<AutoencoderKL> {
        let (vb, config) = Weights::from_component(folder, "vae", dtype, device)?;
        let vae = AutoencoderKL::load(&vb, VaeConfig::from_json(&config)?)?;
        vb.ensure_all_used(|_| false)?;
        Ok(vae)
    }

    fn expect_channels(&self, x: &Tensor, op: &'static str, c: usize) -> Result<()> {
        let (_, got, _, _) = x.dims4()?;
        if got != c {
            return Err(Error::bad_shape(
                op,
                format!("expected {c} channels"),
                x.dims(),
            ));
        }
        Ok(())
    }

    /// Image in [-1, 1] (B, in_channels, H, W) -> (mean, logvar), each (B, L, h, w); logvar is
    /// clamped to [-30, 20] as diffusers' `DiagonalGaussianDistribution` does.
    pub fn encode(&self, image: &Tensor) -> Result<(Tensor, Tensor)> {
        self.expect_channels(image, "vae.encode", self.config.in_channels)?;
        let (_, _, h, w) = image.dims4()?;
        let side = self.config.sample_size;
        let moments = match self.tiling && (h > side || w > side) {
            true => {
                let (tile, latent_tile) = self.tile_sides()?;
                tiled(image, tile, latent_tile, |t| self.moments(t))?
            }
            false => self.moments(image)?,
        }; // (B, 2L, h, w)
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?.contiguous()?; // (B, L, h, w)
        let (lo, hi) = LOGVAR_RANGE;
        // clamp to [lo, hi] from the one clamp primitive: max(x, lo), then -max(-x, -hi).
        let logvar = moments
            .narrow(1, l, l)?
            .clamp_min(lo)?
            .neg()?
            .clamp_min(-hi)?
            .neg()?; // (B, L, h, w)
        Ok((mean, logvar))
    }

    /// Encoder and `quant_conv`: (B, in_channels, H, W) -> moments (B, 2L, h, w).
    fn moments(&self, image: &Tensor) -> Result<Tensor> {
        let moments = self.encoder.forward(image)?; // (B, 2L, h, w)
        match &self.quant_conv {
            Some(q) => q.forward(&moments),
            None => Ok(moments),
        }
    }

    /// Unscaled latents (B, L, h, w) -> image (B, out_channels, H, W), roughly in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.expect_channels(z, "vae.decode", self.config.latent_channels)?;
        let (_, _, h, w) = z.dims4()?;
        let (tile, latent_tile) = match self.tiling {
            true => self.tile_sides()?,
            false => (0, usize::MAX),
        };
        if h > latent_tile || w > latent_tile {
            return tiled(z, latent_tile, tile, |t| self.decode_tile(t));
        }
        self.decode_tile(z)
    }

    /// `post_quant_conv` and the decoder on latents (B, L, h, w).
    fn decode_tile(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?, // (B, L, h, w)
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// (picture tile side, latent tile side) of tiled coding: `sample_size` and
    /// `int(sample_size / 2^(levels - 1))`, as diffusers sets them.
    fn tile_sides(&self) -> Result<(usize, usize)> {
        let side = self.config.sample_size;
        let latent = side >> (self.config.block_out_channels.len() - 1);
        if latent < 2 {
            return Err(Error::Config(format!(
                "vae: sample_size {side} gives latent tiles of {latent}: too small to tile"
            )));
        }
        Ok((side, latent))
    }

    fn latent_stats(&self, like: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        self.config.latent_stats(like)
    }

    /// Latents as the UNet sees them -> latents as the decoder expects:
    /// `latents * latents_std / scaling_factor + latents_mean` when the config has the
    /// statistics, else `latents / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        match self.latent_stats(latents)? {
            Some((mean, std)) => latents.mul(&std)?.scale(1.0 / c.scaling_factor)?.add(&mean),
            None => latents.affine(1.0 / c.scaling_factor, c.shift_factor.unwrap_or(0.0)),
        }
    }

    /// The inverse of [`Self::unscale_latents`]: `(z - latents_mean) * scaling_factor /
    /// latents_std`, else `(z - shift_factor) * scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        self.config.scale_latents(z)
    }

    /// Decode the UNet's (scaled) latents, as the diffusers pipelines do.
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&self.unscale_latents(latents)?)
    }
}
