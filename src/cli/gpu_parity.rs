//! `kstyle gpu-parity [--filter NAME] [--seed N]`: every CUDA op against the CPU oracle (the
//! cases of `kstyle::verify::cuda_parity`, the same as `tests/cuda_parity.rs`), for the GPU
//! machine where no test binary can be built. Exit 0 only when every check ran and passed;
//! exit 2 when there is no usable device (reported as SKIPPED, never as a pass).

use kstyle::verify::cuda_parity;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only cases whose family or name contains this.
    #[arg(long)]
    pub filter: Option<String>,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub ordinal: usize,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if let Err(why) = cuda_parity::available(a.ordinal) {
        eprintln!("SKIPPED gpu-parity: no usable CUDA device: {why}");
        return Ok(ExitCode::from(2));
    }
    let dev = kstyle::backend::cuda::device(a.ordinal)?;
    println!(
        "device: {} ({}, {} SMs)",
        dev.name(),
        dev.arch(),
        dev.sm_count()
    );
    let start = std::time::Instant::now();
    let rows = cuda_parity::run(a.ordinal, a.filter.as_deref(), a.seed)?;
    println!(
        "{:<60} {:<5} {:>11} {:>11}  result",
        "case", "dtype", "error", "limit"
    );
    for r in &rows {
        println!(
            "{:<60} {:<5} {:>11.3e} {:>11.3e}  {}",
            r.case,
            r.dtype,
            r.error,
            r.limit,
            if r.passed { "PASS" } else { "FAIL" }
        );
    }
    let failed = rows.iter().filter(|r| !r.passed).count();
    let stats = dev.mem_stats();
    println!(
        "{} passed, {} failed in {:.1} s; peak device memory {:.1} MiB",
        rows.len() - failed,
        failed,
        start.elapsed().as_secs_f64(),
        stats.peak as f64 / (1 << 20) as f64
    );
    Ok(if failed == 0 && !rows.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
