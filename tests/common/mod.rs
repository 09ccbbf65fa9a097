//! Helpers shared by the CLI tests: the vendored fixtures, the built binary, scratch folders.
// Each test crate uses a different subset of these.
#![allow(dead_code)]

pub mod train;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The vendored tiny fixtures.
pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

/// Run the `kstyle` binary built for this test run.
pub fn kstyle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kstyle"))
        .args(args)
        .output()
        .expect("run kstyle")
}

/// `kstyle generate` on the tiny SDXL folder at 64x64, one step, prompt "x", plus `extra`.
pub fn generate_tiny(extra: &[&str]) -> Output {
    generate_tiny_steps("1", extra)
}

/// [`generate_tiny`] with `steps` sampling steps.
pub fn generate_tiny_steps(steps: &str, extra: &[&str]) -> Output {
    generate_model(&tiny().join("sdxl"), steps, extra)
}

/// [`generate_tiny_steps`] on another model folder.
pub fn generate_model(model: &Path, steps: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        steps,
    ];
    args.extend_from_slice(extra);
    kstyle(&args)
}

/// `kstyle generate` on `model` with prompt "a house" and 4 steps, writing `out`, plus `extra`
/// (the img2img, inpainting and refiner tests).
pub fn generate_house(model: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a house",
        "--steps",
        "4",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    kstyle(&args)
}

/// A 101x77 RGB picture (sizes that are not multiples of 8) written to `path` as PNG.
pub fn write_test_picture(path: &Path) {
    image::RgbImage::from_fn(101, 77, |x, y| {
        image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x * y) % 251) as u8])
    })
    .save(path)
    .unwrap();
}

/// A fresh, empty scratch folder for one test, removed when the guard drops (after the test
/// passes, and while a failing one unwinds), so repeated `cargo test` runs leave nothing behind.
/// `KSTYLE_KEEP_TEST_DIRS=1` keeps it for a look after a failure.
pub struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if std::env::var_os("KSTYLE_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn tmp(tag: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("kstyle-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

/// Assert a clean failure: non-zero exit, `needle` in the message, no panic.
pub fn assert_fails_naming(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success() && err.contains(needle) && !err.contains("panicked"),
        "expected a clean error naming `{needle}`:\n{err}"
    );
}

/// The process's stderr as text (for error assertions).
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Prints every parity row that failed and asserts there are none (and at least `min_rows`).
pub fn assert_parity(rows: &[kstyle::verify::cuda_parity::ParityRow], min_rows: usize) {
    let failed: Vec<_> = rows.iter().filter(|r| !r.passed).collect();
    for r in &failed {
        eprintln!(
            "FAIL {} [{}]: err {:.3e} limit {:.3e}",
            r.case, r.dtype, r.error, r.limit
        );
    }
    assert!(
        rows.len() >= min_rows,
        "only {} parity rows (expected at least {min_rows})",
        rows.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} parity checks failed",
        failed.len(),
        rows.len()
    );
}

/// Step 1's (loss, diffusion, cultural) from the loss log a training run wrote beside `adapter`.
pub fn first_losses(adapter: &Path) -> Vec<f64> {
    let csv = std::fs::read_to_string(adapter.with_extension("loss.csv")).unwrap();
    let row = csv.lines().nth(1).expect("a logged step");
    row.split(',')
        .skip(2)
        .map(|v| v.parse().unwrap_or(f64::NAN))
        .collect()
}

/// A recursive copy (a model folder to edit a config in).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The tiny SDXL refiner as a diffusers folder under `dir`: the tiny base's text_encoder_2,
/// tokenizer_2, VAE and scheduler, no first text encoder, and the UNet of
/// `tests/fixtures/extra/tiny_refiner_unet.safetensors` (its config in the file's metadata).
pub fn tiny_refiner_folder(dir: &Path) -> PathBuf {
    let folder = dir.join("tiny-refiner");
    for part in ["scheduler", "text_encoder_2", "tokenizer_2", "vae"] {
        copy_dir(&tiny().join("sdxl").join(part), &folder.join(part));
    }
    let unet = folder.join("unet");
    std::fs::create_dir_all(&unet).unwrap();
    let weights = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/extra/tiny_refiner_unet.safetensors");
    let config = kstyle::tensor::SafeTensorsFile::open(&weights)
        .unwrap()
        .meta_str("config")
        .unwrap()
        .to_string();
    std::fs::write(unet.join("config.json"), config).unwrap();
    std::fs::copy(&weights, unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(
        folder.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionXLImg2ImgPipeline", "_diffusers_version": "0.42.1",
            "force_zeros_for_empty_prompt": false, "requires_aesthetics_score": true,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": [null, null],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": [null, null], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}"#,
    )
    .unwrap();
    folder
}

/// The tiny refiner as an original-layout single file, spliced as
/// `tests/fixtures/extra/gen_refiner_single_file.py` checks it with diffusers: its stored sgm
/// UNet, plus the tiny base single file's OpenCLIP tower (embedder 1 there, embedder 0 in a
/// refiner) and VAE.
pub fn tiny_refiner_single_file(dir: &Path) -> PathBuf {
    use kstyle::tensor::SafeTensorsFile;
    let unet = SafeTensorsFile::open(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/extra/tiny_refiner_single_file_unet.safetensors"),
    )
    .unwrap();
    let base = SafeTensorsFile::open(tiny().join("sdxl_single_file.safetensors")).unwrap();
    let mut tensors: Vec<(String, kstyle::Tensor)> = unet
        .names()
        .map(|n| (n.to_string(), unet.tensor(n).unwrap()))
        .collect();
    for n in base.names() {
        let name = if let Some(rest) = n.strip_prefix("conditioner.embedders.1.model.") {
            format!("conditioner.embedders.0.model.{rest}")
        } else if n.starts_with("first_stage_model.") {
            n.to_string()
        } else {
            continue;
        };
        tensors.push((name, base.tensor(n).unwrap()));
    }
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("tiny_refiner.safetensors");
    kstyle::tensor::save_safetensors(&path, &tensors, None).unwrap();
    path
}

/// A copy of the tiny folder as a v-prediction model (`prediction_type: v_prediction`), with
/// zero-terminal-SNR betas when `zero_snr`.
pub fn vpred_folder(dir: &Path, zero_snr: bool) -> PathBuf {
    let folder = dir.join(if zero_snr { "vpred-zsnr" } else { "vpred" });
    copy_dir(&tiny().join("sdxl"), &folder);
    let sched = folder.join("scheduler/scheduler_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sched).unwrap()).unwrap();
    cfg["prediction_type"] = "v_prediction".into();
    cfg["rescale_betas_zero_snr"] = zero_snr.into();
    std::fs::write(&sched, cfg.to_string()).unwrap();
    folder
}

/// Playground-v2.5-like latent statistics for the tiny VAE (test values, one per channel).
pub const EDM_LATENTS_MEAN: [f64; 4] = [-1.6574, 1.886, -1.383, 2.5155];
pub const EDM_LATENTS_STD: [f64; 4] = [8.4927, 5.9022, 6.5498, 5.2299];

/// The tiny folder as an EDM model in `dir`: Playground v2.5's scheduler config and a VAE with
/// latent statistics and scaling factor 0.5 (as Playground's folder has).
pub fn edm_folder(dir: &Path) -> PathBuf {
    let folder = dir.join("edm");
    copy_dir(&tiny().join("sdxl"), &folder);
    std::fs::write(
        folder.join("scheduler/scheduler_config.json"),
        kstyle::sample::edm::PLAYGROUND_SCHEDULER,
    )
    .unwrap();
    let vae = folder.join("vae/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&vae).unwrap()).unwrap();
    cfg["latents_mean"] = EDM_LATENTS_MEAN.to_vec().into();
    cfg["latents_std"] = EDM_LATENTS_STD.to_vec().into();
    cfg["scaling_factor"] = 0.5.into();
    std::fs::write(&vae, cfg.to_string()).unwrap();
    folder
}

/// The 9-input `conv_in` weight of the inpainting reference (float16).
pub fn inpaint_conv_in() -> kstyle::Tensor {
    kstyle::tensor::SafeTensorsFile::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extra/inpaint.safetensors"),
    )
    .unwrap()
    .tensor("inpaint_conv_in.weight")
    .unwrap()
}

/// The tiny single file written to `dir/name` with the tensors of `replace` swapped in by key
/// and `extra` ones added.
pub fn tiny_single_file_with(
    dir: &Path,
    name: &str,
    replace: &[(&str, kstyle::Tensor)],
    extra: Vec<(String, kstyle::Tensor)>,
) -> PathBuf {
    let f =
        kstyle::tensor::SafeTensorsFile::open(tiny().join("sdxl_single_file.safetensors")).unwrap();
    let mut tensors: Vec<(String, kstyle::Tensor)> = f
        .names()
        .map(|n| {
            let t = match replace.iter().find(|(k, _)| *k == n) {
                Some((_, t)) => t.clone(),
                None => f.tensor(n).unwrap(),
            };
            (n.to_string(), t)
        })
        .collect();
    tensors.extend(extra);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    kstyle::tensor::save_safetensors(&path, &tensors, None).unwrap();
    path
}

/// The relative L2 difference of `a` from `b`: ||a - b|| / ||b||.
pub fn rel_l2(a: &kstyle::Tensor, b: &kstyle::Tensor) -> f64 {
    let (x, y) = (a.to_vec_f64().unwrap(), b.to_vec_f64().unwrap());
    let d: f64 = x
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q).powi(2))
        .sum::<f64>()
        .sqrt();
    d / y.iter().map(|q| q * q).sum::<f64>().sqrt()
}

/// The tiny UNet in f32 on the CPU, `loras` merged at load.
pub fn tiny_unet(
    loras: &[kstyle::models::unet::KohyaLoraFile],
) -> kstyle::models::unet::UNet2DConditionModel {
    use kstyle::models::unet::UNet2DConditionModel;
    UNet2DConditionModel::from_diffusers(
        tiny().join("sdxl"),
        loras,
        kstyle::DType::F32,
        kstyle::Device::Cpu,
    )
    .unwrap()
    .model
}

/// `kstyle export ADAPTER --format FORMAT --dtype f32` against the tiny model, into `out`.
pub fn export_tiny(adapter: &Path, format: &str, out: &Path) -> Output {
    let model = tiny().join("sdxl");
    kstyle(&[
        "export",
        adapter.to_str().unwrap(),
        "--format",
        format,
        "--dtype",
        "f32",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

/// A UNet's output (no autograd) on the inputs of `tiny/reference/unet.safetensors`.
pub fn tiny_unet_output(u: &kstyle::models::unet::UNet2DConditionModel) -> kstyle::Tensor {
    use kstyle::DType;
    let f =
        kstyle::tensor::SafeTensorsFile::open(tiny().join("reference/unet.safetensors")).unwrap();
    let g = |k: &str| f.tensor(k).unwrap().to_dtype(DType::F32).unwrap();
    kstyle::autograd::no_grad(|| {
        u.forward(
            &g("sample"),
            &g("timestep"),
            &g("encoder_hidden_states"),
            &g("text_embeds"),
            &g("time_ids"),
        )
        .unwrap()
    })
}
