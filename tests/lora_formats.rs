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

/// Random f64 values of `shape`.
fn randn(rng: &mut Rng, shape: &[usize]) -> (Vec<f64>, RawTensor<'static>) {
    let v: Vec<f64> = (0..shape.iter().product()).map(|_| rng.normal()).collect();
    let t = f64_tensor(shape.to_vec(), &v);
    (v, t)
}

/// Merged `<module>.weight` of a one-module file at strength `m`, as f64.
fn merge_one(dir: &Path, map: &TensorMap<'_>, module: &str, m: f64) -> (Vec<f64>, Vec<f64>) {
    let path = save(dir, "one.safetensors", map, None);
    let base = component("unet");
    let mut w = base.clone();
    merge_kohya(&mut w, &config().layout(), &KohyaLoraFile::new(&path, m)).unwrap();
    let key = format!("{module}.weight");
    (
        base[&key].to_vec_f64().unwrap(),
        w[&key].to_vec_f64().unwrap(),
    )
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0, f64::max);
    assert!(worst < 1e-12, "{what}: {worst}");
}

#[test]
fn kronecker_updates_follow_torch_kron_on_linear_and_conv_weights() {
    let dir = tmp("lora-lokr");
    let mut rng = Rng::new(11);
    // proj_in of down_blocks.1 is (48, 48); w1 (2, 3) -> w2 (24, 16).
    let lin = "down_blocks.1.attentions.0.proj_in";
    let (w1, t1) = randn(&mut rng, &[2, 3]);
    let (w2, t2) = randn(&mut rng, &[24, 16]);
    let n = format!("lora_unet_{}", lin.replace('.', "_"));
    let map = TensorMap::from([
        (format!("{n}.lokr_w1"), t1),
        (format!("{n}.lokr_w2"), t2),
        (format!("{n}.alpha"), f64_tensor(vec![], &[7.0])),
    ]);
    let (base, got) = merge_one(&dir, &map, lin, 0.5);
    let want: Vec<f64> = (0..48 * 48)
        .map(|idx| {
            let (row, col) = (idx / 48, idx % 48);
            // Both factors whole: alpha is ignored (scale 1).
            base[idx] + 0.5 * w1[(row / 24) * 3 + col / 16] * w2[(row % 24) * 16 + col % 16]
        })
        .collect();
    assert_close(&got, &want, "linear kron");

    // conv1 of down_blocks.0.resnets.0 is (32, 32, 3, 3); w1 (2, 4) -> w2 (16, 8, 3, 3) from
    // a rank-3 product, alpha 6 over rank 3.
    let conv = "down_blocks.0.resnets.0.conv1";
    let (w1, t1) = randn(&mut rng, &[2, 4]);
    let (a, ta) = randn(&mut rng, &[16, 3]);
    let (b, tb) = randn(&mut rng, &[3, 8 * 9]);
    let n = format!("lora_unet_{}", conv.replace('.', "_"));
    let map = TensorMap::from([
        (format!("{n}.lokr_w1"), t1),
        (format!("{n}.lokr_w2_a"), ta),
        (format!("{n}.lokr_w2_b"), tb),
        (format!("{n}.alpha"), f64_tensor(vec![], &[6.0])),
    ]);
    let (base, got) = merge_one(&dir, &map, conv, 1.0);
    let w2 = |k: usize, l: usize, s: usize| {
        (0..3)
            .map(|r| a[k * 3 + r] * b[r * 72 + l * 9 + s])
            .sum::<f64>()
    };
    let want: Vec<f64> = (0..32 * 32 * 9)
        .map(|idx| {
            let (o, i, s) = (idx / 288, (idx / 9) % 32, idx % 9);
            base[idx] + 2.0 * w1[(o / 16) * 4 + i / 8] * w2(o % 16, i % 8, s)
        })
        .collect();
    assert_close(&got, &want, "conv kron");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tucker_cores_match_their_expanded_factors() {
    let dir = tmp("lora-tucker");
    let mut rng = Rng::new(12);
    let conv = "down_blocks.0.resnets.0.conv1"; // (32, 32, 3, 3)
    let n = format!("lora_unet_{}", conv.replace('.', "_"));
    let r = 3;
    // LoCon: down (r, 32, 1, 1), mid (r, r, 3, 3), up (32, r, 1, 1) against the plain conv LoRA
    // whose down is Σ_n mid[m, n] down[n].
    let (down, td) = randn(&mut rng, &[r, 32, 1, 1]);
    let (mid, tm) = randn(&mut rng, &[r, r, 3, 3]);
    let (_, tu) = randn(&mut rng, &[32, r, 1, 1]);
    let expanded: Vec<f64> = (0..r * 32 * 9)
        .map(|idx| {
            let (m, i, s) = (idx / 288, (idx / 9) % 32, idx % 9);
            (0..r)
                .map(|n| mid[(m * r + n) * 9 + s] * down[n * 32 + i])
                .sum()
        })
        .collect();
    let alpha = f64_tensor(vec![], &[1.5]);
    let core = TensorMap::from([
        (format!("{n}.lora_down.weight"), td),
        (format!("{n}.lora_mid.weight"), tm),
        (format!("{n}.lora_up.weight"), tu.clone()),
        (format!("{n}.alpha"), alpha.clone()),
    ]);
    let plain = TensorMap::from([
        (
            format!("{n}.lora_down.weight"),
            f64_tensor(vec![r, 32, 3, 3], &expanded),
        ),
        (format!("{n}.lora_up.weight"), tu),
        (format!("{n}.alpha"), alpha.clone()),
    ]);
    let (_, got) = merge_one(&dir, &core, conv, 0.8);
    let (_, want) = merge_one(&dir, &plain, conv, 0.8);
    assert_close(&got, &want, "LoCon core");

    // LoHa with cores t = δ_ij c_s: each factor is c_s · (aᵀ b), the non-Tucker factor with
    // a transposed and b spread over the kernel by c.
    let c: Vec<f64> = (0..9).map(|_| rng.normal()).collect();
    let d: Vec<f64> = (0..9).map(|_| rng.normal()).collect();
    let core_of = |c: &[f64]| {
        let v: Vec<f64> = (0..r * r * 9)
            .map(|idx| {
                if idx / 9 / r == (idx / 9) % r {
                    c[idx % 9]
                } else {
                    0.0
                }
            })
            .collect();
        f64_tensor(vec![r, r, 3, 3], &v)
    };
    let (a1, ta1) = randn(&mut rng, &[r, 32]);
    let (b1, tb1) = randn(&mut rng, &[r, 32]);
    let (a2, ta2) = randn(&mut rng, &[r, 32]);
    let (b2, tb2) = randn(&mut rng, &[r, 32]);
    let tucker = TensorMap::from([
        (format!("{n}.hada_w1_a"), ta1),
        (format!("{n}.hada_w1_b"), tb1),
        (format!("{n}.hada_w2_a"), ta2),
        (format!("{n}.hada_w2_b"), tb2),
        (format!("{n}.hada_t1"), core_of(&c)),
        (format!("{n}.hada_t2"), core_of(&d)),
        (format!("{n}.alpha"), alpha.clone()),
    ]);
    let transpose =
        |a: &[f64]| -> Vec<f64> { (0..32 * r).map(|i| a[(i % r) * 32 + i / r]).collect() };
    let spread = |b: &[f64], c: &[f64]| -> Vec<f64> {
        (0..r * 32 * 9).map(|i| b[i / 9] * c[i % 9]).collect()
    };
    let flat = TensorMap::from([
        (
            format!("{n}.hada_w1_a"),
            f64_tensor(vec![32, r], &transpose(&a1)),
        ),
        (
            format!("{n}.hada_w1_b"),
            f64_tensor(vec![r, 32 * 9], &spread(&b1, &c)),
        ),
        (
            format!("{n}.hada_w2_a"),
            f64_tensor(vec![32, r], &transpose(&a2)),
        ),
        (
            format!("{n}.hada_w2_b"),
            f64_tensor(vec![r, 32 * 9], &spread(&b2, &d)),
        ),
        (format!("{n}.alpha"), alpha),
    ]);
    let (_, got) = merge_one(&dir, &tucker, conv, 1.0);
    let (_, want) = merge_one(&dir, &flat, conv, 1.0);
    assert_close(&got, &want, "LoHa cores");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dora_magnitudes_renormalise_rows_or_columns() {
    let dir = tmp("lora-dora");
    let mut rng = Rng::new(13);
    let module = "down_blocks.1.attentions.0.proj_in"; // (48, 48)
    let n = format!("lora_unet_{}", module.replace('.', "_"));
    let (down, td) = randn(&mut rng, &[2, 48]);
    let (up, tu) = randn(&mut rng, &[48, 2]);
    let plain = TensorMap::from([
        (format!("{n}.lora_down.weight"), td.clone()),
        (format!("{n}.lora_up.weight"), tu.clone()),
    ]);
    let (base, _) = merge_one(&dir, &plain, module, 1.0);
    // W + ΔW (scale 1: no alpha), and its row and column norms.
    let wc: Vec<f64> = (0..48 * 48)
        .map(|i| {
            base[i]
                + (0..2)
                    .map(|k| up[(i / 48) * 2 + k] * down[k * 48 + i % 48])
                    .sum::<f64>()
        })
        .collect();
    let row_norm: Vec<f64> = (0..48)
        .map(|o| {
            wc[o * 48..(o + 1) * 48]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    let col_norm: Vec<f64> = (0..48)
        .map(|i| (0..48).map(|o| wc[o * 48 + i].powi(2)).sum::<f64>().sqrt())
        .collect();

    // PEFT: magnitude = 2 · row norms doubles W + ΔW.
    let twice: Vec<f64> = row_norm.iter().map(|x| 2.0 * x).collect();
    let peft = TensorMap::from([
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight".to_string(),
            td.clone(),
        ),
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight".to_string(),
            tu.clone(),
        ),
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector".to_string(),
            f64_tensor(vec![48], &twice),
        ),
    ]);
    let (_, got) = merge_one(&dir, &peft, module, 1.0);
    let want: Vec<f64> = wc.iter().map(|x| 2.0 * x).collect();
    assert_close(&got, &want, "PEFT DoRA");

    // kohya / LyCORIS dora_scale per input column, = the column norms: W + ΔW itself; at
    // strength 0.5 the merge interpolates halfway from W.
    let mut dora = plain.clone();
    dora.insert(
        format!("{n}.dora_scale"),
        f64_tensor(vec![1, 48], &col_norm),
    );
    let (_, got) = merge_one(&dir, &dora, module, 1.0);
    assert_close(&got, &wc, "dora_scale columns");
    let (_, got) = merge_one(&dir, &dora, module, 0.5);
    let half: Vec<f64> = base
        .iter()
        .zip(&wc)
        .map(|(w, c)| w + 0.5 * (c - w))
        .collect();
    assert_close(&got, &half, "dora_scale at 0.5");
    // ... and per output row when stored (out, 1).
    let mut rows = plain;
    let halved: Vec<f64> = row_norm.iter().map(|x| 0.5 * x).collect();
    rows.insert(format!("{n}.dora_scale"), f64_tensor(vec![48, 1], &halved));
    let (_, got) = merge_one(&dir, &rows, module, 1.0);
    let want: Vec<f64> = wc.iter().map(|x| 0.5 * x).collect();
    assert_close(&got, &want, "dora_scale rows");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn full_differences_patch_weight_and_bias() {
    let dir = tmp("lora-diff");
    let mut rng = Rng::new(14);
    let module = "down_blocks.1.attentions.0.proj_in"; // Linear with a bias
    let n = format!("lora_unet_{}", module.replace('.', "_"));
    let (d, td) = randn(&mut rng, &[48, 48]);
    let (db, tdb) = randn(&mut rng, &[48]);
    let map = TensorMap::from([(format!("{n}.diff"), td), (format!("{n}.diff_b"), tdb)]);
    let path = save(&dir, "diff.safetensors", &map, None);
    let base = component("unet");
    let mut w = base.clone();
    merge_kohya(
        &mut w,
        &config().layout(),
        &KohyaLoraFile::new(&path, -0.25),
    )
    .unwrap();
    for (key, delta) in [("weight", &d), ("bias", &db)] {
        let key = format!("{module}.{key}");
        let b = base[&key].to_vec_f64().unwrap();
        let want: Vec<f64> = b.iter().zip(delta).map(|(x, y)| x - 0.25 * y).collect();
        assert_close(&w[&key].to_vec_f64().unwrap(), &want, &key);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn malformed_lycoris_files_fail_naming_module_or_key() {
    let dir = tmp("lora-bad");
    let n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"; // (48, 48)
    let t = |shape: &[usize]| f64_tensor(shape.to_vec(), &vec![0.5; shape.iter().product()]);
    let cases: Vec<(&str, TensorMap<'static>, &str)> = vec![
        (
            "LoHa without its second factor's b",
            TensorMap::from([
                (format!("{n}.hada_w1_a"), t(&[48, 2])),
                (format!("{n}.hada_w1_b"), t(&[2, 48])),
                (format!("{n}.hada_w2_a"), t(&[48, 2])),
            ]),
            "HadaW2b",
        ),
        (
            "a 0-d LoHa factor",
            TensorMap::from([
                (format!("{n}.hada_w1_a"), t(&[48, 2])),
                (format!("{n}.hada_w1_b"), t(&[])),
                (format!("{n}.hada_w2_a"), t(&[48, 2])),
                (format!("{n}.hada_w2_b"), t(&[2, 48])),
            ]),
            "hada_w1_b",
        ),
        (
            "a LoKr w1 that divides nothing",
            TensorMap::from([
                (format!("{n}.lokr_w1"), t(&[5, 7])),
                (format!("{n}.lokr_w2"), t(&[2, 2])),
            ]),
            "lokr_w1",
        ),
        (
            "a dora_scale of the wrong shape",
            TensorMap::from([
                (format!("{n}.lora_down.weight"), t(&[2, 48])),
                (format!("{n}.lora_up.weight"), t(&[48, 2])),
                (format!("{n}.dora_scale"), t(&[2, 48])),
            ]),
            "dora_scale",
        ),
        (
            "a bias difference for a module without a bias",
            TensorMap::from([
                (format!("{n}.diff"), t(&[48, 48])),
                (format!("{n}.diff_b"), t(&[48])),
            ]),
            "attn1.to_q.bias",
        ),
        (
            "a norm-layer difference (not read here)",
            TensorMap::from([("lora_unet_out_0.w_norm".to_string(), t(&[32]))]),
            "lora_unet_out_0.w_norm",
        ),
        (
            "two spellings of one module",
            TensorMap::from([
                (format!("{n}.lora_down.weight"), t(&[2, 48])),
                (format!("{n}.lora_up.weight"), t(&[48, 2])),
                (
                    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
                        .to_string(),
                    t(&[2, 48]),
                ),
                (
                    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
                        .to_string(),
                    t(&[48, 2]),
                ),
            ]),
            "already targets",
        ),
    ];
    for (what, map, needle) in cases {
        let path = save(&dir, "bad.safetensors", &map, None);
        let mut w = component("unet");
        let err = merge_kohya(&mut w, &config().layout(), &KohyaLoraFile::new(&path, 1.0))
            .expect_err(what)
            .to_string();
        assert!(
            err.contains(needle) && err.contains("bad.safetensors"),
            "{what}: {err}"
        );
    }
    // Broken metadata is an error too, not a silent scale of 1.
    let map = TensorMap::from([
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_A.weight".to_string(),
            t(&[2, 48]),
        ),
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight".to_string(),
            t(&[48, 2]),
        ),
    ]);
    let path = save(
        &dir,
        "bad.safetensors",
        &map,
        Some(("lora_adapter_metadata", "{r: 4".into())),
    );
    let mut w = component("unet");
    let err = merge_kohya(&mut w, &config().layout(), &KohyaLoraFile::new(&path, 1.0)).unwrap_err();
    assert!(err.to_string().contains("lora_adapter_metadata"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Whatever a file holds under the recognised suffixes, parsing and merging return a result and
/// never panic: random roles, ranks and shapes (0-d, empty, mismatched) against a linear and a
/// conv target.
#[test]
fn random_factor_shapes_never_panic() {
    let base = component("unet");
    let model = KohyaModel::new(vec![unet_index(&base)]);
    let mut rng = Rng::new(21);
    let suffixes = [
        ".lora_down.weight",
        ".lora_up.weight",
        ".lora_mid.weight",
        ".alpha",
        ".dora_scale",
        ".lora_magnitude_vector",
        ".hada_w1_a",
        ".hada_w1_b",
        ".hada_w2_a",
        ".hada_w2_b",
        ".hada_t1",
        ".hada_t2",
        ".lokr_w1",
        ".lokr_w1_a",
        ".lokr_w1_b",
        ".lokr_w2",
        ".lokr_w2_a",
        ".lokr_w2_b",
        ".lokr_t2",
        ".diff",
        ".diff_b",
    ];
    // (module, weight dims) of a Linear with a bias and a 3x3 conv.
    let targets = [
        ("down_blocks.1.attentions.0.proj_in", vec![48usize, 48]),
        ("down_blocks.0.resnets.0.conv1", vec![32, 32, 3, 3]),
    ];
    let mut pick = |n: usize| (rng.uniform() * n as f64) as usize % n.max(1);
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..2000 {
        let (module, dims) = &targets[pick(2)];
        let n = format!("lora_unet_{}", module.replace('.', "_"));
        let (out, cin) = (dims[0], dims[1]);
        let k: Vec<usize> = dims[2..].to_vec(); // [] or [3, 3]
        let sp: usize = k.iter().product();
        let with = |head: &[usize], tail: &[usize]| [head, tail].concat();
        let ones: Vec<usize> = k.iter().map(|_| 1).collect();
        // Valid files of each storage, rank 2, then perturbed below.
        let templates: Vec<Vec<(&str, Vec<usize>)>> = vec![
            vec![
                (".lora_down.weight", with(&[2, cin], &k)),
                (".lora_up.weight", with(&[out, 2], &ones)),
                (".alpha", vec![]),
                (".dora_scale", with(&[1, cin], &ones)),
            ],
            vec![
                (".lora_down.weight", with(&[2, cin], &ones)),
                (".lora_mid.weight", with(&[2, 2], &k)),
                (".lora_up.weight", with(&[out, 2], &ones)),
                (".lora_magnitude_vector", vec![out]),
            ],
            vec![
                (".hada_w1_a", vec![out, 2]),
                (".hada_w1_b", vec![2, cin * sp]),
                (".hada_w2_a", vec![out, 2]),
                (".hada_w2_b", vec![2, cin * sp]),
                (".alpha", vec![]),
            ],
            vec![
                (".hada_w1_a", vec![2, out]),
                (".hada_w1_b", vec![2, cin]),
                (".hada_w2_a", vec![2, out]),
                (".hada_w2_b", vec![2, cin]),
                (".hada_t1", with(&[2, 2], &k)),
                (".hada_t2", with(&[2, 2], &k)),
            ],
            vec![
                (".lokr_w1", vec![2, 2]),
                (".lokr_w2_a", vec![out / 2, 2]),
                (".lokr_w2_b", vec![2, cin / 2 * sp]),
                (".alpha", vec![]),
            ],
            vec![
                (".lokr_w1_a", vec![2, 1]),
                (".lokr_w1_b", vec![1, 2]),
                (".lokr_w2", with(&[out / 2, cin / 2], &k)),
                (".lokr_t2", with(&[2, 2], &k)),
            ],
            vec![(".diff", dims.clone()), (".diff_b", vec![out])],
        ];
        let mut map = TensorMap::new();
        let mut entries: Vec<(String, Vec<usize>)> = if pick(4) == 0 {
            Vec::new()
        } else {
            templates[pick(templates.len())]
                .iter()
                .filter(|_| pick(6) != 0)
                .map(|(s, sh)| (s.to_string(), sh.clone()))
                .collect()
        };
        for _ in 0..pick(3) {
            // A stray tensor of any role with sizes drawn from the target's own dimensions.
            let sizes = [0, 1, 2, 3, 4, 9, out, cin, out / 2, cin * 9];
            let mut shape: Vec<usize> = (0..pick(5)).map(|_| sizes[pick(sizes.len())]).collect();
            while shape.iter().product::<usize>() > 1 << 18 {
                shape.pop();
            }
            entries.push((suffixes[pick(suffixes.len())].to_string(), shape));
        }
        for (suffix, shape) in entries {
            let v: Vec<f64> = (0..shape.iter().product())
                .map(|i| (i % 7) as f64 * 0.1)
                .collect();
            map.insert(format!("{n}{suffix}"), f64_tensor(shape, &v));
        }
        let Ok(parsed) = model.parse_patches(map, "fuzz", None) else {
            refused += 1;
            continue;
        };
        for p in &parsed.patches {
            let mut w = base[&format!("{}.weight", p.module)].to_vec_f64().unwrap();
            let mut b = base[&format!("{}.bias", p.module)].to_vec_f64().unwrap();
            match p.apply_f64(&mut w, Some(&mut b), 0.5, "fuzz") {
                Ok(()) => ok += 1,
                Err(_) => refused += 1,
            }
        }
    }
    eprintln!("ok {ok}, refused {refused}");
    // Both outcomes occur: the draw reaches valid files and broken ones.
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
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
