//! `kstyle train --train-text-encoder` through the real binary on the tiny model: the adapter's
//! `lora_te1_` / `lora_te2_` modules, their effect at generation (live, and merged from the
//! kohya export), exact resume, and the refusals.

mod common;
use common::train::{dataset, tensors, train};
use common::{assert_fails_naming, generate_tiny, tmp};

use kstyle::sample::pipeline::{LoadOptions, SdxlPipeline};
use kstyle::tensor::{save_safetensors, SafeTensorsFile};
use kstyle::{DType, Device};
use std::path::{Path, PathBuf};

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The prompt embeddings of a pipeline on the tiny model with `loras` (adapters or kohya files).
fn prompt_embeds(loras: &[&Path]) -> Vec<f64> {
    let pipe = SdxlPipeline::load(&LoadOptions {
        model: common::tiny().join("sdxl"),
        config: None,
        dtype: DType::F32,
        weight_dtype: None,
        device: Device::Cpu,
        loras: loras.iter().map(|p| (p.to_path_buf(), 1.0)).collect(),
        vae: None,
    })
    .unwrap();
    let e =
        kstyle::autograd::no_grad(|| pipe.encode_prompts(&["a [v] landscape at dusk".to_string()]))
            .unwrap();
    let mut v = e.context.to_vec_f64().unwrap();
    v.extend(e.pooled.to_vec_f64().unwrap());
    v
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    (d / b.iter().map(|y| y * y).sum::<f64>()).sqrt()
}

/// `adapter` without its text-encoder modules, written to `out`.
fn without_text_encoders(adapter: &Path, out: &Path) -> PathBuf {
    let f = SafeTensorsFile::open(adapter).unwrap();
    let kept: Vec<(String, kstyle::Tensor)> = f
        .names()
        .filter(|n| !n.starts_with("lora_te"))
        .map(|n| (n.to_string(), f.tensor(n).unwrap()))
        .collect();
    save_safetensors(out, &kept, Some(f.metadata().clone())).unwrap();
    out.to_path_buf()
}

#[test]
fn text_encoder_adapters_are_written_in_kohya_names_and_used_by_generate() {
    let dir = tmp("train-te");
    let data = dataset(&dir);
    let adapter = dir.join("te/adapter.safetensors");
    // lr 1e-2 so that every B moves well away from zero in two steps.
    let o = train(
        &data,
        &adapter,
        "lora",
        &[
            "--max-steps",
            "2",
            "--lr",
            "1e-2",
            "--train-text-encoder",
            "--text-encoder-lr",
            "5e-3",
        ],
    );
    ok(&o);
    let log = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(
        log.contains("text encoders train: 30 adapted linears"),
        "{log}"
    );

    // The tiny encoders have 3 layers: text_encoder's last one gets no adapter (SDXL reads
    // nothing it computes), text_encoder_2's all do; six linears a layer.
    let f = SafeTensorsFile::open(&adapter).unwrap();
    let modules = |prefix: &str| -> Vec<String> {
        f.names()
            .filter_map(|n| n.strip_suffix(".lora_up.weight"))
            .filter(|n| n.starts_with(prefix))
            .map(String::from)
            .collect()
    };
    let (te1, te2) = (modules("lora_te1_"), modules("lora_te2_"));
    assert_eq!((te1.len(), te2.len()), (12, 18), "{te1:?} {te2:?}");
    assert!(te1.iter().all(|m| !m.contains("_layers_2_")), "{te1:?}");
    for name in [
        "self_attn_q_proj",
        "self_attn_out_proj",
        "mlp_fc1",
        "mlp_fc2",
    ] {
        let m = format!("lora_te2_text_model_encoder_layers_2_{name}");
        assert!(te2.contains(&m), "{m} missing from {te2:?}");
        let up = f.tensor(&format!("{m}.lora_up.weight")).unwrap();
        assert!(
            up.to_vec_f64().unwrap().iter().any(|v| *v != 0.0),
            "{m}: lora_up never left zero"
        );
        assert!(f.contains(&format!("{m}.alpha")));
    }
    let meta = f.metadata();
    assert_eq!(meta["kstyle.train.train_text_encoder"], "true");
    assert_eq!(meta["kstyle.train.text_encoder_lr"], "0.005");

    // Live at generation: the prompt embeddings move, and the picture with them.
    let unet_only = without_text_encoders(&adapter, &dir.join("unet_only.safetensors"));
    let (with, without) = (prompt_embeds(&[&adapter]), prompt_embeds(&[&unet_only]));
    assert!(rel(&with, &without) > 1e-3, "{}", rel(&with, &without));
    let mut pngs = Vec::new();
    for (tag, file) in [("with", &adapter), ("without", &unet_only)] {
        let out = dir.join(format!("{tag}.png"));
        let lora = file.to_str().unwrap();
        ok(&generate_tiny(&[
            "--lora",
            lora,
            "--out",
            out.to_str().unwrap(),
        ]));
        pngs.push(std::fs::read(&out).unwrap());
    }
    assert_ne!(pngs[0], pngs[1], "the text-encoder modules changed nothing");

    // The kohya export merges into the text encoders (another tool's way) to the same numbers.
    for (format, file) in [
        ("kohya", "kohya.safetensors"),
        ("diffusers", "peft.safetensors"),
    ] {
        let exported = dir.join(file);
        ok(&common::export_tiny(&adapter, format, &exported));
        let merged = prompt_embeds(&[&exported]);
        assert!(
            rel(&merged, &with) < 1e-5,
            "{format} export: {}",
            rel(&merged, &with)
        );
    }
}

#[test]
fn text_encoder_training_resumes_bit_for_bit() {
    let dir = tmp("train-te-resume");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let c = [
        "--cache",
        cache.to_str().unwrap(),
        "--train-text-encoder",
        "--text-encoder-lr",
        "3e-3",
        "--lr",
        "1e-2",
    ];
    let straight = dir.join("a/adapter.safetensors");
    ok(&train(
        &data,
        &straight,
        "kstyle",
        &[&["--max-steps", "3"][..], &c].concat(),
    ));
    let split = dir.join("b/adapter.safetensors");
    ok(&train(
        &data,
        &split,
        "kstyle",
        &[&["--max-steps", "1", "--save-every", "1"][..], &c].concat(),
    ));
    let ckpt = dir.join("b/adapter.step000001.ckpt.safetensors");
    let resume = ["--max-steps", "3", "--resume", ckpt.to_str().unwrap()];
    // The checkpoint knows it trains the text encoders.
    let o = train(
        &data,
        &split,
        "kstyle",
        &[
            &resume[..],
            &["--cache", cache.to_str().unwrap(), "--lr", "1e-2"],
        ]
        .concat(),
    );
    assert_fails_naming(&o, "--train-text-encoder");
    ok(&train(&data, &split, "kstyle", &[&resume[..], &c].concat()));
    let (a, b) = (tensors(&straight), tensors(&split));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().any(|(n, _)| n.starts_with("lora_te2_")));
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "tensor {na} differs after resume");
    }
}

#[test]
fn text_encoder_lr_needs_text_encoder_training() {
    let dir = tmp("train-te-refusals");
    let data = dataset(&dir);
    let out = dir.join("x/adapter.safetensors");
    let o = train(
        &data,
        &out,
        "lora",
        &["--max-steps", "1", "--text-encoder-lr", "1e-4"],
    );
    assert_fails_naming(&o, "--text-encoder-lr needs --train-text-encoder");
    assert!(!out.exists());
}

/// Mixed precision: the text encoders and their adapters compute in bf16 while the file keeps
/// the optimizer's f32 values; a --sample-every preview encodes its prompt with the live,
/// adapted encoders.
#[test]
fn bf16_text_encoder_training_writes_f32_factors_and_previews() {
    let dir = tmp("train-te-bf16");
    let data = dataset(&dir);
    let out = dir.join("bf/adapter.safetensors");
    ok(&train(
        &data,
        &out,
        "lora",
        &[
            "--max-steps",
            "1",
            "--dtype",
            "bf16",
            "--train-text-encoder",
            "--lr",
            "1e-2",
            "--sample-every",
            "1",
            "--sample-prompt",
            "a [v] house",
            "--sample-steps",
            "2",
        ],
    ));
    let f = SafeTensorsFile::open(&out).unwrap();
    let te: Vec<&str> = f.names().filter(|n| n.starts_with("lora_te")).collect();
    assert_eq!(te.len(), 90, "30 modules x (down, up, alpha)");
    for n in te {
        assert_eq!(f.tensor(n).unwrap().dtype(), DType::F32, "{n}");
    }
    // The f32 masters, not bf16 leaves: some value is not a bf16 number.
    let up = f
        .tensor("lora_te2_text_model_encoder_layers_0_mlp_fc2.lora_up.weight")
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert!(up.iter().any(|v| v.to_bits() & 0xffff != 0), "{up:?}");
    assert!(dir.join("bf/adapter.samples/step000001.png").exists());
}
