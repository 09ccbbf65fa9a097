//! The CUDA backend without a GPU: `kernels/*.cu` compiled for the host by a C++ compiler with
//! `kernels/emu.h` (threads as fibers, barriers, shuffles, and the tensor-core and ldmatrix
//! instructions from their PTX definitions), device memory as guarded host memory, and cuBLAS's
//! strided-batched GEMM from its documented column-major contract. Everything above this file (the
//! launchers, the allocator's bookkeeping, the GEMM operand mapping, the ops) is the code a GPU
//! runs, so `KSTYLE_CUDA_EMULATE=1` (or [`enable`]) lets CI run the whole parity suite and
//! `verify --device cuda` on two CPU cores.
//!
//! It checks what hardware would not: every launch's argument count and byte sizes against the
//! kernel's parameters, barriers some threads never reach, shuffles from exited lanes, writes past
//! either end of an allocation (guard bytes checked after every launch), and reads of memory never
//! written (fresh allocations are filled with 0xFF, a NaN in every float dtype). Timing means
//! nothing here, and one block runs at a time.

use std::alloc::{self, Layout};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::kernels::{self, Family};
use crate::tensor::DType;
use crate::{Error, Result};

/// Set to 1 to make every CUDA device the host emulator.
pub const EMULATE_ENV: &str = "KSTYLE_CUDA_EMULATE";
/// The C++ compiler (default `g++`, then `c++`).
pub const CXX_ENV: &str = "CXX";
/// Extra compiler flags, space separated (e.g. `-DKS_EMU_UCONTEXT` for the portable fiber switch).
pub const CXXFLAGS_ENV: &str = "KSTYLE_EMU_CXXFLAGS";

/// The emulator's runtime header, `-include`d before every family.
pub const EMU_H: &str = include_str!("../../../kernels/emu.h");

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Makes CUDA devices created from now on emulated (tests call this before their first device).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Whether devices are emulated: [`enable`] was called or `KSTYLE_CUDA_EMULATE=1`.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst) || std::env::var(EMULATE_ENV).is_ok_and(|v| v == "1")
}

/// Guard bytes on each side of an allocation; the payload starts 256-byte aligned like
/// cudaMalloc's.
const GUARD: usize = 256;
const GUARD_BYTE: u8 = 0xA5;
const POISON_BYTE: u8 = 0xFF;

/// `struct LaunchArgs` of kernels/emu.h.
#[repr(C)]
struct LaunchArgs {
    grid: [u32; 3],
    block: [u32; 3],
    smem: u32,
    nargs: u32,
    args: *const *mut c_void,
    arg_sizes: *const u32,
    err: *mut c_char,
    errlen: u32,
}

type LaunchFn = unsafe extern "C" fn(*const LaunchArgs) -> i32;

/// One kernel entry point in a loaded family library.
#[derive(Clone, Copy)]
pub struct Kernel(LaunchFn);

struct Alloc {
    base: *mut u8,
    layout: Layout,
    bytes: usize,
}
// SAFETY: the pointers are owned by the emulator and only touched under its mutexes.
unsafe impl Send for Alloc {}

pub struct Emulator {
    cxx: String,
    cxx_version: String,
    dir: PathBuf,
    libs: Mutex<HashMap<&'static str, libloading::Library>>,
    allocs: Mutex<BTreeMap<u64, Alloc>>,
    /// One launch at a time in the whole process: each library's fiber machine is global.
    run: Mutex<()>,
}

impl Emulator {
    /// Finds the C++ compiler; compiled families are cached under `cache_dir/emu`.
    pub fn new(cache_dir: &Path) -> Result<Emulator> {
        let candidates: Vec<String> = match std::env::var(CXX_ENV) {
            Ok(c) if !c.is_empty() => vec![c],
            _ => vec!["g++".into(), "c++".into()],
        };
        for cxx in &candidates {
            if let Ok(out) = Command::new(cxx).arg("--version").output() {
                if out.status.success() {
                    let version = String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    return Ok(Emulator {
                        cxx: cxx.clone(),
                        cxx_version: version,
                        dir: cache_dir.join("emu"),
                        libs: Mutex::new(HashMap::new()),
                        allocs: Mutex::new(BTreeMap::new()),
                        run: Mutex::new(()),
                    });
                }
            }
        }
        Err(Error::DeviceUnavailable(
            "cuda:emulated".into(),
            format!(
                "the CUDA emulator needs a C++ compiler; tried {} (set {CXX_ENV})",
                candidates.join(", ")
            ),
        ))
    }

    /// The compiler's version line, and the extra flags when there are any.
    pub fn compiler(&self) -> String {
        let extra = extra_flags();
        if extra.is_empty() {
            self.cxx_version.clone()
        } else {
            format!("{} {}", self.cxx_version, extra.join(" "))
        }
    }

    // ---- kernels ----

    const FLAGS: &'static [&'static str] = &[
        "-std=c++17",
        "-O1",
        "-fPIC",
        "-shared",
        "-fno-strict-aliasing",
        "-Wno-unknown-pragmas",
    ];

    /// The entry point of `symbol` in family `stem`, building the family's library on first use.
    pub fn kernel(&self, fam: &'static Family, symbol: &str) -> Result<Kernel> {
        let stem = fam.stem;
        let mut libs = self.libs.lock().unwrap_or_else(|e| e.into_inner());
        if !libs.contains_key(stem) {
            let path = self.build(fam)?;
            // SAFETY: a library this emulator just compiled from the project's own sources; its
            // initialisers only set up plain globals.
            let lib = unsafe { libloading::Library::new(&path) }
                .map_err(|e| Error::msg(format!("load {}: {e}", path.display())))?;
            libs.insert(stem, lib);
        }
        let lib = &libs[stem];
        let name = format!("ks_emu_launch_{symbol}");
        // SAFETY: every ks_emu_launch_* symbol is a KS_EMU_EXPORT trampoline of this signature.
        let f = unsafe { lib.get::<LaunchFn>(name.as_bytes()) }
            .map_err(|_| Error::msg(format!("kernel {symbol} is not in {stem}.cu")))?;
        Ok(Kernel(*f))
    }

    fn build(&self, fam: &Family) -> Result<PathBuf> {
        let mut h = Sha256::new();
        for part in [
            EMU_H,
            kernels::COMMON_CUH,
            fam.code,
            &self.cxx_version,
            &Self::FLAGS.join(" "),
            &extra_flags().join(" "),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let hash: String = h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let lib = self.dir.join(format!("{}-{hash}.so", fam.stem));
        if lib.exists() {
            return Ok(lib);
        }
        let io = |what: &str, p: &Path, e: std::io::Error| {
            Error::msg(format!("emulator: {what} {}: {e}", p.display()))
        };
        let work = self
            .dir
            .join(format!("{}-{hash}.build-{}", fam.stem, std::process::id()));
        std::fs::create_dir_all(&work).map_err(|e| io("create", &work, e))?;
        let cu = fam.file_name();
        for (name, text) in [
            ("emu.h", EMU_H),
            ("common.cuh", kernels::COMMON_CUH),
            (cu.as_str(), fam.code),
        ] {
            let p = work.join(name);
            std::fs::write(&p, text).map_err(|e| io("write", &p, e))?;
        }
        // The kernels' names come from the preprocessed source (macros paste most of them).
        let extra = extra_flags();
        let mut pre_args = vec!["-std=c++17", "-E", "-P", "-x", "c++", "-include", "emu.h"];
        pre_args.extend(extra.iter().map(String::as_str));
        pre_args.push(&cu);
        let pre = self.cxx(&work, &pre_args)?;
        let names = kernel_names(&pre);
        let mut tu = format!("#include \"{cu}\"\n");
        for n in &names {
            tu.push_str(&format!("KS_EMU_EXPORT({n})\n"));
        }
        let tu_name = format!("{}.emu.cpp", fam.stem);
        std::fs::write(work.join(&tu_name), tu).map_err(|e| io("write", &work, e))?;
        let mut args: Vec<&str> = Self::FLAGS.to_vec();
        args.extend(extra.iter().map(String::as_str));
        args.extend(["-include", "emu.h", "-o", "out.so", &tu_name]);
        self.cxx(&work, &args)?;
        std::fs::rename(work.join("out.so"), &lib).map_err(|e| io("install", &lib, e))?;
        let _ = std::fs::remove_dir_all(&work);
        Ok(lib)
    }

    /// Runs the compiler in `dir`; its stdout, or an error carrying its log.
    fn cxx(&self, dir: &Path, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.cxx)
            .current_dir(dir)
            .args(args)
            .output()
            .map_err(|e| Error::msg(format!("emulator: run {}: {e}", self.cxx)))?;
        if !out.status.success() {
            return Err(Error::msg(format!(
                "emulator: {} {} failed in {}:\n{}",
                self.cxx,
                args.join(" "),
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a whole grid, then checks every allocation's guard bytes. `args` point at the
    /// parameter values, `sizes` gives each one's byte size.
    pub fn launch(
        &self,
        symbol: &str,
        k: Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        (args, sizes): (&[*mut c_void], &[u32]),
    ) -> Result<()> {
        let mut err = vec![0u8; 512];
        let la = LaunchArgs {
            grid: [grid.0, grid.1, grid.2],
            block: [block.0, block.1, block.2],
            smem,
            nargs: args.len() as u32,
            args: args.as_ptr(),
            arg_sizes: sizes.as_ptr(),
            err: err.as_mut_ptr() as *mut c_char,
            errlen: err.len() as u32,
        };
        // The guards are checked (and repaired) before the next launch may run, so a launch
        // from another thread never sees this one's damage.
        let _one = self.run.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `la` and everything it points to outlive the call; the trampoline checks the
        // argument count and sizes before reading any argument.
        let rc = unsafe { (k.0)(&la) };
        let guards = self.check_guards(symbol);
        if rc != 0 {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            return Err(Error::msg(format!(
                "emulated launch of {symbol} (grid {grid:?}, block {block:?}): {}",
                String::from_utf8_lossy(&err[..end])
            )));
        }
        guards
    }

    // ---- memory ----

    /// `bytes` of fresh memory filled with 0xFF (NaN in f32, bf16 and f16).
    pub fn alloc(&self, bytes: usize) -> Result<u64> {
        let layout = Layout::from_size_align(bytes + 2 * GUARD, GUARD)
            .map_err(|e| Error::msg(format!("emulator: alloc {bytes} bytes: {e}")))?;
        // SAFETY: a non-zero-sized layout.
        let base = unsafe { alloc::alloc(layout) };
        if base.is_null() {
            return Err(Error::msg(format!(
                "emulator: out of host memory for {bytes} bytes"
            )));
        }
        // SAFETY: all three ranges lie inside the allocation.
        unsafe {
            std::ptr::write_bytes(base, GUARD_BYTE, GUARD);
            std::ptr::write_bytes(base.add(GUARD), POISON_BYTE, bytes);
            std::ptr::write_bytes(base.add(GUARD + bytes), GUARD_BYTE, GUARD);
        }
        let ptr = base as u64 + GUARD as u64;
        self.allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                ptr,
                Alloc {
                    base,
                    layout,
                    bytes,
                },
            );
        Ok(ptr)
    }

    pub fn free(&self, ptr: u64) {
        if let Some(a) = self
            .allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ptr)
        {
            // SAFETY: allocated by `alloc` with this layout and removed from the table once.
            unsafe { alloc::dealloc(a.base, a.layout) };
        }
    }

    /// Errors unless `[ptr, ptr + bytes)` lies inside one live allocation.
    pub fn check_range(&self, ptr: u64, bytes: usize, what: &str) -> Result<()> {
        let allocs = self.allocs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((&start, a)) = allocs.range(..=ptr).next_back() {
            if ptr + bytes as u64 <= start + a.bytes as u64 {
                return Ok(());
            }
        }
        Err(Error::msg(format!(
            "emulator: {what} touches [{ptr:#x}, +{bytes}) outside every allocation"
        )))
    }

    pub fn memset(&self, ptr: u64, byte: u8, bytes: usize) -> Result<()> {
        self.check_range(ptr, bytes, "memset")?;
        // SAFETY: the range lies in a live allocation (checked above).
        unsafe { std::ptr::write_bytes(ptr as *mut u8, byte, bytes) };
        Ok(())
    }

    pub fn write<T: Copy>(&self, ptr: u64, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        self.check_range(ptr, bytes, "upload")?;
        // SAFETY: the destination range lies in a live allocation; host and "device" memory
        // never overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, ptr as *mut u8, bytes) };
        Ok(())
    }

    pub fn read<T: Copy>(&self, ptr: u64, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        self.check_range(ptr, bytes, "download")?;
        // SAFETY: as in `write`, the other way round.
        unsafe {
            std::ptr::copy_nonoverlapping(ptr as *const u8, out.as_mut_ptr() as *mut u8, bytes)
        };
        Ok(())
    }

    fn check_guards(&self, symbol: &str) -> Result<()> {
        let allocs = self.allocs.lock().unwrap_or_else(|e| e.into_inner());
        for (&ptr, a) in allocs.iter() {
            // SAFETY: both guard ranges are inside the live allocation.
            let (front, back) = unsafe {
                (
                    std::slice::from_raw_parts(a.base, GUARD),
                    std::slice::from_raw_parts(a.base.add(GUARD + a.bytes), GUARD),
                )
            };
            if front.iter().chain(back).all(|&b| b == GUARD_BYTE) {
                continue;
            }
            let msg = match front.iter().rposition(|&b| b != GUARD_BYTE) {
                Some(i) => format!("byte {} before the start", GUARD - i),
                None => {
                    let i = back.iter().position(|&b| b != GUARD_BYTE).unwrap_or(0);
                    format!("byte {i} after the end")
                }
            };
            // Repair the guard so that the next launch reports only its own damage.
            // SAFETY: both guard ranges are inside the live allocation; the slices above are no
            // longer used.
            unsafe {
                std::ptr::write_bytes(a.base, GUARD_BYTE, GUARD);
                std::ptr::write_bytes(a.base.add(GUARD + a.bytes), GUARD_BYTE, GUARD);
            }
            return Err(Error::msg(format!(
                "emulator: {symbol} wrote outside the {}-byte allocation at {ptr:#x} ({msg})",
                a.bytes
            )));
        }
        Ok(())
    }

    // ---- cuBLAS ----

    /// `cublasGemmStridedBatchedEx` with CUBLAS_COMPUTE_32F, column-major as cuBLAS defines it:
    /// C[i + j ldc] = alpha sum_p op(A)[i, p] op(B)[p, j] + beta C[i + j ldc], where op(A)[i, p]
    /// is A[i + p lda], or A[p + i lda] when transposed; beta = 0 never reads C.
    pub fn gemm(&self, g: &GemmCall) -> Result<()> {
        let extent = |rows: usize, cols: usize, ld: usize, stride: usize| {
            // Column-major (rows x cols) with leading dim ld, batch stride `stride`.
            (g.batch - 1) * stride + (cols - 1) * ld + rows
        };
        let (ar, ac) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
        let (br, bc) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
        if g.lda < ar || g.ldb < br || g.ldc < g.m {
            return Err(Error::msg(format!(
                "emulated cuBLAS: leading dims lda={} ldb={} ldc={} below rows {ar}/{br}/{}",
                g.lda, g.ldb, g.ldc, g.m
            )));
        }
        let (sa, sb, sc) = (
            g.a_dtype.size_in_bytes(),
            g.b_dtype.size_in_bytes(),
            g.c_dtype.size_in_bytes(),
        );
        self.check_range(g.a, extent(ar, ac, g.lda, g.stride_a) * sa, "gemm A")?;
        self.check_range(g.b, extent(br, bc, g.ldb, g.stride_b) * sb, "gemm B")?;
        self.check_range(g.c, extent(g.m, g.n, g.ldc, g.stride_c) * sc, "gemm C")?;
        if g.bias != 0 {
            self.check_range(g.bias, g.m * sc, "gemm bias")?;
        }
        let load = |ptr: u64, dtype: DType, i: usize| -> f64 {
            // SAFETY: every index is inside the ranges checked above.
            unsafe {
                match dtype {
                    DType::F32 => *(ptr as *const f32).add(i) as f64,
                    DType::BF16 => (*(ptr as *const half::bf16).add(i)).to_f64(),
                    DType::F16 => (*(ptr as *const half::f16).add(i)).to_f64(),
                    _ => f64::NAN,
                }
            }
        };
        for bi in 0..g.batch {
            for j in 0..g.n {
                for i in 0..g.m {
                    let mut s = 0.0f64;
                    for p in 0..g.k {
                        let ai = bi * g.stride_a
                            + if g.trans_a {
                                p + i * g.lda
                            } else {
                                i + p * g.lda
                            };
                        let bj = bi * g.stride_b
                            + if g.trans_b {
                                j + p * g.ldb
                            } else {
                                p + j * g.ldb
                            };
                        s += load(g.a, g.a_dtype, ai) * load(g.b, g.b_dtype, bj);
                    }
                    let ci = bi * g.stride_c + i + j * g.ldc;
                    let mut v = g.alpha as f64 * s;
                    if g.beta != 0.0 {
                        v += g.beta as f64 * load(g.c, g.c_dtype, ci);
                    }
                    if g.bias != 0 {
                        v += load(g.bias, g.c_dtype, i);
                    }
                    // SAFETY: inside the checked C range.
                    unsafe {
                        match g.c_dtype {
                            DType::F32 => *(g.c as *mut f32).add(ci) = v as f32,
                            DType::BF16 => {
                                *(g.c as *mut half::bf16).add(ci) = half::bf16::from_f32(v as f32)
                            }
                            DType::F16 => {
                                *(g.c as *mut half::f16).add(ci) = half::f16::from_f32(v as f32)
                            }
                            d => {
                                return Err(Error::DType {
                                    op: "gemm",
                                    dtype: d,
                                })
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let allocs = std::mem::take(&mut *self.allocs.lock().unwrap_or_else(|e| e.into_inner()));
        for a in allocs.into_values() {
            // SAFETY: allocated by `alloc` with this layout.
            unsafe { alloc::dealloc(a.base, a.layout) };
        }
    }
}

/// One cuBLAS strided-batched GEMM in cuBLAS's own (column-major) terms.
#[derive(Clone, Copy, Debug)]
pub struct GemmCall {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: u64,
    pub a_dtype: DType,
    pub lda: usize,
    pub stride_a: usize,
    pub b: u64,
    pub b_dtype: DType,
    pub ldb: usize,
    pub stride_b: usize,
    pub beta: f32,
    pub c: u64,
    pub c_dtype: DType,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    /// cuBLASLt's bias epilogue: `m` values of `c_dtype` added along C's rows (0: none).
    pub bias: u64,
}

fn extra_flags() -> Vec<String> {
    std::env::var(CXXFLAGS_ENV)
        .map(|f| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// `extern "C" __attribute__((used)) void NAME(` in preprocessed source: the kernels.
fn kernel_names(pre: &str) -> Vec<String> {
    const MARK: &str = "extern \"C\" __attribute__((used))";
    let mut names = Vec::new();
    let mut rest = pre;
    while let Some(i) = rest.find(MARK) {
        rest = &rest[i + MARK.len()..];
        let after = rest.trim_start();
        let Some(after) = after.strip_prefix("void") else {
            continue;
        };
        let ident: String = after
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !ident.is_empty() {
            names.push(ident);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::kernel_names;

    #[test]
    fn kernel_names_come_from_extern_c_globals() {
        let pre =
            "static void helper() {}\nextern \"C\" __attribute__((used)) void  foo_f32(int a) {}\n\
                   extern \"C\" __attribute__((used)) void bar(const float* x) {}";
        assert_eq!(kernel_names(pre), vec!["foo_f32", "bar"]);
    }
}
