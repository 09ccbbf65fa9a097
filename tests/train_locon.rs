//! `kstyle train --conv-dim`: kohya's conv LoRA (LoCon) on the UNet's resnets and resamplers.
//! The arithmetic of a step is checked against PyTorch by the `train_locon` verify case; here,
//! through the real binary on the tiny model: the adapter holds every conv-group module in
//! kohya's names and shapes, runs live as its kohya and diffusers exports run merged, resumes bit
//! for bit (with the LoRA dropouts and max-norm on the convolutions), and a changed or impossible
//! setting is refused.

mod common;
use common::train::{assert_resume_is_exact, dataset, refused, setting, train, train_ok};
use common::{assert_fails_naming, export_tiny, rel_l2, tiny_unet, tiny_unet_output, tmp};
use kstyle::formats::adapter::Adapter;
use kstyle::models::unet::KohyaLoraFile;
use kstyle::sample::pipeline::unet_module_index;
use kstyle::tensor::SafeTensorsFile;
use kstyle::Device;

#[test]
fn conv_lora_trains_in_kohya_names_and_runs_as_its_exports() {
    let dir = tmp("locon");
    let data = dataset(&dir);
    let adapter = dir.join("lora/adapter.safetensors");
    // lr 1e-2 so that every lora_up moves well away from zero in two steps.
    train_ok(
        &data,
        &adapter,
        "lora",
        &[
            "--max-steps",
            "2",
            "--lr",
            "1e-2",
            "--conv-dim",
            "2",
            "--conv-alpha",
            "1",
        ],
    );
    assert_eq!(setting(&adapter, "conv_dim"), "2");
    assert_eq!(setting(&adapter, "conv_alpha"), "1");
    let f = SafeTensorsFile::open(&adapter).unwrap();
    let names: Vec<String> = f
        .names()
        .filter_map(|n| n.strip_suffix(".lora_down.weight"))
        .map(String::from)
        .collect();
    // kohya's sgm names. The tiny UNet has 17 resnets (2 + 2 + 2 down, 2 mid, 3 + 3 + 3 up),
    // 11 with a 1x1 shortcut, 2 downsamplers (`op`) and 2 upsamplers (`conv`).
    for (suffix, want) in [
        ("_in_layers_2", 17),
        ("_emb_layers_1", 17),
        ("_out_layers_3", 17),
        ("_skip_connection", 11),
        ("_op", 2),
        ("_conv", 2),
    ] {
        let n = names.iter().filter(|n| n.ends_with(suffix)).count();
        assert_eq!(n, want, "{suffix}: {n} modules");
    }
    // The default targets on 22 transformer blocks' two attentions, plus the conv group.
    assert_eq!(names.len(), 22 * 2 * 4 + 66, "{names:?}");
    let shape = |n: &str| f.info(n).unwrap().1.to_vec();
    let alpha = |m: &str| {
        f.tensor(&format!("{m}.alpha"))
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    // A 3x3 convolution at --conv-dim / --conv-alpha; a 1x1 shortcut and a time projection at
    // --rank / --alpha (4 and 4 by default).
    let m = "lora_unet_input_blocks_4_0_in_layers_2"; // down_blocks.1.resnets.0.conv1: 32 -> 48
    assert_eq!(shape(&format!("{m}.lora_down.weight")), [2, 32, 3, 3]);
    assert_eq!(shape(&format!("{m}.lora_up.weight")), [48, 2, 1, 1]);
    assert_eq!(alpha(m), 1.0);
    let m = "lora_unet_input_blocks_4_0_skip_connection";
    assert_eq!(shape(&format!("{m}.lora_down.weight")), [4, 32, 1, 1]);
    assert_eq!(shape(&format!("{m}.lora_up.weight")), [48, 4, 1, 1]);
    assert_eq!(alpha(m), 4.0);
    let m = "lora_unet_input_blocks_4_0_emb_layers_1";
    assert_eq!(shape(&format!("{m}.lora_down.weight")), [4, 128]);
    assert_eq!(alpha(m), 4.0);
    let m = "lora_unet_input_blocks_3_0_op";
    assert_eq!(shape(&format!("{m}.lora_down.weight")), [2, 32, 3, 3]);
    for n in names.iter().filter(|n| !n.contains("_attn")) {
        let up = f.tensor(&format!("{n}.lora_up.weight")).unwrap();
        assert!(
            up.to_vec_f64().unwrap().iter().any(|&v| v != 0.0),
            "{n}: lora_up never moved"
        );
    }

    // Live (the adapter attached) against each export merged at load, on the fixture's inputs.
    let mut live = tiny_unet(&[]);
    let ad = Adapter::load(&adapter, &unet_module_index(&live), Device::Cpu).unwrap();
    let mut by_path: std::collections::HashMap<_, _> = ad.modules.into_iter().collect();
    assert_eq!(live.attach_all(|p| Ok(by_path.remove(p))).unwrap(), 242);
    assert!(by_path.is_empty());
    let y_live = tiny_unet_output(&live);
    // The conv group alone must matter for the comparison to mean anything.
    let mut linears_only = live.clone();
    for (_, mut layer) in linears_only.conv_group_mut() {
        *layer.adapter_mut() = None;
    }
    let y_linears = tiny_unet_output(&linears_only);
    assert!(
        rel_l2(&y_linears, &y_live) > 1e-3,
        "the conv adapters change the output by {}",
        rel_l2(&y_linears, &y_live)
    );
    for format in ["kohya", "diffusers"] {
        let file = dir.join(format!("{format}.safetensors"));
        let o = export_tiny(&adapter, format, &file);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let merged = tiny_unet(&[KohyaLoraFile::new(&file, 1.0)]);
        // f32 live updates against an f64 merge rounded once.
        let r = rel_l2(&tiny_unet_output(&merged), &y_live);
        assert!(r < 1e-5, "{format} export merged differs from live: {r}");
    }
}

#[test]
fn conv_lora_resumes_exactly_and_refuses_changed_settings() {
    let dir = tmp("locon-resume");
    let data = dataset(&dir);
    // K-StyleLoRA's gated linears with plain conv adapters, every LoRA dropout (the network mask
    // per entry of the convolutions' (B, r, H, W) activations) and max-norm over both kinds.
    let args = [
        "--conv-dim",
        "2",
        "--conv-alpha",
        "0.5",
        "--network-dropout",
        "0.2",
        "--rank-dropout",
        "0.25",
        "--module-dropout",
        "0.2",
        "--scale-weight-norms",
        "0.05",
        "--batch-size",
        "2",
    ];
    let ckpt = assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "kstyle",
        &args,
        "kstyle with conv LoRA",
    );
    let ckpt = ckpt.to_str().unwrap();
    let out = dir.join("again/a.safetensors");
    let resume = |extra: &[&str]| {
        let base = ["--max-steps", "4", "--resume", ckpt, "--batch-size", "2"];
        train(&data, &out, "kstyle", &[&base[..], extra].concat())
    };
    assert_fails_naming(&resume(&[]), "--conv-dim 2");
    assert_fails_naming(&resume(&["--conv-dim", "2"]), "--conv-alpha 0.5");
    assert_fails_naming(
        &resume(&["--conv-dim", "3", "--conv-alpha", "0.5"]),
        "--conv-dim 2",
    );

    // Mixed precision: the convolutions' adapters become bf16 leaves like the linears'.
    train_ok(
        &data,
        &dir.join("bf16/a.safetensors"),
        "lora",
        &["--max-steps", "1", "--conv-dim", "2", "--dtype", "bf16"],
    );

    refused(
        &data,
        &dir,
        &["--conv-dim", "0"],
        "--conv-dim must be at least 1",
    );
    refused(&data, &dir, &["--conv-alpha", "2"], "--conv-dim");
}

/// kohya's block-wise rates cover the conv group too (its `get_block_index` reads every module's
/// name): a block at 0 gets no adapter on its resnets either, and the run resumes.
#[test]
fn a_zero_block_weight_drops_the_conv_adapters_of_that_block() {
    let dir = tmp("locon-blocks");
    let data = dataset(&dir);
    let args = [
        "--conv-dim",
        "2",
        "--down-lr-weight",
        "1,0,0.5",
        "--save-every",
        "1",
    ];
    let out = dir.join("a/a.safetensors");
    train_ok(
        &data,
        &out,
        "lora",
        &[&["--max-steps", "1"][..], &args].concat(),
    );
    let f = SafeTensorsFile::open(&out).unwrap();
    let in_block = |i: usize| {
        f.names()
            .filter(|n| {
                n.ends_with(".lora_down.weight")
                    && n.starts_with(&format!("lora_unet_input_blocks_{i}_"))
            })
            .count()
    };
    // input_blocks.1 is the tiny UNet's first resnet (conv1, time_emb_proj, conv2), no attention.
    assert_eq!(in_block(1), 0);
    assert_eq!(in_block(2), 3);
    let ckpt = dir.join("a/a.step000001.ckpt.safetensors");
    let o = train(
        &data,
        &out,
        "lora",
        &[
            &["--max-steps", "2", "--resume", ckpt.to_str().unwrap()][..],
            &args,
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", common::stderr(&o));
}
