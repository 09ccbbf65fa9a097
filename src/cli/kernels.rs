//! `kstyle kernels --check [--arch sm_90a,sm_80] [--only FAMILY] [--table]`: compile every CUDA
//! kernel to a cubin with NVRTC (ptxas included). Needs no GPU, only libnvrtc.

use kstyle::backend::cuda::{kernels, nvrtc};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Compile every kernel family and report registers, spills and errors.
    #[arg(long)]
    pub check: bool,
    /// Targets, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "sm_90a,sm_80")]
    pub arch: Vec<String>,
    /// Only this family (a file stem of kernels/).
    #[arg(long)]
    pub only: Option<String>,
    /// Also print the per-kernel resource table.
    #[arg(long)]
    pub table: bool,
    /// Compile every family for `--arch` into the run-time cubin cache (`$KSTYLE_CACHE_DIR`, else
    /// `.kstyle-cache`), with exactly the options the CUDA backend uses, so a GPU session that
    /// carries the cache loads modules instead of compiling them.
    #[arg(long)]
    pub warm_cache: bool,
}

/// `$KSTYLE_NVRTC_DIR`, else the project-local install of scripts/install-nvrtc.sh.
fn nvrtc_dir() -> Option<PathBuf> {
    std::env::var_os(nvrtc::NVRTC_DIR_ENV)
        .map(PathBuf::from)
        .or_else(|| {
            let local = PathBuf::from(".nvrtc/nvidia/cu13/lib");
            local.join("libnvrtc.so.13").exists().then_some(local)
        })
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if a.warm_cache {
        nvrtc::load_library(nvrtc_dir().as_deref())?;
        let dir = std::env::var_os(kstyle::backend::cuda::device::CACHE_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".kstyle-cache"))
            .join("nvrtc");
        let compiler = nvrtc::Compiler::new(Some(dir.clone()))?;
        for arch in &a.arch {
            for fam in kernels::FAMILIES {
                let c = kernels::compile_family(&compiler, fam, &nvrtc::CompileOptions::new(arch))?;
                println!(
                    "{:<16} {arch:<7} {}",
                    fam.file_name(),
                    if c.from_cache { "cached" } else { "compiled" }
                );
            }
        }
        println!("cache: {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    if !a.check {
        println!(
            "kernel families: {}",
            kernels::FAMILIES
                .iter()
                .map(|f| f.stem)
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("use --check to compile them with NVRTC");
        return Ok(ExitCode::SUCCESS);
    }
    let (major, minor) = nvrtc::load_library(nvrtc_dir().as_deref()).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nInstall NVRTC with scripts/install-nvrtc.sh (or set {})",
            nvrtc::NVRTC_DIR_ENV
        )
    })?;
    println!("NVRTC {major}.{minor}");
    if let Some(only) = &a.only {
        if kernels::family(only).is_none() {
            anyhow::bail!("no kernel family `{only}`");
        }
    }
    let archs: Vec<&str> = a.arch.iter().map(|s| s.as_str()).collect();
    let report = kernels::check_all_filtered(&archs, a.only.as_deref())?;
    print!("{report}");
    if a.table {
        print!("{}", report.kernel_table());
    }
    let failed = report.files.iter().filter(|f| f.result.is_err()).count();
    println!("{} passed, {} failed", report.files.len() - failed, failed);
    Ok(if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
