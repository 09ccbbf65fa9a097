//! Shape changes. Views share storage; only `contiguous`, `cat` and a reshape of a strided
//! tensor copy.

use super::{Layout, Shape, Tensor};
use crate::autograd::Op;
use crate::backend::ops;
use crate::{Error, Result};

impl Tensor {
    /// Same elements, new shape. Copies first when the layout is not contiguous.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != self.elem_count() {
            return Err(Error::ElementCount {
                op: "reshape",
                got: self.elem_count(),
                shape,
            });
        }
        if shape == *self.shape() {
            return Ok(self.clone());
        }
        let src = self.contiguous()?;
        let layout = Layout::new(
            shape.clone(),
            shape.contiguous_strides(),
            src.layout().offset(),
        );
        Ok(src.view(layout, Some(Op::Reshape(src.clone()))))
    }

    pub fn contiguous(&self) -> Result<Tensor> {
        if self.layout().is_contiguous() {
            return Ok(self.clone());
        }
        let out = self.storage().copy_strided(self.layout())?;
        Ok(Tensor::from_storage(
            out,
            self.shape().clone(),
            Some(Op::Copy(self.clone())),
        ))
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if start == 0 && len == self.dim(dim)? {
            return Ok(self.clone());
        }
        let layout = self.layout().narrow(dim, start, len)?;
        Ok(self.view(
            layout,
            Some(Op::Narrow {
                x: self.clone(),
                dim,
                start,
            }),
        ))
    }

    /// `n` equal pieces along `dim` (the dim must divide evenly).
    pub fn chunk(&self, n: usize, dim: usize) -> Result<Vec<Tensor>> {
        let d = self.dim(dim)?;
        if n == 0 || d % n != 0 {
            return Err(Error::BadShape {
                op: "chunk",
                msg: format!("{n} chunks along dim {dim}"),
                shape: self.shape().clone(),
            });
        }
        (0..n).map(|i| self.narrow(dim, i * d / n, d / n)).collect()
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        let layout = self.layout().permute(perm)?;
        Ok(self.view(layout, Some(Op::Permute(self.clone(), perm.to_vec()))))
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        let mut perm: Vec<usize> = (0..self.rank()).collect();
        if a >= perm.len() || b >= perm.len() {
            return Err(Error::DimOutOfRange {
                op: "transpose",
                dim: a.max(b),
                shape: self.shape().clone(),
            });
        }
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Swap the last two dims.
    pub fn t(&self) -> Result<Tensor> {
        let r = self.rank();
        if r < 2 {
            return Err(Error::Rank {
                op: "t",
                expected: 2,
                got: self.shape().clone(),
            });
        }
        self.transpose(r - 2, r - 1)
    }

    pub fn broadcast_as(&self, shape: &Shape) -> Result<Tensor> {
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let layout = self.layout().broadcast_as(shape)?;
        Ok(self.view(layout, Some(Op::Broadcast(self.clone()))))
    }

    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        let mut dims = self.dims().to_vec();
        if dim > dims.len() {
            return Err(Error::DimOutOfRange {
                op: "unsqueeze",
                dim,
                shape: self.shape().clone(),
            });
        }
        dims.insert(dim, 1);
        self.reshape(dims)
    }

    pub fn squeeze(&self, dim: usize) -> Result<Tensor> {
        let mut dims = self.dims().to_vec();
        if dims.get(dim) != Some(&1) {
            return Err(Error::BadShape {
                op: "squeeze",
                msg: format!("dim {dim} is not 1"),
                shape: self.shape().clone(),
            });
        }
        dims.remove(dim);
        self.reshape(dims)
    }

    /// Merge dims `start..=end` into one.
    pub fn flatten(&self, start: usize, end: usize) -> Result<Tensor> {
        if start > end || end >= self.rank() {
            return Err(Error::DimOutOfRange {
                op: "flatten",
                dim: end,
                shape: self.shape().clone(),
            });
        }
        let d = self.dims();
        let merged: usize = d[start..=end].iter().product();
        self.reshape([&d[..start], &[merged], &d[end + 1..]].concat())
    }

    /// Concatenate along `dim`; all other dims must agree.
    pub fn cat(tensors: &[Tensor], dim: usize) -> Result<Tensor> {
        let first = tensors
            .first()
            .ok_or_else(|| Error::msg("cat: no tensors"))?;
        let mut out = first.dims().to_vec();
        if dim >= out.len() {
            return Err(Error::DimOutOfRange {
                op: "cat",
                dim,
                shape: first.shape().clone(),
            });
        }
        out[dim] = 0;
        for t in tensors {
            let same_rest = t.rank() == first.rank()
                && t.dims()
                    .iter()
                    .zip(first.dims())
                    .enumerate()
                    .all(|(i, (a, b))| i == dim || a == b);
            if !same_rest || t.dtype() != first.dtype() || t.device() != first.device() {
                return Err(Error::ShapeMismatch {
                    op: "cat",
                    lhs: first.shape().clone(),
                    rhs: t.shape().clone(),
                });
            }
            out[dim] += t.dims()[dim];
        }
        let guards: Vec<_> = tensors.iter().map(|t| t.storage()).collect();
        let args: Vec<_> = guards
            .iter()
            .zip(tensors)
            .map(|(g, t)| (&**g, t.layout()))
            .collect();
        let storage = ops::cat(&args, dim, first.dtype())?;
        drop(args);
        drop(guards);
        Ok(Tensor::from_storage(
            storage,
            out,
            Some(Op::Cat(tensors.to_vec(), dim)),
        ))
    }
}
