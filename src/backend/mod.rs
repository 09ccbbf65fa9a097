//! Backends behind the one tensor type. `cpu` is the readable reference oracle; `cuda` (cuBLAS +
//! NVRTC kernels) sits beside it with the same family stems as `kernels/`. This file is the whole
//! backend contract: one dispatch function per primitive, each sending CPU storage to the oracle and
//! CUDA storage to the device; mixing the two is an error naming the op.

pub mod cpu;
pub mod cuda;
mod optim_ops;

use crate::tensor::{DType, Device, Layout, Shape};
use crate::{Error, Result};
use cpu::attention::AttnGeom;
use cpu::conv::ConvGeom;
use cpu::elementwise::{BinaryOp, UnaryOp};
use cpu::CpuStorage;
use cuda::CudaStorage;

pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

type Arg<'a> = (&'a Storage, &'a Layout);

/// Floating-point operations issued by the compute-bound primitives (GEMMs, convolutions,
/// attention, the fused low-rank update), counted at dispatch: multiply-adds count two. The
/// model benchmarks read it around one run to put a whole UNet step against the device's GEMM
/// ceiling; elementwise work and norms are not counted (they are bandwidth-bound).
pub mod flops {
    use std::sync::atomic::{AtomicU64, Ordering};

    static ISSUED: AtomicU64 = AtomicU64::new(0);

    pub(super) fn add(n: usize) {
        ISSUED.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Operations issued since the process started (or the last [`reset`]).
    pub fn issued() -> u64 {
        ISSUED.load(Ordering::Relaxed)
    }

    pub fn reset() {
        ISSUED.store(0, Ordering::Relaxed);
    }
}

/// Operations of a (possibly batched, broadcast) matmul `(.., m, k) @ (.., k, n)`.
fn matmul_flops(a: &Layout, b: &Layout) -> usize {
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() < 2 || bd.len() < 2 {
        return 0;
    }
    let (m, k, n) = (ad[ad.len() - 2], ad[ad.len() - 1], bd[bd.len() - 1]);
    let batch = |d: &[usize]| d[..d.len() - 2].iter().product::<usize>();
    2 * batch(ad).max(batch(bd)) * m * k * n
}

fn conv_flops(g: &ConvGeom) -> usize {
    let (oh, ow) = g.out_hw();
    2 * g.n * g.k * oh * ow * g.c * g.r * g.s
}

/// The storage of one operand when every operand of the op lives in the same place.
enum On<'a> {
    Cpu(&'a CpuStorage, &'a Layout),
    Cuda(&'a CudaStorage, &'a Layout),
}

fn on<'a>(a: Arg<'a>) -> On<'a> {
    match a.0 {
        Storage::Cpu(s) => On::Cpu(s, a.1),
        Storage::Cuda(s) => On::Cuda(s, a.1),
    }
}

fn mismatch(op: &'static str, a: &Storage, b: &Storage) -> Error {
    Error::DeviceMismatch {
        op,
        lhs: a.device().to_string(),
        rhs: b.device().to_string(),
    }
}

fn cpu_of<'a>(
    a: Arg<'a>,
    op: &'static str,
    first: &Storage,
) -> Result<(&'a CpuStorage, &'a Layout)> {
    match a.0 {
        Storage::Cpu(s) => Ok((s, a.1)),
        other => Err(mismatch(op, first, other)),
    }
}

fn cuda_of<'a>(
    a: Arg<'a>,
    op: &'static str,
    first: &Storage,
) -> Result<(&'a CudaStorage, &'a Layout)> {
    match a.0 {
        Storage::Cuda(s) => Ok((s, a.1)),
        other => Err(mismatch(op, first, other)),
    }
}

/// A CUDA buffer's addressed elements copied to the host.
pub fn to_host(s: &CudaStorage, l: &Layout) -> Result<CpuStorage> {
    let c = cuda::elementwise::contiguous(s, l)?;
    let n = l.shape().elem_count();
    let dev = s.dev();
    fn get<T: Copy + Default>(dev: &cuda::CudaDevice, ptr: u64, n: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); n];
        dev.download(ptr, &mut v)?;
        Ok(v)
    }
    Ok(match s.dtype() {
        DType::F32 => CpuStorage::F32(get(dev, c.ptr(), n)?),
        DType::BF16 => CpuStorage::BF16(get(dev, c.ptr(), n)?),
        DType::F16 => CpuStorage::F16(get(dev, c.ptr(), n)?),
        DType::I64 => CpuStorage::I64(get(dev, c.ptr(), n)?),
        DType::F64 => CpuStorage::F64(get(dev, c.ptr(), n)?),
        DType::F8E4M3 => CpuStorage::F8E4M3(get(dev, c.ptr(), n)?),
        DType::F8E5M2 => CpuStorage::F8E5M2(get(dev, c.ptr(), n)?),
        DType::U8 => CpuStorage::U8(get(dev, c.ptr(), n)?),
    })
}

/// A whole CPU vector uploaded to `dev`. f64 has no kernels on CUDA, so it is refused here.
pub fn from_host(dev: &std::sync::Arc<cuda::CudaDevice>, c: &CpuStorage) -> Result<CudaStorage> {
    let n = c.len();
    let buf = match c {
        CpuStorage::F32(v) => dev.upload(DType::F32, v)?,
        CpuStorage::BF16(v) => dev.upload(DType::BF16, v)?,
        CpuStorage::F16(v) => dev.upload(DType::F16, v)?,
        CpuStorage::I64(v) => dev.upload(DType::I64, v)?,
        CpuStorage::F8E4M3(v) => dev.upload(DType::F8E4M3, v)?,
        CpuStorage::F8E5M2(v) => dev.upload(DType::F8E5M2, v)?,
        CpuStorage::U8(v) => dev.upload(DType::U8, v)?,
        CpuStorage::F64(_) => {
            return Err(Error::DType {
                op: "to_device (CUDA stores f32, bf16, f16, float8, i64 and u8)",
                dtype: DType::F64,
            })
        }
    };
    Ok(CudaStorage::new(buf, c.dtype(), n))
}

impl Storage {
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }

    /// Elements held (the whole buffer, whatever view a layout takes of it).
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(c) => c.len(),
            Storage::Cuda(c) => c.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }

    pub fn copy_strided(&self, l: &Layout) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.copy_strided(l))),
            Storage::Cuda(s) => Ok(Storage::Cuda(cuda::elementwise::copy_strided(s, l)?)),
        }
    }

    pub fn to_dtype(&self, l: &Layout, dtype: DType) -> Result<Storage> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.to_dtype(l, dtype))),
            Storage::Cuda(s) => Ok(Storage::Cuda(cuda::elementwise::to_dtype(s, l, dtype)?)),
        }
    }

    /// The addressed elements, contiguous, on `device`.
    pub fn to_device(&self, l: &Layout, device: Device) -> Result<Storage> {
        match (self, device) {
            (Storage::Cpu(s), Device::Cpu) => Ok(Storage::Cpu(s.copy_strided(l))),
            (Storage::Cuda(s), Device::Cpu) => Ok(Storage::Cpu(to_host(s, l)?)),
            (Storage::Cpu(s), Device::Cuda(i)) => {
                let dev = cuda::device(i)?;
                Ok(Storage::Cuda(from_host(&dev, &s.copy_strided(l))?))
            }
            (Storage::Cuda(s), Device::Cuda(i)) if s.ordinal() == i => self.copy_strided(l),
            // Between two GPUs through the host: nothing here runs on more than one.
            (Storage::Cuda(s), Device::Cuda(i)) => {
                let dev = cuda::device(i)?;
                Ok(Storage::Cuda(from_host(&dev, &to_host(s, l)?)?))
            }
        }
    }
}

/// The primitives every backend implements, as free functions over (storage, layout) pairs.
pub mod ops {
    use super::*;
    use cpu::lora::{Gates, LoraGeom, LoraGrads};
    use cpu::{attention, conv, elementwise as ew, matmul as mm, norm as nm, reduce as rd};
    use cuda::{attention as cattn, conv as cconv, elementwise as cew, gemm as cmm, norm as cnm};
    use cuda::{lora as clora, pool as cpool, reduce as crd};

    /// One input: CPU oracle or CUDA kernel.
    macro_rules! one {
        ($x:expr, |$s:ident, $l:ident| cpu $c:expr, cuda $g:expr) => {
            match on($x) {
                On::Cpu($s, $l) => Ok(Storage::Cpu($c?)),
                On::Cuda($s, $l) => Ok(Storage::Cuda($g?)),
            }
        };
    }

    /// Two inputs that must live on the same device.
    macro_rules! two {
        ($op:expr, $a:expr, $b:expr, |$s:ident, $l:ident, $t:ident, $m:ident| cpu $c:expr, cuda $g:expr) => {
            match (on($a), on($b)) {
                (On::Cpu($s, $l), On::Cpu($t, $m)) => Ok(Storage::Cpu($c?)),
                (On::Cuda($s, $l), On::Cuda($t, $m)) => Ok(Storage::Cuda($g?)),
                _ => Err(mismatch($op, $a.0, $b.0)),
            }
        };
    }

    pub fn unary(x: Arg, op: UnaryOp) -> Result<Storage> {
        one!(x, |s, l| cpu ew::unary(s, l, op), cuda cew::unary(s, l, op))
    }

    pub fn unary_bwd(x: Arg, dy: Arg, op: UnaryOp) -> Result<Storage> {
        two!(op.name(), x, dy, |s, l, g, lg|
            cpu ew::unary_bwd(s, l, g, lg, op), cuda cew::unary_bwd(s, l, g, lg, op))
    }

    pub fn binary(a: Arg, b: Arg, op: BinaryOp) -> Result<Storage> {
        two!(op.name(), a, b, |sa, la, sb, lb|
            cpu ew::binary(sa, la, sb, lb, op), cuda cew::binary(sa, la, sb, lb, op))
    }

    pub fn affine(x: Arg, mul: f64, add: f64) -> Result<Storage> {
        one!(x, |s, l| cpu ew::affine(s, l, mul, add), cuda cew::affine(s, l, mul, add))
    }

    pub fn clamp_min(x: Arg, lo: f64) -> Result<Storage> {
        one!(x, |s, l| cpu ew::clamp_min(s, l, lo), cuda cew::clamp_min(s, l, lo))
    }

    pub fn clamp_min_bwd(x: Arg, dy: Arg, lo: f64) -> Result<Storage> {
        two!("clamp_min_bwd", x, dy, |s, l, g, lg|
            cpu ew::clamp_min_bwd(s, l, g, lg, lo), cuda cew::clamp_min_bwd(s, l, g, lg, lo))
    }

    /// Ids may live on either device (they are tiny); the table decides where the lookup runs.
    pub fn index_select(table: Arg, ids: Arg) -> Result<Storage> {
        match on(table) {
            On::Cpu(t, lt) => {
                let flat = Layout::contiguous(ids.1.shape().clone());
                let host = match ids.0 {
                    Storage::Cpu(i) => return Ok(Storage::Cpu(ew::index_select(t, lt, i, ids.1)?)),
                    Storage::Cuda(i) => to_host(i, ids.1)?,
                };
                Ok(Storage::Cpu(ew::index_select(t, lt, &host, &flat)?))
            }
            On::Cuda(t, lt) => {
                let (host, dev_ids) = match ids.0 {
                    Storage::Cpu(i) => (i.copy_strided(ids.1), None),
                    Storage::Cuda(i) => (to_host(i, ids.1)?, Some((i, ids.1))),
                };
                let CpuStorage::I64(v) = host else {
                    return Err(Error::DType {
                        op: "index_select",
                        dtype: host.dtype(),
                    });
                };
                Ok(Storage::Cuda(cew::index_select(t, lt, &v, dev_ids)?))
            }
        }
    }

    pub fn cat(inputs: &[Arg], dim: usize, dtype: DType) -> Result<Storage> {
        let first = inputs
            .first()
            .ok_or_else(|| Error::msg("cat: no inputs"))?
            .0;
        match first {
            Storage::Cpu(_) => {
                let parts = inputs
                    .iter()
                    .map(|&a| cpu_of(a, "cat", first))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Storage::Cpu(ew::cat(&parts, dim, dtype)?))
            }
            Storage::Cuda(_) => {
                let parts = inputs
                    .iter()
                    .map(|&a| cuda_of(a, "cat", first))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Storage::Cuda(cew::cat(&parts, dim, dtype)?))
            }
        }
    }

    /// A float8 operand (a weight stored at one byte, `--weight-dtype`) widened to the dtype of
    /// the operand it meets, for one GEMM or convolution; None when `w` computes as it is. The
    /// whole buffer is cast, so `w`'s layout (a transposed or broadcast view of the weight) still
    /// addresses it. Widening is exact: every float8 value is a bf16, f16 and f32 value. The copy
    /// lives for this call only: tapes keep the float8 tensor and widen again in backward.
    fn widened(w: Arg, like: &Storage) -> Result<Option<Storage>> {
        let s = w.0;
        if !s.dtype().is_storage_only() || like.dtype().is_storage_only() {
            return Ok(None);
        }
        s.to_dtype(&Layout::contiguous(s.len()), like.dtype())
            .map(Some)
    }

    /// `w` itself, or its widened copy held in `slot`.
    fn computable<'a>(
        w: Arg<'a>,
        like: &Storage,
        slot: &'a mut Option<Storage>,
    ) -> Result<Arg<'a>> {
        *slot = widened(w, like)?;
        Ok((slot.as_ref().unwrap_or(w.0), w.1))
    }

    pub fn matmul(a: Arg, b: Arg) -> Result<Storage> {
        flops::add(matmul_flops(a.1, b.1));
        let (mut wa, mut wb) = (None, None);
        let (a, b) = (computable(a, b.0, &mut wa)?, computable(b, a.0, &mut wb)?);
        two!("matmul", a, b, |sa, la, sb, lb| cpu mm::matmul(sa, la, sb, lb), cuda cmm::matmul(sa, la, sb, lb))
    }

    /// `x W^T + b` as one fused call where the device has one (CUDA: cuBLASLt's bias epilogue);
    /// None where the caller composes matmul and add (always on the CPU: the oracle is the
    /// composition).
    pub fn linear_bias(x: Arg, w: Arg, b: Arg) -> Result<Option<Storage>> {
        let mut wide = None;
        let w = computable(w, x.0, &mut wide)?;
        match (on(x), on(w), on(b)) {
            (On::Cpu(..), On::Cpu(..), On::Cpu(..)) => Ok(None),
            (On::Cuda(xs, xl), On::Cuda(ws, wl), On::Cuda(bs, bl)) => {
                let fused = cuda::gemm_lt::linear_bias((xs, xl), (ws, wl), (bs, bl))?;
                if fused.is_some() {
                    // x (.., k) W^T (k, n); the composition counts itself through matmul.
                    let (rows, k) = (
                        xl.shape().elem_count() / xl.dims()[xl.dims().len() - 1],
                        xl.dims()[xl.dims().len() - 1],
                    );
                    flops::add(2 * rows * k * wl.dims()[0]);
                }
                Ok(fused.map(Storage::Cuda))
            }
            _ => Err(mismatch("linear", x.0, w.0)),
        }
    }

    pub fn sum_keepdim(x: Arg, dims: &[usize]) -> Result<Storage> {
        one!(x, |s, l| cpu rd::sum_keepdim(s, l, dims), cuda crd::sum_keepdim(s, l, dims))
    }

    /// Max over `dim` and the arg-max as an i64 storage of the same kept shape.
    pub fn max_keepdim(x: Arg, dim: usize) -> Result<(Storage, Storage)> {
        match on(x) {
            On::Cpu(s, l) => {
                let (v, i) = rd::max_keepdim(s, l, dim)?;
                Ok((Storage::Cpu(v), Storage::Cpu(CpuStorage::I64(i))))
            }
            On::Cuda(s, l) => {
                let (v, i) = crd::max_keepdim(s, l, dim)?;
                Ok((Storage::Cuda(v), Storage::Cuda(i)))
            }
        }
    }

    pub fn max_bwd(dy: Arg, argmax: Arg, shape: &Shape, dim: usize) -> Result<Storage> {
        match (on(dy), on(argmax)) {
            (On::Cpu(g, lg), On::Cpu(a, la)) => {
                let idx = match a.copy_strided(la) {
                    CpuStorage::I64(v) => v,
                    other => {
                        return Err(Error::DType {
                            op: "max_bwd",
                            dtype: other.dtype(),
                        })
                    }
                };
                Ok(Storage::Cpu(rd::max_bwd(g, lg, &idx, shape, dim)?))
            }
            (On::Cuda(g, lg), On::Cuda(a, la)) => {
                Ok(Storage::Cuda(crd::max_bwd(g, lg, a, la, shape, dim)?))
            }
            _ => Err(mismatch("max_bwd", dy.0, argmax.0)),
        }
    }

    pub fn softmax_last(x: Arg) -> Result<Storage> {
        one!(x, |s, l| cpu rd::softmax_last(s, l), cuda crd::softmax_last(s, l))
    }

    pub fn softmax_last_bwd(y: Arg, dy: Arg) -> Result<Storage> {
        two!("softmax_bwd", y, dy, |s, l, g, lg|
            cpu rd::softmax_last_bwd(s, l, g, lg), cuda crd::softmax_last_bwd(s, l, g, lg))
    }

    pub fn norm(
        x: Arg,
        w: Option<Arg>,
        b: Option<Arg>,
        groups: Option<usize>,
        eps: f64,
    ) -> Result<Storage> {
        match on(x) {
            On::Cpu(s, l) => {
                let w = w.map(|a| cpu_of(a, "norm", x.0)).transpose()?;
                let b = b.map(|a| cpu_of(a, "norm", x.0)).transpose()?;
                Ok(Storage::Cpu(nm::norm(s, l, w, b, groups, eps)?))
            }
            On::Cuda(s, l) => {
                let w = w.map(|a| cuda_of(a, "norm", x.0)).transpose()?;
                let b = b.map(|a| cuda_of(a, "norm", x.0)).transpose()?;
                Ok(Storage::Cuda(cnm::norm(s, l, w, b, groups, eps, false)?))
            }
        }
    }

    pub fn norm_bwd(
        x: Arg,
        dy: Arg,
        w: Option<Arg>,
        groups: Option<usize>,
        eps: f64,
    ) -> Result<(Storage, Storage, Storage)> {
        match (on(x), on(dy)) {
            (On::Cpu(s, l), On::Cpu(g, lg)) => {
                let w = w.map(|a| cpu_of(a, "norm_bwd", x.0)).transpose()?;
                let (dx, dw, db) = nm::norm_backward(s, l, g, lg, w, groups, eps)?;
                Ok((Storage::Cpu(dx), Storage::Cpu(dw), Storage::Cpu(db)))
            }
            (On::Cuda(s, l), On::Cuda(g, lg)) => {
                let w = w.map(|a| cuda_of(a, "norm_bwd", x.0)).transpose()?;
                let (dx, dw, db) = cnm::norm_bwd(s, l, g, lg, w, None, groups, eps, false)?;
                Ok((Storage::Cuda(dx), Storage::Cuda(dw), Storage::Cuda(db)))
            }
            _ => Err(mismatch("norm_bwd", x.0, dy.0)),
        }
    }

    /// `silu(group_norm(x))` in one pass on CUDA; the CPU composes the two oracle ops.
    pub fn group_norm_silu(
        x: Arg,
        w: Option<Arg>,
        b: Option<Arg>,
        groups: usize,
        eps: f64,
    ) -> Result<Storage> {
        match on(x) {
            On::Cpu(..) => {
                let y = norm(x, w, b, Some(groups), eps)?;
                unary(
                    (&y, &Layout::contiguous(x.1.shape().clone())),
                    UnaryOp::Silu,
                )
            }
            On::Cuda(s, l) => {
                let w = w.map(|a| cuda_of(a, "group_norm_silu", x.0)).transpose()?;
                let b = b.map(|a| cuda_of(a, "group_norm_silu", x.0)).transpose()?;
                Ok(Storage::Cuda(cnm::norm(
                    s,
                    l,
                    w,
                    b,
                    Some(groups),
                    eps,
                    true,
                )?))
            }
        }
    }

    /// (dx, dweight, dbias) of [`group_norm_silu`]; the bias enters the SiLU derivative.
    pub fn group_norm_silu_bwd(
        x: Arg,
        dy: Arg,
        w: Option<Arg>,
        b: Option<Arg>,
        groups: usize,
        eps: f64,
    ) -> Result<(Storage, Storage, Storage)> {
        match (on(x), on(dy)) {
            (On::Cpu(..), On::Cpu(..)) => {
                let z = norm(x, w, b, Some(groups), eps)?;
                let lz = Layout::contiguous(x.1.shape().clone());
                let dz = unary_bwd((&z, &lz), dy, UnaryOp::Silu)?;
                norm_bwd(x, (&dz, &lz), w, Some(groups), eps)
            }
            (On::Cuda(s, l), On::Cuda(g, lg)) => {
                let w = w
                    .map(|a| cuda_of(a, "group_norm_silu_bwd", x.0))
                    .transpose()?;
                let b = b
                    .map(|a| cuda_of(a, "group_norm_silu_bwd", x.0))
                    .transpose()?;
                let (dx, dw, db) = cnm::norm_bwd(s, l, g, lg, w, b, Some(groups), eps, true)?;
                Ok((Storage::Cuda(dx), Storage::Cuda(dw), Storage::Cuda(db)))
            }
            _ => Err(mismatch("group_norm_silu_bwd", x.0, dy.0)),
        }
    }

    pub fn conv2d(x: Arg, w: Arg, g: &ConvGeom) -> Result<Storage> {
        flops::add(conv_flops(g));
        let mut wide = None;
        let w = computable(w, x.0, &mut wide)?;
        two!("conv2d", x, w, |s, l, ws, wl| cpu conv::conv2d(s, l, ws, wl, g), cuda cconv::conv2d(s, l, ws, wl, g))
    }

    pub fn conv2d_bwd_input(dy: Arg, w: Arg, g: &ConvGeom) -> Result<Storage> {
        flops::add(conv_flops(g));
        let mut wide = None;
        let w = computable(w, dy.0, &mut wide)?;
        two!("conv2d_bwd_input", dy, w, |s, l, ws, wl|
            cpu conv::conv2d_bwd_input(s, l, ws, wl, g), cuda cconv::conv2d_bwd_input(s, l, ws, wl, g))
    }

    pub fn conv2d_bwd_weight(x: Arg, dy: Arg, g: &ConvGeom) -> Result<Storage> {
        flops::add(conv_flops(g));
        two!("conv2d_bwd_weight", x, dy, |s, l, gs, gl|
            cpu conv::conv2d_bwd_weight(s, l, gs, gl, g), cuda cconv::conv2d_bwd_weight(s, l, gs, gl, g))
    }

    pub fn upsample_nearest(x: Arg, f: usize) -> Result<Storage> {
        one!(x, |s, l| cpu conv::upsample_nearest(s, l, f), cuda cconv::upsample_nearest(s, l, f))
    }

    pub fn upsample_nearest_bwd(dy: Arg, f: usize) -> Result<Storage> {
        one!(dy, |s, l| cpu conv::upsample_nearest_bwd(s, l, f), cuda cconv::upsample_nearest_bwd(s, l, f))
    }

    pub fn avg_pool(
        x: Arg,
        out_hw: (usize, usize),
        kernel: Option<(usize, usize)>,
    ) -> Result<Storage> {
        one!(x, |s, l| cpu conv::avg_pool(s, l, out_hw, kernel), cuda cconv::avg_pool(s, l, out_hw, kernel))
    }

    pub fn avg_pool_bwd(
        dy: Arg,
        in_hw: (usize, usize),
        kernel: Option<(usize, usize)>,
    ) -> Result<Storage> {
        one!(dy, |s, l| cpu conv::avg_pool_bwd(s, l, in_hw, kernel), cuda cconv::avg_pool_bwd(s, l, in_hw, kernel))
    }

    pub fn max_pool(x: Arg, kernel: usize, stride: usize) -> Result<Storage> {
        one!(x, |s, l| cpu conv::max_pool(s, l, kernel, stride), cuda cconv::max_pool(s, l, kernel, stride))
    }

    fn three<'a>(
        op: &'static str,
        q: Arg<'a>,
        k: Arg<'a>,
        v: Arg<'a>,
    ) -> Result<[(&'a CudaStorage, &'a Layout); 3]> {
        Ok([
            cuda_of(q, op, q.0)?,
            cuda_of(k, op, q.0)?,
            cuda_of(v, op, q.0)?,
        ])
    }

    /// The attention output, and (`keep` asked, on the CUDA flash kernels) the log-sum-exp of each
    /// query row for [`sdpa_bwd`] to reuse.
    pub fn sdpa(
        q: Arg,
        k: Arg,
        v: Arg,
        g: &AttnGeom,
        keep: bool,
    ) -> Result<(Storage, Option<Storage>)> {
        flops::add(2 * g.bh * g.sq * g.skv * (g.d + g.dv));
        match on(q) {
            On::Cpu(..) => Ok((
                Storage::Cpu(attention::sdpa(
                    cpu_of(q, "sdpa", q.0)?,
                    cpu_of(k, "sdpa", q.0)?,
                    cpu_of(v, "sdpa", q.0)?,
                    g,
                )?),
                None,
            )),
            On::Cuda(..) => {
                let [q, k, v] = three("sdpa", q, k, v)?;
                let (out, lse) = cattn::sdpa(q, k, v, g, keep)?;
                Ok((Storage::Cuda(out), lse.map(Storage::Cuda)))
            }
        }
    }

    /// (dq, dk, dv). `saved`: the forward's output and the log-sum-exp [`sdpa`] kept, when it
    /// kept one.
    pub fn sdpa_bwd(
        q: Arg,
        k: Arg,
        v: Arg,
        dout: Arg,
        g: &AttnGeom,
        saved: Option<(Arg, &Storage)>,
    ) -> Result<(Storage, Storage, Storage)> {
        // S recomputed, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q.
        flops::add(2 * g.bh * g.sq * g.skv * (3 * g.d + 2 * g.dv));
        match on(q) {
            On::Cpu(..) => {
                let c = |a| cpu_of(a, "sdpa_bwd", q.0);
                let (a, b, d) = attention::sdpa_bwd(c(q)?, c(k)?, c(v)?, c(dout)?, g)?;
                Ok((Storage::Cpu(a), Storage::Cpu(b), Storage::Cpu(d)))
            }
            On::Cuda(..) => {
                let [q3, k3, v3] = three("sdpa_bwd", q, k, v)?;
                let d = cuda_of(dout, "sdpa_bwd", q.0)?;
                let saved = match saved {
                    Some((out, lse)) => Some(cattn::Saved {
                        out: cuda_of(out, "sdpa_bwd", q.0)?,
                        lse: match lse {
                            Storage::Cuda(s) => s,
                            other => return Err(mismatch("sdpa_bwd", q.0, other)),
                        },
                    }),
                    None => None,
                };
                let (a, b, c) = cattn::sdpa_bwd(q3, k3, v3, d, g, saved)?;
                Ok((Storage::Cuda(a), Storage::Cuda(b), Storage::Cuda(c)))
            }
        }
    }

    /// The three optional gates of the fused LoRA update: (w_down (B, r), w_up (B, r), a (B)).
    #[derive(Clone, Copy, Default)]
    pub struct GateArgs<'a> {
        pub w_down: Option<Arg<'a>>,
        pub w_up: Option<Arg<'a>>,
        pub a: Option<Arg<'a>>,
    }

    fn cpu_gates<'a>(g: GateArgs<'a>, first: &Storage) -> Result<Gates<'a>> {
        let f = |o: Option<Arg<'a>>| o.map(|a| cpu_of(a, "lora", first)).transpose();
        Ok(Gates {
            w_down: f(g.w_down)?,
            w_up: f(g.w_up)?,
            a: f(g.a)?,
        })
    }

    fn cuda_gates<'a>(g: GateArgs<'a>, first: &Storage) -> Result<clora::Gates<'a>> {
        let f = |o: Option<Arg<'a>>| o.map(|a| cuda_of(a, "lora", first)).transpose();
        Ok(clora::Gates {
            w_down: f(g.w_down)?,
            w_up: f(g.w_up)?,
            a: f(g.a)?,
        })
    }

    /// `base + ((h A^T) * g) B^T` in one pass (kernels/lora.cu); h (B, S, Din), out (B, S, Dout).
    pub fn lora_fwd(
        h: Arg,
        a: Arg,
        b: Arg,
        gates: GateArgs,
        base: Option<Arg>,
        g: &LoraGeom,
    ) -> Result<Storage> {
        flops::add(2 * g.rows() * g.rank * (g.d_in + g.d_out));
        match on(h) {
            On::Cpu(..) => {
                let c = |x| cpu_of(x, "lora_fwd", h.0);
                let base = base.map(c).transpose()?;
                Ok(Storage::Cpu(cpu::lora::lora_fwd(
                    c(h)?,
                    c(a)?,
                    c(b)?,
                    cpu_gates(gates, h.0)?,
                    base,
                    g,
                )?))
            }
            On::Cuda(..) => {
                let c = |x| cuda_of(x, "lora_fwd", h.0);
                let base = base.map(c).transpose()?;
                Ok(Storage::Cuda(clora::lora_fwd(
                    c(h)?,
                    c(a)?,
                    c(b)?,
                    cuda_gates(gates, h.0)?,
                    base,
                    g,
                )?))
            }
        }
    }

    /// Every gradient of [`lora_fwd`] (d_a, d_b in f32).
    pub fn lora_bwd(
        h: Arg,
        a: Arg,
        b: Arg,
        gates: GateArgs,
        d_out: Arg,
        g: &LoraGeom,
    ) -> Result<LoraGrads<Storage>> {
        // h A^T recomputed, d(mid) = d_out B, d_b, d_a, d_h.
        flops::add(2 * g.rows() * g.rank * (3 * g.d_in + 2 * g.d_out));
        fn wrap<S>(r: LoraGrads<S>, f: impl Fn(S) -> Storage) -> LoraGrads<Storage> {
            LoraGrads {
                d_h: f(r.d_h),
                d_a: f(r.d_a),
                d_b: f(r.d_b),
                d_w_down: r.d_w_down.map(&f),
                d_w_up: r.d_w_up.map(&f),
                d_alpha: r.d_alpha.map(&f),
            }
        }
        match on(h) {
            On::Cpu(..) => {
                let c = |x| cpu_of(x, "lora_bwd", h.0);
                let r =
                    cpu::lora::lora_bwd(c(h)?, c(a)?, c(b)?, cpu_gates(gates, h.0)?, c(d_out)?, g)?;
                Ok(wrap(r, Storage::Cpu))
            }
            On::Cuda(..) => {
                let c = |x| cuda_of(x, "lora_bwd", h.0);
                let r =
                    clora::lora_bwd(c(h)?, c(a)?, c(b)?, cuda_gates(gates, h.0)?, c(d_out)?, g)?;
                Ok(wrap(r, Storage::Cuda))
            }
        }
    }

    /// Spatial-attention pooling of h (B, S, D) with logits (B, S): h_c (B, D).
    pub fn spatial_pool(h: Arg, logits: Arg) -> Result<Storage> {
        two!("spatial_pool", h, logits, |s, l, t, m|
            cpu cpu::pool::spatial_fwd((s, l), (t, m)), cuda cpool::spatial_fwd((s, l), (t, m)))
    }

    /// (d_h, d_logits) of [`spatial_pool`].
    pub fn spatial_pool_bwd(h: Arg, logits: Arg, d_hc: Arg) -> Result<(Storage, Storage)> {
        match (on(h), on(logits), on(d_hc)) {
            (On::Cpu(s, l), On::Cpu(t, m), On::Cpu(u, n)) => {
                let (a, b) = cpu::pool::spatial_bwd((s, l), (t, m), (u, n))?;
                Ok((Storage::Cpu(a), Storage::Cpu(b)))
            }
            (On::Cuda(s, l), On::Cuda(t, m), On::Cuda(u, n)) => {
                let (a, b) = cpool::spatial_bwd((s, l), (t, m), (u, n))?;
                Ok((Storage::Cuda(a), Storage::Cuda(b)))
            }
            _ => Err(mismatch("spatial_pool_bwd", h.0, d_hc.0)),
        }
    }

    pub use super::optim_ops::*;
}
