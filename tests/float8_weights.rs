//! `--weight-dtype`: frozen UNet weights held as float8. Rounding is PyTorch's, bit for bit, on
//! every rounding case (`tests/fixtures/extra/gen_fp8_encode.py`); a model whose weights are held
//! as float8 computes exactly what the same model computes from an fp8 checkpoint of those
//! weights, in generation and in training; a weight that does not fit is refused by name.

mod common;

use common::train::{dataset, tensors, train, train_model};
use common::{generate_model, generate_tiny, tiny};
use kstyle::formats::raw::write_safetensors;
use kstyle::formats::{MappedFile, RawTensor, TensorMap};
use kstyle::models::unet::UNet2DConditionModel;
use kstyle::nn::weights::Precision;
use kstyle::tensor::float8::{F8E4M3, F8E5M2};
use kstyle::{DType, Device, Tensor};
use safetensors::Dtype;
use std::path::{Path, PathBuf};

fn scratch(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("float8-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The fixture's float32 inputs, rounded here, against the bytes torch 2.15 wrote.
#[test]
fn rounding_matches_pytorch_on_every_case() {
    let file = MappedFile::open(tiny().join("../extra/fp8_encode.safetensors")).unwrap();
    let map = file.tensors().unwrap();
    let x = map["x"].to_f64_vec("fp8_encode", "x").unwrap();
    assert!(x.len() > 6000, "the fixture covers every rounding case");
    let (e4, e5) = (&map["e4m3"], &map["e5m2"]);
    assert_eq!((e4.dtype, e5.dtype), (Dtype::F8_E4M3, Dtype::F8_E5M2));
    let mut wrong = Vec::new();
    for (i, &v) in x.iter().enumerate() {
        let v = v as f32;
        let (g4, g5) = (F8E4M3::from_f32(v).0, F8E5M2::from_f32(v).0);
        if g4 != e4.data[i] || g5 != e5.data[i] {
            wrong.push(format!(
                "{v:e} ({:#010x}): e4m3 {g4:#04x} vs torch {:#04x}, e5m2 {g5:#04x} vs torch {:#04x}",
                v.to_bits(),
                e4.data[i],
                e5.data[i]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {}:\n{}",
        wrong.len(),
        x.len(),
        wrong[..wrong.len().min(8)].join("\n")
    );
    // The tensor cast is the same rounding, from every source dtype (through f32, as torch).
    let t = Tensor::from_vec(
        x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        x.len(),
        Device::Cpu,
    )
    .unwrap();
    let f = t.to_dtype(DType::F8E4M3).unwrap();
    let back = f.to_dtype(DType::F32).unwrap().to_vec_f64().unwrap();
    for (i, b) in back.iter().enumerate() {
        let want = F8E4M3(e4.data[i]).to_f32() as f64;
        assert!(
            b.to_bits() == want.to_bits() || (b.is_nan() && want.is_nan()),
            "cast of {:e}: {b} vs {want}",
            x[i]
        );
    }
}

/// Whether the float8 policy applies to this UNet tensor: Linear and convolution weights.
fn is_matrix(key: &str, shape: &[usize]) -> bool {
    key.ends_with(".weight") && shape.len() >= 2
}

/// A copy of the tiny SDXL folder whose UNet file stores every Linear and convolution weight as
/// `kind` (the rounding checked above), everything else as the original does.
fn fp8_copy(kind: Dtype, dir: &Path) -> PathBuf {
    let src = tiny().join("sdxl");
    let dst = dir.join("sdxl-fp8");
    copy_tree(&src, &dst);
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let file = MappedFile::open(src.join(unet)).unwrap();
    let mut out = TensorMap::new();
    let mut converted = 0;
    for (k, r) in file.tensors().unwrap() {
        if !is_matrix(&k, &r.shape) {
            out.insert(k, r);
            continue;
        }
        let bytes: Vec<u8> = r
            .to_f64_vec("unet", &k)
            .unwrap()
            .into_iter()
            .map(|v| match kind {
                Dtype::F8_E5M2 => F8E5M2::from_f32(v as f32).0,
                _ => F8E4M3::from_f32(v as f32).0,
            })
            .collect();
        out.insert(k, RawTensor::new(kind, r.shape.clone(), bytes).unwrap());
        converted += 1;
    }
    assert!(converted > 50, "the tiny UNet has {converted} matrices");
    write_safetensors(dst.join(unet), &out, None).unwrap();
    dst
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Held as float8, every Linear and conv weight is one byte and everything else stays in the
/// compute dtype; the UNet's output is bit for bit that of the fp8 checkpoint, in f32 and bf16,
/// and differs from the unrounded model's.
#[test]
fn unet_held_as_float8_equals_its_fp8_checkpoint() {
    let dir = scratch("unet");
    let (cfg, _, _) = UNet2DConditionModel::diffusers_tensors(tiny().join("sdxl")).unwrap();
    let mut rng = kstyle::tensor::Rng::new(3);
    let mut randn =
        |shape: Vec<usize>| Tensor::randn(shape, &mut rng, DType::F32, Device::Cpu).unwrap();
    let sample = randn(vec![1, cfg.in_channels, 8, 8]);
    // The tiny config: cross_attention_dim 64; projection_class_embeddings_input_dim 80 is the
    // pooled text (32) plus six time ids of addition_time_embed_dim 8.
    let context = randn(vec![1, 7, 64]);
    let pooled = randn(vec![1, 32]);
    let time_ids =
        Tensor::from_vec(vec![64f32, 64.0, 0.0, 0.0, 64.0, 64.0], (1, 6), Device::Cpu).unwrap();
    let t = Tensor::from_vec(vec![500f32], 1, Device::Cpu).unwrap();
    for (kind, store) in [
        (Dtype::F8_E4M3, DType::F8E4M3),
        (Dtype::F8_E5M2, DType::F8E5M2),
    ] {
        let copy = fp8_copy(kind, &dir.join(store.name()));
        for compute in [DType::F32, DType::BF16] {
            let run = |model: &Path, precision: Precision| {
                let unet = UNet2DConditionModel::from_diffusers(model, &[], precision, Device::Cpu)
                    .unwrap()
                    .model;
                let y = unet
                    .forward(
                        &sample.to_dtype(compute).unwrap(),
                        &t,
                        &context.to_dtype(compute).unwrap(),
                        &pooled.to_dtype(compute).unwrap(),
                        &time_ids.to_dtype(compute).unwrap(),
                    )
                    .unwrap();
                (unet, y.to_vec_f64().unwrap())
            };
            let held = Precision {
                compute,
                matrices: Some(store),
            };
            let (unet, y_held) = run(&tiny().join("sdxl"), held);
            let (_, y_file) = run(&copy, compute.into());
            let (_, y_plain) = run(&tiny().join("sdxl"), compute.into());
            assert_eq!(unet.conv_in.weight.dtype(), store);
            assert_eq!(unet.conv_in.bias.as_ref().unwrap().dtype(), compute);
            assert_eq!(unet.conv_norm_out.weight.dtype(), compute);
            assert_eq!(unet.dtype(), compute);
            assert!(
                y_held
                    .iter()
                    .zip(&y_file)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{store} held at {compute} differs from the fp8 checkpoint"
            );
            assert!(y_held != y_plain, "{store} rounding changed nothing");
        }
    }
}

/// A weight e4m3fn cannot hold (largest 448) is refused naming it, instead of turning into NaN.
#[test]
fn a_weight_too_large_for_float8_is_refused_by_name() {
    let (cfg, mut tensors, origin) =
        UNet2DConditionModel::diffusers_tensors(tiny().join("sdxl")).unwrap();
    let key = "conv_in.weight";
    let big = tensors[key]
        .to_dtype(DType::F32)
        .unwrap()
        .affine(0.0, 1000.0)
        .unwrap();
    tensors.insert(key.to_string(), big);
    let precision = Precision {
        compute: DType::F32,
        matrices: Some(DType::F8E4M3),
    };
    let err = UNet2DConditionModel::from_tensors(
        tensors.clone(),
        origin.clone(),
        &cfg,
        precision,
        Device::Cpu,
    )
    .expect_err("refused")
    .to_string();
    assert!(
        err.contains(key) && err.contains("f8e4m3") && err.contains("1000"),
        "{err}"
    );
    // e5m2 reaches 57344: the same weight fits there.
    let wide = Precision {
        compute: DType::F32,
        matrices: Some(DType::F8E5M2),
    };
    assert!(UNet2DConditionModel::from_tensors(tensors, origin, &cfg, wide, Device::Cpu).is_ok());
}

/// Generation and training with `--weight-dtype` give exactly what the fp8 checkpoint gives
/// (the same PNG; the same adapter, every tensor) and record the setting.
#[test]
fn generate_and_train_with_float8_weights_equal_the_fp8_checkpoint() {
    let dir = scratch("cli");
    let copy = fp8_copy(Dtype::F8_E4M3, &dir);
    let png = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let held = png("held.png");
    let file = png("file.png");
    let plain = png("plain.png");
    let o = generate_tiny(&[
        "--dtype",
        "bf16",
        "--weight-dtype",
        "fp8-e4m3fn",
        "--out",
        &held,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("UNet weights f8e4m3"));
    let o = generate_model(&copy, "1", &["--dtype", "bf16", "--out", &file]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = generate_tiny(&["--dtype", "bf16", "--out", &plain]);
    assert!(o.status.success());
    let read = |p: &str| std::fs::read(p).unwrap();
    assert_eq!(
        read(&held),
        read(&file),
        "generation differs from the fp8 checkpoint"
    );
    assert_ne!(read(&held), read(&plain), "float8 storage changed nothing");

    let data = dataset(&dir);
    let (a, b) = (dir.join("held.safetensors"), dir.join("file.safetensors"));
    let steps = ["--max-steps", "2", "--dtype", "bf16"];
    let o = train(
        &data,
        &a,
        "kstyle",
        &[&steps[..], &["--weight-dtype", "fp8-e4m3fn"]].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = train_model(&copy, &data, &b, "kstyle", &steps);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ta, tb) = (tensors(&a), tensors(&b));
    assert_eq!(ta.len(), tb.len());
    for ((ka, va), (kb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(ka, kb);
        assert!(
            va == vb,
            "adapter tensor {ka} differs from training on the fp8 checkpoint"
        );
    }
    let meta = kstyle::tensor::SafeTensorsFile::open(&a)
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(
        meta.get("kstyle.train.weight_dtype").map(String::as_str),
        Some("f8e4m3")
    );
    assert_eq!(
        meta.get("kstyle.train.dtype").map(String::as_str),
        Some("bf16")
    );
}

/// The help's claim, from SDXL base's config: Linear and conv weights are all but about 0.06% of
/// the UNet's parameters, so float8 storage takes it from 5.1 GB (bf16) to 2.6 GB.
#[test]
fn sdxl_base_unet_halves_in_float8() {
    use kstyle::models::unet::{param_shapes, UNetConfig};
    let shapes = param_shapes(&UNetConfig::sdxl_base());
    let (mut matrices, mut rest) = (0usize, 0usize);
    for (name, shape) in &shapes.0 {
        let n: usize = shape.iter().product();
        if is_matrix(name, shape) {
            matrices += n;
        } else {
            rest += n;
        }
    }
    assert_eq!(matrices + rest, 2_567_463_684);
    let share = rest as f64 / (matrices + rest) as f64;
    assert!(
        share < 0.001,
        "{rest} parameters ({share:.4}) are not matrices"
    );
    let gb = |bytes: usize| bytes as f64 / 1e9;
    let (bf16, fp8) = (gb(2 * (matrices + rest)), gb(matrices + 2 * rest));
    eprintln!("SDXL base UNet: {matrices} in matrices, {rest} others ({:.3}%); {bf16:.3} GB in bf16, {fp8:.3} GB with float8 matrices", 100.0 * share);
    assert!(
        (bf16 - 5.13).abs() < 0.01 && (fp8 - 2.57).abs() < 0.01,
        "{bf16} GB -> {fp8} GB"
    );
}
