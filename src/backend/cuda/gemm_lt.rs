//! `x W^T + b` in one cuBLASLt call: the bias is added by the GEMM's epilogue, in f32, before the
//! output is rounded to its dtype, instead of a second pass that reads and writes the whole
//! output again. For SDXL's linears at 1024 px (M = 4096 tokens, N = K = 640 to 1280) the output
//! is as large as the weights and activations together, so the separate add costs about as much
//! memory traffic as the GEMM itself; that is where the epilogue pays.
//!
//! cuBLASLt is column-major like cuBLAS: the row-major (M, N) output is the column-major (N x M)
//! `D = op(A) B + bias` with A the row-major weight (N, K) read transposed and B the row-major
//! activations (M, K) as stored; the bias runs along D's rows, one value per output feature.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::{result as lr, sys as ls};

use super::device::Buffer;
use super::emu::GemmCall;
use super::{same_device, CudaDevice, CudaStorage};
use crate::tensor::{DType, Layout};
use crate::{Error, Result};

/// The cuBLASLt state of one device: the handle, one workspace, and the algorithm the heuristic
/// picked for each problem (None: no algorithm supports it, so the caller composes instead).
pub struct Lt {
    handle: Handle,
    workspace: OnceLock<Buffer>,
    algos: Mutex<HashMap<Problem, Option<ls::cublasLtMatmulAlgo_t>>>,
}

struct Handle(ls::cublasLtHandle_t);
// SAFETY: the handle is used only under `Lt::algos`'s lock or for matmuls on the device's one
// stream; cuBLASLt handles may be shared between threads that do not use them concurrently.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

/// Everything the heuristic's choice depends on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Problem {
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    /// Largest power of two (up to 256) dividing each pointer: x, w, out.
    align: [u32; 3],
}

/// Hopper's recommended workspace is 32 MiB; 4 MiB elsewhere (cuBLAS's own guidance).
fn workspace_bytes(arch: &str) -> usize {
    if arch.starts_with("sm_9") || arch.starts_with("sm_1") {
        32 << 20
    } else {
        4 << 20
    }
}

fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

fn lt_err(what: &str, e: lr::CublasError) -> Error {
    Error::cuda(format!("cuBLASLt {what}"), format!("{e:?}"))
}

/// `KSTYLE_CUDA_LT=0` turns the epilogue path off (linears compose matmul and add), on a GPU and
/// on the emulator: a switch for comparing the two without rebuilding.
pub const LT_ENV: &str = "KSTYLE_CUDA_LT";

fn switched_off() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| std::env::var(LT_ENV).is_ok_and(|v| v == "0"))
}

impl Lt {
    /// The library's handle, or None when libcublasLt cannot be loaded (linears then compose).
    pub fn new() -> Option<Lt> {
        // SAFETY: only dlopens candidate library names.
        if !unsafe { ls::is_culib_present() } {
            return None;
        }
        let handle = lr::create_handle().ok()?;
        Some(Lt {
            handle: Handle(handle),
            workspace: OnceLock::new(),
            algos: Mutex::new(HashMap::new()),
        })
    }
}

/// Descriptors for one call, destroyed on drop (also on the error paths).
struct Descs {
    desc: ls::cublasLtMatmulDesc_t,
    layouts: Vec<ls::cublasLtMatrixLayout_t>,
    pref: Option<ls::cublasLtMatmulPreference_t>,
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each object was created once and is destroyed once, here. Errors on destroy
        // leave nothing to recover.
        unsafe {
            for &l in &self.layouts {
                let _ = lr::destroy_matrix_layout(l);
            }
            if let Some(p) = self.pref {
                let _ = lr::destroy_matmul_pref(p);
            }
            let _ = lr::destroy_matmul_desc(self.desc);
        }
    }
}

/// Sets one descriptor attribute from a plain value.
///
/// # Safety
/// `desc` is live and `T` is the attribute's C type.
unsafe fn set_desc<T>(
    desc: ls::cublasLtMatmulDesc_t,
    attr: ls::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> Result<()> {
    lr::set_matmul_desc_attribute(
        desc,
        attr,
        v as *const T as *const c_void,
        std::mem::size_of::<T>(),
    )
    .map_err(|e| lt_err("matmul desc attribute", e))
}

/// `x W^T + b` with the bias in cuBLASLt's epilogue. x (..., K), w (N, K) and b (N) contiguous,
/// one dtype. Ok(None) when this path does not apply (layouts, library, or no algorithm for the
/// problem): the caller then composes matmul and add, which gives the same values up to the one
/// rounding of the product the epilogue saves.
pub fn linear_bias(
    (x, lx): (&CudaStorage, &Layout),
    (w, lw): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
) -> Result<Option<CudaStorage>> {
    let dev = same_device(x, w, "linear")?;
    same_device(x, b, "linear")?;
    if switched_off() {
        return Ok(None);
    }
    // Anything but the plain case (one dtype, x (..., K), w (N, K), b (N), all contiguous) is
    // left to the composition, which broadcasts and reports shape errors as matmul and add do.
    let (xd, wd) = (lx.dims(), lw.dims());
    let k = xd.last().copied().unwrap_or(0);
    let plain = xd.len() >= 2
        && wd.len() == 2
        && wd[1] == k
        && lb.dims() == [wd[0]]
        && x.dtype() == w.dtype()
        && x.dtype() == b.dtype()
        && lx.is_contiguous()
        && lw.is_contiguous()
        && lb.is_contiguous();
    if !plain {
        return Ok(None);
    }
    let n = wd[0];
    let m = lx.shape().elem_count() / k.max(1);
    if m == 0 || n == 0 || k == 0 {
        return Ok(None);
    }
    let (xp, wp, bp) = (
        x.ptr_at(lx.offset()),
        w.ptr_at(lw.offset()),
        b.ptr_at(lb.offset()),
    );
    // The epilogue reads the bias in vectors; an odd bias address goes the composed way.
    if alignment(bp) < 16 {
        return Ok(None);
    }
    let out = CudaStorage::alloc(dev, x.dtype(), m * n)?;
    if let Some(emu) = dev.emulator() {
        emu.gemm(&GemmCall {
            trans_a: true,
            trans_b: false,
            m: n,
            n: m,
            k,
            alpha: 1.0,
            a: wp,
            a_dtype: w.dtype(),
            lda: k,
            stride_a: 0,
            b: xp,
            b_dtype: x.dtype(),
            ldb: k,
            stride_b: 0,
            beta: 0.0,
            c: out.ptr(),
            c_dtype: x.dtype(),
            ldc: n,
            stride_c: 0,
            batch: 1,
            bias: bp,
        })?;
        return Ok(Some(out));
    }
    let Some(lt) = dev.lt() else {
        return Ok(None);
    };
    let problem = Problem {
        dtype: x.dtype(),
        m,
        n,
        k,
        align: [alignment(xp), alignment(wp), alignment(out.ptr())],
    };
    if matmul(dev, lt, problem, (xp, wp, bp, out.ptr()))? {
        Ok(Some(out))
    } else {
        Ok(None)
    }
}

/// Runs the bias-epilogue GEMM; false when cuBLASLt has no algorithm for `p`.
fn matmul(
    dev: &Arc<CudaDevice>,
    lt: &Lt,
    p: Problem,
    (xp, wp, bp, out): (u64, u64, u64, u64),
) -> Result<bool> {
    let dt = match p.dtype {
        DType::F32 => ls::cudaDataType::CUDA_R_32F,
        DType::BF16 => ls::cudaDataType::CUDA_R_16BF,
        DType::F16 => ls::cudaDataType::CUDA_R_16F,
        d => {
            return Err(Error::DType {
                op: "linear",
                dtype: d,
            })
        }
    };
    let ws_bytes = workspace_bytes(dev.arch());
    let ws = match lt.workspace.get() {
        Some(w) => w,
        None => {
            let w = dev.alloc(DType::F32, ws_bytes / 4)?;
            lt.workspace.get_or_init(|| w)
        }
    };
    dev.bind()?;
    let desc = lr::create_matmul_desc(
        ls::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ls::cudaDataType::CUDA_R_32F,
    )
    .map_err(|e| lt_err("matmul desc", e))?;
    let mut d = Descs {
        desc,
        layouts: Vec::new(),
        pref: None,
    };
    let op_t = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32;
    let epilogue = ls::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
    use ls::cublasLtMatmulDescAttributes_t as A;
    // SAFETY: `d.desc` is live; each value has its attribute's C type (int32 for the transpose
    // flag, the epilogue enum, a device pointer for the bias).
    unsafe {
        set_desc(d.desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &op_t)?;
        set_desc(d.desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        set_desc(d.desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp)?;
    }
    // Column-major: A is the weight as stored (K x N, read transposed), B the activations
    // (K x M), D the output (N x M).
    for (rows, cols) in [(p.k, p.n), (p.k, p.m), (p.n, p.m)] {
        let l = lr::create_matrix_layout(dt, rows as u64, cols as u64, rows as i64)
            .map_err(|e| lt_err("matrix layout", e))?;
        d.layouts.push(l);
    }
    let (la, lb, ld) = (d.layouts[0], d.layouts[1], d.layouts[2]);
    let algo = {
        let mut algos = lt.algos.lock().unwrap_or_else(|e| e.into_inner());
        match algos.get(&p) {
            Some(a) => *a,
            None => {
                let pref = lr::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
                d.pref = Some(pref);
                use ls::cublasLtMatmulPreferenceAttributes_t as P;
                let ws_size = ws_bytes as u64;
                let sets = [
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.align[1]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.align[0]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, p.align[2]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.align[2]),
                ];
                // SAFETY: `pref` is live; the workspace size is a uint64, alignments uint32.
                unsafe {
                    lr::set_matmul_pref_attribute(
                        pref,
                        P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        &ws_size as *const u64 as *const c_void,
                        8,
                    )
                    .map_err(|e| lt_err("preference attribute", e))?;
                    for (attr, v) in sets {
                        lr::set_matmul_pref_attribute(
                            pref,
                            attr,
                            &v as *const u32 as *const c_void,
                            4,
                        )
                        .map_err(|e| lt_err("preference attribute", e))?;
                    }
                }
                // SAFETY: every descriptor is live. NOT_SUPPORTED (no algorithm) is an answer,
                // not an error: the caller composes.
                let found = unsafe {
                    lr::get_matmul_algo_heuristic(lt.handle.0, d.desc, la, lb, ld, ld, pref)
                };
                let a = match found {
                    Ok(h) if h.workspaceSize <= ws_bytes => Some(h.algo),
                    Ok(_) => None,
                    Err(lr::CublasError(ls::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => None,
                    Err(e) => return Err(lt_err("heuristic", e)),
                };
                algos.insert(p, a);
                a
            }
        }
    };
    let Some(algo) = algo else {
        return Ok(false);
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    dev.span(
        || format!("cublasLt linear+bias ({})", p.dtype),
        || {
            // SAFETY: the pointers address live device memory of the sizes the layouts describe
            // (checked by `linear_bias`), the workspace is `ws_bytes` long, and the stream is the
            // device's.
            unsafe {
                lr::matmul(
                    lt.handle.0,
                    d.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    wp as *const c_void,
                    la,
                    xp as *const c_void,
                    lb,
                    out as *const c_void,
                    ld,
                    out as *mut c_void,
                    ld,
                    &algo,
                    ws.ptr() as *mut c_void,
                    ws_bytes,
                    dev.cu_stream() as ls::cudaStream_t,
                )
            }
            .map_err(|e| lt_err(&format!("matmul {}x{}x{} {}", p.m, p.n, p.k, p.dtype), e))
        },
    )?;
    Ok(true)
}
