//! `candle-cpu-bench`: kstyle's CPU backend and candle's CPU backend on the same shapes, in one
//! process, with the machine's ceilings measured in the same run.
//!
//! Every case first checks that the two outputs agree (relative L2 <= 1e-4, f32), so a fast wrong
//! kernel cannot win; then each library warms up and runs `RUNS` times, and the median counts.
//! CPU ops are synchronous in both libraries, so the clock is read right after each call returns.
//! Ceilings: a multi-threaded memcpy of 256 MiB (GB/s, bytes read + written) and, as the practical
//! FLOP/s ceiling, the faster of the two 1024^3 f32 matmuls (both libraries call the `gemm` crate).
//!
//! Usage: candle-cpu-bench [--quick]   (`--quick`: 3 runs per case, for a smoke test)

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core as cd;
use candle_nn::Module;
use kstyle::tensor::{ConvParams, Rng};

/// Largest relative L2 difference accepted between the two outputs (both compute in f32).
const MAX_REL_L2: f64 = 1e-4;

/// What a case's rate is measured against.
#[derive(Clone, Copy)]
enum Work {
    /// Floating-point operations: reported as GFLOP/s against the matmul ceiling.
    Flops(f64),
    /// Bytes each input read once and each output written once: GB/s against the memcpy ceiling.
    Bytes(f64),
}

struct Row {
    op: String,
    shape: String,
    ks_ms: f64,
    cd_ms: f64,
    work: Work,
    rel_l2: f64,
}

struct Bench {
    runs: usize,
    rng: Rng,
    rows: Vec<Row>,
}

/// Median milliseconds of `runs` calls after two warm-up calls.
fn median_ms<T, E: std::fmt::Debug>(runs: usize, mut f: impl FnMut() -> Result<T, E>) -> f64 {
    for _ in 0..2 {
        f().expect("warm-up call failed after the check passed");
    }
    let mut ms: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let out = f().expect("timed call failed after the check passed");
            let dt = t.elapsed().as_secs_f64() * 1e3;
            drop(out);
            dt
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[runs / 2]
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// One input, identical bits in both libraries.
struct Input {
    ks: kstyle::Tensor,
    cd: cd::Tensor,
}

impl Bench {
    fn input(&mut self, dims: &[usize]) -> Result<Input> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.normal() as f32).collect();
        Ok(Input {
            ks: kstyle::Tensor::from_vec(v.clone(), dims, kstyle::Device::Cpu)?,
            cd: cd::Tensor::from_vec(v, dims, &cd::Device::Cpu)?,
        })
    }

    /// Checks the two outputs agree, then times both.
    fn case(
        &mut self,
        op: &str,
        shape: &str,
        work: Work,
        ks: impl Fn() -> kstyle::Result<kstyle::Tensor>,
        cd: impl Fn() -> cd::Result<cd::Tensor>,
    ) -> Result<()> {
        let (a, b) = (ks()?, cd()?);
        if a.dims() != b.dims() {
            bail!("{op} {shape}: kstyle {:?} vs candle {:?}", a.dims(), b.dims());
        }
        let rel = rel_l2(&a.to_vec_f32()?, &b.flatten_all()?.to_vec1::<f32>()?);
        if !(rel <= MAX_REL_L2) {
            bail!("{op} {shape}: outputs differ, relative L2 {rel:.2e} > {MAX_REL_L2:.0e}");
        }
        drop((a, b));
        let ks_ms = median_ms(self.runs, ks);
        let cd_ms = median_ms(self.runs, cd);
        eprintln!("  {op:<22} {shape:<26} kstyle {ks_ms:9.2} ms  candle {cd_ms:9.2} ms");
        self.rows.push(Row {
            op: op.into(),
            shape: shape.into(),
            ks_ms,
            cd_ms,
            work,
            rel_l2: rel,
        });
        Ok(())
    }
}

/// Multi-threaded copy of 256 MiB on rayon's pool: bytes/s counting bytes read + written.
fn memcpy_ceiling(runs: usize) -> f64 {
    use rayon::prelude::*;
    let n = 1 << 26; // f32 elements
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let chunk = n / (4 * rayon::current_num_threads()).max(1);
    let ms = median_ms(runs, || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok::<_, ()>(())
    });
    assert_eq!(dst[n - 1], (n - 1) as f32);
    2.0 * 4.0 * n as f64 / (ms * 1e-3)
}

fn rate(work: Work, ms: f64) -> String {
    match work {
        Work::Flops(f) => format!("{:.1} GFLOP/s", f / (ms * 1e-3) / 1e9),
        Work::Bytes(b) => format!("{:.2} GB/s", b / (ms * 1e-3) / 1e9),
    }
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut b = Bench {
        runs: if quick { 3 } else { 9 },
        rng: Rng::new(20261127),
        rows: Vec::new(),
    };
    let threads = rayon::current_num_threads();
    let cd_threads = cd::utils::get_num_threads();
    eprintln!("threads: kstyle (rayon pool) {threads}, candle (gemm + rayon) {cd_threads}");
    let bw = memcpy_ceiling(b.runs);
    let f4 = 4.0; // bytes per f32

    // ---- matmul ----
    let (x, w) = (b.input(&[1024, 1024])?, b.input(&[1024, 1024])?);
    b.case(
        "matmul f32",
        "1024x1024 @ 1024x1024",
        Work::Flops(2.0 * 1024f64.powi(3)),
        || x.ks.matmul(&w.ks),
        || x.cd.matmul(&w.cd),
    )?;
    let (q, k) = (b.input(&[32, 256, 64])?, b.input(&[32, 64, 256])?);
    b.case(
        "batched matmul f32",
        "(32,256,64) @ (32,64,256)",
        Work::Flops(2.0 * 32.0 * 256.0 * 64.0 * 256.0),
        || q.ks.matmul(&k.ks),
        || q.cd.matmul(&k.cd),
    )?;

    // ---- conv2d 320 -> 320, 3x3, pad 1, with bias ----
    let (x, w, bias) = (
        b.input(&[1, 320, 64, 64])?,
        b.input(&[320, 320, 3, 3])?,
        b.input(&[320])?,
    );
    let cd_bias = bias.cd.reshape((1, 320, 1, 1))?;
    let p = ConvParams {
        stride: 1,
        padding: 1,
    };
    b.case(
        "conv2d 3x3 pad1 f32",
        "(1,320,64,64) -> 320",
        Work::Flops(2.0 * 320.0 * 320.0 * 9.0 * 64.0 * 64.0),
        || x.ks.conv2d(&w.ks, Some(&bias.ks), p),
        || x.cd.conv2d(&w.cd, 1, 1, 1, 1)?.broadcast_add(&cd_bias),
    )?;
    drop((x, w, bias, cd_bias));

    // ---- softmax over the last dim ----
    let x = b.input(&[8, 4096, 1024])?;
    b.case(
        "softmax last dim f32",
        "(8,4096,1024)",
        Work::Bytes(2.0 * f4 * (8 * 4096 * 1024) as f64),
        || x.ks.softmax(2),
        || candle_nn::ops::softmax_last_dim(&x.cd),
    )?;
    drop(x);

    // ---- group norm: candle-nn's GroupNorm module, kstyle's fused op ----
    let (x, w, bias) = (
        b.input(&[1, 320, 64, 64])?,
        b.input(&[320])?,
        b.input(&[320])?,
    );
    let gn = candle_nn::GroupNorm::new(w.cd.clone(), bias.cd.clone(), 320, 32, 1e-5)?;
    b.case(
        "group norm f32",
        "(1,320,64,64) 32 groups",
        Work::Bytes(2.0 * f4 * (320 * 64 * 64) as f64),
        || x.ks.group_norm(32, Some(&w.ks), Some(&bias.ks), 1e-5),
        || gn.forward(&x.cd),
    )?;

    // ---- layer norm over the last dim: candle-nn's fused op ----
    let (x, w, bias) = (
        b.input(&[4096, 1280])?,
        b.input(&[1280])?,
        b.input(&[1280])?,
    );
    b.case(
        "layer norm f32",
        "(4096,1280)",
        Work::Bytes(2.0 * f4 * (4096 * 1280) as f64),
        || x.ks.layer_norm(Some(&w.ks), Some(&bias.ks), 1e-5),
        || candle_nn::ops::layer_norm(&x.cd, &w.cd, &bias.cd, 1e-5),
    )?;

    // ---- elementwise on 16M ----
    let n = 1 << 24;
    let x = b.input(&[n])?;
    let ew = Work::Bytes(2.0 * f4 * n as f64);
    b.case("silu f32", "16M", ew, || x.ks.silu(), || x.cd.silu())?;
    b.case(
        "gelu (erf) f32",
        "16M",
        ew,
        || x.ks.gelu(),
        || x.cd.gelu_erf(),
    )?;
    b.case(
        "gelu (tanh) f32",
        "16M",
        ew,
        || x.ks.gelu_tanh(),
        || x.cd.gelu(),
    )?;
    drop(x);

    // ---- attention: kstyle's fused CPU sdpa vs candle's matmul + softmax + matmul ----
    let shape = [1, 10, 1024, 64];
    let (q, k, v) = (b.input(&shape)?, b.input(&shape)?, b.input(&shape)?);
    let scale = 0.125;
    b.case(
        "sdpa f32",
        "(1,10,1024,64) self",
        Work::Flops(4.0 * 10.0 * 1024.0 * 1024.0 * 64.0),
        || kstyle::Tensor::sdpa(&q.ks, &k.ks, &v.ks, scale, false),
        || {
            let s = (q.cd.matmul(&k.cd.t()?)? * scale)?;
            candle_nn::ops::softmax_last_dim(&s)?.matmul(&v.cd)
        },
    )?;

    // The faster 1024^3 matmul is the practical FLOP/s ceiling of this machine.
    let mm = &b.rows[0];
    let flops = 2.0 * 1024f64.powi(3) / (mm.ks_ms.min(mm.cd_ms) * 1e-3);
    println!(
        "threads: kstyle {threads} (rayon), candle {cd_threads}; median of {} runs after 2 warm-ups",
        b.runs
    );
    println!(
        "ceilings (same run): memcpy {:.2} GB/s (256 MiB, read + write, rayon); \
         matmul {:.1} GFLOP/s (faster of the two 1024^3 f32 rows)",
        bw / 1e9,
        flops / 1e9
    );
    println!();
    println!(
        "| op | shape | kstyle ms | candle ms | candle/kstyle | kstyle rate | candle rate | ceiling | rel L2 |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &b.rows {
        let ceiling = match r.work {
            Work::Flops(_) => format!("{:.1} GFLOP/s", flops / 1e9),
            Work::Bytes(_) => format!("{:.2} GB/s", bw / 1e9),
        };
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {:.1e} |",
            r.op,
            r.shape,
            r.ks_ms,
            r.cd_ms,
            r.cd_ms / r.ks_ms,
            rate(r.work, r.ks_ms),
            rate(r.work, r.cd_ms),
            ceiling,
            r.rel_l2
        );
    }
    let wins = b.rows.iter().filter(|r| r.cd_ms > r.ks_ms).count();
    println!();
    println!(
        "kstyle faster on {wins} of {} rows (candle/kstyle > 1)",
        b.rows.len()
    );
    std::io::Write::flush(&mut std::io::stdout()).context("stdout")?;
    Ok(())
}
