//! The CUDA backend: kernels from `kernels/*.cu` compiled by NVRTC at first use, cuBLAS for the
//! matrix products, one stream and a caching allocator per device (`device.rs`). Each family file
//! (`elementwise.rs`, `reduce.rs`, ...) launches its kernels as docs/KERNELS.md specifies, with
//! the same stem as `kernels/<stem>.cu` and `backend/cpu/<stem>.rs`.
//!
//! Storage dtypes: f32, bf16, f16 (math in f32 inside every kernel) and i64 (ids, arg-max).

pub mod attention;
pub mod conv;
pub mod device;
pub mod elementwise;
pub mod emu;
pub mod gemm;
pub mod gemm_lt;
pub mod kernels;
pub mod lora;
pub mod norm;
pub mod nvrtc;
pub mod optim;
pub mod pool;
pub mod profile;
pub mod reduce;

use std::sync::Arc;

pub use device::{device, probe, Buffer, CudaDevice, MemStats};

use crate::tensor::{DType, Layout};
use crate::{Error, Result};

/// Contiguous device memory holding `len` elements of `dtype`.
#[derive(Debug)]
pub struct CudaStorage {
    buf: Buffer,
    dtype: DType,
    len: usize,
}

impl CudaStorage {
    pub fn new(buf: Buffer, dtype: DType, len: usize) -> Self {
        CudaStorage { buf, dtype, len }
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dev(&self) -> &Arc<CudaDevice> {
        self.buf.device()
    }
    pub fn ordinal(&self) -> usize {
        self.buf.device().ordinal()
    }
    /// Device address of element `offset` (a layout's start).
    pub fn ptr_at(&self, offset: usize) -> u64 {
        self.buf.ptr() + (offset * self.dtype.size_in_bytes()) as u64
    }
    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    /// Fresh, uninitialised storage of `len` elements.
    pub fn alloc(dev: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<CudaStorage> {
        Ok(CudaStorage::new(dev.alloc(dtype, len)?, dtype, len))
    }

    pub fn zeros(dev: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<CudaStorage> {
        Ok(CudaStorage::new(dev.alloc_zeroed(dtype, len)?, dtype, len))
    }
}

/// The kernel-name suffix of a storage dtype.
pub fn tn(dtype: DType, op: &'static str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I64 => "i64",
        DType::F8E4M3 => "f8e4m3",
        DType::F8E5M2 => "f8e5m2",
        DType::U8 => "u8",
        DType::F64 => return Err(Error::DType { op, dtype }),
    })
}

/// The suffix of a float dtype (kernels that do arithmetic; float8 only stores).
pub fn float_tn(dtype: DType, op: &'static str) -> Result<&'static str> {
    match dtype {
        DType::I64 | DType::F8E4M3 | DType::F8E5M2 | DType::U8 => Err(Error::DType { op, dtype }),
        d => tn(d, op),
    }
}

/// The suffix of a dtype a cast reads or writes: the arithmetic floats and float8.
pub fn cast_tn(dtype: DType, op: &'static str) -> Result<&'static str> {
    match dtype {
        DType::I64 | DType::U8 => Err(Error::DType { op, dtype }),
        d => tn(d, op),
    }
}

/// `struct Dims6` of common.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Dims6 {
    pub ndim: i32,
    pub contig: i32,
    pub shape: [i64; 6],
}

/// `struct Strides6` of common.cuh.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Strides6 {
    pub s: [i64; 6],
}

/// The output shape and each operand's strides with size-1 dims dropped and mergeable neighbours
/// merged (dims i and i+1 merge when every operand has `stride[i] == stride[i+1] * dim[i+1]`),
/// so most strided views fit the kernels' six dims. Each operand is a layout of the same shape.
pub fn strided_args(layouts: &[&Layout], op: &'static str) -> Result<(Dims6, Vec<Strides6>)> {
    let dims = layouts[0].dims();
    let mut shape: Vec<usize> = Vec::new();
    let mut strides: Vec<Vec<usize>> = vec![Vec::new(); layouts.len()];
    for (i, &d) in dims.iter().enumerate() {
        if d == 1 {
            continue;
        }
        let merge = !shape.is_empty()
            && layouts.iter().zip(&strides).all(|(l, s)| {
                let prev = *s.last().expect("non-empty");
                prev == l.strides()[i] * d
            });
        if merge {
            *shape.last_mut().expect("non-empty") *= d;
            for (l, s) in layouts.iter().zip(strides.iter_mut()) {
                *s.last_mut().expect("non-empty") = l.strides()[i];
            }
        } else {
            shape.push(d);
            for (l, s) in layouts.iter().zip(strides.iter_mut()) {
                s.push(l.strides()[i]);
            }
        }
    }
    if shape.is_empty() {
        shape.push(1);
        strides.iter_mut().for_each(|s| s.push(1));
    }
    if shape.len() > 6 {
        return Err(Error::BadShape {
            op,
            msg: format!(
                "strided view needs {} dims after merging; the CUDA kernels take 6 (make it contiguous first)",
                shape.len()
            ),
            shape: layouts[0].shape().clone(),
        });
    }
    let mut d6 = Dims6 {
        ndim: shape.len() as i32,
        ..Default::default()
    };
    for (k, &s) in shape.iter().enumerate() {
        d6.shape[k] = s as i64;
    }
    let mut out = Vec::with_capacity(layouts.len());
    for (bit, (l, s)) in layouts.iter().zip(&strides).enumerate() {
        let mut s6 = Strides6::default();
        for (k, &v) in s.iter().enumerate() {
            s6.s[k] = v as i64;
        }
        if l.is_contiguous() {
            d6.contig |= 1 << bit;
        }
        out.push(s6);
    }
    Ok((d6, out))
}

/// The device both operands live on, or a mismatch error.
pub fn same_device<'a>(
    a: &'a CudaStorage,
    b: &CudaStorage,
    op: &'static str,
) -> Result<&'a Arc<CudaDevice>> {
    if a.ordinal() != b.ordinal() {
        return Err(Error::DeviceMismatch {
            op,
            lhs: format!("cuda:{}", a.ordinal()),
            rhs: format!("cuda:{}", b.ordinal()),
        });
    }
    Ok(a.dev())
}

pub fn check_dtype(a: DType, b: DType, op: &'static str) -> Result<()> {
    if a != b {
        return Err(Error::DTypeMismatch { op, lhs: a, rhs: b });
    }
    Ok(())
}

/// i32 kernel argument, or an error naming the op when the value does not fit.
pub fn i32_arg(v: usize, what: &str, op: &'static str) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::msg(format!("{op}: {what} = {v} exceeds the kernels' i32 range")))
}
