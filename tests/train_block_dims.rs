//! `kstyle train --block-dims` and kin: kohya's ranks and alphas per UNet block. Through the
//! real binary on the tiny model (which has SDXL's 23 blocks in kohya's numbering): every module
//! gets its block's rank and alpha (3x3 convolutions the conv lists), a block at rank 0 holds no
//! module while every other holds exactly what a run without block ranks holds, the kohya export
//! runs merged as the adapter runs live, a run resumes bit for bit and refuses changed lists, and
//! impossible lists are refused.

mod common;
use common::train::{assert_resume_is_exact, dataset, refused, setting, train, train_ok};
use common::{assert_fails_naming, export_tiny, rel_l2, tiny_unet, tiny_unet_output, tmp};
use kstyle::formats::adapter::Adapter;
use kstyle::models::unet::KohyaLoraFile;
use kstyle::sample::pipeline::unet_module_index;
use kstyle::tensor::SafeTensorsFile;
use kstyle::Device;
use std::collections::BTreeSet;

/// kohya's SDXL block index of a module name (sd-scripts networks/lora.py, `get_block_index`):
/// `input_blocks_i` is 1 + i, `middle_block_i` 10 + i, `output_blocks_i` 13 + i.
fn kohya_block(name: &str) -> usize {
    let rest = name.strip_prefix("lora_unet_").unwrap();
    let (first, rest) = [
        ("input_blocks_", 1),
        ("middle_block_", 10),
        ("output_blocks_", 13),
    ]
    .into_iter()
    .find_map(|(p, first)| rest.strip_prefix(p).map(|r| (first, r)))
    .unwrap_or_else(|| panic!("{name}: in no block"));
    first + rest.split('_').next().unwrap().parse::<usize>().unwrap()
}

fn modules(path: &std::path::Path) -> BTreeSet<String> {
    let f = SafeTensorsFile::open(path).unwrap();
    f.names()
        .filter_map(|n| n.strip_suffix(".lora_down.weight"))
        .map(String::from)
        .collect()
}

fn list<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn each_block_trains_at_its_rank_and_alpha_and_exports_as_it_runs() {
    let dir = tmp("block-dims");
    let data = dataset(&dir);
    // Distinct ranks, alphas and conv ranks per block; 0 in input_blocks.2, middle_block.1 and
    // output_blocks.5 (the conv list 0 elsewhere: input_blocks.4's 3x3 convolutions only).
    let dims: Vec<usize> = (0..23)
        .map(|i| match i {
            3 | 11 | 18 => 0,
            i => 1 + i % 5,
        })
        .collect();
    let alphas: Vec<f64> = (0..23).map(|i| 0.5 + i as f64 / 4.0).collect();
    let conv_dims: Vec<usize> = (0..23)
        .map(|i| if i == 5 { 0 } else { 1 + i % 3 })
        .collect();
    let common = ["--max-steps", "2", "--lr", "1e-2", "--conv-dim", "2"];
    let (d, a, c) = (list(&dims), list(&alphas), list(&conv_dims));
    let adapter = dir.join("blocks/a.safetensors");
    let args = [
        "--block-dims",
        &d,
        "--block-alphas",
        &a,
        "--conv-block-dims",
        &c,
    ];
    train_ok(&data, &adapter, "lora", &[&common[..], &args].concat());
    let plain = train_ok(&data, &dir.join("plain/a.safetensors"), "lora", &common);
    assert_eq!(setting(&adapter, "block_dims"), d);
    assert_eq!(setting(&adapter, "conv_block_alphas"), "none");

    let f = SafeTensorsFile::open(&adapter).unwrap();
    let got = modules(&adapter);
    let mut conv_zeroed = 0;
    for m in &got {
        let block = kohya_block(m);
        let down = f.info(&format!("{m}.lora_down.weight")).unwrap().1.to_vec();
        let alpha = f
            .tensor(&format!("{m}.alpha"))
            .unwrap()
            .to_scalar()
            .unwrap();
        let conv3 = down.len() == 4 && down[2..] != [1, 1];
        let (rank, want_alpha) = match conv3 {
            true => (conv_dims[block], 1.0), // --conv-alpha's default
            false => (dims[block], alphas[block]),
        };
        assert_eq!(down[0], rank, "{m} (block {block})");
        assert_eq!(alpha, want_alpha, "{m} (block {block})");
    }
    // Exactly the plain run's modules, less those of the blocks at rank 0.
    let want: BTreeSet<String> = modules(&plain)
        .into_iter()
        .filter(|m| {
            let block = kohya_block(m);
            let conv3 = m.ends_with("_in_layers_2")
                || m.ends_with("_out_layers_3")
                || m.ends_with("_op")
                || m.ends_with("_conv");
            let zero = match conv3 {
                true => conv_dims[block] == 0,
                false => dims[block] == 0,
            };
            conv_zeroed += (zero && conv3) as usize;
            !zero
        })
        .collect();
    assert_eq!(got, want);
    assert!(
        conv_zeroed > 0 && got.len() > 100,
        "{conv_zeroed} {}",
        got.len()
    );

    // Live against the kohya export merged at load.
    let mut live = tiny_unet(&[]);
    let ad = Adapter::load(&adapter, &unet_module_index(&live), Device::Cpu).unwrap();
    let mut by_path: std::collections::HashMap<_, _> = ad.modules.into_iter().collect();
    live.attach_all(|p| Ok(by_path.remove(p))).unwrap();
    assert!(by_path.is_empty());
    let file = dir.join("kohya.safetensors");
    let o = export_tiny(&adapter, "kohya", &file);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let merged = tiny_unet(&[KohyaLoraFile::new(&file, 1.0)]);
    let r = rel_l2(&tiny_unet_output(&merged), &tiny_unet_output(&live));
    assert!(r < 1e-5, "kohya export merged differs from live: {r}");
}

#[test]
fn block_ranks_resume_exactly_and_refuse_what_does_not_fit() {
    let dir = tmp("block-dims-resume");
    let data = dataset(&dir);
    // K-StyleLoRA's gated linears at ranks per block, with a zero learning-rate block on top
    // (its adapters drawn, then dropped) and a block at rank 0.
    let dims = "0,2,3,0,2,3,4,2,3,4,2,3,4,2,3,4,2,3,4,2,3,4,0";
    let args = [
        "--block-dims",
        dims,
        "--down-lr-weight",
        "1,1,1,1,0",
        "--batch-size",
        "2",
    ];
    let ckpt = assert_resume_is_exact(&data, &dir.join("resume"), "kstyle", &args, "block dims");
    let ckpt = ckpt.to_str().unwrap();
    let out = dir.join("again/a.safetensors");
    let resume = |extra: &[&str]| {
        let base = ["--max-steps", "4", "--resume", ckpt, "--batch-size", "2"];
        train(&data, &out, "kstyle", &[&base[..], extra].concat())
    };
    let other = dims.replacen("0,2", "0,1", 1);
    assert_fails_naming(
        &resume(&["--block-dims", &other, "--down-lr-weight", "1,1,1,1,0"]),
        "--block-dims",
    );

    let ones = vec!["1"; 23].join(",");
    refused(
        &data,
        &dir,
        &["--block-dims", "4,4,4"],
        "--block-dims has 3 values",
    );
    refused(&data, &dir, &["--block-dims", "4,x"], "`x`");
    refused(
        &data,
        &dir,
        &["--block-alphas", &vec!["1"; 22].join(",")],
        "this UNet has 23 blocks",
    );
    refused(&data, &dir, &["--conv-block-dims", &ones], "--conv-dim");
    refused(
        &data,
        &dir,
        &["--conv-dim", "2", "--conv-block-alphas", &ones],
        "--conv-block-dims",
    );
    // Every block at rank 0: nothing left to train.
    refused(
        &data,
        &dir,
        &["--block-dims", &vec!["0"; 23].join(",")],
        "rank are above 0",
    );
}
