//! The fused ops of the gated LoRA layer, as tensor ops with their own backward rules: one pass
//! for the gated low-rank update (kernels/lora.cu) and one for the spatial-attention pooling
//! (kernels/pool.cu). The CPU path is the plain oracle in backend/cpu/{lora,pool}.rs; both are
//! tested against the composition of primitives they replace.

use super::{Shape, Tensor};
use crate::autograd::Op;
use crate::backend::cpu::lora::LoraGeom;
use crate::backend::ops::{self, GateArgs};
use crate::{Error, Result};

/// The per-sample gates of one update: w_down (B, r), w_up (B, r), a (B, 1).
#[derive(Clone, Debug)]
pub struct LoraGates {
    pub w_down: Tensor,
    pub w_up: Tensor,
    pub a: Tensor,
}

impl Tensor {
    /// `base + scale * ((h A^T) * w_down * w_up * a) B^T` for h (B, S, D_in), A (r, D_in),
    /// B (D_out, r), in one pass; without gates it is plain LoRA. Output (B, S, D_out).
    pub fn lora_update(
        h: &Tensor,
        a: &Tensor,
        b: &Tensor,
        gates: Option<&LoraGates>,
        base: Option<&Tensor>,
        scale: f64,
    ) -> Result<Tensor> {
        let (bsz, seq, d_in) = h.dims3()?;
        let (rank, a_in) = a.dims2()?;
        let (d_out, b_r) = b.dims2()?;
        if a_in != d_in || b_r != rank {
            return Err(Error::ShapeMismatch {
                op: "lora_update",
                lhs: a.shape().clone(),
                rhs: b.shape().clone(),
            });
        }
        let geom = LoraGeom {
            batch: bsz,
            seq,
            d_in,
            d_out,
            rank,
            scale,
        };
        let out_shape = Shape::from((bsz, seq, d_out));
        if let Some(base) = base {
            if base.shape() != &out_shape {
                return Err(Error::ShapeMismatch {
                    op: "lora_update (base)",
                    lhs: base.shape().clone(),
                    rhs: out_shape,
                });
            }
        }
        let storage = {
            let (hs, as_, bs) = (h.storage(), a.storage(), b.storage());
            let gs = gates.map(|g| (g.w_down.storage(), g.w_up.storage(), g.a.storage()));
            let gate_args = match (&gs, gates) {
                (Some((d, u, al)), Some(g)) => GateArgs {
                    w_down: Some((&**d, g.w_down.layout())),
                    w_up: Some((&**u, g.w_up.layout())),
                    a: Some((&**al, g.a.layout())),
                },
                _ => GateArgs {
                    w_down: None,
                    w_up: None,
                    a: None,
                },
            };
            let bg = base.map(|t| t.storage());
            ops::lora_fwd(
                (&hs, h.layout()),
                (&as_, a.layout()),
                (&bs, b.layout()),
                gate_args,
                bg.as_deref().zip(base.map(|t| t.layout())),
                &geom,
            )?
        };
        let op = Op::LoraUpdate {
            h: h.clone(),
            a: a.clone(),
            b: b.clone(),
            gates: gates.cloned(),
            base: base.cloned(),
            geom,
        };
        Ok(Tensor::from_storage(storage, out_shape, Some(op)))
    }

    /// The gated layer's pooling: `w = sigmoid(logits)` (B, S); returns
    /// `0.7 * sum_s w h / (sum_s w + 1e-6) + 0.3 * max_s h`, (B, D).
    pub fn spatial_pool(h: &Tensor, logits: &Tensor) -> Result<Tensor> {
        let (bsz, _, d) = h.dims3()?;
        let storage = ops::spatial_pool(
            (&h.storage(), h.layout()),
            (&logits.storage(), logits.layout()),
        )?;
        Ok(Tensor::from_storage(
            storage,
            (bsz, d),
            Some(Op::SpatialPool {
                h: h.clone(),
                logits: logits.clone(),
            }),
        ))
    }
}
