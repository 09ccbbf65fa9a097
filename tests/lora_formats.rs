//! LoRA-family files beyond kohya's own LoRA: every name spelling the loaders read (PEFT,
//! diffusers new and old, ComfyUI's bare paths, SimpleTuner's `lycoris_`, dotted sgm) and every
//! storage (LoCon Tucker cores, LoHa, LoKr, full differences, DoRA).
//!
//! The fixture's kohya LoRA, whose merged UNet the float64 reference ran, is re-stored in each
//! form: a re-spelling must merge bit for bit like the original; a re-factoring (LoHa with an
//! all-ones second factor, LoKr with a 1x1 first factor, the difference itself) must merge to
//! the same weights up to f64 rounding and pass the reference forward. LyCORIS' own forward on
//! its own files (tests/fixtures/extra) checks LoHa, LoKr, Tucker cores, DoRA and full
//! differences; the structure is also checked against the formats' definitions on the tiny
//! UNet's real modules.

mod common;
#[path = "lora_formats/structure.rs"]
mod structure;

use common::{generate_tiny, tiny, tmp};
use kstyle::autograd::no_grad;
use kstyle::formats::diffusers::DiffusersFolder;
use kstyle::formats::kohya::{Component, KohyaModel, LoraEntry, ModuleIndex};
use kstyle::formats::raw::write_safetensors;
use kstyle::formats::{MappedFile, RawTensor, TensorMap};
use kstyle::models::unet::lora_merge::{merge_kohya, merge_kohya_text_encoder};
use kstyle::models::unet::{KohyaLoraFile, UNet2DConditionModel, UNetConfig};
use kstyle::nn::weights::tensor_from_raw;
use kstyle::tensor::{Rng, SafeTensorsFile};
use kstyle::tolerance::{compare, Tolerance};
use kstyle::{DType, Device, Tensor};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

type Weights = BTreeMap<String, Tensor>;

fn component(name: &str) -> Weights {
    let folder = DiffusersFolder::open(tiny().join("sdxl")).unwrap();
    let comp = folder.component(name, None).unwrap();
    let map = comp.tensors().unwrap();
    map.iter()
        .map(|(k, r)| (k.clone(), tensor_from_raw(r, &comp.dir, k).unwrap()))
        .collect()
}

fn config() -> UNetConfig {
    UNetConfig::from_file(tiny().join("sdxl/unet/config.json")).unwrap()
}

fn unet_index(w: &Weights) -> ModuleIndex {
    ModuleIndex::unet(
        w.iter().map(|(k, t)| (k.as_str(), t.dims())),
        &config().layout(),
    )
}

/// The fixture's kohya LoRA as parsed entries (diffusers module paths, fp16 factors, alpha 2).
fn fixture_entries() -> Vec<LoraEntry<'static>> {
    let model = KohyaModel::new(vec![unet_index(&component("unet"))]);
    let file = MappedFile::open(tiny().join("kohya_lora.safetensors")).unwrap();
    let lora = model
        .parse(file.tensors().unwrap(), "kohya_lora")
        .unwrap()
        .deny_unknown("kohya_lora")
        .unwrap();
    lora.entries
        .into_iter()
        .map(|e| LoraEntry {
            down: e.down.into_owned(),
            up: e.up.into_owned(),
            ..e
        })
        .collect()
}

/// The multiplier the reference merged the fixture LoRA at.
fn reference_multiplier() -> f64 {
    SafeTensorsFile::open(tiny().join("reference/unet_kohya_lora.safetensors"))
        .unwrap()
        .meta_f64("multiplier")
        .unwrap()
}

fn merged(path: &Path, m: f64) -> Weights {
    let mut w = component("unet");
    let report = merge_kohya(&mut w, &config().layout(), &KohyaLoraFile::new(path, m)).unwrap();
    assert!(
        !report.merged.is_empty(),
        "{} merged nothing",
        path.display()
    );
    w
}

/// Largest |a - b| / (1 + |b|) over every tensor of two weight maps.
fn max_diff(a: &Weights, b: &Weights) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0.0f64;
    for (k, t) in a {
        let (x, y) = (t.to_vec_f64().unwrap(), b[k].to_vec_f64().unwrap());
        assert_eq!(x.len(), y.len(), "{k}");
        for (x, y) in x.iter().zip(&y) {
            worst = worst.max((x - y).abs() / (1.0 + y.abs()));
        }
    }
    worst
}

/// The UNet with `path` merged at the reference multiplier against the float64 reference.
fn assert_reference_forward(path: &Path) {
    let lora = KohyaLoraFile::new(path, reference_multiplier());
    let model =
        UNet2DConditionModel::from_diffusers(tiny().join("sdxl"), &[lora], DType::F32, Device::Cpu)
            .unwrap()
            .model;
    let f = SafeTensorsFile::open(tiny().join("reference/unet_kohya_lora.safetensors")).unwrap();
    let x = |n: &str| f.tensor(n).unwrap().to_dtype(DType::F32).unwrap();
    let out = no_grad(|| {
        model.forward(
            &x("sample"),
            &x("timestep"),
            &x("encoder_hidden_states"),
            &x("text_embeds"),
            &x("time_ids"),
        )
    })
    .unwrap();
    let c = compare(&out, &f.tensor("out").unwrap(), Tolerance::F32_FORWARD).unwrap();
    assert!(c.passed(), "{}: {c:?}", path.display());
}

fn save(dir: &Path, name: &str, map: &TensorMap<'_>, meta: Option<(&str, String)>) -> PathBuf {
    let path = dir.join(name);
    let meta = meta.map(|(k, v)| HashMap::from([(k.to_string(), v)]));
    write_safetensors(&path, map, meta).unwrap();
    path
}

fn f64_tensor(shape: Vec<usize>, v: &[f64]) -> RawTensor<'static> {
    RawTensor::from_f64(Dtype::F64, shape, v).unwrap()
}

fn values(t: &RawTensor<'_>) -> Vec<f64> {
    t.to_f64_vec("test", "").unwrap()
}

/// `t` with every element times `k`, stored in f64 (a power of two keeps it exact; in the
/// fixture's fp16 it would not be, below fp16's normal range).
fn times(t: &RawTensor<'_>, k: f64) -> RawTensor<'static> {
    let v: Vec<f64> = values(t).iter().map(|x| x * k).collect();
    f64_tensor(t.shape.clone(), &v)
}

/// Writes the fixture's modules under `name(module)` + the given suffixes.
fn respell(
    entries: &[LoraEntry<'_>],
    name: impl Fn(&str) -> String,
    (down, up, alpha): (&str, &str, Option<&str>),
) -> TensorMap<'static> {
    let mut map = TensorMap::new();
    for e in entries {
        let n = name(&e.module);
        map.insert(format!("{n}{down}"), e.down.clone().into_owned());
        map.insert(format!("{n}{up}"), e.up.clone().into_owned());
        if let Some(a) = alpha {
            let a_key = format!("{n}{a}");
            map.insert(a_key, f64_tensor(vec![], &[e.alpha]));
        }
    }
    map
}

#[test]
fn every_name_spelling_merges_bit_for_bit_like_the_kohya_file() {
    let dir = tmp("lora-spellings");
    let entries = fixture_entries();
    assert_eq!(entries.len(), 176, "fixture modules");
    let m = reference_multiplier();
    let kohya = merged(&tiny().join("kohya_lora.safetensors"), m);
    let layout = config().layout();
    let keys = layout.key_map();
    let sgm_dotted = |module: &str| {
        let k = keys.to_sgm(&format!("{module}.weight")).unwrap();
        k.strip_suffix(".weight").unwrap().to_string()
    };
    // The old attention-processor spelling: `attn1.processor.to_q_lora.down.weight`.
    let processor = |module: &str| {
        let (head, proj) = module.rsplit_once(".attn").unwrap();
        let (n, proj) = proj.split_once('.').unwrap();
        let proj = proj.strip_suffix(".0").unwrap_or(proj);
        format!("unet.{head}.attn{n}.processor.{proj}")
    };
    let spellings: Vec<(&str, TensorMap<'static>)> = vec![
        (
            "diffusers.safetensors",
            respell(
                &entries,
                |m| format!("unet.{m}"),
                (".lora.down.weight", ".lora.up.weight", Some(".alpha")),
            ),
        ),
        (
            "processors.safetensors",
            respell(
                &entries,
                processor,
                ("_lora.down.weight", "_lora.up.weight", Some(".alpha")),
            ),
        ),
        (
            "comfy_bare.safetensors",
            respell(
                &entries,
                |m| m.to_string(),
                (".lora_down.weight", ".lora_up.weight", Some(".alpha")),
            ),
        ),
        (
            "simpletuner.safetensors",
            respell(
                &entries,
                |m| format!("lycoris_{}", m.replace('.', "_")),
                (".lora_down.weight", ".lora_up.weight", Some(".alpha")),
            ),
        ),
        (
            "sgm_dotted.safetensors",
            respell(
                &entries,
                |m| format!("diffusion_model.{}", sgm_dotted(m)),
                (".lora_down.weight", ".lora_up.weight", Some(".alpha")),
            ),
        ),
    ];
    for (name, map) in &spellings {
        let path = save(&dir, name, map, None);
        assert_eq!(max_diff(&merged(&path, m), &kohya), 0.0, "{name}");
    }

    // PEFT with diffusers' metadata: `lora_alpha` for most modules, `alpha_pattern` overriding
    // it for every attn2 module, whose B is stored doubled (exact) against alpha 1.
    let mut peft = TensorMap::new();
    let mut pattern = serde_json::Map::new();
    for e in &entries {
        let attn2 = e.module.contains(".attn2.");
        let up = if attn2 {
            times(&e.up, 2.0)
        } else {
            e.up.clone().into_owned()
        };
        if attn2 {
            pattern.insert(e.module.clone(), serde_json::json!(e.alpha / 2.0));
        }
        peft.insert(
            format!("unet.{}.lora_A.weight", e.module),
            e.down.clone().into_owned(),
        );
        peft.insert(format!("unet.{}.lora_B.weight", e.module), up);
    }
    let meta = serde_json::json!({
        "unet.r": 4, "unet.lora_alpha": entries[0].alpha, "unet.alpha_pattern": pattern,
    });
    let path = save(
        &dir,
        "peft.safetensors",
        &peft,
        Some(("lora_adapter_metadata", meta.to_string())),
    );
    assert_eq!(max_diff(&merged(&path, m), &kohya), 0.0, "peft + metadata");
    assert_reference_forward(&path);

    // PEFT without metadata means scale 1: the same update with alpha / r folded into B.
    let folded = respell(
        &entries
            .iter()
            .map(|e| LoraEntry {
                up: times(&e.up, e.alpha / 4.0),
                ..e.clone()
            })
            .collect::<Vec<_>>(),
        |m| format!("unet.{m}"),
        (".lora_A.weight", ".lora_B.weight", None),
    );
    let path = save(&dir, "peft_plain.safetensors", &folded, None);
    assert_eq!(
        max_diff(&merged(&path, m), &kohya),
        0.0,
        "peft without metadata"
    );

    // The same PEFT file through the CLI: the image is byte-identical to the kohya file's.
    let png = |lora: &Path, out: &str| {
        let out = dir.join(out);
        let lora = format!("{}:{m}", lora.display());
        let o = generate_tiny(&["--lora", &lora, "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", common::stderr(&o));
        std::fs::read(out).unwrap()
    };
    assert_eq!(
        png(&dir.join("peft.safetensors"), "peft.png"),
        png(&tiny().join("kohya_lora.safetensors"), "kohya.png")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn text_encoder_spellings_merge_like_kohya_names() {
    let dir = tmp("lora-te-spellings");
    let mut rng = Rng::new(3);
    let mut kohya = TensorMap::new();
    let mut peft = TensorMap::new();
    let mut diffusers = TensorMap::new();
    let targets = [
        (
            "lora_te1_",
            "text_encoder.",
            "text_encoder",
            "text_model.encoder.layers.0.self_attn.q_proj",
        ),
        (
            "lora_te2_",
            "text_encoder_2.",
            "text_encoder_2",
            "text_model.encoder.layers.2.mlp.fc2",
        ),
    ];
    for (k_prefix, d_prefix, comp, module) in targets {
        let (dout, din) = component(comp)[&format!("{module}.weight")]
            .dims2()
            .unwrap();
        let down: Vec<f64> = (0..2 * din).map(|_| 0.1 * rng.normal()).collect();
        let up: Vec<f64> = (0..dout * 2).map(|_| 0.1 * rng.normal()).collect();
        let (down, up) = (
            f64_tensor(vec![2, din], &down),
            f64_tensor(vec![dout, 2], &up),
        );
        let k = format!("{k_prefix}{}", module.replace('.', "_"));
        kohya.insert(format!("{k}.lora_down.weight"), down.clone());
        kohya.insert(format!("{k}.lora_up.weight"), up.clone());
        peft.insert(format!("{d_prefix}{module}.lora_A.weight"), down.clone());
        peft.insert(format!("{d_prefix}{module}.lora_B.weight"), up.clone());
        diffusers.insert(
            format!("{d_prefix}{module}.lora_linear_layer.down.weight"),
            down,
        );
        diffusers.insert(
            format!("{d_prefix}{module}.lora_linear_layer.up.weight"),
            up,
        );
    }
    let paths: Vec<PathBuf> = [("k", &kohya), ("p", &peft), ("d", &diffusers)]
        .iter()
        .map(|(n, map)| save(&dir, &format!("{n}.safetensors"), map, None))
        .collect();
    for (name, c) in [
        ("text_encoder", Component::TextEncoder),
        ("text_encoder_2", Component::TextEncoder2),
    ] {
        let base = component(name);
        let runs: Vec<Weights> = paths
            .iter()
            .map(|p| {
                let mut w = base.clone();
                let merged = merge_kohya_text_encoder(&mut w, c, &KohyaLoraFile::new(p, 0.75));
                assert_eq!(merged.unwrap().len(), 1, "{}", p.display());
                w
            })
            .collect();
        assert_eq!(max_diff(&runs[1], &runs[0]), 0.0, "{name} peft");
        assert_eq!(max_diff(&runs[2], &runs[0]), 0.0, "{name} diffusers");
        assert!(max_diff(&runs[0], &base) > 0.0);
    }
    // The UNet loader leaves a text-encoder-only PEFT file to the encoders.
    let mut w = component("unet");
    let report = merge_kohya(
        &mut w,
        &config().layout(),
        &KohyaLoraFile::new(&paths[1], 1.0),
    )
    .unwrap();
    assert!(report.merged.is_empty());
    assert_eq!(report.not_unet.len(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lycoris_refactorings_of_the_fixture_pass_the_reference() {
    let dir = tmp("lora-lycoris");
    let entries = fixture_entries();
    let m = reference_multiplier();
    let kohya = merged(&tiny().join("kohya_lora.safetensors"), m);
    let mut loha = TensorMap::new();
    let mut lokr = TensorMap::new();
    let mut full = TensorMap::new();
    for e in &entries {
        let n = format!("lora_unet_{}", e.module.replace('.', "_"));
        let (out, r) = (e.up.shape[0], e.up.shape[1]);
        let din = e.down.shape[1];
        let alpha = f64_tensor(vec![], &[e.alpha]);
        // LoHa: (up @ down) ⊙ (ones @ ones / r) = up @ down exactly (r = 4).
        loha.insert(format!("{n}.hada_w1_a"), e.up.clone().into_owned());
        loha.insert(format!("{n}.hada_w1_b"), e.down.clone().into_owned());
        loha.insert(
            format!("{n}.hada_w2_a"),
            f64_tensor(vec![out, r], &vec![1.0; out * r]),
        );
        let quarter = vec![1.0 / r as f64; r * din];
        loha.insert(format!("{n}.hada_w2_b"), f64_tensor(vec![r, din], &quarter));
        loha.insert(format!("{n}.alpha"), alpha.clone());
        // LoKr: kron([[1]], up @ down), alpha over w2's rank.
        lokr.insert(format!("{n}.lokr_w1"), f64_tensor(vec![1, 1], &[1.0]));
        lokr.insert(format!("{n}.lokr_w2_a"), e.up.clone().into_owned());
        lokr.insert(format!("{n}.lokr_w2_b"), e.down.clone().into_owned());
        lokr.insert(format!("{n}.alpha"), alpha);
        // The difference itself, in f64.
        let d = e.delta_f64(1.0).unwrap();
        full.insert(format!("{n}.diff"), f64_tensor(vec![out, din], &d));
    }
    for (name, map) in [("loha", &loha), ("lokr", &lokr), ("full", &full)] {
        let path = save(&dir, &format!("{name}.safetensors"), map, None);
        let diff = max_diff(&merged(&path, m), &kohya);
        // Same update in another summation order: f64 rounding, then one f64 -> f64 store.
        assert!(diff < 1e-14, "{name}: {diff}");
        assert_reference_forward(&path);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `kstyle verify` cases of `tests/fixtures/extra` for LoRA-family files, against the tools
/// that wrote them:
///
/// - `lora_lycoris` (`gen_lycoris.py`): LoHa, LoKr, their Tucker forms, LoCon with a Tucker
///   core, DoRA on output rows and on input columns, full differences, on a Linear with bias, a
///   cross-attention projection, a 3x3 and a 1x1 conv, against LyCORIS' own forward with the
///   same fp16 file. Each update moves the output by 3-44%, so a wrong layout or scale would miss
///   the tolerance by orders of magnitude.
/// - `lora_peft` (`gen_peft.py`): a LoRA as diffusers' SDXL scripts save it (PEFT keys under
///   `unet.` and `text_encoder.`, DoRA magnitudes, lora_alpha 8 over rank 4 with a rank_pattern
///   and an alpha_pattern in `lora_adapter_metadata`) against peft's forward at adapter weights
///   1 and 0.6 (the UNet) and 1 (CLIP-L's penultimate state).
/// - `lora_export` (`gen_export.py`): `kstyle export`'s kohya and diffusers files as diffusers'
///   `load_lora_weights` reads them (all 176 UNet and 30 text-encoder modules placed): the UNet
///   output and the prompt embeddings; a conv-LoRA adapter's two exports (242 modules, 49
///   of them convolutions): the UNet output; and a DoRA adapter's diffusers export (PEFT DoRA
///   layers on both): the UNet output and the prompt embeddings.
#[test]
fn lora_files_match_the_tools_that_wrote_them() {
    let cases = ["lora_lycoris", "lora_peft", "lora_export"].map(String::from);
    let report = kstyle::verify::run(&tiny(), Device::Cpu, Some(&cases)).unwrap();
    assert!(report.failed_cases.is_empty(), "{:?}", report.failed_cases);
    assert_eq!(report.rows.len(), 8 + 3 + 3 * 3 + 2);
    for r in &report.rows {
        eprintln!("{} {}: relative error {:.2e}", r.case, r.tensor, r.error);
        assert!(
            r.passed,
            "{} {} {:e} > {:e}",
            r.case, r.tensor, r.error, r.tolerance
        );
    }
}

/// `SdxlPipeline::check_files` (what `generate` runs on the refiner before the base run, from
/// configs and file headers) accepts exactly the files a load accepts: every LoRA-family fixture
/// and an adapter made for the base, each against the tiny base and the tiny refiner. Files
/// made for one model fail on the other, so both outcomes are exercised.
#[test]
fn header_checks_accept_exactly_what_loading_accepts() {
    use kstyle::formats::adapter::{Adapter, Method};
    use kstyle::nn::lora::{LoraAdapter, LoraConfig};
    use kstyle::sample::pipeline::{unet_index_for, LoadOptions, SdxlPipeline};
    let dir = tmp("check-loras");
    std::fs::create_dir_all(&dir).unwrap();
    let base = tiny().join("sdxl");
    let refiner = common::tiny_refiner_folder(&dir);
    let extra = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extra");
    let mut files: Vec<PathBuf> = vec![tiny().join("kohya_lora.safetensors")];
    for name in std::fs::read_dir(&extra).unwrap() {
        let p = name.unwrap().path();
        let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
        let lora = [
            "lycoris_",
            "peft_dora",
            "export_kohya",
            "export_diffusers",
            "export_dora_diffusers",
            "refiner_lora",
        ]
        .iter()
        .any(|s| stem.starts_with(s))
            && !stem.ends_with("_reference");
        if lora {
            files.push(p);
        }
    }
    files.sort();
    // Adapters for the base: one on a module whose kohya name the refiner lacks (its levels
    // are numbered differently), one on a module both have, at the base's width.
    let cfg = UNetConfig::from_file(base.join("unet/config.json")).unwrap();
    let index = unet_index_for(&cfg);
    for (i, module) in [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
    ]
    .into_iter()
    .enumerate()
    {
        let &[d_out, d_in] = index.weight_shape(module).unwrap() else {
            panic!("{module} is not a Linear")
        };
        let config = LoraConfig {
            rank: 2,
            ..LoraConfig::default()
        };
        let mut rng = Rng::new(3);
        let lora = LoraAdapter::init(d_in, d_out, config, None, &mut rng, DType::F32, Device::Cpu)
            .unwrap();
        let path = dir.join(format!("adapter-{i}.safetensors"));
        Adapter {
            method: Method::Lora,
            config,
            concepts: Vec::new(),
            concept_embeds: None,
            modules: vec![(module.to_string(), lora)],
            cultural: None,
            settings: BTreeMap::new(),
        }
        .save(&path, &index)
        .unwrap();
        files.push(path);
    }
    let mut outcomes = BTreeMap::new();
    for model in [&base, &refiner] {
        for file in &files {
            let opts = LoadOptions {
                model: model.clone(),
                config: None,
                dtype: DType::F32,
                weight_dtype: None,
                device: Device::Cpu,
                loras: vec![(file.clone(), 0.7)],
                vae: None,
            };
            let checked = SdxlPipeline::check_files(&opts);
            let loaded = SdxlPipeline::load(&opts);
            let name = format!("{} on {}", file.display(), model.display());
            assert_eq!(
                checked.is_ok(),
                loaded.is_ok(),
                "{name}: check {:?}, load {:?}",
                checked.err(),
                loaded.err().map(|e| e.to_string())
            );
            *outcomes.entry(checked.is_ok()).or_insert(0) += 1;
        }
    }
    assert!(
        outcomes[&true] >= 10 && outcomes[&false] >= 3,
        "{outcomes:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
