//! `kstyle generate` with other model files beside the base: a refiner (folder or single file)
//! and its LoRA, textual-inversion embeddings, and a replacement VAE.

use super::common::{self, tiny, tmp};
use std::path::{Path, PathBuf};

/// `--refiner`: the base runs to the switch and a refiner folder (no first text encoder, five
/// time ids) finishes every seed; the refiner folder also generates on its own; bad switches
/// are refused before anything loads.
#[test]
fn a_refiner_folder_finishes_the_base_run() {
    let dir = tmp("refiner");
    let refiner = common::tiny_refiner_folder(&dir);
    let out = dir.join("img.png");
    let o = common::generate_tiny_steps(
        "6",
        &[
            "--refiner",
            refiner.to_str().unwrap(),
            "--refiner-switch",
            "0.7",
            "--seed",
            "1,2",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("from 0.7 of the schedule"), "{err}");
    for seed in [1, 2] {
        let p = dir.join(format!("img-{seed}.png"));
        assert_eq!(image::open(&p).unwrap().to_rgb8().dimensions(), (64, 64));
    }
    let alone = dir.join("alone.png");
    let o = common::generate_model(&refiner, "3", &["--out", alone.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(alone.exists());
    for (switch, needle) in [("1.5", "--refiner-switch"), ("0", "--refiner-switch")] {
        let o = common::generate_tiny(&[
            "--refiner",
            refiner.to_str().unwrap(),
            "--refiner-switch",
            switch,
            "--out",
            dir.join("x.png").to_str().unwrap(),
        ]);
        common::assert_fails_naming(&o, needle);
    }
    let o = common::generate_tiny(&["--refiner-switch", "0.5", "--out", "x.png"]);
    common::assert_fails_naming(&o, "--refiner");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--refiner-lora` goes to the refiner alone (the `refiner_lora` verify case checks its numbers
/// against diffusers): it changes the picture, the refiner line counts it, and a LoRA made for
/// the base is refused, naming the modules the refiner lacks, before the base run.
#[test]
fn refiner_loras_apply_to_the_refiner() {
    let dir = tmp("refiner-lora");
    let refiner = common::tiny_refiner_folder(&dir);
    let lora = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/extra/refiner_lora.safetensors")
        .to_str()
        .unwrap()
        .to_string();
    let run = |extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "--refiner",
            refiner.to_str().unwrap(),
            "--refiner-switch",
            "0.3",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        (common::generate_tiny_steps("4", &args), out)
    };
    let (o, plain) = run(&[], "plain.png");
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (o, styled) = run(&["--refiner-lora", &format!("{lora}:0.8")], "lora.png");
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("of the schedule | 1 LoRA file(s)"), "{err}");
    assert_ne!(
        std::fs::read(plain).unwrap(),
        std::fs::read(styled).unwrap()
    );
    // A LoRA made for the base, and a refiner path that is not there, fail before the base
    // model loads (its "kstyle generate: model" line is never printed).
    let base_lora = tiny().join("kohya_lora.safetensors");
    let (o, _) = run(&["--refiner-lora", base_lora.to_str().unwrap()], "x.png");
    common::assert_fails_naming(&o, "lora_unet_");
    common::assert_fails_naming(&o, "checking the refiner");
    assert!(!common::stderr(&o).contains("kstyle generate: model"));
    let o = common::generate_tiny(&[
        "--refiner",
        dir.join("no-such-refiner").to_str().unwrap(),
        "--out",
        dir.join("x.png").to_str().unwrap(),
    ]);
    common::assert_fails_naming(&o, "no-such-refiner");
    assert!(!common::stderr(&o).contains("kstyle generate: model"));
    let o = common::generate_tiny(&["--refiner-lora", &lora, "--out", "x.png"]);
    common::assert_fails_naming(&o, "--refiner");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A refiner as an original-layout single file (`sd_xl_refiner_1.0.safetensors` style) finishes
/// the run exactly as its folder does, byte for byte. Without `--refiner-config` the built-in
/// refiner architecture is used (the tiny weights do not fit it, and the error names the
/// tensors and the architecture). A refiner file with a base folder, or a base file with a
/// refiner folder, is refused saying which is which.
#[test]
fn a_single_file_refiner_finishes_as_its_folder_does() {
    let dir = tmp("refiner-single");
    let folder = common::tiny_refiner_folder(&dir);
    let file = common::tiny_refiner_single_file(&dir);
    let run = |refiner: &PathBuf, extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "--refiner",
            refiner.to_str().unwrap(),
            "--refiner-switch",
            "0.5",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        (common::generate_tiny_steps("4", &args), out)
    };
    let (o, from_folder) = run(&folder, &[], "folder.png");
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (o, from_file) = run(
        &file,
        &["--refiner-config", folder.to_str().unwrap()],
        "file.png",
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(
        std::fs::read(&from_folder).unwrap(),
        std::fs::read(&from_file).unwrap()
    );
    let (o, _) = run(&file, &[], "x.png");
    let err = common::stderr(&o);
    assert!(
        !o.status.success()
            && err.contains("tiny_refiner.safetensors")
            && err.contains("input_blocks.2.0.op.weight")
            && err.contains("read as the built-in SDXL refiner 1.0"),
        "{err}"
    );
    let base = tiny().join("sdxl");
    let (o, _) = run(
        &file,
        &["--refiner-config", base.to_str().unwrap()],
        "x.png",
    );
    common::assert_fails_naming(&o, "is an SDXL refiner (no first text encoder), but the");
    let base_file = tiny().join("sdxl_single_file.safetensors");
    let (o, _) = run(
        &base_file,
        &["--refiner-config", folder.to_str().unwrap()],
        "x.png",
    );
    common::assert_fails_naming(&o, "is not an SDXL refiner, but the");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--embedding FILE[:NAME]`: an SDXL textual-inversion file (the `textual_inversion` verify case
/// checks its numbers against diffusers) changes the picture where a prompt names it, under its
/// file stem by default and for the refiner too; SD 1.x embeddings, names the vocabulary already
/// has and vectors of the wrong width are refused naming the file.
#[test]
fn textual_inversion_embeddings_reach_the_encoders() {
    let dir = tmp("embeddings");
    let extra = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extra");
    let file = extra.join("ti_hanokstyle.safetensors");
    let file = file.to_str().unwrap();
    let run = |args: &[&str], out: &str| {
        let out = dir.join(out);
        let mut all = vec!["--out", out.to_str().unwrap()];
        all.extend_from_slice(args);
        (common::generate_tiny_steps("3", &all), out)
    };
    let (o, plain) = run(&["--negative", "hanokstyle roof"], "plain.png");
    assert!(o.status.success(), "{}", common::stderr(&o));
    let named = format!("{file}:hanokstyle");
    let (o, with) = run(
        &["--negative", "hanokstyle roof", "--embedding", &named],
        "with.png",
    );
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("embedding: hanokstyle (2 vector(s))"), "{err}");
    assert_ne!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&with).unwrap()
    );
    // Unnamed, the file stem is the word; a prompt without it gives the plain picture.
    let (o, unused) = run(
        &["--negative", "hanokstyle roof", "--embedding", file],
        "unused.png",
    );
    let err = common::stderr(&o);
    assert!(err.contains("embedding: ti_hanokstyle (2"), "{err}");
    assert_eq!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&unused).unwrap()
    );
    // The refiner (text_encoder_2 alone) takes the clip_g rows.
    let refiner = common::tiny_refiner_folder(&dir);
    let (o, _) = run(
        &[
            "--negative",
            "hanokstyle",
            "--embedding",
            &named,
            "--refiner",
            refiner.to_str().unwrap(),
            "--refiner-switch",
            "0.5",
        ],
        "refined.png",
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    // Refusals.
    let zeros = |n: usize, d: usize| {
        kstyle::Tensor::from_vec(vec![0f32; n * d], (n, d), kstyle::Device::Cpu).unwrap()
    };
    let write = |name: &str, tensors: Vec<(&str, kstyle::Tensor)>| {
        let p = dir.join(name);
        let t: Vec<(String, kstyle::Tensor)> = tensors
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        kstyle::tensor::save_safetensors(&p, &t, None).unwrap();
        p.to_str().unwrap().to_string()
    };
    let sd1 = write("sd1.safetensors", vec![("emb_params", zeros(1, 768))]);
    let narrow = write(
        "narrow.safetensors",
        vec![("clip_l", zeros(1, 16)), ("clip_g", zeros(1, 32))],
    );
    let house = format!("{file}:house");
    for (arg, needle) in [
        (sd1.as_str(), "an SD 1.x embedding"),
        (narrow.as_str(), "`clip_l` vectors are 16 wide"),
        (house.as_str(), "already in this tokenizer's vocabulary"),
    ] {
        let (o, out) = run(&["--embedding", arg], "refused.png");
        common::assert_fails_naming(&o, needle);
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--vae` replaces the model's VAE. Its own VAE in any form (the VAE folder, the pipeline
/// folder, the folder's file alone, the whole single-file checkpoint) gives the same PNG byte for
/// byte; another VAE (`vae_ldm.safetensors`, whose numbers the `vae_file` verify case checks
/// against diffusers) changes it, for the refiner too; files that are no VAE fail before any step
/// runs, naming the file.
#[test]
fn a_vae_file_or_folder_replaces_the_models_vae() {
    let dir = tmp("vae");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["--seed", "3", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = common::generate_tiny_steps("2", &args);
        (o, std::fs::read(&out).ok())
    };
    let (o, own) = run("own.png", &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let own = own.unwrap();
    let same = [
        tiny().join("sdxl/vae"),
        tiny().join("sdxl"),
        tiny().join("sdxl/vae/diffusion_pytorch_model.safetensors"),
        tiny().join("sdxl_single_file.safetensors"),
    ];
    for (i, vae) in same.iter().enumerate() {
        let (o, png) = run(&format!("same{i}.png"), &["--vae", vae.to_str().unwrap()]);
        let err = common::stderr(&o);
        assert!(o.status.success(), "{}: {err}", vae.display());
        assert!(err.contains("vae: "), "{err}");
        assert!(
            png.unwrap() == own,
            "{}: a different picture",
            vae.display()
        );
    }
    let other = tiny().join("../extra/vae_ldm.safetensors");
    let (o, png) = run("other.png", &["--vae", other.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(
        png.unwrap() != own,
        "the other VAE decoded the same picture"
    );

    let refiner = common::tiny_refiner_folder(&dir);
    let with_refiner = |name: &str, vae: &Path| {
        run(
            name,
            &[
                "--refiner",
                refiner.to_str().unwrap(),
                "--vae",
                vae.to_str().unwrap(),
            ],
        )
    };
    let (o, refined_own) = with_refiner("r-own.png", &tiny().join("sdxl/vae"));
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (o, refined_other) = with_refiner("r-other.png", &other);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(refined_own.unwrap() != refined_other.unwrap());

    let unet = tiny().join("sdxl/unet/diffusion_pytorch_model.safetensors");
    let truncated = dir.join("truncated.safetensors");
    let bytes = std::fs::read(&other).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let missing = dir.join("missing.safetensors");
    for (vae, needle) in [
        (&unet, "not an SDXL-family VAE file"),
        (&truncated, "truncated.safetensors"),
        (&missing, "no such VAE folder or file"),
    ] {
        let (o, png) = run("bad.png", &["--vae", vae.to_str().unwrap()]);
        common::assert_fails_naming(&o, needle);
        assert!(png.is_none());
        // With a refiner the VAE is checked before the base run, too.
        let (o, _) = with_refiner("bad.png", vae);
        common::assert_fails_naming(&o, needle);
        assert!(!common::stderr(&o).contains("kstyle generate: model"));
    }
}
