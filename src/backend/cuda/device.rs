//! One CUDA device: its context and single stream, a caching allocator that records peak bytes,
//! the cuBLAS handle, and the kernels compiled by NVRTC at first use (cached per family in memory
//! and on disk by `nvrtc::Compiler`).
//!
//! Everything runs on one stream per device, so stream order is the only synchronisation the
//! allocator needs: a buffer returned to the pool while a queued kernel still reads it can only be
//! handed to work queued *after* that kernel (PyTorch's caching-allocator argument).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result as dr, sys as ds, CudaContext, CudaStream};

use super::emu::{self, Emulator};
use super::kernels;
use super::nvrtc::{CompileOptions, Compiler};
use crate::tensor::DType;
use crate::{Error, Result};

/// Folder for compiled cubins: `$KSTYLE_CACHE_DIR/nvrtc`, else `.kstyle-cache/nvrtc`.
pub const CACHE_DIR_ENV: &str = "KSTYLE_CACHE_DIR";
/// When set to 1, every launch is followed by a stream synchronise so an asynchronous fault is
/// reported against the kernel that caused it (first runs, parity checks).
pub const SYNC_ENV: &str = "KSTYLE_CUDA_SYNC";

/// Whether the driver library can be loaded at all. cudarc's `CudaContext::new` panics when
/// libcuda.so is missing, so this runs first; it also covers cuBLAS, which every op needs.
pub fn probe() -> std::result::Result<(), String> {
    // SAFETY: each probe only dlopens candidate library names and closes them again.
    if !unsafe { ds::is_culib_present() } {
        return Err("libcuda.so (the NVIDIA driver) is not loadable on this machine".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("libcublas.so.13 is not on the library search path \
                    (add /usr/local/cuda/lib64 to LD_LIBRARY_PATH)"
            .into());
    }
    Ok(())
}

/// `CUfunction`/`CUmodule` are raw pointers owned by the context; they are used only while the
/// context lives (the device is never dropped once created) and the driver API is thread safe.
#[derive(Clone, Copy)]
struct Func(ds::CUfunction);
// SAFETY: see above.
unsafe impl Send for Func {}
struct Module(#[allow(dead_code)] ds::CUmodule);
// SAFETY: see above.
unsafe impl Send for Module {}

/// Cached free blocks by rounded size, and the byte counters.
#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<ds::CUdeviceptr>>,
    in_use: usize,
    peak: usize,
    reserved: usize,
    uploads: u64,
    uploaded: u64,
}

/// Memory statistics of one device (bytes).
#[derive(Clone, Copy, Debug, Default)]
pub struct MemStats {
    pub in_use: usize,
    pub peak: usize,
    /// Held from the driver, in use or cached.
    pub reserved: usize,
    /// Host-to-device copies since the device was created, and their bytes: each one also
    /// waits for the stream (see [`CudaDevice::upload`]), so a hot loop should make none.
    pub uploads: u64,
    pub uploaded: u64,
}

thread_local! {
    /// Host-to-device copies made by this thread, on any device, and their bytes.
    static THREAD_UPLOADS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Host-to-device copies the calling thread has made, on any device, and their bytes. Unlike
/// [`MemStats::uploads`] it does not count other threads' copies, so a check of one region of
/// code is not disturbed by work running beside it (parallel tests share the device).
pub fn thread_uploads() -> (u64, u64) {
    THREAD_UPLOADS.with(|c| c.get())
}

/// The driver's objects for a real GPU.
struct Driver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: cudarc::cublas::CudaBlas,
    /// None when libcublasLt is missing: linears with a bias then compose matmul and add.
    lt: Option<super::gemm_lt::Lt>,
    compiler: Compiler,
    modules: Mutex<HashMap<&'static str, Module>>,
    funcs: Mutex<HashMap<String, Func>>,
}

/// What executes the work: a GPU through the driver, or the host emulator (`emu.rs`).
enum Engine {
    Driver(Driver),
    Emulated(Emulator),
}

pub struct CudaDevice {
    ordinal: usize,
    engine: Engine,
    arch: String,
    name: String,
    sm_count: u32,
    sync_each: bool,
    pool: Mutex<Pool>,
    profile: super::profile::Profiler,
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();

/// The device with this ordinal, created on first use (context, stream, cuBLAS, NVRTC), or the
/// host emulator when `emu::enabled()`.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Arc::new(if emu::enabled() {
        CudaDevice::emulated(ordinal)?
    } else {
        CudaDevice::new(ordinal)?
    });
    map.insert(ordinal, d.clone());
    Ok(d)
}

fn unavailable(ordinal: usize, why: impl std::fmt::Display) -> Error {
    Error::DeviceUnavailable(format!("cuda:{ordinal}"), why.to_string())
}

fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".kstyle-cache"))
}

impl CudaDevice {
    fn emulated(ordinal: usize) -> Result<CudaDevice> {
        let emu = Emulator::new(&cache_dir())?;
        Ok(CudaDevice {
            ordinal,
            name: format!("host emulator ({})", emu.compiler()),
            engine: Engine::Emulated(emu),
            arch: "emulated".into(),
            // Small, so grid-stride kernels really loop.
            sm_count: 2,
            sync_each: false,
            pool: Mutex::new(Pool::default()),
            profile: Default::default(),
        })
    }

    fn new(ordinal: usize) -> Result<CudaDevice> {
        probe().map_err(|e| unavailable(ordinal, e))?;
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(ordinal, e))?;
        let stream = ctx.new_stream().map_err(|e| Error::cuda("new_stream", e))?;
        let blas = cudarc::cublas::CudaBlas::new(stream.clone())
            .map_err(|e| Error::cuda("cublas handle", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| Error::cuda("compute_capability", e))?;
        if major < 8 {
            return Err(unavailable(
                ordinal,
                format!("compute capability {major}.{minor}: the kernels need sm_80 or newer"),
            ));
        }
        // Hopper gets its `a` target (wgmma, setmaxnreg); everything else its plain SASS target.
        let arch = if (major, minor) == (9, 0) {
            "sm_90a".to_owned()
        } else {
            format!("sm_{major}{minor}")
        };
        let sm_count = ctx
            .attribute(ds::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::cuda("device attribute", e))? as u32;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let compiler = Compiler::new(Some(cache_dir().join("nvrtc")))?;
        Ok(CudaDevice {
            ordinal,
            engine: Engine::Driver(Driver {
                ctx,
                stream,
                blas,
                lt: super::gemm_lt::Lt::new(),
                compiler,
                modules: Mutex::new(HashMap::new()),
                funcs: Mutex::new(HashMap::new()),
            }),
            arch,
            name,
            sm_count,
            sync_each: std::env::var(SYNC_ENV).is_ok_and(|v| v == "1"),
            pool: Mutex::new(Pool::default()),
            profile: Default::default(),
        })
    }

    /// The emulator, when this device is one.
    pub(crate) fn emulator(&self) -> Option<&Emulator> {
        match &self.engine {
            Engine::Emulated(e) => Some(e),
            Engine::Driver(_) => None,
        }
    }

    pub fn is_emulated(&self) -> bool {
        self.emulator().is_some()
    }

    fn driver(&self) -> &Driver {
        match &self.engine {
            Engine::Driver(d) => d,
            Engine::Emulated(_) => unreachable!("driver call on the emulated device"),
        }
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn arch(&self) -> &str {
        &self.arch
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    pub(crate) fn cu_stream(&self) -> ds::CUstream {
        self.driver().stream.cu_stream()
    }
    pub(crate) fn lt(&self) -> Option<&super::gemm_lt::Lt> {
        self.driver().lt.as_ref()
    }
    pub(crate) fn blas_handle(&self) -> cudarc::cublas::sys::cublasHandle_t {
        *self.driver().blas.handle()
    }

    /// Starts recording device time per kernel and cuBLAS call (see `profile.rs`); false on the
    /// emulator, whose run times say nothing about a GPU.
    pub fn profile_start(&self) -> bool {
        if self.is_emulated() {
            return false;
        }
        self.profile.start();
        true
    }

    /// Ends the recording: device time per name, the largest first (empty if none was started).
    pub fn profile_stop(&self) -> Result<Vec<super::profile::KernelTime>> {
        if self.is_emulated() {
            return Ok(Vec::new());
        }
        self.bind()?;
        self.profile.stop()
    }

    /// Runs `work`, which queues device work on this device's stream, as one named span of the
    /// profile when one is recording.
    pub(crate) fn span<R>(
        &self,
        name: impl FnOnce() -> String,
        work: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        match &self.engine {
            Engine::Driver(d) => self.profile.span(&d.ctx, &d.stream, name, work),
            Engine::Emulated(_) => work(),
        }
    }

    /// Makes this device's context current on the calling thread (the driver API is per thread;
    /// test harnesses and rayon call in from many threads).
    pub fn bind(&self) -> Result<()> {
        let Engine::Driver(d) = &self.engine else {
            return Ok(());
        };
        d.ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("bind context", e))
    }

    /// Waits for everything queued on the device's stream.
    pub fn synchronize(&self) -> Result<()> {
        let Engine::Driver(d) = &self.engine else {
            return Ok(());
        };
        self.bind()?;
        d.stream
            .synchronize()
            .map_err(|e| Error::cuda("synchronize", e))
    }

    pub fn mem_stats(&self) -> MemStats {
        let p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        MemStats {
            in_use: p.in_use,
            peak: p.peak,
            reserved: p.reserved,
            uploads: p.uploads,
            uploaded: p.uploaded,
        }
    }

    /// Forgets the peak so a benchmark can measure one region.
    pub fn reset_peak(&self) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        p.peak = p.in_use;
    }

    // ---- allocator ----

    /// Small blocks round to 512 bytes, large ones to 2 MiB, so freed activations of nearby sizes
    /// are reused instead of each shape owning its own block.
    fn round(bytes: usize) -> usize {
        let b = bytes.max(1);
        if b < (1 << 20) {
            b.div_ceil(512) * 512
        } else {
            b.div_ceil(2 << 20) * (2 << 20)
        }
    }

    /// Uninitialised device memory for `len` elements of `dtype`.
    pub fn alloc(self: &Arc<Self>, dtype: DType, len: usize) -> Result<Buffer> {
        if let Some(emu) = self.emulator() {
            // Exact sizes, no caching: the guard bytes sit right after the last element.
            let bytes = (len * dtype.size_in_bytes()).max(1);
            let ptr = emu.alloc(bytes)?;
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            p.reserved += bytes;
            p.in_use += bytes;
            p.peak = p.peak.max(p.in_use);
            return Ok(Buffer {
                ptr,
                bytes,
                dev: self.clone(),
            });
        }
        let bytes = Self::round(len * dtype.size_in_bytes());
        let cached = {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            let hit = p.free.get_mut(&bytes).and_then(Vec::pop);
            if hit.is_some() {
                p.in_use += bytes;
                p.peak = p.peak.max(p.in_use);
            }
            hit
        };
        let ptr = match cached {
            Some(ptr) => ptr,
            None => {
                self.bind()?;
                // SAFETY: plain device allocation in the current context.
                let ptr = match unsafe { dr::malloc_sync(bytes) } {
                    Ok(p) => p,
                    Err(_) => {
                        // Out of memory with blocks cached: give them back and try once more.
                        self.empty_cache()?;
                        // SAFETY: as above.
                        unsafe { dr::malloc_sync(bytes) }.map_err(|e| {
                            Error::cuda(
                                format!("alloc {bytes} bytes"),
                                format!("{e} ({:?})", self.mem_stats()),
                            )
                        })?
                    }
                };
                let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
                p.reserved += bytes;
                p.in_use += bytes;
                p.peak = p.peak.max(p.in_use);
                ptr
            }
        };
        Ok(Buffer {
            ptr,
            bytes,
            dev: self.clone(),
        })
    }

    /// Device memory for `len` elements, every byte zero.
    pub fn alloc_zeroed(self: &Arc<Self>, dtype: DType, len: usize) -> Result<Buffer> {
        let b = self.alloc(dtype, len)?;
        if let Some(emu) = self.emulator() {
            emu.memset(b.ptr, 0, b.bytes)?;
            return Ok(b);
        }
        // SAFETY: the buffer holds at least `bytes` bytes; the memset is stream ordered.
        unsafe { dr::memset_d8_async(b.ptr, 0, b.bytes, self.cu_stream()) }
            .map_err(|e| Error::cuda("memset", e))?;
        Ok(b)
    }

    fn release(&self, ptr: ds::CUdeviceptr, bytes: usize) {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        p.in_use -= bytes;
        if let Some(emu) = self.emulator() {
            p.reserved -= bytes;
            emu.free(ptr);
            return;
        }
        p.free.entry(bytes).or_default().push(ptr);
    }

    /// Returns every cached block to the driver (after the stream has drained).
    pub fn empty_cache(&self) -> Result<()> {
        self.synchronize()?;
        let blocks: Vec<(usize, Vec<ds::CUdeviceptr>)> = {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            p.free.drain().collect()
        };
        for (bytes, ptrs) in blocks {
            for ptr in ptrs {
                // SAFETY: each pointer came from malloc_sync and is in no buffer any more.
                unsafe { dr::free_sync(ptr) }.map_err(|e| Error::cuda("free", e))?;
                let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
                p.reserved -= bytes;
            }
        }
        Ok(())
    }

    // ---- host transfers ----

    /// Uploads a host slice into fresh device memory (synchronises: the slice may be pageable).
    pub fn upload<T: Copy>(self: &Arc<Self>, dtype: DType, data: &[T]) -> Result<Buffer> {
        let b = self.alloc(dtype, data.len())?;
        let bytes = std::mem::size_of_val(data) as u64;
        {
            let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            p.uploads += 1;
            p.uploaded += bytes;
        }
        THREAD_UPLOADS.with(|c| {
            let (n, sum) = c.get();
            c.set((n + 1, sum + bytes));
        });
        if let Some(emu) = self.emulator() {
            emu.write(b.ptr, data)?;
            return Ok(b);
        }
        if !data.is_empty() {
            // SAFETY: the buffer is at least size_of_val(data) bytes; the copy completes before
            // the synchronise returns, so `data` outlives it.
            unsafe { dr::memcpy_htod_async(b.ptr, data, self.cu_stream()) }
                .map_err(|e| Error::cuda("upload", e))?;
        }
        self.synchronize()?;
        Ok(b)
    }

    /// Downloads `out.len()` elements starting at `ptr`.
    pub fn download<T: Copy>(&self, ptr: ds::CUdeviceptr, out: &mut [T]) -> Result<()> {
        if let Some(emu) = self.emulator() {
            return emu.read(ptr, out);
        }
        self.bind()?;
        if !out.is_empty() {
            // SAFETY: the caller passes a pointer into a live buffer holding out.len() elements.
            unsafe { dr::memcpy_dtoh_async(out, ptr, self.cu_stream()) }
                .map_err(|e| Error::cuda("download", e))?;
        }
        self.synchronize()
    }

    // ---- kernels ----

    /// The kernel `symbol` of family `stem`, compiling and loading the family on first use.
    fn func(&self, fam: &'static kernels::Family, symbol: &str) -> Result<Func> {
        let stem = fam.stem;
        let Driver {
            compiler,
            modules,
            funcs,
            ..
        } = self.driver();
        if let Some(f) = funcs.lock().unwrap_or_else(|e| e.into_inner()).get(symbol) {
            return Ok(*f);
        }
        self.bind()?;
        let module = {
            let mut modules = modules.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = modules.get(stem) {
                m.0
            } else {
                let compiled =
                    kernels::compile_family(compiler, fam, &CompileOptions::new(&self.arch))?;
                // SAFETY: a complete cubin for this device's architecture, produced by NVRTC.
                let m = unsafe { dr::module::load_data(compiled.cubin.as_ptr() as *const c_void) }
                    .map_err(|e| {
                        Error::cuda(format!("load module {stem}.cu ({})", self.arch), e)
                    })?;
                modules.insert(stem, Module(m));
                m
            }
        };
        let name = CString::new(symbol).map_err(|_| Error::msg("kernel name with NUL"))?;
        // SAFETY: the module is loaded and never unloaded.
        let f = unsafe { dr::module::get_function(module, name) }
            .map_err(|e| Error::cuda(format!("kernel {symbol} in {stem}.cu"), e))?;
        let f = Func(f);
        funcs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(symbol.to_owned(), f);
        Ok(f)
    }

    /// Starts a launch of `symbol` from `kernels/<stem>.cu`.
    pub fn launch(&self, stem: &'static str, symbol: String) -> Result<Launch<'_>> {
        let fam = kernels::family(stem)
            .ok_or_else(|| Error::msg(format!("no kernel family `{stem}`")))?;
        self.launch_in(fam, symbol)
    }

    /// Starts a launch of `symbol` from any family, including one that is not in `kernels/`
    /// (the emulator's own tests bring deliberately broken kernels).
    pub fn launch_in(&self, fam: &'static kernels::Family, symbol: String) -> Result<Launch<'_>> {
        let func = match &self.engine {
            Engine::Driver(_) => Target::Driver(self.func(fam, &symbol)?),
            Engine::Emulated(e) => Target::Emulated(e.kernel(fam, &symbol)?),
        };
        Ok(Launch {
            dev: self,
            func,
            symbol,
            values: Vec::new(),
            ptrs: Vec::new(),
            sizes: Vec::new(),
        })
    }

    /// Grid for a grid-stride kernel with 256 threads per block (docs/KERNELS.md): 16 resident
    /// blocks per SM are enough; more only adds scheduling cost.
    pub fn gs_grid(&self, n: usize) -> u32 {
        (n.div_ceil(256).max(1) as u64).min(self.sm_count as u64 * 16) as u32
    }
}

/// A kernel launch being assembled: arguments are boxed so their addresses stay fixed until
/// `cuLaunchKernel` has copied them.
pub struct Launch<'a> {
    dev: &'a CudaDevice,
    func: Target,
    symbol: String,
    values: Vec<Box<dyn std::any::Any>>,
    ptrs: Vec<*mut c_void>,
    /// Byte size of each argument (the emulator checks them against the kernel's parameters).
    sizes: Vec<u32>,
}

enum Target {
    Driver(Func),
    Emulated(emu::Kernel),
}

impl Launch<'_> {
    /// Appends one by-value kernel parameter; its Rust type must match the C parameter exactly
    /// (`u64` for pointers, `i64` for `long long`, `i32` for `int`, `f32` for `float`, and the
    /// `#[repr(C)]` mirrors for structs).
    pub fn arg<T: Copy + 'static>(mut self, v: T) -> Self {
        let b = Box::new(v);
        self.ptrs.push(&*b as *const T as *mut c_void);
        self.sizes.push(std::mem::size_of::<T>() as u32);
        self.values.push(b);
        self
    }

    pub fn run(mut self, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let func = match self.func {
            Target::Driver(f) => f,
            Target::Emulated(k) => {
                let emu = self
                    .dev
                    .emulator()
                    .expect("emulated kernel on an emulated device");
                return emu.launch(
                    &self.symbol,
                    k,
                    grid,
                    block,
                    smem,
                    (&self.ptrs, &self.sizes),
                );
            }
        };
        self.dev.bind()?;
        let (dev, symbol, ptrs) = (self.dev, &self.symbol, &mut self.ptrs);
        dev.span(
            || symbol.clone(),
            || {
                // SAFETY: the function handle is live, and every parameter pointer refers to a
                // boxed value of the exact C type (see `arg`), kept alive in `self.values`
                // during the call.
                unsafe { dr::launch_kernel(func.0, grid, block, smem, dev.cu_stream(), ptrs) }
                    .map_err(|e| Error::cuda(format!("launch {symbol}"), e))
            },
        )?;
        if self.dev.sync_each {
            self.dev
                .driver()
                .stream
                .synchronize()
                .map_err(|e| Error::cuda(format!("after {}", self.symbol), e))?;
        }
        Ok(())
    }

    /// Grid-stride launch over `n` elements (block 256).
    pub fn run_gs(self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let g = self.dev.gs_grid(n);
        self.run((g, 1, 1), (256, 1, 1), 0)
    }
}

/// One device allocation; dropping it returns the block to the device's pool.
pub struct Buffer {
    ptr: ds::CUdeviceptr,
    bytes: usize,
    dev: Arc<CudaDevice>,
}

impl Buffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.dev.release(self.ptr, self.bytes);
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Buffer({} bytes on cuda:{})",
            self.bytes, self.dev.ordinal
        )
    }
}
