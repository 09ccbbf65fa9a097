//! `candle-cuda-bench [--quick] [--json FILE]`: candle 0.11 on the GPU, on the shapes of
//! `kstyle bench` (src/cli/bench.rs), bf16 where it uses bf16.
//!
//! Timing as `kstyle bench` and scripts/bench_torch.py do it: three warm-up calls, a device
//! synchronisation, then five samples of `iters` calls each between two synchronisations; the
//! median sample counts. Rows print in their format (`name  ms  GB/s  TFLOP/s`, names prefixed
//! `candle`) so scripts/gpu-check.sh puts them beside kstyle's and PyTorch's; the ceilings are the
//! ones `kstyle bench` measures in the same gpu-check call.
//!
//! candle has no flash attention in candle-core/candle-nn: its attention is the composition
//! matmul, scale, fused softmax, matmul. Backward goes through candle's autograd, which needs the
//! differentiable `candle_nn::ops::softmax` (the fused `softmax_last_dim` has no backward rule).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Module;

struct Bench {
    dev: Device,
    iters: usize,
    json: Vec<String>,
}

impl Bench {
    /// Median seconds per call of `f`.
    fn time(&self, mut f: impl FnMut() -> candle_core::Result<()>) -> Result<f64> {
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

    fn report(&mut self, name: &str, secs: f64, bytes: f64, flops: f64) {
        println!(
            "{name:<46} {:>9.3} ms  {:>8.1} GB/s  {:>7.1} TFLOP/s",
            secs * 1e3,
            bytes / secs / 1e9,
            flops / secs / 1e12
        );
        self.json.push(format!(
            "{{\"name\":\"{name}\",\"ms\":{:.6},\"gbps\":{:.3},\"tflops\":{:.3}}}",
            secs * 1e3,
            bytes / secs / 1e9,
            flops / secs / 1e12
        ));
    }

    fn randn(&self, shape: &[usize], dt: DType) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1f32, shape, &self.dev)?.to_dtype(dt)
    }
}

fn dt_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F32 => "f32",
        _ => "other",
    }
}

/// softmax(q k^T * scale) v over (BH, S, D) tensors; `fused` picks the forward-only softmax.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, fused: bool) -> candle_core::Result<Tensor> {
    let s = (q.matmul(&k.t()?)? * scale)?; // (BH, Sq, Skv)
    let p = if fused {
        candle_nn::ops::softmax_last_dim(&s)?
    } else {
        candle_nn::ops::softmax(&s, D::Minus1)?
    };
    p.matmul(v) // (BH, Sq, D)
}

fn main() -> Result<ExitCode> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED candle-cuda-bench: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut b = Bench {
        dev,
        iters: if quick { 3 } else { 20 },
        json: Vec::new(),
    };
    println!("candle-core 0.11 (cuda, cuBLAS), median of 5 samples x {} calls", b.iters);

    // ---- GEMM: the square bf16 one PyTorch's script also reports, then kstyle bench's ----
    let g = if quick { 2048 } else { 8192 };
    let x = b.randn(&[g, g], DType::BF16)?;
    let s = b.time(|| x.matmul(&x).map(|_| ()))?;
    let gf = g as f64;
    b.report(&format!("candle gemm {g}^3 bf16"), s, 3.0 * 2.0 * gf * gf, 2.0 * gf.powi(3));
    drop(x);
    let shapes: &[(usize, usize, usize, DType)] = if quick {
        &[(1024, 1024, 1024, DType::BF16), (1024, 1024, 1024, DType::F32)]
    } else {
        &[
            (4096, 4096, 4096, DType::BF16),
            (8192, 640, 640, DType::BF16),
            (8192, 5120, 1280, DType::BF16),
            (2048, 2048, 2048, DType::F32),
        ]
    };
    for &(m, k, n, dt) in shapes {
        let x = b.randn(&[m, k], dt)?;
        let w = b.randn(&[n, k], dt)?;
        let wt = w.t()?;
        let s = b.time(|| x.matmul(&wt).map(|_| ()))?;
        let es = dt.size_in_bytes() as f64;
        b.report(
            &format!("candle gemm {m}x{k}x{n} {} (x W^T)", dt_name(dt)),
            s,
            es * (m * k + k * n + m * n) as f64,
            2.0 * (m * k * n) as f64,
        );
    }

    // ---- attention, bf16: forward, and forward + backward through autograd ----
    let seqs: &[(usize, usize, usize)] = if quick {
        &[(8, 1024, 1024)]
    } else {
        &[(20, 4096, 4096), (20, 4096, 77), (40, 1024, 1024)]
    };
    for &(bh, sq, skv) in seqs {
        let d = 64;
        let scale = 0.125;
        let q = Var::from_tensor(&b.randn(&[bh, sq, d], DType::BF16)?)?;
        let k = Var::from_tensor(&b.randn(&[bh, skv, d], DType::BF16)?)?;
        let v = Var::from_tensor(&b.randn(&[bh, skv, d], DType::BF16)?)?;
        let d_o = b.randn(&[bh, sq, d], DType::BF16)?;
        let fl = 4.0 * (bh * sq * skv * d) as f64;
        let io = 2.0 * (2 * bh * sq * d + 2 * bh * skv * d) as f64;
        let (qt, kt, vt) = (q.as_detached_tensor(), k.as_detached_tensor(), v.as_detached_tensor());
        let s = b.time(|| attention(&qt, &kt, &vt, scale, true).map(|_| ()))?;
        b.report(&format!("candle sdpa fwd composed bh{bh} {sq}x{skv} d{d} bf16"), s, io, fl);
        let s = b.time(|| {
            let o = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, false)?;
            // The loss <o, dO> gives dO as o's gradient.
            let grads = (o * &d_o)?.sum_all()?.backward()?;
            drop(grads);
            Ok(())
        })?;
        b.report(
            &format!("candle sdpa fwd+bwd composed bh{bh} {sq}x{skv} d{d} bf16"),
            s,
            2.0 * io,
            3.5 * fl,
        );
    }

    // ---- gated LoRA update, unfused (candle has no fused one) ----
    let (bsz, seq, din, dout, r) = if quick { (2, 1024, 640, 640, 4) } else { (2, 4096, 640, 640, 4) };
    let h = b.randn(&[bsz, seq, din], DType::BF16)?;
    let at = b.randn(&[r, din], DType::BF16)?.t()?;
    let bt = b.randn(&[dout, r], DType::BF16)?.t()?;
    let gate = Tensor::rand(0f32, 1f32, (bsz, 1, r), &b.dev)?.to_dtype(DType::BF16)?;
    let al = Tensor::rand(0f32, 1f32, (bsz, 1, 1), &b.dev)?.to_dtype(DType::BF16)?;
    let base = b.randn(&[bsz, seq, dout], DType::BF16)?;
    let rows = (bsz * seq) as f64;
    let s = b.time(|| {
        let z = (h.broadcast_matmul(&at)?.broadcast_mul(&gate)?.broadcast_mul(&al)? * 0.25)?;
        (z.broadcast_matmul(&bt)? + &base).map(|_| ())
    })?;
    b.report(
        &format!("candle lora unfused fwd {bsz}x{seq} {din}->{dout} r{r} bf16"),
        s,
        2.0 * rows * (din + 2 * dout) as f64,
        2.0 * rows * (r * (din + dout)) as f64,
    );

    // ---- group norm (candle-nn's module: f32 statistics, composed), + SiLU, backward ----
    let (n, c, hw) = if quick { (2, 320, 64) } else { (2, 320, 128) };
    let x = Var::from_tensor(&b.randn(&[n, c, hw, hw], DType::BF16)?)?;
    let gn = candle_nn::GroupNorm::new(
        Tensor::ones(c, DType::BF16, &b.dev)?,
        Tensor::zeros(c, DType::BF16, &b.dev)?,
        c,
        32,
        1e-5,
    )?;
    let bytes = 2.0 * (n * c * hw * hw) as f64;
    let xt = x.as_detached_tensor();
    let s = b.time(|| gn.forward(&xt).map(|_| ()))?;
    b.report(&format!("candle group_norm fwd {n}x{c}x{hw}x{hw} bf16"), s, 2.0 * bytes, 0.0);
    let s = b.time(|| gn.forward(&xt)?.silu().map(|_| ()))?;
    b.report(&format!("candle group_norm then silu {n}x{c}x{hw}x{hw} bf16"), s, 2.0 * bytes, 0.0);
    let dy = b.randn(&[n, c, hw, hw], DType::BF16)?;
    let s = b.time(|| {
        let grads = (gn.forward(x.as_tensor())? * &dy)?.sum_all()?.backward()?;
        drop(grads);
        Ok(())
    })?;
    b.report(&format!("candle group_norm fwd+bwd {n}x{c}x{hw}x{hw} bf16"), s, 3.0 * bytes, 0.0);

    if let Some(path) = json {
        let mut f = std::fs::File::create(path)?;
        for j in &b.json {
            writeln!(f, "{j}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
