//! `kstyle train` and `kstyle export` through the real binary on the tiny model: the four
//! methods, exact resume, export round trips and clean failures on bad input.

mod common;
use common::train::{dataset, diffusion, tensors, train, train_model};
use common::{assert_fails_naming, generate_tiny, kstyle, tiny, tmp};

use kstyle::formats::adapter::Adapter;
use kstyle::models::unet::{KohyaLoraFile, UNet2DConditionModel};
use kstyle::sample::pipeline::unet_module_index;
use kstyle::tensor::SafeTensorsFile;
use kstyle::{DType, Device};
use std::path::{Path, PathBuf};

#[test]
fn every_method_trains_and_its_adapter_generates() {
    let dir = tmp("methods");
    let data = dataset(&dir);
    for method in ["kstyle", "lora", "lora-csl", "gating"] {
        let out = dir.join(method).join("adapter.safetensors");
        let o = train(
            &data,
            &out,
            method,
            &[
                "--max-steps",
                "2",
                "--sample-every",
                "2",
                "--sample-prompt",
                "a [v] house",
                "--sample-steps",
                "2",
            ],
        );
        assert!(
            o.status.success(),
            "{method}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let stem = dir.join(method);
        for f in [
            "adapter.safetensors",
            "adapter.loss.csv",
            "adapter.loss.png",
            "adapter.samples/step000002.png",
        ] {
            assert!(stem.join(f).exists(), "{method}: {f} missing");
        }
        let csv = std::fs::read_to_string(stem.join("adapter.loss.csv")).unwrap();
        assert_eq!(
            csv.lines().count(),
            3,
            "{method}: header + one row per step:\n{csv}"
        );
        let meta = SafeTensorsFile::open(&out).unwrap().metadata().clone();
        assert_eq!(meta["kstyle.method"], method);
        let img = dir.join(format!("{method}.png"));
        let lora = format!("{}:0.8", out.display());
        let g = generate_tiny(&["--lora", &lora, "--out", img.to_str().unwrap()]);
        assert!(
            g.status.success(),
            "{method} adapter in generate: {}",
            String::from_utf8_lossy(&g.stderr)
        );
    }
}

/// Stop at step 2, resume to 4: the adapter and the loss log are bit-identical to a straight run
/// of 4 steps, with the UNet in f32 and in bf16 (mixed precision), and with the noise offset's
/// and flip augmentation's extra draws and min-SNR weights.
#[test]
fn resuming_gives_bit_identical_adapters() {
    let options = [
        "--flip-aug",
        "--noise-offset",
        "0.1",
        "--min-snr-gamma",
        "5",
        "--lr-schedule",
        "cosine",
        "--warmup",
        "1",
    ];
    for (dtype, extra) in [("f32", &[][..]), ("bf16", &[]), ("f32", &options)] {
        let tag = format!("{dtype}{}", if extra.is_empty() { "" } else { "-options" });
        let dir = tmp(&format!("resume-{tag}"));
        let data = dataset(&dir);
        let cache = dir.join("cache");
        let c = [
            &["--cache", cache.to_str().unwrap(), "--dtype", dtype][..],
            extra,
        ]
        .concat();
        common::train::assert_resume_is_exact(&data, &dir, "kstyle", &c, &tag);
    }
}

/// The first step's losses depend only on the forward (the adapter is still its init): with the
/// UNet in bf16 they must differ from f32's (it really ran in bf16) by no more than the bf16
/// forward tolerance, and the adapter the run writes stays f32.
#[test]
fn bf16_training_writes_f32_adapters_and_tracks_the_f32_losses() {
    let dir = tmp("bf16-train");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let mut first = Vec::new();
    for dtype in ["f32", "bf16"] {
        let out = dir.join(format!("{dtype}/adapter.safetensors"));
        let o = train(
            &data,
            &out,
            "kstyle",
            &[
                "--max-steps",
                "1",
                "--dtype",
                dtype,
                "--cache",
                cache.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let row = common::first_losses(&out);
        first.push(row); // loss, diffusion, cultural
        let f = SafeTensorsFile::open(&out).unwrap();
        for n in f.names() {
            assert_eq!(f.tensor(n).unwrap().dtype(), DType::F32, "{dtype}: {n}");
        }
    }
    let tol = kstyle::tolerance::Tolerance::BF16_FORWARD.rel;
    for (i, what) in ["loss", "diffusion", "cultural"].iter().enumerate() {
        let (a, b) = (first[0][i], first[1][i]);
        let rel = (a - b).abs() / a.abs();
        assert!(
            rel > 0.0 && rel <= tol,
            "{what}: f32 {a}, bf16 {b} (rel {rel:.2e}, limit {tol})"
        );
    }
}

/// `--save-precision f16` (and kohya's spelling `fp16`) writes the same run's adapter with every
/// tensor but the alphas rounded once to f16 from the f32 values (bit for bit what casting the
/// f32 file gives), the alphas f32, a smaller file, and the checkpoints still f32; generate
/// loads it.
#[test]
fn save_precision_rounds_the_written_adapter_once() {
    let dir = tmp("save-precision");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let c = ["--max-steps", "2", "--cache", cache.to_str().unwrap()];
    let full = dir.join("f32/a.safetensors");
    let o = train(&data, &full, "kstyle", &c);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let half = dir.join("f16/a.safetensors");
    let extra = ["--save-precision", "fp16", "--save-every", "2"];
    let o = train(&data, &half, "kstyle", &[&c[..], &extra].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (f, h) = (
        SafeTensorsFile::open(&full).unwrap(),
        SafeTensorsFile::open(&half).unwrap(),
    );
    let names: Vec<&str> = f.names().collect();
    assert_eq!(names.len(), h.names().count());
    assert!(
        names.iter().any(|n| n.starts_with("kstyle.gate.")),
        "a gated adapter"
    );
    for n in names {
        let (a, b) = (f.tensor(n).unwrap(), h.tensor(n).unwrap());
        if n.ends_with(".alpha") {
            assert_eq!(b.dtype(), DType::F32, "{n}");
            assert_eq!(a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap(), "{n}");
        } else {
            assert_eq!(b.dtype(), DType::F16, "{n}");
            let rounded = a.to_dtype(DType::F16).unwrap();
            assert!(
                rounded.to_vec_f64().unwrap() == b.to_vec_f64().unwrap(),
                "{n}: not the f32 values rounded once"
            );
        }
    }
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(
        size(&half) * 10 < size(&full) * 6,
        "{} vs {}",
        size(&half),
        size(&full)
    );
    assert_eq!(
        h.metadata()
            .get("kstyle.train.save_precision")
            .map(String::as_str),
        Some("f16")
    );
    let ckpt = SafeTensorsFile::open(dir.join("f16/a.step000002.ckpt.safetensors")).unwrap();
    assert!(ckpt
        .names()
        .all(|n| ckpt.tensor(n).unwrap().dtype() == DType::F32));
    let img = dir.join("f16.png");
    let g = generate_tiny(&[
        "--lora",
        half.to_str().unwrap(),
        "--out",
        img.to_str().unwrap(),
    ]);
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
}

#[test]
fn plain_lora_exported_as_kohya_reproduces_the_adapter_unet_output() {
    let dir = tmp("export");
    let data = dataset(&dir);
    let adapter = dir.join("lora/adapter.safetensors");
    // lr 1e-2 so that B moves well away from zero in two steps.
    let o = train(
        &data,
        &adapter,
        "lora",
        &["--max-steps", "2", "--lr", "1e-2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let kohya = dir.join("exported.safetensors");
    let model = tiny().join("sdxl");
    let o = kstyle(&[
        "export",
        adapter.to_str().unwrap(),
        "--format",
        "kohya",
        "--dtype",
        "f32",
        "--model",
        model.to_str().unwrap(),
        "--out",
        kohya.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Live adapter vs kohya merge at load, on the fixture's UNet inputs.
    let mut live = UNet2DConditionModel::from_diffusers(&model, &[], DType::F32, Device::Cpu)
        .unwrap()
        .model;
    let ad = Adapter::load(&adapter, &unet_module_index(&live), Device::Cpu).unwrap();
    let mut by_path: std::collections::HashMap<_, _> = ad.modules.into_iter().collect();
    assert!(live.attach_adapters(|p, _| Ok(by_path.remove(p))).unwrap() > 0);
    let merged = UNet2DConditionModel::from_diffusers(
        &model,
        &[KohyaLoraFile::new(&kohya, 1.0)],
        DType::F32,
        Device::Cpu,
    )
    .unwrap()
    .model;
    let plain = UNet2DConditionModel::from_diffusers(&model, &[], DType::F32, Device::Cpu)
        .unwrap()
        .model;
    let run = common::tiny_unet_output;
    let (y_live, y_merged, y_plain) = (run(&live), run(&merged), run(&plain));
    assert!(
        common::rel_l2(&y_live, &y_plain) > 1e-3,
        "the adapter must change the output for this test to mean anything"
    );
    // f32 live update vs an f64 merge rounded once: both are within f32 rounding of the truth.
    assert!(
        common::rel_l2(&y_merged, &y_live) < 1e-5,
        "kohya merge differs from the live adapter: {}",
        common::rel_l2(&y_merged, &y_live)
    );
}

#[test]
fn gated_adapters_export_only_with_baked_gates() {
    let dir = tmp("bake");
    let data = dataset(&dir);
    let adapter = dir.join("k/adapter.safetensors");
    assert!(train(&data, &adapter, "kstyle", &["--max-steps", "1"])
        .status
        .success());
    let model = tiny().join("sdxl");
    let out = dir.join("k.safetensors");
    let o = kstyle(&[
        "export",
        adapter.to_str().unwrap(),
        "--format",
        "kohya",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--bake-gates"));
    let prompts = dir.join("calib.txt");
    std::fs::write(&prompts, "a [v] house\na portrait\n").unwrap();
    let o = kstyle(&[
        "export",
        adapter.to_str().unwrap(),
        "--format",
        "diffusers",
        "--model",
        model.to_str().unwrap(),
        "--bake-gates",
        prompts.to_str().unwrap(),
        "--bake-size",
        "64",
        "--bake-steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = SafeTensorsFile::open(&out).unwrap();
    assert!(f.names().all(|n| n.starts_with("unet.")
        && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    assert_eq!(f.metadata()["kstyle.baked_gates"], "true");
}

#[test]
fn bad_training_input_fails_cleanly() {
    let dir = tmp("bad");
    let data = dataset(&dir);
    // A non-image file and a file that claims to be a PNG, one at a time.
    for (name, bytes) in [
        ("notes.md", "not an image"),
        ("broken.png", "this is no png"),
    ] {
        std::fs::write(data.join(name), bytes).unwrap();
        let o = train(
            &data,
            &dir.join("x.safetensors"),
            "lora",
            &["--max-steps", "1"],
        );
        assert_fails_naming(&o, name);
        std::fs::remove_file(data.join(name)).unwrap();
    }
    // A gated method without CLIP.
    let model = tiny().join("sdxl");
    let o = kstyle(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.join("y.safetensors").to_str().unwrap(),
        "--resolution",
        "64",
        "--max-steps",
        "1",
        "--caption-template",
        "x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--clip"), "{err}");
    // Resuming with another method.
    let a = dir.join("z/adapter.safetensors");
    assert!(train(
        &data,
        &a,
        "lora",
        &["--max-steps", "1", "--save-every", "1"]
    )
    .status
    .success());
    let ck = dir.join("z/adapter.step000001.ckpt.safetensors");
    let o = train(
        &data,
        &a,
        "kstyle",
        &["--max-steps", "2", "--resume", ck.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("step000001.ckpt"),
        "{err}"
    );
}

/// A v-prediction model trains on the v target (its loss checked against PyTorch by the
/// `train_vpred` verify case), with or without zero terminal SNR: finite losses and an adapter
/// that differs from the epsilon run of the same seed. Epsilon prediction on zero-SNR betas is
/// refused before anything is written.
#[test]
fn v_prediction_models_train_on_the_v_target() {
    let dir = tmp("vpred");
    let data = dataset(&dir);
    let model = dir.join("sdxl");
    common::copy_dir(&tiny().join("sdxl"), &model);
    let sched = model.join("scheduler/scheduler_config.json");
    let original =
        std::fs::read_to_string(tiny().join("sdxl/scheduler/scheduler_config.json")).unwrap();
    let (eps, v, zsnr) = (
        "\"prediction_type\": \"epsilon\"",
        "\"prediction_type\": \"v_prediction\"",
        (
            "\"rescale_betas_zero_snr\": false",
            "\"rescale_betas_zero_snr\": true",
        ),
    );
    assert!(original.contains(eps) && original.contains(zsnr.0));
    let train = |text: String, name: &str| {
        std::fs::write(&sched, text).unwrap();
        let out = dir.join(format!("{name}.safetensors"));
        let o = train_model(&model, &data, &out, "kstyle", &["--max-steps", "2"]);
        (o, out)
    };
    let (o, plain) = train(original.clone(), "eps");
    assert!(o.status.success(), "{}", common::stderr(&o));
    let mut adapters = vec![tensors(&plain)];
    for (name, text) in [
        ("v", original.replace(eps, v)),
        ("v-zsnr", original.replace(eps, v).replace(zsnr.0, zsnr.1)),
    ] {
        let (o, out) = train(text, name);
        let err = common::stderr(&o);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("objective: v-prediction"), "{err}");
        assert!(common::first_losses(&out).iter().all(|l| l.is_finite()));
        let t = tensors(&out);
        assert!(
            adapters.iter().all(|a| *a != t),
            "{name} trained the same adapter"
        );
        adapters.push(t);
    }
    let (o, out) = train(original.replace(zsnr.0, zsnr.1), "eps-zsnr");
    let err = common::stderr(&o);
    assert!(
        !o.status.success() && err.contains("rescale_betas_zero_snr") && err.contains("epsilon"),
        "{err}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An EDM model (Playground v2.5's scheduler and VAE statistics) trains EDM-style: the run says
/// so, resumes bit for bit, and its adapter generates on the model; --min-snr-gamma, which
/// weights by a DDPM SNR the model does not have, is refused.
#[test]
fn edm_models_train_edm_style() {
    let dir = tmp("train-edm");
    let data = dataset(&dir);
    let model = common::edm_folder(&dir);
    let cache = dir.join("cache");
    let c = ["--cache", cache.to_str().unwrap()];
    let straight = dir.join("a/adapter.safetensors");
    let o = train_model(
        &model,
        &data,
        &straight,
        "kstyle",
        &[&["--max-steps", "2"][..], &c].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("objective: EDM (sigmas 0.002 to 80"), "{log}");
    assert!(log.contains("latents_mean"), "{log}");
    let split = dir.join("b/adapter.safetensors");
    let o = train_model(
        &model,
        &data,
        &split,
        "kstyle",
        &[&["--max-steps", "1", "--save-every", "1"][..], &c].concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = dir.join("b/adapter.step000001.ckpt.safetensors");
    let o = train_model(
        &model,
        &data,
        &split,
        "kstyle",
        &[
            &["--max-steps", "2", "--resume", ckpt.to_str().unwrap()][..],
            &c,
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        tensors(&straight),
        tensors(&split),
        "resumed EDM run differs"
    );
    let png = dir.join("edm.png");
    let o = common::generate_model(
        &model,
        "2",
        &[
            "--lora",
            straight.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.join("snr/adapter.safetensors");
    let o = train_model(
        &model,
        &data,
        &out,
        "lora",
        &["--max-steps", "1", "--min-snr-gamma", "5"],
    );
    assert_fails_naming(&o, "--min-snr-gamma");
    assert!(!out.exists());
    for (args, needle) in [
        (
            &["--debiased-estimation-loss"][..],
            "--debiased-estimation-loss",
        ),
        (&["--loss-type", "huber"], "--loss-type huber"),
        (
            &["--v-pred-like-loss", "0.1"],
            "--scale-v-pred-loss-like-noise-pred and --v-pred-like-loss",
        ),
    ] {
        let o = train_model(
            &model,
            &data,
            &out,
            "lora",
            &[&["--max-steps", "1"][..], args].concat(),
        );
        assert_fails_naming(&o, needle);
        assert!(!out.exists());
    }
}

/// `--min-snr-gamma` (values checked against PyTorch by the `train_min_snr` verify case) weights
/// the logged diffusion loss (on a v-prediction model every weight is below 1, so each step's
/// loss is below the unweighted one from the same draws), records gamma in the adapter's
/// settings, and refuses values that are not positive numbers before anything is written.
#[test]
fn min_snr_gamma_weights_the_loss() {
    let dir = tmp("min-snr");
    let data = dataset(&dir);
    let model = v_prediction_model(&dir);
    let train = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.safetensors"));
        let mut args = vec!["--max-steps", "2"];
        args.extend_from_slice(extra);
        (train_model(&model, &data, &out, "lora", &args), out)
    };
    let (o, plain) = train("plain", &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (o, weighted) = train("weighted", &["--min-snr-gamma", "5"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (p, w) = (diffusion(&plain), diffusion(&weighted));
    assert_eq!(p.len(), 2);
    assert!(
        w.iter().zip(&p).all(|(w, p)| w.is_finite() && w < p),
        "{w:?} vs {p:?}"
    );
    let f = SafeTensorsFile::open(&weighted).unwrap();
    assert_eq!(f.meta_str("kstyle.train.min_snr_gamma").unwrap(), "5");
    for bad in ["0", "-1", "nan"] {
        let (o, out) = train(&format!("bad{bad}"), &["--min-snr-gamma", bad]);
        common::assert_fails_naming(&o, "--min-snr-gamma");
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tiny model with `prediction_type` v_prediction, copied under `dir`.
fn v_prediction_model(dir: &Path) -> PathBuf {
    let model = dir.join("sdxl");
    common::copy_dir(&tiny().join("sdxl"), &model);
    let sched = model.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&sched).unwrap();
    std::fs::write(
        &sched,
        text.replace(
            "\"prediction_type\": \"epsilon\"",
            "\"prediction_type\": \"v_prediction\"",
        ),
    )
    .unwrap();
    model
}

/// kohya's two v-prediction loss scales (weights checked against PyTorch by the
/// `train_loss_types` verify case): --scale-v-pred-loss-like-noise-pred on a v-prediction model
/// weights each sample below 1, --v-pred-like-loss on an epsilon model above 1, so each step's
/// logged loss is below / above the unweighted one from the same draws; each is recorded in the
/// adapter's settings, and refused on the other prediction type (as kohya refuses it) and for
/// values that are not positive numbers, before anything is written.
#[test]
fn v_prediction_loss_scales_weight_the_loss() {
    let dir = tmp("v-pred-scales");
    let data = dataset(&dir);
    let v_model = v_prediction_model(&dir);
    let eps_model = tiny().join("sdxl");
    let train = |model: &Path, name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.safetensors"));
        let args = [&["--max-steps", "2"][..], extra].concat();
        (train_model(model, &data, &out, "lora", &args), out)
    };
    let scale = ["--scale-v-pred-loss-like-noise-pred"];
    let like = ["--v-pred-like-loss", "0.25"];
    for (model, flags, below) in [(&v_model, &scale[..], true), (&eps_model, &like[..], false)] {
        let (o, plain) = train(model, &format!("plain-{below}"), &[]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let (o, weighted) = train(model, &format!("weighted-{below}"), flags);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let (p, w) = (diffusion(&plain), diffusion(&weighted));
        assert_eq!(p.len(), 2);
        assert!(
            w.iter()
                .zip(&p)
                .all(|(w, p)| w.is_finite() && (w < p) == below && w != p),
            "{flags:?}: {w:?} vs {p:?}"
        );
    }
    let f = SafeTensorsFile::open(dir.join("weighted-false.safetensors")).unwrap();
    assert_eq!(f.meta_str("kstyle.train.v_pred_like_loss").unwrap(), "0.25");
    assert_eq!(
        f.meta_str("kstyle.train.scale_v_pred_loss").unwrap(),
        "false"
    );
    for (model, flags, needle) in [
        (&eps_model, &scale[..], "predicts epsilon"),
        (&v_model, &like[..], "predicts v"),
        (
            &eps_model,
            &["--v-pred-like-loss", "0"][..],
            "--v-pred-like-loss",
        ),
        (
            &eps_model,
            &["--v-pred-like-loss", "nan"][..],
            "--v-pred-like-loss",
        ),
    ] {
        let (o, out) = train(model, "refused", flags);
        common::assert_fails_naming(&o, needle);
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--noise-offset` adds per-channel draws to the noise: other losses than the plain run from the
/// same seed, the offset recorded in the adapter's settings, and values below 0 or not numbers
/// refused before anything is written.
#[test]
fn noise_offset_changes_the_noise() {
    let dir = tmp("noise-offset");
    let data = dataset(&dir);
    let model = tiny().join("sdxl");
    let train = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.safetensors"));
        let mut args = vec!["--max-steps", "1"];
        args.extend_from_slice(extra);
        (train_model(&model, &data, &out, "lora", &args), out)
    };
    let (o, plain) = train("plain", &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (o, offset) = train("offset", &["--noise-offset", "0.1"]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (p, q) = (common::first_losses(&plain), common::first_losses(&offset));
    assert!(q[0].is_finite() && p[0] != q[0], "{p:?} vs {q:?}");
    let f = SafeTensorsFile::open(&offset).unwrap();
    assert_eq!(f.meta_str("kstyle.train.noise_offset").unwrap(), "0.1");
    for bad in ["-0.1", "nan", "inf"] {
        let (o, out) = train(&format!("bad{bad}"), &["--noise-offset", bad]);
        common::assert_fails_naming(&o, "--noise-offset");
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The MiB amounts of the `error:` line of `text` (a refused run's stderr), in order; the log
/// lines before it (the optimizer state's size among them) are not read.
fn mib_values(text: &str) -> Vec<f64> {
    let line = text.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[1].trim_end_matches([',', ';']) == "MiB")
        .filter_map(|w| w[0].parse().ok())
        .collect()
}

/// `--memory-budget`: an impossible budget stops with the measured numbers (resident state, then
/// the step peak under each checkpointing policy); a budget between the peaks makes `auto` choose
/// the fastest policy that fits; and the probe steps leave the run bit-identical to one that named
/// that policy itself.
#[test]
fn memory_budget_picks_the_fastest_checkpointing_that_fits() {
    let dir = tmp("memory-budget");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let c = ["--max-steps", "2", "--cache", cache.to_str().unwrap()];
    let run = |name: &str, extra: &[&str]| {
        train(
            &data,
            &dir.join(name).join("a.safetensors"),
            "kstyle",
            &[&c[..], extra].concat(),
        )
    };
    let o = run("tiny", &["--memory-budget", "1MiB"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success()
            && err.contains("--memory-budget 1.0 MiB")
            && err.contains("alone take"),
        "{err}"
    );
    let resident = mib_values(&err)[1];
    let just_resident = format!("{}MiB", resident + 0.5);
    let o = run("resident", &["--memory-budget", &just_resident]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success() && err.contains("checkpointing blocks peaks at"),
        "{err}"
    );
    let v = mib_values(&err); // budget, resident, none, every 2nd, blocks
    assert_eq!(v.len(), 5, "{err}");
    let (none, blocks) = (v[2], v[4]);
    assert!(blocks < none, "checkpointing must lower the peak: {err}");
    let between = format!("{}MiB", (blocks + v[3]) / 2.0);
    let o = run("auto", &["--memory-budget", &between]);
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{log}");
    assert!(log.contains("using checkpointing blocks"), "{log}");
    let o = run("named", &["--checkpointing", "blocks"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (
        tensors(&dir.join("auto/a.safetensors")),
        tensors(&dir.join("named/a.safetensors")),
    );
    assert!(a == b, "the probe steps changed the trained adapter");
}

/// A refiner (no first text encoder), as a folder or a single file, is refused for training by
/// name before any work.
#[test]
fn refiner_models_are_refused_for_training() {
    let dir = tmp("train-refiner");
    let data = dataset(&dir);
    let refiner = common::tiny_refiner_folder(&dir);
    let out = dir.join("x.safetensors");
    let o = train_model(&refiner, &data, &out, "lora", &["--max-steps", "1"]);
    common::assert_fails_naming(&o, "has no text_encoder");
    assert!(!out.exists());
    // The same as a single file, read with the built-in refiner architecture.
    let file = common::tiny_refiner_single_file(&dir);
    let o = train_model(&file, &data, &out, "lora", &["--max-steps", "1"]);
    common::assert_fails_naming(&o, "has no text_encoder");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `train --vae` encodes the pictures with another VAE. The model's own VAE folder named
/// explicitly trains the same adapter byte for byte; another VAE changes the losses and is
/// recorded by name; the latent cache keeps the two apart (a later run without --vae gets the
/// model's latents back, not the other VAE's); a file that is no VAE fails, naming it.
#[test]
fn a_vae_replaces_the_models_for_encoding() {
    let dir = tmp("train-vae");
    let data = dataset(&dir);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.safetensors"));
        let mut args = vec!["--max-steps", "1"];
        args.extend_from_slice(extra);
        (train(&data, &out, "lora", &args), out)
    };
    let (o, plain) = run("plain", &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let own = tiny().join("sdxl/vae");
    let (o, named) = run("own", &["--vae", own.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("vae: "));
    assert!(tensors(&plain) == tensors(&named));

    let other = tiny().join("../extra/vae_ldm.safetensors");
    let (o, changed) = run("other", &["--vae", other.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (p, q) = (common::first_losses(&plain), common::first_losses(&changed));
    assert!(q[0].is_finite() && p[0] != q[0], "{p:?} vs {q:?}");
    let f = SafeTensorsFile::open(&changed).unwrap();
    assert_eq!(
        f.meta_str("kstyle.train.vae").unwrap(),
        "vae_ldm.safetensors"
    );
    let f = SafeTensorsFile::open(&plain).unwrap();
    assert_eq!(f.meta_str("kstyle.train.vae").unwrap(), "model");

    let (o, again) = run("again", &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(tensors(&plain) == tensors(&again));

    let unet = tiny().join("sdxl/unet/diffusion_pytorch_model.safetensors");
    let (o, out) = run("bad", &["--vae", unet.to_str().unwrap()]);
    common::assert_fails_naming(&o, "not an SDXL-family VAE file");
    assert!(!out.exists());
}

/// `train --vae-tiling` at 192 pixels (beyond the tiny VAE's 128-pixel tile) encodes other
/// latents, so other losses; the latent cache keeps tiled and whole encodes apart.
#[test]
fn vae_tiling_encodes_large_pictures_in_tiles() {
    let dir = tmp("train-vae-tiling");
    let data = dataset(&dir);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(format!("{name}.safetensors"));
        let mut args = vec!["--max-steps", "1", "--resolution", "192"];
        args.extend_from_slice(extra);
        let o = train(&data, &out, "lora", &args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        out
    };
    let whole = run("whole", &[]);
    let tiled = run("tiled", &["--vae-tiling"]);
    let (p, q) = (common::first_losses(&whole), common::first_losses(&tiled));
    assert!(q[0].is_finite() && p[0] != q[0], "{p:?} vs {q:?}");
    let f = SafeTensorsFile::open(&tiled).unwrap();
    assert_eq!(f.meta_str("kstyle.train.vae_tiling").unwrap(), "true");
    let again = run("again", &[]);
    assert!(tensors(&whole) == tensors(&again));
}

/// A caption past CLIP's 77 tokens trains on its first 75 with a warning naming the file and
/// the dropped words.
#[test]
fn long_captions_are_cut_with_a_warning() {
    let dir = tmp("long-caption");
    let data = dataset(&dir);
    let long = format!("{} the very end", "a [v] palace at dusk, ".repeat(20));
    std::fs::write(data.join("a.txt"), &long).unwrap();
    let out = dir.join("long.safetensors");
    let o = train(&data, &out, "lora", &["--max-steps", "1"]);
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    let warning = err
        .lines()
        .find(|l| l.contains("is longer than CLIP's 77 tokens"))
        .unwrap_or_else(|| panic!("no warning: {err}"));
    assert!(
        warning.contains("a.png") && warning.ends_with("the very end\""),
        "{warning}"
    );
    assert_eq!(
        err.matches("longer than CLIP's").count(),
        1,
        "only a.png's caption is long: {err}"
    );
}
