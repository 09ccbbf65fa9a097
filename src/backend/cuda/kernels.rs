//! The kernel sources embedded in the binary, one file per family, and a compile check that
//! builds every family for every target and reads registers and spills from ptxas's report.

use std::fmt;

use super::nvrtc::{CompileOptions, Compiler, NvrtcError, Source};

/// The one header every family includes as `#include "common.cuh"`.
pub const COMMON_CUH: &str = include_str!("../../../kernels/common.cuh");

/// Headers resolvable by `#include "name"` from any kernel file.
pub const HEADERS: &[(&str, &str)] = &[("common.cuh", COMMON_CUH)];

/// A kernel family: the stem shared by `kernels/<stem>.cu`, `backend/cuda/<stem>.rs` and
/// `backend/cpu/<stem>.rs`.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub stem: &'static str,
    pub code: &'static str,
}

impl Family {
    pub fn file_name(&self) -> String {
        format!("{}.cu", self.stem)
    }
}

macro_rules! family {
    ($stem:literal) => {
        Family {
            stem: $stem,
            code: include_str!(concat!("../../../kernels/", $stem, ".cu")),
        }
    };
}

pub const FAMILIES: &[Family] = &[
    family!("elementwise"),
    family!("reduce"),
    family!("norm"),
    family!("conv"),
    family!("attention"),
    family!("lora"),
    family!("pool"),
    family!("optim"),
];

/// The targets the project ships cubins for: Hopper (with its `a` features) and Ampere.
pub const DEFAULT_ARCHS: &[&str] = &["sm_90a", "sm_80"];

pub fn family(stem: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.stem == stem)
}

/// Compile one family for one target. The file name in diagnostics is `<stem>.cu`.
pub fn compile_family(
    compiler: &Compiler,
    fam: &Family,
    opts: &CompileOptions,
) -> Result<std::sync::Arc<super::nvrtc::Compiled>, NvrtcError> {
    let name = fam.file_name();
    let src = Source {
        name: &name,
        code: fam.code,
        headers: HEADERS,
    };
    compiler.compile(&src, opts)
}

/// ptxas's resource report for one kernel symbol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub symbol: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    pub smem_bytes: u32,
}

/// Parses `--ptxas-options=-v` output: "Compiling entry function 'X'" opens a record, the
/// "Function properties" / "Used N registers" lines that follow fill it.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let number_before = |line: &str, suffix: &str| -> Option<u32> {
        let end = line.find(suffix)?;
        line[..end]
            .trim_end()
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let symbol = rest.split('\'').next().unwrap_or_default().to_owned();
            out.push(KernelResources {
                symbol,
                ..Default::default()
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if let Some(n) = number_before(line, "bytes stack frame") {
            cur.stack_bytes = n;
        }
        if let Some(n) = number_before(line, "bytes spill stores") {
            cur.spill_stores = n;
        }
        if let Some(n) = number_before(line, "bytes spill loads") {
            cur.spill_loads = n;
        }
        if let Some(n) = number_before(line, "registers") {
            cur.registers = n;
        }
        if let Some(n) = number_before(line, "bytes smem") {
            cur.smem_bytes = n;
        }
    }
    out
}

/// One (family, target) compile.
#[derive(Debug)]
pub struct FileCheck {
    pub file: String,
    pub arch: String,
    pub result: Result<FileOk, String>,
}

#[derive(Debug)]
pub struct FileOk {
    pub compile_ms: f64,
    pub cubin_bytes: usize,
    pub kernels: Vec<KernelResources>,
    /// Warnings NVRTC printed (the ptxas -v lines removed).
    pub warnings: Vec<String>,
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub files: Vec<FileCheck>,
}

impl CheckReport {
    pub fn failures(&self) -> impl Iterator<Item = &FileCheck> {
        self.files.iter().filter(|f| f.result.is_err())
    }
    pub fn all_ok(&self) -> bool {
        self.failures().next().is_none()
    }
    /// Kernels that spill registers to local memory, as (file, arch, resources).
    pub fn spilling(&self) -> Vec<(&str, &str, &KernelResources)> {
        let mut v = Vec::new();
        for f in &self.files {
            if let Ok(ok) = &f.result {
                for k in ok
                    .kernels
                    .iter()
                    .filter(|k| k.spill_stores > 0 || k.spill_loads > 0)
                {
                    v.push((f.file.as_str(), f.arch.as_str(), k));
                }
            }
        }
        v
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for file in &self.files {
            match &file.result {
                Err(log) => writeln!(f, "{:<16} {:<7} FAILED\n{log}", file.file, file.arch)?,
                Ok(ok) => {
                    let max_regs = ok.kernels.iter().map(|k| k.registers).max().unwrap_or(0);
                    let spills = ok
                        .kernels
                        .iter()
                        .filter(|k| k.spill_stores + k.spill_loads > 0)
                        .count();
                    writeln!(
                        f,
                        "{:<16} {:<7} ok  {:>8.1} ms  {:>8} B cubin  {:>3} kernels  max {:>3} regs  {} spilling",
                        file.file,
                        file.arch,
                        ok.compile_ms,
                        ok.cubin_bytes,
                        ok.kernels.len(),
                        max_regs,
                        spills
                    )?;
                    for w in &ok.warnings {
                        writeln!(f, "    warning: {w}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

impl CheckReport {
    /// Per-kernel table: file, arch, symbol, registers, spill stores/loads, stack, static smem.
    pub fn kernel_table(&self) -> String {
        let mut s = String::new();
        for file in &self.files {
            if let Ok(ok) = &file.result {
                for k in &ok.kernels {
                    s += &format!(
                        "{:<16} {:<7} {:<48} {:>3} regs  spill {}/{}  stack {:>4}  smem {:>6}\n",
                        file.file,
                        file.arch,
                        k.symbol,
                        k.registers,
                        k.spill_stores,
                        k.spill_loads,
                        k.stack_bytes,
                        k.smem_bytes
                    );
                }
            }
        }
        s
    }
}

/// Compiles every family for every target in `archs` (uncached, so the timings are real) with
/// ptxas's verbose report. Library problems are an `Err`; compile failures are in the report.
pub fn check_all(archs: &[&str]) -> Result<CheckReport, NvrtcError> {
    check_all_filtered(archs, None)
}

/// [`check_all`] restricted to the family named `only` when given.
pub fn check_all_filtered(archs: &[&str], only: Option<&str>) -> Result<CheckReport, NvrtcError> {
    super::nvrtc::load_library(None)?;
    let mut report = CheckReport::default();
    for fam in FAMILIES.iter().filter(|f| only.is_none_or(|o| o == f.stem)) {
        for arch in archs {
            let opts = CompileOptions::new(*arch).verbose(true);
            let name = fam.file_name();
            let src = Source {
                name: &name,
                code: fam.code,
                headers: HEADERS,
            };
            let result = match super::nvrtc::compile_uncached(&src, &opts) {
                Ok(c) => Ok(FileOk {
                    compile_ms: c.compile_ms,
                    cubin_bytes: c.cubin.len(),
                    kernels: parse_ptxas_log(&c.log),
                    warnings: c
                        .log
                        .lines()
                        .filter(|l| !l.trim().is_empty() && !l.starts_with("ptxas"))
                        .map(str::to_owned)
                        .collect(),
                }),
                Err(NvrtcError::Compile { log, .. }) => Err(log),
                Err(e) => return Err(e),
            };
            report.files.push(FileCheck {
                file: name,
                arch: (*arch).to_owned(),
                result,
            });
        }
    }
    Ok(report)
}
