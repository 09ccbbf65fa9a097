//! Run-time compilation of the CUDA C kernels with NVRTC, to a CUBIN for one `sm_XX` target.
//!
//! A CUBIN (not PTX) is produced on purpose: asking NVRTC for `compute_XX` PTX skips ptxas, so an
//! instruction the target lacks (bf16 mma below sm_80, wgmma on plain sm_90) would pass silently.
//! Results are cached in memory and, when a cache folder is given, on disk under a key that covers
//! the source, every header, the target, the options and the NVRTC version.

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use cudarc::nvrtc::sys;
use sha2::{Digest, Sha256};

/// Environment variable naming the folder that holds `libnvrtc.so.13` and its builtins.
pub const NVRTC_DIR_ENV: &str = "KSTYLE_NVRTC_DIR";

#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error("libnvrtc could not be loaded ({detail}); run scripts/install-nvrtc.sh and put its folder on LD_LIBRARY_PATH or in {NVRTC_DIR_ENV}")]
    LibraryMissing { detail: String },
    #[error("nvrtc: {call} failed for {name} ({arch}): {code:?}")]
    Api {
        call: &'static str,
        name: String,
        arch: String,
        code: sys::nvrtcResult,
    },
    #[error("nvrtc: compiling {name} for {arch} failed:\n{log}")]
    Compile {
        name: String,
        arch: String,
        log: String,
    },
    #[error("nvrtc: invalid argument for {name}: {what}")]
    InvalidArgument { name: String, what: String },
    #[error("nvrtc cache {path}: {err}")]
    Cache { path: PathBuf, err: std::io::Error },
}

pub type Result<T> = std::result::Result<T, NvrtcError>;

/// One translation unit: a kernel file plus the headers it may `#include "name"`.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// File name used in diagnostics, e.g. `attention.cu`.
    pub name: &'a str,
    pub code: &'a str,
    /// (include name, contents), e.g. `("common.cuh", COMMON)`.
    pub headers: &'a [(&'a str, &'a str)],
}

/// Target and options. `arch` is a real SASS target such as `sm_90a` or `sm_80`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CompileOptions {
    pub arch: String,
    /// `-D NAME` or `-D NAME=VALUE`.
    pub defines: Vec<(String, Option<String>)>,
    /// Adds `--ptxas-options=-v`: registers, shared memory and spills per kernel in the log.
    pub ptxas_verbose: bool,
    /// Further raw NVRTC options, appended last.
    pub extra: Vec<String>,
}

impl CompileOptions {
    pub fn new(arch: impl Into<String>) -> Self {
        Self {
            arch: arch.into(),
            defines: Vec::new(),
            ptxas_verbose: false,
            extra: Vec::new(),
        }
    }
    pub fn define(mut self, name: impl Into<String>, value: Option<&str>) -> Self {
        self.defines.push((name.into(), value.map(str::to_owned)));
        self
    }
    pub fn verbose(mut self, on: bool) -> Self {
        self.ptxas_verbose = on;
        self
    }

    fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--gpu-architecture={}", self.arch),
            "-default-device".to_owned(),
            "--std=c++17".to_owned(),
        ];
        for (k, v) in &self.defines {
            args.push(match v {
                Some(v) => format!("-D{k}={v}"),
                None => format!("-D{k}"),
            });
        }
        if self.ptxas_verbose {
            args.push("--ptxas-options=-v".to_owned());
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// A compiled module. `log` holds NVRTC's (and, with `ptxas_verbose`, ptxas's) messages.
#[derive(Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
    pub arch: String,
    /// Wall time of the NVRTC call; 0 when the result came from a cache.
    pub compile_ms: f64,
    pub from_cache: bool,
}

/// Handles kept alive for the life of the process when libnvrtc is preloaded by absolute path.
static PRELOADED: OnceLock<Vec<libloading::os::unix::Library>> = OnceLock::new();
static LOADED: OnceLock<std::result::Result<(i32, i32), String>> = OnceLock::new();

/// Makes libnvrtc loadable and returns its version; never panics.
///
/// `libnvrtc.so.13` dlopens `libnvrtc-builtins.so.13.0` by bare name, so a folder that is not on
/// `LD_LIBRARY_PATH` only works if both libraries are preloaded by absolute path (builtins first):
/// glibc then resolves later bare-name dlopens against the sonames already loaded. This is done
/// for `dir`, else for `$KSTYLE_NVRTC_DIR`, else the normal search path is used as is.
/// Only the first call in a process decides.
pub fn load_library(dir: Option<&Path>) -> Result<(i32, i32)> {
    let loaded = LOADED.get_or_init(|| {
        let dir = dir
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(NVRTC_DIR_ENV).map(PathBuf::from));
        if let Some(dir) = dir {
            preload(&dir)?;
        }
        // SAFETY: probing only dlopens candidate names and closes them again.
        if !unsafe { sys::is_culib_present() } {
            return Err("no libnvrtc.so / libnvrtc.so.13 on the library search path".to_owned());
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is present, so cudarc's loader will not panic; the symbol exists
        // in every NVRTC release.
        let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(format!("nvrtcVersion returned {r:?}"));
        }
        Ok((major, minor))
    });
    loaded
        .clone()
        .map_err(|detail| NvrtcError::LibraryMissing { detail })
}

fn preload(dir: &Path) -> std::result::Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    if !dir.is_dir() {
        return Err(format!("{}: no such folder", dir.display()));
    }
    let mut libs = Vec::new();
    for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(format!("{}: no such file", path.display()));
        }
        // SAFETY: loading NVRTC runs no initialisers with preconditions on our side.
        let lib = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(|e| format!("{}: {e}", path.display()))?;
        libs.push(lib);
    }
    let _ = PRELOADED.set(libs);
    Ok(())
}

/// Compiles sources to CUBINs with an in-memory and an optional on-disk cache.
pub struct Compiler {
    version: (i32, i32),
    cache_dir: Option<PathBuf>,
    memory: Mutex<HashMap<String, Arc<Compiled>>>,
}

impl Compiler {
    /// Loads NVRTC (see [`load_library`]) and sets up the cache; `cache_dir` is created if needed.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self> {
        let version = load_library(None)?;
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir).map_err(|err| NvrtcError::Cache {
                path: dir.clone(),
                err,
            })?;
        }
        Ok(Self {
            version,
            cache_dir,
            memory: Mutex::new(HashMap::new()),
        })
    }

    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// Hex sha256 over everything that can change the output.
    pub fn cache_key(&self, src: &Source<'_>, opts: &CompileOptions) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(format!("nvrtc {}.{}", self.version.0, self.version.1).as_bytes());
        field(src.code.as_bytes());
        for (name, code) in src.headers {
            field(name.as_bytes());
            field(code.as_bytes());
        }
        for arg in opts.to_args() {
            field(arg.as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn compile(&self, src: &Source<'_>, opts: &CompileOptions) -> Result<Arc<Compiled>> {
        let key = self.cache_key(src, opts);
        if let Some(hit) = self.memory.lock().expect("nvrtc cache poisoned").get(&key) {
            return Ok(hit.clone());
        }
        let compiled = match self.read_disk(&key, &opts.arch)? {
            Some(c) => c,
            None => {
                let c = compile_uncached(src, opts)?;
                self.write_disk(&key, &c)?;
                c
            }
        };
        let compiled = Arc::new(compiled);
        self.memory
            .lock()
            .expect("nvrtc cache poisoned")
            .insert(key, compiled.clone());
        Ok(compiled)
    }

    fn read_disk(&self, key: &str, arch: &str) -> Result<Option<Compiled>> {
        let Some(dir) = &self.cache_dir else {
            return Ok(None);
        };
        let cubin_path = dir.join(format!("{key}.cubin"));
        let cubin = match std::fs::read(&cubin_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(NvrtcError::Cache {
                    path: cubin_path,
                    err,
                })
            }
        };
        let log = std::fs::read_to_string(dir.join(format!("{key}.log"))).unwrap_or_default();
        Ok(Some(Compiled {
            cubin,
            log,
            arch: arch.to_owned(),
            compile_ms: 0.0,
            from_cache: true,
        }))
    }

    /// Writes log first and cubin last, each through a rename, so a reader that sees the cubin
    /// also sees a complete log and a concurrent writer never leaves a torn file.
    fn write_disk(&self, key: &str, c: &Compiled) -> Result<()> {
        let Some(dir) = &self.cache_dir else {
            return Ok(());
        };
        let put = |ext: &str, bytes: &[u8]| -> Result<()> {
            let path = dir.join(format!("{key}.{ext}"));
            let tmp = dir.join(format!("{key}.{ext}.tmp{}", std::process::id()));
            std::fs::write(&tmp, bytes)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|err| NvrtcError::Cache { path, err })
        };
        put("log", c.log.as_bytes())?;
        put("cubin", &c.cubin)
    }
}

/// Owns an nvrtcProgram so every exit path destroys it.
struct Program(sys::nvrtcProgram);
impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed exactly once.
        unsafe {
            sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn cstring(name: &str, what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| NvrtcError::InvalidArgument {
        name: name.to_owned(),
        what: format!("{what} contains a NUL byte"),
    })
}

/// One NVRTC compile, no cache. Callers must have succeeded in [`load_library`] first.
pub fn compile_uncached(src: &Source<'_>, opts: &CompileOptions) -> Result<Compiled> {
    load_library(None)?;
    let err = |call: &'static str, code: sys::nvrtcResult| NvrtcError::Api {
        call,
        name: src.name.to_owned(),
        arch: opts.arch.clone(),
        code,
    };
    let code = cstring(src.name, "source", src.code)?;
    let name = cstring(src.name, "name", src.name)?;
    let header_names: Vec<CString> = src
        .headers
        .iter()
        .map(|(n, _)| cstring(src.name, "header name", n))
        .collect::<Result<_>>()?;
    let header_codes: Vec<CString> = src
        .headers
        .iter()
        .map(|(_, c)| cstring(src.name, "header", c))
        .collect::<Result<_>>()?;
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let header_code_ptrs: Vec<*const c_char> = header_codes.iter().map(|c| c.as_ptr()).collect();
    let args: Vec<CString> = opts
        .to_args()
        .iter()
        .map(|a| cstring(src.name, "option", a))
        .collect::<Result<_>>()?;
    let arg_ptrs: Vec<*const c_char> = args.iter().map(|c| c.as_ptr()).collect();

    let start = Instant::now();
    let mut raw: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a NUL-terminated string that outlives the call; the header
    // arrays have `headers.len()` entries.
    let r = unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            code.as_ptr(),
            name.as_ptr(),
            header_codes.len() as i32,
            header_code_ptrs.as_ptr(),
            header_name_ptrs.as_ptr(),
        )
    };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(err("nvrtcCreateProgram", r));
    }
    let prog = Program(raw);
    // SAFETY: valid program; options as above.
    let compile_result =
        unsafe { sys::nvrtcCompileProgram(prog.0, arg_ptrs.len() as i32, arg_ptrs.as_ptr()) };
    let log = program_log(&prog).map_err(|c| err("nvrtcGetProgramLog", c))?;
    if compile_result != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(NvrtcError::Compile {
            name: src.name.to_owned(),
            arch: opts.arch.clone(),
            log,
        });
    }
    let mut size = 0usize;
    // SAFETY: valid, compiled program.
    let r = unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(err("nvrtcGetCUBINSize", r));
    }
    if size == 0 {
        return Err(NvrtcError::Compile {
            name: src.name.to_owned(),
            arch: opts.arch.clone(),
            log: format!(
                "no CUBIN produced (is `{}` a real sm_XX target?)\n{log}",
                opts.arch
            ),
        });
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer has the size NVRTC reported.
    let r = unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr() as *mut c_char) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(err("nvrtcGetCUBIN", r));
    }
    let compile_ms = start.elapsed().as_secs_f64() * 1e3;
    Ok(Compiled {
        cubin,
        log,
        arch: opts.arch.clone(),
        compile_ms,
        from_cache: false,
    })
}

fn program_log(prog: &Program) -> std::result::Result<String, sys::nvrtcResult> {
    let mut size = 0usize;
    // SAFETY: valid program.
    let r = unsafe { sys::nvrtcGetProgramLogSize(prog.0, &mut size) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(r);
    }
    if size <= 1 {
        return Ok(String::new());
    }
    let mut buf = vec![0u8; size];
    // SAFETY: the buffer has the size NVRTC reported, including the terminating NUL.
    let r = unsafe { sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr() as *mut c_char) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(r);
    }
    let s = CStr::from_bytes_until_nul(&buf).map(|c| c.to_string_lossy().into_owned());
    Ok(s.unwrap_or_else(|_| String::from_utf8_lossy(&buf).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nvrtc_folder_or_file_is_named() {
        // The preload is the only part that runs without libnvrtc; it must say what is missing
        // rather than repeat dlopen's bare "dlopen failed".
        let err = preload(Path::new("/no/such/nvrtc/lib")).unwrap_err();
        assert_eq!(err, "/no/such/nvrtc/lib: no such folder");
        let dir = std::env::temp_dir().join(format!("kstyle-nvrtc-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = preload(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.ends_with("libnvrtc-builtins.so.13.0: no such file"),
            "{err}"
        );
    }
}
