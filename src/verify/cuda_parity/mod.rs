//! Every CUDA op against the CPU oracle on random and odd shapes: the body of
//! `tests/cuda_parity.rs` and of `kstyle gpu-parity` (the GPU machine has no Rust toolchain, so
//! the release binary carries the same checks).
//!
//! Rules: f32 within `Tolerance::F32_FORWARD` (forward) / `F32_GRAD` (gradients); bf16 and f16
//! within `BF16_FORWARD` / `BF16_GRAD` against the oracle run on the same rounded inputs; bf16
//! flash attention at most twice the error of the plain bf16 composition (flash-attention's rule),
//! both measured against the f32 oracle on those inputs.

use crate::backend::cpu::attention::AttnGeom;
use crate::backend::cpu::conv::ConvGeom;
use crate::backend::cpu::elementwise::{BinaryOp, UnaryOp};
use crate::backend::cpu::lora::LoraGeom;
use crate::backend::cpu::optim::{AdamW, LionStep, LrRun, ProdigyBuffers, ProdigyMoments, State};
use crate::backend::cuda::attention::{sdpa_bwd_with, sdpa_with, AttnKernel, Saved};
use crate::backend::ops::{self, GateArgs};
use crate::backend::Storage;
use crate::tensor::{Layout, Rng, Shape};
use crate::tolerance::{compare, Tolerance};
use crate::{DType, Device, Result, Tensor};

/// One compared tensor.
#[derive(Clone, Debug)]
pub struct ParityRow {
    pub case: String,
    pub dtype: DType,
    /// `||gpu - cpu|| / ||cpu||`
    pub error: f64,
    /// The allowed relative error.
    pub limit: f64,
    pub passed: bool,
}

/// Whether CUDA device `ordinal` can run here; the reason when not.
pub fn available(ordinal: usize) -> std::result::Result<(), String> {
    crate::backend::cuda::device(ordinal)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

struct Run {
    dev: Device,
    rng: Rng,
    rows: Vec<ParityRow>,
    filter: Option<String>,
}

type Arg<'a> = (&'a Storage, &'a crate::tensor::Layout);

/// A storage result as an untracked tensor.
fn st(s: Storage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(s, shape, None)
}

fn tol(dtype: DType, grad: bool) -> Tolerance {
    match (dtype, grad) {
        (DType::F32, false) => Tolerance::F32_FORWARD,
        (DType::F32, true) => Tolerance::F32_GRAD,
        (_, false) => Tolerance::BF16_FORWARD,
        (_, true) => Tolerance::BF16_GRAD,
    }
}

impl Run {
    fn wants(&self, case: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| case.contains(f))
    }

    /// Random values in [lo, hi) of `dtype` on the CPU and the same values on the GPU.
    fn pair(
        &mut self,
        shape: &[usize],
        dtype: DType,
        lo: f64,
        hi: f64,
    ) -> Result<(Tensor, Tensor)> {
        let c = Tensor::rand_uniform(shape.to_vec(), lo, hi, &mut self.rng, dtype, Device::Cpu)?;
        let g = c.to_device(self.dev)?;
        Ok((c, g))
    }

    fn randn(&mut self, shape: &[usize], dtype: DType) -> Result<(Tensor, Tensor)> {
        let c = Tensor::randn(shape.to_vec(), &mut self.rng, dtype, Device::Cpu)?;
        let g = c.to_device(self.dev)?;
        Ok((c, g))
    }

    fn check(
        &mut self,
        case: String,
        dtype: DType,
        gpu: &Tensor,
        cpu: &Tensor,
        grad: bool,
    ) -> Result<()> {
        self.check_with(case, dtype, gpu, cpu, tol(dtype, grad))
    }

    fn check_with(
        &mut self,
        case: String,
        dtype: DType,
        gpu: &Tensor,
        cpu: &Tensor,
        t: Tolerance,
    ) -> Result<()> {
        let c = compare(gpu, cpu, t)?;
        let denom = if c.ref_norm > 0.0 { c.ref_norm } else { 1.0 };
        self.rows.push(ParityRow {
            case,
            dtype,
            error: c.relative(),
            limit: c.limit / denom,
            passed: c.passed(),
        });
        Ok(())
    }

    /// A bit-exact case: `wrong` elements differ between the devices, and none may.
    fn exact(&mut self, case: String, wrong: usize) {
        self.rows.push(ParityRow {
            case,
            dtype: DType::F32,
            error: wrong as f64,
            limit: 0.0,
            passed: wrong == 0,
        });
    }

    /// A case whose op could not run at all is a failed row, not an aborted run.
    fn guard(&mut self, case: &str, dtype: DType, r: Result<()>) {
        if let Err(e) = r {
            eprintln!("gpu-parity: {case} [{dtype}] errored: {e}");
            self.rows.push(ParityRow {
                case: format!("{case} (error: {e})"),
                dtype,
                error: f64::NAN,
                limit: 0.0,
                passed: false,
            });
        }
    }
}

fn sa(
    t: &Tensor,
) -> (
    std::sync::RwLockReadGuard<'_, Storage>,
    crate::tensor::Layout,
) {
    (t.storage(), t.layout().clone())
}

fn cu(s: &Storage) -> Result<&crate::backend::cuda::CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        Storage::Cpu(_) => Err(crate::Error::msg("expected CUDA storage")),
    }
}

fn a<'a>(t: &'a Tensor, s: &'a std::sync::RwLockReadGuard<'a, Storage>) -> Arg<'a> {
    (s, t.layout())
}

/// Runs the op closure on both devices' tensors and compares.
macro_rules! same {
    ($run:expr, $case:expr, $dt:expr, $grad:expr, $shape:expr, [$($c:ident / $g:ident),*], |$($x:ident),*| $body:expr) => {{
        let cpu = {
            $(let $x = $c.storage(); let $x = a(&$c, &$x);)*
            st($body?, $shape)
        };
        let gpu = {
            $(let $x = $g.storage(); let $x = a(&$g, &$x);)*
            st($body?, $shape)
        };
        $run.check($case, $dt, &gpu, &cpu, $grad)
    }};
}

mod basic;
mod float8;
mod fused;
mod optim;

use basic::{elementwise, matmul, reduce};
use float8::float8;
use fused::{attention, conv, lora, norm, pool};
use optim::{adafactor, adamw, adamw8bit, lion, lion8bit, multi_tensor, prodigy, sqnorm};

type Family = fn(&mut Run, DType) -> Result<()>;

/// Runs every case (or those whose name contains `filter`) on CUDA device `ordinal`.
pub fn run(ordinal: usize, filter: Option<&str>, seed: u64) -> Result<Vec<ParityRow>> {
    let mut r = Run {
        dev: Device::Cuda(ordinal),
        rng: Rng::new(seed),
        rows: Vec::new(),
        filter: filter.map(str::to_owned),
    };
    let families: [(&str, Family, &[DType]); 9] = [
        (
            "elementwise",
            elementwise,
            &[DType::F32, DType::BF16, DType::F16],
        ),
        ("matmul", matmul, &[DType::F32, DType::BF16, DType::F16]),
        ("float8", float8, &[DType::F32, DType::BF16]),
        ("reduce", reduce, &[DType::F32, DType::BF16]),
        ("norm", norm, &[DType::F32, DType::BF16]),
        ("conv", conv, &[DType::F32, DType::BF16]),
        ("attention", attention, &[DType::F32, DType::BF16]),
        ("lora", lora, &[DType::F32, DType::BF16]),
        ("pool", pool, &[DType::F32, DType::BF16]),
    ];
    for (name, f, dtypes) in families {
        if !r.wants(name) {
            continue;
        }
        for &dt in dtypes {
            let res = f(&mut r, dt);
            r.guard(name, dt, res);
        }
    }
    if r.wants("optim") {
        let res = adamw(&mut r);
        r.guard("optim", DType::F32, res);
        let res = multi_tensor(&mut r);
        r.guard("optim", DType::F32, res);
        let res = sqnorm(&mut r);
        r.guard("optim", DType::F32, res);
        let res = prodigy(&mut r);
        r.guard("optim", DType::F32, res);
        let res = lion(&mut r);
        r.guard("optim", DType::F32, res);
        let res = adamw8bit(&mut r);
        r.guard("optim", DType::F32, res);
        let res = lion8bit(&mut r);
        r.guard("optim", DType::F32, res);
        let res = adafactor(&mut r);
        r.guard("optim", DType::F32, res);
    }
    Ok(r.rows)
}
