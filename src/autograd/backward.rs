//! Every backward rule, in one place. A rule returns gradients only for the inputs that are
//! tracked: a frozen weight next to a tracked activation gets no gradient computed at all.

use super::Op;
use crate::backend::cpu::elementwise::BinaryOp;
use crate::backend::ops::{self, GateArgs};
use crate::backend::Storage;
use crate::tensor::{Shape, Tensor, TensorId};
use crate::{Error, Result};

fn wrap(s: Storage, shape: &Shape) -> Tensor {
    Tensor::from_storage(s, shape.clone(), None)
}

/// Collects (input, gradient) pairs, skipping untracked inputs before any work is done.
struct Out(Vec<(TensorId, Tensor)>);

impl Out {
    fn push(&mut self, input: &Tensor, g: impl FnOnce() -> Result<Tensor>) -> Result<()> {
        if input.tracks() {
            self.0.push((input.id(), g()?));
        }
        Ok(())
    }
}

/// The gradient of a broadcast view, summed back to the source shape.
fn unbroadcast(g: &Tensor, src: &Shape) -> Result<Tensor> {
    let (gd, sd) = (g.dims(), src.dims());
    let lead = gd.len() - sd.len();
    let dims: Vec<usize> = (0..gd.len())
        .filter(|&i| i < lead || (sd[i - lead] == 1 && gd[i] != 1))
        .collect();
    let summed = if dims.is_empty() {
        g.clone()
    } else {
        g.sum_keepdim(&dims)?
    };
    summed.reshape(src.clone())
}

pub(super) fn input_grads(node: &Tensor, op: &Op, g: &Tensor) -> Result<Vec<(TensorId, Tensor)>> {
    let mut out = Out(Vec::new());
    match op {
        Op::Unary(x, u) => out.push(x, || {
            Ok(wrap(
                ops::unary_bwd((&x.storage(), x.layout()), (&g.storage(), g.layout()), *u)?,
                x.shape(),
            ))
        })?,
        Op::Binary(a, b, kind) => match kind {
            BinaryOp::Add => {
                out.push(a, || Ok(g.clone()))?;
                out.push(b, || Ok(g.clone()))?;
            }
            BinaryOp::Sub => {
                out.push(a, || Ok(g.clone()))?;
                out.push(b, || g.neg())?;
            }
            BinaryOp::Mul => {
                out.push(a, || g.mul(b))?;
                out.push(b, || g.mul(a))?;
            }
            BinaryOp::Div => {
                out.push(a, || g.div(b))?;
                out.push(b, || g.mul(a)?.div(&b.sqr()?)?.neg())?;
            }
        },
        Op::Affine(x, mul) => out.push(x, || g.scale(*mul))?,
        Op::ClampMin(x, lo) => out.push(x, || {
            Ok(wrap(
                ops::clamp_min_bwd((&x.storage(), x.layout()), (&g.storage(), g.layout()), *lo)?,
                x.shape(),
            ))
        })?,
        Op::Matmul(a, b) => {
            out.push(a, || g.matmul(&b.t()?))?;
            out.push(b, || a.t()?.matmul(g))?;
        }
        Op::Linear { x, w, b } => {
            // g (..., N), x (..., K), w (N, K): the same rules as matmul + broadcast add.
            out.push(x, || g.matmul(w))?;
            out.push(w, || {
                let k = w.dims()[1];
                let n = w.dims()[0];
                let xm = x.reshape([x.elem_count() / k.max(1), k])?; // (M, K)
                let gm = g.reshape([g.elem_count() / n.max(1), n])?; // (M, N)
                gm.t()?.matmul(&xm)
            })?;
            out.push(b, || unbroadcast(g, b.shape()))?;
        }
        Op::Sum(x, _) => out.push(x, || g.broadcast_as(x.shape()))?,
        Op::Max { x, dim, argmax } => out.push(x, || {
            let s = ops::max_bwd(
                (&g.storage(), g.layout()),
                (&argmax.storage(), argmax.layout()),
                x.shape(),
                *dim,
            )?;
            Ok(wrap(s, x.shape()))
        })?,
        Op::Softmax(x) => out.push(x, || {
            Ok(wrap(
                ops::softmax_last_bwd(
                    (&node.storage(), node.layout()),
                    (&g.storage(), g.layout()),
                )?,
                x.shape(),
            ))
        })?,
        Op::Norm {
            x,
            w,
            b,
            groups,
            eps,
        } => {
            let wants = |t: &Option<Tensor>| t.as_ref().is_some_and(|t| t.tracks());
            if x.tracks() || wants(w) || wants(b) {
                let ws = w.as_ref().map(|t| t.storage());
                let (dx, dw, db) = ops::norm_bwd(
                    (&x.storage(), x.layout()),
                    (&g.storage(), g.layout()),
                    ws.as_deref().zip(w.as_ref().map(|t| t.layout())),
                    *groups,
                    *eps,
                )?;
                out.push(x, || Ok(wrap(dx, x.shape())))?;
                if let Some(w) = w {
                    out.push(w, || {
                        wrap(dw, &Shape::from(w.elem_count())).reshape(w.shape().clone())
                    })?;
                }
                if let Some(b) = b {
                    out.push(b, || {
                        wrap(db, &Shape::from(b.elem_count())).reshape(b.shape().clone())
                    })?;
                }
            }
        }
        Op::Conv2d { x, w, geom } => {
            out.push(x, || {
                Ok(wrap(
                    ops::conv2d_bwd_input(
                        (&g.storage(), g.layout()),
                        (&w.storage(), w.layout()),
                        geom,
                    )?,
                    x.shape(),
                ))
            })?;
            out.push(w, || {
                Ok(wrap(
                    ops::conv2d_bwd_weight(
                        (&x.storage(), x.layout()),
                        (&g.storage(), g.layout()),
                        geom,
                    )?,
                    w.shape(),
                ))
            })?;
        }
        Op::Upsample(x, f) => out.push(x, || {
            Ok(wrap(
                ops::upsample_nearest_bwd((&g.storage(), g.layout()), *f)?,
                x.shape(),
            ))
        })?,
        Op::AvgPool { x, kernel } => out.push(x, || {
            let (_, _, h, w) = x.dims4()?;
            Ok(wrap(
                ops::avg_pool_bwd((&g.storage(), g.layout()), (h, w), *kernel)?,
                x.shape(),
            ))
        })?,
        Op::Sdpa {
            q,
            k,
            v,
            geom,
            saved,
        } => {
            if q.tracks() || k.tracks() || v.tracks() {
                let kept = saved
                    .as_ref()
                    .map(|(o, l)| (o.storage(), o.layout(), l.storage()));
                let (dq, dk, dv) = ops::sdpa_bwd(
                    (&q.storage(), q.layout()),
                    (&k.storage(), k.layout()),
                    (&v.storage(), v.layout()),
                    (&g.storage(), g.layout()),
                    geom,
                    kept.as_ref().map(|(o, ol, l)| ((&**o, *ol), &**l)),
                )?;
                out.push(q, || Ok(wrap(dq, q.shape())))?;
                out.push(k, || Ok(wrap(dk, k.shape())))?;
                out.push(v, || Ok(wrap(dv, v.shape())))?;
            }
        }
        Op::Reshape(x) => out.push(x, || g.reshape(x.shape().clone()))?,
        Op::Permute(x, perm) => out.push(x, || {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            g.permute(&inv)
        })?,
        Op::Broadcast(x) => out.push(x, || unbroadcast(g, x.shape()))?,
        Op::Narrow { x, dim, start } => out.push(x, || {
            let (d, len) = (x.dims()[*dim], g.dims()[*dim]);
            let mut parts = Vec::new();
            let pad = |n: usize| {
                let mut s = x.dims().to_vec();
                s[*dim] = n;
                Tensor::zeros(s, g.dtype(), g.device())
            };
            if *start > 0 {
                parts.push(pad(*start)?);
            }
            parts.push(g.clone());
            if start + len < d {
                parts.push(pad(d - start - len)?);
            }
            Tensor::cat(&parts, *dim)
        })?,
        Op::Cat(xs, dim) => {
            let mut at = 0;
            for x in xs {
                let n = x.dims()[*dim];
                out.push(x, || g.narrow(*dim, at, n))?;
                at += n;
            }
        }
        Op::ToDtype(x) => out.push(x, || g.to_dtype(x.dtype()))?,
        Op::Copy(x) => out.push(x, || Ok(g.clone()))?,
        Op::Checkpoint(seg) => return seg.backward(g),
        Op::LoraUpdate {
            h,
            a,
            b,
            gates,
            base,
            geom,
        } => {
            let gated = gates
                .as_ref()
                .is_some_and(|g| g.w_down.tracks() || g.w_up.tracks() || g.a.tracks());
            if h.tracks() || a.tracks() || b.tracks() || gated {
                let (hs, as_, bs, gs) = (h.storage(), a.storage(), b.storage(), g.storage());
                let gst = gates
                    .as_ref()
                    .map(|x| (x.w_down.storage(), x.w_up.storage(), x.a.storage()));
                let gate_args = match (&gst, gates) {
                    (Some((d, u, al)), Some(x)) => GateArgs {
                        w_down: Some((&**d, x.w_down.layout())),
                        w_up: Some((&**u, x.w_up.layout())),
                        a: Some((&**al, x.a.layout())),
                    },
                    _ => GateArgs {
                        w_down: None,
                        w_up: None,
                        a: None,
                    },
                };
                let r = ops::lora_bwd(
                    (&hs, h.layout()),
                    (&as_, a.layout()),
                    (&bs, b.layout()),
                    gate_args,
                    (&gs, g.layout()),
                    geom,
                )?;
                out.push(h, || Ok(wrap(r.d_h, h.shape())))?;
                out.push(a, || wrap(r.d_a, a.shape()).to_dtype(a.dtype()))?;
                out.push(b, || wrap(r.d_b, b.shape()).to_dtype(b.dtype()))?;
                if let Some(x) = gates {
                    let take = |s: Option<Storage>, t: &Tensor| -> Result<Tensor> {
                        let s = s.ok_or_else(|| {
                            Error::Backward("lora_update: a gate gradient is missing".into())
                        })?;
                        wrap(s, &Shape::from(t.elem_count()))
                            .reshape(t.shape().clone())?
                            .to_dtype(t.dtype())
                    };
                    out.push(&x.w_down, || take(r.d_w_down, &x.w_down))?;
                    out.push(&x.w_up, || take(r.d_w_up, &x.w_up))?;
                    out.push(&x.a, || take(r.d_alpha, &x.a))?;
                }
            }
            if let Some(base) = base {
                out.push(base, || Ok(g.clone()))?;
            }
        }
        Op::SpatialPool { h, logits } => {
            if h.tracks() || logits.tracks() {
                let (dh, dl) = ops::spatial_pool_bwd(
                    (&h.storage(), h.layout()),
                    (&logits.storage(), logits.layout()),
                    (&g.storage(), g.layout()),
                )?;
                out.push(h, || Ok(wrap(dh, h.shape())))?;
                out.push(logits, || {
                    wrap(dl, &Shape::from(logits.elem_count())).reshape(logits.shape().clone())
                })?;
            }
        }
    }
    Ok(out.0)
}
