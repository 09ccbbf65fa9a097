//! The pre-LN transformer stack shared by CLIP's text and vision towers (`CLIPEncoder` in
//! transformers): `x + attn(LN1(x))`, then `x + fc2(act(fc1(LN2(x))))`. Keys under the encoder:
//! `layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.{fc1,fc2}, layer_norm2}`.

use super::config::{Activation, EncoderConfig};
use crate::nn::lora::AdaptedLinear;
use crate::nn::{LayerNorm, Linear, Weights};
use crate::{Result, Tensor};

/// Multi-head self-attention with biased q/k/v/out projections (each may carry a live LoRA
/// adapter: text-encoder training).
#[derive(Clone, Debug)]
pub struct ClipAttention {
    pub q_proj: AdaptedLinear,
    pub k_proj: AdaptedLinear,
    pub v_proj: AdaptedLinear,
    pub out_proj: AdaptedLinear,
    pub num_heads: usize,
}

impl ClipAttention {
    pub fn load(vb: &Weights, c: &EncoderConfig) -> Result<ClipAttention> {
        let d = c.hidden_size;
        let lin = |n: &str| -> Result<AdaptedLinear> {
            Ok(AdaptedLinear::new(Linear::load(&vb.pp(n), d, d, true)?))
        };
        Ok(ClipAttention {
            q_proj: lin("q_proj")?,
            k_proj: lin("k_proj")?,
            v_proj: lin("v_proj")?,
            out_proj: lin("out_proj")?,
            num_heads: c.num_attention_heads,
        })
    }

    /// `causal`: position i sees positions j <= i (the text tower; SDXL.md 2.1).
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        let (nh, dh) = (self.num_heads, d / self.num_heads);
        let heads = |t: Tensor| t.reshape((b, s, nh, dh))?.permute(&[0, 2, 1, 3]);
        let q = heads(self.q_proj.forward(x)?)?; // (B, NH, S, Dh)
        let k = heads(self.k_proj.forward(x)?)?; // (B, NH, S, Dh)
        let v = heads(self.v_proj.forward(x)?)?; // (B, NH, S, Dh)
        let scale = 1.0 / (dh as f64).sqrt();
        let o = Tensor::sdpa(&q, &k, &v, scale, causal)?; // (B, NH, S, Dh)
        let o = o.permute(&[0, 2, 1, 3])?.reshape((b, s, d))?; // (B, S, D)
        self.out_proj.forward(&o) // (B, S, D)
    }
}

#[derive(Clone, Debug)]
pub struct ClipMlp {
    pub fc1: AdaptedLinear,
    pub fc2: AdaptedLinear,
    pub act: Activation,
}

impl ClipMlp {
    pub fn load(vb: &Weights, c: &EncoderConfig) -> Result<ClipMlp> {
        Ok(ClipMlp {
            fc1: AdaptedLinear::new(Linear::load(
                &vb.pp("fc1"),
                c.hidden_size,
                c.intermediate_size,
                true,
            )?),
            fc2: AdaptedLinear::new(Linear::load(
                &vb.pp("fc2"),
                c.intermediate_size,
                c.hidden_size,
                true,
            )?),
            act: c.hidden_act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.forward(&self.fc1.forward(x)?)?; // (B, S, I)
        self.fc2.forward(&h) // (B, S, D)
    }
}

#[derive(Clone, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    pub fn load(vb: &Weights, c: &EncoderConfig) -> Result<ClipEncoderLayer> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(ClipEncoderLayer {
            self_attn: ClipAttention::load(&vb.pp("self_attn"), c)?,
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), d, eps)?,
            mlp: ClipMlp::load(&vb.pp("mlp"), c)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), d, eps)?,
        })
    }

    /// The six linears LoRA trainers wrap (kohya's `CLIPAttention` and `CLIPMLP` targets), as
    /// (path under the layer, linear): `self_attn.{q,k,v,out}_proj`, `mlp.fc1`, `mlp.fc2`.
    pub fn linears(&self) -> [(&'static str, &AdaptedLinear); 6] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.out_proj", &a.out_proj),
            ("mlp.fc1", &m.fc1),
            ("mlp.fc2", &m.fc2),
        ]
    }

    pub fn linears_mut(&mut self) -> [(&'static str, &mut AdaptedLinear); 6] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.out_proj", &mut a.out_proj),
            ("mlp.fc1", &mut m.fc1),
            ("mlp.fc2", &mut m.fc2),
        ]
    }

    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let a = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, causal)?; // (B, S, D)
        let x = x.add(&a)?; // (B, S, D)
        let m = self.mlp.forward(&self.layer_norm2.forward(&x)?)?; // (B, S, D)
        x.add(&m) // (B, S, D)
    }
}

#[derive(Clone, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    pub fn load(vb: &Weights, c: &EncoderConfig) -> Result<ClipEncoder> {
        let vb = vb.pp("layers");
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(&vb.pp(i), c))
            .collect::<Result<_>>()?;
        Ok(ClipEncoder { layers })
    }

    /// Every hidden state, as transformers' `output_hidden_states=True` returns them: the input
    /// (embedding output) first, then each layer's output, so `L + 1` tensors of (B, S, D).
    /// Index `-2` is the input of the last layer, the "penultimate" state SDXL conditions on.
    pub fn forward_all(&self, x: &Tensor, causal: bool) -> Result<Vec<Tensor>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        states.push(x.clone());
        for layer in &self.layers {
            let next = layer.forward(&states[states.len() - 1], causal)?; // (B, S, D)
            states.push(next);
        }
        Ok(states)
    }

    /// Only the last layer's output (the vision tower keeps nothing else).
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, causal)?; // (B, S, D)
        }
        Ok(x)
    }
}
