//! The VAE and LPIPS against the float64 references, on odd sizes, from the single file, and
//! with broken weight files (errors must name the file and the key).

use kstyle::formats::diffusers::DiffusersFolder;
use kstyle::formats::single_file::{convert_file, VaeLayout};
use kstyle::formats::unet_layout::UnetLayout;
use kstyle::formats::MappedFile;
use kstyle::models::lpips::Lpips;
use kstyle::models::vae::blocks::pad_right_bottom;
use kstyle::models::vae::{AutoencoderKL, VaeConfig};
use kstyle::nn::Weights;
use kstyle::tensor::{load_safetensors, save_safetensors, ConvParams, Rng};
use kstyle::{verify, DType, Device, Tensor};
use std::path::{Path, PathBuf};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

fn tiny_vae() -> AutoencoderKL {
    let folder = DiffusersFolder::open(tiny().join("sdxl")).unwrap();
    AutoencoderKL::from_diffusers(&folder, DType::F32, Device::Cpu).unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), &mut Rng::new(seed), DType::F32, Device::Cpu).unwrap()
}

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("kstyle-vae-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn verify_cases_pass_on_the_tiny_fixtures() {
    let only = ["vae".to_string(), "lpips".to_string()];
    let report = verify::run(&tiny(), Device::Cpu, Some(&only)).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    assert_eq!(report.rows.len(), 4, "{:?}", report.rows);
    for r in &report.rows {
        assert!(r.passed, "{r:?}");
    }
}

#[test]
fn downsampler_pads_right_and_bottom_only() {
    // A direct loop over the (0, 1, 0, 1)-padded input on odd sizes, against pad + strided conv.
    let (c, k, h, w) = (2, 3, 5, 7);
    let x = randn(&[1, c, h, w], 1);
    let wt = randn(&[k, c, 3, 3], 2);
    let p = ConvParams {
        stride: 2,
        padding: 0,
    };
    let y = pad_right_bottom(&x).unwrap().conv2d(&wt, None, p).unwrap();
    // (n + 1 - 3) / 2 + 1 = floor(n / 2): the padding only completes the last window.
    let (oh, ow) = (h / 2, w / 2);
    assert_eq!(y.dims(), &[1, k, oh, ow]);
    let (xv, wv, yv) = (
        x.to_vec_f64().unwrap(),
        wt.to_vec_f64().unwrap(),
        y.to_vec_f64().unwrap(),
    );
    for o in 0..k {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut s = 0.0;
                for ci in 0..c {
                    for (ky, kx) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b))) {
                        let (iy, ix) = (2 * oy + ky, 2 * ox + kx);
                        if iy < h && ix < w {
                            s += wv[((o * c + ci) * 3 + ky) * 3 + kx] * xv[(ci * h + iy) * w + ix];
                        }
                    }
                }
                let got = yv[(o * oh + oy) * ow + ox];
                assert!((got - s).abs() < 1e-5, "({o},{oy},{ox}): {got} vs {s}");
            }
        }
    }
}

#[test]
fn odd_sizes_round_trip_in_shape() {
    let vae = tiny_vae();
    let f = vae.config.downscale_factor();
    let (mean, logvar) = vae.encode(&randn(&[2, 3, 23, 37], 3)).unwrap();
    // Each downsampler maps n to floor(n / 2).
    let down = |mut n: usize| {
        for _ in 1..vae.config.block_out_channels.len() {
            n /= 2;
        }
        n
    };
    assert_eq!(mean.dims(), &[2, 4, down(23), down(37)]);
    assert_eq!(logvar.dims(), mean.dims());
    let img = vae.decode_scaled(&randn(&[1, 4, 3, 5], 4)).unwrap();
    assert_eq!(img.dims(), &[1, 3, 3 * f, 5 * f]);
    assert!(img.to_vec_f64().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn wrong_channel_counts_are_errors() {
    let vae = tiny_vae();
    assert!(vae.decode(&randn(&[1, 3, 4, 4], 5)).is_err());
    assert!(vae.encode(&randn(&[1, 4, 16, 16], 6)).is_err());
    let lpips =
        Lpips::from_file(tiny().join("reference/lpips_alex.safetensors"), Device::Cpu).unwrap();
    assert!(lpips
        .distance(&randn(&[1, 3, 64, 64], 7), &randn(&[1, 3, 64, 63], 8))
        .is_err());
    // AlexNet's two pools need 31 pixels; below that an error, not a panic.
    let (a, b) = (randn(&[1, 3, 31, 31], 7), randn(&[1, 3, 31, 31], 8));
    assert!(lpips.distance(&a, &b).is_ok());
    let (a, b) = (randn(&[1, 3, 30, 30], 7), randn(&[1, 3, 30, 30], 8));
    assert!(lpips.distance(&a, &b).is_err());
}

#[test]
fn single_file_vae_decodes_like_the_folder() {
    // The LDM layout (reversed up blocks, 1x1-conv attention) goes through formats, then the
    // same model code.
    let sd = tiny();
    let file = MappedFile::open(sd.join("sdxl_single_file.safetensors")).unwrap();
    let unet = UnetLayout::from_config_file(sd.join("sdxl/unet/config.json")).unwrap();
    let layout = VaeLayout::from_config_file(sd.join("sdxl/vae/config.json")).unwrap();
    let split = convert_file(&file, &unet, layout).unwrap();
    let vb = Weights::from_raw(&split.vae, file.path(), DType::F32, Device::Cpu).unwrap();
    let cfg = VaeConfig::from_file(sd.join("sdxl/vae/config.json")).unwrap();
    let from_single = AutoencoderKL::load(&vb, cfg).unwrap();
    vb.ensure_all_used(|_| false).unwrap();
    let z = randn(&[1, 4, 4, 6], 9);
    let a = from_single.decode(&z).unwrap().to_vec_f64().unwrap();
    let b = tiny_vae().decode(&z).unwrap().to_vec_f64().unwrap();
    assert_eq!(a, b);
}

fn copy_vae_folder(dst: &Path) -> PathBuf {
    let src = tiny().join("sdxl");
    std::fs::create_dir_all(dst.join("vae")).unwrap();
    std::fs::copy(src.join("model_index.json"), dst.join("model_index.json")).unwrap();
    std::fs::copy(src.join("vae/config.json"), dst.join("vae/config.json")).unwrap();
    dst.join("vae/diffusion_pytorch_model.safetensors")
}

#[test]
fn mis_shaped_vae_weight_names_file_and_key() {
    let s = Scratch::new("misshaped");
    let weights = copy_vae_folder(&s.0);
    let src = tiny().join("sdxl/vae/diffusion_pytorch_model.safetensors");
    let key = "decoder.up_blocks.1.resnets.0.conv1.weight";
    let mut tensors: Vec<(String, Tensor)> = load_safetensors(&src).unwrap().into_iter().collect();
    for (name, t) in tensors.iter_mut() {
        if name == key {
            let (k, c, r, q) = t.dims4().unwrap();
            *t = Tensor::zeros((k, c + 1, r, q), t.dtype(), Device::Cpu).unwrap();
        }
    }
    save_safetensors(&weights, &tensors, None).unwrap();
    let folder = DiffusersFolder::open(&s.0).unwrap();
    let err = AutoencoderKL::from_diffusers(&folder, DType::F32, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains(key), "{err}");
    assert!(
        err.contains(&s.0.join("vae").display().to_string()),
        "{err}"
    );
}

#[test]
fn truncated_vae_file_names_the_file() {
    let s = Scratch::new("truncated");
    let weights = copy_vae_folder(&s.0);
    let bytes = std::fs::read(tiny().join("sdxl/vae/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = DiffusersFolder::open(&s.0)
        .map_err(kstyle::Error::from)
        .and_then(|f| AutoencoderKL::from_diffusers(&f, DType::F32, Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn broken_lpips_files_name_file_and_key() {
    let s = Scratch::new("lpips");
    let src = tiny().join("reference/lpips_alex.safetensors");
    let path = s.0.join("lpips_alex.safetensors");
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = Lpips::from_file(&path, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lpips_alex.safetensors"), "{err}");

    let key = "lin2.model.1.weight";
    let tensors: Vec<(String, Tensor)> = load_safetensors(&src)
        .unwrap()
        .into_iter()
        .map(|(n, t)| match n == key {
            true => (
                n,
                Tensor::zeros((1, 383, 1, 1), DType::F16, Device::Cpu).unwrap(),
            ),
            false => (n, t),
        })
        .collect();
    save_safetensors(&path, &tensors, None).unwrap();
    let err = Lpips::from_file(&path, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(key) && err.contains("lpips_alex.safetensors"),
        "{err}"
    );

    let without: Vec<_> = load_safetensors(&src)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != "scaling_layer.shift")
        .collect();
    save_safetensors(&path, &without, None).unwrap();
    let err = Lpips::from_file(&path, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("scaling_layer.shift"), "{err}");
}

/// Per-channel latent statistics (`latents_mean`, `latents_std`): encoding scale and decoding
/// unscale are inverses, and a config whose statistics do not match its channels is refused by
/// name. (The decode against diffusers is the `vae_latent_stats` verify case.)
#[test]
fn latent_statistics_round_trip_and_are_validated() {
    let mut vae = tiny_vae();
    vae.config.latents_mean = Some(vec![0.5, -0.25, 0.125, -1.0]);
    vae.config.latents_std = Some(vec![2.0, 0.75, 1.5, 0.5]);
    let z = Tensor::randn((2, 4, 3, 5), &mut Rng::new(9), DType::F32, Device::Cpu).unwrap();
    let back = vae
        .scale_latents(&vae.unscale_latents(&z).unwrap())
        .unwrap();
    let (a, b) = (z.to_vec_f32().unwrap(), back.to_vec_f32().unwrap());
    assert!(a
        .iter()
        .zip(&b)
        .all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + x.abs())));
    // Channel 3 (mean -1, std 0.5): unscale(0) is the mean.
    let zero = Tensor::zeros((1, 4, 1, 1), DType::F32, Device::Cpu).unwrap();
    assert_eq!(
        vae.unscale_latents(&zero).unwrap().to_vec_f32().unwrap(),
        [0.5, -0.25, 0.125, -1.0]
    );
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tiny().join("sdxl/vae/config.json")).unwrap(),
    )
    .unwrap();
    json["latents_mean"] = serde_json::json!([0.0, 0.0, 0.0]);
    let err = VaeConfig::from_json(&json).unwrap_err().to_string();
    assert!(err.contains("latents_mean"), "{err}");
}
