//! Per-trainable learning rates through the real binary on the tiny model (SDXL's block layout:
//! 9 input blocks, 3 middle-block parts, 9 output blocks): kohya's LoRA+ ratios and block-wise
//! weights. One step from lora_up = 0 moves every lora_up by rate * m/(sqrt(v) + eps) with the
//! same gradient whatever its rate, so a factor on a rate is the same factor on lora_up after
//! that step, while a lora_down at the plain rate is bit for bit the plain run's.

mod common;
use common::tmp;
use common::train::{assert_resume_is_exact, dataset, refused, setting, train, train_ok};
use kstyle::tensor::SafeTensorsFile;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every tensor of an adapter file as f64, by key.
fn values(path: &Path) -> BTreeMap<String, Vec<f64>> {
    let f = SafeTensorsFile::open(path).unwrap();
    f.names()
        .map(|n| (n.to_string(), f.tensor(n).unwrap().to_vec_f64().unwrap()))
        .collect()
}

/// `got` is `factor` times `plain`, element for element (to 1e-6 of the largest), and not all 0.
fn assert_scaled(key: &str, got: &[f64], plain: &[f64], factor: f64) {
    let scale = plain.iter().fold(0.0f64, |m, x| m.max(x.abs())) * factor.abs();
    assert!(scale > 0.0, "{key}: the plain run left it at 0");
    let err = got
        .iter()
        .zip(plain)
        .map(|(g, p)| (g - factor * p).abs())
        .fold(0.0, f64::max);
    assert!(
        got.len() == plain.len() && err <= 1e-6 * scale,
        "{key}: not {factor} times the plain run's (largest difference {err:e} of {scale:e})"
    );
}

/// The factor a key's rate carries, by its kohya name: `blocks` lists (key prefix, factor).
fn factor_of(key: &str, blocks: &[(&str, f64)]) -> f64 {
    blocks
        .iter()
        .find(|(prefix, _)| key.starts_with(prefix))
        .map_or(1.0, |b| b.1)
}

/// After one step, each lora_up is its rate's factor times the plain run's and each lora_down at
/// the plain rate is the plain run's bit for bit; `factors` gives a module's (lora_up factor,
/// lora_down factor) by key.
fn assert_one_step(name: &str, out: &Path, plain: &Path, factors: &dyn Fn(&str) -> (f64, f64)) {
    let (got, plain) = (values(out), values(plain));
    let mut ups = 0;
    for (key, v) in &got {
        let p = plain
            .get(key)
            .unwrap_or_else(|| panic!("{name}: {key} is not in the plain run"));
        if key.ends_with(".lora_up.weight") {
            assert_scaled(&format!("{name}: {key}"), v, p, factors(key).0);
            ups += 1;
        } else if key.ends_with(".lora_down.weight") && factors(key).1 == 1.0 {
            assert!(v == p, "{name}: {key} moved off the plain run");
        }
    }
    assert!(ups > 0, "{name}: no lora_up in {}", out.display());
}

#[test]
fn loraplus_and_block_weights_set_each_rate() {
    let dir = tmp("lr-groups");
    let data = dataset(&dir);
    let cache = dir.join("cache");
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name).join("a.safetensors");
        let args = [
            &[
                "--max-steps",
                "1",
                "--grad-accum",
                "1",
                "--lr",
                "1e-2",
                "--cache",
                cache.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        train_ok(&data, &out, "lora", &args)
    };
    let plain = run("plain", &[]);
    assert_eq!(setting(&plain, "loraplus_unet_lr_ratio"), "none");
    assert_eq!(setting(&plain, "down_lr_weight"), "none");

    // Factors of exactly 1 in every spelling are the plain run, bit for bit.
    let ones = run(
        "ones",
        &[
            "--loraplus-lr-ratio",
            "1",
            "--down-lr-weight",
            "1,1,1,1,1,1,1,1,1",
            "--mid-lr-weight",
            "1,1",
            "--up-lr-weight",
            "zeros+1",
        ],
    );
    assert!(
        values(&ones) == values(&plain),
        "factors of 1 changed the run"
    );
    assert_eq!(setting(&ones, "up_lr_weight"), "zeros+1");

    // LoRA+: every lora_up at 4 times the rate, every lora_down as it was.
    let plus = run("plus", &["--loraplus-lr-ratio", "4"]);
    assert_one_step("loraplus", &plus, &plain, &|_| (4.0, 1.0));
    assert_eq!(setting(&plus, "loraplus_unet_lr_ratio"), "4");

    // The parts' own ratios, with the text encoders training.
    let te_plain = run("te-plain", &["--train-text-encoder"]);
    let te_plus = run(
        "te-plus",
        &[
            "--train-text-encoder",
            "--loraplus-lr-ratio",
            "8",
            "--loraplus-text-encoder-lr-ratio",
            "2",
        ],
    );
    assert_one_step("loraplus per part", &te_plus, &te_plain, &|key| match key
        .starts_with("lora_te")
    {
        true => (2.0, 1.0),
        false => (8.0, 1.0),
    });
    assert_eq!(setting(&te_plus, "loraplus_text_encoder_lr_ratio"), "2");

    // Block weights (attention lives in input_blocks 4, 5, 7, 8, middle_block.1 and
    // output_blocks 0-5): 0.5 on input_blocks.4, 0.25 on the middle block's attention, 2 on
    // output_blocks.1, and output_blocks 3-5 at 0 (below the threshold of 0.1 for one of them).
    let blocks = run(
        "blocks",
        &[
            "--down-lr-weight",
            "1,1,1,1,0.5",
            "--mid-lr-weight",
            "1,0.25,1",
            "--up-lr-weight",
            "1,2,1,0,,0.05",
            "--block-lr-zero-threshold",
            "0.1",
        ],
    );
    let factors = [
        ("lora_unet_input_blocks_4_", 0.5),
        ("lora_unet_middle_block_1_", 0.25),
        ("lora_unet_output_blocks_1_", 2.0),
    ];
    assert_one_step("blocks", &blocks, &plain, &|key| {
        let w = factor_of(key, &factors);
        (w, w)
    });
    let keys = values(&blocks);
    for zeroed in ["3", "4", "5"] {
        let prefix = format!("lora_unet_output_blocks_{zeroed}_");
        assert!(
            !keys.keys().any(|k| k.starts_with(&prefix)),
            "output_blocks.{zeroed} is at 0 but has adapters"
        );
        assert!(values(&plain).keys().any(|k| k.starts_with(&prefix)));
    }
    for kept in factors {
        assert!(keys.keys().any(|k| k.starts_with(kept.0)), "{}", kept.0);
    }
    assert_eq!(setting(&blocks, "up_lr_weight"), "1,2,1,0,0,0.05");
    assert_eq!(setting(&blocks, "block_lr_zero_threshold"), "0.1");

    // Both at once, with K-StyleLoRA (its gates at the plain rate) and a curve, resume exactly.
    let resume_args = [
        "--loraplus-lr-ratio",
        "4",
        "--down-lr-weight",
        "cosine+0.2",
        "--up-lr-weight",
        "1,1,1,1,1,0",
        "--lr",
        "1e-2",
        "--cache",
        cache.to_str().unwrap(),
    ];
    let ckpt = assert_resume_is_exact(
        &data,
        &dir.join("resume"),
        "kstyle",
        &resume_args,
        "lr groups",
    );
    // A resume must keep the blocks at 0 where they were: the adapters are fixed at the start.
    let o = train(
        &data,
        &dir.join("moved/a.safetensors"),
        "kstyle",
        &[
            "--max-steps",
            "3",
            "--resume",
            ckpt.to_str().unwrap(),
            "--loraplus-lr-ratio",
            "4",
            "--down-lr-weight",
            "cosine+0.2",
            "--cache",
            cache.to_str().unwrap(),
        ],
    );
    common::assert_fails_naming(&o, "output_blocks.5");
    let o = train(
        &data,
        &dir.join("dropped/a.safetensors"),
        "kstyle",
        &[
            "--max-steps",
            "3",
            "--resume",
            ckpt.to_str().unwrap(),
            "--loraplus-lr-ratio",
            "4",
            "--cache",
            cache.to_str().unwrap(),
        ],
    );
    common::assert_fails_naming(&o, "block-wise learning rates");

    for (extra, needle) in [
        (&["--loraplus-lr-ratio", "0"][..], "--loraplus-lr-ratio"),
        (
            &["--loraplus-unet-lr-ratio", "-2"][..],
            "--loraplus-unet-lr-ratio",
        ),
        (&["--loraplus-lr-ratio", "NaN"][..], "--loraplus-lr-ratio"),
        (
            &["--loraplus-text-encoder-lr-ratio", "2"][..],
            "needs --train-text-encoder",
        ),
        (
            &["--down-lr-weight", "cosin"][..],
            "--down-lr-weight `cosin`",
        ),
        (&["--up-lr-weight", "1,x"][..], "`x` is not a number"),
        (
            &["--down-lr-weight", "1,1,1,1,1,1,1,1,1,1"][..],
            "10 values; this UNet has 9 input blocks",
        ),
        (
            &["--mid-lr-weight", "1,1,1,1"][..],
            "has 3 middle-block parts",
        ),
        (
            &["--mid-lr-weight", "sine"][..],
            "--mid-lr-weight takes a list",
        ),
        (
            &["--block-lr-zero-threshold", "0.5"][..],
            "--block-lr-zero-threshold applies",
        ),
        (
            &[
                "--down-lr-weight",
                "zeros",
                "--mid-lr-weight",
                "0,0,0",
                "--up-lr-weight",
                "zeros",
            ][..],
            "whose learning-rate weight and rank are above 0",
        ),
    ] {
        refused(&data, &dir, extra, needle);
    }
}
