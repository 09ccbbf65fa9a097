//! The one tensor type: shared storage, a strided layout, a dtype, a device, and (only when it
//! leads to a trainable parameter) the op that produced it.

mod dtype;
pub mod float8;
mod fused;
mod io;
pub mod memory;
mod ops;
mod rng;
mod shape;
mod view;

pub use dtype::{DType, Element, Float};
pub use fused::LoraGates;
pub use io::{load_safetensors, save_safetensors, write_atomic, SafeTensorsFile};
pub use ops::ConvParams;
pub use rng::Rng;
pub use shape::{Layout, Shape, StridedOffsets};

use crate::autograd::Op;
use crate::backend::cpu::CpuStorage;
use crate::backend::Storage;
use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA device by ordinal; available once the CUDA backend is built in.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A storage shared by a tensor and its views. Host bytes are counted in [`memory`] while it
/// lives (CUDA's allocator counts its own blocks).
pub(crate) struct Held {
    lock: RwLock<Storage>,
    host_bytes: usize,
}

impl Held {
    fn new(storage: Storage) -> Arc<Held> {
        let host_bytes = match &storage {
            Storage::Cpu(c) => c.len() * c.dtype().size_in_bytes(),
            Storage::Cuda(_) => 0,
        };
        memory::cpu_alloc(host_bytes);
        Arc::new(Held {
            lock: RwLock::new(storage),
            host_bytes,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        memory::cpu_free(self.host_bytes);
    }
}

pub(crate) struct TensorInner {
    id: TensorId,
    storage: Arc<Held>,
    layout: Layout,
    dtype: DType,
    device: Device,
    op: Option<Op>,
    is_variable: bool,
    /// A stand-in an autograd op keeps for an input whose history it needs but whose values its
    /// backward never reads (`Op::slim`): same id, shape and history, no storage, so the
    /// activation it stood for is freed as soon as nothing else holds it.
    graph_only: bool,
}

/// A cheap-to-clone handle; views share storage.
#[derive(Clone)]
pub struct Tensor(Arc<TensorInner>);

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[{:?}, {}, {}{}]",
            self.dims(),
            self.dtype(),
            self.device(),
            if self.tracks() { ", tracked" } else { "" }
        )
    }
}

impl Tensor {
    /// Wrap fresh storage. `op` is recorded only when grad mode is on and an input is tracked.
    pub(crate) fn from_storage(
        storage: Storage,
        shape: impl Into<Shape>,
        op: Option<Op>,
    ) -> Tensor {
        let dtype = storage.dtype();
        let device = storage.device();
        let op = op.filter(records).map(Op::slim);
        Tensor(Arc::new(TensorInner {
            id: TensorId::fresh(),
            storage: Held::new(storage),
            layout: Layout::contiguous(shape),
            dtype,
            device,
            op,
            is_variable: false,
            graph_only: false,
        }))
    }

    /// A view of this tensor's storage with another layout.
    pub(crate) fn view(&self, layout: Layout, op: Option<Op>) -> Tensor {
        let op = op.filter(records).map(Op::slim);
        Tensor(Arc::new(TensorInner {
            id: TensorId::fresh(),
            storage: self.0.storage.clone(),
            layout,
            dtype: self.0.dtype,
            device: self.0.device,
            op,
            is_variable: false,
            graph_only: false,
        }))
    }

    /// Identifies the storage behind this tensor: equal for tensors that share it (views).
    pub fn storage_id(&self) -> usize {
        Arc::as_ptr(&self.0.storage) as *const () as usize
    }

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    pub fn shape(&self) -> &Shape {
        self.0.layout.shape()
    }
    pub fn dims(&self) -> &[usize] {
        self.0.layout.dims()
    }
    pub fn rank(&self) -> usize {
        self.dims().len()
    }
    pub fn elem_count(&self) -> usize {
        self.shape().elem_count()
    }
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    pub fn device(&self) -> Device {
        self.0.device
    }
    pub fn op(&self) -> Option<&Op> {
        self.0.op.as_ref()
    }
    pub fn is_variable(&self) -> bool {
        self.0.is_variable
    }
    /// Whether gradients flow to this tensor: it is a trainable variable or was computed from one.
    pub fn tracks(&self) -> bool {
        self.0.is_variable || self.0.op.is_some()
    }

    /// This tensor's place in the autograd graph without its values (see `graph_only` on
    /// `TensorInner`). A softmax output keeps its values: its backward reads them through the
    /// node itself, and the backward walk reaches nodes through the ops that consumed them.
    pub(crate) fn graph_only(&self) -> Tensor {
        if self.is_graph_only() || matches!(self.0.op, Some(Op::Softmax(_))) {
            return self.clone();
        }
        Tensor(Arc::new(TensorInner {
            id: self.0.id,
            storage: Held::new(Storage::Cpu(cpu_storage_of(Vec::<f32>::new()))),
            layout: self.0.layout.clone(),
            dtype: self.0.dtype,
            device: self.0.device,
            op: self.0.op.clone(),
            is_variable: self.0.is_variable,
            graph_only: true,
        }))
    }

    /// Read access to the backing storage, for backend-level ops (`backend::ops`) and benchmarks.
    pub fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.assert_held();
        self.0
            .storage
            .lock
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Write access to the backing storage, for in-place backend ops on state that no graph sees
    /// (optimizer moments and master weights).
    pub fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.assert_held();
        self.0
            .storage
            .lock
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this is a graph-only stand-in (`Op::slim`) rather than a tensor with values.
    pub(crate) fn is_graph_only(&self) -> bool {
        self.0.graph_only
    }

    /// A graph-only stand-in has no values: reading them is a bug in a backward rule or in
    /// `Op::slim`, never a consequence of user input, so it stops here with its name.
    fn assert_held(&self) {
        assert!(
            !self.0.graph_only,
            "internal: the values of a graph-only autograd stand-in {:?} were read (Op::slim \
             dropped an input its backward rule needs)",
            self.dims()
        );
    }

    pub fn dim(&self, d: usize) -> Result<usize> {
        self.shape().dim(d)
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.dims() {
            &[a, b] => Ok((a, b)),
            _ => Err(Error::Rank {
                op: "dims2",
                expected: 2,
                got: self.shape().clone(),
            }),
        }
    }
    pub fn dims3(&self) -> Result<(usize, usize, usize)> {
        match self.dims() {
            &[a, b, c] => Ok((a, b, c)),
            _ => Err(Error::Rank {
                op: "dims3",
                expected: 3,
                got: self.shape().clone(),
            }),
        }
    }
    pub fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        match self.dims() {
            &[a, b, c, d] => Ok((a, b, c, d)),
            _ => Err(Error::Rank {
                op: "dims4",
                expected: 4,
                got: self.shape().clone(),
            }),
        }
    }

    // ---- constructors ----

    pub fn from_vec<T: Element>(
        data: Vec<T>,
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.elem_count() {
            return Err(Error::ElementCount {
                op: "from_vec",
                got: data.len(),
                shape,
            });
        }
        let cpu = cpu_storage_of(data);
        Tensor::from_storage(Storage::Cpu(cpu), shape, None).to_device(device)
    }

    pub fn from_slice<T: Element>(
        data: &[T],
        shape: impl Into<Shape>,
        device: Device,
    ) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    pub fn full(
        value: f64,
        shape: impl Into<Shape>,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        if let (Device::Cuda(i), DType::F32 | DType::BF16 | DType::F16) = (device, dtype) {
            // On the GPU a kernel writes the value in place: no host buffer, no upload and no
            // stream wait (the autograd's zero pads, activation-sized, are made here). The value
            // is rounded to the dtype on the host first, as the CPU rounds it, so the kernel's
            // f32 -> dtype step is exact (rounding through f32 could land on a tie).
            let one = CpuStorage::F64(vec![value]).to_dtype(&Layout::contiguous(1), dtype);
            let rounded = Tensor::from_storage(Storage::Cpu(one), 1, None).to_vec_f64()?[0];
            let dev = crate::backend::cuda::device(i)?;
            let s = crate::backend::cuda::elementwise::fill(&dev, dtype, n, rounded)?;
            return Ok(Tensor::from_storage(Storage::Cuda(s), shape, None));
        }
        let cpu = CpuStorage::F64(vec![value; n]).to_dtype(&Layout::contiguous(n), dtype);
        Tensor::from_storage(Storage::Cpu(cpu), shape, None).to_device(device)
    }

    pub fn zeros(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(0.0, shape, dtype, device)
    }

    pub fn ones(shape: impl Into<Shape>, dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(1.0, shape, dtype, device)
    }

    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(self.shape().clone(), self.dtype(), self.device())
    }

    pub fn ones_like(&self) -> Result<Tensor> {
        Tensor::ones(self.shape().clone(), self.dtype(), self.device())
    }

    pub fn scalar(value: f64, dtype: DType, device: Device) -> Result<Tensor> {
        Tensor::full(value, (), dtype, device)
    }

    /// `0, 1, ..., n-1` as the given dtype.
    pub fn arange(n: usize, dtype: DType, device: Device) -> Result<Tensor> {
        let v: Vec<f64> = (0..n).map(|i| i as f64).collect();
        Tensor::from_vec(v, n, Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// A trainable leaf: gradients are computed for it and for everything computed from it.
    pub fn var(&self) -> Result<Tensor> {
        if !self.dtype().is_float() {
            return Err(Error::DType {
                op: "var",
                dtype: self.dtype(),
            });
        }
        let storage = self.storage().copy_strided(self.layout())?;
        Ok(Tensor(Arc::new(TensorInner {
            id: TensorId::fresh(),
            storage: Held::new(storage),
            layout: Layout::contiguous(self.shape().clone()),
            dtype: self.dtype(),
            device: self.device(),
            op: None,
            is_variable: true,
            graph_only: false,
        })))
    }

    /// A trainable leaf sharing this tensor's storage (checkpoint recomputation).
    pub(crate) fn as_leaf(&self) -> Tensor {
        self.share(None, true)
    }

    /// The same values carrying `op` as their history (checkpoint outputs).
    pub(crate) fn with_op(&self, op: Op) -> Tensor {
        self.share(Some(op).filter(records).map(Op::slim), false)
    }

    fn share(&self, op: Option<Op>, is_variable: bool) -> Tensor {
        Tensor(Arc::new(TensorInner {
            id: TensorId::fresh(),
            storage: self.0.storage.clone(),
            layout: self.layout().clone(),
            dtype: self.dtype(),
            device: self.device(),
            op,
            is_variable,
            graph_only: false,
        }))
    }

    /// The same values with no autograd history (shares storage).
    pub fn detach(&self) -> Tensor {
        if !self.tracks() {
            return self.clone();
        }
        self.share(None, false)
    }

    /// Overwrite a variable's values in place (optimizer steps). Shape and dtype must match.
    pub fn set(&self, value: &Tensor) -> Result<()> {
        if value.shape() != self.shape() {
            return Err(Error::ShapeMismatch {
                op: "set",
                lhs: self.shape().clone(),
                rhs: value.shape().clone(),
            });
        }
        if !self.layout().is_contiguous() || self.layout().offset() != 0 {
            return Err(Error::msg(
                "set: target must be a contiguous tensor that owns its storage",
            ));
        }
        let new = value.to_dtype(self.dtype())?.to_device(self.device())?;
        let data = new.storage().copy_strided(new.layout())?;
        *self
            .0
            .storage
            .lock
            .write()
            .unwrap_or_else(|e| e.into_inner()) = data;
        Ok(())
    }

    // ---- reading values out ----

    /// All elements as f64, row-major (copies to the host).
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        let t = self.to_device(Device::Cpu)?;
        let s = t.storage();
        match &*s {
            Storage::Cpu(c) => Ok(c.to_f64_vec(t.layout())),
            Storage::Cuda(_) => unreachable!("to_device(Cpu) returns CPU storage"),
        }
    }

    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        Ok(self.to_vec_f64()?.into_iter().map(|v| v as f32).collect())
    }

    /// All elements as i64, row-major: i64 tensors exactly (values past 2^53 included), float
    /// ones truncated toward zero.
    pub fn to_vec_i64(&self) -> Result<Vec<i64>> {
        let t = self.to_device(Device::Cpu)?;
        let s = t.storage();
        match &*s {
            Storage::Cpu(c) => Ok(c.to_i64_vec(t.layout())),
            Storage::Cuda(_) => unreachable!("to_device(Cpu) returns CPU storage"),
        }
    }

    pub fn to_scalar(&self) -> Result<f64> {
        if self.elem_count() != 1 {
            return Err(Error::BadShape {
                op: "to_scalar",
                msg: "expected one element".into(),
                shape: self.shape().clone(),
            });
        }
        Ok(self.to_vec_f64()?[0])
    }

    /// The same values on `device` (contiguous there). On a machine without an NVIDIA driver a
    /// CUDA device is a clean `Error::DeviceUnavailable`, never a panic. The copy carries no
    /// autograd history: moving a trainable leaf makes a fresh leaf with `var()` on the device.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let storage = self.storage().to_device(self.layout(), device)?;
        Ok(Tensor::from_storage(storage, self.shape().clone(), None))
    }
}

/// Whether an op is worth recording: grad mode is on and some input leads to a trainable.
fn records(op: &Op) -> bool {
    crate::autograd::grad_enabled()
        && (op.always_tracks() || op.inputs().iter().any(|t| t.tracks()))
}

fn cpu_storage_of<T: Element>(data: Vec<T>) -> CpuStorage {
    // Route through the dtype tag so every Element maps to its own storage variant without copies.
    let any: Box<dyn std::any::Any> = Box::new(data);
    match T::DTYPE {
        DType::F16 => CpuStorage::F16(*any.downcast().expect("f16")),
        DType::BF16 => CpuStorage::BF16(*any.downcast().expect("bf16")),
        DType::F32 => CpuStorage::F32(*any.downcast().expect("f32")),
        DType::F64 => CpuStorage::F64(*any.downcast().expect("f64")),
        DType::I64 => CpuStorage::I64(*any.downcast().expect("i64")),
        DType::F8E4M3 => CpuStorage::F8E4M3(*any.downcast().expect("f8e4m3")),
        DType::F8E5M2 => CpuStorage::F8E5M2(*any.downcast().expect("f8e5m2")),
        DType::U8 => CpuStorage::U8(*any.downcast().expect("u8")),
    }
}
