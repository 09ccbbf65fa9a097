//! Reader robustness (truncated and corrupted files are clean errors naming the file), shards
//! and fp16 variants in diffusers folders.

use kstyle::formats::diffusers::{find_weights, DiffusersFolder, ModelIndex};
use kstyle::formats::raw::write_safetensors;
use kstyle::formats::{Error, MappedFile, TensorMap, WeightFiles};
use std::path::{Path, PathBuf};

fn tiny(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(p)
}

/// A fresh directory per test under cargo's per-target scratch space.
fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn expect_safetensors_error(path: &Path, needle: &str) {
    match MappedFile::open(path) {
        Err(e @ Error::SafeTensors { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains(needle), "{msg}");
        }
        Err(e) => panic!("{}: wrong error kind: {e}", path.display()),
        Ok(_) => panic!("{}: opened a broken file", path.display()),
    }
}

#[test]
fn truncated_and_corrupted_files_are_clean_errors() {
    let dir = scratch("corrupt");
    let good = std::fs::read(tiny("kohya_lora.safetensors")).unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &good[..good.len() - 10]).unwrap();
    expect_safetensors_error(&truncated, "truncated");

    let header_cut = dir.join("header_cut.safetensors");
    std::fs::write(&header_cut, &good[..100]).unwrap();
    expect_safetensors_error(&header_cut, "header length");

    let mut garbage = good.clone();
    garbage[8..20].copy_from_slice(b"not json at ");
    let bad_header = dir.join("bad_header.safetensors");
    std::fs::write(&bad_header, &garbage).unwrap();
    expect_safetensors_error(&bad_header, "");

    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let huge_len = dir.join("huge_header_len.safetensors");
    std::fs::write(&huge_len, &huge).unwrap();
    expect_safetensors_error(&huge_len, "");

    let tiny_file = dir.join("three_bytes.safetensors");
    std::fs::write(&tiny_file, b"abc").unwrap();
    expect_safetensors_error(&tiny_file, "header");

    // A header whose offsets disagree with dtype x shape.
    let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 12]);
    let inconsistent = dir.join("inconsistent.safetensors");
    std::fs::write(&inconsistent, &bytes).unwrap();
    expect_safetensors_error(&inconsistent, "");

    match MappedFile::open(dir.join("absent.safetensors")) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("absent.safetensors"), "{e}"),
        other => panic!("expected Io error, got {:?}", other.err()),
    }
}

/// `torch.save` files (`gen_torch_save.py`: the zip archive and the bare protocol-2 pickle) are
/// named as PyTorch pickles; a safetensors file whose header length reads like a pickle's first
/// bytes (640 = 0x80 0x02) still opens.
#[test]
fn pytorch_pickles_are_named_and_lookalike_lengths_still_open() {
    let extra = tiny("../extra");
    for name in ["torch_save_zip.pt", "torch_save_legacy.pt"] {
        expect_safetensors_error(&extra.join(name), "PyTorch pickle");
    }
    let dir = scratch("pickle-lookalike");
    let json = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut header = json.to_vec();
    header.resize(640, b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    assert_eq!(&bytes[..2], &[0x80, 0x02]);
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&1.5f32.to_le_bytes());
    let path = dir.join("len640.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let f = MappedFile::open(&path).unwrap();
    assert_eq!(f.tensors().unwrap()["w"].shape, vec![1]);
}

#[test]
fn write_then_read_is_identical_and_keeps_metadata() {
    let dir = scratch("roundtrip");
    let src = MappedFile::open(tiny("kohya_lora.safetensors")).unwrap();
    let tensors = src.tensors().unwrap();
    let out = dir.join("copy.safetensors");
    write_safetensors(&out, &tensors, src.metadata().cloned()).unwrap();
    let back = MappedFile::open(&out).unwrap();
    assert_eq!(back.tensors().unwrap(), tensors);
    assert_eq!(back.metadata().unwrap()["ss_network_dim"], "4");
}

/// Copies the tiny pipeline's model_index and text_encoder_2 config, then stores its weights as
/// two fp16-variant shards (the diffusers `*.safetensors.index.fp16.json` naming).
fn sharded_folder(dir: &Path, full: &TensorMap<'_>) {
    std::fs::copy(tiny("sdxl/model_index.json"), dir.join("model_index.json")).unwrap();
    let te = dir.join("text_encoder_2");
    std::fs::create_dir_all(&te).unwrap();
    std::fs::copy(
        tiny("sdxl/text_encoder_2/config.json"),
        te.join("config.json"),
    )
    .unwrap();
    let (mut a, mut b) = (TensorMap::new(), TensorMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (k, t)) in full.iter().enumerate() {
        let shard = if i % 2 == 0 {
            "model-00001-of-00002.fp16.safetensors"
        } else {
            "model-00002-of-00002.fp16.safetensors"
        };
        (if i % 2 == 0 { &mut a } else { &mut b }).insert(k.clone(), t.clone());
        weight_map.insert(k.clone(), shard.into());
    }
    write_safetensors(te.join("model-00001-of-00002.fp16.safetensors"), &a, None).unwrap();
    write_safetensors(te.join("model-00002-of-00002.fp16.safetensors"), &b, None).unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        te.join("model.safetensors.index.fp16.json"),
        index.to_string(),
    )
    .unwrap();
}

#[test]
fn sharded_fp16_variant_reads_like_the_single_file() {
    let dir = scratch("sharded");
    let single = WeightFiles::open(tiny("sdxl/text_encoder_2/model.safetensors")).unwrap();
    let full = single.tensors().unwrap();
    sharded_folder(&dir, &full);

    let folder = DiffusersFolder::open(&dir).unwrap();
    let comp = folder.component("text_encoder_2", Some("fp16")).unwrap();
    assert_eq!(comp.weights.files().len(), 2);
    assert_eq!(comp.weights.tensors().unwrap(), full);
    // Without the variant there is nothing to load, and the error lists what was tried.
    let err = folder
        .component("text_encoder_2", None)
        .err()
        .expect("no non-variant weights");
    assert!(
        err.to_string().contains("model.safetensors.index.json"),
        "{err}"
    );
    // Components absent from model_index.json are named in the error.
    let err = folder
        .component("image_encoder", None)
        .err()
        .expect("null component");
    assert!(err.to_string().contains("image_encoder"), "{err}");

    // An index that places a tensor in the wrong shard is a broken download.
    let te = dir.join("text_encoder_2");
    let index_path = te.join("model.safetensors.index.fp16.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let first = full.keys().next().unwrap().clone();
    index["weight_map"][&first] = "model-00002-of-00002.fp16.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let files = WeightFiles::open(find_weights(&te, Some("fp16")).unwrap()).unwrap();
    let err = files.tensors().unwrap_err();
    assert!(
        err.to_string().contains(&first) && err.to_string().contains("index.fp16.json"),
        "{err}"
    );

    // An index naming a shard that is not there.
    index["weight_map"][&first] = "model-00003-of-00002.fp16.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = WeightFiles::open(&index_path).err().expect("missing shard");
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("model-00003-of-00002.fp16.safetensors")),
        "{err}"
    );
}

#[test]
fn model_index_lists_components_and_options() {
    let index = ModelIndex::from_file(tiny("sdxl/model_index.json")).unwrap();
    assert_eq!(index.class_name, "StableDiffusionXLPipeline");
    let names: Vec<&str> = index.components.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "scheduler",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
            "unet",
            "vae"
        ]
    );
    assert_eq!(
        index.components["text_encoder_2"].1,
        "CLIPTextModelWithProjection"
    );
    assert_eq!(
        index.options["force_zeros_for_empty_prompt"],
        serde_json::Value::Bool(true)
    );

    let folder = DiffusersFolder::open(tiny("sdxl")).unwrap();
    assert_eq!(
        folder.config("scheduler").unwrap()["timestep_spacing"],
        "leading"
    );
    assert_eq!(folder.config("unet").unwrap()["cross_attention_dim"], 64);
    assert_eq!(folder.vae_layout().unwrap().levels, 4);

    let dir = scratch("bad_index");
    std::fs::write(dir.join("model_index.json"), "{ nope").unwrap();
    let err = DiffusersFolder::open(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::Json { path, .. } if path.ends_with("model_index.json")),
        "{err}"
    );
}

#[test]
fn every_truncation_and_header_byte_flip_is_an_error_not_a_panic() {
    let dir = scratch("fuzz");
    // A small file (a few real tensors, mixed shapes); every 5th byte keeps this under a few
    // seconds on a slow disk while still hitting every JSON token kind.
    let src = MappedFile::open(tiny("sdxl/text_encoder/model.safetensors")).unwrap();
    let small: TensorMap = src
        .tensors()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("encoder.layers.0."))
        .collect();
    let path = dir.join("small.safetensors");
    write_safetensors(&path, &small, None).unwrap();
    let good = std::fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let path = dir.join("f.safetensors");
    // Cuts through the header and a spread of cuts through the data.
    let cuts = (0..header_end + 16)
        .step_by(5)
        .chain((header_end..good.len()).step_by(997));
    for cut in cuts {
        std::fs::write(&path, &good[..cut]).unwrap();
        assert!(MappedFile::open(&path).is_err(), "cut at {cut} accepted");
    }
    for pos in (0..header_end).step_by(5) {
        let mut bytes = good.clone();
        bytes[pos] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
        // Some flips leave a valid file (a changed key name); none may panic.
        if let Ok(f) = MappedFile::open(&path) {
            let _ = f.tensors();
        }
    }
}

/// Saving the same tensors and metadata twice gives the same bytes, whatever order the metadata
/// map iterates in (each `HashMap` has its own random order), and the file reads back intact.
#[test]
fn saved_files_are_byte_identical_across_runs() {
    use kstyle::tensor::{save_safetensors, SafeTensorsFile};
    use kstyle::{DType, Device, Tensor};
    use std::collections::HashMap;
    let dir = scratch("deterministic");
    let t = Tensor::from_vec((0..24).map(|v| v as f32).collect(), (2, 3, 4), Device::Cpu).unwrap();
    let tensors = vec![
        ("b.weight".to_string(), t.clone()),
        ("a.bias".to_string(), t.to_dtype(DType::BF16).unwrap()),
    ];
    let mut files = Vec::new();
    for run in 0..4 {
        let mut meta = HashMap::new();
        for k in 0..32 {
            let k = if run % 2 == 0 { k } else { 31 - k };
            meta.insert(format!("key.{k}"), format!("value {k}"));
        }
        let path = dir.join(format!("{run}.safetensors"));
        save_safetensors(&path, &tensors, Some(meta)).unwrap();
        files.push(std::fs::read(&path).unwrap());
    }
    assert!(
        files.iter().all(|f| *f == files[0]),
        "the same content gave different bytes"
    );
    let f = SafeTensorsFile::open(dir.join("0.safetensors")).unwrap();
    assert_eq!(f.metadata().len(), 32);
    assert_eq!(
        f.metadata().get("key.7").map(String::as_str),
        Some("value 7")
    );
    assert_eq!(
        f.tensor("b.weight").unwrap().to_vec_f64().unwrap(),
        t.to_vec_f64().unwrap()
    );
}
