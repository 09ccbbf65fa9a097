//! Backends behind the one tensor type. `cpu` is the readable reference oracle; the CUDA backend
//! (cuBLAS + NVRTC kernels) lands beside it with the same family stems as `kernels/`. This file
//! is the whole backend contract: one dispatch function per primitive.

pub mod cpu;
pub mod cuda;

use crate::tensor::{DType, Device, Layout, Shape};
use crate::Result;
use cpu::attention::AttnGeom;
use cpu::conv::ConvGeom;
use cpu::elementwise::{BinaryOp, UnaryOp};
use cpu::CpuStorage;

pub enum Storage {
    Cpu(CpuStorage),
}

type Arg<'a> = (&'a Storage, &'a Layout);

fn cpu<'a>(a: Arg<'a>) -> (&'a CpuStorage, &'a Layout) {
    match a.0 {
        Storage::Cpu(s) => (s, a.1),
    }
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    pub fn copy_strided(&self, l: &Layout) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.copy_strided(l))),
        }
    }

    pub fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.to_dtype(l, dtype))),
        }
    }
}

/// The primitives every backend implements, as free functions over (storage, layout) pairs.
pub mod ops {
    use super::*;
    use cpu::{attention, conv, elementwise as ew, matmul as mm, norm as nm, reduce as rd};

    pub fn unary(x: Arg, op: UnaryOp) -> Result<Storage> {
        let (s, l) = cpu(x);
        Ok(Storage::Cpu(ew::unary(s, l, op)?))
    }

    pub fn unary_bwd(x: Arg, dy: Arg, op: UnaryOp) -> Result<Storage> {
        let ((s, l), (g, lg)) = (cpu(x), cpu(dy));
        Ok(Storage::Cpu(ew::unary_bwd(s, l, g, lg, op)?))
    }

    pub fn binary(a: Arg, b: Arg, op: BinaryOp) -> Result<Storage> {
        let ((sa, la), (sb, lb)) = (cpu(a), cpu(b));
        Ok(Storage::Cpu(ew::binary(sa, la, sb, lb, op)?))
    }

    pub fn affine(x: Arg, mul: f64, add: f64) -> Result<Storage> {
        let (s, l) = cpu(x);
        Ok(Storage::Cpu(ew::affine(s, l, mul, add)?))
    }

    pub fn clamp_min(x: Arg, lo: f64) -> Result<Storage> {
        let (s, l) = cpu(x);
        Ok(Storage::Cpu(ew::clamp_min(s, l, lo)?))
    }

    pub fn clamp_min_bwd(x: Arg, dy: Arg, lo: f64) -> Result<Storage> {
        let ((s, l), (g, lg)) = (cpu(x), cpu(dy));
        Ok(Storage::Cpu(ew::clamp_min_bwd(s, l, g, lg, lo)?))
    }

    pub fn index_select(table: Arg, ids: Arg) -> Result<Storage> {
        let ((t, lt), (i, li)) = (cpu(table), cpu(ids));
        Ok(Storage::Cpu(ew::index_select(t, lt, i, li)?))
    }

    pub fn cat(inputs: &[Arg], dim: usize, dtype: DType) -> Result<Storage> {
        let parts: Vec<_> = inputs.iter().map(|&a| cpu(a)).collect();
        Ok(Storage::Cpu(ew::cat(&parts, dim, dtype)?))
    }

    pub fn matmul(a: Arg, b: Arg) -> Result<Storage> {
        let ((sa, la), (sb, lb)) = (cpu(a), cpu(b));
        Ok(Storage::Cpu(mm::matmul(sa, la, sb, lb)?))
    }

    pub fn sum_keepdim(x: Arg, dims: &[usize]) -> Result<Storage> {
        let (s, l) = cpu(x);
        Ok(Storage::Cpu(rd::sum_keepdim(s, l, dims)?))
    }

    /// Max over `dim` and the arg-max as an i64 storage of the same kept shape.
    pub fn max_keepdim(x: Arg, dim: usize) -> Result<(Storage, Storage)> {
        let (s, l) = cpu(x);
        let (v, i) = rd::max_keepdim(s, l, dim)?;
        Ok((Storage::Cpu(v), Storage::Cpu(CpuStorage::I64(i))))
    }

    pub fn max_bwd(dy: Arg, argmax: Arg, shape: &Shape, dim: usize) -> Result<Storage> {
        let ((g, lg), (a, la)) = (cpu(dy), cpu(argmax));
        let idx = match a.copy_strided(la) {
            CpuStorage::I64(v) => v,
            other => {
                return Err(crate::Error::DType {
                    op: "max_bwd",
                    dtype: other.dtype(),
                })
            }
        };
        Ok(Storage::Cpu(rd::max_bwd(g, lg, &idx, shape, dim)?))
    }

    pub fn softmax_last(x: Arg) -> Result<Storage> {
        let (s, l) = cpu(x);
        Ok(Storage::Cpu(rd::softmax_last(s, l)?))
    }

    pub fn softmax_last_bwd(y: Arg, dy: Arg) -> Result<Storage> {
        let ((s, l), (g, lg)) = (cpu(y), cpu(dy));
        Ok(Storage::Cpu(rd::softmax_last_bwd(s, l, g, lg)?))
    }

    pub fn norm(
        x: Arg,
        w: Option<Arg>,
        b: Option<Arg>,
        groups: Option<usize>,
        eps: f64,
    ) -> Result<Storage> {
        let (s, l) = cpu(x);
        Ok(Storage::Cpu(nm::norm(
            s,
            l,
            w.map(cpu),
            b.map(cpu),
            groups,
            eps,
        )?))
    }

    pub fn norm_bwd(
        x: Arg,
        dy: Arg,
        w: Option<Arg>,
        groups: Option<usize>,
        eps: f64,
    ) -> Result<(Storage, Storage, Storage)> {
        let ((s, l), (g, lg)) = (cpu(x), cpu(dy));
        let (dx, dw, db) = nm::norm_backward(s, l, g, lg, w.map(cpu), groups, eps)?;
        Ok((Storage::Cpu(dx), Storage::Cpu(dw), Storage::Cpu(db)))
    }

    pub fn conv2d(x: Arg, w: Arg, g: &ConvGeom) -> Result<Storage> {
        let ((s, l), (ws, wl)) = (cpu(x), cpu(w));
        Ok(Storage::Cpu(conv::conv2d(s, l, ws, wl, g)?))
    }

    pub fn conv2d_bwd_input(dy: Arg, w: Arg, g: &ConvGeom) -> Result<Storage> {
        let ((s, l), (ws, wl)) = (cpu(dy), cpu(w));
        Ok(Storage::Cpu(conv::conv2d_bwd_input(s, l, ws, wl, g)?))
    }

    pub fn conv2d_bwd_weight(x: Arg, dy: Arg, g: &ConvGeom) -> Result<Storage> {
        let ((s, l), (gs, gl)) = (cpu(x), cpu(dy));
        Ok(Storage::Cpu(conv::conv2d_bwd_weight(s, l, gs, gl, g)?))
    }

    pub fn upsample_nearest(x: Arg, f: usize) -> Result<Storage> {
        let (s, l) = cpu(x);
        Ok(Storage::Cpu(conv::upsample_nearest(s, l, f)?))
    }

    pub fn upsample_nearest_bwd(dy: Arg, f: usize) -> Result<Storage> {
        let (s, l) = cpu(dy);
        Ok(Storage::Cpu(conv::upsample_nearest_bwd(s, l, f)?))
    }

    pub fn avg_pool(
        x: Arg,
        out_hw: (usize, usize),
        kernel: Option<(usize, usize)>,
    ) -> Result<Storage> {
        let (s, l) = cpu(x);
        Ok(Storage::Cpu(conv::avg_pool(s, l, out_hw, kernel)?))
    }

    pub fn avg_pool_bwd(
        dy: Arg,
        in_hw: (usize, usize),
        kernel: Option<(usize, usize)>,
    ) -> Result<Storage> {
        let (s, l) = cpu(dy);
        Ok(Storage::Cpu(conv::avg_pool_bwd(s, l, in_hw, kernel)?))
    }

    pub fn max_pool(x: Arg, kernel: usize, stride: usize) -> Result<Storage> {
        let (s, l) = cpu(x);
        Ok(Storage::Cpu(conv::max_pool(s, l, kernel, stride)?))
    }

    pub fn sdpa(q: Arg, k: Arg, v: Arg, g: &AttnGeom) -> Result<Storage> {
        Ok(Storage::Cpu(attention::sdpa(cpu(q), cpu(k), cpu(v), g)?))
    }

    pub fn sdpa_bwd(
        q: Arg,
        k: Arg,
        v: Arg,
        dout: Arg,
        g: &AttnGeom,
    ) -> Result<(Storage, Storage, Storage)> {
        let (a, b, c) = attention::sdpa_bwd(cpu(q), cpu(k), cpu(v), cpu(dout), g)?;
        Ok((Storage::Cpu(a), Storage::Cpu(b), Storage::Cpu(c)))
    }
}
