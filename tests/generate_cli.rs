//! `kstyle generate` and `kstyle verify` through the real binary on the tiny model.

mod common;
#[path = "generate_cli/model_files.rs"]
mod model_files;
use common::{generate_tiny, kstyle, tiny, tmp};
use std::path::PathBuf;

#[test]
fn generate_reproduces_the_reference_png_within_one_level() {
    let dir = tmp("gen");
    let out = dir.join("out.png");
    let model = tiny().join("sdxl");
    let latents = tiny().join("reference/pipeline.safetensors");
    let o = kstyle(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a woman wearing a traditional dress",
        "--steps",
        "4",
        "--cfg",
        "5",
        "--width",
        "128",
        "--height",
        "128",
        "--latents",
        latents.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = image::open(&out).unwrap().to_rgb8();
    let reference = image::open(tiny().join("reference/pipeline.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(ours.dimensions(), reference.dimensions());
    let worst = ours
        .as_raw()
        .iter()
        .zip(reference.as_raw())
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "largest 8-bit difference {worst}");
}

#[test]
fn several_seeds_write_one_file_each() {
    let dir = tmp("seeds");
    let out = dir.join("img.png");
    let model = tiny().join("sdxl");
    let o = kstyle(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a house",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "3,4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (
        image::open(dir.join("img-3.png")).unwrap(),
        image::open(dir.join("img-4.png")).unwrap(),
    );
    assert_eq!(a.width(), 64);
    assert_ne!(
        a.to_rgb8().as_raw(),
        b.to_rgb8().as_raw(),
        "different seeds gave the same image"
    );
}

#[test]
fn bad_inputs_fail_cleanly_naming_the_culprit() {
    let dir = tmp("bad");
    let out = dir.join("x.png");
    let o = kstyle(&[
        "generate",
        "--model",
        "/no/such/model",
        "--prompt",
        "x",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/no/such/model"));
    // A truncated single-file checkpoint.
    let bytes = std::fs::read(tiny().join("sdxl_single_file.safetensors")).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let o = kstyle(&[
        "generate",
        "--model",
        cut.to_str().unwrap(),
        "--prompt",
        "x",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cut.safetensors") && !err.contains("panicked"),
        "{err}"
    );
    // A safetensors file that is not a LoRA, passed as one.
    let not_lora = tiny().join("reference/unet.safetensors");
    let o = generate_tiny(&[
        "--lora",
        not_lora.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not a LoRA file"),
        "{err}"
    );
    // Latents of the wrong shape (16x16 latents for a 64x64 request).
    let lat = tiny().join("reference/pipeline.safetensors");
    let o = generate_tiny(&[
        "--latents",
        lat.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("panicked"));
}

#[test]
fn verify_passes_every_case_on_the_tiny_fixtures() {
    let o = kstyle(&["verify", tiny().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let last = text.lines().last().unwrap();
    assert!(last.ends_with(" 0 failed"), "{last}");
    for case in [
        "single_file",
        "tokenizer",
        "text_encoders",
        "unet",
        "unet_kohya_lora",
        "vae",
        "pipeline",
        "clip",
        "lpips",
        "gated_lora_layer",
        "cultural_loss",
        "train_step_kstyle",
        "train_step_lora",
        "samplers",
        "img2img",
        "inpaint",
        "mask_crop",
        "refiner",
        "micro_conditioning",
        "edm",
        "refiner_lora",
        "textual_inversion",
        "train_vpred",
        "train_min_snr",
        "train_ip_noise",
        "train_loss_types",
        "train_clip_grad",
        "lora_dropout",
        "max_norm",
        "prodigy",
        "lion",
        "adamw8bit",
        "lion8bit",
        "adafactor",
        "train_targets",
        "train_locon",
        "train_loha",
        "train_lokr",
        "train_dora",
        "train_doha",
        "train_dokr",
        "lora_lycoris",
        "lora_peft",
        "lora_export",
        "vae_latent_stats",
        "vae_file",
        "clip_skip",
        "vae_tiling",
        "long_captions",
        "prompt_weighting",
        "prompt_editing",
        "weighted_captions",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(case)),
            "case {case} did not run"
        );
    }
}

#[test]
fn single_file_checkpoints_generate_the_same_image_as_the_folder() {
    let dir = tmp("single");
    let latents = tiny().join("reference/pipeline.safetensors");
    let run = |model: PathBuf, config: Option<PathBuf>, out: PathBuf| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--prompt".into(),
            "a woman wearing a traditional dress".into(),
            "--steps".into(),
            "4".into(),
            "--width".into(),
            "128".into(),
            "--height".into(),
            "128".into(),
            "--latents".into(),
            latents.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ];
        if let Some(c) = config {
            args.extend(["--config".to_string(), c.display().to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        kstyle(&refs)
    };
    let o = run(
        tiny().join("sdxl_single_file.safetensors"),
        Some(tiny().join("sdxl")),
        dir.join("single.png"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(tiny().join("sdxl"), None, dir.join("folder.png"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(dir.join("single.png")).unwrap(),
        std::fs::read(dir.join("folder.png")).unwrap()
    );
    // Without --config the built-in SDXL base architecture is used: the tiny weights do not fit
    // it, and the error names the tensor and both shapes.
    let o = run(
        tiny().join("sdxl_single_file.safetensors"),
        None,
        dir.join("x.png"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("token_embedding") && err.contains("768"),
        "{err}"
    );
}

/// A single file with ComfyUI's `v_pred` and `ztsnr` marker tensors (NoobAI-XL v-pred style) runs
/// as v-prediction on zero-terminal-SNR betas: the same PNG, byte for byte, as its folder with
/// `prediction_type: v_prediction` and `rescale_betas_zero_snr: true` in the scheduler config.
#[test]
fn single_file_v_prediction_markers_select_the_objective() {
    let dir = tmp("vpred-markers");
    let folder = common::vpred_folder(&dir, true);
    let markers = ["v_pred", "ztsnr"].map(|m| {
        let empty = kstyle::Tensor::from_vec(Vec::<f32>::new(), 0, kstyle::Device::Cpu).unwrap();
        (m.to_string(), empty)
    });
    let file = common::tiny_single_file_with(&dir, "vpred.safetensors", &[], markers.to_vec());
    let run = |model: &PathBuf, extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec!["--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        (common::generate_model(model, "4", &args), out)
    };
    let (o, from_folder) = run(&folder, &[], "folder.png");
    assert!(o.status.success(), "{}", common::stderr(&o));
    let config = tiny().join("sdxl");
    let (o, from_file) = run(&file, &["--config", config.to_str().unwrap()], "file.png");
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("(v-prediction, zero-SNR schedule)"), "{err}");
    assert_eq!(
        std::fs::read(&from_folder).unwrap(),
        std::fs::read(&from_file).unwrap()
    );
    // Without the markers the same weights run as epsilon: a different picture.
    let (o, plain) = run(
        &tiny().join("sdxl_single_file.safetensors"),
        &["--config", config.to_str().unwrap()],
        "plain.png",
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_ne!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&from_file).unwrap()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SDXL's micro-conditioning flags (the time ids checked against diffusers by the
/// `micro_conditioning` verify case): sizes are WIDTHxHEIGHT, corners TOP,LEFT; they change the
/// picture; a negative original size alone changes nothing in text to image (diffusers needs
/// both negative sizes); malformed values are refused naming the flag.
#[test]
fn micro_conditioning_flags_reach_the_time_ids() {
    let dir = tmp("micro");
    let run = |extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec!["--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        (common::generate_tiny_steps("3", &args), out)
    };
    let (o, plain) = run(&[], "plain.png");
    assert!(o.status.success(), "{}", common::stderr(&o));
    let micro = [
        "--original-size",
        "192x256",
        "--crop-top-left",
        "16,8",
        "--target-size",
        "40x72",
    ];
    let (o, sized) = run(&micro, "sized.png");
    assert!(o.status.success(), "{}", common::stderr(&o));
    let bytes = |p: &PathBuf| std::fs::read(p).unwrap();
    assert_ne!(bytes(&plain), bytes(&sized));
    let mut half = micro.to_vec();
    half.extend(["--negative-original-size", "48x32"]);
    let (o, half_negative) = run(&half, "half.png");
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(bytes(&sized), bytes(&half_negative));
    half.extend(["--negative-target-size", "56x80"]);
    let (o, negative) = run(&half, "negative.png");
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_ne!(bytes(&sized), bytes(&negative));
    for (flag, value) in [
        ("--original-size", "192"),
        ("--target-size", "0x64"),
        ("--crop-top-left", "16"),
        ("--negative-crop-top-left", "a,b"),
    ] {
        let (o, _) = run(&[flag, value], "x.png");
        common::assert_fails_naming(&o, flag);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// bf16 and f16 compute (weights and activations rounded, CPU widening per op) stay close to f32:
/// a coarse check that every op honours the dtype, not a parity claim.
#[test]
fn half_precision_generation_stays_close_to_f32() {
    let dir = tmp("dtype");
    let model = tiny().join("sdxl");
    let latents = tiny().join("reference/pipeline.safetensors");
    let mut images = Vec::new();
    for dt in ["f32", "bf16", "f16"] {
        let out = dir.join(format!("{dt}.png"));
        let o = kstyle(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a woman wearing a traditional dress",
            "--steps",
            "4",
            "--width",
            "128",
            "--height",
            "128",
            "--latents",
            latents.to_str().unwrap(),
            "--dtype",
            dt,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "{dt}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        images.push(image::open(&out).unwrap().to_rgb8().into_raw());
    }
    for (i, dt) in [(1, "bf16"), (2, "f16")] {
        let mean = images[0]
            .iter()
            .zip(&images[i])
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / images[0].len() as f64;
        println!("{dt}: mean 8-bit difference from f32 {mean:.3}");
        assert!(
            mean < 4.0,
            "{dt} drifts from f32 by {mean} levels on average"
        );
    }
}

/// The stochastic samplers (`euler-a`, `dpm2-a`, `dpmpp-sde`, `dpmpp-2s-sde`, `tcd`) draw their
/// step noise from the seed: the same seed gives the same image, and the same initial latents
/// with another seed's noise give another image.
#[test]
fn ancestral_noise_follows_the_seed() {
    let dir = tmp("euler-a");
    let latents = dir.join("init.safetensors");
    kstyle::tensor::save_safetensors(
        &latents,
        &[(
            "latents".to_string(),
            kstyle::Tensor::randn(
                (1, 4, 8, 8),
                &mut kstyle::tensor::Rng::new(1),
                kstyle::DType::F32,
                kstyle::Device::Cpu,
            )
            .unwrap(),
        )],
        None,
    )
    .unwrap();
    let run = |sampler: &str, seed: &str, name: &str| {
        let out = dir.join(format!("{sampler}-{name}"));
        let o = common::generate_tiny_steps(
            "3",
            &[
                "--sampler",
                sampler,
                "--latents",
                latents.to_str().unwrap(),
                "--seed",
                seed,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", common::stderr(&o));
        std::fs::read(out).unwrap()
    };
    for sampler in ["euler-a", "dpm2-a", "dpmpp-sde", "dpmpp-2s-sde", "tcd"] {
        assert!(
            run(sampler, "5", "a.png") == run(sampler, "5", "b.png"),
            "{sampler}: same seed, different images"
        );
        assert!(
            run(sampler, "5", "c.png") != run(sampler, "6", "d.png"),
            "{sampler}: the noise ignores the seed"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every `--sampler` name runs end to end and reports what it resolved to.
#[test]
fn every_sampler_name_generates_and_reports_itself() {
    let dir = tmp("sampler-names");
    for (name, reported) in [
        ("dpmpp-3m", "sampler: DPM++ 3M\n"),
        ("dpmpp-3m-karras", "sampler: DPM++ 3M Karras\n"),
        ("dpmpp-3m-sde", "sampler: DPM++ 3M SDE\n"),
        ("dpmpp-3m-sde-karras", "sampler: DPM++ 3M SDE Karras\n"),
        ("unipc", "sampler: UniPC (bh2, order 2)\n"),
        ("unipc-karras", "sampler: UniPC (bh2, order 2) Karras\n"),
        ("dpmpp-2m-sde-karras", "sampler: DPM++ 2M SDE Karras\n"),
        ("euler-a", "sampler: Euler a\n"),
        ("lcm", "sampler: LCM\n"),
        ("heun-karras", "sampler: Heun Karras\n"),
        ("lms", "sampler: LMS\n"),
        ("lms-karras", "sampler: LMS Karras\n"),
        ("dpm2", "sampler: DPM2\n"),
        ("dpm2-karras", "sampler: DPM2 Karras\n"),
        ("dpm2-a", "sampler: DPM2 a\n"),
        ("dpm2-a-karras", "sampler: DPM2 a Karras\n"),
        ("dpmpp-sde", "sampler: DPM++ SDE\n"),
        ("dpmpp-sde-karras", "sampler: DPM++ SDE Karras\n"),
        ("deis", "sampler: DEIS (order 2)\n"),
        ("deis-karras", "sampler: DEIS (order 2) Karras\n"),
        ("dpmpp-2s", "sampler: DPM++ 2S\n"),
        ("dpmpp-2s-karras", "sampler: DPM++ 2S Karras\n"),
        ("dpmpp-2s-sde", "sampler: DPM++ 2S SDE\n"),
        ("dpmpp-2s-sde-karras", "sampler: DPM++ 2S SDE Karras\n"),
        ("dpmpp-3s", "sampler: DPM++ 3S\n"),
        ("dpmpp-3s-karras", "sampler: DPM++ 3S Karras\n"),
        ("tcd", "sampler: TCD (gamma 0.3)\n"),
        ("auto", "sampler: Euler\n"),
    ] {
        let out = dir.join(format!("{name}.png"));
        let o =
            common::generate_tiny_steps("4", &["--sampler", name, "--out", out.to_str().unwrap()]);
        let err = common::stderr(&o);
        assert!(o.status.success(), "{name}: {err}");
        assert!(err.contains(reported), "{name}: {err}");
        assert!(out.exists(), "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--sigmas`: the ramp reaches the sampler (named in its report, changing the picture; `karras`
/// is the `-karras` name's picture byte for byte) and is refused for a sampler without sigmas
/// and against a `-karras` name asking for another ramp.
#[test]
fn sigmas_pick_the_ramp() {
    let dir = tmp("sigmas");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.png"));
        let mut args = vec!["--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        (common::generate_tiny_steps("4", &args), out)
    };
    let mut pictures = Vec::new();
    for (name, extra, reported) in [
        (
            "plain",
            &["--sampler", "dpmpp-2m"][..],
            "sampler: DPM++ 2M\n",
        ),
        (
            "beta",
            &["--sampler", "dpmpp-2m", "--sigmas", "beta"][..],
            "sampler: DPM++ 2M beta\n",
        ),
        (
            "exponential",
            &["--sampler", "dpmpp-2m", "--sigmas", "exponential"][..],
            "sampler: DPM++ 2M exponential\n",
        ),
        (
            "karras",
            &["--sampler", "dpmpp-2m", "--sigmas", "karras"][..],
            "sampler: DPM++ 2M Karras\n",
        ),
        (
            "named",
            &["--sampler", "dpmpp-2m-karras"][..],
            "sampler: DPM++ 2M Karras\n",
        ),
        ("auto", &["--sigmas", "beta"][..], "sampler: Euler beta\n"),
    ] {
        let (o, out) = run(name, extra);
        let err = common::stderr(&o);
        assert!(o.status.success(), "{name}: {err}");
        assert!(err.contains(reported), "{name}: {err}");
        pictures.push(std::fs::read(out).unwrap());
    }
    assert!(
        pictures[3] == pictures[4],
        "--sigmas karras differs from the -karras name"
    );
    for (i, j) in [(0, 1), (0, 2), (1, 2), (0, 3)] {
        assert!(
            pictures[i] != pictures[j],
            "pictures {i} and {j} are the same"
        );
    }
    let (o, out) = run("euler-a", &["--sampler", "euler-a", "--sigmas", "beta"]);
    common::assert_fails_naming(&o, "Euler a has no choice of sigmas");
    assert!(!out.exists());
    let (o, _) = run(
        "clash",
        &["--sampler", "euler-karras", "--sigmas", "exponential"],
    );
    common::assert_fails_naming(&o, "-karras name");
}

/// A folder whose scheduler is TCDScheduler runs TCD under `--sampler auto`, at gamma 0.3 or
/// `--eta`; `--eta` also reaches DDIM (its stochastic form); an eta outside 0..=1, or one given
/// to a sampler without one, is refused by name.
#[test]
fn eta_reaches_tcd_and_ddim() {
    let dir = tmp("tcd-generate");
    let model = dir.join("sdxl");
    common::copy_dir(&common::tiny().join("sdxl"), &model);
    let sched = model.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&sched)
        .unwrap()
        .replace("\"EulerDiscreteScheduler\"", "\"TCDScheduler\"");
    assert!(text.contains("TCDScheduler"));
    std::fs::write(&sched, text).unwrap();
    let run = |extra: &[&str]| {
        let out = dir.join("x.png");
        let mut args = vec!["--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        common::generate_model(&model, "4", &args)
    };
    for (extra, reported) in [
        (&[][..], "sampler: TCD (gamma 0.3)\n"),
        (&["--eta", "0.5"][..], "sampler: TCD (gamma 0.5)\n"),
    ] {
        let o = run(extra);
        let err = common::stderr(&o);
        assert!(
            o.status.success() && err.contains(reported),
            "{extra:?}: {err}"
        );
    }
    common::assert_fails_naming(&run(&["--eta", "1.5"]), "--eta");
    let ddim = dir.join("ddim.png");
    let args = [
        "--sampler",
        "ddim",
        "--eta",
        "0.5",
        "--out",
        ddim.to_str().unwrap(),
    ];
    let o = common::generate_tiny_steps("4", &args);
    let err = common::stderr(&o);
    assert!(
        o.status.success() && err.contains("sampler: DDIM (eta 0.5)\n"),
        "{err}"
    );
    let o = run(&["--sampler", "euler", "--eta", "0.5"]);
    common::assert_fails_naming(&o, "--eta");
    let o = common::generate_tiny_steps("4", &["--eta", "0.5", "--out", "x.png"]);
    common::assert_fails_naming(&o, "--eta");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--guidance-rescale` outside 0..=1 is refused by name before anything loads.
#[test]
fn guidance_rescale_out_of_range_is_refused() {
    let dir = tmp("guidance-rescale");
    let out = dir.join("x.png");
    let o = common::generate_tiny(&["--guidance-rescale", "1.5", "--out", out.to_str().unwrap()]);
    let err = common::stderr(&o);
    assert!(
        !o.status.success() && err.contains("--guidance-rescale"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// A v-prediction, zero-SNR model folder generates, with its kind in the sampler line, and
/// `--guidance-rescale` (its usual companion) runs.
#[test]
fn v_prediction_folders_generate_and_say_so() {
    let dir = tmp("vpred-generate");
    let model = dir.join("sdxl");
    common::copy_dir(&common::tiny().join("sdxl"), &model);
    let sched = model.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&sched)
        .unwrap()
        .replace(
            "\"prediction_type\": \"epsilon\"",
            "\"prediction_type\": \"v_prediction\"",
        )
        .replace(
            "\"rescale_betas_zero_snr\": false",
            "\"rescale_betas_zero_snr\": true",
        )
        .replace(
            "\"timestep_spacing\": \"leading\"",
            "\"timestep_spacing\": \"trailing\"",
        );
    std::fs::write(&sched, text).unwrap();
    let out = dir.join("v.png");
    let o = common::generate_model(
        &model,
        "3",
        &["--guidance-rescale", "0.7", "--out", out.to_str().unwrap()],
    );
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("sampler: Euler (v-prediction, zero-SNR schedule)"),
        "{err}"
    );
    assert!(out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--image`: an odd-sized picture runs at its size rounded down to multiples of 8 (or at the
/// size asked for), the run is the seed's alone, and bad strengths, files and combinations are
/// refused before any model loads.
#[test]
fn img2img_runs_from_an_image_file() {
    let dir = tmp("img2img");
    let input = dir.join("in.png");
    common::write_test_picture(&input);
    let model = tiny().join("sdxl");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        (common::generate_house(&model, &out, extra), out)
    };
    let img = input.to_str().unwrap();
    let (o, a) = run(
        "a.png",
        &["--image", img, "--strength", "0.5", "--seed", "3"],
    );
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("101x77) at 96x72, strength 0.5: the last 2 of 4 steps"),
        "{err}"
    );
    assert_eq!(image::open(&a).unwrap().to_rgb8().dimensions(), (96, 72));
    let (o, b) = run(
        "b.png",
        &["--image", img, "--strength", "0.5", "--seed", "3"],
    );
    assert!(o.status.success());
    let (o, c) = run(
        "c.png",
        &["--image", img, "--strength", "0.5", "--seed", "4"],
    );
    assert!(o.status.success());
    let bytes = |p: &PathBuf| std::fs::read(p).unwrap();
    assert!(bytes(&a) == bytes(&b), "same seed, different images");
    assert!(bytes(&a) != bytes(&c), "the seed does not reach the noise");
    let (o, d) = run(
        "d.png",
        &[
            "--image",
            img,
            "--width",
            "64",
            "--height",
            "48",
            "--sampler",
            "heun",
        ],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(image::open(&d).unwrap().to_rgb8().dimensions(), (64, 48));

    let (o, out) = run("e.png", &["--image", img, "--strength", "0.1"]);
    common::assert_fails_naming(&o, "--strength 0.1");
    assert!(!out.exists());
    let (o, _) = run("e.png", &["--image", img, "--strength", "1.5"]);
    common::assert_fails_naming(&o, "strength must be between 0 and 1");
    let (o, _) = run("e.png", &["--strength", "0.5"]);
    common::assert_fails_naming(&o, "--image");
    let (o, _) = run("e.png", &["--image", img, "--width", "60"]);
    common::assert_fails_naming(&o, "multiples of 8, got 60x72");
    let latents = tiny().join("reference/pipeline.safetensors");
    let (o, _) = run(
        "e.png",
        &["--image", img, "--latents", latents.to_str().unwrap()],
    );
    common::assert_fails_naming(&o, "cannot be used with");
    let not_image = dir.join("notes.png");
    std::fs::write(&not_image, "not a picture").unwrap();
    let (o, _) = run("e.png", &["--image", not_image.to_str().unwrap()]);
    common::assert_fails_naming(&o, "notes.png");
    let (o, _) = run(
        "e.png",
        &["--image", dir.join("missing.png").to_str().unwrap()],
    );
    common::assert_fails_naming(&o, "missing.png");
    assert!(!dir.join("e.png").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--clip-skip` (numbers: the `clip_skip` verify case): 0 is the default picture byte for
/// byte, 1 another one, and more layers than the tiny encoders have (3) is refused by name, for
/// a refiner before the base run.
#[test]
fn clip_skip_picks_an_earlier_layer() {
    let dir = tmp("clip-skip");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["--negative", "blurry", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = common::generate_tiny_steps("2", &args);
        (o, std::fs::read(&out).ok())
    };
    let (o, plain) = run("plain.png", &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (o, zero) = run("zero.png", &["--clip-skip", "0"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(plain == zero);
    let (o, one) = run("one.png", &["--clip-skip", "1"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(one.is_some() && plain != one);
    // With a refiner the refiner's encoders are checked too, before the base run.
    let refiner = common::tiny_refiner_folder(&dir);
    let r = ["--clip-skip", "3", "--refiner", refiner.to_str().unwrap()];
    let (o, png) = run("refined.png", &r);
    common::assert_fails_naming(&o, "--clip-skip for the refiner");
    assert!(!common::stderr(&o).contains("kstyle generate: model"));
    assert!(png.is_none());
    let (o, png) = run("three.png", &["--clip-skip", "3"]);
    common::assert_fails_naming(&o, "--clip-skip");
    assert!(
        common::stderr(&o).contains("at most 2"),
        "{}",
        common::stderr(&o)
    );
    assert!(png.is_none());
}

/// `--vae-tiling` (numbers: the `vae_tiling` verify case): a picture within one tile (the tiny
/// VAE's 128 pixels) decodes exactly as without it, a larger one in blended tiles, differently;
/// img2img encodes the larger picture in tiles too.
#[test]
fn vae_tiling_applies_beyond_one_tile() {
    let dir = tmp("vae-tiling");
    let run = |name: &str, size: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["--width", size, "--height", size, "--seed", "2"];
        args.extend_from_slice(extra);
        let o = common::generate_house(&tiny().join("sdxl"), &out, &args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        std::fs::read(out).unwrap()
    };
    assert!(run("small.png", "64", &[]) == run("small-tiled.png", "64", &["--vae-tiling"]));
    let whole = run("large.png", "192", &[]);
    let tiled = run("large-tiled.png", "192", &["--vae-tiling"]);
    assert!(whole != tiled);
    let picture = dir.join("picture.png");
    common::write_test_picture(&picture);
    let image = ["--image", picture.to_str().unwrap(), "--strength", "0.5"];
    let whole = run("img2img.png", "192", &image);
    let mut tiled_args = image.to_vec();
    tiled_args.push("--vae-tiling");
    assert!(whole != run("img2img-tiled.png", "192", &tiled_args));
}

/// A prompt past CLIP's 77 tokens is cut as diffusers cuts it, with a warning quoting the
/// dropped words; a short negative prompt gets none.
#[test]
fn long_prompts_warn_about_the_dropped_words() {
    let dir = tmp("long-prompt");
    let out = dir.join("long.png");
    let prompt = format!("{} and the very end", "a hanok house at dusk, ".repeat(20));
    let o = kstyle(&[
        "generate",
        "--model",
        tiny().join("sdxl").to_str().unwrap(),
        "--prompt",
        &prompt,
        "--negative",
        "blurry",
        "--steps",
        "1",
        "--width",
        "64",
        "--height",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(
        warnings[0].starts_with("warning: --prompt is longer than CLIP's 77 tokens")
            && warnings[0].ends_with("and the very end\""),
        "{}",
        warnings[0]
    );
    assert!(out.exists());
}
