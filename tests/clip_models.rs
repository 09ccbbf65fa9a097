//! CLIP text encoders, vision tower and metrics against the float64 references of the tiny
//! fixtures (through the `kstyle verify` cases), plus the loader's and forward's refusals.

use kstyle::models::clip::{ClipModel, ClipTextConfig, ClipTextModel};
use kstyle::nn::Weights;
use kstyle::tensor::load_safetensors;
use kstyle::{DType, Device, Error, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
}

fn te2_parts() -> (BTreeMap<String, Tensor>, ClipTextConfig) {
    let dir = tiny().join("sdxl/text_encoder_2");
    let map = load_safetensors(dir.join("model.safetensors")).unwrap();
    let config = ClipTextConfig::from_file(dir.join("config.json")).unwrap();
    (map, config)
}

fn weights(map: BTreeMap<String, Tensor>) -> Weights {
    Weights::from_map(map, "te2-test", DType::F32, Device::Cpu)
}

fn ids(rows: &[Vec<i64>]) -> Tensor {
    let s = rows[0].len();
    let flat: Vec<i64> = rows.concat();
    Tensor::from_vec(flat, (rows.len(), s), Device::Cpu).unwrap()
}

#[test]
fn verify_cases_pass_on_tiny() {
    let only: Vec<String> = ["tokenizer", "text_encoders", "clip"]
        .map(String::from)
        .to_vec();
    let report = kstyle::verify::run(&tiny(), Device::Cpu, Some(&only)).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    for case in &only {
        assert!(
            report.rows.iter().any(|r| &r.case == case),
            "case {case} produced no rows"
        );
    }
    let failed: Vec<_> = report.rows.iter().filter(|r| !r.passed).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    // Every tensor of the reference files is covered.
    for t in [
        "te1.penultimate",
        "te1.last",
        "te2.penultimate",
        "te2.text_embeds",
        "prompt_embeds",
        "concept_ids",
        "concept_embeds",
        "pixel_values",
        "image_embeds",
        "css_per_image",
        "css",
        "clip_score_per_image",
    ] {
        assert!(report.rows.iter().any(|r| r.tensor == t), "no row for {t}");
    }
}

#[test]
fn missing_weight_is_an_error_naming_the_key() {
    let (mut map, config) = te2_parts();
    let key = "text_model.encoder.layers.1.mlp.fc1.weight";
    assert!(map.remove(key).is_some());
    let err = ClipTextModel::load_with_projection(&weights(map), &config).unwrap_err();
    assert!(
        matches!(&err, Error::MissingKey { key: k, .. } if k == key),
        "{err}"
    );
    assert!(err.to_string().contains(key));
}

#[test]
fn misshaped_weight_is_an_error_naming_the_key() {
    let (mut map, config) = te2_parts();
    let key = "text_projection.weight";
    let d = config.encoder.hidden_size;
    let wrong = Tensor::zeros((d, d + 1), DType::F16, Device::Cpu).unwrap();
    map.insert(key.into(), wrong);
    let err = ClipTextModel::load_with_projection(&weights(map), &config).unwrap_err();
    assert!(
        matches!(&err, Error::WrongShape { key: k, .. } if k == key),
        "{err}"
    );
}

#[test]
fn weights_left_unused_by_the_config_are_reported() {
    let (map, mut config) = te2_parts();
    config.encoder.num_hidden_layers -= 1;
    let vb = weights(map);
    ClipTextModel::load_with_projection(&vb, &config).unwrap();
    let last = config.encoder.num_hidden_layers;
    let err = vb.ensure_all_used(|_| false).unwrap_err().to_string();
    assert!(err.contains(&format!("layers.{last}.")), "{err}");
}

#[test]
fn outputs_follow_transformers_hidden_state_indexing() {
    let (map, config) = te2_parts();
    let m = ClipTextModel::load_with_projection(&weights(map), &config).unwrap();
    let (bos, eos) = (49406, 49407);
    // Short rows: the model takes any S up to max_position_embeddings.
    let x = ids(&[vec![bos, 320, 2308, eos, 0, 0], vec![bos, eos, 0, 0, 0, 0]]);
    let out = m.forward(&x).unwrap();
    let l = config.encoder.num_hidden_layers;
    let d = config.encoder.hidden_size;
    assert_eq!(out.hidden_states.len(), l + 1);
    assert_eq!(out.penultimate().dims(), &[2, 6, d]);
    assert_eq!(out.from_end(1).unwrap().id(), out.penultimate().id());
    assert!(out.from_end(l + 1).is_none());
    assert_eq!(out.pooled.dims(), &[2, d]);
    let pooled = out.pooled.to_vec_f64().unwrap();
    let last = out.last_hidden_state.to_vec_f64().unwrap();
    // Row 0 pools at position 3, row 1 at position 1 (the first EOS).
    assert_eq!(&pooled[..d], &last[3 * d..4 * d]);
    assert_eq!(&pooled[d..], &last[(6 + 1) * d..(6 + 2) * d]);
    assert_eq!(
        out.text_embeds.as_ref().unwrap().dims(),
        &[2, config.projection_dim]
    );
    // Causality: a token never sees what follows it, so changing padding leaves row 0 alone
    // up to its EOS.
    let y = ids(&[vec![bos, 320, 2308, eos, 5, 7], vec![bos, eos, 0, 0, 0, 0]]);
    let out2 = m.forward(&y).unwrap();
    let a = out.penultimate().to_vec_f64().unwrap();
    let b = out2.penultimate().to_vec_f64().unwrap();
    assert_eq!(&a[..4 * d], &b[..4 * d]);
    assert_ne!(&a[4 * d..6 * d], &b[4 * d..6 * d]);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let (map, config) = te2_parts();
    let m = ClipTextModel::load_with_projection(&weights(map), &config).unwrap();
    // No EOS to pool at.
    assert!(m.forward(&ids(&[vec![49406, 320, 0]])).is_err());
    // Id past the vocabulary.
    assert!(m.forward(&ids(&[vec![49406, 49408, 49407]])).is_err());
    // Longer than the position table.
    let long = vec![0i64; config.max_position_embeddings + 1];
    assert!(m.forward(&ids(&[long])).is_err());
    // Float ids.
    let f = Tensor::zeros((1, 3), DType::F32, Device::Cpu).unwrap();
    assert!(m.forward(&f).is_err());

    let clip = ClipModel::from_folder(tiny().join("clip"), DType::F32, Device::Cpu).unwrap();
    let s = clip.config.vision.image_size;
    let wrong = Tensor::zeros((1, 3, s + 1, s), DType::F32, Device::Cpu).unwrap();
    assert!(clip.get_image_features(&wrong).is_err());
    let right = Tensor::zeros((2, 3, s, s), DType::F32, Device::Cpu).unwrap();
    let f = clip.get_image_features(&right).unwrap();
    assert_eq!(f.dims(), &[2, clip.config.projection_dim]);
}
