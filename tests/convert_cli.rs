//! `kstyle convert`: a diffusers folder to the original single-file layout and back, checked
//! against files made by others: the reference generator's tiny single file, and the tiny
//! refiner file diffusers' own loader reads back (`gen_refiner_single_file.py`).

mod common;
use common::{kstyle, tiny, tmp};
use kstyle::formats::diffusers::DiffusersFolder;
use kstyle::formats::{MappedFile, TensorMap};
use std::path::Path;

fn convert(model: &Path, to: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "convert",
        "--model",
        model.to_str().unwrap(),
        "--to",
        to,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kstyle(&args)
}

/// Same keys (but `skip`), dtypes, shapes and bytes.
fn assert_same(what: &str, got: &TensorMap<'_>, want: &TensorMap<'_>, skip: &[&str]) {
    let keys = |m: &TensorMap<'_>| -> Vec<String> {
        m.keys()
            .filter(|k| !skip.contains(&k.as_str()))
            .cloned()
            .collect()
    };
    assert_eq!(keys(got), keys(want), "{what}: key sets differ");
    for k in keys(want) {
        let (g, w) = (&got[&k], &want[&k]);
        assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape), "{what}: {k}");
        assert!(g.data[..] == w.data[..], "{what}: {k}: bytes differ");
    }
}

/// The tiny folder as a single file is the reference generator's own single file, tensor for
/// tensor and byte for byte (its OpenCLIP `logit_scale`, which no diffusers folder holds, aside).
#[test]
fn a_folder_becomes_the_reference_single_file() {
    let dir = tmp("convert-base");
    let out = dir.join("tiny.safetensors");
    let o = convert(&tiny().join("sdxl"), "single-file", &out, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (ours, theirs) = (
        MappedFile::open(&out).unwrap(),
        MappedFile::open(tiny().join("sdxl_single_file.safetensors")).unwrap(),
    );
    let theirs = theirs.tensors().unwrap();
    assert!(theirs.contains_key("conditioner.embedders.1.model.logit_scale"));
    let mut without = theirs.clone();
    without.remove("conditioner.embedders.1.model.logit_scale");
    assert_same("single file", &ours.tensors().unwrap(), &without, &[]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tiny refiner folder as a single file is the file diffusers' `from_single_file` loads
/// back to that folder: no first text encoder, the OpenCLIP tower as embedder 0.
#[test]
fn a_refiner_folder_becomes_the_diffusers_checked_refiner_file() {
    let dir = tmp("convert-refiner");
    let folder = common::tiny_refiner_folder(&dir);
    let reference = common::tiny_refiner_single_file(&dir);
    let out = dir.join("converted.safetensors");
    let o = convert(&folder, "single-file", &out, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (ours, theirs) = (
        MappedFile::open(&out).unwrap(),
        MappedFile::open(&reference).unwrap(),
    );
    assert_same(
        "refiner file",
        &ours.tensors().unwrap(),
        &theirs.tensors().unwrap(),
        &["conditioner.embedders.0.model.logit_scale"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tiny single file (read with the tiny folder's configs) becomes a folder whose every
/// component holds the tiny folder's tensors, with its configs, tokenizers and scheduler; it
/// generates the same picture as the original folder.
#[test]
fn a_single_file_becomes_a_folder() {
    let dir = tmp("convert-folder");
    let out = dir.join("tiny-folder");
    let config = tiny().join("sdxl");
    let o = convert(
        &tiny().join("sdxl_single_file.safetensors"),
        "diffusers",
        &out,
        &["--config", config.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (ours, theirs) = (
        DiffusersFolder::open(&out).unwrap(),
        DiffusersFolder::open(&config).unwrap(),
    );
    for name in ["unet", "text_encoder", "text_encoder_2", "vae"] {
        let (a, b) = (
            ours.component(name, None).unwrap(),
            theirs.component(name, None).unwrap(),
        );
        assert_same(name, &a.tensors().unwrap(), &b.tensors().unwrap(), &[]);
    }
    for rel in [
        "unet/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer_2/tokenizer.json",
    ] {
        let json = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join(rel)).unwrap()).unwrap()
        };
        assert_eq!(json(&out), json(&config), "{rel}");
    }
    let png = |model: &Path, name: &str| {
        let p = dir.join(name);
        let o = common::generate_model(model, "2", &["--out", p.to_str().unwrap()]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        std::fs::read(p).unwrap()
    };
    assert_eq!(png(&out, "converted.png"), png(&config, "original.png"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A v-prediction zero-SNR folder's objective travels as ComfyUI's `v_pred` / `ztsnr` markers
/// and comes back as its scheduler config. Existing outputs are never replaced, and the wrong
/// direction is refused; nothing is left behind by a refusal.
#[test]
fn objectives_travel_and_outputs_are_never_replaced() {
    let dir = tmp("convert-vpred");
    let folder = common::vpred_folder(&dir, true);
    let file = dir.join("vpred.safetensors");
    let o = convert(&folder, "single-file", &file, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("markers: v_pred, ztsnr"));
    let tensors = MappedFile::open(&file).unwrap();
    let keys = tensors.tensors().unwrap();
    assert!(keys.contains_key("v_pred") && keys.contains_key("ztsnr"));
    let back = dir.join("back");
    let o = convert(
        &file,
        "diffusers",
        &back,
        &["--config", tiny().join("sdxl").to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let got: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(back.join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(got["prediction_type"], "v_prediction");
    assert_eq!(got["rescale_betas_zero_snr"], true);
    // Refusals: an existing output, and each direction given the wrong kind of model.
    let before = std::fs::read(&file).unwrap();
    let o = convert(&folder, "single-file", &file, &[]);
    common::assert_fails_naming(&o, "already exists");
    assert_eq!(std::fs::read(&file).unwrap(), before);
    let o = convert(&folder, "diffusers", &dir.join("x"), &[]);
    common::assert_fails_naming(&o, "is a diffusers folder already");
    let o = convert(&file, "single-file", &dir.join("y.safetensors"), &[]);
    common::assert_fails_naming(&o, "is a single file already");
    assert!(!dir.join("x").exists() && !dir.join("y.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An EDM folder (Playground v2.5's scheduler, VAE latent statistics) becomes a single file with
/// Playground's `edm_mean` / `edm_std` markers, which generates the folder's PNG byte for byte
/// (as EDM, with the statistics and the 0.5 scaling) and converts back to the same configs. An
/// EDM folder the markers cannot describe is refused, and a file with a malformed marker names
/// it.
#[test]
fn edm_models_travel_as_playground_markers() {
    let dir = tmp("convert-edm");
    let folder = common::edm_folder(&dir);
    let file = dir.join("edm.safetensors");
    let o = convert(&folder, "single-file", &file, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("markers: edm_mean, edm_std"));
    let png = |model: &Path, extra: &[&str], name: &str| {
        let out = dir.join(name);
        let mut args = vec!["--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = common::generate_model(model, "3", &args);
        let err = common::stderr(&o);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("sampler: DPM++ 2M Karras (EDM)"), "{err}");
        std::fs::read(out).unwrap()
    };
    let config = tiny().join("sdxl");
    let config = config.to_str().unwrap();
    let from_folder = png(&folder, &[], "folder.png");
    assert_eq!(png(&file, &["--config", config], "file.png"), from_folder);
    let back = dir.join("back");
    let o = convert(&file, "diffusers", &back, &["--config", config]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let vae = read(&back.join("vae/config.json"));
    assert_eq!(vae["scaling_factor"], 0.5);
    let mean: Vec<f64> = serde_json::from_value(vae["latents_mean"].clone()).unwrap();
    for (g, w) in mean.iter().zip(common::EDM_LATENTS_MEAN) {
        assert!((g - w).abs() <= 1e-6 * w.abs(), "{mean:?}");
    }
    let sched = read(&back.join("scheduler/scheduler_config.json"));
    assert_eq!(sched["_class_name"], "EDMDPMSolverMultistepScheduler");
    assert_eq!(png(&back, &[], "back.png"), from_folder);
    // EDM settings the markers cannot carry (v-prediction, CosXL-style) are refused.
    let cosxl = dir.join("cosxl");
    common::copy_dir(&folder, &cosxl);
    let sched_path = cosxl.join("scheduler/scheduler_config.json");
    let mut s = read(&sched_path);
    s["prediction_type"] = "v_prediction".into();
    s["sigma_data"] = 1.0.into();
    std::fs::write(&sched_path, s.to_string()).unwrap();
    let o = convert(&cosxl, "single-file", &dir.join("cosxl.safetensors"), &[]);
    common::assert_fails_naming(&o, "settings other than Playground");
    assert!(!dir.join("cosxl.safetensors").exists());
    // A marker with the wrong length is an error naming it.
    let bad = common::tiny_single_file_with(
        &dir,
        "bad.safetensors",
        &[],
        vec![
            (
                "edm_mean".into(),
                kstyle::Tensor::from_vec(vec![0f32; 3], 3, kstyle::Device::Cpu).unwrap(),
            ),
            (
                "edm_std".into(),
                kstyle::Tensor::from_vec(vec![1f32; 4], 4, kstyle::Device::Cpu).unwrap(),
            ),
        ],
    );
    let o = common::generate_model(
        &bad,
        "1",
        &[
            "--config",
            config,
            "--out",
            dir.join("bad.png").to_str().unwrap(),
        ],
    );
    common::assert_fails_naming(&o, "`edm_mean` must hold 4 finite values");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An inpainting single file (a 9-input `conv_in`) read with a 4-channel architecture folder
/// becomes a folder whose UNet config says 9 input channels, and loads as such.
#[test]
fn an_inpainting_single_file_keeps_its_input_channels() {
    let dir = tmp("convert-inpaint");
    let conv = common::inpaint_conv_in();
    assert_eq!(conv.dims()[1], 9);
    let single = common::tiny_single_file_with(
        &dir,
        "inpaint.safetensors",
        &[("model.diffusion_model.input_blocks.0.0.weight", conv)],
        vec![],
    );
    let out = dir.join("inpaint-folder");
    let config = tiny().join("sdxl");
    let o = convert(
        &single,
        "diffusers",
        &out,
        &["--config", config.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("unet/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["in_channels"], 9);
    let unet = kstyle::models::unet::UNet2DConditionModel::from_diffusers(
        &out,
        &[],
        kstyle::DType::F32,
        kstyle::Device::Cpu,
    )
    .unwrap()
    .model;
    assert_eq!(unet.config.in_channels, 9);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `convert --vae` bakes another VAE in, both ways: the single file's `first_stage_model.` part is
/// the A1111-style VAE file byte for byte (the rest as without --vae), the folder's `vae/` holds
/// its diffusers-named tensors and generates the same picture as `generate --vae`, and a file
/// that is no VAE writes nothing.
#[test]
fn a_vae_is_baked_in_both_directions() {
    let dir = tmp("convert-vae");
    let vae = tiny().join("../extra/vae_ldm.safetensors");
    let vae_arg = vae.to_str().unwrap();
    let (plain, baked) = (dir.join("plain.safetensors"), dir.join("baked.safetensors"));
    let o = convert(&tiny().join("sdxl"), "single-file", &plain, &[]);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let o = convert(
        &tiny().join("sdxl"),
        "single-file",
        &baked,
        &["--vae", vae_arg],
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (plain, baked) = (
        MappedFile::open(&plain).unwrap(),
        MappedFile::open(&baked).unwrap(),
    );
    fn split(m: &MappedFile) -> (TensorMap<'_>, TensorMap<'_>) {
        m.tensors()
            .unwrap()
            .into_iter()
            .partition(|(k, _)| !k.starts_with("first_stage_model."))
    }
    let ((rest, _), (baked_rest, baked_vae)) = (split(&plain), split(&baked));
    assert_same("non-VAE tensors", &baked_rest, &rest, &[]);
    let file = MappedFile::open(&vae).unwrap();
    let want: TensorMap<'_> = file
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (format!("first_stage_model.{k}"), t))
        .collect();
    assert_same("baked VAE", &baked_vae, &want, &[]);

    let folder = dir.join("folder");
    let single = tiny().join("sdxl_single_file.safetensors");
    let config = tiny().join("sdxl");
    let args = ["--config", config.to_str().unwrap(), "--vae", vae_arg];
    let o = convert(&single, "diffusers", &folder, &args);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let written = MappedFile::open(folder.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let layout = kstyle::formats::single_file::VaeLayout::sdxl();
    let want = kstyle::formats::single_file::vae_file_tensors(file.tensors().unwrap(), layout, "v")
        .unwrap();
    assert_same("folder VAE", &written.tensors().unwrap(), &want, &[]);
    let png = |model: &Path, name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["--seed", "4", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = common::generate_model(model, "2", &args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        std::fs::read(out).unwrap()
    };
    assert!(
        png(&folder, "baked.png", &[])
            == png(&tiny().join("sdxl"), "given.png", &["--vae", vae_arg])
    );

    let unet = tiny().join("sdxl/unet/diffusion_pytorch_model.safetensors");
    for (to, out) in [("single-file", "bad.safetensors"), ("diffusers", "bad")] {
        let out = dir.join(out);
        let model = match to {
            "single-file" => tiny().join("sdxl"),
            _ => single.clone(),
        };
        let o = convert(
            &model,
            to,
            &out,
            &[
                "--config",
                config.to_str().unwrap(),
                "--vae",
                unet.to_str().unwrap(),
            ],
        );
        common::assert_fails_naming(&o, "not an SDXL-family VAE file");
        assert!(!out.exists());
        let mut partial = out.into_os_string();
        partial.push(".partial");
        assert!(!Path::new(&partial).exists());
    }
}

/// `--lora` bakes LoRA files into the weights in every direction. Each patched weight equals the
/// load-time merge (the one `generate --lora` runs and `verify` checks against diffusers: every
/// file summed in f64 on the stored weights) rounded once to the stored f16; every other tensor
/// is the plain conversion's, byte for byte. A single file with LoRAs becomes a new single file
/// with the input's own keys, a folder a new folder; kstyle adapters and LoRAs for another model
/// are refused by name.
#[test]
fn loras_are_baked_in_every_direction() {
    use kstyle::formats::kohya::Component;
    use kstyle::models::unet::lora_merge::{merge_kohya, merge_kohya_text_encoder};
    use kstyle::models::unet::KohyaLoraFile;
    use kstyle::{DType, Tensor};
    use std::collections::BTreeMap;
    let dir = tmp("convert-lora");
    let extra = tiny().join("../extra");
    let (te_lora, conv_lora) = (
        extra.join("export_kohya.safetensors"),
        extra.join("export_locon_kohya.safetensors"),
    );
    let conv_arg = format!("{}:0.5", conv_lora.display());
    let loras = ["--lora", te_lora.to_str().unwrap(), "--lora", &conv_arg];
    let single = tiny().join("sdxl_single_file.safetensors");
    let config = tiny().join("sdxl");
    let cfg = ["--config", config.to_str().unwrap()];

    // Single file to folder, LoRAs baked: against the load-time merge.
    let folder = dir.join("folder");
    let o = convert(
        &single,
        "diffusers",
        &folder,
        &[&cfg[..], &loras[..]].concat(),
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert!(common::stderr(&o).contains("module weights patched by 2 LoRA file(s)"));
    let files = [
        KohyaLoraFile::new(&te_lora, 1.0),
        KohyaLoraFile::new(&conv_lora, 0.5),
    ];
    // Text-encoder keys canonical (`text_model.`), as the text-encoder merge takes them.
    let load = |path: &Path, text: bool| -> BTreeMap<String, Tensor> {
        let f = kstyle::tensor::SafeTensorsFile::open(path).unwrap();
        let names: Vec<String> = f.names().map(String::from).collect();
        names
            .into_iter()
            .filter_map(|n| {
                let t = f.tensor(&n).unwrap().to_dtype(DType::F64).unwrap();
                match text {
                    true => kstyle::formats::diffusers::canonical_text_encoder_key(&n),
                    false => Some(n),
                }
                .map(|n| (n, t))
            })
            .collect()
    };
    let layout = kstyle::formats::diffusers::DiffusersFolder::open(&config)
        .unwrap()
        .unet_layout()
        .unwrap();
    let mut changed = 0;
    for (name, file, component) in [
        ("unet", "diffusion_pytorch_model.safetensors", None),
        (
            "text_encoder",
            "model.safetensors",
            Some(Component::TextEncoder),
        ),
        (
            "text_encoder_2",
            "model.safetensors",
            Some(Component::TextEncoder2),
        ),
    ] {
        let mut want = load(&config.join(name).join(file), component.is_some());
        let before = want.clone();
        for lora in &files {
            match component {
                None => drop(merge_kohya(&mut want, &layout, lora).unwrap()),
                Some(c) => drop(merge_kohya_text_encoder(&mut want, c, lora).unwrap()),
            }
        }
        let got = load(&folder.join(name).join(file), component.is_some());
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (k, w) in &want {
            let w = w
                .to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let (g, w) = (got[k].to_vec_f64().unwrap(), w.to_vec_f64().unwrap());
            assert!(g == w, "{name} {k}: baked differs from the load-time merge");
            changed += (before[k].to_vec_f64().unwrap() != w) as usize;
        }
    }
    assert!(changed > 200, "only {changed} tensors changed");

    // Folder to single file and single file to single file: the same weights, each with its own
    // keys (the reference single file keeps OpenCLIP's logit_scale, which a folder has not).
    let (from_folder, from_single) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    let o = convert(&config, "single-file", &from_folder, &loras);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let o = convert(
        &single,
        "single-file",
        &from_single,
        &[&cfg[..], &loras[..]].concat(),
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
    let (a, b, input) = (
        MappedFile::open(&from_folder).unwrap(),
        MappedFile::open(&from_single).unwrap(),
        MappedFile::open(&single).unwrap(),
    );
    let logit = "conditioner.embedders.1.model.logit_scale";
    let (a, b, input) = (
        a.tensors().unwrap(),
        b.tensors().unwrap(),
        input.tensors().unwrap(),
    );
    assert_eq!(
        b.keys().collect::<Vec<_>>(),
        input.keys().collect::<Vec<_>>()
    );
    let mut b_less = b.clone();
    b_less.remove(logit);
    assert_same("folder vs single file, baked", &a, &b_less, &[]);
    let differ = input
        .iter()
        .filter(|(k, t)| b[*k].data[..] != t.data[..])
        .count();
    assert!(
        differ > 150,
        "only {differ} tensors of the single file changed"
    );
    // Back to a folder, and the folder baked into a new folder: the first bake, exactly.
    let again = dir.join("again");
    let o = convert(&from_single, "diffusers", &again, &cfg);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let folder_to_folder = dir.join("folder2");
    let o = convert(&config, "diffusers", &folder_to_folder, &loras);
    assert!(o.status.success(), "{}", common::stderr(&o));
    for other in [&again, &folder_to_folder] {
        for name in ["unet", "text_encoder", "text_encoder_2", "vae"] {
            let (x, y) = (
                DiffusersFolder::open(other).unwrap(),
                DiffusersFolder::open(&folder).unwrap(),
            );
            let (x, y) = (
                x.component(name, None).unwrap(),
                y.component(name, None).unwrap(),
            );
            assert_same(name, &x.tensors().unwrap(), &y.tensors().unwrap(), &[]);
        }
    }

    // Refusals: a kstyle adapter (its own export is the file to bake), a LoRA for another
    // model, a truncated file; nothing is left behind.
    let data = common::train::dataset(&dir);
    let adapter = dir.join("adapter.safetensors");
    common::train::train_ok(&data, &adapter, "lora", &["--max-steps", "1"]);
    let o = convert(
        &config,
        "single-file",
        &dir.join("x.safetensors"),
        &["--lora", adapter.to_str().unwrap()],
    );
    common::assert_fails_naming(&o, "kstyle export --format kohya");
    let refiner_lora = extra.join("refiner_lora.safetensors");
    let o = convert(
        &config,
        "single-file",
        &dir.join("y.safetensors"),
        &["--lora", refiner_lora.to_str().unwrap()],
    );
    common::assert_fails_naming(&o, "refiner_lora.safetensors");
    let bytes = std::fs::read(&te_lora).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let o = convert(
        &config,
        "single-file",
        &dir.join("z.safetensors"),
        &["--lora", cut.to_str().unwrap()],
    );
    common::assert_fails_naming(&o, "cut.safetensors");
    for name in ["x", "y", "z"] {
        assert!(!dir.join(format!("{name}.safetensors")).exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
