//! The tensor's math: every op computes through the backend and records itself for autograd only
//! when an input is tracked (see `Tensor::from_storage`).

use super::{DType, Shape, Tensor};
use crate::autograd::Op;
use crate::backend::cpu::attention::AttnGeom;
use crate::backend::cpu::conv::ConvGeom;
use crate::backend::cpu::elementwise::{BinaryOp, UnaryOp};
use crate::backend::ops;
use crate::{Error, Result};

/// Stride and zero padding of a 2-D convolution (same on both axes, as every model here uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvParams {
    pub stride: usize,
    pub padding: usize,
}

impl Default for ConvParams {
    fn default() -> Self {
        ConvParams {
            stride: 1,
            padding: 0,
        }
    }
}

macro_rules! unary_fns {
    ($($name:ident => $op:ident),* $(,)?) => {
        $(pub fn $name(&self) -> Result<Tensor> { self.unary(UnaryOp::$op) })*
    };
}

impl Tensor {
    fn same_device(&self, rhs: &Tensor, op: &'static str) -> Result<()> {
        if self.device() != rhs.device() {
            return Err(Error::DeviceMismatch {
                op,
                lhs: self.device().to_string(),
                rhs: rhs.device().to_string(),
            });
        }
        Ok(())
    }

    pub(crate) fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        let out = ops::unary((&self.storage(), self.layout()), op)?;
        Ok(Tensor::from_storage(
            out,
            self.shape().clone(),
            Some(Op::Unary(self.clone(), op)),
        ))
    }

    unary_fns!(
        neg => Neg, exp => Exp, log => Log, sqrt => Sqrt, recip => Recip, sqr => Sqr, abs => Abs,
        sigmoid => Sigmoid, silu => Silu, tanh => Tanh, gelu => Gelu, gelu_tanh => GeluTanh,
        quick_gelu => QuickGelu, relu => Relu,
    );

    fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        self.same_device(rhs, op.name())?;
        if self.dtype() != rhs.dtype() {
            return Err(Error::DTypeMismatch {
                op: op.name(),
                lhs: self.dtype(),
                rhs: rhs.dtype(),
            });
        }
        let shape = self.shape().broadcast_with(rhs.shape(), op.name())?;
        let a = self.broadcast_as(&shape)?;
        let b = rhs.broadcast_as(&shape)?;
        let out = ops::binary((&a.storage(), a.layout()), (&b.storage(), b.layout()), op)?;
        Ok(Tensor::from_storage(out, shape, Some(Op::Binary(a, b, op))))
    }

    /// Elementwise with numpy broadcasting.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div)
    }

    /// `self * mul + add`.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        let out = ops::affine((&self.storage(), self.layout()), mul, add)?;
        Ok(Tensor::from_storage(
            out,
            self.shape().clone(),
            Some(Op::Affine(self.clone(), mul)),
        ))
    }
    pub fn scale(&self, s: f64) -> Result<Tensor> {
        self.affine(s, 0.0)
    }
    pub fn add_scalar(&self, v: f64) -> Result<Tensor> {
        self.affine(1.0, v)
    }

    pub fn clamp_min(&self, lo: f64) -> Result<Tensor> {
        let out = ops::clamp_min((&self.storage(), self.layout()), lo)?;
        Ok(Tensor::from_storage(
            out,
            self.shape().clone(),
            Some(Op::ClampMin(self.clone(), lo)),
        ))
    }

    /// `(..., M, K) @ (..., K, N)`; batch dims broadcast.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.same_device(rhs, "matmul")?;
        let (ra, rb) = (self.rank(), rhs.rank());
        if ra < 2 || rb < 2 || self.dims()[ra - 1] != rhs.dims()[rb - 2] {
            return Err(Error::ShapeMismatch {
                op: "matmul",
                lhs: self.shape().clone(),
                rhs: rhs.shape().clone(),
            });
        }
        let batch = Shape::from(&self.dims()[..ra - 2])
            .broadcast_with(&Shape::from(&rhs.dims()[..rb - 2]), "matmul")?;
        let (m, k, n) = (self.dims()[ra - 2], self.dims()[ra - 1], rhs.dims()[rb - 1]);
        let with = |a: usize, b: usize| Shape::from([batch.dims(), &[a, b]].concat());
        let a = self.broadcast_as(&with(m, k))?;
        let b = rhs.broadcast_as(&with(k, n))?;
        let out = ops::matmul((&a.storage(), a.layout()), (&b.storage(), b.layout()))?;
        Ok(Tensor::from_storage(
            out,
            with(m, n),
            Some(Op::Matmul(a, b)),
        ))
    }

    /// `x W^T + b` for a weight (out, in) and optional bias (out). With a bias on CUDA this is
    /// one GEMM whose epilogue adds the bias; elsewhere, and where that path does not apply, the
    /// composition of matmul and add (the CPU oracle).
    pub fn linear(&self, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        let Some(b) = b else {
            return self.matmul(&w.t()?);
        };
        self.same_device(w, "linear")?;
        self.same_device(b, "linear")?;
        let fused = ops::linear_bias(
            (&self.storage(), self.layout()),
            (&w.storage(), w.layout()),
            (&b.storage(), b.layout()),
        )?;
        match fused {
            Some(out) => {
                let mut dims = self.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = w.dims()[0];
                }
                Ok(Tensor::from_storage(
                    out,
                    dims,
                    Some(Op::Linear {
                        x: self.clone(),
                        w: w.clone(),
                        b: b.clone(),
                    }),
                ))
            }
            None => self.matmul(&w.t()?)?.add(b),
        }
    }

    // ---- reductions ----

    pub fn sum_keepdim(&self, dims: &[usize]) -> Result<Tensor> {
        let out = ops::sum_keepdim((&self.storage(), self.layout()), dims)?;
        let shape: Vec<usize> = self
            .dims()
            .iter()
            .enumerate()
            .map(|(i, &d)| if dims.contains(&i) { 1 } else { d })
            .collect();
        Ok(Tensor::from_storage(
            out,
            shape,
            Some(Op::Sum(self.clone(), dims.to_vec())),
        ))
    }

    pub fn sum(&self, dims: &[usize]) -> Result<Tensor> {
        let kept = self.sum_keepdim(dims)?;
        let shape: Vec<usize> = self
            .dims()
            .iter()
            .enumerate()
            .filter(|(i, _)| !dims.contains(i))
            .map(|(_, &d)| d)
            .collect();
        kept.reshape(shape)
    }

    pub fn sum_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = (0..self.rank()).collect();
        self.sum(&dims)
    }

    pub fn mean_keepdim(&self, dims: &[usize]) -> Result<Tensor> {
        let n: usize = dims
            .iter()
            .map(|&d| self.dims().get(d).copied().unwrap_or(1))
            .product();
        self.sum_keepdim(dims)?.scale(1.0 / n as f64)
    }

    pub fn mean(&self, dims: &[usize]) -> Result<Tensor> {
        let n: usize = dims
            .iter()
            .map(|&d| self.dims().get(d).copied().unwrap_or(1))
            .product();
        self.sum(dims)?.scale(1.0 / n as f64)
    }

    pub fn mean_all(&self) -> Result<Tensor> {
        self.sum_all()?.scale(1.0 / self.elem_count().max(1) as f64)
    }

    /// Max over `dim`, kept as size 1; the gradient goes to the (first) arg-max.
    pub fn max_keepdim(&self, dim: usize) -> Result<Tensor> {
        Ok(self.max_argmax_keepdim(dim)?.0)
    }

    /// Max over `dim` (kept) and the i64 arg-max of the same shape.
    pub fn max_argmax_keepdim(&self, dim: usize) -> Result<(Tensor, Tensor)> {
        let (v, i) = ops::max_keepdim((&self.storage(), self.layout()), dim)?;
        let mut shape = self.dims().to_vec();
        shape[dim] = 1;
        let argmax = Tensor::from_storage(i, shape.clone(), None);
        let op = Op::Max {
            x: self.clone(),
            dim,
            argmax: argmax.clone(),
        };
        Ok((Tensor::from_storage(v, shape, Some(op)), argmax))
    }

    pub fn max(&self, dim: usize) -> Result<Tensor> {
        self.max_keepdim(dim)?.squeeze(dim)
    }

    pub fn softmax(&self, dim: usize) -> Result<Tensor> {
        let last = self.rank().checked_sub(1).ok_or(Error::Rank {
            op: "softmax",
            expected: 1,
            got: self.shape().clone(),
        })?;
        if dim != last {
            return self
                .transpose(dim, last)?
                .softmax(last)?
                .transpose(dim, last);
        }
        let out = ops::softmax_last((&self.storage(), self.layout()))?;
        Ok(Tensor::from_storage(
            out,
            self.shape().clone(),
            Some(Op::Softmax(self.clone())),
        ))
    }

    /// `x / max(||x||_2, eps)` along `dim`, as `torch.nn.functional.normalize`.
    pub fn normalize_l2(&self, dim: usize, eps: f64) -> Result<Tensor> {
        let norm = self.sqr()?.sum_keepdim(&[dim])?.sqrt()?.clamp_min(eps)?;
        self.div(&norm)
    }

    // ---- normalisation ----

    fn norm(
        &self,
        w: Option<&Tensor>,
        b: Option<&Tensor>,
        groups: Option<usize>,
        eps: f64,
    ) -> Result<Tensor> {
        let (ws, bs) = (w.map(|t| t.storage()), b.map(|t| t.storage()));
        let out = ops::norm(
            (&self.storage(), self.layout()),
            ws.as_deref().zip(w.map(|t| t.layout())),
            bs.as_deref().zip(b.map(|t| t.layout())),
            groups,
            eps,
        )?;
        let op = Op::Norm {
            x: self.clone(),
            w: w.cloned(),
            b: b.cloned(),
            groups,
            eps,
        };
        Ok(Tensor::from_storage(out, self.shape().clone(), Some(op)))
    }

    /// Layer norm over the last dim.
    pub fn layer_norm(&self, w: Option<&Tensor>, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        self.norm(w, b, None, eps)
    }

    /// Group norm of (N, C, ...) with per-channel affine parameters.
    pub fn group_norm(
        &self,
        groups: usize,
        w: Option<&Tensor>,
        b: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        self.norm(w, b, Some(groups), eps)
    }

    // ---- spatial ----

    /// NCHW convolution with weight (K, C, R, S) and optional bias (K).
    pub fn conv2d(&self, w: &Tensor, bias: Option<&Tensor>, p: ConvParams) -> Result<Tensor> {
        self.same_device(w, "conv2d")?;
        let (n, c, h, wd) = self.dims4()?;
        let (k, cw, r, s) = w.dims4()?;
        if c != cw || h + 2 * p.padding < r || wd + 2 * p.padding < s || p.stride == 0 {
            return Err(Error::ShapeMismatch {
                op: "conv2d",
                lhs: self.shape().clone(),
                rhs: w.shape().clone(),
            });
        }
        let geom = ConvGeom {
            n,
            c,
            h,
            w: wd,
            k,
            r,
            s,
            stride: p.stride,
            padding: p.padding,
        };
        let (oh, ow) = geom.out_hw();
        let out = ops::conv2d(
            (&self.storage(), self.layout()),
            (&w.storage(), w.layout()),
            &geom,
        )?;
        let y = Tensor::from_storage(
            out,
            (n, k, oh, ow),
            Some(Op::Conv2d {
                x: self.clone(),
                w: w.clone(),
                geom,
            }),
        );
        match bias {
            Some(b) => y.add(&b.reshape((1, k, 1, 1))?),
            None => Ok(y),
        }
    }

    pub fn upsample_nearest2d(&self, factor: usize) -> Result<Tensor> {
        let (n, c, h, w) = self.dims4()?;
        let out = ops::upsample_nearest((&self.storage(), self.layout()), factor)?;
        Ok(Tensor::from_storage(
            out,
            (n, c, h * factor, w * factor),
            Some(Op::Upsample(self.clone(), factor)),
        ))
    }

    fn avg_pool(&self, out_hw: (usize, usize), kernel: Option<(usize, usize)>) -> Result<Tensor> {
        let (n, c, _, _) = self.dims4()?;
        let out = ops::avg_pool((&self.storage(), self.layout()), out_hw, kernel)?;
        Ok(Tensor::from_storage(
            out,
            (n, c, out_hw.0, out_hw.1),
            Some(Op::AvgPool {
                x: self.clone(),
                kernel,
            }),
        ))
    }

    /// Average pooling with a square kernel and stride, no padding.
    pub fn avg_pool2d(&self, kernel: usize, stride: usize) -> Result<Tensor> {
        let (_, _, h, w) = self.dims4()?;
        if h < kernel || w < kernel || stride == 0 {
            return Err(Error::BadShape {
                op: "avg_pool2d",
                msg: format!("kernel {kernel} stride {stride}"),
                shape: self.shape().clone(),
            });
        }
        self.avg_pool(
            ((h - kernel) / stride + 1, (w - kernel) / stride + 1),
            Some((kernel, stride)),
        )
    }

    /// PyTorch's adaptive average pooling to `(oh, ow)`.
    pub fn adaptive_avg_pool2d(&self, out_hw: (usize, usize)) -> Result<Tensor> {
        if out_hw.0 == 0 || out_hw.1 == 0 {
            return Err(Error::BadShape {
                op: "adaptive_avg_pool2d",
                msg: "zero output size".into(),
                shape: self.shape().clone(),
            });
        }
        self.avg_pool(out_hw, None)
    }

    /// Max pooling (no gradient rule: nothing trains through it).
    pub fn max_pool2d(&self, kernel: usize, stride: usize) -> Result<Tensor> {
        let (n, c, h, w) = self.dims4()?;
        if self.tracks() {
            return Err(Error::Backward(
                "max_pool2d has no backward rule; call it on untracked tensors".into(),
            ));
        }
        let out = ops::max_pool((&self.storage(), self.layout()), kernel, stride)?;
        Ok(Tensor::from_storage(
            out,
            (n, c, (h - kernel) / stride + 1, (w - kernel) / stride + 1),
            None,
        ))
    }

    // ---- attention ----

    /// Scaled dot-product attention of q (B, NH, Sq, D), k (B, NH, Skv, D), v (B, NH, Skv, Dv).
    pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
        let (b, nh, sq, d) = q.dims4()?;
        let (bk, nhk, skv, dk) = k.dims4()?;
        let (bv, nhv, skv2, dv) = v.dims4()?;
        if (b, nh, d) != (bk, nhk, dk) || (b, nh, skv) != (bv, nhv, skv2) {
            return Err(Error::ShapeMismatch {
                op: "sdpa",
                lhs: q.shape().clone(),
                rhs: k.shape().clone(),
            });
        }
        let geom = AttnGeom {
            bh: b * nh,
            sq,
            skv,
            d,
            dv,
            scale,
            causal,
        };
        // Keep the log-sum-exp only where a backward will run.
        let keep = crate::autograd::grad_enabled() && (q.tracks() || k.tracks() || v.tracks());
        let (out, lse) = ops::sdpa(
            (&q.storage(), q.layout()),
            (&k.storage(), k.layout()),
            (&v.storage(), v.layout()),
            &geom,
            keep,
        )?;
        let out = Tensor::from_storage(out, (b, nh, sq, dv), None);
        let saved = lse.map(|l| (out.clone(), Tensor::from_storage(l, b * nh * sq, None)));
        let op = Op::Sdpa {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            geom,
            saved,
        };
        Ok(out.view(out.layout().clone(), Some(op)))
    }

    // ---- lookups and casts ----

    /// Rows of a (N, D) table picked by integer ids of any shape: (ids..., D).
    pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
        let (_, d) = table.dims2()?;
        let out = ops::index_select(
            (&table.storage(), table.layout()),
            (&ids.storage(), ids.layout()),
        )?;
        let shape = Shape::from([ids.dims(), &[d]].concat());
        if table.tracks() {
            return Err(Error::Backward(
                "embedding tables are frozen here: no gradient rule for them".into(),
            ));
        }
        Ok(Tensor::from_storage(out, shape, None))
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let out = self.storage().to_dtype(self.layout(), dtype)?;
        let op = dtype.is_float().then(|| Op::ToDtype(self.clone()));
        Ok(Tensor::from_storage(out, self.shape().clone(), op))
    }
}
