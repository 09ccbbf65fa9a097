//! kohya LoRA files merged into the UNet's frozen weights: conv and linear targets, sgm and
//! diffusers spellings, multipliers, a missing alpha, text-encoder parts merged into their own
//! encoders, and unknown UNet modules refused.

use kstyle::formats::diffusers::DiffusersFolder;
use kstyle::models::unet::UNetConfig;
use kstyle::nn::weights::tensor_from_raw;
use kstyle::tensor::Rng;
use kstyle::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn tiny(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(p)
}

fn tiny_config() -> UNetConfig {
    UNetConfig::from_file(tiny("sdxl/unet/config.json")).unwrap()
}

/// The tiny UNet's tensors by diffusers key, as stored (fp16).
fn tiny_tensors() -> BTreeMap<String, Tensor> {
    let folder = DiffusersFolder::open(tiny("sdxl")).unwrap();
    let comp = folder.component("unet", None).unwrap();
    let map = comp.tensors().unwrap();
    map.iter()
        .map(|(k, r)| (k.clone(), tensor_from_raw(r, &comp.dir, k).unwrap()))
        .collect()
}

use kstyle::formats::raw::write_safetensors;
use kstyle::formats::{RawTensor, TensorMap};
use kstyle::models::unet::lora_merge::merge_kohya;
use kstyle::models::unet::KohyaLoraFile;
use safetensors::Dtype;

fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    // fp16-representable, so the test's f64 math sees exactly what the file stores
    (0..n)
        .map(|_| half::f16::from_f64(0.1 * rng.normal()).to_f64())
        .collect()
}

/// (kohya name, down shape, up shape, alpha)
type Module<'a> = (&'a str, Vec<usize>, Vec<usize>, Option<f64>);

/// A kohya file of `modules`; returns their down and up values.
fn write(path: &std::path::Path, modules: &[Module<'_>]) -> Vec<(Vec<f64>, Vec<f64>)> {
    let mut map = TensorMap::new();
    let mut out = Vec::new();
    for (i, (name, ds, us, alpha)) in modules.iter().enumerate() {
        let d = values(ds.iter().product(), 10 + i as u64);
        let u = values(us.iter().product(), 20 + i as u64);
        map.insert(
            format!("{name}.lora_down.weight"),
            RawTensor::from_f64(Dtype::F16, ds.clone(), &d).unwrap(),
        );
        map.insert(
            format!("{name}.lora_up.weight"),
            RawTensor::from_f64(Dtype::F16, us.clone(), &u).unwrap(),
        );
        if let Some(a) = alpha {
            map.insert(
                format!("{name}.alpha"),
                RawTensor::from_f64(Dtype::F16, vec![], &[*a]).unwrap(),
            );
        }
        out.push((d, u));
    }
    write_safetensors(path, &map, None).unwrap();
    out
}

/// scale * up @ down, laid out like the (out, in, kh, kw) or (out, in) weight.
fn delta(up: &[f64], down: &[f64], out: usize, r: usize, scale: f64) -> Vec<f64> {
    let inner = down.len() / r;
    (0..out * inner)
        .map(|idx| {
            let (o, i) = (idx / inner, idx % inner);
            scale
                * (0..r)
                    .map(|k| up[o * r + k] * down[k * inner + i])
                    .sum::<f64>()
        })
        .collect()
}

fn close(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-12 * (1.0 + y.abs()))
}

#[test]
fn conv_and_linear_loras_merge_with_their_multipliers() {
    let dir = std::env::temp_dir().join(format!("kstyle-unet-kohya-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let layout = tiny_config().layout();
    let base = tiny_tensors();
    // down_blocks.0.resnets.0.conv1 (3x3, 32 -> 32) in sgm spelling; down_blocks.1's first
    // proj_in (48 -> 48) in diffusers spelling; a text-encoder module the UNet ignores.
    let conv = "lora_unet_input_blocks_1_0_in_layers_2";
    let lin = "lora_unet_down_blocks_1_attentions_0_proj_in";
    let te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj";
    let a = dir.join("a.safetensors");
    let va = write(
        &a,
        &[
            (conv, vec![2, 32, 3, 3], vec![32, 2, 1, 1], Some(1.0)),
            (lin, vec![2, 48], vec![48, 2], None),
            (te, vec![2, 32], vec![32, 2], Some(2.0)),
        ],
    );
    let b = dir.join("b.safetensors");
    let vb = write(
        &b,
        &[(conv, vec![2, 32, 3, 3], vec![32, 2, 1, 1], Some(4.0))],
    );

    let mut merged = base.clone();
    let ra = merge_kohya(&mut merged, &layout, &KohyaLoraFile::new(&a, 0.5)).unwrap();
    let rb = merge_kohya(&mut merged, &layout, &KohyaLoraFile::new(&b, -1.0)).unwrap();
    let mut got = ra.merged.clone();
    got.sort();
    assert_eq!(
        got,
        [
            "down_blocks.0.resnets.0.conv1",
            "down_blocks.1.attentions.0.proj_in"
        ]
    );
    assert_eq!(rb.merged, ["down_blocks.0.resnets.0.conv1"]);
    assert_eq!(ra.not_unet.len(), 3);

    let w = |m: &BTreeMap<String, Tensor>, k: &str| m[k].to_vec_f64().unwrap();
    let ck = "down_blocks.0.resnets.0.conv1.weight";
    let (da, db) = (
        delta(&va[0].1, &va[0].0, 32, 2, 0.5 * 1.0 / 2.0),
        delta(&vb[0].1, &vb[0].0, 32, 2, -4.0 / 2.0),
    );
    let want: Vec<f64> = w(&base, ck)
        .iter()
        .zip(&da)
        .zip(&db)
        .map(|((x, p), q)| x + p + q)
        .collect();
    assert!(close(&w(&merged, ck), &want));
    // no alpha in the file: scale 1
    let lk = "down_blocks.1.attentions.0.proj_in.weight";
    let dl = delta(&va[1].1, &va[1].0, 48, 2, 0.5);
    let want: Vec<f64> = w(&base, lk).iter().zip(&dl).map(|(x, d)| x + d).collect();
    assert!(close(&w(&merged, lk), &want));

    // a UNet module this model does not have is an error naming it
    let c = dir.join("c.safetensors");
    write(
        &c,
        &[(
            "lora_unet_input_blocks_99_0_in_layers_2",
            vec![2, 32, 3, 3],
            vec![32, 2, 1, 1],
            None,
        )],
    );
    let err = merge_kohya(&mut merged, &layout, &KohyaLoraFile::new(&c, 1.0))
        .expect_err("unknown module");
    assert!(err.to_string().contains("input_blocks_99"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `lora_te1_` / `lora_te2_` parts of a kohya file merge into the text encoders: W' = W +
/// m (alpha / r) up @ down, checked in f64, and each encoder ignores the other's keys.
#[test]
fn text_encoder_parts_merge_into_their_encoders() {
    use kstyle::formats::kohya::Component;
    use kstyle::models::unet::lora_merge::{merge_kohya_text_encoder, KohyaLoraFile};
    let folder = DiffusersFolder::open(tiny("sdxl")).unwrap();
    let load = |name: &str| -> BTreeMap<String, Tensor> {
        let comp = folder.component(name, None).unwrap();
        let map = comp.tensors().unwrap();
        map.iter()
            .map(|(k, r)| (k.clone(), tensor_from_raw(r, &comp.dir, k).unwrap()))
            .collect()
    };
    let (te1, te2) = (load("text_encoder"), load("text_encoder_2"));
    let mut rng = Rng::new(9);
    let r = 2;
    let mut file = Vec::new();
    let targets = [
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            &te1,
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
        ),
        (
            "lora_te2_text_model_encoder_layers_1_mlp_fc1",
            &te2,
            "text_model.encoder.layers.1.mlp.fc1.weight",
        ),
    ];
    let mut expected = Vec::new();
    for (k, map, key) in targets {
        let (dout, din) = map[key].dims2().unwrap();
        let down =
            Tensor::randn((r, din), &mut rng, kstyle::DType::F32, kstyle::Device::Cpu).unwrap();
        let up =
            Tensor::randn((dout, r), &mut rng, kstyle::DType::F32, kstyle::Device::Cpu).unwrap();
        let alpha = 1.0;
        let delta = up
            .to_dtype(kstyle::DType::F64)
            .unwrap()
            .matmul(&down.to_dtype(kstyle::DType::F64).unwrap())
            .unwrap()
            .scale(0.5 * alpha / r as f64)
            .unwrap();
        expected.push((
            key,
            map[key]
                .to_dtype(kstyle::DType::F64)
                .unwrap()
                .add(&delta)
                .unwrap(),
        ));
        file.push((format!("{k}.lora_down.weight"), down));
        file.push((format!("{k}.lora_up.weight"), up));
        file.push((
            format!("{k}.alpha"),
            Tensor::scalar(alpha, kstyle::DType::F32, kstyle::Device::Cpu).unwrap(),
        ));
    }
    let path =
        std::env::temp_dir().join(format!("kstyle-te-lora-{}.safetensors", std::process::id()));
    kstyle::tensor::save_safetensors(&path, &file, None).unwrap();
    let lora = KohyaLoraFile::new(&path, 0.5);
    for (component, mut map, (key, want)) in [
        (Component::TextEncoder, te1.clone(), &expected[0]),
        (Component::TextEncoder2, te2.clone(), &expected[1]),
    ] {
        let merged = merge_kohya_text_encoder(&mut map, component, &lora).unwrap();
        assert_eq!(merged.len(), 1, "{component:?} merged {merged:?}");
        let got = map[*key].to_vec_f64().unwrap();
        let want = want.to_vec_f64().unwrap();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "{key}: max error {err}");
    }
    std::fs::remove_file(&path).unwrap();
}
