//! LoRA adapters on a frozen linear: plain (`dh = (alpha/r) (h A^T) B^T`) and K-StyleLoRA's gated
//! form, whose low-rank update is modulated per sample by CLIP cultural-relevance scores
//! (KSTYLE.md "Gated LoRA layer"; the executable definition is `kstyle_ref.py`).

use super::dora::Dora;
use super::lora_dropout::{DropoutDraw, DropoutMasks};
use super::lycoris::Lycoris;
use super::{Conv2d, Linear};
use crate::tensor::{ConvParams, LoraGates, Rng};
use crate::{DType, Device, Error, Result, Tensor};

/// Weight of the attention-weighted mean against the channel max when pooling h.
pub const POOL_LAMBDA: f64 = 0.7;
/// Added to the sum of spatial weights before dividing.
pub const POOL_EPS: f64 = 1e-6;
/// `normalize` clamps the norm to at least this.
pub const NORMALIZE_EPS: f64 = 1e-12;

/// Sizes and scalars of one adapter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// The paper's sigma: extra scale of the gated update only.
    pub guidance: f64,
    /// Hidden width G of the spatial-attention MLP.
    pub gate_hidden: usize,
    /// Hidden width M of the modulation MLPs.
    pub mod_hidden: usize,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 4,
            alpha: 4.0,
            guidance: 1.5,
            gate_hidden: 64,
            mod_hidden: 32,
        }
    }
}

/// Linear(in, hidden) -> SiLU -> Linear(hidden, out): the `*_mlp` of the paper.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub fc0: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn init(
        d_in: usize,
        hidden: usize,
        d_out: usize,
        rng: &mut Rng,
        dtype: DType,
        device: Device,
    ) -> Result<Mlp> {
        Ok(Mlp {
            fc0: Linear::init(d_in, hidden, rng, dtype, device)?,
            fc2: Linear::init(hidden, d_out, rng, dtype, device)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc0.forward(x)?.silu()?)
    }

    /// (name, tensor) in PyTorch order: `0.weight`, `0.bias`, `2.weight`, `2.bias`.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (idx, l) in [(0, &self.fc0), (2, &self.fc2)] {
            for (n, t) in l.tensors() {
                v.push((format!("{idx}.{n}"), t.clone()));
            }
        }
        v
    }
}

/// The gating network of one wrapped linear.
#[derive(Clone, Debug)]
pub struct Gates {
    pub attn_mlp: Mlp,
    pub proj: Linear,
    pub down_mlp: Mlp,
    pub up_mlp: Mlp,
    pub gate_mlp: Mlp,
}

/// Per-sample modulation: (w_down (B, r), w_up (B, r), a (B, 1)).
pub struct GateValues {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Tensor,
}

impl Gates {
    /// Relevance-driven gates for h (B, S, D_in) against unit concept embeddings T (K, E).
    pub fn forward(&self, h: &Tensor, concepts: &Tensor) -> Result<GateValues> {
        let logits = self.attn_mlp.forward(h)?.squeeze(2)?; // (B, S)
                                                            // Sigmoid weights, weighted mean (POOL_EPS) and channel max mixed by POOL_LAMBDA: one pass.
        let h_c = Tensor::spatial_pool(h, &logits)?; // (B, D_in)
        self.modulate(&h_c, concepts)
    }

    /// The same gates with the pooling composed from primitives: the slow reference the fused
    /// pooling is tested against.
    pub fn forward_composed(&self, h: &Tensor, concepts: &Tensor) -> Result<GateValues> {
        let w = self.attn_mlp.forward(h)?.sigmoid()?; // (B, S, 1)
        let weighted = h.mul(&w)?.sum(&[1])?; // (B, D_in)
        let h_att = weighted.div(&w.sum(&[1])?.add_scalar(POOL_EPS)?)?; // (B, D_in)
        let h_max = h.max(1)?; // (B, D_in)
        let h_c = h_att
            .scale(POOL_LAMBDA)?
            .add(&h_max.scale(1.0 - POOL_LAMBDA)?)?; // (B, D_in)
        self.modulate(&h_c, concepts)
    }

    fn modulate(&self, h_c: &Tensor, concepts: &Tensor) -> Result<GateValues> {
        let v = self.proj.forward(h_c)?.normalize_l2(1, NORMALIZE_EPS)?; // (B, E)
        let s = v.matmul(&concepts.t()?)?; // (B, K)
        Ok(GateValues {
            down: self.down_mlp.forward(&s)?.sigmoid()?,
            up: self.up_mlp.forward(&s)?.sigmoid()?,
            alpha: self.gate_mlp.forward(&s)?.sigmoid()?,
        })
    }

    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        v.extend(
            self.attn_mlp
                .named()
                .into_iter()
                .map(|(k, t)| (format!("attn_mlp.{k}"), t)),
        );
        for (k, t) in self.proj.tensors() {
            v.push((format!("proj.{k}"), t.clone()));
        }
        for (n, m) in [
            ("down_mlp", &self.down_mlp),
            ("up_mlp", &self.up_mlp),
            ("gate_mlp", &self.gate_mlp),
        ] {
            v.extend(m.named().into_iter().map(|(k, t)| (format!("{n}.{k}"), t)));
        }
        v
    }
}

/// Running sums of a gated adapter's effective per-rank scale `a * w_down * w_up` over every
/// sample it has seen: what `kstyle export --bake-gates` folds into plain LoRA weights.
#[derive(Clone, Debug, Default)]
pub struct GateRecord {
    pub sum: Vec<f64>,
    pub samples: usize,
}

impl GateRecord {
    pub fn mean(&self) -> Vec<f64> {
        self.sum
            .iter()
            .map(|s| s / self.samples.max(1) as f64)
            .collect()
    }
}

/// A LoRA adapter for one frozen linear.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// lora_down (r, D_in)
    pub a: Tensor,
    /// lora_up (D_out, r)
    pub b: Tensor,
    pub config: LoraConfig,
    pub gates: Option<Gates>,
    /// Unit concept embeddings T (K, E); shared by every gated adapter of a model.
    pub concepts: Option<Tensor>,
    /// When set, every forward adds its gate values here (calibration for gate baking).
    pub recorder: Option<std::sync::Arc<std::sync::Mutex<GateRecord>>>,
    /// Set by the trainer around a training forward: the LoRA dropouts' draw.
    pub dropout: Option<DropoutDraw>,
    /// LyCORIS' LoHa or LoKr (see [`super::lycoris`]): `a` / `b` are then the first two of its
    /// tensors, this the rest. None: LoRA.
    pub lycoris: Option<Lycoris>,
    /// DoRA's magnitude (see [`super::dora`]): on LoRA, LoHa or LoKr (LyCORIS' DoRA, DoHa, DoKr).
    pub dora: Option<Dora>,
}

impl LoraAdapter {
    /// Fresh trainable adapter: A kaiming-uniform (a = sqrt 5), B = 0, gates PyTorch-default.
    /// The draw order follows `GatedLoRALinear.__init__`: A, then attn_mlp, proj, down, up, gate.
    pub fn init(
        d_in: usize,
        d_out: usize,
        config: LoraConfig,
        concepts: Option<&Tensor>,
        rng: &mut Rng,
        dtype: DType,
        device: Device,
    ) -> Result<LoraAdapter> {
        let r = config.rank;
        let bound = 1.0 / (d_in as f64).sqrt();
        let a = Tensor::rand_uniform((r, d_in), -bound, bound, rng, dtype, device)?.var()?;
        let b = Tensor::zeros((d_out, r), dtype, device)?.var()?;
        let gates = match concepts {
            Some(t) => {
                let (k, e) = t.dims2()?;
                Some(Gates {
                    attn_mlp: Mlp::init(d_in, config.gate_hidden, 1, rng, dtype, device)?,
                    proj: Linear::init(d_in, e, rng, dtype, device)?,
                    down_mlp: Mlp::init(k, config.mod_hidden, r, rng, dtype, device)?,
                    up_mlp: Mlp::init(k, config.mod_hidden, r, rng, dtype, device)?,
                    gate_mlp: Mlp::init(k, config.mod_hidden, 1, rng, dtype, device)?,
                })
            }
            None => None,
        };
        Ok(LoraAdapter {
            a,
            b,
            config,
            gates,
            concepts: concepts.cloned(),
            recorder: None,
            dropout: None,
            lycoris: None,
            dora: None,
        })
    }

    /// kohya's LoRA on a convolution (LoCon, sd-scripts `--network_args conv_dim=N`): lora_down
    /// a convolution shaped like the base's (r, C_in, kh, kw), kaiming-uniform over its fan-in
    /// C_in kh kw (a = sqrt 5, as `LoRAModule.__init__`), lora_up a 1x1 convolution
    /// (C_out, r, 1, 1), zero. Always plain: the gates pool a token sequence.
    pub fn init_conv(
        c_in: usize,
        c_out: usize,
        kernel: (usize, usize),
        config: LoraConfig,
        rng: &mut Rng,
        dtype: DType,
        device: Device,
    ) -> Result<LoraAdapter> {
        let r = config.rank;
        let bound = 1.0 / ((c_in * kernel.0 * kernel.1) as f64).sqrt();
        let a = Tensor::rand_uniform(
            (r, c_in, kernel.0, kernel.1),
            -bound,
            bound,
            rng,
            dtype,
            device,
        )?
        .var()?;
        let b = Tensor::zeros((c_out, r, 1, 1), dtype, device)?.var()?;
        Ok(LoraAdapter {
            a,
            b,
            config,
            gates: None,
            concepts: None,
            recorder: None,
            dropout: None,
            lycoris: None,
            dora: None,
        })
    }

    pub fn is_gated(&self) -> bool {
        self.gates.is_some()
    }

    /// A fresh trainable plain adapter for a frozen layer whose weight is `dims`: (out, in) a
    /// linear's ([`LoraAdapter::init`]), (out, in, kh, kw) a convolution's
    /// ([`LoraAdapter::init_conv`]).
    pub fn init_plain(
        dims: &[usize],
        config: LoraConfig,
        rng: &mut Rng,
        dtype: DType,
        device: Device,
    ) -> Result<LoraAdapter> {
        match *dims {
            [out, d_in] => LoraAdapter::init(d_in, out, config, None, rng, dtype, device),
            [out, c_in, kh, kw] => {
                LoraAdapter::init_conv(c_in, out, (kh, kw), config, rng, dtype, device)
            }
            _ => Err(Error::msg(format!(
                "an adapter wraps a linear or a 2-d convolution, not a weight of shape {dims:?}"
            ))),
        }
    }

    /// Whether this adapter wraps a convolution rather than a linear.
    pub fn is_conv(&self) -> bool {
        match &self.lycoris {
            Some(l) => l.shape.len() == 4,
            None => self.a.rank() == 4,
        }
    }

    /// `base + dh` for a convolution's input x (B, C_in, H, W): lora_down convolved with the
    /// base's stride and padding, then lora_up as a 1x1 convolution, times alpha / r (kohya's
    /// `LoRAModule.forward` on a Conv2d). The LoRA dropouts apply as on a linear, the network
    /// mask per entry of the (B, r, H', W') activation.
    pub fn apply_conv(
        &self,
        x: &Tensor,
        base: Option<&Tensor>,
        params: ConvParams,
    ) -> Result<Tensor> {
        if let Some(cast) = self.cast_for(x.dtype())? {
            return cast.apply_conv(x, base, params);
        }
        if self.lycoris.is_some() {
            return self.apply_lycoris(x, base, Some(params));
        }
        if self.gates.is_some() {
            return Err(Error::msg(
                "a gated adapter on a convolution: the gates pool a token sequence",
            ));
        }
        let mut scale = self.config.alpha / self.config.rank as f64;
        let mut z = x.conv2d(&self.a, None, params)?; // (B, r, H', W')
        if let Some(draw) = &self.dropout {
            let (b, r, h, w) = z.dims4()?;
            draw.check_batch(b)?;
            let masks = draw.masks(h * w, r, z.dtype(), z.device())?;
            if let Some(m) = &masks.entries {
                // Drawn (B, S, r) with S = H' W' row-major: the same entries as a linear's.
                z = z.mul(&m.reshape((b, h, w, r))?.permute(&[0, 3, 1, 2])?)?;
            }
            if let Some(m) = &masks.rows {
                z = z.mul(&m.reshape((b, r, 1, 1))?)?;
            }
            scale *= masks.scale;
        }
        let dh = z
            .conv2d(&self.b, None, ConvParams::default())?
            .scale(scale)?; // (B, C_out, H', W')
        match base {
            Some(b) => b.add(&dh),
            None => Ok(dh),
        }
    }

    /// The update dh for input h (B, S, D_in) or (S, D_in).
    pub fn delta(&self, h: &Tensor) -> Result<Tensor> {
        self.apply(h, None)
    }

    /// `base + dh` in one fused pass (`base` None gives dh alone).
    pub fn apply(&self, h: &Tensor, base: Option<&Tensor>) -> Result<Tensor> {
        if let Some(cast) = self.cast_for(h.dtype())? {
            return cast.apply(h, base);
        }
        if self.lycoris.is_some() {
            return self.apply_lycoris(h, base, None);
        }
        if h.rank() == 2 {
            // A gated adapter reads (S, D_in) as one sample's sequence (the reference's squeeze);
            // a plain one reads (B, D_in) as a batch of vectors (kohya's LoRA on a resnet's
            // time_emb_proj), so that the LoRA dropouts draw per sample. Without dropout both
            // readings compute the same rows.
            let axis = if self.gates.is_some() { 0 } else { 1 };
            let base3 = base.map(|b| b.unsqueeze(axis)).transpose()?;
            return self
                .apply(&h.unsqueeze(axis)?, base3.as_ref())?
                .squeeze(axis);
        }
        if let Some(draw) = &self.dropout {
            let (b, s, _) = h.dims3()?;
            draw.check_batch(b)?;
            let masks = draw.masks(s, self.config.rank, h.dtype(), h.device())?;
            return self.apply_masked(h, base, &masks);
        }
        let r = self.config.rank as f64;
        let (Some(gates), Some(concepts)) = (&self.gates, &self.concepts) else {
            return Tensor::lora_update(h, &self.a, &self.b, None, base, self.config.alpha / r);
        };
        let g = gates.forward(h, concepts)?;
        if let Some(rec) = &self.recorder {
            let eff = g.down.mul(&g.up)?.mul(&g.alpha)?; // (B, r)
            let (b, r) = eff.dims2()?;
            let v = eff.to_vec_f64()?;
            let mut rec = rec.lock().unwrap_or_else(|e| e.into_inner());
            rec.sum.resize(r, 0.0);
            for row in v.chunks(r) {
                rec.sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
            }
            rec.samples += b;
        }
        let lg = LoraGates {
            w_down: g.down,
            w_up: g.up,
            a: g.alpha,
        };
        Tensor::lora_update(
            h,
            &self.a,
            &self.b,
            Some(&lg),
            base,
            self.config.alpha / r * self.config.guidance,
        ) // (B, S, D_out)
    }

    /// `base + dh` for h (B, S, D_in) with the LoRA dropouts' `masks` on `h A^T`: network
    /// dropout's entries, then each sample's rank and module mask (before the gates' per-rank
    /// modulation), kohya's rescale of what stays with the adapter's scale. Composed from
    /// primitives: dropout is a training option, and the fused update has no mask input.
    pub fn apply_masked(
        &self,
        h: &Tensor,
        base: Option<&Tensor>,
        masks: &DropoutMasks,
    ) -> Result<Tensor> {
        let mut scale = self.config.alpha / self.config.rank as f64 * masks.scale;
        let mut z = h.matmul(&self.a.t()?)?; // (B, S, r)
        if let Some(m) = &masks.entries {
            z = z.mul(m)?;
        }
        let mut rows = masks.rows.clone(); // (B, r)
        let mut per_sample = None;
        if let (Some(gates), Some(concepts)) = (&self.gates, &self.concepts) {
            let g = gates.forward(h, concepts)?;
            let modulation = g.down.mul(&g.up)?;
            rows = Some(match rows {
                Some(m) => modulation.mul(&m)?,
                None => modulation,
            });
            per_sample = Some(g.alpha); // (B, 1)
            scale *= self.config.guidance;
        }
        if let Some(m) = rows {
            z = z.mul(&m.unsqueeze(1)?)?;
        }
        let dh = z.matmul(&self.b.t()?)?; // (B, S, D_out)
        let dh = match per_sample {
            Some(a) => dh.mul(&a.scale(scale)?.unsqueeze(1)?)?,
            None => dh.scale(scale)?,
        };
        match base {
            Some(b) => b.add(&dh),
            None => Ok(dh),
        }
    }

    /// The update composed from primitives (matmuls and broadcasts): the slow reference the
    /// fused path is tested against.
    pub fn delta_composed(&self, h: &Tensor) -> Result<Tensor> {
        let r = self.config.rank as f64;
        let z = h.matmul(&self.a.t()?)?; // (B, S, r)
        let (Some(gates), Some(concepts)) = (&self.gates, &self.concepts) else {
            return z.matmul(&self.b.t()?)?.scale(self.config.alpha / r);
        };
        let g = gates.forward_composed(h, concepts)?;
        let mod_r = g.down.mul(&g.up)?.unsqueeze(1)?; // (B, 1, r)
        let dh = z.mul(&mod_r)?.matmul(&self.b.t()?)?; // (B, S, D_out)
        dh.mul(
            &g.alpha
                .scale(self.config.alpha / r * self.config.guidance)?
                .unsqueeze(1)?,
        )
    }

    /// The gate values alone (diagnostics, baking gates into plain LoRA weights).
    pub fn gate_values(&self, h: &Tensor) -> Result<Option<GateValues>> {
        match (&self.gates, &self.concepts) {
            (Some(g), Some(t)) => g.forward(h, t).map(Some),
            _ => Ok(None),
        }
    }

    /// An inference copy: every tensor converted to `dtype`, without autograd state, B scaled by
    /// `multiplier` (the `--lora FILE:SCALE` strength).
    pub fn frozen(&self, dtype: DType, multiplier: f64) -> Result<LoraAdapter> {
        let mut a = self.map_tensors(&|t| t.detach().to_dtype(dtype))?;
        match &mut a.dora {
            // DoRA's update is not linear in B: it runs at the strength instead.
            Some(d) => d.strength = multiplier,
            None => a.b = self.b.detach().scale(multiplier)?.to_dtype(dtype)?,
        }
        a.recorder = None;
        Ok(a)
    }

    /// Fresh trainable leaves holding this adapter's values in `dtype` (the concepts cast, not
    /// trainable): the mixed-precision trainer keeps these in the UNet and the f32 values in its
    /// optimizer, which writes the rounded values back after each step.
    pub fn trainable_in(&self, dtype: DType) -> Result<LoraAdapter> {
        let mut a = self.map_tensors(&|t| t.detach().to_dtype(dtype)?.var())?;
        a.concepts = self
            .concepts
            .as_ref()
            .map(|c| c.detach().to_dtype(dtype))
            .transpose()?;
        Ok(a)
    }

    /// The adapter as the forward at compute dtype `dtype` uses it: every tensor cast, with the
    /// casts on the tape, so gradients reach the parameters in their own (f32) dtype. Mixed
    /// precision as autocast does it: f32 parameters and optimizer, bf16/f16 arithmetic. None
    /// when nothing needs a cast.
    fn cast_for(&self, dtype: DType) -> Result<Option<LoraAdapter>> {
        if self.a.dtype() == dtype {
            return Ok(None);
        }
        self.map_tensors(&|t| t.to_dtype(dtype)).map(Some)
    }

    /// A copy with `f` applied to every tensor (parameters and concepts); the recorder is kept.
    fn map_tensors(&self, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<LoraAdapter> {
        let lin = |l: &Linear| -> Result<Linear> {
            Ok(Linear {
                weight: f(&l.weight)?,
                bias: l.bias.as_ref().map(f).transpose()?,
            })
        };
        let mlp = |m: &Mlp| -> Result<Mlp> {
            Ok(Mlp {
                fc0: lin(&m.fc0)?,
                fc2: lin(&m.fc2)?,
            })
        };
        let gates = match &self.gates {
            Some(g) => Some(Gates {
                attn_mlp: mlp(&g.attn_mlp)?,
                proj: lin(&g.proj)?,
                down_mlp: mlp(&g.down_mlp)?,
                up_mlp: mlp(&g.up_mlp)?,
                gate_mlp: mlp(&g.gate_mlp)?,
            }),
            None => None,
        };
        Ok(LoraAdapter {
            a: f(&self.a)?,
            b: f(&self.b)?,
            config: self.config,
            gates,
            concepts: self.concepts.as_ref().map(f).transpose()?,
            recorder: self.recorder.clone(),
            dropout: self.dropout.clone(),
            lycoris: match &self.lycoris {
                Some(l) => Some(Lycoris {
                    rest: l.rest.iter().map(f).collect::<Result<_>>()?,
                    ..l.clone()
                }),
                None => None,
            },
            dora: match &self.dora {
                Some(d) => Some(Dora {
                    magnitude: f(&d.magnitude)?,
                    strength: d.strength,
                }),
                None => None,
            },
        })
    }

    /// Trainable tensors under the reference's names (`lora_A`, `lora_B`, `attn_mlp.0.weight`,
    /// ...; LyCORIS' under its own, `hada_w1_a`, `lokr_w1`, ...).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = match &self.lycoris {
            Some(l) => {
                let t = [&self.a, &self.b].into_iter().chain(&l.rest);
                l.names()
                    .iter()
                    .zip(t)
                    .map(|(n, t)| (n.to_string(), t.clone()))
                    .collect()
            }
            None => vec![
                ("lora_A".to_string(), self.a.clone()),
                ("lora_B".to_string(), self.b.clone()),
            ],
        };
        if let Some(g) = &self.gates {
            v.extend(g.named());
        }
        if let Some(d) = &self.dora {
            v.push(("dora_scale".to_string(), d.magnitude.clone()));
        }
        v
    }

    /// Replace every trainable tensor by a fresh variable holding `value(name)` (fixtures,
    /// checkpoints). Shapes must match.
    pub fn assign(
        &mut self,
        mut value: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<()> {
        fn set(
            slot: &mut Tensor,
            name: &str,
            value: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
        ) -> Result<()> {
            let v = value(name, slot.dims())?;
            if v.dims() != slot.dims() {
                return Err(Error::ShapeMismatch {
                    op: "lora assign",
                    lhs: slot.shape().clone(),
                    rhs: v.shape().clone(),
                });
            }
            *slot = v.to_dtype(slot.dtype())?.to_device(slot.device())?.var()?;
            Ok(())
        }
        match &mut self.lycoris {
            Some(l) => {
                let names = l.names();
                let t = [&mut self.a, &mut self.b].into_iter().chain(&mut l.rest);
                for (n, t) in names.iter().zip(t) {
                    set(t, n, &mut value)?;
                }
            }
            None => {
                set(&mut self.a, "lora_A", &mut value)?;
                set(&mut self.b, "lora_B", &mut value)?;
            }
        }
        if let Some(d) = &mut self.dora {
            set(&mut d.magnitude, "dora_scale", &mut value)?;
        }
        if let Some(g) = &mut self.gates {
            for (prefix, m) in [
                ("attn_mlp", &mut g.attn_mlp),
                ("down_mlp", &mut g.down_mlp),
                ("up_mlp", &mut g.up_mlp),
                ("gate_mlp", &mut g.gate_mlp),
            ] {
                for (idx, l) in [(0, &mut m.fc0), (2, &mut m.fc2)] {
                    set(&mut l.weight, &format!("{prefix}.{idx}.weight"), &mut value)?;
                    if let Some(b) = &mut l.bias {
                        set(b, &format!("{prefix}.{idx}.bias"), &mut value)?;
                    }
                }
            }
            set(&mut g.proj.weight, "proj.weight", &mut value)?;
            if let Some(b) = &mut g.proj.bias {
                set(b, "proj.bias", &mut value)?;
            }
        }
        Ok(())
    }
}

/// A frozen linear with optional live adapters (kohya LoRA files merge into `base` at load time
/// instead; adapters here are the trainable or gated ones).
#[derive(Clone, Debug)]
pub struct AdaptedLinear {
    pub base: Linear,
    pub adapter: Option<LoraAdapter>,
}

impl AdaptedLinear {
    pub fn new(base: Linear) -> AdaptedLinear {
        AdaptedLinear {
            base,
            adapter: None,
        }
    }

    /// Attach `a`, whose factors must fit this linear: A (r, D_in), B (D_out, r) (LoHa: see
    /// [`LoraAdapter::fits`]).
    pub fn set_adapter(&mut self, a: LoraAdapter) -> Result<()> {
        if !a.fits(self.base.weight.dims()) {
            return Err(Error::ShapeMismatch {
                op: "lora factors (lora_A, then the base weight)",
                lhs: a.a.shape().clone(),
                rhs: self.base.weight.shape().clone(),
            });
        }
        self.adapter = Some(a);
        Ok(())
    }

    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        if let Some(a) = &self.adapter {
            if let Some(w) = a.merged_weight(&self.base.weight, h.dtype())? {
                return h.linear(&w, self.base.bias.as_ref());
            }
        }
        let y = self.base.forward(h)?; // (B, S, D_out)
        match &self.adapter {
            Some(a) if a.dora.is_some() => a.apply_dora(h, &self.base.weight, &y, None),
            Some(a) => a.apply(h, Some(&y)),
            None => Ok(y),
        }
    }
}

/// A frozen convolution with an optional live LoCon adapter (kohya's conv LoRA).
#[derive(Clone, Debug)]
pub struct AdaptedConv2d {
    pub base: Conv2d,
    pub adapter: Option<LoraAdapter>,
}

impl AdaptedConv2d {
    pub fn new(base: Conv2d) -> AdaptedConv2d {
        AdaptedConv2d {
            base,
            adapter: None,
        }
    }

    /// Attach `a`, whose factors must fit this convolution: lora_down (r, C_in, kh, kw), lora_up
    /// (C_out, r, 1, 1) (LoHa: see [`LoraAdapter::fits`]).
    pub fn set_adapter(&mut self, a: LoraAdapter) -> Result<()> {
        if !a.fits(self.base.weight.dims()) {
            return Err(Error::ShapeMismatch {
                op: "conv lora factors (lora_down, then the base weight)",
                lhs: a.a.shape().clone(),
                rhs: self.base.weight.shape().clone(),
            });
        }
        self.adapter = Some(a);
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(a) = &self.adapter {
            if let Some(w) = a.merged_weight(&self.base.weight, x.dtype())? {
                return x.conv2d(&w, self.base.bias.as_ref(), self.base.params);
            }
        }
        let y = self.base.forward(x)?; // (B, C_out, H', W')
        match &self.adapter {
            Some(a) if a.dora.is_some() => {
                a.apply_dora(x, &self.base.weight, &y, Some(self.base.params))
            }
            Some(a) => a.apply_conv(x, Some(&y), self.base.params),
            None => Ok(y),
        }
    }
}

/// A read-only view of a layer an adapter can wrap: its module path, its adapter and its frozen
/// weight ((out, in) or (out, in, kh, kw)).
pub struct AdaptableRef<'a> {
    pub path: String,
    pub adapter: Option<&'a LoraAdapter>,
    pub weight: &'a Tensor,
}

impl<'a> AdaptableRef<'a> {
    pub fn linear(path: String, l: &'a AdaptedLinear) -> AdaptableRef<'a> {
        AdaptableRef {
            path,
            adapter: l.adapter.as_ref(),
            weight: &l.base.weight,
        }
    }

    pub fn conv(path: String, c: &'a AdaptedConv2d) -> AdaptableRef<'a> {
        AdaptableRef {
            path,
            adapter: c.adapter.as_ref(),
            weight: &c.base.weight,
        }
    }
}

/// A frozen layer an adapter can wrap: a linear or a convolution.
pub enum Adaptable<'a> {
    Linear(&'a mut AdaptedLinear),
    Conv(&'a mut AdaptedConv2d),
}

impl Adaptable<'_> {
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        match self {
            Adaptable::Linear(l) => l.adapter.as_ref(),
            Adaptable::Conv(c) => c.adapter.as_ref(),
        }
    }

    pub fn adapter_mut(&mut self) -> &mut Option<LoraAdapter> {
        match self {
            Adaptable::Linear(l) => &mut l.adapter,
            Adaptable::Conv(c) => &mut c.adapter,
        }
    }

    /// Attach `a` after checking its factors against the base's shape.
    pub fn set_adapter(&mut self, a: LoraAdapter) -> Result<()> {
        match self {
            Adaptable::Linear(l) => l.set_adapter(a),
            Adaptable::Conv(c) => c.set_adapter(a),
        }
    }

    /// The base weight: (out, in) or (out, in, kh, kw).
    pub fn base_weight(&self) -> &Tensor {
        match self {
            Adaptable::Linear(l) => &l.base.weight,
            Adaptable::Conv(c) => &c.base.weight,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Rng;
    use crate::Device;

    /// The two ways to train a gated adapter against a bf16 model give the same numbers bit for
    /// bit: f32 parameters cast on the tape each forward, and bf16 leaves (`trainable_in`) whose
    /// f32 values live elsewhere. The output and every parameter's gradient are compared.
    #[test]
    fn bf16_leaves_match_f32_parameters_cast_on_the_tape() {
        let mut rng = Rng::new(3);
        let concepts = Tensor::randn((5, 12), &mut rng, DType::F32, Device::Cpu).unwrap();
        let mut f32_adapter = LoraAdapter::init(
            24,
            16,
            LoraConfig::default(),
            Some(&concepts),
            &mut rng,
            DType::F32,
            Device::Cpu,
        )
        .unwrap();
        // B starts at zero; random values everywhere make every gradient non-trivial.
        f32_adapter
            .assign(|name, dims| {
                let seed = name.bytes().map(u64::from).sum();
                Tensor::randn(dims.to_vec(), &mut Rng::new(seed), DType::F32, Device::Cpu)
            })
            .unwrap();
        let leaves = f32_adapter.trainable_in(DType::BF16).unwrap();
        assert!(leaves
            .named()
            .iter()
            .all(|(_, t)| t.dtype() == DType::BF16 && t.is_variable()));
        let h = Tensor::randn((2, 7, 24), &mut rng, DType::BF16, Device::Cpu).unwrap();
        let run = |a: &LoraAdapter| {
            let y = a.apply(&h, None).unwrap();
            let g = y
                .to_dtype(DType::F32)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = g.backward().unwrap();
            let named: Vec<Vec<f64>> = a
                .named()
                .iter()
                .map(|(n, t)| {
                    let g = grads
                        .get(t)
                        .unwrap_or_else(|| panic!("no gradient for {n}"));
                    g.to_dtype(DType::F32).unwrap().to_vec_f64().unwrap()
                })
                .collect();
            (y.to_vec_f64().unwrap(), named)
        };
        let (cast, leaf) = (run(&f32_adapter), run(&leaves));
        assert_eq!(cast.0, leaf.0, "outputs");
        for ((n, _), (c, l)) in f32_adapter.named().iter().zip(cast.1.iter().zip(&leaf.1)) {
            assert_eq!(c, l, "gradient of {n}");
        }
    }
}
