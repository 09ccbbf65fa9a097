//! What a tracked tensor remembers about how it was made.

use super::checkpoint::Segment;
use crate::backend::cpu::attention::AttnGeom;
use crate::backend::cpu::conv::ConvGeom;
use crate::backend::cpu::elementwise::{BinaryOp, UnaryOp};
use crate::backend::cpu::lora::LoraGeom;
use crate::tensor::{LoraGates, Tensor};
use std::sync::Arc;

pub enum Op {
    Unary(Tensor, UnaryOp),
    /// Operands already broadcast to the output shape.
    Binary(Tensor, Tensor, BinaryOp),
    /// `x * mul + add`: only `mul` matters for the gradient.
    Affine(Tensor, f64),
    ClampMin(Tensor, f64),
    /// Operands already broadcast to equal batch dims.
    Matmul(Tensor, Tensor),
    /// `x W^T + b` computed in one call (`Tensor::linear` with a bias on CUDA).
    Linear {
        x: Tensor,
        w: Tensor,
        b: Tensor,
    },
    /// Sum over dims, kept as size 1.
    Sum(Tensor, Vec<usize>),
    Max {
        x: Tensor,
        dim: usize,
        argmax: Tensor,
    },
    /// Softmax over the last dim; the backward reads the op's own output.
    Softmax(Tensor),
    Norm {
        x: Tensor,
        w: Option<Tensor>,
        b: Option<Tensor>,
        groups: Option<usize>,
        eps: f64,
    },
    Conv2d {
        x: Tensor,
        w: Tensor,
        geom: ConvGeom,
    },
    Upsample(Tensor, usize),
    AvgPool {
        x: Tensor,
        kernel: Option<(usize, usize)>,
    },
    Sdpa {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        geom: AttnGeom,
        /// The output (an untracked view of it) and its log-sum-exp rows, when the forward kept
        /// them (the CUDA flash kernels): the backward then skips its own forward.
        saved: Option<(Tensor, Tensor)>,
    },
    Reshape(Tensor),
    Permute(Tensor, Vec<usize>),
    Broadcast(Tensor),
    Narrow {
        x: Tensor,
        dim: usize,
        start: usize,
    },
    Cat(Vec<Tensor>, usize),
    ToDtype(Tensor),
    Copy(Tensor),
    /// The fused gated low-rank update (`Tensor::lora_update`).
    LoraUpdate {
        h: Tensor,
        a: Tensor,
        b: Tensor,
        gates: Option<LoraGates>,
        base: Option<Tensor>,
        geom: LoraGeom,
    },
    /// The fused spatial-attention pooling (`Tensor::spatial_pool`).
    SpatialPool {
        h: Tensor,
        logits: Tensor,
    },
    /// A gradient-checkpointed segment: its inside is recomputed in backward.
    Checkpoint(Arc<Segment>),
}

impl Op {
    pub fn inputs(&self) -> Vec<&Tensor> {
        match self {
            Op::Unary(x, _)
            | Op::Affine(x, _)
            | Op::ClampMin(x, _)
            | Op::Sum(x, _)
            | Op::Max { x, .. }
            | Op::Softmax(x)
            | Op::Upsample(x, _)
            | Op::AvgPool { x, .. }
            | Op::Reshape(x)
            | Op::Permute(x, _)
            | Op::Broadcast(x)
            | Op::Narrow { x, .. }
            | Op::ToDtype(x)
            | Op::Copy(x) => vec![x],
            Op::Binary(a, b, _) | Op::Matmul(a, b) => vec![a, b],
            Op::Norm { x, w, b, .. } => [Some(x), w.as_ref(), b.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            Op::Conv2d { x, w, .. } => vec![x, w],
            Op::Linear { x, w, b } => vec![x, w, b],
            Op::Sdpa { q, k, v, .. } => vec![q, k, v],
            Op::Cat(xs, _) => xs.iter().collect(),
            Op::Checkpoint(seg) => seg.inputs().iter().collect(),
            Op::LoraUpdate {
                h,
                a,
                b,
                gates,
                base,
                ..
            } => {
                let mut v = vec![h, a, b];
                if let Some(g) = gates {
                    v.extend([&g.w_down, &g.w_up, &g.a]);
                }
                v.extend(base.as_ref());
                v
            }
            Op::SpatialPool { h, logits } => vec![h, logits],
        }
    }

    /// A checkpoint may hold trainable parameters that are not among its inputs.
    pub fn always_tracks(&self) -> bool {
        matches!(self, Op::Checkpoint(_))
    }
}
