//! The CUDA backend on the host emulator (kernels/emu.h, src/backend/cuda/emu.rs): every kernel,
//! launcher and GEMM mapping runs here, on CI's CPUs, against the CPU oracle. Also shows that the
//! emulator's checks fire: each deliberately broken kernel below must be caught.

mod common;

use std::sync::Arc;

use kstyle::backend::cuda::device::thread_uploads;
use kstyle::backend::cuda::kernels::Family;
use kstyle::backend::cuda::{self, emu, CudaDevice};
use kstyle::verify::cuda_parity;
use kstyle::DType;

fn device() -> Arc<CudaDevice> {
    emu::enable();
    let dev = cuda::device(0).expect("the emulated device needs a C++ compiler (g++)");
    assert!(dev.is_emulated());
    dev
}

#[test]
fn every_cuda_op_matches_the_cpu_oracle_on_the_emulator() {
    device();
    let rows = cuda_parity::run(0, None, 0x5eed).expect("parity run");
    common::assert_parity(&rows, 300);
}

/// `kstyle verify --device cuda` on the tiny fixtures, every stage through the CUDA code paths.
/// The `samplers`, `img2img`, `inpaint`, `micro_conditioning` and `edm` cases (whole denoising
/// runs; micro-conditioning changes only the host-built time ids, EDM only host-side scalars) and
/// `refiner_lora` (the refiner case's device work on merged weights), `textual_inversion` (the
/// text encoders with longer token tables), `train_vpred`,
/// `train_min_snr`, `train_ip_noise`, `train_loss_types`, `train_clip_grad` and `train_edm` (two
/// to four more training steps each; EDM's are the same UNet on preconditioned inputs; the loss
/// types add only elementwise ops, clipping one reduction the parity suite checks) are left to the GPU session's full verify: their device work is the
/// pipeline case's UNet, the vae case's encoder, train_step_kstyle's forward and backward and
/// the elementwise ops the parity suite covers, and on the emulator the 13 sampler runs added on
/// 2026-11-30 doubled this suite (7.4 to 14.7 min); the 10 img2img runs take 2 min more and
/// each training case 1.5 min. (`refiner`'s four short runs stay, and `mask_crop`'s two, 30 s, carry
/// inpainting's device work: a 4-channel and a 9-channel UNet run. `train_text_encoder`, 2 min,
/// stays: it is the only case that backpropagates through the text encoders, their causal
/// attention and their LoRA.) `train_loha`, `train_lokr`, `train_dora`, `train_doha` and `train_dokr` (3 min each: every
/// adapted layer's whole weight gradient through the emulator's GEMMs) add no device op the other
/// training cases and the parity suite do not run (matmul, broadcast multiply and divide, square,
/// square root, row sums, reshape, convolution with its weight gradient). `prompt_editing`
/// (3 min: three guided runs whose batches change between steps) adds host-side selection and
/// a broadcast copy, both run by the pipeline and parity cases.
#[test]
fn verify_device_cuda_passes_on_the_emulator() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kstyle"))
        .args([
            "verify",
            "--device",
            "cuda",
            "--skip",
            "samplers",
            "--skip",
            "img2img",
            "--skip",
            "inpaint",
            "--skip",
            "micro_conditioning",
            "--skip",
            "train_vpred",
            "--skip",
            "train_min_snr",
            "--skip",
            "train_ip_noise",
            "--skip",
            "train_loss_types",
            "--skip",
            "train_clip_grad",
            "--skip",
            "train_edm",
            "--skip",
            "edm",
            "--skip",
            "refiner_lora",
            "--skip",
            "textual_inversion",
            "--skip",
            "train_loha",
            "--skip",
            "train_lokr",
            "--skip",
            "train_dora",
            "--skip",
            "train_doha",
            "--skip",
            "train_dokr",
            "--skip",
            "prompt_editing",
        ])
        .arg(common::tiny())
        .env(emu::EMULATE_ENV, "1")
        .output()
        .expect("run kstyle");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        out.status.success() && summary.ends_with(" 0 failed"),
        "verify --device cuda: {summary}\n{}\n{}",
        stdout
            .lines()
            .filter(|l| l.contains("FAIL"))
            .collect::<Vec<_>>()
            .join("\n"),
        common::stderr(&out)
    );
}

/// `kstyle ARGS` on the host emulator; its stdout, after asserting it succeeded.
fn emulated_ok(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kstyle"))
        .args(args)
        .env(emu::EMULATE_ENV, "1")
        .output()
        .expect("run kstyle");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kstyle {}: {stdout}\n{}",
        args.join(" "),
        common::stderr(&out)
    );
    stdout
}

/// `kstyle bench --model --smoke`: the whole-UNet cases (random weights, inference, the three
/// training micro-batches) run to the end on the tiny UNet, with their FLOP counts (the forward's
/// equal to the analytic count) and peaks.
#[test]
fn model_bench_runs_on_the_emulator() {
    let dir = common::tmp("model-bench");
    let json = dir.join("rows.jsonl");
    let stdout = emulated_ok(&[
        "bench",
        "--model",
        "--smoke",
        "--json",
        json.to_str().unwrap(),
    ]);
    // The CUDA dispatch (cuBLASLt's fused linears included) counts what the architecture implies.
    assert!(
        stdout.contains("FLOPs counted at dispatch = the analytic count"),
        "{stdout}"
    );
    let rows = std::fs::read_to_string(&json).unwrap();
    for case in [
        "unet fwd 32px b2",
        "unet train lora r4 32px",
        "unet train lora r4 ckpt 32px",
        "unet train gated r4 32px",
    ] {
        let row = rows
            .lines()
            .find(|l| l.contains(&format!("\"{case} ")))
            .unwrap_or_else(|| panic!("no `{case}` row:\n{rows}"));
        assert!(row.contains("\"peak_mib\":"), "{row}");
    }
    // Float8 weights (--weight-dtype) lower the peak of the same inference and LoRA step.
    let peak = |name: &str| -> f64 {
        let row = rows
            .lines()
            .find(|l| l.contains(&format!("\"name\":\"{name}\"")))
            .unwrap_or_else(|| panic!("no `{name}` row:\n{rows}"));
        let v = row.split("\"peak_mib\":").nth(1).expect("a peak");
        v.trim_end_matches('}').parse().expect("a number")
    };
    for (plain, float8) in [
        ("unet fwd 32px b2 bf16", "unet fwd 32px b2 bf16, f8e4m3 W"),
        (
            "unet train lora r4 32px b1 bf16",
            "unet train lora r4 32px b1 bf16, f8e4m3 W",
        ),
    ] {
        assert!(
            peak(float8) < peak(plain),
            "{float8}: {} MiB, {plain}: {} MiB",
            peak(float8),
            peak(plain)
        );
    }
}

/// `kstyle bench --smoke`: every timed case of a GPU session's bench runs to the end, so a bench
/// bug cannot spend the scarce GPU minutes (the timings here mean nothing).
#[test]
fn every_bench_case_runs_on_the_emulator() {
    let stdout = emulated_ok(&["bench", "--smoke"]);
    for case in [
        "gemm ",
        "linear+bias epilogue",
        "linear then add",
        "adamw step flat",
        "adamw step interleaved rates",
        "prodigy step",
        "lion step",
        "adamw8bit step",
        "lion8bit step",
        "adafactor step",
        "adamw per-tensor",
        "sdpa fwd+bwd flash",
        "sdpa fwd+bwd composed",
        "lora gated fwd+bwd",
        "lora unfused fwd",
        "group_norm bwd",
        "peak device memory",
    ] {
        assert!(
            stdout.contains(case),
            "bench --smoke printed no `{case}` row:\n{stdout}"
        );
    }
}

/// `kstyle train --device cuda` end to end (the flat optimizer's multi-tensor passes, the fused
/// linears' backward, the memory planner on the allocator's counts) beside the same run on the
/// CPU: one K-StyleLoRA step on the tiny model, a batch of two pictures (stacked on the device).
#[test]
fn training_on_cuda_matches_the_cpu_run() {
    let dir = common::tmp("emu-train");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (picture, name) in [("pipeline.png", "a.png"), ("clip_input.png", "b.png")] {
        std::fs::copy(
            common::tiny().join("reference").join(picture),
            data.join(name),
        )
        .unwrap();
    }
    let run = |device: &str| {
        let out = dir.join(device).join("a.safetensors");
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_kstyle"))
            .args(["train", "--model"])
            .arg(common::tiny().join("sdxl"))
            .args(["--clip"])
            .arg(common::tiny().join("clip"))
            .args(["--data"])
            .arg(&data)
            .args(["--out"])
            .arg(&out)
            .args([
                "--method",
                "kstyle",
                "--resolution",
                "64",
                "--max-steps",
                "1",
                "--grad-accum",
                "1",
                "--batch-size",
                "2",
                "--lr",
                "1e-2",
            ])
            .args([
                "--caption-template",
                "a [v] x",
                "--seed",
                "7",
                "--device",
                device,
            ])
            .args(["--memory-budget", "1GiB", "--cache"])
            .arg(dir.join("cache"))
            .env(emu::EMULATE_ENV, "1")
            .output()
            .expect("run kstyle");
        assert!(
            o.status.success(),
            "train --device {device}: {}",
            common::stderr(&o)
        );
        let log = common::stderr(&o);
        assert!(log.contains("using checkpointing none"), "{log}");
        // A GPU run ends with its peak and its uploads per step.
        assert_eq!(
            log.contains("host uploads per step after the first:"),
            device == "cuda",
            "{log}"
        );
        let losses = common::first_losses(&out);
        let f = kstyle::tensor::SafeTensorsFile::open(&out).unwrap();
        let mut values = Vec::new();
        for n in f.names() {
            values.extend(f.tensor(n).unwrap().to_vec_f64().unwrap());
        }
        (losses, values)
    };
    let (cpu, gpu) = (run("cpu"), run("cuda"));
    let tol = kstyle::tolerance::Tolerance::F32_FORWARD.rel;
    for (what, (c, g)) in ["loss", "diffusion", "cultural"]
        .iter()
        .zip(cpu.0.iter().zip(&gpu.0))
    {
        assert!((c - g).abs() <= tol * c.abs(), "{what}: cpu {c}, cuda {g}");
    }
    // The adapter after one AdamW step, as one vector: measured 6.8e-7 relative. One step at
    // --lr 1e-2 moves each value by about 1e-2, so a lost or misplaced update cannot pass.
    let l2 = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff: Vec<f64> = cpu.1.iter().zip(&gpu.1).map(|(a, b)| a - b).collect();
    assert_eq!(cpu.1.len(), gpu.1.len());
    let rel = l2(&diff) / l2(&cpu.1);
    eprintln!("adapter after one step: cuda vs cpu {rel:e} relative");
    assert!(rel <= tol, "adapter differs by {rel:e}");
}

const BROKEN: &str = r#"
#include "common.cuh"
// Reads another thread's shared-memory write with no barrier in between.
extern "C" __global__ void selftest_race(float* out) {
    __shared__ float s[128];
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[127 - threadIdx.x];
}
extern "C" __global__ void selftest_synced(float* out) {
    __shared__ float s[128];
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[127 - threadIdx.x];
}
// Writes one element past the end.
extern "C" __global__ void selftest_overrun(float* out, int n) {
    if ((int)threadIdx.x <= n) out[threadIdx.x] = 1.0f;
}
// Odd lanes wait at __syncthreads while even lanes wait at a shuffle: a hang on hardware.
extern "C" __global__ void selftest_divergent(float* out) {
    if (threadIdx.x & 1) __syncthreads();
    out[threadIdx.x] = warp_sum(1.0f);
}
// Lane 5 has exited when the others shuffle.
extern "C" __global__ void selftest_exited_lane(float* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = warp_sum(1.0f);
}
extern "C" __global__ void selftest_args(float* out, int n) {
    if (threadIdx.x < n) out[threadIdx.x] = 2.0f;
}
"#;

fn broken() -> &'static Family {
    Box::leak(Box::new(Family {
        stem: "emu_selftest",
        code: BROKEN,
    }))
}

fn out_buffer(dev: &Arc<CudaDevice>, n: usize) -> cuda::Buffer {
    dev.alloc_zeroed(DType::F32, n).unwrap()
}

fn read(dev: &Arc<CudaDevice>, b: &cuda::Buffer, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    dev.download(b.ptr(), &mut v).unwrap();
    v
}

fn launch_err(dev: &Arc<CudaDevice>, symbol: &str, n: usize) -> String {
    let out = out_buffer(dev, n);
    let l = dev
        .launch_in(broken(), symbol.into())
        .unwrap()
        .arg(out.ptr());
    match l.run((1, 1, 1), (n as u32, 1, 1), 0) {
        Ok(()) => panic!("{symbol} ran without an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_barrier_changes_the_result() {
    let dev = device();
    let expected: Vec<f32> = (0..128).rev().map(|i| i as f32).collect();
    let fam = broken();
    let run = |symbol: &str| {
        let out = out_buffer(&dev, 128);
        dev.launch_in(fam, symbol.into())
            .unwrap()
            .arg(out.ptr())
            .run((1, 1, 1), (128, 1, 1), 0)
            .unwrap();
        read(&dev, &out, 128)
    };
    assert_eq!(run("selftest_synced"), expected);
    assert_ne!(run("selftest_race"), expected);
}

#[test]
fn out_of_bounds_writes_divergent_barriers_and_exited_lanes_are_errors() {
    let dev = device();
    // 96 threads write elements [0, 64] of a 64-element buffer.
    let out = out_buffer(&dev, 64);
    let err = dev
        .launch_in(broken(), "selftest_overrun".into())
        .unwrap()
        .arg(out.ptr())
        .arg(64i32)
        .run((1, 1, 1), (96, 1, 1), 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wrote outside the 256-byte allocation")
            && err.contains("byte 0 after the end"),
        "{err}"
    );

    let err = launch_err(&dev, "selftest_divergent", 64);
    assert!(err.contains("deadlock"), "{err}");
    let err = launch_err(&dev, "selftest_exited_lane", 32);
    assert!(err.contains("exited"), "{err}");
}

#[test]
fn launch_arguments_must_match_the_kernel_parameters() {
    let dev = device();
    let out = out_buffer(&dev, 32);
    let run = |l: kstyle::backend::cuda::device::Launch| l.run((1, 1, 1), (32, 1, 1), 0);
    let base = || dev.launch_in(broken(), "selftest_args".into()).unwrap();
    run(base().arg(out.ptr()).arg(32i32)).unwrap();
    assert_eq!(read(&dev, &out, 32), vec![2.0; 32]);
    let err = run(base().arg(out.ptr()).arg(32i64))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("argument 1 is 8 bytes; the kernel's parameter is 4"),
        "{err}"
    );
    let err = run(base().arg(out.ptr())).unwrap_err().to_string();
    assert!(
        err.contains("launched with 1 arguments; the kernel takes 2"),
        "{err}"
    );
}

/// Filled tensors are written on the device: a backward through a chunk (GEGLU's split, in every
/// transformer block) pads the halves' gradients with zeros and seeds itself with a one, and
/// none of that is uploaded from the host (an upload also waits for the stream). The gradient
/// is the CPU's.
#[test]
fn a_chunk_backward_uploads_nothing() {
    use kstyle::tensor::Rng;
    use kstyle::{Device, Tensor};
    device();
    let xc = Tensor::randn((2, 24, 64), &mut Rng::new(3), DType::F32, Device::Cpu).unwrap();
    let grad = |x: &Tensor| {
        let x = x.var().unwrap();
        let [a, b]: [Tensor; 2] = x.chunk(2, 2).unwrap().try_into().unwrap();
        let loss = a.mul(&b.gelu().unwrap()).unwrap().sum_all().unwrap();
        let before = thread_uploads();
        let g = loss
            .backward()
            .unwrap()
            .get(&x)
            .unwrap()
            .to_vec_f64()
            .unwrap();
        (g, before)
    };
    let (want, _) = grad(&xc);
    let (got, before) = grad(&xc.to_device(Device::Cuda(0)).unwrap());
    let after = thread_uploads();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 0),
        "the backward uploaded from the host"
    );
    let err = want
        .iter()
        .zip(&got)
        .map(|(w, g)| (w - g).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-5, "max |cpu - cuda| = {err}");
}

#[test]
fn fresh_device_memory_reads_as_nan() {
    let dev = device();
    let b = dev.alloc(DType::F32, 5).unwrap();
    let mut v = vec![0f32; 5];
    dev.download(b.ptr(), &mut v).unwrap();
    assert!(v.iter().all(|x| x.is_nan()), "{v:?}");
    // And a download past the end is refused, not undefined.
    let mut w = vec![0f32; 6];
    assert!(dev.download(b.ptr(), &mut w).is_err());
}

#[test]
fn f64_is_refused_on_cuda_with_a_typed_error() {
    device();
    let t = kstyle::Tensor::ones(4usize, DType::F64, kstyle::Device::Cpu).unwrap();
    assert!(matches!(
        t.to_device(kstyle::Device::Cuda(0)),
        Err(kstyle::Error::DType { .. })
    ));
}

/// LoRA network dropout's masks on a GPU are made there from the visit seeds uploaded once per
/// micro-batch: the same bits as the CPU's, and nothing activation-sized crosses from the host.
#[test]
fn dropout_masks_are_made_on_the_device() {
    use kstyle::nn::lora_dropout::{DropoutDraw, LoraDropout};
    use kstyle::{Device, Tensor};
    device();
    let config = LoraDropout {
        dropout: Some(0.3),
        rank: Some(0.25),
        module: Some(0.2),
    };
    let visits = [7u64, u64::MAX - 3];
    let ids: Vec<i64> = visits.iter().map(|&v| v as i64).collect();
    let seeds = Tensor::from_vec(ids, 2, Device::Cuda(0)).unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let draw = DropoutDraw::for_module(config, &visits, 5);
        let cpu = draw.masks(77, 9, dtype, Device::Cpu).unwrap();
        let on_gpu = draw.with_device_seeds(Some(seeds.clone()));
        let before = thread_uploads();
        let gpu = on_gpu.masks(77, 9, dtype, Device::Cuda(0)).unwrap();
        let after = thread_uploads();
        // The row masks (2 x 9 values) still come from the host; the entries do not.
        assert_eq!(after.0 - before.0, 1, "{dtype:?}");
        assert!(after.1 - before.1 <= 2 * 9 * 4, "{dtype:?}");
        let bits = |t: &Option<Tensor>| t.as_ref().unwrap().to_vec_f64().unwrap();
        assert_eq!(bits(&gpu.entries), bits(&cpu.entries), "{dtype:?}");
        assert_eq!(bits(&gpu.rows), bits(&cpu.rows), "{dtype:?}");
        let kept = bits(&cpu.entries).iter().sum::<f64>() / (2.0 * 77.0 * 9.0);
        assert!((kept - 0.7).abs() < 0.06, "kept {kept}");
    }
}
