//! `kstyle train --targets`: adapters beyond the attention projections, on every linear of the
//! UNet's spatial transformers (kohya's LoRA target set). The arithmetic of a step on those
//! linears is checked against PyTorch by the `train_targets` verify case; here, through the
//! real binary on the tiny model: `all` trains every kind, in kohya's module names; the adapter
//! generates; K-StyleLoRA on the feed-forward resumes exactly; a target that names no linear is
//! refused.

mod common;
use common::train::{assert_resume_is_exact, dataset, refused, setting, train_ok};
use common::{generate_tiny, tmp};
use kstyle::tensor::SafeTensorsFile;

#[test]
fn every_transformer_linear_trains_and_generates() {
    let dir = tmp("targets");
    let data = dataset(&dir);
    let out = dir.join("all/a.safetensors");
    train_ok(
        &data,
        &out,
        "lora",
        &["--max-steps", "1", "--targets", "all"],
    );
    let f = SafeTensorsFile::open(&out).unwrap();
    let names: Vec<String> = f
        .names()
        .filter(|n| n.ends_with(".lora_down.weight"))
        .map(String::from)
        .collect();
    // kohya's names: lora_unet_<sgm path with _>.lora_down.weight; the tiny UNet has 11
    // transformers of 22 blocks.
    for (kind, want) in [
        ("_proj_in.", 11),
        ("_attn1_to_q.", 22),
        ("_attn2_to_out_0.", 22),
        ("_ff_net_0_proj.", 22),
        ("_ff_net_2.", 22),
        ("_proj_out.", 11),
    ] {
        let n = names.iter().filter(|n| n.contains(kind)).count();
        assert_eq!(n, want, "{kind}: {n} modules");
    }
    assert_eq!(names.len(), 11 * 2 + 22 * 10, "{names:?}");
    assert_eq!(
        setting(&out, "targets"),
        "proj_in,to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_out"
    );
    let img = dir.join("g.png");
    let g = generate_tiny(&[
        "--lora",
        out.to_str().unwrap(),
        "--out",
        img.to_str().unwrap(),
    ]);
    assert!(g.status.success(), "{}", common::stderr(&g));

    // K-StyleLoRA gates on the feed-forward's input and the transformer's output projection,
    // with the cultural loss: a resumed run is the straight run bit for bit.
    assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "kstyle",
        &["--targets", "ff.net.2,proj_out"],
        "kstyle on ff.net.2 and proj_out",
    );

    refused(&data, &dir, &["--targets", "to_q,to_qq"], "--targets to_qq");
    refused(&data, &dir, &["--targets", "conv1"], "--targets conv1");
}
