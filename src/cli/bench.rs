//! `kstyle bench [--quick] [--json FILE]`: CUDA timings with the roofline next to every number.
//!
//! Each case warms up (NVRTC compiles, cuBLAS picks kernels, the allocator fills), then times
//! `iters` runs between two stream synchronisations, five times, and reports the median. The
//! ceilings are measured in the same run: a device-to-device copy (GB/s, bytes read + written)
//! and a bf16 8192^3 cuBLAS GEMM (TFLOP/s). "floor" is the larger of bytes / copy ceiling and
//! flops / GEMM ceiling; "of roof" is floor / measured time. Baselines (the plain composition)
//! run on the same shapes in the same process; PyTorch's run in scripts/bench_torch.py.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use kstyle::backend::cpu::attention::AttnGeom;
use kstyle::backend::cuda::attention::{sdpa_bwd_with, sdpa_with, AttnKernel, Saved};
use kstyle::backend::cuda::{self, CudaStorage};
use kstyle::backend::ops;
use kstyle::tensor::Rng;
use kstyle::{DType, Device, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Smaller shapes and fewer repetitions.
    #[arg(long)]
    pub quick: bool,
    /// Tiny shapes, one repetition: checks that every case runs end to end (CI runs it on the
    /// host emulator); the numbers mean nothing.
    #[arg(long, conflicts_with = "quick")]
    pub smoke: bool,
    /// Also write one JSON object per result to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Time the whole SDXL UNet (random weights, bf16): inference at 1024 px and LoRA training
    /// micro-batches, with peak memory, instead of the kernels.
    #[arg(long)]
    pub model: bool,
    /// With --model: after each case's timed runs, one more run records device time per kernel
    /// and cuBLAS call (CUDA events around each launch) and prints the largest.
    #[arg(long, requires = "model")]
    pub profile: bool,
}

mod lora;
mod model;

struct Bench {
    dev: std::sync::Arc<cuda::CudaDevice>,
    iters: usize,
    /// Measured ceilings: bytes/s and flop/s.
    bw: f64,
    flops: f64,
    rows: Vec<String>,
    json: Vec<String>,
    /// `--profile`: a recorded run after each whole-model case.
    profile: bool,
}

impl Bench {
    /// Median seconds per call of `f`.
    fn time(&self, mut f: impl FnMut() -> kstyle::Result<()>) -> anyhow::Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        self.dev.synchronize()?;
        let mut samples = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..self.iters {
                f()?;
            }
            self.dev.synchronize()?;
            samples.push(t.elapsed().as_secs_f64() / self.iters as f64);
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[2])
    }

    /// Records one result: `bytes` moved at least once and `flops` performed.
    fn report(&mut self, name: &str, secs: f64, bytes: f64, flops: f64) {
        self.report_peak(name, secs, bytes, flops, None);
    }

    /// [`Bench::report`], with the peak bytes in use while the case ran where measured.
    fn report_peak(&mut self, name: &str, secs: f64, bytes: f64, flops: f64, peak: Option<usize>) {
        let floor = (bytes / self.bw).max(flops / self.flops);
        let mut row = format!(
            "{name:<46} {:>9.3} ms  {:>8.1} GB/s  {:>7.1} TFLOP/s  floor {:>8.3} ms  {:>5.1}% of roof",
            secs * 1e3,
            bytes / secs / 1e9,
            flops / secs / 1e12,
            floor * 1e3,
            100.0 * floor / secs
        );
        let mut json = format!(
            "{{\"name\":\"{name}\",\"ms\":{:.6},\"gbps\":{:.3},\"tflops\":{:.3},\"floor_ms\":{:.6}",
            secs * 1e3,
            bytes / secs / 1e9,
            flops / secs / 1e12,
            floor * 1e3
        );
        if let Some(p) = peak {
            row.push_str(&format!("  peak {:.2} GiB", p as f64 / (1u64 << 30) as f64));
            json.push_str(&format!(",\"peak_mib\":{:.1}", p as f64 / 1048576.0));
        }
        json.push('}');
        println!("{row}");
        self.rows.push(row);
        self.json.push(json);
    }
}

fn cuda_of(
    t: &Tensor,
) -> anyhow::Result<(
    std::sync::RwLockReadGuard<'_, kstyle::backend::Storage>,
    kstyle::tensor::Layout,
)> {
    Ok((t.storage(), t.layout().clone()))
}

fn cs(s: &kstyle::backend::Storage) -> &CudaStorage {
    match s {
        kstyle::backend::Storage::Cuda(c) => c,
        kstyle::backend::Storage::Cpu(_) => unreachable!("bench tensors live on the GPU"),
    }
}

/// One of three sizes per case: full, `--quick`, `--smoke`.
#[derive(Clone, Copy)]
struct Size {
    quick: bool,
    smoke: bool,
}

impl Size {
    fn pick<T>(self, full: T, quick: T, smoke: T) -> T {
        if self.smoke {
            smoke
        } else if self.quick {
            quick
        } else {
            full
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let size = Size {
        quick: a.quick,
        smoke: a.smoke,
    };
    if let Err(why) = cuda::probe().or_else(|e| if cuda::emu::enabled() { Ok(()) } else { Err(e) })
    {
        eprintln!("SKIPPED bench: {why}");
        return Ok(ExitCode::from(2));
    }
    let dev = cuda::device(0)?;
    let gpu = Device::Cuda(0);
    let mut rng = Rng::new(7);
    let mut b = Bench {
        dev: dev.clone(),
        iters: size.pick(20, 3, 1),
        bw: 1.0,
        flops: 1.0,
        rows: Vec::new(),
        json: Vec::new(),
        profile: a.profile,
    };
    println!(
        "device: {} ({}, {} SMs)",
        dev.name(),
        dev.arch(),
        dev.sm_count()
    );

    // ---- ceilings ----
    let n_copy = size.pick(1 << 29, 1 << 26, 1 << 12); // bf16 elements: 1 GiB / 128 MiB
                                                       // Filled on the device: a host-side constructor would build the 1 GiB buffer in f64 first.
    let src = cuda::elementwise::fill(&dev, DType::BF16, n_copy, 1.5)?;
    let flat = kstyle::tensor::Layout::contiguous(n_copy);
    let t_copy = b.time(|| cuda::elementwise::copy_strided(&src, &flat).map(|_| ()))?;
    b.bw = 2.0 * 2.0 * n_copy as f64 / t_copy;
    let g = size.pick(8192, 2048, 32);
    let x = Tensor::randn((g, g), &mut rng, DType::BF16, gpu)?;
    let t_gemm = b.time(|| x.matmul(&x).map(|_| ()))?;
    b.flops = 2.0 * (g as f64).powi(3) / t_gemm;
    println!(
        "ceilings: copy {:.0} GB/s (bf16 {} MiB, read + write), gemm {:.0} TFLOP/s (bf16 {g}^3)",
        b.bw / 1e9,
        (2 * n_copy) >> 20,
        b.flops / 1e12
    );
    if a.model {
        model::run(&mut b, size)?;
        return finish(&b, a.json.as_deref());
    }

    // ---- GEMM ----
    let shapes: &[(usize, usize, usize, DType)] = size.pick(
        &[
            (4096, 4096, 4096, DType::BF16),
            (8192, 640, 640, DType::BF16),
            (8192, 5120, 1280, DType::BF16),
            (2048, 2048, 2048, DType::F32),
        ],
        &[
            (1024, 1024, 1024, DType::BF16),
            (1024, 1024, 1024, DType::F32),
        ],
        &[(40, 24, 16, DType::BF16)],
    );
    for &(m, k, n, dt) in shapes {
        let x = Tensor::randn((m, k), &mut rng, dt, gpu)?;
        let w = Tensor::randn((n, k), &mut rng, dt, gpu)?;
        let wt = w.t()?;
        let s = b.time(|| x.matmul(&wt).map(|_| ()))?;
        let es = dt.size_in_bytes() as f64;
        b.report(
            &format!("gemm {m}x{k}x{n} {dt} (x W^T)"),
            s,
            es * (m * k + k * n + m * n) as f64,
            2.0 * (m * k * n) as f64,
        );
    }

    // ---- linear with bias: cuBLASLt's epilogue vs GEMM then a broadcast add ----
    let lins: &[(usize, usize, usize)] = size.pick(
        &[
            (8192, 640, 640),
            (8192, 1280, 5120),
            (8192, 5120, 1280),
            (154, 2048, 640),
        ],
        &[(2048, 640, 640)],
        &[(40, 24, 16)],
    );
    for &(m, k, n) in lins {
        let dt = DType::BF16;
        let x = Tensor::randn((m, k), &mut rng, dt, gpu)?;
        let w = Tensor::randn((n, k), &mut rng, dt, gpu)?;
        let bias = Tensor::randn(n, &mut rng, dt, gpu)?;
        let es = dt.size_in_bytes() as f64;
        let bytes = es * (m * k + k * n + m * n + n) as f64;
        let flops = 2.0 * (m * k * n) as f64;
        let s = b.time(|| x.linear(&w, Some(&bias)).map(|_| ()))?;
        b.report(
            &format!("linear+bias epilogue {m}x{k}->{n} {dt}"),
            s,
            bytes,
            flops,
        );
        // --weight-dtype: the same call on a float8 weight widens it first (read 1 B, write
        // 2 B per weight), then runs the GEMM above; the ratio is the price of half the memory.
        let w8 = w.to_dtype(DType::F8E4M3)?;
        let s8 = b.time(|| x.linear(&w8, Some(&bias)).map(|_| ()))?;
        b.report(
            &format!("linear+bias f8e4m3 W {m}x{k}->{n} ({:.2}x bf16 W)", s8 / s),
            s8,
            // At least once: the weight at one byte.
            bytes - ((k * n) as f64) * (es - 1.0),
            flops,
        );
        let sw = b.time(|| w8.to_dtype(dt).map(|_| ()))?;
        b.report(
            &format!("widen f8e4m3 -> bf16 {n}x{k}"),
            sw,
            3.0 * (k * n) as f64,
            0.0,
        );
        let wt = w.t()?;
        let s = b.time(|| x.matmul(&wt)?.add(&bias).map(|_| ()))?;
        b.report(
            &format!("linear then add {m}x{k}->{n} {dt}"),
            s,
            bytes,
            flops,
        );
    }

    // ---- optimizer step: flat buffers vs one AdamW launch per tensor ----
    let (tensors, each) = size.pick((3522, 4096), (500, 4096), (20, 300));
    let params: Vec<(String, Tensor)> = (0..tensors)
        .map(|i| {
            Ok((
                format!("p{i}"),
                Tensor::randn(each, &mut rng, DType::F32, gpu)?,
            ))
        })
        .collect::<kstyle::Result<_>>()?;
    let total = tensors * each;
    let mut opt = kstyle::train::optim::Optimizer::new(Default::default(), &params)?;
    let grad = Tensor::randn(total, &mut rng, DType::F32, gpu)?;
    // p, g, m, v read; p, m, v written; then the master copied into the tensors.
    let opt_bytes = 4.0 * (7 + 2) as f64 * total as f64;
    let s = b.time(|| opt.step(&params, &grad, 0.5, 1e-4))?;
    b.report(
        &format!("adamw step flat {tensors} tensors {total} f32"),
        s,
        opt_bytes,
        0.0,
    );
    // LoRA+'s pattern: every other tensor at another rate, so no two neighbours share a run:
    // one launch over a piece table (uploaded each step) instead of one grid-stride launch.
    let rates: Vec<f64> = (0..tensors).map(|i| [1e-4, 1.6e-3][i % 2]).collect();
    let s_rates = b.time(|| opt.step_rates(&params, &grad, 0.5, &rates))?;
    b.report(
        &format!(
            "adamw step interleaved rates {tensors} tensors ({:.2}x one rate)",
            s_rates / s
        ),
        s_rates,
        opt_bytes,
        0.0,
    );
    // Prodigy: two passes around a host decision (its sums read back): p, p0, g, m, v, s read
    // and m, v, s written, then p, m, v read and p written, then the copy into the tensors.
    let mut prodigy = kstyle::train::optim::Optimizer::new(Default::default(), &params)?
        .with_prodigy(Default::default())?;
    let s_prodigy = b.time(|| prodigy.step(&params, &grad, 0.5, 1.0))?;
    b.report(
        &format!(
            "prodigy step {tensors} tensors ({:.2}x adamw)",
            s_prodigy / s
        ),
        s_prodigy,
        4.0 * (9 + 4 + 2) as f64 * total as f64,
        0.0,
    );
    // Lion: p, g, m read, p and m written, then the copy into the tensors: a third fewer bytes
    // than AdamW's sweep, no second moment held.
    let mut lion = kstyle::train::optim::Optimizer::new(Default::default(), &params)?
        .with_lion(Default::default())?;
    let s_lion = b.time(|| lion.step(&params, &grad, 0.5, 1e-5))?;
    b.report(
        &format!("lion step {tensors} tensors ({:.2}x adamw)", s_lion / s),
        s_lion,
        4.0 * (5 + 2) as f64 * total as f64,
        0.0,
    );
    // AdamW8bit: p and g read, both codes read and written, p written, then the copy into the
    // tensors (the absmax, 8 bytes a block of 256, aside): 24 bytes an element against AdamW's
    // 36, and 2 bytes of state instead of 8. At the default sizes every tensor is quantized.
    let mut eight = kstyle::train::optim::Optimizer::new(Default::default(), &params)?
        .with_8bit(Default::default(), true)?;
    let s_eight = b.time(|| eight.step(&params, &grad, 0.5, 1e-4))?;
    b.report(
        &format!(
            "adamw8bit step {tensors} tensors ({:.2}x adamw)",
            s_eight / s
        ),
        s_eight,
        (16 + 8) as f64 * total as f64,
        0.0,
    );
    // Lion8bit: p and g read, one code read and written, p written, then the copy: 22 bytes an
    // element, 1 byte of state.
    let mut lion8 = kstyle::train::optim::Optimizer::new(Default::default(), &params)?
        .with_8bit(Default::default(), false)?;
    let s_lion8 = b.time(|| lion8.step(&params, &grad, 0.5, 1e-5))?;
    b.report(
        &format!(
            "lion8bit step {tensors} tensors ({:.2}x adamw)",
            s_lion8 / s
        ),
        s_lion8,
        (14 + 8) as f64 * total as f64,
        0.0,
    );
    // Adafactor, every tensor a (4, each / 4) matrix (a rank-4 lora_down): the gradient read
    // three times (the row and column means, RMS of the update, the step), p twice and written
    // once, the row and column means (each / 4 + 5 values a tensor) aside, then the copy into
    // the tensors. One block a tensor, its reductions inside the block.
    let shapes: Vec<Vec<usize>> = (0..tensors).map(|_| vec![4, each / 4]).collect();
    let mut ada = kstyle::train::optim::Optimizer::new(Default::default(), &params)?
        .with_adafactor(
            kstyle::train::adafactor::AdafactorConfig {
                relative_step: false,
                ..Default::default()
            },
            &shapes,
        )?;
    let s_ada = b.time(|| ada.step(&params, &grad, 0.5, 1e-4))?;
    b.report(
        &format!("adafactor step {tensors} tensors ({:.2}x adamw)", s_ada / s),
        s_ada,
        4.0 * (3 + 2 + 1 + 2) as f64 * total as f64,
        0.0,
    );
    let per: Vec<[Tensor; 4]> = (0..tensors)
        .map(|_| {
            Ok([
                Tensor::randn(each, &mut rng, DType::F32, gpu)?,
                Tensor::randn(each, &mut rng, DType::F32, gpu)?,
                Tensor::zeros(each, DType::F32, gpu)?,
                Tensor::zeros(each, DType::F32, gpu)?,
            ])
        })
        .collect::<kstyle::Result<_>>()?;
    let hyper = kstyle::backend::cpu::optim::AdamW::default();
    let s = b.time(|| {
        for [p, g, m, v] in &per {
            let (mut ps, mut ms, mut vs) = (p.storage_mut(), m.storage_mut(), v.storage_mut());
            let state = kstyle::backend::cpu::optim::State {
                p: &mut *ps,
                m: &mut *ms,
                v: &mut *vs,
            };
            ops::adamw_step(&hyper, 1, state, &g.storage(), 0.5)?;
        }
        Ok(())
    })?;
    b.report(
        &format!("adamw per-tensor launches {tensors} tensors {total} f32"),
        s,
        4.0 * 7.0 * total as f64,
        0.0,
    );

    // ---- attention: flash vs the composition, bf16 ----
    let seqs: &[(usize, usize, usize)] = size.pick(
        &[(20, 4096, 4096), (20, 4096, 77), (40, 1024, 1024)],
        &[(8, 1024, 1024)],
        &[(2, 40, 77)],
    );
    for &(bh, sq, skv) in seqs {
        let d = 64;
        let geom = AttnGeom {
            bh,
            sq,
            skv,
            d,
            dv: d,
            scale: 0.125,
            causal: false,
        };
        let q = Tensor::randn((bh, sq, d), &mut rng, DType::BF16, gpu)?;
        let k = Tensor::randn((bh, skv, d), &mut rng, DType::BF16, gpu)?;
        let v = Tensor::randn((bh, skv, d), &mut rng, DType::BF16, gpu)?;
        let o = Tensor::randn((bh, sq, d), &mut rng, DType::BF16, gpu)?;
        let (qs, ks, vs, os) = (cuda_of(&q)?, cuda_of(&k)?, cuda_of(&v)?, cuda_of(&o)?);
        let (qa, ka, va, oa) = (
            (cs(&qs.0), &qs.1),
            (cs(&ks.0), &ks.1),
            (cs(&vs.0), &vs.1),
            (cs(&os.0), &os.1),
        );
        let fl = 4.0 * (bh * sq * skv * d) as f64;
        let io = 2.0 * (2 * bh * sq * d + 2 * bh * skv * d) as f64;
        for (tag, which) in [
            ("flash", AttnKernel::Auto),
            ("composed", AttnKernel::Composed),
        ] {
            let s = b.time(|| sdpa_with(qa, ka, va, &geom, which, false).map(|_| ()))?;
            b.report(
                &format!("sdpa fwd {tag} bh{bh} {sq}x{skv} d{d} bf16"),
                s,
                io,
                fl,
            );
            // Training's pair: the forward keeps its LSE (flash) and the backward reuses it.
            let s = b.time(|| {
                let (out, lse) = sdpa_with(qa, ka, va, &geom, which, true)?;
                let saved = lse.as_ref().map(|lse| Saved {
                    out: (&out, oa.1),
                    lse,
                });
                sdpa_bwd_with(qa, ka, va, oa, &geom, which, saved).map(|_| ())
            })?;
            b.report(
                &format!("sdpa fwd+bwd {tag} bh{bh} {sq}x{skv} d{d} bf16"),
                s,
                2.0 * io,
                3.5 * fl,
            );
        }
    }

    // ---- the gated LoRA update vs the unfused composition ----
    lora::run(&mut b, size, &mut rng)?;

    // ---- group norm (+ SiLU fused vs separate) ----
    let (n, c, hw) = size.pick((2, 320, 128), (2, 320, 64), (1, 64, 8));
    let x = Tensor::randn((n, c, hw, hw), &mut rng, DType::BF16, gpu)?;
    let w = Tensor::ones(c, DType::BF16, gpu)?;
    let bias = Tensor::zeros(c, DType::BF16, gpu)?;
    let bytes = 2.0 * (n * c * hw * hw) as f64;
    let s = b.time(|| x.group_norm(32, Some(&w), Some(&bias), 1e-5).map(|_| ()))?;
    b.report(
        &format!("group_norm fwd {n}x{c}x{hw}x{hw} bf16"),
        s,
        2.0 * bytes,
        0.0,
    );
    {
        let (xs, ws, bs) = (x.storage(), w.storage(), bias.storage());
        let s = b.time(|| {
            ops::group_norm_silu(
                (&xs, x.layout()),
                Some((&ws, w.layout())),
                Some((&bs, bias.layout())),
                32,
                1e-5,
            )
            .map(|_| ())
        })?;
        b.report(
            &format!("group_norm+silu fused {n}x{c}x{hw}x{hw} bf16"),
            s,
            2.0 * bytes,
            0.0,
        );
        let dy = Tensor::randn((n, c, hw, hw), &mut rng, DType::BF16, gpu)?;
        let dys = dy.storage();
        let s = b.time(|| {
            ops::norm_bwd(
                (&xs, x.layout()),
                (&dys, dy.layout()),
                Some((&ws, w.layout())),
                Some(32),
                1e-5,
            )
            .map(|_| ())
        })?;
        // Includes the statistics recompute: x read 3x, dy 2x, dx written once.
        b.report(
            &format!("group_norm bwd {n}x{c}x{hw}x{hw} bf16"),
            s,
            3.0 * bytes,
            0.0,
        );
    }
    let s = b.time(|| {
        x.group_norm(32, Some(&w), Some(&bias), 1e-5)?
            .silu()
            .map(|_| ())
    })?;
    b.report(
        &format!("group_norm then silu {n}x{c}x{hw}x{hw} bf16"),
        s,
        2.0 * bytes,
        0.0,
    );

    finish(&b, a.json.as_deref())
}

/// Prints the device's memory totals and writes the JSON rows.
fn finish(b: &Bench, json: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let stats = b.dev.mem_stats();
    println!(
        "peak device memory {:.1} MiB, reserved {:.1} MiB",
        stats.peak as f64 / 1048576.0,
        stats.reserved as f64 / 1048576.0
    );
    if let Some(path) = json {
        let mut f = std::fs::File::create(path)?;
        for j in &b.json {
            writeln!(f, "{j}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
