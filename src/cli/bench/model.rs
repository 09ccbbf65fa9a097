//! `kstyle bench --model`: the whole SDXL UNet, full size with random weights, in bf16: inference
//! at 1024x1024 (batch 2, the CFG pair) and one training micro-batch at 1024x1024 (batch 1,
//! forward + backward, rank-4 adapters on every attention projection's to_q/to_k/to_v/to_out.0:
//! plain LoRA without and with per-block checkpointing, and K-StyleLoRA's gated form), each with
//! its peak memory (the caching allocator's bytes in use: weights included, CUDA context not).
//!
//! Then the same inference and plain-LoRA micro-batch with the Linear and conv weights held as
//! float8 e4m3fn (`--weight-dtype fp8-e4m3fn`): the peak shows the memory it saves, the time
//! what widening each weight per call costs.
//!
//! FLOPs are counted at dispatch (`backend::flops`) over one run, so "of roof" is the share of
//! the measured GEMM ceiling the step reaches. `scripts/bench_torch_unet.py` runs diffusers'
//! UNet2DConditionModel (SDPA, peft LoRA, its own checkpointing) on the same shapes; its rows
//! join these by name.

use super::{Bench, Size};
use kstyle::autograd::no_grad;
use kstyle::backend::flops;
use kstyle::models::unet::flops::forward_flops;
use kstyle::models::unet::{param_shapes, CheckpointPolicy, UNet2DConditionModel, UNetConfig};
use kstyle::nn::lora::{LoraAdapter, LoraConfig};
use kstyle::nn::weights::Weights;
use kstyle::sample::TrainSchedule;
use kstyle::tensor::float8::F8E4M3;
use kstyle::tensor::memory::{memory_use, reset_peak};
use kstyle::tensor::Rng;
use kstyle::train::step::{training_loss, Conditioning};
use kstyle::{DType, Device, Tensor};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::time::Instant;

/// The tiny fixture UNet, for `--smoke` (CI runs every case on the host emulator).
const TINY_UNET: &str = include_str!("../../../tests/fixtures/tiny/sdxl/unet/config.json");

/// The LoRA targets of diffusers' SDXL LoRA script and of `kstyle train`.
const TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// A uniform value in [-1, 1) from (tensor seed, element index): splitmix64, so every element is
/// independent and the fill runs in parallel.
fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// The UNet of `cfg` with random weights in bf16 on `device`: matrices and kernels uniform in
/// ±1/sqrt(fan_in) (PyTorch's default bound), norm scales 1, biases small. Values are drawn on
/// the host in parallel, in bf16, and uploaded tensor by tensor. With `float8`, the matrices
/// and kernels are drawn as e4m3fn and held so (`--weight-dtype fp8-e4m3fn`).
fn random_unet(
    cfg: &UNetConfig,
    device: Device,
    float8: bool,
) -> anyhow::Result<UNet2DConditionModel> {
    let mut map = BTreeMap::new();
    for (seed, (name, shape)) in param_shapes(cfg).0.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let (scale, offset) = match shape.len() {
            1 if name.ends_with(".weight") => (0.0, 1.0),
            1 => (0.02, 0.0),
            _ => (
                1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt(),
                0.0,
            ),
        };
        let value = |i: u64| offset + scale * uniform(seed as u64, i);
        // float8 tensors stay on the host: the loader checks their range there, then uploads.
        let t = if float8 && shape.len() > 1 {
            let values: Vec<F8E4M3> = (0..n as u64)
                .into_par_iter()
                .map(|i| F8E4M3::from_f32(value(i)))
                .collect();
            Tensor::from_vec(values, shape, Device::Cpu)?
        } else {
            let values: Vec<half::bf16> = (0..n as u64)
                .into_par_iter()
                .map(|i| half::bf16::from_f32(value(i)))
                .collect();
            Tensor::from_vec(values, shape, Device::Cpu)?.to_device(device)?
        };
        map.insert(name, t);
    }
    let vb = Weights::from_map(map, "<random weights>", DType::BF16, device)
        .with_matrix_dtype(float8.then_some(DType::F8E4M3));
    let unet = UNet2DConditionModel::load(&vb, cfg)?;
    vb.ensure_all_used(|_| false)?;
    Ok(unet)
}

/// Median seconds of `reps` timed calls, after one warm-up call unless `smoke` (where the
/// counting run has warmed up enough: the numbers mean nothing there).
fn time_runs(
    b: &Bench,
    size: Size,
    reps: usize,
    mut f: impl FnMut() -> kstyle::Result<()>,
) -> anyhow::Result<f64> {
    if !size.smoke {
        f()?;
    }
    b.dev.synchronize()?;
    let mut samples = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        b.dev.synchronize()?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// `--profile`: one more call of `f` with device time recorded per kernel and cuBLAS call, and
/// the largest of them printed under the case's name.
fn profile_run(
    b: &Bench,
    case: &str,
    f: impl FnOnce() -> kstyle::Result<()>,
) -> anyhow::Result<()> {
    if !b.profile {
        return Ok(());
    }
    b.dev.synchronize()?;
    if !b.dev.profile_start() {
        println!("profile {case}: not recorded (the emulator has no device time)");
        return Ok(());
    }
    let t = Instant::now();
    let ran = f();
    b.dev.synchronize()?;
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    let times = b.dev.profile_stop()?;
    ran?;
    println!("profile {case}:");
    print!(
        "{}",
        kstyle::backend::cuda::profile::table(&times, 18, wall_ms)
    );
    Ok(())
}

/// FLOPs one call of `f` issues, and the peak bytes in use while it runs.
fn count(device: Device, f: impl FnOnce() -> kstyle::Result<()>) -> anyhow::Result<(f64, usize)> {
    reset_peak(device)?;
    flops::reset();
    f()?;
    let issued = flops::issued() as f64;
    Ok((issued, memory_use(device)?.peak))
}

/// Bytes of the UNet's weights: all in bf16, or with the matrices and kernels (all but 0.06% of
/// SDXL's parameters) at one byte.
fn weight_bytes(cfg: &UNetConfig, float8: bool) -> f64 {
    param_shapes(cfg)
        .0
        .iter()
        .map(|(name, s)| {
            let n = s.iter().product::<usize>();
            if float8 && name.ends_with(".weight") && s.len() > 1 {
                n
            } else {
                2 * n
            }
        })
        .sum::<usize>() as f64
}

pub(super) fn run(b: &mut Bench, size: Size) -> anyhow::Result<()> {
    let gpu = Device::Cuda(0);
    let cfg = if size.smoke {
        UNetConfig::from_json(&serde_json::from_str(TINY_UNET)?)?
    } else {
        UNetConfig::sdxl_base()
    };
    let px = size.pick(1024, 512, 32);
    let reps = size.pick(5, 3, 1);
    let lat = px / 8;
    let tt = cfg
        .text_time
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the model bench needs an SDXL (text_time) UNet"))?;
    let pooled_dim = tt.input_dim - 6 * tt.time_embed_dim;
    let ctx_dim = cfg.cross_attention_dim[0];
    let mut rng = Rng::new(5);
    let inputs = |batch: usize, rng: &mut Rng| -> kstyle::Result<[Tensor; 5]> {
        let p = px as f64;
        let ids: Vec<f64> = (0..batch).flat_map(|_| [p, p, 0.0, 0.0, p, p]).collect();
        Ok([
            Tensor::randn((batch, cfg.in_channels, lat, lat), rng, DType::BF16, gpu)?,
            Tensor::from_vec(vec![500.0f32; batch], batch, Device::Cpu)?.to_device(gpu)?,
            Tensor::randn((batch, 77, ctx_dim), rng, DType::BF16, gpu)?,
            Tensor::randn((batch, pooled_dim), rng, DType::BF16, gpu)?,
            Tensor::from_vec(ids, (batch, 6), Device::Cpu)?
                .to_dtype(DType::BF16)?
                .to_device(gpu)?,
        ])
    };
    // Inference: the CFG pair in one batch. Training: one micro-batch, forward + backward to the
    // adapters.
    let infer = inputs(2, &mut rng)?;
    let schedule = TrainSchedule::sdxl();
    let [_, _, ctx, pooled, ids] = inputs(1, &mut rng)?;
    let x0 = Tensor::randn((1, cfg.in_channels, lat, lat), &mut rng, DType::F32, gpu)?;
    let noise = Tensor::randn((1, cfg.in_channels, lat, lat), &mut rng, DType::F32, gpu)?;
    let concepts = Tensor::randn(
        (kstyle::train::concepts::default_concepts().len(), 512),
        &mut rng,
        DType::F32,
        gpu,
    )?
    .normalize_l2(1, 1e-12)?;
    let lora = LoraConfig::default();
    let cond = Conditioning {
        context: &ctx,
        pooled: &pooled,
        time_ids: &ids,
        loss_mask: None,
    };
    // bf16 weights with every training variant, then float8 weights (`--weight-dtype`) with
    // plain LoRA: their peaks show the memory it saves, their times what widening costs.
    for float8 in [false, true] {
        let t0 = Instant::now();
        let mut unet = random_unet(&cfg, gpu, float8)?;
        let bytes = weight_bytes(&cfg, float8);
        let tag = if float8 { "bf16, f8e4m3 W" } else { "bf16" };
        println!(
            "UNet {} parameters ({:.2} GB, {tag}), random weights built in {:.1} s",
            weight_bytes(&cfg, false) / 2.0,
            bytes / 1e9,
            t0.elapsed().as_secs_f64()
        );
        let [x, t, c2, p2, i2] = &infer;
        let fwd = || no_grad(|| unet.forward(x, t, c2, p2, i2).map(|_| ()));
        let (fl, peak) = count(gpu, fwd)?;
        // The rates below divide by the dispatch count; it must be the architecture's own. A
        // mismatch is reported, not fatal: a GPU session's timings are too scarce to throw away.
        let analytic = forward_flops(&cfg, 2, (lat, lat), 77) as f64;
        if fl == analytic {
            println!("unet fwd {px}px b2: {fl:e} FLOPs counted at dispatch = the analytic count");
        } else {
            println!(
                "FLOP COUNT MISMATCH: unet fwd {px}px b2 issued {fl:e} at dispatch, the \
                 architecture implies {analytic:e}; the rates below are off by {:.4}x",
                fl / analytic
            );
        }
        let s = time_runs(b, size, reps, fwd)?;
        profile_run(b, &format!("unet fwd {px}px b2 {tag}"), fwd)?;
        b.report_peak(
            &format!("unet fwd {px}px b2 {tag}"),
            s,
            bytes,
            fl,
            Some(peak),
        );
        let all = [
            ("lora r4", false, CheckpointPolicy::None),
            ("lora r4 ckpt", false, CheckpointPolicy::EveryBlock),
            ("gated r4", true, CheckpointPolicy::None),
        ];
        for (label, gated, policy) in &all[..if float8 { 1 } else { all.len() }] {
            let gates = gated.then_some(&concepts);
            unet.attach_adapters(|path, base| {
                if !TARGETS.iter().any(|t| path.ends_with(&format!(".{t}"))) {
                    return Ok(None);
                }
                let a = LoraAdapter::init(
                    base.in_features(),
                    base.out_features(),
                    lora,
                    gates,
                    &mut rng,
                    DType::F32,
                    gpu,
                )?;
                a.trainable_in(DType::BF16).map(Some)
            })?;
            unet.checkpoint = *policy;
            let step = || {
                let losses = training_loss(&unet, None, &schedule, &x0, &noise, &[500], &cond)?;
                losses.total.backward().map(|_| ())
            };
            let (fl, peak) = count(gpu, step)?;
            let s = time_runs(b, size, reps, step)?;
            profile_run(b, &format!("unet train {label} {px}px b1 {tag}"), step)?;
            b.report_peak(
                &format!("unet train {label} {px}px b1 {tag}"),
                s,
                bytes,
                fl,
                Some(peak),
            );
        }
    }
    Ok(())
}
