//! `Transformer2DModel` (the spatial transformer) and its `BasicTransformerBlock`s: self-attention,
//! cross-attention on the text context, GEGLU feed-forward (SDXL.md 1.6). Every linear of a
//! spatial transformer (the four attention projections, the feed-forward's two, the linear
//! proj_in / proj_out) is an [`AdaptedLinear`], so LoRA / gated adapters can be attached by module
//! path: kohya's LoRA targets exactly these (its `Transformer2DModel` replace module).

use super::{conv_with_bias, ParamShapes};
use crate::autograd::{checkpoint, grad_enabled};
use crate::nn::lora::AdaptedLinear;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear, Weights};
use crate::tensor::ConvParams;
use crate::{Result, Tensor};

/// The transformer GroupNorm's eps is fixed in diffusers, unlike the resnets' `norm_eps`.
const TRANSFORMER_GN_EPS: f64 = 1e-6;
const LAYER_NORM_EPS: f64 = 1e-5;
/// GEGLU inner width = 4 x model width (`FeedForward(mult=4)`).
const FF_MULT: usize = 4;

/// Which transformer blocks run as gradient-checkpoint segments (their activations are
/// recomputed in backward instead of kept). Blocks are counted across the whole UNet in
/// forward order, starting at 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CheckpointPolicy {
    #[default]
    None,
    EveryBlock,
    /// Blocks 0, n, 2n, ...; `EveryNth(1)` is `EveryBlock`, `EveryNth(0)` is `None`.
    EveryNth(usize),
}

impl CheckpointPolicy {
    pub fn selects(self, index: usize) -> bool {
        match self {
            CheckpointPolicy::None => false,
            CheckpointPolicy::EveryBlock => true,
            CheckpointPolicy::EveryNth(n) => n > 0 && index % n == 0,
        }
    }
}

/// Numbers transformer blocks during one forward pass for the checkpoint policy.
pub struct BlockCounter {
    pub policy: CheckpointPolicy,
    pub next: usize,
}

impl BlockCounter {
    fn take(&mut self) -> bool {
        let i = self.next;
        self.next += 1;
        self.policy.selects(i)
    }
}

/// Multi-head attention without biases on q/k/v; `to_out.0` has one.
#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: AdaptedLinear,
    pub to_k: AdaptedLinear,
    pub to_v: AdaptedLinear,
    pub to_out: AdaptedLinear,
    pub heads: usize,
}

impl Attention {
    fn load(
        vb: &Weights,
        dim: usize,
        kv_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Attention> {
        let inner = heads * head_dim;
        let lin = |name: &str, d_in: usize, d_out: usize, bias: bool| -> Result<AdaptedLinear> {
            Ok(AdaptedLinear::new(Linear::load(
                &vb.pp(name),
                d_in,
                d_out,
                bias,
            )?))
        };
        Ok(Attention {
            to_q: lin("to_q", dim, inner, false)?,
            to_k: lin("to_k", kv_dim, inner, false)?,
            to_v: lin("to_v", kv_dim, inner, false)?,
            to_out: lin("to_out.0", inner, dim, true)?,
            heads,
        })
    }

    fn shapes(out: &mut ParamShapes, p: &str, dim: usize, kv_dim: usize, inner: usize) {
        out.linear(&format!("{p}.to_q"), dim, inner, false);
        out.linear(&format!("{p}.to_k"), kv_dim, inner, false);
        out.linear(&format!("{p}.to_v"), kv_dim, inner, false);
        out.linear(&format!("{p}.to_out.0"), inner, dim, true);
    }

    /// x (B, S, C), kv (B, Skv, Ckv) -> (B, S, C).
    fn forward(&self, x: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let skv = kv.dim(1)?;
        let q = self.to_q.forward(x)?; // (B, S, NH*D)
        let k = self.to_k.forward(kv)?; // (B, Skv, NH*D)
        let v = self.to_v.forward(kv)?; // (B, Skv, NH*D)
        let inner = q.dim(2)?;
        let d = inner / self.heads;
        let split = |t: &Tensor, n: usize| t.reshape((b, n, self.heads, d))?.transpose(1, 2);
        let o = Tensor::sdpa(
            &split(&q, s)?,
            &split(&k, skv)?,
            &split(&v, skv)?,
            1.0 / (d as f64).sqrt(),
            false,
        )?; // (B, NH, S, D)
        let o = o.transpose(1, 2)?.reshape((b, s, inner))?; // (B, S, NH*D)
        self.to_out.forward(&o) // (B, S, C)
    }

    fn projections<'a>(&'a self, p: &str, out: &mut Vec<(String, &'a AdaptedLinear)>) {
        for (n, l) in [
            ("to_q", &self.to_q),
            ("to_k", &self.to_k),
            ("to_v", &self.to_v),
            ("to_out.0", &self.to_out),
        ] {
            out.push((format!("{p}.{n}"), l));
        }
    }

    fn projections_mut<'a>(&'a mut self, p: &str, out: &mut Vec<(String, &'a mut AdaptedLinear)>) {
        for (n, l) in [
            ("to_q", &mut self.to_q),
            ("to_k", &mut self.to_k),
            ("to_v", &mut self.to_v),
            ("to_out.0", &mut self.to_out),
        ] {
            out.push((format!("{p}.{n}"), l));
        }
    }
}

/// LayerNorm -> self-attention, LayerNorm -> cross-attention, LayerNorm -> GEGLU FF, each residual.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    /// `ff.net.0.proj`: C -> 2 * inner (value half, then gate half).
    pub ff_proj: AdaptedLinear,
    /// `ff.net.2`: inner -> C.
    pub ff_out: AdaptedLinear,
}

impl BasicTransformerBlock {
    fn load(vb: &Weights, dim: usize, cross: usize, heads: usize, head_dim: usize) -> Result<Self> {
        let ff = FF_MULT * dim;
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, LAYER_NORM_EPS)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, cross, heads, head_dim)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, LAYER_NORM_EPS)?,
            ff_proj: AdaptedLinear::new(Linear::load(&vb.pp("ff.net.0.proj"), dim, 2 * ff, true)?),
            ff_out: AdaptedLinear::new(Linear::load(&vb.pp("ff.net.2"), ff, dim, true)?),
        })
    }

    fn shapes(out: &mut ParamShapes, p: &str, dim: usize, cross: usize, inner: usize) {
        let ff = FF_MULT * dim;
        for n in ["norm1", "norm2", "norm3"] {
            out.norm(&format!("{p}.{n}"), dim);
        }
        Attention::shapes(out, &format!("{p}.attn1"), dim, dim, inner);
        Attention::shapes(out, &format!("{p}.attn2"), dim, cross, inner);
        out.linear(&format!("{p}.ff.net.0.proj"), dim, 2 * ff, true);
        out.linear(&format!("{p}.ff.net.2"), ff, dim, true);
    }

    /// x (B, S, C), context (B, T, Dc) -> (B, S, C).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?; // (B, S, C)
        let x = self.attn1.forward(&h, &h)?.add(x)?; // (B, S, C)
        let h = self.norm2.forward(&x)?; // (B, S, C)
        let x = self.attn2.forward(&h, context)?.add(&x)?; // (B, S, C)
        let h = self.ff_proj.forward(&self.norm3.forward(&x)?)?; // (B, S, 2*inner)
        let [value, gate]: [Tensor; 2] = h
            .chunk(2, 2)?
            .try_into()
            .expect("chunk(2) gives two pieces");
        // GEGLU: first half is the value, the second half goes through exact (erf) GELU.
        let h = value.mul(&gate.gelu()?)?; // (B, S, inner)
        self.ff_out.forward(&h)?.add(&x) // (B, S, C)
    }

    fn has_adapters(&self) -> bool {
        let mut v = Vec::new();
        self.linears("", &mut v);
        v.iter().any(|(_, l)| l.adapter.is_some())
    }

    /// Every linear in `named_modules` order: attn1's, attn2's, then the feed-forward's.
    fn linears<'a>(&'a self, p: &str, out: &mut Vec<(String, &'a AdaptedLinear)>) {
        self.attn1.projections(&format!("{p}.attn1"), out);
        self.attn2.projections(&format!("{p}.attn2"), out);
        out.push((format!("{p}.ff.net.0.proj"), &self.ff_proj));
        out.push((format!("{p}.ff.net.2"), &self.ff_out));
    }

    fn linears_mut<'a>(&'a mut self, p: &str, out: &mut Vec<(String, &'a mut AdaptedLinear)>) {
        self.attn1.projections_mut(&format!("{p}.attn1"), out);
        self.attn2.projections_mut(&format!("{p}.attn2"), out);
        out.push((format!("{p}.ff.net.0.proj"), &mut self.ff_proj));
        out.push((format!("{p}.ff.net.2"), &mut self.ff_out));
    }
}

/// proj_in is Linear(C, inner) with `use_linear_projection` (SDXL), else a 1x1 conv applied
/// before flattening; proj_out mirrors it.
#[derive(Clone, Debug)]
pub enum Projection {
    Linear(Box<AdaptedLinear>),
    Conv(Conv2d),
}

/// GroupNorm -> proj_in -> blocks -> proj_out, plus the input as residual.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

/// Sizes of one spatial transformer.
#[derive(Clone, Copy, Debug)]
pub struct TransformerDims {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub cross_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl TransformerDims {
    /// diffusers: head size = channels // heads, inner width = heads * head size.
    fn head_dim(&self) -> usize {
        self.channels / self.heads
    }
    fn inner(&self) -> usize {
        self.heads * self.head_dim()
    }
}

impl Transformer2DModel {
    pub fn load(vb: &Weights, d: TransformerDims) -> Result<Transformer2DModel> {
        let (c, inner) = (d.channels, d.inner());
        let proj = |name: &str, d_in: usize, d_out: usize| -> Result<Projection> {
            let vb = vb.pp(name);
            Ok(if d.linear_projection {
                Projection::Linear(Box::new(AdaptedLinear::new(Linear::load(
                    &vb, d_in, d_out, true,
                )?)))
            } else {
                Projection::Conv(conv_with_bias(&vb, d_in, d_out, 1, ConvParams::default())?)
            })
        };
        let blocks = (0..d.depth)
            .map(|i| {
                let vb = vb.pp("transformer_blocks").pp(i);
                BasicTransformerBlock::load(&vb, inner, d.cross_dim, d.heads, d.head_dim())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2DModel {
            norm: GroupNorm::load(&vb.pp("norm"), d.groups, c, TRANSFORMER_GN_EPS)?,
            proj_in: proj("proj_in", c, inner)?,
            transformer_blocks: blocks,
            proj_out: proj("proj_out", inner, c)?,
        })
    }

    pub fn shapes(out: &mut ParamShapes, p: &str, d: TransformerDims) {
        let (c, inner) = (d.channels, d.inner());
        out.norm(&format!("{p}.norm"), c);
        let proj = |out: &mut ParamShapes, name: &str, d_in: usize, d_out: usize| {
            if d.linear_projection {
                out.linear(&format!("{p}.{name}"), d_in, d_out, true);
            } else {
                out.conv(&format!("{p}.{name}"), d_in, d_out, 1);
            }
        };
        proj(out, "proj_in", c, inner);
        for i in 0..d.depth {
            let bp = format!("{p}.transformer_blocks.{i}");
            BasicTransformerBlock::shapes(out, &bp, inner, d.cross_dim, inner);
        }
        proj(out, "proj_out", inner, c);
    }

    /// x (B, C, H, W), context (B, T, Dc) -> (B, C, H, W).
    pub fn forward(&self, x: &Tensor, context: &Tensor, ckpt: &mut BlockCounter) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?; // (B, C, H, W)
        let flat = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute(&[0, 2, 3, 1])?.reshape((b, h * w, ch)) // (B, H*W, C)
        };
        let mut hs = match &self.proj_in {
            Projection::Linear(l) => l.forward(&flat(&normed)?)?,
            Projection::Conv(cv) => flat(&cv.forward(&normed)?)?,
        }; // (B, H*W, inner)
        for blk in &self.transformer_blocks {
            let selected = ckpt.take();
            hs = if selected && grad_enabled() && (blk.has_adapters() || hs.tracks()) {
                let blk = blk.clone();
                checkpoint(&[hs, context.clone()], move |xs| {
                    blk.forward(&xs[0], &xs[1])
                })?
            } else {
                blk.forward(&hs, context)?
            }; // (B, H*W, inner)
        }
        let unflat = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?.permute(&[0, 3, 1, 2]) // (B, C, H, W)
        };
        let out = match &self.proj_out {
            Projection::Linear(l) => unflat(&l.forward(&hs)?)?,
            Projection::Conv(cv) => cv.forward(&unflat(&hs)?.contiguous()?)?,
        }; // (B, C, H, W)
        debug_assert_eq!(out.dim(1).ok(), Some(c));
        out.add(x) // (B, C, H, W)
    }

    /// Every linear under module path `p`, in PyTorch's `named_modules` order: proj_in (when it
    /// is a linear), each block's, proj_out.
    pub fn linears<'a>(&'a self, p: &str, out: &mut Vec<(String, &'a AdaptedLinear)>) {
        if let Projection::Linear(l) = &self.proj_in {
            out.push((format!("{p}.proj_in"), l.as_ref()));
        }
        for (i, blk) in self.transformer_blocks.iter().enumerate() {
            blk.linears(&format!("{p}.transformer_blocks.{i}"), out);
        }
        if let Projection::Linear(l) = &self.proj_out {
            out.push((format!("{p}.proj_out"), l.as_ref()));
        }
    }

    pub fn linears_mut<'a>(&'a mut self, p: &str, out: &mut Vec<(String, &'a mut AdaptedLinear)>) {
        if let Projection::Linear(l) = &mut self.proj_in {
            out.push((format!("{p}.proj_in"), l.as_mut()));
        }
        for (i, blk) in self.transformer_blocks.iter_mut().enumerate() {
            blk.linears_mut(&format!("{p}.transformer_blocks.{i}"), out);
        }
        if let Projection::Linear(l) = &mut self.proj_out {
            out.push((format!("{p}.proj_out"), l.as_mut()));
        }
    }
}
