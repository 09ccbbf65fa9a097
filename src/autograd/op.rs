//! What a tracked tensor remembers about how it was made.

use super::checkpoint::Segment;
use crate::backend::cpu::attention::AttnGeom;
use crate::backend::cpu::conv::ConvGeom;
use crate::backend::cpu::elementwise::{BinaryOp, UnaryOp};
use crate::backend::cpu::lora::LoraGeom;
use crate::tensor::{LoraGates, Tensor};
use std::sync::Arc;

#[derive(Clone)]
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

    /// The op as the graph keeps it: each input whose values its backward rule never reads
    /// (given which inputs track) becomes a graph-only stand-in, so an activation lives only as
    /// long as some rule needs its values. The rules, from `backward.rs`: sums, differences,
    /// scalings, reshapes, permutes, broadcasts, narrows, concatenations, casts, copies, pools
    /// and upsampling read only shapes; a product reads each factor only for the other's
    /// gradient; a linear or convolution reads x only for the weight's gradient and the weight
    /// only for x's; a norm never reads its bias; a LoRA update never reads its base.
    pub(crate) fn slim(self) -> Op {
        let g = |t: Tensor| t.graph_only();
        // `t` itself when `needed`, else its stand-in.
        let keep = |t: Tensor, needed: bool| if needed { t } else { t.graph_only() };
        match self {
            Op::Binary(a, b, kind) => match kind {
                BinaryOp::Add | BinaryOp::Sub => Op::Binary(g(a), g(b), kind),
                BinaryOp::Mul => {
                    let (ta, tb) = (a.tracks(), b.tracks());
                    Op::Binary(keep(a, tb), keep(b, ta), kind)
                }
                BinaryOp::Div => {
                    let tb = b.tracks();
                    let ta = a.tracks();
                    Op::Binary(keep(a, tb), keep(b, ta || tb), kind)
                }
            },
            Op::Affine(x, mul) => Op::Affine(g(x), mul),
            Op::Matmul(a, b) => {
                let (ta, tb) = (a.tracks(), b.tracks());
                Op::Matmul(keep(a, tb), keep(b, ta))
            }
            Op::Linear { x, w, b } => {
                let (tx, tw) = (x.tracks(), w.tracks());
                Op::Linear {
                    x: keep(x, tw),
                    w: keep(w, tx),
                    b: g(b),
                }
            }
            Op::Sum(x, dims) => Op::Sum(g(x), dims),
            Op::Max { x, dim, argmax } => Op::Max {
                x: g(x),
                dim,
                argmax,
            },
            Op::Softmax(x) => Op::Softmax(g(x)),
            Op::Norm {
                x,
                w,
                b,
                groups,
                eps,
            } => Op::Norm {
                x,
                w,
                b: b.map(g),
                groups,
                eps,
            },
            Op::Conv2d { x, w, geom } => {
                let (tx, tw) = (x.tracks(), w.tracks());
                Op::Conv2d {
                    x: keep(x, tw),
                    w: keep(w, tx),
                    geom,
                }
            }
            Op::Upsample(x, f) => Op::Upsample(g(x), f),
            Op::AvgPool { x, kernel } => Op::AvgPool { x: g(x), kernel },
            Op::Reshape(x) => Op::Reshape(g(x)),
            Op::Permute(x, perm) => Op::Permute(g(x), perm),
            Op::Broadcast(x) => Op::Broadcast(g(x)),
            Op::Narrow { x, dim, start } => Op::Narrow {
                x: g(x),
                dim,
                start,
            },
            Op::Cat(xs, dim) => Op::Cat(xs.into_iter().map(g).collect(), dim),
            Op::ToDtype(x) => Op::ToDtype(g(x)),
            Op::Copy(x) => Op::Copy(g(x)),
            Op::LoraUpdate {
                h,
                a,
                b,
                gates,
                base,
                geom,
            } => Op::LoraUpdate {
                h,
                a,
                b,
                gates,
                base: base.map(g),
                geom,
            },
            op @ (Op::Unary(..)
            | Op::ClampMin(..)
            | Op::Sdpa { .. }
            | Op::SpatialPool { .. }
            | Op::Checkpoint(_)) => op,
        }
    }

    /// A checkpoint may hold trainable parameters that are not among its inputs.
    pub fn always_tracks(&self) -> bool {
        matches!(self, Op::Checkpoint(_))
    }
}

#[cfg(test)]
mod tests {
    use super::Op;
    use crate::tensor::{Rng, Tensor};
    use crate::{DType, Device};

    /// (input is a graph-only stand-in) for each input of `t`'s op.
    fn stand_ins(t: &Tensor) -> Vec<bool> {
        let op: &Op = t.op().expect("a recorded op");
        op.inputs().iter().map(|x| x.is_graph_only()).collect()
    }

    #[test]
    fn ops_keep_only_the_values_their_backward_reads() {
        let mut rng = Rng::new(3);
        let mut randn = |n: &[usize]| Tensor::randn(n.to_vec(), &mut rng, DType::F32, Device::Cpu);
        let p = randn(&[4, 6]).unwrap().var().unwrap(); // trainable
        let c = randn(&[4, 6]).unwrap(); // frozen activation
        let w = randn(&[5, 6]).unwrap(); // frozen weight
        let b = randn(&[5]).unwrap();
        let h = p.scale(2.0).unwrap();
        // A sum reads no values; a product reads each factor for the other's gradient only.
        assert_eq!(stand_ins(&h.add(&c).unwrap()), [true, true]);
        assert_eq!(stand_ins(&h.mul(&c).unwrap()), [true, false]);
        assert_eq!(
            stand_ins(&h.mul(&h.sqr().unwrap()).unwrap()),
            [false, false]
        );
        // A product with a frozen weight reads the weight for x's gradient, never x; with a
        // trainable weight and a frozen x, x but not the weight. (On the CPU a linear is this
        // product plus a broadcast sum; CUDA's fused Linear follows the same rule.)
        assert_eq!(
            stand_ins(&h.matmul(&w.t().unwrap()).unwrap()),
            [true, false]
        );
        let wt = w.var().unwrap();
        assert_eq!(
            stand_ins(&c.matmul(&wt.t().unwrap()).unwrap()),
            [false, true]
        );
        assert_eq!(stand_ins(&h.linear(&w, Some(&b)).unwrap()), [true, true]);
        // Scaling, reshaping and casting read shapes only.
        assert_eq!(stand_ins(&h.scale(3.0).unwrap()), [true]);
        assert_eq!(stand_ins(&h.reshape([24]).unwrap()), [true]);
        assert_eq!(stand_ins(&h.to_dtype(DType::BF16).unwrap()), [true]);
        // A unary function reads its input.
        assert_eq!(stand_ins(&h.silu().unwrap()), [false]);
        // A softmax output keeps its values even where its consumer needs none of them: its
        // own backward reads them through the node the walk reaches.
        let s = h.softmax(1).unwrap();
        let sum = s.add(&c).unwrap();
        assert_eq!(stand_ins(&sum), [false, true]);
    }

    #[test]
    fn a_stand_in_has_the_id_shape_and_history_of_its_tensor() {
        let mut rng = Rng::new(4);
        let p = Tensor::randn(vec![3, 2], &mut rng, DType::F32, Device::Cpu)
            .unwrap()
            .var()
            .unwrap();
        let h = p.scale(2.0).unwrap();
        let s = h.graph_only();
        assert!(s.is_graph_only() && s.tracks());
        assert_eq!((s.id(), s.dims()), (h.id(), h.dims()));
        assert!(matches!(s.op(), Some(Op::Affine(..))));
    }

    #[test]
    #[should_panic(expected = "graph-only autograd stand-in")]
    fn reading_a_stand_in_is_an_internal_error() {
        let mut rng = Rng::new(5);
        let p = Tensor::randn(vec![2], &mut rng, DType::F32, Device::Cpu)
            .unwrap()
            .var()
            .unwrap();
        let held = p.scale(2.0).unwrap().graph_only();
        drop(held.storage());
    }
}
