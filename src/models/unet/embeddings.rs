//! Timestep sinusoids and the two small MLPs that turn them (and SDXL's pooled text + size ids)
//! into the vector every resnet receives (SDXL.md 1.3, 1.4).

use super::config::{TextTimeConfig, UNetConfig};
use super::ParamShapes;
use crate::nn::{Linear, Weights};
use crate::{DType, Error, Result, Tensor};

/// diffusers' `get_timestep_embedding` with scale 1 and max period 10000, for a (N,) tensor of
/// (possibly fractional) timesteps -> (N, dim).
///
/// diffusers computes the sinusoid in float32 whatever the model dtype (`timesteps.float()`),
/// so this does too, on the host, step by step in the same order: exponent = f32(-ln 10000) * i,
/// divided by (half - shift), exp, times t. `exp` goes through f64 and rounds once, which is the
/// correctly rounded f32 value that PyTorch's vectorised expf returns to within an ulp.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    if t.rank() != 1 {
        return Err(Error::Rank {
            op: "timestep_embedding",
            expected: 1,
            got: t.shape().clone(),
        });
    }
    let half = dim / 2;
    let denom = half as f32 - freq_shift as f32;
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (((neg_log * i as f32) / denom) as f64).exp() as f32)
        .collect();
    let ts = t.to_vec_f64()?;
    let mut out = Vec::with_capacity(ts.len() * dim);
    for &tv in &ts {
        let args: Vec<f32> = freqs.iter().map(|&f| tv as f32 * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        // An odd width gets one zero column at the end, as diffusers pads it.
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Tensor::from_vec(out, (ts.len(), dim), t.device()) // (N, dim)
}

/// `TimestepEmbedding`: linear_1 -> SiLU -> linear_2.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(vb: &Weights, d_in: usize, d_out: usize) -> Result<TimestepEmbedding> {
        Ok(TimestepEmbedding {
            linear_1: Linear::load(&vb.pp("linear_1"), d_in, d_out, true)?,
            linear_2: Linear::load(&vb.pp("linear_2"), d_out, d_out, true)?,
        })
    }

    pub fn shapes(out: &mut ParamShapes, prefix: &str, d_in: usize, d_out: usize) {
        out.linear(&format!("{prefix}.linear_1"), d_in, d_out, true);
        out.linear(&format!("{prefix}.linear_2"), d_out, d_out, true);
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?) // (B, D)
    }
}

/// The conditioning vector `emb` of every resnet: time embedding plus, for SDXL, the text_time
/// embedding of pooled text and the six size/crop ids.
#[derive(Clone, Debug)]
pub struct ConditioningEmbedding {
    pub time_embedding: TimestepEmbedding,
    pub add_embedding: Option<(TextTimeConfig, TimestepEmbedding)>,
    /// Width of the main timestep sinusoid (`block_out_channels[0]`).
    pub time_proj_dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl ConditioningEmbedding {
    pub fn load(vb: &Weights, cfg: &UNetConfig) -> Result<ConditioningEmbedding> {
        let time_proj_dim = cfg.block_out_channels[0];
        let add_embedding = match &cfg.text_time {
            Some(tt) => Some((
                tt.clone(),
                TimestepEmbedding::load(&vb.pp("add_embedding"), tt.input_dim, cfg.time_embed_dim)?,
            )),
            None => None,
        };
        Ok(ConditioningEmbedding {
            time_embedding: TimestepEmbedding::load(
                &vb.pp("time_embedding"),
                time_proj_dim,
                cfg.time_embed_dim,
            )?,
            add_embedding,
            time_proj_dim,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
        })
    }

    pub fn shapes(out: &mut ParamShapes, cfg: &UNetConfig) {
        let d = cfg.time_embed_dim;
        TimestepEmbedding::shapes(out, "time_embedding", cfg.block_out_channels[0], d);
        if let Some(tt) = &cfg.text_time {
            TimestepEmbedding::shapes(out, "add_embedding", tt.input_dim, d);
        }
    }

    /// timestep (B,), text_embeds (B, Dp), time_ids (B, 6) -> emb (B, D) in `dtype`.
    pub fn forward(
        &self,
        timestep: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
        dtype: DType,
    ) -> Result<Tensor> {
        let t = timestep_embedding(
            timestep,
            self.time_proj_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        )?
        .to_dtype(dtype)?; // (B, C0)
        let emb = self.time_embedding.forward(&t)?; // (B, D)
        let Some((tt, add)) = &self.add_embedding else {
            return Ok(emb);
        };
        let Some((text_embeds, time_ids)) = added else {
            return Err(Error::msg(
                "unet: this model has text_time conditioning; pass text_embeds and time_ids",
            ));
        };
        let (b, n_ids) = time_ids.dims2()?;
        let (bt, d_text) = text_embeds.dims2()?;
        if bt != b || d_text + n_ids * tt.time_embed_dim != tt.input_dim {
            return Err(Error::msg(format!(
                "unet: text_embeds {:?} and time_ids {:?} do not make the {} add_embedding inputs \
                 (text width + ids x {})",
                text_embeds.dims(),
                time_ids.dims(),
                tt.input_dim,
                tt.time_embed_dim
            )));
        }
        // Each id gets its own sinusoid, laid out id by id (SDXL.md 1.4).
        let ids = time_ids.reshape(b * n_ids)?; // (B*6,)
        let time_embeds = timestep_embedding(
            &ids,
            tt.time_embed_dim,
            self.flip_sin_to_cos,
            self.freq_shift,
        )?
        .reshape((b, n_ids * tt.time_embed_dim))?
        .to_dtype(dtype)?; // (B, 6*Dt)
        let add_in = Tensor::cat(&[text_embeds.to_dtype(dtype)?, time_embeds], 1)?; // (B, Dp + 6*Dt)
        emb.add(&add.forward(&add_in)?) // (B, D)
    }
}
