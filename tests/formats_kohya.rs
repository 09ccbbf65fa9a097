//! kohya LoRA names against the tiny SDXL UNet: parsing the community-style fixture file,
//! both underscore spellings, export round trips and the merge shapes.

use kstyle::formats::diffusers::DiffusersFolder;
use kstyle::formats::kohya::{Component, KohyaModel, ModuleIndex};
use kstyle::formats::unet_layout::UnetLayout;
use kstyle::formats::{Error, MappedFile, RawTensor, TensorMap};
use safetensors::Dtype;
use std::path::PathBuf;

fn tiny(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(p)
}

/// The tiny UNet and text encoders, owned so that the maps outlive the folder handles.
fn tiny_model() -> (KohyaModel, TensorMap<'static>) {
    let folder = DiffusersFolder::open(tiny("sdxl")).unwrap();
    let layout = folder.unet_layout().unwrap();
    let mut indexes = Vec::new();
    let mut unet = TensorMap::new();
    for (name, c) in [
        ("unet", Component::Unet),
        ("text_encoder", Component::TextEncoder),
        ("text_encoder_2", Component::TextEncoder2),
    ] {
        let comp = folder.component(name, None).unwrap();
        let map = comp.tensors().unwrap();
        indexes.push(ModuleIndex::from_map(c, &map, &layout));
        if c == Component::Unet {
            unet = map.into_iter().map(|(k, t)| (k, t.into_owned())).collect();
        }
    }
    (KohyaModel::new(indexes), unet)
}

const TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

fn adaptable_linears(unet: &TensorMap<'_>) -> Vec<String> {
    unet.keys()
        .filter_map(|k| k.strip_suffix(".weight"))
        .filter(|m| {
            TARGETS
                .iter()
                .any(|t| m.ends_with(&format!(".attn1.{t}")) || m.ends_with(&format!(".attn2.{t}")))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn fixture_lora_resolves_to_every_attention_projection_of_the_unet() {
    let (model, unet) = tiny_model();
    let file = MappedFile::open(tiny("kohya_lora.safetensors")).unwrap();
    let lora = model
        .parse(file.tensors().unwrap(), "kohya_lora.safetensors")
        .unwrap()
        .deny_unknown("kohya_lora")
        .unwrap();
    let projections = adaptable_linears(&unet);
    assert_eq!(projections.len(), 44 * 4, "tiny UNet: 44 attention modules");
    assert_eq!(lora.entries.len(), projections.len());
    let mut modules: Vec<String> = lora.entries.iter().map(|e| e.module.clone()).collect();
    modules.sort();
    assert_eq!(modules, projections);
    for e in &lora.entries {
        assert_eq!(e.component, Component::Unet);
        let w = &unet[&format!("{}.weight", e.module)];
        assert_eq!(w.shape.len(), 2, "{} is a Linear", e.module);
        assert_eq!(e.target_shape(), w.shape, "{}", e.module);
        assert_eq!(
            (e.rank(), e.alpha),
            (4, 2.0),
            "file metadata: ss_network_dim 4, ss_network_alpha 2.0"
        );
    }
    let spot = lora
        .entries
        .iter()
        .find(|e| e.module == "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k")
        .unwrap();
    assert_eq!(
        spot.down.shape,
        vec![4, 64],
        "attn2.to_k reads the 64-wide context"
    );
    assert_eq!(spot.up.shape, vec![48, 4]);
}

#[test]
fn export_writes_the_names_kohya_wrote() {
    let (model, _) = tiny_model();
    let file = MappedFile::open(tiny("kohya_lora.safetensors")).unwrap();
    let original = file.tensors().unwrap();
    let lora = model.parse(original.clone(), "kohya_lora").unwrap();
    let exported = model.export(&lora.entries).unwrap();
    assert_eq!(
        exported, original,
        "names, dtypes, shapes and bytes (alpha 2.0 is exact in fp16)"
    );
}

#[test]
fn diffusers_kohya_diffusers_round_trip_is_identity_for_every_attention_projection() {
    let (model, unet) = tiny_model();
    let index = model.index(Component::Unet).unwrap();
    for m in adaptable_linears(&unet) {
        let name = index.kohya_name(&m).unwrap();
        assert!(
            name.starts_with("lora_unet_input_blocks_")
                || name.starts_with("lora_unet_middle_block_1_")
                || name.starts_with("lora_unet_output_blocks_"),
            "{name}"
        );
        assert_eq!(model.resolve(&name), Some((Component::Unet, m.as_str())));
        // The diffusers-style spelling some converters write resolves to the same module.
        let diffusers_style = format!("lora_unet_{}", m.replace('.', "_"));
        assert_eq!(
            model.resolve(&diffusers_style),
            Some((Component::Unet, m.as_str()))
        );
    }
    let te = model.index(Component::TextEncoder2).unwrap();
    let name = te
        .kohya_name("text_model.encoder.layers.2.mlp.fc2")
        .unwrap();
    assert_eq!(name, "lora_te2_text_model_encoder_layers_2_mlp_fc2");
    assert_eq!(
        model.resolve(&name),
        Some((
            Component::TextEncoder2,
            "text_model.encoder.layers.2.mlp.fc2"
        ))
    );
    // TE1's file has no `text_model.` prefix; names still use the HF path kohya writes.
    assert_eq!(
        model.resolve("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
        Some((
            Component::TextEncoder,
            "text_model.encoder.layers.0.self_attn.q_proj"
        ))
    );
}

#[test]
fn diffusers_style_file_parses_like_the_sgm_one() {
    let (model, _) = tiny_model();
    let file = MappedFile::open(tiny("kohya_lora.safetensors")).unwrap();
    let sgm = model.parse(file.tensors().unwrap(), "sgm").unwrap();
    let renamed: TensorMap = sgm
        .entries
        .iter()
        .flat_map(|e| {
            let n = format!("lora_unet_{}", e.module.replace('.', "_"));
            [
                (format!("{n}.lora_down.weight"), e.down.clone()),
                (format!("{n}.lora_up.weight"), e.up.clone()),
            ]
        })
        .collect();
    let diff = model
        .parse(renamed, "diffusers-style")
        .unwrap()
        .deny_unknown("diffusers-style")
        .unwrap();
    assert_eq!(diff.entries.len(), sgm.entries.len());
    for (a, b) in diff.entries.iter().zip(&sgm.entries) {
        assert_eq!((&a.module, &a.down, &a.up), (&b.module, &b.down, &b.up));
        assert_eq!(a.alpha, 4.0, "no alpha tensor: alpha defaults to the rank");
    }
}

fn f32_tensor(shape: Vec<usize>, seed: u64) -> RawTensor<'static> {
    let n: usize = shape.iter().product();
    // Small deterministic values; exact in f32 so the f64 reference below sees the same numbers.
    let v: Vec<f64> = (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f64 - 500.0) / 1024.0)
        .collect();
    RawTensor::from_f64(Dtype::F32, shape, &v).unwrap()
}

#[test]
fn merge_linear_matches_a_plain_matmul_in_f64() {
    let (model, unet) = tiny_model();
    let file = MappedFile::open(tiny("kohya_lora.safetensors")).unwrap();
    let lora = model.parse(file.tensors().unwrap(), "kohya_lora").unwrap();
    let e = lora
        .entries
        .iter()
        .find(|e| e.module == "mid_block.attentions.0.transformer_blocks.1.attn2.to_v")
        .unwrap();
    let w = &unet[&format!("{}.weight", e.module)];
    assert_eq!(
        w.shape,
        vec![64, 64],
        "attn2.to_v reads the 64-wide context"
    );
    let base = w.to_f64_vec("test", &e.module).unwrap();
    let delta = e.delta_f64(0.75).unwrap();
    assert_eq!(delta.len(), base.len());
    let merged: Vec<f64> = base.iter().zip(&delta).map(|(a, b)| a + b).collect();
    let up = e.up.to_f64_vec("t", "up").unwrap();
    let down = e.down.to_f64_vec("t", "down").unwrap();
    let (out, din, r) = (64, 64, e.rank());
    for (o, i) in [(0, 0), (5, 17), (63, 63), (31, 2)] {
        let want = base[o * din + i]
            + 0.75
                * (2.0 / 4.0)
                * (0..r)
                    .map(|k| up[o * r + k] * down[k * din + i])
                    .sum::<f64>();
        assert!(
            (merged[o * din + i] - want).abs() <= 1e-12 * want.abs().max(1.0),
            "({o}, {i})"
        );
    }
    assert_eq!(out * din, merged.len());
}

#[test]
fn conv_lora_shapes_and_merge() {
    let layout = UnetLayout::sdxl_base();
    let shapes: [(&str, &[usize]); 3] = [
        ("down_blocks.0.resnets.0.conv1.weight", &[32, 32, 3, 3]),
        ("down_blocks.0.resnets.0.norm1.weight", &[32]),
        ("down_blocks.1.attentions.0.proj_in.weight", &[48, 48]),
    ];
    let model = KohyaModel::new(vec![ModuleIndex::unet(shapes, &layout)]);
    let name = "lora_unet_input_blocks_1_0_in_layers_2";
    let (r, cin, cout) = (4, 32, 32);
    let mut t = TensorMap::new();
    t.insert(
        format!("{name}.lora_down.weight"),
        f32_tensor(vec![r, cin, 3, 3], 1),
    );
    t.insert(
        format!("{name}.lora_up.weight"),
        f32_tensor(vec![cout, r, 1, 1], 2),
    );
    t.insert(
        format!("{name}.alpha"),
        RawTensor::from_f64(Dtype::F16, vec![], &[8.0]).unwrap(),
    );
    // A 1x1-conv LoRA on a Linear target (SD1.x-trained proj_in) is reshaped onto the Linear.
    let lin = "lora_unet_input_blocks_4_1_proj_in";
    t.insert(
        format!("{lin}.lora_down.weight"),
        f32_tensor(vec![r, 48, 1, 1], 3),
    );
    t.insert(
        format!("{lin}.lora_up.weight"),
        f32_tensor(vec![48, r, 1, 1], 4),
    );
    let lora = model
        .parse(t, "conv")
        .unwrap()
        .deny_unknown("conv")
        .unwrap();
    let conv = lora
        .entries
        .iter()
        .find(|e| e.module == "down_blocks.0.resnets.0.conv1")
        .unwrap();
    assert_eq!(conv.target_shape(), vec![cout, cin, 3, 3]);
    assert_eq!(conv.scale(), 2.0);
    let delta = conv.delta_f64(1.0).unwrap();
    assert_eq!(delta.len(), cout * cin * 9);
    let up = conv.up.to_f64_vec("t", "up").unwrap();
    let down = conv.down.to_f64_vec("t", "down").unwrap();
    let (o, i, y, x) = (7, 30, 2, 1);
    let want: f64 = 2.0
        * (0..r)
            .map(|k| up[o * r + k] * down[((k * cin + i) * 3 + y) * 3 + x])
            .sum::<f64>();
    assert!((delta[((o * cin + i) * 3 + y) * 3 + x] - want).abs() < 1e-12);
    let proj = lora
        .entries
        .iter()
        .find(|e| e.module == "down_blocks.1.attentions.0.proj_in")
        .unwrap();
    assert_eq!(
        (proj.down.shape.clone(), proj.up.shape.clone()),
        (vec![r, 48], vec![48, r])
    );

    let mut bad = TensorMap::new();
    bad.insert(
        format!("{name}.lora_down.weight"),
        f32_tensor(vec![r, cin, 1, 1], 1),
    );
    bad.insert(
        format!("{name}.lora_up.weight"),
        f32_tensor(vec![cout, r, 1, 1], 2),
    );
    let err = model.parse(bad, "bad.safetensors").unwrap_err();
    assert!(
        matches!(&err, Error::WrongShape { key, .. } if key == &format!("{name}.lora_down.weight")),
        "{err}"
    );
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
}

#[test]
fn unknown_and_incomplete_modules() {
    let (model, _) = tiny_model();
    let mut t = TensorMap::new();
    let good = "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q";
    t.insert(
        format!("{good}.lora_down.weight"),
        f32_tensor(vec![2, 64], 1),
    );
    t.insert(format!("{good}.lora_up.weight"), f32_tensor(vec![64, 2], 2));
    // A transformer block only full-size SDXL has (depth 10), a LoCon mid tensor, a bare key.
    let stray = "lora_unet_input_blocks_7_1_transformer_blocks_5_attn1_to_q.lora_down.weight";
    t.insert(stray.into(), f32_tensor(vec![2, 64], 3));
    let mid = "lora_unet_middle_block_1_proj_in";
    t.insert(
        format!("{mid}.lora_down.weight"),
        f32_tensor(vec![2, 64], 4),
    );
    t.insert(format!("{mid}.lora_up.weight"), f32_tensor(vec![64, 2], 5));
    t.insert(format!("{mid}.lora_mid.weight"), f32_tensor(vec![2, 2], 6));
    t.insert("lora_unet_whatever".into(), f32_tensor(vec![1], 7));
    let lora = model.parse(t.clone(), "f").unwrap();
    assert_eq!(lora.entries.len(), 1);
    assert_eq!(
        lora.entries[0].module,
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    );
    assert_eq!(lora.unknown.len(), 5, "{:?}", lora.unknown);
    let err = lora.deny_unknown("f.safetensors").unwrap_err();
    assert!(err.to_string().contains(stray), "{err}");

    t.remove(&format!("{good}.lora_up.weight"));
    let err = model.parse(t, "f").unwrap_err();
    assert!(
        matches!(&err, Error::Lora { module, .. } if module == good),
        "{err}"
    );
}
