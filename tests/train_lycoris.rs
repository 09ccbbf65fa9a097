//! `kstyle train --algo loha|lokr`: LyCORIS' LoHa and LoKr on the transformer linears, the conv
//! group and the text encoders. The arithmetic of a step is checked against lycoris-lora's
//! `LohaModule` and `LokrModule` by the `train_loha` and `train_lokr` verify cases; here, through
//! the real binary on the tiny model: the adapter holds LyCORIS' names and shapes, runs live as
//! its kohya export runs merged (what ComfyUI and A1111 load), resumes bit for bit, and what
//! LyCORIS cannot do is refused.

mod common;
use common::train::{
    assert_resume_is_exact, dataset, refused, resume_with, setting, train, train_ok,
};
use common::{assert_fails_naming, export_tiny, rel_l2, tiny_unet, tiny_unet_output, tmp};
use kstyle::formats::adapter::Adapter;
use kstyle::models::unet::KohyaLoraFile;
use kstyle::nn::lycoris::LycorisAlgo;
use kstyle::sample::pipeline::unet_module_index;
use kstyle::tensor::SafeTensorsFile;
use kstyle::Device;
use std::path::Path;

/// The adapter attached live (all 242 modules of the default targets and the conv group) and
/// its kohya export merged at load give the same UNet output on the fixture's inputs; the conv
/// adapters matter to it; diffusers' format is refused.
fn live_matches_export(adapter: &Path, dir: &Path, algo: LycorisAlgo) {
    let mut live = tiny_unet(&[]);
    let ad = Adapter::load(adapter, &unet_module_index(&live), Device::Cpu).unwrap();
    assert_eq!(ad.lycoris_algo(), Some(algo));
    let mut by_path: std::collections::HashMap<_, _> = ad.modules.into_iter().collect();
    assert_eq!(live.attach_all(|p| Ok(by_path.remove(p))).unwrap(), 242);
    assert!(by_path.is_empty());
    let y_live = tiny_unet_output(&live);
    let y_base = tiny_unet_output(&tiny_unet(&[]));
    assert!(
        rel_l2(&y_base, &y_live) > 1e-3,
        "the adapter changes nothing"
    );
    let mut linears_only = live.clone();
    for (_, mut layer) in linears_only.conv_group_mut() {
        *layer.adapter_mut() = None;
    }
    let r = rel_l2(&tiny_unet_output(&linears_only), &y_live);
    assert!(r > 1e-3, "the conv adapters change the output by {r}");
    let kohya = dir.join("kohya.safetensors");
    let o = export_tiny(adapter, "kohya", &kohya);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let exported = SafeTensorsFile::open(&kohya).unwrap();
    assert_eq!(exported.metadata()["ss_network_module"], "lycoris.kohya");
    let merged = tiny_unet(&[KohyaLoraFile::new(&kohya, 1.0)]);
    // f32 live updates against an f64 merge rounded once.
    let r = rel_l2(&tiny_unet_output(&merged), &y_live);
    assert!(r < 1e-5, "kohya export merged differs from live: {r}");
    // diffusers' load_lora_weights reads no LyCORIS: refused, pointing at the format that works.
    assert_fails_naming(
        &export_tiny(adapter, "diffusers", &dir.join("d.safetensors")),
        "--format kohya",
    );
}

#[test]
fn loha_trains_in_lycoris_names_and_runs_as_its_kohya_export() {
    let dir = tmp("loha");
    let data = dataset(&dir);
    let adapter = dir.join("loha/adapter.safetensors");
    // lr 1e-2 so that every hada_w2_a moves well away from zero in two steps.
    let args = [
        "--max-steps",
        "2",
        "--lr",
        "1e-2",
        "--algo",
        "loha",
        "--conv-dim",
        "2",
        "--conv-alpha",
        "1",
    ];
    train_ok(&data, &adapter, "lora", &args);
    assert_eq!(setting(&adapter, "algo"), "loha");
    let f = SafeTensorsFile::open(&adapter).unwrap();
    assert_eq!(f.metadata()["ss_network_module"], "lycoris.kohya");
    let names: Vec<String> = f
        .names()
        .filter_map(|n| n.strip_suffix(".hada_w1_a"))
        .map(String::from)
        .collect();
    // The default targets on 22 transformer blocks' two attentions, plus the conv group; no
    // LoRA factor anywhere.
    assert_eq!(names.len(), 22 * 2 * 4 + 66, "{names:?}");
    assert!(!f.names().any(|n| n.contains("lora_down")));
    let shape = |n: &str| f.info(n).unwrap().1.to_vec();
    let alpha = |m: &str| {
        f.tensor(&format!("{m}.alpha"))
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    // A 3x3 convolution at --conv-dim / --conv-alpha with LyCORIS' flattened (r, C_in kh kw)
    // factors; a linear at --rank / --alpha (4 and 4 by default).
    let m = "lora_unet_input_blocks_4_0_in_layers_2"; // down_blocks.1.resnets.0.conv1: 32 -> 48
    for (n, dims) in [
        ("hada_w1_a", [48, 2]),
        ("hada_w1_b", [2, 32 * 9]),
        ("hada_w2_a", [48, 2]),
        ("hada_w2_b", [2, 32 * 9]),
    ] {
        assert_eq!(shape(&format!("{m}.{n}")), dims, "{m}.{n}");
    }
    assert_eq!(alpha(m), 1.0);
    let m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
    assert_eq!(shape(&format!("{m}.hada_w1_a")), [48, 4]);
    assert_eq!(shape(&format!("{m}.hada_w2_b")), [4, 48]);
    assert_eq!(alpha(m), 4.0);
    for n in &names {
        let w2a = f.tensor(&format!("{n}.hada_w2_a")).unwrap();
        assert!(
            w2a.to_vec_f64().unwrap().iter().any(|&v| v != 0.0),
            "{n}: hada_w2_a never moved"
        );
    }

    live_matches_export(&adapter, &dir, LycorisAlgo::Loha);
}

#[test]
fn loha_resumes_exactly_and_refuses_what_it_cannot_do() {
    let dir = tmp("loha-resume");
    let data = dataset(&dir);
    // LoHa everywhere (text encoders too) with the cultural loss, module dropout per picture,
    // batch 2 and Adafactor's factored moments over the flattened conv factors.
    let args = [
        "--algo",
        "loha",
        "--conv-dim",
        "2",
        "--train-text-encoder",
        "--module-dropout",
        "0.3",
        "--batch-size",
        "2",
    ];
    let ckpt = assert_resume_is_exact(&data, &dir.join("resume"), "lora-csl", &args, "loha");
    let out = dir.join("again/a.safetensors");
    // The same run as plain LoRA.
    let o = resume_with(&data, &out, "lora-csl", &ckpt, &args[2..]);
    assert_fails_naming(&o, "--algo loha");

    // The text encoders' LoHa too: generate with the adapter live and with its kohya export
    // merged gives the same picture (within a level of rounding), and a different one without.
    let live = dir.join("resume/a/adapter.safetensors");
    let kohya = dir.join("kohya.safetensors");
    let o = export_tiny(&live, "kohya", &kohya);
    assert!(o.status.success(), "{}", common::stderr(&o));
    let picture = |lora: Option<&Path>, name: &str| {
        let png = dir.join(name);
        let mut args = vec!["--out", png.to_str().unwrap()];
        if let Some(l) = lora {
            args.extend(["--lora", l.to_str().unwrap()]);
        }
        let o = common::generate_tiny_steps("2", &args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        image::open(&png).unwrap().to_rgb8().into_raw()
    };
    let (a, b) = (
        picture(Some(&live), "live.png"),
        picture(Some(&kohya), "kohya.png"),
    );
    let most = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(
        most <= 1,
        "live and merged pictures differ by {most} levels"
    );
    assert_ne!(a, picture(None, "none.png"), "the adapter changes nothing");
    let ckpt = assert_resume_is_exact(
        &data,
        &dir.join("adafactor"),
        "lora",
        &[
            "--algo",
            "loha",
            "--conv-dim",
            "2",
            "--optimizer",
            "adafactor",
        ],
        "loha with adafactor",
    );
    assert!(ckpt.exists());

    // Mixed precision: LoHa's factors become bf16 leaves like LoRA's.
    train_ok(
        &data,
        &dir.join("bf16/a.safetensors"),
        "lora",
        &["--max-steps", "1", "--algo", "loha", "--dtype", "bf16"],
    );

    let o = train(
        &data,
        &dir.join("refused.safetensors"),
        "kstyle",
        &["--max-steps", "1", "--algo", "loha"],
    );
    assert_fails_naming(&o, "--method lora or lora-csl");
    for (extra, needle) in [
        (&["--network-dropout", "0.1"][..], "--module-dropout only"),
        (&["--rank-dropout", "0.1"][..], "--module-dropout only"),
        (&["--scale-weight-norms", "1"][..], "--scale-weight-norms"),
        (&["--loraplus-lr-ratio", "16"][..], "--loraplus"),
    ] {
        refused(
            &data,
            &dir,
            &[&["--algo", "loha"][..], extra].concat(),
            needle,
        );
    }
}

#[test]
fn lokr_trains_in_lycoris_names_and_runs_as_its_kohya_export() {
    let dir = tmp("lokr");
    let data = dataset(&dir);
    let adapter = dir.join("lokr/adapter.safetensors");
    let args = [
        "--max-steps",
        "2",
        "--lr",
        "1e-2",
        "--algo",
        "lokr",
        "--conv-dim",
        "2",
    ];
    train_ok(&data, &adapter, "lora", &args);
    assert_eq!(setting(&adapter, "algo"), "lokr");
    assert_eq!(setting(&adapter, "lokr_factor"), "-1");
    let f = SafeTensorsFile::open(&adapter).unwrap();
    assert_eq!(f.metadata()["ss_network_args"], r#"{"algo": "lokr"}"#);
    let names: Vec<String> = f
        .names()
        .filter_map(|n| n.strip_suffix(".lokr_w1"))
        .map(String::from)
        .collect();
    assert_eq!(names.len(), 22 * 2 * 4 + 66, "{names:?}");
    let shape = |n: &str| f.info(n).unwrap().1.to_vec();
    let alpha = |m: &str| {
        f.tensor(&format!("{m}.alpha"))
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    // to_q 48 -> 48 = (6 x 8)²: rank 4 is half of 8, so w2 is whole and alpha the rank (scale 1).
    let m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
    assert_eq!(shape(&format!("{m}.lokr_w1")), [6, 6]);
    assert_eq!(shape(&format!("{m}.lokr_w2")), [8, 8]);
    assert_eq!(alpha(m), 4.0);
    // conv1 32 -> 48, 3x3, at --conv-dim 2 (below half of 8): w2 a rank-2 pair over d kh kw.
    let m = "lora_unet_input_blocks_4_0_in_layers_2";
    assert_eq!(shape(&format!("{m}.lokr_w1")), [6, 4]);
    assert_eq!(shape(&format!("{m}.lokr_w2_a")), [8, 2]);
    assert_eq!(shape(&format!("{m}.lokr_w2_b")), [2, 8 * 9]);
    assert_eq!(alpha(m), 1.0);
    // A 1x1 shortcut 32 -> 48 at rank 4: a whole w2 keeps the kernel dims, as LyCORIS stores it.
    let m = "lora_unet_input_blocks_4_0_skip_connection";
    assert_eq!(shape(&format!("{m}.lokr_w2")), [8, 8, 1, 1]);
    for n in &names {
        let moved = ["lokr_w2", "lokr_w2_b"].iter().any(|w| {
            f.tensor(&format!("{n}.{w}"))
                .is_ok_and(|t| t.to_vec_f64().unwrap().iter().any(|&v| v != 0.0))
        });
        assert!(moved, "{n}: w2 never moved");
    }
    live_matches_export(&adapter, &dir, LycorisAlgo::Lokr);
}

#[test]
fn lokr_resumes_exactly_with_a_factor_and_refuses_a_changed_one() {
    let dir = tmp("lokr-resume");
    let data = dataset(&dir);
    // factor 4: w1 (4, 4) wherever 4 divides both sides, the text encoders' LoKr too.
    let args = [
        "--algo",
        "lokr",
        "--lokr-factor",
        "4",
        "--conv-dim",
        "2",
        "--train-text-encoder",
        "--module-dropout",
        "0.3",
        "--batch-size",
        "2",
    ];
    let ckpt = assert_resume_is_exact(&data, &dir.join("resume"), "lora", &args, "lokr");
    let f = SafeTensorsFile::open(&ckpt).unwrap();
    let m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
    assert_eq!(f.info(&format!("{m}.lokr_w1")).unwrap().1, [4, 4]);
    assert!(f
        .names()
        .any(|n| n.starts_with("lora_te1_") && n.ends_with(".lokr_w1")));
    let out = dir.join("again/a.safetensors");
    let resume = |extra: &[&str]| {
        let base = [
            "--max-steps",
            "4",
            "--resume",
            ckpt.to_str().unwrap(),
            "--conv-dim",
            "2",
            "--train-text-encoder",
            "--batch-size",
            "2",
        ];
        train(&data, &out, "lora", &[&base[..], extra].concat())
    };
    assert_fails_naming(&resume(&["--algo", "lokr"]), "--lokr-factor 4");
    assert_fails_naming(&resume(&["--algo", "loha"]), "--algo lokr");
    refused(
        &data,
        &dir,
        &["--lokr-factor", "4"],
        "--lokr-factor needs --algo lokr",
    );
    refused(
        &data,
        &dir,
        &["--algo", "lokr", "--lokr-factor", "0"],
        "--lokr-factor is a positive number or -1",
    );
    refused(
        &data,
        &dir,
        &["--algo", "lokr", "--rank-dropout", "0.1"],
        "--module-dropout only",
    );
}
