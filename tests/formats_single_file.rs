//! Acceptance: the tiny sgm single file converts to exactly the tensors of the tiny diffusers
//! folder (names, dtype, shape and bytes); so does the tiny refiner's.

mod common;

use kstyle::formats::diffusers::DiffusersFolder;
use kstyle::formats::single_file::{
    convert, convert_file, is_refiner, vae_file_tensors, VaeLayout,
};
use kstyle::formats::unet_layout::UnetLayout;
use kstyle::formats::{Error, MappedFile, RawTensor, TensorMap};
use std::borrow::Cow;
use std::path::PathBuf;

fn tiny(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(p)
}

fn assert_same_tensors(component: &str, got: &TensorMap<'_>, want: &TensorMap<'_>) {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{component}: missing {missing:?}, extra {extra:?}"
    );
    for (k, w) in want {
        let g = &got[k];
        assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape), "{component}: {k}");
        assert!(g.data == w.data, "{component}: {k}: bytes differ");
    }
}

#[test]
fn tiny_single_file_matches_the_diffusers_folder_bit_for_bit() {
    let folder = DiffusersFolder::open(tiny("sdxl")).unwrap();
    let file = MappedFile::open(tiny("sdxl_single_file.safetensors")).unwrap();
    let split = convert_file(
        &file,
        &folder.unet_layout().unwrap(),
        folder.vae_layout().unwrap(),
    )
    .unwrap();
    let parts = [
        ("unet", &split.unet),
        ("vae", &split.vae),
        ("text_encoder", &split.text_encoder),
        ("text_encoder_2", &split.text_encoder_2),
    ];
    for (name, got) in parts {
        let comp = folder.component(name, None).unwrap();
        let file_keys = comp.weights.tensors().unwrap();
        let canonical = comp.tensors().unwrap();
        assert_same_tensors(name, got, &canonical);
        if name == "text_encoder" {
            // transformers 5 writes CLIPTextModel without `text_model.`; the canonical map
            // differs from the file only by that prefix.
            let stripped: Vec<String> = got
                .keys()
                .map(|k| k.strip_prefix("text_model.").unwrap_or(k).to_string())
                .collect();
            assert_eq!(stripped, file_keys.keys().cloned().collect::<Vec<_>>());
        } else {
            assert_same_tensors(&format!("{name} (file as stored)"), got, &file_keys);
        }
    }
    // Only the OpenCLIP projection needed a copy; everything else still points into the map.
    let owned: Vec<&String> = [
        &split.unet,
        &split.vae,
        &split.text_encoder,
        &split.text_encoder_2,
    ]
    .iter()
    .flat_map(|m| {
        m.iter()
            .filter(|(_, t)| matches!(t.data, Cow::Owned(_)))
            .map(|(k, _)| k)
    })
    .collect();
    assert_eq!(owned, vec!["text_projection.weight"]);
}

#[test]
fn sdxl_base_preset_reads_the_sdxl_shaped_tiny_file() {
    let file = MappedFile::open(tiny("sdxl_single_file.safetensors")).unwrap();
    let split = convert_file(&file, &UnetLayout::sdxl_base(), VaeLayout::sdxl()).unwrap();
    assert_eq!(
        split.unet.len(),
        DiffusersFolder::open(tiny("sdxl"))
            .unwrap()
            .component("unet", None)
            .unwrap()
            .tensors()
            .unwrap()
            .len()
    );
}

fn scalar() -> RawTensor<'static> {
    RawTensor::from_f64(safetensors::Dtype::F32, vec![], &[1.0]).unwrap()
}

#[test]
fn keys_that_map_nowhere_are_listed_and_known_buffers_ignored() {
    let file = MappedFile::open(tiny("sdxl_single_file.safetensors")).unwrap();
    let mut ckpt = file.tensors().unwrap();
    ckpt.insert("denoiser.sigmas".into(), scalar());
    ckpt.insert(
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids".into(),
        scalar(),
    );
    let ok = convert(
        ckpt.clone(),
        &UnetLayout::sdxl_base(),
        VaeLayout::sdxl(),
        "ckpt",
    )
    .unwrap();
    assert!(!ok.text_encoder.keys().any(|k| k.contains("position_ids")));

    let strays = [
        "model.diffusion_model.input_blocks.9.0.op.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.1.weight",
        "first_stage_model.decoder.up.4.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.qkv.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_scale",
        "cond_stage_model.foo",
    ];
    for s in strays {
        ckpt.insert(s.into(), scalar());
    }
    match convert(ckpt, &UnetLayout::sdxl_base(), VaeLayout::sdxl(), "ckpt") {
        Err(Error::UnexpectedKeys { context, mut keys }) => {
            assert_eq!(context, "ckpt");
            keys.sort();
            let mut want: Vec<String> = strays.iter().map(|s| s.to_string()).collect();
            want.sort();
            assert_eq!(keys, want);
        }
        other => panic!("expected UnexpectedKeys, got {other:?}"),
    }
}

#[test]
fn te1_without_text_model_prefix_is_accepted() {
    let file = MappedFile::open(tiny("sdxl_single_file.safetensors")).unwrap();
    let ckpt: TensorMap = file
        .tensors()
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            (
                k.replace(
                    "conditioner.embedders.0.transformer.text_model.",
                    "conditioner.embedders.0.transformer.",
                ),
                t,
            )
        })
        .collect();
    let a = convert(ckpt, &UnetLayout::sdxl_base(), VaeLayout::sdxl(), "ckpt").unwrap();
    let b = convert_file(&file, &UnetLayout::sdxl_base(), VaeLayout::sdxl()).unwrap();
    assert_eq!(a.text_encoder, b.text_encoder);
}

#[test]
fn bad_in_proj_shape_is_an_error_naming_the_key() {
    let file = MappedFile::open(tiny("sdxl_single_file.safetensors")).unwrap();
    let mut ckpt = file.tensors().unwrap();
    let key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias";
    ckpt.insert(
        key.into(),
        RawTensor::from_f64(safetensors::Dtype::F16, vec![95], &[0.0; 95]).unwrap(),
    );
    let err = convert(ckpt, &UnetLayout::sdxl_base(), VaeLayout::sdxl(), "ckpt").unwrap_err();
    assert!(
        matches!(&err, Error::WrongShape { key: k, .. } if k == key),
        "{err}"
    );
}

#[test]
fn unet_key_map_round_trips_every_tiny_key() {
    let folder = DiffusersFolder::open(tiny("sdxl")).unwrap();
    let unet = folder.component("unet", None).unwrap();
    let map = folder.unet_layout().unwrap().key_map();
    let mut sgm_names = std::collections::BTreeSet::new();
    for k in unet.tensors().unwrap().keys() {
        let s = map
            .to_sgm(k)
            .unwrap_or_else(|| panic!("{k} has no sgm name"));
        assert_eq!(map.to_diffusers(&s).as_deref(), Some(k.as_str()));
        assert!(sgm_names.insert(s), "two diffusers keys share an sgm name");
    }
}

/// The tiny refiner in sgm layout (its OpenCLIP tower as embedder 0), checked with diffusers'
/// `from_single_file` by `gen_refiner_single_file.py`, converts to exactly the tensors of the
/// tiny refiner folder, and is recognised as a refiner; the base file is not.
#[test]
fn tiny_refiner_single_file_matches_its_folder_bit_for_bit() {
    let dir = common::tmp("refiner-single");
    let path = common::tiny_refiner_single_file(&dir);
    let folder = DiffusersFolder::open(common::tiny_refiner_folder(&dir)).unwrap();
    let file = MappedFile::open(&path).unwrap();
    assert!(is_refiner(&file.tensors().unwrap()));
    let base = MappedFile::open(tiny("sdxl_single_file.safetensors")).unwrap();
    assert!(!is_refiner(&base.tensors().unwrap()));
    let split = convert_file(
        &file,
        &folder.unet_layout().unwrap(),
        folder.vae_layout().unwrap(),
    )
    .unwrap();
    assert!(split.text_encoder.is_empty());
    for (name, got) in [
        ("unet", &split.unet),
        ("vae", &split.vae),
        ("text_encoder_2", &split.text_encoder_2),
    ] {
        let comp = folder.component(name, None).unwrap();
        assert_same_tensors(name, got, &comp.tensors().unwrap());
    }
    // Both OpenCLIP towers at once would put two tensors on each name.
    let mut both = file.tensors().unwrap();
    for (k, t) in base.tensors().unwrap() {
        if k.starts_with("conditioner.embedders.1.") {
            both.insert(k, t);
        }
    }
    let err = convert(
        both,
        &folder.unet_layout().unwrap(),
        folder.vae_layout().unwrap(),
        "both.safetensors",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("both.safetensors") && err.contains("text_model."),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `generate --vae FILE` reads three spellings of one VAE to the same tensors: the original names
/// alone (`sdxl_vae.safetensors`), a whole checkpoint's `first_stage_model.` part, and the diffusers
/// folder's file on its own; and it says what is wrong with a file that is no VAE.
#[test]
fn vae_files_in_every_spelling_read_to_the_folder_tensors() {
    let folder = DiffusersFolder::open(tiny("sdxl")).unwrap();
    let want_comp = folder.component("vae", None).unwrap();
    let want = want_comp.tensors().unwrap();
    let layout = folder.vae_layout().unwrap();

    // The whole tiny checkpoint: its VAE part, the rest skipped.
    let file = MappedFile::open(tiny("sdxl_single_file.safetensors")).unwrap();
    let whole = vae_file_tensors(file.tensors().unwrap(), layout, "ckpt").unwrap();
    assert_same_tensors("first_stage_model.", &whole, &want);

    // The same tensors with the prefix stripped (A1111's and ComfyUI's VAE files), plus what a
    // trained LDM autoencoder also carries.
    let mut ldm: TensorMap<'_> = file
        .tensors()
        .unwrap()
        .into_iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("first_stage_model.")?.to_string(), t)))
        .collect();
    ldm.insert("loss.logvar".into(), scalar());
    ldm.insert("model_ema.num_updates".into(), scalar());
    let bare = vae_file_tensors(ldm.clone(), layout, "vae").unwrap();
    assert_same_tensors("bare", &bare, &want);

    // The diffusers file read on its own.
    let diffusers = MappedFile::open(tiny("sdxl/vae/diffusion_pytorch_model.safetensors")).unwrap();
    let named = vae_file_tensors(diffusers.tensors().unwrap(), layout, "d").unwrap();
    assert_same_tensors("diffusers", &named, &want);

    // Strays are listed: an SD3-style key, a UNet key.
    let strays = [
        "decoder.up.9.block.0.conv1.weight",
        "input_blocks.0.0.weight",
    ];
    for s in strays {
        ldm.insert(s.into(), scalar());
    }
    match vae_file_tensors(ldm, layout, "vae.safetensors") {
        Err(Error::UnexpectedKeys { context, mut keys }) => {
            assert!(context.starts_with("vae.safetensors"), "{context}");
            keys.sort();
            assert_eq!(
                keys,
                strays.iter().map(|s| s.to_string()).collect::<Vec<_>>()
            );
        }
        other => panic!("expected UnexpectedKeys, got {other:?}"),
    }
    // A file with only skipped tensors holds no VAE.
    let mut empty = TensorMap::new();
    empty.insert("loss.logvar".into(), scalar());
    let e = vae_file_tensors(empty, layout, "loss.safetensors").unwrap_err();
    assert!(e.to_string().contains("holds no VAE tensor"), "{e}");
}
